"""ZipCache's token saliency: normalized attention received from a few probe queries.

**Normalization convention.** A token's saliency is the attention it receives from the probe queries,
summed over the probes and over the query heads of its KV head's group, divided by the number of probe
*queries* (positions, not heads) that can see it under the attention mask:

    saliency[b, kv_head, t] = sum_{p sees t} sum_{h in group(kv_head)} softmax(q[b, h, p] . K[b, kv_head])[t]
                              / #{p : p sees t}

Plain accumulated attention favours early tokens because the causal mask lets more queries see them; the
division removes that bias. Tokens no probe sees (padding) score `-inf` and are never preferred.

**Probes.** Of each step's real (non-padding) queries, the `ceil(recent * n)` most recent and
`round(random * n)` others drawn at random (a generator seeded with `seed` for every sequence, so the choice
depends only on the sequence's own length, not on its batch neighbours or padding) are the probes. Only their
attention rows are formed, in blocks of probes, so the `queries x keys` attention matrix never exists; the
model's real attention output comes from its normal attention path.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from gearkit.compressors.checks import check_fraction, check_seed

# Attention entries per block of probes: bounds the memory of the probe attention whatever the context length.
_BLOCK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Probes:
    """Which of a step's queries serve as probes for saliency.

    Attributes:
        recent: fraction of the step's real queries taken from its end (at least one query).
        random: fraction taken at random from the other queries.
        seed: seed of the random choice (the same for every sequence, step and layer).
    """

    recent: float = 0.05
    random: float = 0.05
    seed: int = 0

    def __post_init__(self):
        for name in ("recent", "random"):
            check_fraction(getattr(self, name), f"Probes.{name}")
        check_seed(self.seed, "Probes.seed")

    def positions(self, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Choose the probes among each sequence's real queries.

        Args:
            valid: bool `[batch, queries]`, True for real (non-padding) queries.

        Returns:
            `(index, used)`: int64 `[batch, probes]` query positions (ascending per sequence) and bool
            `[batch, probes]`, False for the filler of sequences with fewer probes than the longest.
        """
        if valid.dim() != 2 or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor [batch, queries], got {valid.dtype} {tuple(valid.shape)}")
        chosen = []
        for row in valid.cpu():
            real = row.nonzero().flatten()
            n = real.numel()
            n_recent = min(n, max(1, math.ceil(self.recent * n))) if n else 0
            n_random = min(n - n_recent, round(self.random * n))
            earlier = real[: n - n_recent]
            g = torch.Generator().manual_seed(self.seed)
            picked = earlier[torch.randperm(earlier.numel(), generator=g)[:n_random]]
            chosen.append(torch.cat([picked, real[n - n_recent :]]).sort().values)
        width = max(c.numel() for c in chosen) if chosen else 0
        index = torch.zeros(valid.shape[0], width, dtype=torch.long)
        used = torch.zeros(valid.shape[0], width, dtype=torch.bool)
        for b, c in enumerate(chosen):
            index[b, : c.numel()], used[b, : c.numel()] = c, True
        return index.to(valid.device), used.to(valid.device)


def visible_keys(attention_mask: Tensor | None, batch: int, queries: int, keys: int, device) -> Tensor:
    """Which keys each query may attend to: bool `[batch, queries, keys]`.

    Args:
        attention_mask: bool `[batch or 1, 1, queries, keys]` (True = attend), an additive float mask of that
            shape (a large negative entry = masked), or None for plain causal attention with the queries at
            the end of the keys.
        batch (int): batch size.
        queries (int): number of queries.
        keys (int): number of keys.
        device (torch.device | str): device of the result.
    """
    if attention_mask is None:
        q = torch.arange(queries, device=device)[:, None] + (keys - queries)
        return (torch.arange(keys, device=device)[None] <= q).expand(batch, queries, keys)
    if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (queries, keys):
        raise ValueError(f"attention_mask must be [batch, 1, {queries}, {keys}], got {tuple(attention_mask.shape)}")
    mask = attention_mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, queries, keys)


def probe_attention(
    query: Tensor, keys: Tensor, attention_mask: Tensor | None, scaling: float | None, probes: Probes
) -> tuple[Tensor, Tensor]:
    """Attention received by every key from the step's probe queries, and how many probes see each key.

    The probes' attention rows are computed in blocks (never the full `queries x keys` matrix), from
    `softmax(scaling * q . k)` under the mask, and summed over the probes and over the query heads of each KV
    head's group (grouped-query attention).

    Args:
        query: `[batch, heads, queries, head_dim]`, the step's queries (the newest `queries` positions).
        keys: `[batch, kv_heads, kv_len, head_dim]`, every key the step attends to; `heads % kv_heads == 0`.
        attention_mask: see `visible_keys`; padding is excluded through it (padding queries are never probes,
            padding keys receive nothing and are seen by no probe).
        scaling: softmax scale, default `head_dim ** -0.5`.
        probes: how probes are chosen.

    Returns:
        `(received, seen)`: float32 `[batch, kv_heads, kv_len]` summed attention, and float32 `[batch, kv_len]`
        the number of probe queries that see each key.
    """
    if query.dim() != 4 or keys.dim() != 4 or query.shape[0] != keys.shape[0] or query.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"query [batch, heads, queries, head_dim] and keys [batch, kv_heads, kv_len, head_dim] do not "
            f"match: {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    b, heads, nq, d = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot be grouped over {kv_heads} KV heads")
    if nq > length:
        raise ValueError(f"{nq} queries but only {length} keys: the queries must be the newest key positions")
    visible = visible_keys(attention_mask, b, nq, length, query.device)
    own = torch.arange(nq, device=query.device) + (length - nq)
    valid = visible.gather(2, own[None, :, None].expand(b, nq, 1))[..., 0]  # a real query sees its own position
    index, used = probes.positions(valid)
    scale = d**-0.5 if scaling is None else scaling
    grouped_keys = keys.float().unflatten(1, (kv_heads, 1))  # [b, kv_heads, 1, kv_len, d]
    received = query.new_zeros(b, kv_heads, length, dtype=torch.float32)
    seen = query.new_zeros(b, length, dtype=torch.float32)
    block = max(1, _BLOCK_ELEMENTS // max(1, heads * length))
    for start in range(0, index.shape[1], block):
        idx, ok = index[:, start : start + block], used[:, start : start + block]
        sees = visible.gather(1, idx[..., None].expand(-1, -1, length)) & ok[..., None]  # [b, p, kv_len]
        q = query.float().gather(2, idx[:, None, :, None].expand(-1, heads, -1, d))
        q = q.unflatten(1, (kv_heads, heads // kv_heads))  # [b, kv_heads, group, p, d]
        logits = (q @ grouped_keys.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~sees[:, None, None], float("-inf"))
        weights = torch.softmax(logits, -1).nan_to_num(0.0)  # rows of filler probes are all masked: zero
        received += weights.sum((2, 3))
        seen += sees.sum(1)
    return received, seen


def normalized_saliency(received: Tensor, seen: Tensor) -> Tensor:
    """Attention received divided by the number of probe queries that saw each token.

    Args:
        received: float `[batch, kv_heads, tokens]`.
        seen: float `[batch, tokens]`.

    Returns:
        float32 `[batch, kv_heads, tokens]`; `-inf` where no probe saw the token.
    """
    seen = seen[:, None].float()
    return torch.where(seen > 0, received.float() / seen.clamp_min(1), float("-inf"))
