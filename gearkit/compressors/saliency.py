"""Old import path (one release): see `gearkit.compressors.probes` and `gearkit.compressors.mixed`."""

from gearkit.compressors.mixed import MixedPrecision, salient_count, salient_mask  # noqa: F401
from gearkit.compressors.probes import Probes, normalized_saliency, probe_attention, visible_keys  # noqa: F401
