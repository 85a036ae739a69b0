"""A training step on the Triton kernels is at most 4 launches and no other device op; the "last program merges"
tickets behind that count give results that do not depend on the order in which programs finish.

Launches are counted by wrapping the interpreter's launch (``InterpretedFunction.run``: under
``TRITON_INTERPRET=1`` Triton 3.9 calls neither ``JITFunction.run`` nor its launch-enter hook); every other aten
op is recorded by a ``TorchDispatchMode``, except those the interpreter itself runs inside a launch to emulate the
device (copying arguments to and from its host buffers), which stand for the kernel and are not recorded.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install normlab[gpu])")

from triton.runtime import interpreter  # noqa: E402

import normlab.nn as nl  # noqa: E402
from normlab import kernels, spec, torch_ops  # noqa: E402
from normlab.kernels import launch  # noqa: E402
from normlab.spec import plan  # noqa: E402
from tests.kernels.test_kernels import TINY, _call, _make  # noqa: E402

# The ops a step may run besides the launches: allocating outputs and scratch (never initialized: each kernel writes
# what it reads), and views and metadata (no data touched). Anything else (a copy, a fill, arithmetic, a reduction)
# would be a device op of its own.
ALLOCATIONS = {"empty.memory_format", "empty_strided.default", "empty_like.default", "new_empty.default",
               "new_empty_strided.default"}  # fmt: skip


def _allowed(op) -> bool:
    """An allocation, or a view (its schema says the output aliases the input: reshape/view, expand, detach)."""
    return op.__name__ in ALLOCATIONS or op.is_view


class _Recorder(TorchDispatchMode):
    """Records the Triton launches (kernel names) and every aten op outside them."""

    def __init__(self):
        super().__init__()
        self.launches, self.ops, self.inside, self.active = [], [], 0, False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def others(self) -> list[str]:
        return [op.__name__ for op in self.ops if not _allowed(op)]


@pytest.fixture
def recorder(monkeypatch):
    """A :class:`_Recorder` whose launches are counted while it is entered."""
    rec = _Recorder()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if not rec.active:
            return run(self, *args, **kwargs)
        rec.launches.append(self.fn.__name__)
        rec.inside += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            rec.inside -= 1

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    return rec


# (name, layer, input shape, channels_last): BN+ReLU in every layout, and one case per other kind and path.
STEPS = {
    "batch-NCHW": (lambda: nl.BatchNorm2d(5, activation="relu"), (3, 5, 7, 2), False),
    "batch-NHWC": (lambda: nl.BatchNorm2d(5, activation="relu"), (3, 5, 7, 2), True),
    "batch-NC": (lambda: nl.BatchNorm1d(5, activation="relu"), (13, 5), False),
    "batch-cumulative": (lambda: nl.BatchNorm2d(5, momentum=None, activation="relu"), (3, 5, 7, 2), True),
    "instance": (lambda: nl.InstanceNorm2d(5, affine=True, track_running_stats=True, activation="relu"),
                 (3, 5, 7, 2), False),  # fmt: skip
    "group": (lambda: nl.GroupNorm(3, 6, activation="relu"), (3, 6, 5, 7), False),
    "group-NHWC": (lambda: nl.GroupNorm(3, 6, activation="relu"), (3, 6, 5, 7), True),
    "layer": (lambda: nl.LayerNorm((5, 7), activation="relu"), (3, 5, 7), False),
}


def _inputs(shape, cl, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    if cl:  # dy as the next layer gives it: in x's memory format
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x.requires_grad_(), dy


def _train_step(layer, x, dy):
    y = layer(x)
    y.backward(dy)
    return y


@pytest.mark.parametrize("name", list(STEPS))
def test_training_step_is_four_launches_and_no_other_op(monkeypatch, recorder, name):
    """One training step (forward with the running buffers, backward) through normlab.nn on the kernels: at most
    4 launches and no device op but allocations and views. The same step on the torch backend gives the same
    output, gradients and running buffers (the counted step is the real one)."""
    make, shape, cl = STEPS[name]
    monkeypatch.setattr(launch, "TUNING", TINY)  # several programs per merge unit
    x, dy = _inputs(shape, cl)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NORMLAB_BACKEND", backend)
        torch.manual_seed(0)
        layer = make()
        with torch.no_grad():  # weight and bias other than 1 and 0
            for t in layer.parameters():
                t.copy_(torch.rand_like(t) + 0.5)
        # normlab.nn reads num_skipped_updates after a step on a CPU input to warn (never for CUDA inputs); the
        # kernels run on CPU tensors here, so that read is turned off, as it is on a GPU
        layer._warned_skipped = True
        _train_step(layer, x, dy)  # first step: the ticket counters are allocated (zeroed) once per device
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if backend == "triton":
            with recorder:
                y = _train_step(layer, x, dy)
        else:
            y = _train_step(layer, x, dy)
        results[backend] = (y, x.grad, *(p.grad for p in layer.parameters()), *layer.buffers())
        x.grad = None
    assert len(recorder.launches) <= 4, recorder.launches
    assert recorder.others() == [], recorder.others()
    for a, c in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "make,shape,cl,dtype",
    [
        (lambda: nl.BatchNorm2d(5, activation="relu"), (3, 5, 7, 2), False, torch.float32),
        (lambda: nl.BatchNorm2d(5, activation="relu"), (3, 5, 7, 2), True, torch.float32),
        (lambda: nl.BatchNorm2d(5, activation="silu").bfloat16(), (3, 5, 7, 2), True, torch.bfloat16),
        (lambda: nl.InstanceNorm2d(5, track_running_stats=True, activation="relu"), (3, 5, 7, 2), False,
         torch.float32),  # fmt: skip
    ],
    ids=["NCHW", "NHWC", "bf16-buffers", "instance"],
)
def test_eval_forward_is_one_launch(monkeypatch, recorder, make, shape, cl, dtype):
    """Eval forward with the running statistics: one launch and nothing else, whatever the buffers' dtype and for
    per-channel statistics shared by every sample (instance norm); equal to the torch backend's output."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    layer = make()
    layer.running_mean.copy_(torch.randn(5))
    layer.running_var.copy_(torch.rand(5) + 0.5)
    layer.eval()
    x = torch.randn(shape, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    expected = layer(x)
    monkeypatch.setenv("NORMLAB_BACKEND", "triton")
    with recorder:
        y = layer(x)
    assert recorder.launches == ["_apply_kernel"]
    assert recorder.others() == [], recorder.others()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)


