"""What one step attends to (`StepView`), and the memo of what every layer of a step would compute alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from gearkit import decode_attention
from gearkit.cache.chunks import Lane
from gearkit.cache.sinks import SinkCopy
from gearkit.kernels.reference import attention_reference


class StepShared:
    """The last result of a computation every layer of a model step repeats with the same inputs (the step's
    biases), so only the first layer pays for it. Tensor inputs are compared by identity (they are held here, so an
    identity is never reused while it is), the others by value. A cache holds one for its layers."""

    def __init__(self):
        self._key: tuple | None = None
        self._value = None

    def __call__(self, key: tuple, compute: Callable[[], object]):
        """`compute()`, or its last result if `key` is the same as last time's."""
        last = self._key
        if (
            last is None
            or len(key) != len(last)
            or not all(a is b if isinstance(a, Tensor) or isinstance(b, Tensor) else a == b for a, b in zip(key, last))
        ):
            self._value, self._key = compute(), key
        return self._value


@dataclasses.dataclass(frozen=True)
class StepView:
    """What one step attends to: the store as it was before the step compressed anything, plus the step's tokens.
    Nothing here is written in place later, so the view stays valid after the store moves on.

    Attributes:
        keys: the key lane; its buffer holds the buffered and the step's new keys.
        values: the value lane, likewise.
        sink: the sink copy, the step's sink tokens included.
        chunk: tokens per compressed chunk.
        dtype: the compute dtype (the model's).
        shared: the memo the layers of a step share (see `StepShared`).
    """

    keys: Lane
    values: Lane
    sink: SinkCopy
    chunk: int
    dtype: torch.dtype
    shared: StepShared

    @property
    def chunks(self) -> int:
        """Compressed chunks per sequence."""
        return self.keys.chunks.chunks

    def dense(self) -> tuple[Tensor, Tensor]:
        """Every token decompressed, sink copy in front: keys and values `KV` in the compute dtype."""
        return tuple(
            self.sink.overlay(lane.dense(self.dtype), copy)
            for lane, copy in ((self.keys, self.sink.keys), (self.values, self.sink.values))
        )

    def fresh(self) -> tuple[Tensor, Tensor]:
        """The buffer and the step's tokens only, in the compute dtype (a step that reads the storage)."""
        return self.keys.buffer.to(self.dtype), self.values.buffer.to(self.dtype)

    def attend(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor,
        attention_mask: Tensor | None,
        scaling: float | None,
        softcap: float | None = None,
    ) -> Tensor:
        """The step's attention read from the storage: the compressed chunks block by block
        (`gearkit.decode_attention.attend`), with the exact tokens (the sink copy and `keys`/`values`) in the same
        softmax.

        Args:
            query: `[batch, heads, queries, head_dim]`.
            keys: `fresh()`'s keys `[batch, kv_heads, buffered + queries, head_dim]`.
            values: like `keys`.
            attention_mask: boolean `[batch, 1, queries, held + queries]` (True = attend) or None (causal).
            scaling: softmax scale (default `head_dim ** -0.5`).
            softcap: the model's attention soft-capping (scores become `cap * tanh(scores / cap)`), or None.

        Returns:
            `[batch, queries, heads, head_dim]` in the query's dtype.

        Raises:
            ValueError: if queries of one sequence see different compressed pasts.
        """
        b, _, nq, d = query.shape
        held, fresh = self.chunks * self.chunk, keys.shape[-2]
        scaling = d**-0.5 if scaling is None else scaling
        bias, exact_bias = self._biases(attention_mask, b, nq, held, fresh, query.device)
        exact = (
            torch.cat([self.sink.keys.to(keys.dtype), keys], -2),
            torch.cat([self.sink.values.to(values.dtype), values], -2),
            exact_bias,
        )
        if self.chunks:
            blocks = [(k, v) for (_, k), (_, v) in zip(self.keys.chunks.blocks(), self.values.chunks.blocks())]
            out, _ = decode_attention.attend(
                query, self.keys.pipeline, self.values.pipeline, blocks, bias, scaling, exact, softcap
            )
        else:
            out, _ = attention_reference(query, *exact, scaling, softcap)
        return out.to(query.dtype).transpose(1, 2)

    def _biases(
        self, attention_mask: Tensor | None, b: int, nq: int, held: int, fresh: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """What the step attends to: over the compressed chunks, boolean `[batch, held]` (True = attend; the same
        for every query; sink positions hidden, the copy holds them), and over the exact tokens, the sink copy then
        `fresh` buffered and new tokens, an additive float `[batch, queries, slots + fresh]` (`-inf` hides).

        Every layer of a step asks with the same mask, row starts and token counts: the first one computes them."""
        starts = self.sink.starts
        starts = None if starts is None else tuple(starts.tolist())  # each layer holds its own copy
        key = (attention_mask, starts, b, nq, held, fresh, self.sink.slots, device)
        return self.shared(key, lambda: self._compute_biases(attention_mask, b, nq, held, fresh, device))

    def _compute_biases(
        self, attention_mask: Tensor | None, b: int, nq: int, held: int, fresh: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        if attention_mask is None:  # causal: the whole past is visible, the fresh tokens causally
            past = torch.ones(b, 1, held, dtype=torch.bool, device=device)
            recent = torch.ones(nq, fresh, dtype=torch.bool, device=device).tril(fresh - nq).expand(b, nq, fresh)
        else:
            visible = attention_mask[:, 0].to(torch.bool)
            past, recent = visible[:, :, :held], visible[:, :, held:]
            if not (past == past[:, :1]).all():
                raise ValueError(
                    "attention over the compressed storage needs every query to see the same compressed past"
                )
        # sink tokens inside the compressed chunks are read from the exact copy (later ones are in the buffer)
        sink_at = self.sink.positions().expand(b, -1)
        sink_visible = (
            past.expand(b, nq, held).gather(2, sink_at.clamp(max=max(held - 1, 0))[:, None].expand(-1, nq, -1))
            & (sink_at < held)[:, None]
        )
        chunks = past[:, 0].clone()  # a byte per past token, as the model's own mask
        window = min(held, self.sink.until)  # every row's sink positions lie before it
        if window:
            chunks[:, :window] &= ~self.sink.covering(window)[1]
        return chunks, torch.where(torch.cat([sink_visible, recent], -1), 0.0, float("-inf"))
