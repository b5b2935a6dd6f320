"""Old import path: see `solvers`, `rope`, `dictionary_set` and `sparse_dictionary` in `gearkit.compressors`."""

from gearkit.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        **{
            n: f"gearkit.compressors.dictionary_set:{n}" for n in ("FORMAT_VERSION", "DictionarySet", "model_signature")
        },
        **{
            n: f"gearkit.compressors.solvers:{n}"
            for n in ("SOLVERS", "matching_pursuit", "orthogonal_matching_pursuit")
        },
        "Rotary": "gearkit.compressors.rope:RoPE",
        "SparseDictionary": "gearkit.compressors.sparse_dictionary:SparseDictionary",
    },
)
