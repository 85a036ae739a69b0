"""Synchronized batch norm and precise_bn across gloo processes on the CPU, and SyncBatchNorm in one process.

The multi-process checks spawn 2 and 3 ranks on uneven shards, one of them empty, and compare every rank's share of
the outputs, input gradients, dγ/dβ after DDP's all-reduce and the running statistics with torch.nn's BatchNorm on
the concatenated batch in float64 (atol = rtol = 1e-10). Process start-up dominates, so each spawned run makes many
checks.
"""

from __future__ import annotations

import copy
import datetime
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normlab
import normlab.nn as nl
from normlab import distributed

ROOT = Path(__file__).resolve().parents[1]
TOL = {"atol": 1e-10, "rtol": 1e-10}
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
TORCH_ACT = {"relu": torch.nn.ReLU(), "silu": torch.nn.SiLU(), "leaky_relu": torch.nn.LeakyReLU(0.2)}
# global batch split over the ranks: uneven, one shard empty
SHARDS = {2: (5, 0), 3: (4, 0, 3)}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _entry(rank: int, world: int, store: str, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # numba may compile on first use
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; an assertion failing on any rank fails the test."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, (world, os.path.join(d, "store"), fn, args), nprocs=world, start_method="spawn")


def _close(actual, expected, what, tol=TOL, scale=1.0):
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=tol["atol"] * scale, rtol=tol["rtol"] * scale,
                               msg=lambda m: f"rank {dist.get_rank()}, {what}: {m}")


# ---- the checks each rank runs -----------------------------------------------------------------------------------

# (trailing shape (C, *S), activation, placement, negative_slope, affine, momentum, channels_last, input dtype)
CASES = [
    ((3,), None, "before", 0.01, True, 0.1, False, torch.float64),
    ((2, 5), "relu", "before", 0.01, True, 0.1, False, torch.float64),
    ((3, 2, 3), "silu", "after", 0.01, True, None, False, torch.float64),
    ((3, 5, 1), "leaky_relu", "before", 0.2, True, 0.3, True, torch.float64),
    ((2, 1, 3, 2), None, "before", 0.01, False, 0.1, False, torch.float64),
    ((3, 7), "relu", "before", 0.01, True, 0.1, False, torch.float32),
    ((2, 3, 5), None, "before", 0.01, True, 0.1, False, torch.bfloat16),  # float32 parameters, as under autocast
]
# float32 and bfloat16 against torch.nn in float64 on the same rounded values (as tests/conftest.py); dw, db: ×10
DTYPE_TOL = {torch.float64: TOL, torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 3e-2,
                                                                                               "rtol": 3e-2}}


def _check_layers(rank: int, world: int) -> None:
    shards = SHARDS[world]
    for backend_name in ("torch", "numba"):
        os.environ["NORMLAB_BACKEND"] = backend_name
        for tail, act, placement, slope, affine, momentum, cl, dtype in CASES:
            if backend_name == "numba" and dtype == torch.bfloat16:
                continue  # the numba loops take float32 and float64
            what = f"{backend_name} {dtype} {tail} {act} {placement} affine={affine} momentum={momentum} cl={cl}"
            tol = DTYPE_TOL[dtype]
            torch.manual_seed(0)
            C = tail[0]
            ref = TORCH_BN[len(tail) + 1](C, momentum=momentum, affine=affine, dtype=torch.float64)
            if affine:
                with torch.no_grad():
                    ref.weight.uniform_(0.5, 1.5)
                    ref.bias.normal_()
            f = TORCH_ACT.get(act)
            pdt = torch.float64 if dtype == torch.float64 else torch.float32
            ours = nl.SyncBatchNorm(C, momentum=momentum, affine=affine, activation=act, placement=placement,
                                    negative_slope=slope, dtype=pdt)
            ours.load_state_dict(ref.state_dict())
            model = distributed.DistributedDataParallel(ours) if affine else ours
            for step in range(2):
                x_all = (torch.randn(sum(shards), *tail, dtype=torch.float64) * 3 + 1).to(dtype)
                if cl:
                    x_all = x_all.contiguous(memory_format=torch.channels_last)
                g_all = torch.randn_like(x_all)
                xr = x_all.double().requires_grad_()
                yr = ref(f(xr)) if placement == "after" else ref(xr)
                yr = f(yr) if (f is not None and placement == "before") else yr
                (yr * g_all.double()).sum().backward()
                start = sum(shards[:rank])
                sl = slice(start, start + shards[rank])
                x = x_all[sl].detach().clone().requires_grad_()
                y = model(x)
                assert y.dtype == dtype
                (y * g_all[sl]).sum().backward()
                _close(y, yr[sl], f"{what} step {step} y", tol)
                _close(x.grad, xr.grad[sl], f"{what} step {step} dx", tol)
                if affine:  # DDP averages over the ranks: the global gradient is world * the average
                    _close(ours.weight.grad * world, ref.weight.grad, f"{what} step {step} dw", tol, 10)
                    _close(ours.bias.grad * world, ref.bias.grad, f"{what} step {step} db", tol, 10)
                    ours.zero_grad()
                    ref.zero_grad()
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                _close(getattr(ours, name), getattr(ref, name), f"{what} {name}", tol)
            assert int(ours.num_skipped_updates) == 0
            # eval: the running statistics, no collective (a rank alone could not hang)
            ours.eval()
            ref.eval()
            xe = torch.randn(3, *tail, dtype=torch.float64).to(dtype)
            ye = ref(f(xe.double())) if placement == "after" else ref(xe.double())
            _close(ours(xe), f(ye) if (f is not None and placement == "before") else ye, f"{what} eval", tol)
    os.environ.pop("NORMLAB_BACKEND")


