"""The built-in English texts and the text utilities every evaluation shares (token windows, chat prompts).

Both texts ship with Python itself, so nothing is downloaded.
"""

from __future__ import annotations

import functools
import html.parser
import os
from pathlib import Path

import torch
from torch import Tensor

from gearkit.compressors.checks import check_int


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
