"""Old import path: see `gearkit.compressors.probes` and `gearkit.compressors.mixed`."""

from gearkit.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        **{n: f"gearkit.compressors.mixed:{n}" for n in ("MixedPrecision", "salient_count", "salient_mask")},
        **{
            n: f"gearkit.compressors.probes:{n}"
            for n in ("Probes", "normalized_saliency", "probe_attention", "visible_keys")
        },
    },
)
