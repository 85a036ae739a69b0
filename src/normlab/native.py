"""normlab's native CPU norm: one C++ call per direction, its autograd node in C++ (``csrc/norm.cpp``).

Below some 10^5 values a norm's arithmetic costs less than the Python around it (the module, a Python
``autograd.Function``, the engine calling back into Python, a dozen small tensor ops): torch.nn's BatchNorm1d step on
a (60, 100) batch is ~70 µs, of which the kernels are ~10. Here the forward (statistics, apply, fused activation, the
guarded running update) and the backward are each one C++ function, and autograd's node is C++, so a step costs what
torch.nn's does; the loops vectorize (AVX-512 where the machine has it) and split into chunks that depend on the shape
only, so results are the same bits on any number of threads. The math is :mod:`normlab.torch_ops`' (the spec's
``(N, G, K, R)`` view; sums in the input's own lanes of values shifted near their mean, summed again centred
where the shift was off, merged as (count, mean, M2) in float64, so a large mean or an outlier keeps its digits;
``mean`` and ``rstd`` stay float64 inside the node, so the apply and the backward subtract the
mean unrounded). An activation placed before the norm (``placement="after"``) is one elementwise pass of its own.

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load` (a C++17 compiler and ninja;
about 100 s on 2 cores, once: it is cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, in a
directory named after the source, flags and torch version). Where it cannot be built, :func:`available` is False,
says why once (a warning), and the other CPU paths run. Double backward recomputes the forward from ATen's
differentiable ops (exact, slower). ``torch.compile`` and export take normlab's custom ops instead
(:mod:`normlab.functional`); ``torch.func`` transforms (vmap, grad) and forward-mode AD are refused with an error,
as torch refuses them for a C++ ``autograd.Function``. The node is written as ATen's generated ones are (a ``Node``
with its saved variables as members), not as a C++ ``autograd.Function``, whose context costs about 4 µs more per
step on a (60, 100) batch; under compiled autograd it is one opaque call, as such a Function is.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from normlab.spec import ACTIVATIONS, Call, Running
from normlab.torch_ops import is_channels_last

_SOURCE = Path(__file__).parent / "csrc" / "norm.cpp"
# -march=native: the build runs on the machine that loads it (the cache directory is per machine and per torch);
# -fopenmp: at::parallel_for's threads, in torch's own OpenMP runtime (torch ships libgomp.so.1, which the loader
# reuses for the extension); -fno-trapping-math: without it GCC keeps a branch for relu's max before a float32
# conversion (which might trap) and the loop stays scalar (measured 6x slower); nothing here reads FP exception flags.
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math")
_LDFLAGS = ("-fopenmp",)


def _flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Compiler and linker flags. With glibc's vector math library (x86-64 Linux), the transcendental activations
    (sigmoid, tanh, silu, gelu) vectorize too: its math.h declares the vector variants of exp, tanh and erf when
    __FAST_MATH__ is defined (which here changes nothing but those declarations and math_errhandling: the code is
    not compiled with -ffast-math, whose reassociation would lose the shifted sums' digits)."""
    import ctypes.util
    import platform

    if platform.system() == "Linux" and platform.machine() == "x86_64" and ctypes.util.find_library("mvec"):
        return _CFLAGS + ("-D__FAST_MATH__", "-fno-math-errno"), _LDFLAGS + ("-lmvec",)
    return _CFLAGS, _LDFLAGS


ACT_CODES = {None: 0, **{name: i + 1 for i, name in enumerate(("relu", "leaky_relu", "sigmoid", "tanh", "silu",
                                                                "gelu"))}}
assert set(ACT_CODES) - {None} == set(ACTIVATIONS)

_log = logging.getLogger(__name__)
_STALE_LOCK_S = 900  # a build takes about 100 s on 2 cores


def _build_directory(source: bytes) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    key = hashlib.sha256(source + repr((_flags(), torch.__version__)).encode()).hexdigest()[:16]
    return Path(root) / f"normlab_native_{key}"


