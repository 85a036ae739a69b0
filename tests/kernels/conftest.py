"""The kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined (Triton decides at decoration time
whether a kernel is interpreted), so it is set here, at the top of the directory's conftest, which pytest (and
every pytest-xdist worker) imports before collecting the test module that imports ``normlab.kernels``. Without
triton the test module skips itself (``pytest.importorskip``), with the reason in the report.

Interpreter fix for Triton <= 3.6 with NumPy >= 2.4: the interpreter holds a scalar kernel argument as a NumPy
array of shape ``(1,)`` and turns it into a Python int (``range(BPP)`` in a kernel) with ``int(array)``, which
NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"). Later Triton versions
convert ``int(array.squeeze())``; :func:`_patch_interpreter_index` installs that conversion when NumPy refuses
the old one. It touches only the interpreter (tests), never the compiled kernels.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"


def _numpy_refuses_int_of_1d() -> bool:
    import numpy as np

    try:
        int(np.array([1]))
    except TypeError:
        return True
    return False


def _patch_interpreter_index() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the test module skips itself
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_normlab_index_fix", False) or not _numpy_refuses_int_of_1d():
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._normlab_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_patch_interpreter_index()
