"""The compiled CPU kernel: float rows times bit-packed, dequantized rows, without a float copy of the codes
(`cpu_kernels.c`).

Unpacking a block of codes to float in torch writes (and then reads back) four bytes per code, several passes
over memory that cost more than the products themselves; this kernel unpacks eight codes at a time into
registers and multiplies them there. It is plain C (no PyTorch headers), built with the system compiler (`$CC`, a
command split like a shell would, e.g. `CC="gcc -O0"`; else `cc`, `gcc` or `clang`) the first time a process needs
it and kept under `gearkit.paths.cache_dir()/kernels`, named by a hash of everything the build depends on (source,
compiler, flags, this CPU's features), so a cached library is never stale and a changed source or machine gets its
own build. Where that directory cannot be written, each process builds the library in a private temporary folder
and removes the folder once the library is loaded (nothing is left behind; it warns once). `unavailable()` says why
the kernel cannot run (no compiler, a failed build, a big-endian host, `GEARKIT_CPU_KERNEL` set to `0`, `false`,
`no` or `off`); callers then use torch (`reference.unpack_float` and matmuls), the reference the tests hold it to.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from gearkit.paths import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = (("-O3", "-march=native", "-fopenmp-simd"), ("-O3",))  # tuned for this CPU; plain if the compiler refuses
SWITCH = {**dict.fromkeys(("0", "false", "no", "off"), False), **dict.fromkeys(("", "1", "true", "yes", "on"), True)}


def _cpu_features() -> str:
    """This CPU's model and feature flags (what `-march=native` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> list[str] | str:
    """The C compiler command (`$CC` split like a shell would, else `cc`, `gcc` or `clang`), or why there is none."""
    try:
        command = shlex.split(os.environ.get("CC", ""))
    except ValueError as e:
        return f"cannot read CC={os.environ['CC']!r} as a command ({e})"
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return command or ([found] if found else "no C compiler found (install gcc or set CC)")


def _build(compiler: list[str], target: Path) -> str | None:
    """Compile the source into `target` (atomically); returns why the compiler failed, or None.

    Raises:
        OSError: when `target`'s directory cannot be created or written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for flags in FLAGS:
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        build = subprocess.run(
            [*compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(partial)], capture_output=True, text=True
        )
        if build.returncode == 0 and partial.stat().st_size:  # a compiler that wrote nothing did not build it
            os.replace(partial, target)  # another process building the same library writes the same bytes
            return None
        partial.unlink(missing_ok=True)
    return (build.stderr.strip() or f"it exited with status {build.returncode} and wrote no library")[-500:]


def _load(compiler: list[str], target: Path) -> ctypes.CDLL | str:
    """Build `target` unless it exists, and load it; or why that failed."""
    error = None if target.exists() else _build(compiler, target)
    if error:
        return f"{shlex.join(compiler)} could not build {SOURCE.name}: {error}"
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        return f"cannot load {target} ({e})"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The built library, or why there is none."""
    if sys.byteorder != "little":
        return "the packed-code kernel reads blocks as little-endian words"
    compiler = _compiler()
    if isinstance(compiler, str):
        return compiler
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        return f"cannot run the C compiler {shlex.join(compiler)!r} ({e})"
    key = "\0".join([SOURCE.read_text(), shlex.join(compiler), version, repr(FLAGS), _cpu_features()])
    target = cache_dir() / "kernels" / f"cpu_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        library = _load(compiler, target)
    except OSError as e:  # the cache directory cannot be written
        warnings.warn(
            f"gearkit cannot keep its compiled CPU kernel in {target.parent} ({e}); it is built in a temporary "
            "folder, removed once loaded, in every process (set GEARKIT_CACHE_DIR to a writable directory)",
            RuntimeWarning,
            stacklevel=4,
        )
        # a loaded library stays mapped after its file is removed, so nothing is left behind
        with tempfile.TemporaryDirectory(prefix="gearkit-kernel-", ignore_cleanup_errors=True) as folder:
            library = _load(compiler, Path(folder) / target.name)
    if isinstance(library, str):
        return library
    library.gearkit_dequant_matmul.restype = ctypes.c_int
    library.gearkit_dequant_matmul.argtypes = (
        [ctypes.c_void_p] * 4
        + [ctypes.c_int, ctypes.c_void_p]
        + [ctypes.c_int64] * 6
        + [ctypes.c_int] * 2
        + [ctypes.c_void_p]
    )
    return library


