"""Old import path: the stored parts live in `gearkit.parts`, the byte accounting in `gearkit.accounting`."""

from gearkit.deprecation import moved

_ACCOUNTING = ("MemoryReport", "add_counts", "bits_per_element", "fp16_ratio", "tensor_nbytes")
_PARTS = (
    "Part",
    "CompressedTensor",
    "QuantizedPart",
    "ChannelScaledPart",
    "OutlierPart",
    "LowRankPart",
    "MixedPart",
    "DictionaryPart",
    "DensePart",
    "PositionedPart",
    "LayerPart",
    "HeadsPart",
    "cat_batch",
    "select_batch",
    "slice_batch",
)
__getattr__ = moved(
    __name__,
    {
        **{n: f"gearkit.accounting:{n}" for n in _ACCOUNTING},
        **{n: f"gearkit.parts:{n}" for n in _PARTS},
        "CodebookPart": "gearkit.parts:QuantizedPart",
    },
)