def _check_non_finite(rank: int, world: int) -> None:
    """A NaN on rank 0 only: no rank updates its running statistics, every rank counts the skip."""
    bn = nl.SyncBatchNorm(3)
    x = torch.randn(SHARDS[world][rank], 3, 4)
    if rank == 0:
        x[1, 2, 3] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert int(bn.num_skipped_updates) == 1 and int(bn.num_batches_tracked) == 0
    assert any("non-finite" in str(w.message) for w in caught), [str(w.message) for w in caught]


def _net(bn):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), bn(6, activation="relu"), torch.nn.Linear(6, 3),
                               bn(3)).double()


def _check_precise(rank: int, world: int) -> None:
    """precise_bn pooled across the ranks equals precise_bn over every rank's batches in one process."""
    sizes = {2: [[5, 3], []], 3: [[5, 3], [], [7]]}[world]  # batches per rank; one rank has none
    torch.manual_seed(2)
    batches = [[torch.randn(n, 4, dtype=torch.float64) * 2 + 1 for n in ns] for ns in sizes]
    ref = _net(nl.BatchNorm1d)
    normlab.precise_bn(ref, [b for bs in batches for b in bs])
    ours = _net(nl.SyncBatchNorm)
    normlab.precise_bn(ours, batches[rank], process_group=dist.group.WORLD)
    for i in (1, 3):
        _close(ours[i].running_mean, ref[i].running_mean, f"precise layer {i} mean")
        _close(ours[i].running_var, ref[i].running_var, f"precise layer {i} var")
    # a non-finite batch on rank 0: every rank raises, no rank changes a buffer
    before = copy.deepcopy(ours.state_dict())
    bad = [b.clone() for b in batches[rank]]
    if rank == 0:
        bad[0][1, 2] = float("nan")
    expected = (ValueError, "non-finite") if rank == 0 else (RuntimeError, r"precise_bn: rank\(s\) \[0\] failed")
    with pytest.raises(expected[0], match=expected[1]):
        normlab.precise_bn(ours, bad, process_group=dist.group.WORLD)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def _check_all(rank: int, world: int) -> None:
    _check_layers(rank, world)
    _check_non_finite(rank, world)
    _check_precise(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_sync_matches_batchnorm_on_the_concatenated_batch(world):
    _spawn(_check_all, world)


# ---- a rank that dies or hangs -----------------------------------------------------------------------------------

_RANK_SCRIPT = """
import datetime, os, sys, time
import torch, torch.distributed as dist
import normlab.nn as nl
rank, store, how = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=5))
bn = nl.SyncBatchNorm(3)
x = torch.randn(4, 3, requires_grad=True)
if rank == 1 and how == "exit":
    os._exit(0)  # dies before the forward's all_gather
y = bn(x)
if rank == 1 and how == "hang":
    time.sleep(300)  # alive, but never joins the backward's all_reduce
y.sum().backward()
print("rank", rank, "finished")
"""


@pytest.mark.parametrize("how, collective", [("exit", "all_gather of the batch statistics"),
                                             ("hang", "all_reduce of the gradient sums")])
def test_a_lost_rank_is_a_clear_error(how, collective, tmp_path):
    env = {**_env(), "NORMLAB_BACKEND": "torch"}  # no numba compile on a cold cache within the 5 s timeout
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), str(tmp_path / "store"), how],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=120)  # the group's timeout is 5 s; this only bounds a broken test
    except subprocess.TimeoutExpired:
        procs[0].kill()
        out, err = procs[0].communicate()
        pytest.fail(f"rank 0 still running after 120 s:\n{out}\n{err}")
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0, out + err
    assert "finished" not in out
    assert f"SyncBatchNorm(3): {collective} across the process group failed on rank 0" in err, err


# ---- the example ---------------------------------------------------------------------------------------------------

def test_ddp_mnist_example_runs():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "ddp_mnist.py"), "--steps", "5", "--no-download"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 5/5" in r.stdout and "test accuracy" in r.stdout, r.stdout


# ---- one process ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act, placement", [(None, "before"), ("relu", "before"), ("tanh", "after")])
def test_single_process_is_batchnorm(act, placement):
    ours = nl.SyncBatchNorm(3, activation=act, placement=placement, dtype=torch.float64)
    twin = nl.BatchNorm2d(3, activation=act, placement=placement, dtype=torch.float64)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5)
        twin.bias.normal_()
    ours.load_state_dict(twin.state_dict())
    for step in range(3):
        if step == 2:
            ours.eval()
            twin.eval()
        x = torch.randn(4, 3, 5, 7, dtype=torch.float64)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((ours, twin), xs)]
        g = torch.randn_like(x)
        for y in ys:
            (y * g).sum().backward()
        torch.testing.assert_close(ys[0], ys[1], **TOL)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL)
        torch.testing.assert_close(ours.weight.grad, twin.weight.grad, **TOL)
        torch.testing.assert_close(ours.bias.grad, twin.bias.grad, **TOL)
    for (k, a), b in zip(ours.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=k)