@contextlib.contextmanager
def _program_order(monkeypatch, order):
    """Run every launch's programs in another order: ``order(n)`` permutes the ``n`` program ids along each grid
    dimension (the interpreter runs them one after another, so the last one to run takes the last ticket)."""
    builder = interpreter.interpreter_builder
    real = builder.set_grid_idx
    moved = []  # per program run: whether another program ran in its place

    def set_grid_idx(x, y, z):
        nx, ny, _ = builder.grid_dim
        px, py = order(nx)[x], order(ny)[y]
        moved.append((px, py) != (x, y))
        real(px, py, z)

    with monkeypatch.context() as m:
        m.setattr(builder, "set_grid_idx", set_grid_idx)
        yield moved


def _reversed(n):
    return list(range(n))[::-1]


def _shuffled(n):
    return list(np.random.default_rng(n).permutation(n))


# (kind, shape, groups, channels_last): per-channel statistics (one grid column per merge unit; batch norm pooled
# over N, folded or not, and instance norm per sample), and groups spanning columns (group norm, K = 3 > BLOCK_C).
MERGE_CASES = [
    ("batch", (5, 3, 7, 3), None, False),
    ("batch", (5, 3, 7, 3), None, True),
    ("instance", (3, 5, 40), None, False),
    ("group", (3, 6, 13), 2, False),
]


