"""The Triton kernels compiled ahead of time for an H100 / H200 (sm_90) on a machine without a GPU:
Triton's front end, its NVIDIA back end and the ptxas its wheel ships all run on the CPU.

The interpreter tests (test_kernels_attention.py, test_kernels_moe.py) check what the kernels
compute, but they run the kernel bodies as Python: a kernel the GPU compiler refuses (a helper
without @triton.jit, a tensor where a constexpr is needed, a tl.dot below 16 rows, a shape that
does not broadcast in the compiled layout) passes them. Here the GPU tiles are compiled down to a
cubin. The arguments are typed as a launch types them, without the launcher's value
specialisations (unit strides as constants, 16-divisible sizes): register use and spills depend on
those, and are the autotuner's business on the GPU.

    python tests/test_kernels_compile.py            # every GPU tile of every kernel, bf16 and fp32
    python tests/test_kernels_compile.py --first    # the first bf16 tile per kernel (the test)
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = 90                                   # Hopper: the H100 / H200 the GPU check runs on
ATTN_PTRS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA", "CU", "TABLE")  # MoE's: *_ptr
INDEX_PTRS = ("pair_ptr", "bexp_ptr", "rstart_ptr", "rend_ptr", "CU", "TABLE")       # int32
FP32_PTRS = ("tw_ptr", "dwp_ptr", "LSE", "DELTA")


def test_the_kernels_compile_for_sm90():
    """Every kernel's first GPU tile in bf16 (the attention kernels at head dim 128); the sweep below
    adds the other tiles, fp32 and head dims 64 and 256."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}    # the GPU tiles, not the interpreter's
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--first"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("_")]
    assert len(rows) == 6 + 4 and all(" ok " in line for line in rows), out.stdout


# ----------------------------------------------------------------------------------------------
# the compiler run (in a process without TRITON_INTERPRET, so kernels.py builds its GPU tiles)

def jit_function(kernel):
    """The @triton.jit function under any autotune / heuristics wrappers."""
    import triton
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def signature(fn, consts: dict, dtype: str) -> dict:
    """Argument types as a launch gives them: tensors of the storage dtype (index tables int32,
    router weights and softmax statistics fp32), integers i32, scales fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INDEX_PTRS:
            sig[name] = "*i32"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr") or (name in ATTN_PTRS and fn.__name__.startswith("_attn")):
            sig[name] = "*" + dtype
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
    return sig


def cases(first: bool):
    """(kernel, dtype, constexprs, warps, stages) for each GPU tile to compile."""
    import triton.language as tl
    import kernels
    tl_dtype = {"bf16": tl.bfloat16, "fp32": tl.float32}
    for kernel in kernels._MOE_KERNELS:
        for dtype in ("bf16",) if first else ("bf16", "fp32"):
            tiles = [c for c in kernel.configs if c.moe_fp32 == (dtype == "fp32")][:1 if first else None]
            for c in tiles:
                consts = {"TOPK": 8, "SAVE_GU": True, "UPCAST": False, "LD": tl_dtype[dtype], "EVEN_K": False,
                          "GROUP_M": kernels._MOE_GROUP_M, "PREC": "ieee" if dtype == "fp32" else None,
                          "BLOCK_M": 64 if dtype == "fp32" else 128, **c.kwargs}
                yield kernel, dtype, consts, c.num_warps, c.num_stages
    attention = ((kernels._attn_fwd_kernel, "fwd"), (kernels._attn_bwd_dkdv_kernel, "dkdv"),
                 (kernels._attn_bwd_dq_kernel, "dq"))
    for head_dim in (128,) if first else (64, 128, 256):
        for dtype in ("bf16",) if first else ("bf16", "fp32"):
            base = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, EVEN_D=True, CHUNK=kernels._ATTN_CHUNK_GPU,
                        CAUSAL=True, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32")
            for kernel, kind in attention:
                for c in kernels._attn_gpu_configs(kind, head_dim)[:1 if first else None]:
                    yield kernel, dtype, dict(base, **c.kwargs), c.num_warps, c.num_stages
            yield kernels._attn_bwd_delta_kernel, dtype, dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_T=64), 4, 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", action="store_true", help="only the first bf16 tile per kernel")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: under it kernels.py builds the interpreter's tiles, not the GPU's")
    sys.path.insert(0, ROOT)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    print(f"Triton {triton.__version__}, sm_{ARCH}: kernel, dtype, head dim, tile, warps / stages, result, seconds")
    failed = 0
    for kernel, dtype, consts, warps, stages in cases(args.first):
        fn = jit_function(kernel)
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        tile = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T") if k in consts)
        t0 = time.time()
        try:
            compiled = triton.compile(ASTSource(fn, signature(fn, consts, dtype), consts),
                                      target=GPUTarget("cuda", ARCH, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
            result = "ok" if compiled.asm.get("cubin") else "FAILED: no cubin"
        except Exception as e:                         # report every kernel, then fail
            result = f"FAILED {type(e).__name__}: {e}"
        failed += result != "ok"
        print(f"{fn.__name__} {dtype} d={consts.get('HEAD_DIM', '-')} {tile} {warps}/{stages} {result} "
              f"{time.time() - t0:.1f}s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
