"""Models and texts: loading the models gearkit runs (the embedded default, and more), what a model family needs
read from its config, and the built-in texts with the text utilities every evaluation shares.
"""

from gearkit.models.family import head_dim, model_identity
from gearkit.models.loading import (
    DEFAULT_MODEL,
    DTYPES,
    INSTALL_HINT,
    LoadedModel,
    ModelSource,
    check_causal_lm,
    gguf_path,
    load_default_model,
    load_default_tokenizer,
    load_model,
    load_tokenizer,
    model_dtype,
    resolve_model,
)
from gearkit.models.texts import (
    DEFAULT_TEXT,
    TEXTS,
    chat_ids,
    first_tokens,
    load_text,
    pad_token_id,
    token_windows,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TEXT",
    "DTYPES",
    "INSTALL_HINT",
    "LoadedModel",
    "ModelSource",
    "TEXTS",
    "chat_ids",
    "check_causal_lm",
    "first_tokens",
    "gguf_path",
    "head_dim",
    "load_default_model",
    "load_default_tokenizer",
    "load_model",
    "load_text",
    "load_tokenizer",
    "model_dtype",
    "model_identity",
    "pad_token_id",
    "resolve_model",
    "token_windows",
]