def _running(p):
    """Running buffers for kinds that keep them (else None)."""
    if p.kind not in ("batch", "instance"):
        return None
    return spec.Running(torch.randn(p.G) * 0.1, torch.rand(p.G) + 0.5, 0.1, torch.zeros((), dtype=torch.long),
                        torch.zeros((), dtype=torch.long))  # fmt: skip


def _full_step(p, x, w, b, dy, running):
    call = _call(p, 1e-5, "silu")
    y, mean, rstd, var = kernels.forward(x, w, b, call, None, running)
    dx, dw, db = kernels.backward(dy, x, w, b, mean, rstd, call)
    counters = launch._COUNTERS[x.device][-1]
    assert torch.count_nonzero(counters) == 0, "a ticket counter was left non-zero"
    return (y, mean, rstd, var, dx, dw, db, *(t for t in running or () if isinstance(t, torch.Tensor)))


@pytest.mark.parametrize("tiles", [2, 3, 7])
@pytest.mark.parametrize("kind,shape,groups,cl", MERGE_CASES)
def test_merge_is_independent_of_program_order(monkeypatch, kind, shape, groups, cl, tiles):
    """With several programs per merge unit (``Tuning(programs=...)`` asking for about ``tiles`` tiles per output
    row and grid column), running the programs in natural, reversed or shuffled order (another program takes the
    last ticket and merges) gives bit-identical outputs, statistics, gradients and running buffers; the counters
    are back at 0 after every launch."""
    p = plan(kind, shape, groups=groups)
    programs = tiles * (1 if p.pool_batch else p.N) * -(-shape[1] // 2)  # output rows x grid columns
    monkeypatch.setattr(launch, "TUNING", launch.Tuning(block_c=2, block_r=8, programs=programs, merge_block=2))
    x, w, b, dy = _make(shape, cl, torch.float32, p)
    lp = launch.plan_of(x, p.G, p.K, p.pool_batch, cl)
    assert (lp.T if p.K == 1 else lp.T * lp.grid_c) > 1, "the case must have several programs per merge unit"
    torch.manual_seed(1)
    runs = {"natural": _full_step(p, x, w, b, dy, _running(p))}
    for name, order in (("reversed", _reversed), ("shuffled", _shuffled)):
        with _program_order(monkeypatch, order) as moved:
            torch.manual_seed(1)
            runs[name] = _full_step(p, x, w, b, dy, _running(p))
        assert any(moved)
    for name in ("reversed", "shuffled"):
        for a, c in zip(runs[name], runs["natural"]):
            assert torch.equal(a, c), name


@pytest.mark.parametrize("kind,shape,cl", [("batch", (4, 3, 5, 2), True), ("batch", (9, 3), False),
                                           ("instance", (3, 5, 7), False)])  # fmt: skip
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("buffers", [torch.float32, torch.bfloat16])
def test_running_update_matches_torch_path(monkeypatch, kind, shape, cl, momentum, buffers):
    """The in-kernel update (the last program of the statistics launch) folds the statistics as
    ``torch_ops.update_running_stats`` does: momentum (both forms of lerp), ``momentum=None`` (cumulative average
    over ``num_batches_tracked``), per-sample statistics averaged over the batch, half-precision buffers; over
    three steps, the third with a non-finite batch (buffers untouched, ``num_skipped`` + 1)."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    p = plan(kind, shape)
    call = _call(p, 1e-5, "relu")
    C = shape[1]

    def buffers_():
        return spec.Running(torch.randn(C).to(buffers), (torch.rand(C) + 0.5).to(buffers), momentum,
                            torch.full((), 3, dtype=torch.long), torch.zeros((), dtype=torch.long))  # fmt: skip

    torch.manual_seed(0)
    ours = buffers_()
    expected = spec.Running(*(t.clone() if isinstance(t, torch.Tensor) else t for t in ours))
    # Under the interpreter a cast of float32 to bfloat16 truncates (the compiled kernel rounds to nearest): the
    # batch's statistics and the result are each cast once, so a bfloat16 buffer may be off by up to two units in
    # the last place of the larger operand. Each step starts both sides from the same buffers.
    for step in range(3):
        x = _make(shape, cl, torch.float32, p, scale=1 + step, offset=step)[0]
        if step == 2:
            x[(1,) * x.dim()] = float("nan")
        _, mean, _, var = kernels.forward(x, None, None, call, None, ours)
        old = (expected.mean.float(), expected.var.float())
        torch_ops.update_running_stats(expected, mean, var, p.m)
        batch = (mean.mean(0), var.mean(0) * p.m / (p.m - 1))
        for a, c, o, n in zip(ours[:2], expected[:2], old, batch):
            assert a.dtype == c.dtype
            if buffers == torch.float32:
                torch.testing.assert_close(a, c, atol=0, rtol=1e-6)
            else:
                bound = 2 * 2**-7 * torch.maximum(o.abs(), n.abs().nan_to_num())
                assert ((a.float() - c.float()).abs() <= bound).all(), (a, c, bound)
            c.copy_(a)
        assert torch.equal(ours.num_batches_tracked, expected.num_batches_tracked)
        assert torch.equal(ours.num_skipped, expected.num_skipped)
        if step == 1:
            before = tuple(t.clone() for t in ours[:2])
    assert (int(ours.num_batches_tracked), int(ours.num_skipped)) == (5, 1)
    assert all(torch.equal(a, c) for a, c in zip(ours[:2], before))  # the NaN batch changed nothing


def test_cumulative_average(monkeypatch):
    """``momentum=None``: after k batches from fresh buffers, the running mean is the plain average of the k batch
    means, and the running variance that of their unbiased variances (``1 / num_batches_tracked`` read from the
    buffer in the kernel)."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    shape = (4, 3, 5, 2)
    p = plan("batch", shape)
    call = _call(p, 1e-5)
    running = spec.Running(torch.zeros(3), torch.ones(3), None, torch.zeros((), dtype=torch.long))
    means, variances = [], []
    for k in range(4):
        x = torch.randn(shape) * (k + 1) + k
        _, mean, _, var = kernels.forward(x, None, None, call, None, running)
        means.append(mean.double().reshape(-1))
        variances.append(var.double().reshape(-1) * p.m / (p.m - 1))
    assert int(running.num_batches_tracked) == 4
    torch.testing.assert_close(running.mean.double(), torch.stack(means).mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(running.var.double(), torch.stack(variances).mean(0), atol=1e-6, rtol=1e-6)


def test_cumulative_average_needs_num_batches_tracked():
    p = plan("batch", (4, 3, 5))
    running = spec.Running(torch.zeros(3), torch.ones(3), None)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        kernels.forward(torch.randn(p.shape), None, None, _call(p, 1e-5), None, running)


@pytest.mark.parametrize("kind,shape,groups", [("group", (3, 6, 5), 2), ("layer", (3, 4, 5), None)])
def test_running_buffers_of_other_plans(monkeypatch, kind, shape, groups):
    """Plans whose statistics are not per channel (no norm of normlab gives them running buffers) still honour
    the contract when called with some: the torch ops' update, as the torch path does."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    p = plan(kind, shape, groups=groups, normalized_ndim=1 if kind == "layer" else None)
    x = torch.randn(shape)

    def buffers():
        n = p.G if kind == "group" else 1
        return spec.Running(torch.zeros(n), torch.ones(n), 0.1, torch.zeros((), dtype=torch.long))

    ours, expected = buffers(), buffers()
    _, mean, _, var = kernels.forward(x, None, None, _call(p, 1e-5), None, ours)
    torch_ops.update_running_stats(expected, mean, var, p.m)
    assert int(ours.num_batches_tracked) == 1
    for a, c in zip(ours[:2], expected[:2]):
        assert torch.equal(a, c)
