"""The accounting of the bytes a compressed cache holds: one place for the headline numbers.

`MemoryReport` sums a cache's bytes by component; `bits_per_element` and `fp16_ratio` compute the two headline
numbers (all-in bits per element, and the ratio against an fp16 copy of the same elements) from bytes held.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

__all__ = ["MemoryReport"]


def bits_per_element(nbytes: int, elements: int) -> float:
    """All-in stored bits per element (0 when there are no elements)."""
    return 8 * nbytes / elements if elements else 0.0


def fp16_ratio(nbytes: int, elements: int) -> float:
    """Bytes of an fp16 copy of `elements` divided by the `nbytes` held (inf when nothing is held)."""
    return 2 * elements / nbytes if nbytes else float("inf")


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Sum byte counts by component name."""
    out: dict[str, int] = {}
    for c in counts:
        for name, n in c.items():
            out[name] = out.get(name, 0) + n
    return out


def tensor_nbytes(t: Tensor) -> int:
    """Bytes of the elements of `t` (its storage, for the compact tensors parts hold)."""
    return t.numel() * t.element_size()


@dataclasses.dataclass
class MemoryReport:
    """Bytes a cache holds, by component, against an fp16 cache of the same tokens.

    Attributes:
        components: bytes by component (`codes`, `scales`, `outliers`, `lowrank`, `dense`, `buffer`, `sink`;
            CSR: `atom_indices`, `coefficients`, `positions`, and `dictionary`, the layers' shares of the shared
            dictionaries, counted once per cache: amortised over the tokens the cache holds).
        tokens: logical sequence length.
        elements: key and value elements of those tokens, over all layers, heads and batch entries.
    """

    components: dict[str, int]
    tokens: int
    elements: int

    @property
    def nbytes(self) -> int:
        """All bytes held."""
        return sum(self.components.values())

    @property
    def fp16_nbytes(self) -> int:
        """Bytes of an fp16 cache of the same tokens."""
        return 2 * self.elements

    @property
    def bits_per_element(self) -> float:
        """All-in bits per element (buffer included)."""
        return bits_per_element(self.nbytes, self.elements)

    def component_bits(self) -> dict[str, float]:
        """Each component in bits per element, so they add up to `bits_per_element`."""
        return {name: bits_per_element(n, self.elements) for name, n in self.components.items()}

    def bits_per_element_excluding(self, *components: str) -> float:
        """Bits per element without the named components (e.g. `"dictionary"`: the per-token cost alone)."""
        return bits_per_element(sum(n for name, n in self.components.items() if name not in components), self.elements)

    @property
    def compression_ratio(self) -> float:
        """fp16 bytes over bytes held."""
        return fp16_ratio(self.nbytes, self.elements)

    def __add__(self, other: MemoryReport) -> MemoryReport:
        return MemoryReport(
            add_counts(self.components, other.components),
            max(self.tokens, other.tokens),
            self.elements + other.elements,
        )

    @staticmethod
    def total(reports) -> MemoryReport:
        """The sum of `reports` (an empty report for none)."""
        out = MemoryReport({}, 0, 0)
        for r in reports:
            out = out + r
        return out
