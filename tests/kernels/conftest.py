"""The kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` kernel is defined (Triton decides at decoration time
whether a kernel is interpreted), so it is set here, at the top of the directory's conftest, which pytest (and
every pytest-xdist worker) imports before collecting the test module that imports ``normlab.kernels``. Without
triton the test module skips itself (``pytest.importorskip``), with the reason in the report.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
