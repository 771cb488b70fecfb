"""The compiled Triton kernels of kernels.py on a CUDA GPU at realistic sizes (paper §5.1, §5.2).

Skipped without CUDA: CPU CI runs tests/test_kernels_attention.py and tests/test_kernels_moe.py
under TRITON_INTERPRET=1 (conftest.py sets the interpreter only when CUDA is unavailable, so here
the kernels compile natively). What only a GPU can check: the GPU tile configs (autotuned, and
each one pinned), tensor-core bf16 math, int64 addressing past 2^31, no host syncs, and bitwise
determinism at full size.

References are plain torch, independent of the Triton code: `kernels.moe_grouped_mlp_torch` (sort
+ per-expert matmul; test_kernels_moe.py checks it against a per-token loop) and
`kernels.packed_attention_torch(method="loop")` (one SDPA per sample), each in float64 (exact math
on the rounded inputs) and at the inputs' dtype. The rule is the FlashAttention tests' three-way rule:
err(triton, fp64) <= 2x (outputs) / 3x (gradients) err(torch at the same dtype, fp64) + slack.

Cost: a few minutes at most on an H100/H200, mostly Triton compiles and autotuning (cached in
~/.triton for later runs). The LARGE int64 case needs ~40 GB of free GPU memory (skipped
otherwise); deselect it with -k "not int64".
"""
import contextlib
import os

import pytest
import torch

import bench
import kernels

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: runs the compiled Triton kernels natively"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 is set: these tests are for compiled kernels"),
]

NAMES = ("y", "dx", "dw_gate", "dw_up", "dw_down", "dtopk_weights")
REALISTIC = dict(T=8192, E=64, k=8, H=2048, I=1024)        # the `bench moe` shape


# --- MoE helpers -------------------------------------------------------------------------------

def moe_inputs(T, E, k, H, I, dtype, routing="uniform"):
    """([x, w_gate, w_up, w_down, topk_weights], topk_ids, dy) on the GPU (the bench's inputs)."""
    return bench.moe_make_inputs(T, E, k, H, I, dtype, "cuda", routing)


