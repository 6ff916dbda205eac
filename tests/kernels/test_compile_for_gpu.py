"""Every Triton kernel compiles for an H100 (sm_90: TTIR → PTX → cubin with Triton's bundled ptxas), on a
machine without a GPU. The interpreter tests check the arithmetic; this checks what only the compiler sees
(tile shapes legal for tl.dot, dynamic loop bounds, constexpr branches, types), for the fp32 IEEE path and the
bf16 tensor-core path, at the smallest and the largest autotune config of each kernel."""

import importlib

import pytest

from privimage.kernels import dispatch

pytestmark = pytest.mark.skipif(not dispatch.HAVE_TRITON, reason="triton is not installed")

MODULES = {m: importlib.import_module(f"privimage.kernels.{m}")
           for m in ["per_sample_sq_norms", "ghost_sq_norms", "clipped_weight_grad", "norm_affine"]}


def _gemm_pointers(dtype):
    return {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "order_ptr": "*i64", "offsets_ptr": "*i64",
            "pad_ptr": "*i8", "out_ptr": "*fp32", "c_ptr": "*fp32", "sid_ptr": "*i64", "sxr": "i64", "sgr": "i64"}


CASES = []
for name, kernel in [("per_sample_sq_norms", "_per_sample_sq_norms_kernel"),
                     ("ghost_sq_norms", "_ghost_sq_norms_kernel"),
                     ("clipped_weight_grad", "_clipped_weight_grad_kernel")]:
    for dtype in ["fp32", "bf16"]:
        for which in [0, -1]:
            CASES.append(pytest.param(name, kernel, dtype, which, id=f"{name}-{dtype}-config{which}"))


def _compile(jit_fn, types, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in jit_fn.arg_names}
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert len(compiled.asm["cubin"]) > 0


@pytest.mark.parametrize("module, kernel, dtype, which", CASES)
def test_gemm_kernels_compile_for_sm90(monkeypatch, module, kernel, dtype, which):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tuner = getattr(MODULES[module], kernel)
    config = tuner.configs[which]
    constexprs = {"KH": 3, "KW": 3, "IEEE": dtype == "fp32", **config.kwargs}
    _compile(tuner.fn, _gemm_pointers(dtype), constexprs, config.num_warps, config.num_stages)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("per_position", [False, True], ids=["group-norm", "layer-norm"])
def test_norm_affine_kernel_compiles_for_sm90(monkeypatch, dtype, per_position):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    types = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "target_ptr": "*i64", "pad_ptr": "*i8", "out_ptr": "*fp32",
             "eps": "fp32"}
    constexprs = {"PER_POSITION": per_position, "BLOCK_C": 4, "BLOCK_L": 256}
    _compile(MODULES["norm_affine"]._norm_affine_kernel, types, constexprs, 4, 2)