def test_group_of_one_rank_is_batchnorm(tmp_path, monkeypatch):
    """An initialized group of one rank: no collective, BatchNorm's results."""

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective was called")

    monkeypatch.setattr(distributed, "all_gather", no_collective)
    monkeypatch.setattr(distributed, "_all_reduce", no_collective)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ours, twin = nl.SyncBatchNorm(3, activation="relu"), nl.BatchNorm1d(3, activation="relu")
        x = torch.randn(6, 3, 4)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [ours(xs[0]), twin(xs[1])]
        for y in ys:
            y.sum().backward()
        torch.testing.assert_close(ys[0], ys[1])
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(ours.running_var, twin.running_var)
    finally:
        dist.destroy_process_group()


def test_state_dict_is_torchs_and_input_checks():
    ours, theirs = nl.SyncBatchNorm(5), torch.nn.SyncBatchNorm(5)
    assert isinstance(ours, torch.nn.SyncBatchNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "num_skipped_updates" in dict(ours.named_buffers())  # kept, but not in state_dict
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        ours(torch.randn(5))
    with pytest.raises(ValueError, match="expects 5 channels at dim 1"):
        ours(torch.randn(4, 3))


def test_convert_keeps_activation_parameters_and_buffers():
    block = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        nl.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.2, placement="after"),
        torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3, momentum=None, affine=True)),
        torch.nn.BatchNorm3d(2, affine=False, track_running_stats=False),
    ).double()
    block[1].train(False)
    block[2][1].weight.requires_grad_(False)
    old = {name: m for name, m in block.named_modules()}
    tensors = {name: t for name, t in list(block.named_parameters()) + list(block.named_buffers())}
    out = nl.SyncBatchNorm.convert_sync_batchnorm(block)
    assert out is block
    for name in ("1", "2.1", "3"):
        new = dict(out.named_modules())[name]
        assert type(new) is nl.SyncBatchNorm, name
        for attr in ("eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(old[name], attr), (name, attr)
    assert (out[1].activation, out[1].placement, out[1].negative_slope) == ("leaky_relu", "after", 0.2)
    assert out[2][1].activation is None
    assert not out[2][1].weight.requires_grad and out[2][1].bias.requires_grad
    for name, t in list(out.named_parameters()) + list(out.named_buffers()):
        assert t is tensors.get(name, t), name  # the same tensors: an optimizer built before keeps working
    assert out[2][1].num_skipped_updates.dtype == torch.long  # new for a torch layer
    assert out[1].running_mean.dtype == torch.float64
    single = nl.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert type(single) is nl.SyncBatchNorm


def test_bad_process_group_and_module():
    with pytest.raises(TypeError, match=r"SyncBatchNorm: process_group must be None .*ProcessGroup.*got int"):
        nl.SyncBatchNorm(3, process_group=3)
    with pytest.raises(TypeError, match=r"convert_sync_batchnorm: process_group must be .*got str"):
        nl.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3), process_group="world")
    with pytest.raises(TypeError, match=r"convert_sync_batchnorm expects a torch.nn.Module, got list"):
        nl.SyncBatchNorm.convert_sync_batchnorm([torch.nn.BatchNorm1d(3)])
    with pytest.raises(TypeError, match=r"precise_bn: process_group must be .*got float"):
        normlab.precise_bn(torch.nn.BatchNorm1d(3), [torch.randn(4, 3)], process_group=1.0)


def test_merge_moments_is_exact_over_unequal_parts():
    x = torch.randn(23, 4, dtype=torch.float64) * 5 + 3
    parts = torch.split(x, [7, 0, 1, 15])
    n = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    mean = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64)
                      for p in parts])
    total, mu, pooled = distributed.merge_moments(n, mean, m2)
    assert float(total) == 23
    torch.testing.assert_close(mu, x.mean(0), **TOL)
    torch.testing.assert_close(pooled, x.var(0, correction=0) * 23, **TOL)


def test_compile_fullgraph_single_process():
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nl.SyncBatchNorm(4, activation="relu"),
                                   torch.nn.Conv2d(4, 2, 1), nl.SyncBatchNorm(2)).double()

    eager, compiled = net(), net()
    run = torch.compile(compiled, fullgraph=True)
    for training in (True, False):
        eager.train(training)
        compiled.train(training)
        x = torch.randn(3, 3, 6, 5, dtype=torch.float64)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [eager(xs[0]), run(xs[1])]
        for y in ys:
            y.square().sum().backward()
        torch.testing.assert_close(ys[1], ys[0])
        torch.testing.assert_close(xs[1].grad, xs[0].grad)
        for a, b in zip(eager.parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad)
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, msg=k)
