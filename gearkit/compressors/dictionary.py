"""Old import path (one release): see `solvers`, `rope`, `dictionary_set` and `sparse_dictionary`."""

from gearkit.compressors.dictionary_set import FORMAT_VERSION, DictionarySet, model_signature  # noqa: F401
from gearkit.compressors.rope import RoPE as Rotary  # noqa: F401
from gearkit.compressors.solvers import SOLVERS, matching_pursuit, orthogonal_matching_pursuit  # noqa: F401
from gearkit.compressors.sparse_dictionary import SparseDictionary  # noqa: F401