def _ninja_on_path() -> None:
    """Put the ninja of the ``ninja`` package (a dependency) on PATH for the build, when no other is there: torch
    calls ``ninja`` by name, and a virtual environment's bin is not on PATH unless activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _extension():
    """The compiled module, or None (with one warning saying why) where it cannot be built."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    source = _SOURCE.read_bytes()
    directory = _build_directory(source)
    directory.mkdir(parents=True, exist_ok=True)
    built = directory / "normlab_native.so"
    if built.exists():  # a finished build of this very source: loaded directly, without torch's build lock
        try:
            spec = importlib.util.spec_from_file_location("normlab_native", built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except (ImportError, OSError):  # a partial file from an interrupted link: built again below
            pass
    lock = directory / "lock"  # torch's build lock: a build killed outright leaves it, and every later load waits
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        warnings.warn(f"normlab: removing a stale build lock {lock} (older than {_STALE_LOCK_S} s)", RuntimeWarning,
                      stacklevel=3)
        lock.unlink(missing_ok=True)
    if not any(directory.glob("normlab_native*.so")):
        _log.warning("normlab: compiling the native CPU kernels once (about 100 s on 2 cores; cached in %s)", directory)
    try:
        cflags, ldflags = _flags()
        return cpp_extension.load(name="normlab_native", sources=[str(_SOURCE)], extra_cflags=list(cflags),
                                  extra_ldflags=list(ldflags), build_directory=str(directory))
    except Exception as e:  # no compiler, no ninja, a failed build: the other CPU paths run
        warnings.warn(f"normlab: the native CPU kernels could not be built ({type(e).__name__}: {e}); "
                      "normlab runs its other CPU paths", RuntimeWarning, stacklevel=3)
        return None


def available() -> bool:
    """Whether the native kernels are compiled and loaded (compiling them on the first call)."""
    return _extension() is not None


_DTYPES = (torch.float32, torch.float64)


def supports(x: torch.Tensor, call: Call, w=None, b=None, stats=None, running: Running | None = None) -> bool:
    """Whether this path normalizes ``x``: a dense, non-empty float32/float64 CPU tensor whose weight, bias and given
    statistics (if any) have its dtype and whose running buffers are contiguous float32/float64 tensors of one dtype;
    running buffers only for per-channel statistics (batch and instance norm). Read on every call, so only the tests
    that decide between paths: the C++ side makes weight, bias and given statistics contiguous and checks that every
    tensor is on the CPU (an error, as torch's for tensors on two devices)."""
    dtype = x.dtype
    if (dtype is not torch.float32 and dtype is not torch.float64) or not x.is_cpu or x.layout is not torch.strided \
            or not call.plan.numel:
        return False
    if (w is not None and w.dtype is not dtype) or (b is not None and b.dtype is not dtype):
        return False
    if stats is not None and (stats[0].dtype is not dtype or stats[1].dtype is not dtype):
        return False
    if running is None:
        return True
    rm, rv = running.mean, running.var
    return (call.plan.K == 1 and rm.dtype in _DTYPES and rv.dtype is rm.dtype and rm.is_contiguous()
            and rv.is_contiguous())


def norm(x: torch.Tensor, w, b, call: Call, stats=None, running: Running | None = None) -> torch.Tensor:
    """The norm of ``x`` (shape ``call.plan.shape``) with the input's own statistics (folded into ``running`` when
    given) or with given ``stats = (mean, var)`` ``(C,)``; differentiable (a C++ autograd node). Output: x's shape,
    dtype and memory format (layer norm: contiguous)."""
    p = call.plan
    channels_last = x.dim() > 3 and p.kind != "layer" and is_channels_last(x)
    if not (channels_last or x.is_contiguous()):
        x = x.contiguous()
    mean, var = stats if stats is not None else (None, None)
    rm = rv = nbt = skipped = None
    momentum = -1.0
    if running is not None:
        rm, rv, nbt, skipped = running.mean, running.var, running.num_batches_tracked, running.num_skipped
        momentum = -1.0 if running.momentum is None else float(running.momentum)
    ext = _extension()
    if ext is None:
        raise RuntimeError("NORMLAB_BACKEND=native, but the native CPU kernels could not be built (see the warning)")
    return ext.norm(x, w, b, mean, var, rm, rv, nbt, skipped, p.view_shape, p.pool_batch, channels_last,
                             call.eps, momentum, ACT_CODES[call.activation], call.negative_slope,
                             call.placement == "after")

