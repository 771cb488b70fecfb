"""Packed (cu_seqlens) attention of kernels.py, paper §5.1: Triton flash attention fwd+bwd and the
torch path, against an independent naive softmax(q k^T) v computed per sample in float64.

On a CPU box the Triton kernels run under TRITON_INTERPRET=1 (set by conftest) with tiny tiles,
so shapes stay small (T <= ~200). bf16 follows the FlashAttention tests' rule: the kernel's max error vs the
fp64 reference must be within 2x (outputs) / 3x (gradients) of PyTorch's own bf16 SDPA error,
plus 1e-3.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --- independent reference ---------------------------------------------------------------------

def naive_attention(q, k, v, cu_seqlens, causal, scale=None):
    """softmax(q k^T * scale, masked per sample) v, one sample at a time, in the inputs' dtype.

    q (T, H, D), k/v (T, Hkv, D); query head h uses kv head h // (H // Hkv).
    """
    T, H, D = q.shape
    kv_head = torch.arange(H, device=q.device) // (H // k.shape[1])
    scale = D ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qi = q[s:e].transpose(0, 1)                          # (H, L, D)
        ki = k[s:e][:, kv_head].transpose(0, 1)              # (H, L, D)
        vi = v[s:e][:, kv_head].transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale             # (H, L, L)
        if causal:
            future = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outs.append((scores.softmax(-1) @ vi).transpose(0, 1))
    return torch.cat(outs, 0)


def sdpa_per_sample(q, k, v, cu_seqlens, causal):
    """PyTorch's own SDPA per sample at the inputs' dtype: the yardstick for bf16 rounding."""
    H = q.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        ki = k[s:e].repeat_interleave(H // k.shape[1], dim=1)
        vi = v[s:e].repeat_interleave(H // k.shape[1], dim=1)
        outs.append(F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
            is_causal=causal).transpose(0, 1))
    return torch.cat(outs, 0)


def make_inputs(lengths, H, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v, do = (torch.randn(T, h, D, generator=g).to(DEVICE, dtype)
                   for h in (H, Hkv, Hkv, H))
    return q, k, v, do, cu.to(DEVICE)


def out_and_grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_rmse(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


# --- Triton kernel vs the naive reference ------------------------------------------------------

CASES = [
    # lengths (with a length-1 and an empty sample, none a multiple of the tiles), GQA 2:1
    pytest.param([1, 40, 0, 17, 64, 30], 2, 1, 16, True, torch.float32, id="causal-gqa-d16"),
    pytest.param([1, 40, 0, 17, 64, 30], 2, 2, 32, False, torch.float32, id="bidir-d32"),
    pytest.param([150], 2, 2, 64, True, torch.float32, id="one-sample-causal-d64"),
    pytest.param([150], 2, 2, 64, False, torch.float32, id="one-sample-bidir-d64"),
    pytest.param([1, 1, 97, 33], 4, 2, 16, False, torch.float32, id="bidir-gqa-ones"),
    pytest.param([33, 1, 70], 2, 1, 24, True, torch.float32, id="causal-d24-not-pow2"),
    pytest.param([45, 20], 1, 1, 128, True, torch.float32, id="causal-d128"),
    pytest.param([5, 64, 1, 81], 4, 2, 32, True, torch.bfloat16, id="bf16-causal-gqa"),
    pytest.param([150, 7], 2, 2, 64, False, torch.bfloat16, id="bf16-bidir-d64"),
]


@pytest.mark.parametrize("lengths,H,Hkv,D,causal,dtype", CASES)
def test_triton_matches_naive_reference(monkeypatch, lengths, H, Hkv, D, causal, dtype):
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    q, k, v, do, cu = make_inputs(lengths, H, Hkv, D, dtype)
    tri = out_and_grads(lambda a, b, c: kernels.packed_attention(a, b, c, cu, causal), q, k, v, do)
    ref = out_and_grads(lambda a, b, c: naive_attention(a, b, c, cu, causal),
                        q.double(), k.double(), v.double(), do.double())
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, t, r in zip(names, tri, ref):
            assert max_err(t, r) < 1e-4, f"{name}: max err {max_err(t, r):.2e}"
        return
    pt = out_and_grads(lambda a, b, c: sdpa_per_sample(a, b, c, cu, causal), q, k, v, do)
    for name, t, p, r, slack in zip(names, tri, pt, ref, (2, 3, 3, 3)):
        assert t.dtype == dtype, name
        e_t, e_p = max_err(t, r), max_err(p, r)
        assert e_t <= slack * e_p + 1e-3, f"{name}: triton {e_t:.2e} vs torch-bf16 {e_p:.2e}"
        assert rel_rmse(t, r) < 1e-2, f"{name}: relative RMSE {rel_rmse(t, r):.2e}"


def test_triton_path_is_taken_and_handles_strided_views(monkeypatch):
    """q, k, v sliced out of one fused projection (T stride != H * D), as a model produces them."""
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    H, Hkv, D, lengths = 2, 1, 16, [30, 1, 50]
    g = torch.Generator().manual_seed(1)
    T = sum(lengths)
    qkv = torch.randn(T, H + 2 * Hkv, D, generator=g).to(DEVICE).requires_grad_()
    cu = torch.tensor([0, 30, 31, 81], dtype=torch.int32, device=DEVICE)
    do = torch.randn(T, H, D, generator=g).to(DEVICE)

    out = kernels.packed_attention(qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:], cu, True)
    assert type(out.grad_fn).__name__.startswith("_PackedAttentionFn")
    out.backward(do)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref = naive_attention(ref_qkv[:, :H], ref_qkv[:, H:H + Hkv], ref_qkv[:, H + Hkv:], cu, True)
    ref.backward(do.double())
    assert max_err(out, ref) < 1e-4
    assert max_err(qkv.grad, ref_qkv.grad) < 1e-4


def test_triton_other_tile_shapes(monkeypatch):
    """GPU-like tile ratios (query tile 2x key tile in fwd/dq, the reverse in dkdv) on a bigger
    table chunk: every kernel must be right for any tiles that divide the chunk."""
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    if DEVICE == "cuda":
        pytest.skip("interpreter tile override; on a GPU the autotuner picks the tiles")
    monkeypatch.setattr(kernels, "_ATTN_INTERPRET",
                        dict(chunk=64, fwd=(64, 32), dkdv=(32, 64), dq=(64, 32)))
    q, k, v, do, cu = make_inputs([70, 1, 63, 64], 2, 1, 16, torch.float32, seed=3)
    for causal in (True, False):
        tri = out_and_grads(lambda a, b, c: kernels.packed_attention(a, b, c, cu, causal),
                            q, k, v, do)
        ref = out_and_grads(lambda a, b, c: naive_attention(a, b, c, cu, causal),
                            q.double(), k.double(), v.double(), do.double())
        for name, t, r in zip(("out", "dq", "dk", "dv"), tri, ref):
            assert max_err(t, r) < 1e-4, f"causal={causal} {name}: {max_err(t, r):.2e}"


def test_block_table_covers_every_block_once():
    chunk = 32
    lengths = [1, 0, 64, 65, 200, 31]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    for causal in (True, False):
        for table in kernels._attn_block_table(cu, sum(lengths), chunk, causal):
            real = [tuple(p) for p in table.tolist() if p[0] >= 0]
            expected = [(s, b) for s, L in enumerate(lengths) for b in range(-(-L // chunk))]
            assert sorted(real) == sorted(expected)
    table_q, table_kv = kernels._attn_block_table(cu, sum(lengths), chunk, True)
    first_q, first_kv = table_q[0].tolist(), table_kv[0].tolist()
    assert first_q == [4, 6]               # causal: the last query block of the longest sample
    assert first_kv == [4, 0]              # ... and its first key block start first


# --- torch path: both variants vs the naive reference ------------------------------------------

@pytest.mark.parametrize("method", ["loop", "mask"])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_variants_match_naive_reference(method, causal):
    q, k, v, do, cu = make_inputs([1, 40, 0, 17, 64, 30], 4, 2, 16, torch.float32, seed=2)
    got = out_and_grads(lambda a, b, c: kernels.packed_attention_torch(a, b, c, cu, causal,
                                                                      method=method), q, k, v, do)
    ref = out_and_grads(lambda a, b, c: naive_attention(a, b, c, cu, causal),
                        q.double(), k.double(), v.double(), do.double())
    for name, t, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert max_err(t, r) < 1e-4, f"{method} {name}: {max_err(t, r):.2e}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
def test_torch_path_batch_variant_matches_naive_reference(causal, heads):
    """Samples of one length (image tiles, video frames) run as one batched SDPA call."""
    q, k, v, do, cu = make_inputs([24] * 5, *heads, 16, torch.float32, seed=3)
    assert kernels._torch_attention_method(cu.tolist(), heads[0] * 16) == "batch"
    got = out_and_grads(lambda a, b, c: kernels.packed_attention_torch(a, b, c, cu, causal), q, k, v, do)
    ref = out_and_grads(lambda a, b, c: naive_attention(a, b, c, cu, causal),
                        q.double(), k.double(), v.double(), do.double())
    for name, t, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert max_err(t, r) < 1e-4, f"batch {name}: {max_err(t, r):.2e}"
    with pytest.raises(ValueError, match="one length"):
        _, _, _, _, mixed = make_inputs([24, 23], *heads, 16, torch.float32)
        kernels.packed_attention_torch(q[:47], k[:47], v[:47], mixed, causal, method="batch")


@pytest.mark.parametrize("method", ["loop", "mask", "batch"])
def test_torch_path_runs_sdpa_flash_kernel_not_the_math_path(method):
    """On CPU only 4-D SDPA inputs reach the flash kernel; 3-D ones run the math path (the whole
    (L, L) score matrix, several times slower at training lengths), forward and backward."""
    from torch.profiler import profile
    q, k, v, do, cu = (t.cpu() for t in make_inputs([24] * 4, 4, 2, 16, torch.float32))
    with profile() as prof:
        out_and_grads(lambda a, b, c: kernels.packed_attention_torch(a, b, c, cu, True, method=method), q, k, v, do)
    ops = {e.key for e in prof.key_averages()}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_torch_path_dispatch_and_measured_rule(monkeypatch):
    monkeypatch.setenv("SAILVL_KERNELS", "torch")
    many_short = [0, 7] + list(range(16, 129, 8))             # 16 samples of 7, 9 and 8 in T=128
    few_long = [0, 1000, 2048]
    assert kernels._torch_attention_method(many_short, 4 * 32) == "mask"
    assert kernels._torch_attention_method(list(range(0, 129, 8)), 4 * 32) == "batch"
    assert kernels._torch_attention_method(few_long, 4 * 32) == "loop"
    assert kernels._torch_attention_method([0, 100], 4 * 32) == "loop"   # one sample: no mask
    q, k, v, _, cu = make_inputs([8] * 16, 4, 4, 32, torch.float32)
    out = kernels.packed_attention(q, k, v, cu, True)
    assert max_err(out, naive_attention(q.double(), k.double(), v.double(), cu, True)) < 1e-4


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([0, 10, 20], dtype=torch.int64), "int32"),
    (torch.tensor([0, 10, 19], dtype=torch.int32), "must equal T=20"),
    (torch.tensor([0, 12, 10, 20], dtype=torch.int32), "non-decreasing"),
    (torch.tensor([0, 11, 10, 20], dtype=torch.int32), "non-decreasing"),      # a step back of one
    (torch.tensor([1, 10, 20], dtype=torch.int32), r"cu_seqlens\[0\] must be 0"),
])
def test_bad_cu_seqlens_is_a_clear_error(bad, match):
    q = torch.randn(20, 2, 16)
    with pytest.raises(ValueError, match=match):
        kernels.packed_attention(q, q, q, bad, True)


def test_bad_shapes_are_clear_errors():
    cu = torch.tensor([0, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kernels.packed_attention(torch.randn(20, 3, 16), torch.randn(20, 2, 16),
                                 torch.randn(20, 2, 16), cu, True)
    with pytest.raises(ValueError, match="k and v"):
        kernels.packed_attention(torch.randn(20, 2, 16), torch.randn(20, 2, 8),
                                 torch.randn(20, 2, 8), cu, True)


def test_auto_sends_only_what_the_kernels_handle_to_triton(monkeypatch):
    """SAILVL_KERNELS=auto on a CUDA tensor: Triton for fp32 / bf16 / fp16 with head dim <= 256, the
    torch path for fp64 or a wider head (the Triton path refuses those); =triton always Triton."""
    from types import SimpleNamespace
    on_cuda = SimpleNamespace(is_cuda=True)
    monkeypatch.setenv("SAILVL_KERNELS", "auto")
    assert kernels.use_triton(on_cuda) and not kernels.use_triton(on_cuda, supported=False)
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    assert kernels.use_triton(on_cuda, supported=False)
    monkeypatch.setenv("SAILVL_KERNELS", "auto")
    asked, real = [], kernels.use_triton
    monkeypatch.setattr(kernels, "use_triton",
                        lambda t, supported=True: asked.append(supported) or real(t, supported))
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    for dtype, D in ((torch.float32, 64), (torch.float16, 64), (torch.float64, 64), (torch.float32, 320)):
        q = torch.randn(5, 2, D, dtype=dtype)
        kernels.packed_attention(q, q, q, cu, causal=True)
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 6, 8, dtype=torch.float64)
    kernels.moe_grouped_mlp(x, w, w, w.transpose(1, 2).contiguous(), torch.ones(4, 1, dtype=torch.float64),
                            torch.zeros(4, 1, dtype=torch.long))
    assert asked == [True, True, False, False, False]


def test_the_kernel_choice_refuses_an_unknown_name_and_triton_on_cpu_without_the_interpreter(monkeypatch):
    """SAILVL_KERNELS is auto, triton or torch (a typo is an error, not the torch path); =triton on
    CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1), else a clear error, not a crash."""
    monkeypatch.setenv("SAILVL_KERNELS", "trition")
    with pytest.raises(ValueError, match="auto, triton or torch, got 'trition'"):
        kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(torch.zeros(1))


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_a_given_softmax_scale_is_used(monkeypatch, path):
    """packed_attention(..., scale=s) computes softmax(q k^T s) v on both paths (ViT and LLM pass their
    own), not the default D^-0.5: out and grads against the naive reference at s = 0.37 (D = 16:
    default 0.25)."""
    monkeypatch.setenv("SAILVL_KERNELS", path)
    q, k, v, do, cu = make_inputs([1, 40, 17], 2, 1, 16, torch.float32, seed=5)
    got = out_and_grads(lambda a, b, c: kernels.packed_attention(a, b, c, cu, True, scale=0.37), q, k, v, do)
    want = out_and_grads(lambda a, b, c: naive_attention(a, b, c, cu, True, scale=0.37),
                         q.double(), k.double(), v.double(), do.double())
    for name, t, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert max_err(t, r) < 1e-4, f"{name}: max err {max_err(t, r):.2e}"


def test_the_block_table_is_rebuilt_when_cu_seqlens_changes_in_place(monkeypatch):
    """The Triton path remembers its block table for the last cu_seqlens tensor; the same tensor
    written in place (same object and address, new boundaries) gets a new table: the second call
    matches the naive reference at the new boundaries."""
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    q, k, v, _, _ = make_inputs([32, 64], 2, 1, 16, torch.float32, seed=6)
    cu = torch.tensor([0, 32, 96], dtype=torch.int32, device=q.device)
    with torch.no_grad():
        kernels.packed_attention(q, k, v, cu, True)
        cu[1] = 70
        out = kernels.packed_attention(q, k, v, cu, True)
        assert max_err(out, naive_attention(q.double(), k.double(), v.double(), cu, True)) < 1e-4


def test_the_triton_path_runs_under_inference_mode(monkeypatch):
    """Generation encodes images under torch.inference_mode(), where the ViT makes its cu_seqlens: an
    inference tensor has no version counter to key the block-table memo on (reading it raised). The
    output matches the naive reference, also with the same tensor edited in place between calls."""
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    q, k, v, _, _ = make_inputs([32, 64], 2, 1, 16, torch.float32, seed=7)
    with torch.inference_mode():
        cu = torch.tensor([0, 32, 96], dtype=torch.int32, device=q.device)
        for boundary in (32, 70):
            cu[1] = boundary
            out = kernels.packed_attention(q, k, v, cu, False)
            assert max_err(out, naive_attention(q.double(), k.double(), v.double(), cu, False)) < 1e-4


def test_a_launch_context_makes_its_tensors_cuda_device_current():
    """Triton launches on the current CUDA device, not the tensors': with tensors on cuda:1 under a
    current device 0 the kernels would run on GPU 0 with GPU 1's memory. _device_context makes the
    tensors' device current (checked on a stand-in, since this machine has none)."""
    from types import SimpleNamespace
    ctx = kernels._device_context(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1


def test_every_launch_runs_with_its_tensors_device_current(monkeypatch, launch_contexts):
    """The forward's and the backward's launches each run inside _device_context of their inputs."""
    monkeypatch.setenv("SAILVL_KERNELS", "triton")
    q, k, v, do, cu = make_inputs([20, 37], 4, 2, 16, torch.float32, seed=3)
    (seen, inside), launch, launched = launch_contexts, kernels._attn_launch, []
    monkeypatch.setattr(kernels, "_attn_launch", lambda *a: (launched.append(len(inside)), launch(*a))[1])
    out, *_ = out_and_grads(lambda q, k, v: kernels.packed_attention(q, k, v, cu, True), q, k, v, do)
    assert [(t.shape, t.requires_grad) for t in seen] == [(q.shape, True), (do.shape, False)]  # q, then dO
    assert launched == [1, 1, 1]                                     # fwd, dkdv, dq: each inside one
    assert max_err(out, naive_attention(q.double(), k.double(), v.double(), cu, True)) < 1e-4