def fwd_bwd(fn, leaves, ids, dy):
    """Output and the gradients of the five float inputs, through fresh leaves."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    y = fn(*leaves, ids)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def moe_references(leaves, ids, dy):
    """(fp64 reference, torch reference at the inputs' dtype), both from moe_grouped_mlp_torch."""
    ref64 = fwd_bwd(kernels.moe_grouped_mlp_torch, [t.double() for t in leaves], ids, dy.double())
    refpt = fwd_bwd(kernels.moe_grouped_mlp_torch, leaves, ids, dy)
    return ref64, refpt


def assert_three_way(out, ref64, refpt, what):
    """max |err| / max |ref64| within 2x (y) / 3x (grads) torch's own + slack; rel. RMSE <= 1e-2."""
    dtype = refpt[0].dtype
    slack = 1e-5 if dtype == torch.float32 else 1e-3
    bad = []
    for i, name in enumerate(NAMES):
        assert out[i].dtype == dtype, f"{what} {name}: dtype {out[i].dtype}, expected {dtype}"
        r = ref64[i]
        scale = r.abs().max().item() or 1.0
        diff = out[i].double() - r
        err = diff.abs().max().item() / scale
        err_pt = (refpt[i].double() - r).abs().max().item() / scale
        rmse = (diff.pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item()
        if not (err <= (2 if i == 0 else 3) * err_pt + slack and rmse <= 1e-2):
            bad.append(f"{name}: triton {err:.2e} vs torch {err_pt:.2e}, rel. RMSE {rmse:.2e}")
    assert not bad, f"{what}: " + "; ".join(bad)


@contextlib.contextmanager
def pinned_moe_config(index):
    """Every MoE kernel runs its index-th GPU config (no autotuning) inside the block."""
    kernels._moe_pin_config(index)
    try:
        yield
    finally:
        kernels._moe_pin_config(None)


# the most 16-bit configs any MoE kernel has (the autotuner may pick any of them)
N_MOE_CONFIGS = max(sum(not getattr(c, "moe_fp32", False) for c in kern.configs)
                    for kern in kernels._MOE_KERNELS)


@pytest.fixture(scope="module")
def realistic_uniform():
    """bf16 inputs at the bench shape, uniform routing, and their two references (computed once)."""
    leaves, ids, dy = moe_inputs(**REALISTIC, dtype=torch.bfloat16)
    return leaves, ids, dy, *moe_references(leaves, ids, dy)


# --- MoE: correctness ----------------------------------------------------------------------------

MOE_EDGE_CASES = {  # name: (T, E, k, H, I, dtype, routing); H, I not multiples of the tiles
    "single_token": (1, 8, 2, 256, 128, torch.bfloat16, "uniform"),
    "odd_sizes_zero_token_experts": (37, 64, 3, 200, 72, torch.bfloat16, "uniform"),
    "top1_skewed": (300, 64, 1, 512, 256, torch.bfloat16, "skewed"),
    "all_tokens_on_one_expert": (64, 4, 1, 256, 128, torch.bfloat16, "one_expert"),
    "fp32_odd_sizes": (1000, 16, 4, 520, 300, torch.float32, "uniform"),
}


@pytest.mark.parametrize("case", MOE_EDGE_CASES)
def test_moe_edge_cases(case):
    """Small and awkward shapes with each kernel's first GPU config (no autotune time)."""
    T, E, k, H, I, dtype, routing = MOE_EDGE_CASES[case]
    leaves, ids, dy = moe_inputs(T, E, k, H, I, dtype, "uniform" if routing == "one_expert" else routing)
    if routing == "one_expert":
        ids = torch.zeros_like(ids)                           # every token on expert 0
    with pinned_moe_config(0):
        out = fwd_bwd(kernels.moe_grouped_mlp_triton, leaves, ids, dy)
    assert_three_way(out, *moe_references(leaves, ids, dy), f"[{case}]")


@pytest.mark.parametrize("config", range(N_MOE_CONFIGS))
def test_moe_every_tile_config(config, realistic_uniform):
    """The bench shape with each kernel's config #config pinned: whichever the autotuner picks
    on some GPU must be right."""
    leaves, ids, dy, ref64, refpt = realistic_uniform
    with pinned_moe_config(config):
        out = fwd_bwd(kernels.moe_grouped_mlp_triton, leaves, ids, dy)
    assert_three_way(out, ref64, refpt, f"[config #{config}]")


def test_moe_autotuned_skewed_routing():
    """The bench shape, half the tokens on 8 hot experts, autotuned configs."""
    leaves, ids, dy = moe_inputs(**REALISTIC, dtype=torch.bfloat16, routing="skewed")
    out = fwd_bwd(kernels.moe_grouped_mlp_triton, leaves, ids, dy)
    assert_three_way(out, *moe_references(leaves, ids, dy), "[skewed, autotuned]")


# --- MoE: no host syncs, determinism -------------------------------------------------------------

def test_moe_no_host_syncs(realistic_uniform, monkeypatch):
    """Forward+backward through the public dispatch never waits for the GPU (no .item(), no
    data-dependent sizes), so it can overlap with the host and be captured in a CUDA graph."""
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    leaves, ids, dy = realistic_uniform[:3]
    fwd_bwd(kernels.moe_grouped_mlp, leaves, ids, dy)       # compile + autotune happen here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd_bwd(kernels.moe_grouped_mlp, leaves, ids, dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_moe_bitwise_deterministic(realistic_uniform):
    """No atomics anywhere: two runs give identical bits for the output and every gradient."""
    leaves, ids, dy = realistic_uniform[:3]
    a = fwd_bwd(kernels.moe_grouped_mlp_triton, leaves, ids, dy)
    b = fwd_bwd(kernels.moe_grouped_mlp_triton, leaves, ids, dy)
    for name, u, v in zip(NAMES, a, b):
        assert torch.equal(u, v), f"{name} differs between two identical runs"


# --- packed attention -----------------------------------------------------------------------------

def attention_inputs(lengths, H, Hkv, D, dtype, seed=0):
    """q, k, v, do and cu_seqlens on the GPU, drawn as `bench attention` draws them."""
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(T, h, D, device="cuda", dtype=dtype, generator=g)
                   for h in (H, Hkv, Hkv, H))
    return q, k, v, do, cu


def attention_grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


ATTENTION_CASES = [  # lengths, H, Hkv, D, causal
    pytest.param(bench.bench_lengths(8192, 0), 16, 16, 128, True, id="bench-T8k-d128-causal"),
    pytest.param(bench.bench_lengths(32768, 0), 16, 16, 128, True, id="bench-T32k-d128-causal"),
    # lengths 1 and not multiples of the 128-row chunk, GQA 4:1, another head-dim class
    pytest.param([1, 127, 129, 1, 2000, 63, 777], 16, 4, 64, False, id="gqa4-d64-bidir-odd"),
]


@pytest.mark.parametrize("lengths,H,Hkv,D,causal", ATTENTION_CASES)
def test_attention_three_way_and_deterministic(lengths, H, Hkv, D, causal):
    """bf16 fwd+bwd with the autotuned tiles against a per-sample SDPA loop in fp64, then a
    second run: no atomics, so the bits must repeat."""
    q, k, v, do, cu = attention_inputs(lengths, H, Hkv, D, torch.bfloat16)

    def loop(a, b, c):
        return kernels.packed_attention_torch(a, b, c, cu, causal, method="loop")

    def triton(a, b, c):
        return kernels.packed_attention_triton(a, b, c, cu, causal)
    ref64 = attention_grads(loop, q.double(), k.double(), v.double(), do.double())
    refpt = attention_grads(loop, q, k, v, do)
    tri = attention_grads(triton, q, k, v, do)
    bad = []
    for name, t, p, r, factor in zip(("out", "dq", "dk", "dv"), tri, refpt, ref64, (2, 3, 3, 3)):
        assert t.dtype == torch.bfloat16, f"{name}: dtype {t.dtype}"
        e_t = (t.double() - r).abs().max().item()
        e_p = (p.double() - r).abs().max().item()
        if not e_t <= factor * e_p + 1e-3:                  # also fails on NaN
            bad.append(f"{name}: triton {e_t:.2e} vs torch-bf16 {e_p:.2e}")
    assert not bad, "; ".join(bad)
    again = attention_grads(triton, q, k, v, do)
    for name, t, t2 in zip(("out", "dq", "dk", "dv"), tri, again):
        assert torch.equal(t, t2), f"{name} differs between two identical runs"


def test_attention_no_host_syncs(monkeypatch):
    """packed_attention fwd+bwd with CUDA cu_seqlens, including building the block table of a new
    cu_seqlens tensor, never waits for the GPU."""
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    q, k, v, do, cu = attention_inputs(bench.bench_lengths(4096, 1, 64, 1024), 16, 16, 128,
                                       torch.bfloat16)
    run = lambda a, b, c, cu: kernels.packed_attention(a, b, c, cu, True)  # noqa: E731
    attention_grads(lambda a, b, c: run(a, b, c, cu), q, k, v, do)   # compile + autotune here
    fresh = cu.clone()                                                  # not in the table memo
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention_grads(lambda a, b, c: run(a, b, c, fresh), q, k, v, do)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- LARGE: int64 offsets (last, it needs the most memory) ---------------------------------------

def test_moe_int64_offsets_large():
    """LARGE (~40 GB, T = 132k tokens): T*k*d = 1.01 * 2^31, so the per-pair rows of y_pairs and
    dx_pairs sit past int32 offsets. Addressing, not tiling, is under test: config #0, and the
    reference is the torch path at bf16 (an fp64 one would not fit); the last rows are checked
    on their own since they are the ones an int32 overflow would corrupt."""
    T, E, k, H, I = 132_000, 8, 8, 2048, 256
    assert T * k * H > 2 ** 31
    torch.cuda.empty_cache()            # the earlier tests' cached blocks count as taken in mem_get_info
    free = torch.cuda.mem_get_info()[0]
    if free < 40e9:
        pytest.skip(f"needs ~40 GB of free GPU memory, {free / 1e9:.0f} GB are")
    leaves, ids, dy = moe_inputs(T, E, k, H, I, torch.bfloat16)
    with pinned_moe_config(0):
        out = fwd_bwd(kernels.moe_grouped_mlp_triton, leaves, ids, dy)
    ref = fwd_bwd(kernels.moe_grouped_mlp_torch, leaves, ids, dy)
    bad = []
    for name, u, v in zip(NAMES, out, ref):
        scale = v.float().abs().max().item() or 1.0
        err = (u.float() - v.float()).abs().max().item() / scale
        tail = (u[-1].float() - v[-1].float()).abs().max().item() / scale
        if not (err < 3e-2 and tail < 3e-2):
            bad.append(f"{name}: max err / max |ref| {err:.2e}, last row {tail:.2e}")
    del leaves, ids, dy, out, ref
    torch.cuda.empty_cache()
    assert not bad, "; ".join(bad)
