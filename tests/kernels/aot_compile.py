"""Compile every kernel of normlab.kernels.norm for a Hopper GPU (sm_90) with Triton's real compiler, no GPU needed.

Run as a script in a process without ``TRITON_INTERPRET`` (the interpreter replaces the kernels); prints one line
per failure and exits non-zero if any kernel fails to compile. Used by test_kernels.py::test_compiles_for_sm90.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from normlab.kernels import norm


def _signature(kernel, pointers: dict, constexprs: dict) -> tuple[dict, dict]:
    sig, consts = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in ("eps", "inv_m", "momentum", "unbias") else "i32"
    return sig, consts


def cases():
    # (ACT, SLOPE, ACT_FIRST, POOL_BATCH, NEED_DX): every activation branch the constexprs select is compiled somewhere
    for act, slope, act_first, pool_batch, need_dx in (
        (None, 0.01, False, True, True),
        ("gelu", 0.01, False, False, True),
        ("silu", 0.01, True, True, True),
        ("leaky_relu", 0.2, True, False, False),
    ):
        a = dict(ACT=act, SLOPE=slope, ACT_FIRST=act_first)
        counts = {"lock_ptr": "*i32", "nbt_ptr": "*i64", "skip_ptr": "*i64"}
        yield (norm._stats_kernel, {"x_ptr": "*bf16", "rm_ptr": "*bf16", "rv_ptr": "*bf16", **counts},
               dict(a, CHANNEL_STATS=pool_batch or act_first, RUNNING=pool_batch, CUMULATIVE=act_first,
                    HAS_NBT=act_first, HAS_SKIP=pool_batch, BLOCK_C=16, BLOCK_R=256, BLOCK_S=64,
                    BLOCK_J=64))  # fmt: skip
        yield (norm._apply_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*bf16"},
               dict(a, POOL_BATCH=pool_batch, HAS_W=True, HAS_B=True, USE_INPUT_STATS=not act_first,
                    SHARED_STATS=act_first and not pool_batch, BLOCK_C=16, BLOCK_R=256))  # fmt: skip
        yield (norm._grad_stats_kernel, {"x_ptr": "*fp16", "dy_ptr": "*fp16", "dw_ptr": "*bf16", "lock_ptr": "*i32"},
               dict(a, POOL_BATCH=pool_batch, HAS_W=True, HAS_B=not pool_batch, CHANNEL_STATS=pool_batch,
                    COEF=need_dx, BLOCK_C=64, BLOCK_R=64, BLOCK_T=64, BLOCK_S=64, BLOCK_K=8))  # fmt: skip
        yield (norm._dx_kernel, {"x_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16"},
               dict(a, POOL_BATCH=pool_batch, HAS_W=True, HAS_B=True, USE_INPUT_STATS=not act_first, BLOCK_C=128,
                    BLOCK_R=32))  # fmt: skip
        # row path (layer norm): both SINGLE values, given and own statistics, with and without USE_INPUT_STATS and
        # NEED_DX
        single = not pool_batch or act_first
        yield (norm._layer_fwd_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "b_ptr": "*bf16"},
               dict(a, HAS_W=True, HAS_B=pool_batch, USE_INPUT_STATS=not act_first, SINGLE=single,
                    BLOCK_N=4 if single else 1, BLOCK_K=1024 if single else 4096))  # fmt: skip
        yield (norm._layer_bwd_kernel, {"x_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16"},
               dict(a, HAS_W=True, HAS_B=True, USE_INPUT_STATS=not act_first, NEED_DX=need_dx, SINGLE=not pool_batch,
                    BLOCK_N=1 if pool_batch else 4, BLOCK_K=4096 if pool_batch else 1024))  # fmt: skip
        yield (norm._layer_grad_merge_kernel, {"dw_ptr": "*bf16"},
               dict(HAS_W=True, HAS_B=not pool_batch, BLOCK_K=256, BLOCK_P=64))  # fmt: skip


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = n = 0
    for kernel, pointers, constexprs in cases():
        n += 1
        sig, consts = _signature(kernel, pointers, constexprs)
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                           options={"num_warps": 8})  # fmt: skip
        except Exception as e:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {kernel.fn.__name__} {constexprs}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"compiled {n - failed} of {n} kernel variants for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
