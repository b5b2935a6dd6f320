"""The sink copy: each row's first tokens (attention sinks) kept exactly, rows of a left-padded batch included."""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import Tensor

from gearkit.accounting import tensor_nbytes


def padding(position_ids: Tensor | None, states: Tensor) -> Tensor | None:
    """Each row's left padding `[batch]` (long), read from a first step's position ids `[batch or 1, new]` and
    its states `KV`, or None when no row is padded (or the ids do not say).

    `transformers` numbers a left-padded row's real tokens from 0, so its last token sits at `new - 1 - padding`.
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] not in (1, states.shape[0]):
        return None
    new = states.shape[-2]
    pad = (new - 1 - position_ids[:, -1].to(states.device, torch.long)).clamp(0, new - 1).expand(states.shape[0])
    return pad.contiguous() if bool(pad.any()) else None


@dataclasses.dataclass(frozen=True)
class SinkCopy:
    """Each row's first `size` real tokens, held exactly. Slot `j` of a row holds its token `starts + j` (zeros until
    that token arrives); the chunk that holds a sink token is compressed with it excluded (it widens no range), and
    reads take it from here. The chunk grid is the cache's, whatever the padding.

    Attributes:
        keys: `[batch, kv_heads, slots, head_dim]` in the buffer dtype.
        values: like `keys`.
        starts: each row's first real token `[batch]` (long; its left padding), or None when every row starts at 0.
        size: sink tokens per row.
        until: the position after every row's sink tokens (a Python int: no device sync on later steps).
    """

    keys: Tensor
    values: Tensor
    starts: Tensor | None
    size: int
    until: int

    @classmethod
    def empty(cls, keys: Tensor, values: Tensor, starts: Tensor | None, size: int) -> SinkCopy:
        """No token yet, for rows starting at `starts` `[batch]` (or 0); `keys`/`values` give batch, heads and dtype."""
        none = (t.new_zeros(*t.shape[:2], 0, t.shape[-1]) for t in (keys, values))
        return cls(*none, starts, size, size + (0 if starts is None else int(starts.max())))

    def added(self, keys: Tensor, values: Tensor, length: int) -> SinkCopy:
        """The copy after new tokens `[batch, kv_heads, new, head_dim]` arrive at position `length`."""
        new = keys.shape[-2]
        if self.starts is None:  # the common case: the first tokens of every row
            take = max(min(self.size - length, new), 0)
            if not take:
                return self
            held = (torch.cat([self.keys, keys[:, :, :take]], -2), torch.cat([self.values, values[:, :, :take]], -2))
            return dataclasses.replace(self, keys=held[0], values=held[1])
        if length >= self.until:
            return self
        slots = int((length + new - self.starts).clamp(0, self.size).max())
        position = self.starts[:, None] + torch.arange(slots, device=self.starts.device)  # [batch, slots]
        arrives = ((position >= length) & (position < length + new))[:, None, :, None]
        index = (position - length).clamp(0, new - 1)[:, None, :, None]
        held = []
        for copy, fresh in ((self.keys, keys), (self.values, values)):
            copy = torch.cat([copy, copy.new_zeros(*copy.shape[:2], slots - copy.shape[-2], copy.shape[-1])], -2)
            held.append(
                torch.where(arrives, fresh.gather(2, index.expand(*fresh.shape[:2], slots, fresh.shape[-1])), copy)
            )
        return dataclasses.replace(self, keys=held[0], values=held[1])

    @property
    def slots(self) -> int:
        """Slots held per row."""
        return self.keys.shape[-2]

    def positions(self) -> Tensor:
        """Sequence position of each slot, `[batch or 1, slots]`."""
        slots = torch.arange(self.slots, device=self.keys.device)
        return slots[None] if self.starts is None else self.starts[:, None] + slots

    def covering(self, tokens: int) -> tuple[Tensor, Tensor]:
        """For positions `0:tokens`: the slot of each, long `[batch, tokens]`, and whether it has one (bool)."""
        batch = self.keys.shape[0]
        slot = torch.arange(tokens, device=self.keys.device) - (0 if self.starts is None else self.starts[:, None])
        covered = ((slot >= 0) & (slot < self.slots)).expand(batch, tokens)
        return slot.clamp(0, max(self.slots - 1, 0)).expand(batch, tokens), covered

    def overlay(self, held: Tensor, copy: Tensor) -> Tensor:
        """`held` `KV` (positions `0:tokens`) with the sink positions taken from
        `copy` (`self.keys` or `self.values`)."""
        if not self.slots:
            return held
        slot, covered = self.covering(held.shape[-2])
        laid = copy.to(held.dtype).gather(2, slot[:, None, :, None].expand(*held.shape))
        return torch.where(covered[:, None, :, None], laid, held)

    def chunk_starts(self, first: int, chunks: int, size: int) -> Tensor:
        """Each row's sequence position of the first token of `chunks` chunks of `size` tokens from cache index
        `first` (a row's real tokens start at 0), long `[(chunks batch)]`, chunk-major."""
        batch = self.keys.shape[0]
        offset = torch.zeros(batch, dtype=torch.long, device=self.keys.device) if self.starts is None else self.starts
        grid = first + size * torch.arange(chunks, device=offset.device)[:, None] - offset
        return rearrange(grid, "n b -> (n b)")

    def excluded(self, first: int, chunks: int, size: int) -> Tensor | None:
        """Which tokens of `chunks` chunks from cache index `first` the copy holds, bool `[(chunks batch), 1, size,
        1]`, or None when none are."""
        if first >= self.until:
            return None
        batch = self.keys.shape[0]
        offset = torch.zeros(batch, dtype=torch.long, device=self.keys.device) if self.starts is None else self.starts
        position = first + torch.arange(chunks * size, device=offset.device) - offset[:, None]  # [batch, tokens]
        return rearrange((position >= 0) & (position < self.size), "b (n c) -> (n b) 1 c 1", c=size)

    def select(self, index: Tensor) -> SinkCopy:
        """Keep batch entries `index`."""
        starts = None if self.starts is None else self.starts.index_select(0, index)
        return dataclasses.replace(
            self, keys=self.keys.index_select(0, index), values=self.values.index_select(0, index), starts=starts
        )

    def cropped(self, kept: int) -> SinkCopy:
        """The copy once only the first `kept` positions of the cache remain."""
        slots = max(min(kept - (0 if self.starts is None else int(self.starts.min())), self.slots), 0)
        return dataclasses.replace(self, keys=self.keys[:, :, :slots].clone(), values=self.values[:, :, :slots].clone())

    def components(self) -> dict[str, int]:
        """Bytes held, by component: `sink` (when the recipe keeps sinks), `row_starts` (when rows are padded)."""
        out = {"sink": tensor_nbytes(self.keys) + tensor_nbytes(self.values)} if self.size else {}
        return out if self.starts is None else {**out, "row_starts": tensor_nbytes(self.starts)}

    def tensors(self) -> list[Tensor]:
        """The tensors held (the row starts too)."""
        return [self.keys, self.values] + ([] if self.starts is None else [self.starts])