def unavailable() -> str | None:
    """Why the compiled kernel cannot run in this process, or None if it can (builds it on first call; a failed
    build warns once). `GEARKIT_CPU_KERNEL` set to `0`, `false`, `no` or `off` (any case) turns it off (decode then
    runs the same products in torch); unset, empty, `1`, `true`, `yes` or `on` leaves it on.

    Raises:
        ValueError: for another value of `GEARKIT_CPU_KERNEL`.
    """
    setting = os.environ.get("GEARKIT_CPU_KERNEL", "")
    on = SWITCH.get(setting.strip().lower())
    if on is None:
        raise ValueError(
            f"GEARKIT_CPU_KERNEL={setting!r} is not a switch: set 0, false, no or off to turn the compiled CPU "
            "kernel off, or 1, true, yes or on (or nothing) to leave it on"
        )
    if not on:
        return f"turned off by GEARKIT_CPU_KERNEL={setting}"
    library = _library()
    if isinstance(library, str):
        _warn_once(library)
        return library
    return None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"gearkit's compiled CPU kernel is unavailable ({reason}); decode reads packed codes through "
        "torch instead (same results, slower)",
        RuntimeWarning,
        stacklevel=3,
    )


def dequant_matmul(
    a: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bits: int,
    n: int,
    transposed: bool = False,
    levels: Tensor | None = None,
) -> Tensor:
    """`a @ W` (or `a @ W^T`) where each row `r` of `W[g]` `[k, n]` is held as packed codes `C[g, r]`
    (`reference.pack_bits` of `n` codes) in `ng` groups of `n / ng` codes (a multiple of 8), each with its own
    scale and zero: `W[g, r, j] = scale[g, r, q] * C[g, r, j] + zero[g, r, q]` for `j` in group `q` (with
    `levels`, `C` is the level the code indexes: a codebook). Group `g` of the codes reads `a[g % a_groups]` (a
    query shared by several chunks).

    Args:
        a: float `[a_groups, m, k]` (`[a_groups, m, n]` if `transposed`), on the CPU; `a_groups` divides `groups`.
        codes: uint8 `[groups, k * n * bits / 8]`.
        scale: float16 or float32 `[groups, k, ng]` (any shape with that many elements per group).
        zero: like `scale`, same dtype, or None for zeros.
        bits: code width (1, 2, 3, 4 or 8).
        n: codes per row.
        transposed: multiply by `W^T` instead of `W`.
        levels: float `[2**bits]`, the codebook the codes index, or None for uniform codes.

    Returns:
        float32 `[groups, m, n]` (`[groups, m, k]` if `transposed`).

    Raises:
        RuntimeError: if the kernel is unavailable (see `unavailable`).
        ValueError: for shapes or dtypes that do not match.
    """
    reason = unavailable()
    if reason:
        raise RuntimeError(f"gearkit's compiled CPU kernel is unavailable: {reason}")
    a_groups, m = a.shape[:2]
    groups = codes.shape[0]
    row_bytes = n // 8 * bits
    k = codes.shape[1] // row_bytes if row_bytes and codes.dim() == 2 else 0
    if (
        a.dim() != 3
        or n % 8
        or not k
        or codes.shape[1] != k * row_bytes
        or groups % a_groups
        or a.shape[2] != (n if transposed else k)
    ):
        raise ValueError(
            f"codes {tuple(codes.shape)} are not rows of {n} {bits}-bit codes matching a {tuple(a.shape)} "
            f"(transposed={transposed})"
        )
    if scale.dtype not in (torch.float16, torch.float32) or (zero is not None and zero.dtype != scale.dtype):
        raise ValueError(
            f"scale and zero must both be float16 or float32, got {scale.dtype} and "
            f"{None if zero is None else zero.dtype}"
        )
    ng = scale.numel() // (groups * k)
    if (
        not ng
        or scale.numel() != groups * k * ng
        or (zero is not None and zero.numel() != scale.numel())
        or n % ng
        or n // ng % 8
    ):
        raise ValueError(
            f"scale and zero {tuple(scale.shape)} do not split {groups} x {k} rows of {n} codes into "
            "groups of a multiple of 8"
        )
    if levels is not None and levels.numel() != 2**bits:
        raise ValueError(f"a {bits}-bit codebook has {2**bits} levels, got {levels.numel()}")
    a, codes, scale = a.float().contiguous(), codes.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    levels = None if levels is None else levels.float().contiguous()
    out = a.new_empty(groups, m, k if transposed else n)
    if _library().gearkit_dequant_matmul(
        a.data_ptr(),
        codes.data_ptr(),
        scale.data_ptr(),
        None if zero is None else zero.data_ptr(),
        scale.dtype == torch.float16,
        out.data_ptr(),
        a_groups,
        groups,
        m,
        k,
        n,
        ng,
        transposed,
        bits,
        None if levels is None else levels.data_ptr(),
    ):
        raise ValueError(f"unsupported code width {bits}")
    return out


def usable(device: torch.device, group: int) -> bool:
    """Whether `dequant_matmul` can read rows quantized in groups of `group` codes on `device` (builds the kernel on
    first call)."""
    return device.type == "cpu" and group % 8 == 0 and unavailable() is None
