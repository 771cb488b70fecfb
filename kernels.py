"""Hand-written kernels of SAIL-VL2's training stack (paper §5.1 packed attention, §5.2 fused MoE).

Two kernel families, each with a plain-torch reference that is both the CPU path and the test
oracle:

  packed_attention(q, k, v, cu_seqlens, causal)   varlen (stream-packed) attention, §5.1
  moe_grouped_mlp(x, w_gate, w_up, w_down, topk_weights, topk_ids)
                                                  grouped-GEMM expert SwiGLU, §5.2

Contents, in order: dispatch (`use_triton`); packed attention (checks, torch path, Triton kernels
forward and backward, `packed_attention`); MoE expert SwiGLU (torch reference, Triton kernels K1,
K2 and B1-B4, `moe_grouped_mlp`). Correctness lives in tests/: test_kernels_attention.py and
test_kernels_moe.py (CPU under TRITON_INTERPRET=1, or CUDA) and test_kernels_gpu.py (the compiled
kernels at realistic sizes; skipped without CUDA). Speed against the baselines (SDPA, flex_attention,
torch's varlen attention, the HF-v4 expert loop, sort + torch._grouped_mm):
`python tests/bench.py attention|moe`.

Backend choice: env SAILVL_KERNELS=auto|triton|torch (auto: Triton on CUDA tensors, torch
elsewhere). With TRITON_INTERPRET=1 and SAILVL_KERNELS=triton the Triton kernels run on CPU
tensors; that is how CI tests them.
"""
import contextlib
import functools
import os
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# dispatch

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what the Triton kernels compute in
ATTN_MAX_HEAD_DIM = 256                                           # the attention kernel's widest head


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor, supported: bool = True) -> bool:
    """Whether the Triton path should run for tensor `t` (read from the env at call time). `auto`
    takes it only where the kernels handle the input (`supported`: dtype, head dim), else the torch
    path; `triton` always does, and the Triton path refuses what it cannot handle."""
    choice = os.environ.get("SAILVL_KERNELS", "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"SAILVL_KERNELS must be auto, triton or torch, got {choice!r}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not t.is_cuda and not _interpreting():
            raise RuntimeError("SAILVL_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.is_cuda and supported


def _device_context(t: torch.Tensor):
    """The context a launch on `t` runs in: its CUDA device current. Triton launches on the current
    device and its stream, not the tensors': tensors on cuda:1 under a current device 0 (a tool
    given --device cuda:1) would run on GPU 0 with GPU 1's memory."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _on_device_of_inputs(fn):
    """fn(*args) with its first tensor argument's device current (see _device_context)."""
    @functools.wraps(fn)
    def launch(*args):
        with _device_context(next(a for a in args if isinstance(a, torch.Tensor))):
            return fn(*args)
    return launch


# ----------------------------------------------------------------------------------------------
# packed (varlen) attention, paper §5.1: samples packed in one row never attend to each other
#
# Three implementations of one function, out = packed_attention(q, k, v, cu_seqlens, causal):
#   * a per-sample SDPA loop and a single SDPA with a block-diagonal mask (the torch path; the
#     faster one is picked by a measured rule, `_torch_attention_method`);
#   * a hand-written Triton flash attention (FA2 online softmax in base 2) forward and backward
#     over cu_seqlens, `_PackedAttentionFn`.
# Shapes: q (T, H, D), k/v (T, Hkv, D) with H % Hkv == 0 (GQA: query head h reads kv head
# h // (H // Hkv)), cu_seqlens int32 (n+1,) with cu[0] = 0, cu[-1] = T, non-decreasing.

def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int):
    """Raise a clear error unless cu_seqlens is a valid int32 (n+1,) prefix sum ending at `total`.

    Reads the values (a device sync on CUDA): packed_attention calls it only for CPU tensors; a
    training pack's are checked once, on the host, before it moves to the GPU (train_stage.to_device),
    and the ViT's per-image boundaries are made from the images' own sizes.
    """
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"packed_attention: cu_seqlens must be a 1-D int32 tensor (n+1,), got "
                         f"dtype {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"packed_attention: cu_seqlens[0] must be 0, got {cu[0]}")
    if cu[-1] != total:
        raise ValueError(f"packed_attention: cu_seqlens[-1] must equal T={total} (q.shape[0]), got {cu[-1]}")
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        if b < a:
            raise ValueError(f"packed_attention: cu_seqlens must be non-decreasing, got "
                             f"cu_seqlens[{i}]={a} > cu_seqlens[{i + 1}]={b}")


def _check_attention_inputs(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"packed_attention: q, k, v must be (T, heads, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"packed_attention: k and v must both be (T={T}, Hkv, D={D}); got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"packed_attention: query heads ({H}) must be a multiple of kv heads "
                         f"({k.shape[1]}) for GQA")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"packed_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"packed_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")


# --- torch path: per-sample SDPA, or one SDPA with a block-diagonal mask ----------------------

def _sdpa(q, k, v, mask, causal, scale, gqa):
    """SDPA on 4-D (batch, heads, L, D) inputs: on CPU only 4-D inputs reach the flash kernel
    (3-D ones run the math path, which materialises the (L, L) scores: 4.8x slower forward and
    backward at L = 2000); GQA by SDPA's enable_gqa (query head h reads kv head h // (H // Hkv))."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=gqa)


def _packed_attention_loop(q, k, v, bounds, causal, scale):
    """One SDPA call per sample. bounds: cu_seqlens as a Python list."""
    H, Hkv = q.shape[1], k.shape[1]
    outs = []
    # split (not slicing): its backward concatenates the per-sample grads once, where each slice's
    # backward would materialise a full-size zero tensor
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    head = [bounds[0]] if bounds[0] > 0 else []
    tail = [q.shape[0] - bounds[-1]] if bounds[-1] < q.shape[0] else []
    parts = [t.split(head + lens + tail, 0)[len(head):len(head) + len(lens)] for t in (q, k, v)]
    for qi, ki, vi in zip(*parts):
        if qi.shape[0] == 0:
            continue
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (qi, ki, vi))   # (1, H|Hkv, L, D): 4-D, see _sdpa
        outs.append(_sdpa(qi, ki, vi, None, causal, scale, Hkv != H)[0].transpose(0, 1))   # (L, H, D)
    return torch.cat(outs, 0) if outs else torch.empty_like(q)


def _packed_attention_batched(q, k, v, bounds, causal, scale):
    """Samples of one length L (fixed-size image tiles, video frames): the pack is a (n, L) batch,
    one SDPA call over (n, H, L, D) with no mask, the loop's arithmetic without its n calls."""
    n, H, Hkv, D = len(bounds) - 1, q.shape[1], k.shape[1], q.shape[2]
    L = bounds[1] - bounds[0]
    qb, kb, vb = (t.reshape(n, L, t.shape[1], D).transpose(1, 2) for t in (q, k, v))   # (n, heads, L, D)
    out = _sdpa(qb, kb, vb, None, causal, scale, Hkv != H)
    return out.transpose(1, 2).reshape(n * L, H, D)


def _block_diagonal_mask(lengths, causal: bool, device):
    """(T, T) bool: query row i may see key j (same sample, and j <= i when causal)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))              # (T,)
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    return mask


def _packed_attention_masked(q, k, v, bounds, causal, scale):
    """One SDPA call over the whole pack with a (T, T) block-diagonal (and causal) boolean mask."""
    H, Hkv = q.shape[1], k.shape[1]
    mask = _block_diagonal_mask([e - s for s, e in zip(bounds[:-1], bounds[1:])], causal, q.device)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))          # (1, heads, T, D)
    if Hkv != H:    # kv heads repeated: CUDA's kernel that takes a mask (memory-efficient) takes no enable_gqa
        kh, vh = (t.repeat_interleave(H // Hkv, dim=1) for t in (kh, vh))
    return _sdpa(qh, kh, vh, mask, causal, scale, False)[0].transpose(0, 1)   # (T, H, D)


# When is one masked SDPA faster than a loop of per-sample SDPAs? Measured on the 2-core CPU dev
# box (fp32, causal, forward+backward, 1 thread, min of 5 runs, random sample lengths; H*D =
# heads * dim), both through SDPA's flash kernel (4-D inputs, `_sdpa`):
#      T    n  H*D | loop ms  mask ms  mask/loop
#    128    4  128 |    0.72     0.71       0.99
#    128   16  512 |    1.92     2.15       1.12
#    128   32  128 |    2.18     0.71       0.32
#    512   16  128 |    2.29     8.08       3.53
#    512   64  128 |    4.76     8.17       1.72
#    512   64  512 |    8.66    35.19       4.06
#   2048   16  512 |   80.09   522.11       6.52
#   2048  128  128 |   11.99   134.11      11.19
# Cost model: loop ~ n * c0 + c1 * H*D * sum L^2 (c0 ~ 0.065 ms of per-call overhead), mask ~
# c1 * H*D * T^2 (it computes the whole square), c1 ~ 0.25 ns; so the mask wins when
# n * c0 / c1 = n * 2.6e5 > H*D * (T^2 - sum L^2). Over 30 measured (T, n, H*D) cases (T 128 to
# 1024, n 4 to 64, H*D 128 and 512) this rule picked the faster variant every time.
# `python tests/bench.py attention` on a CPU machine prints the comparison again (its flags
# --total, --lengths, --heads, --dim set the shape).
_MASK_OVERHEAD_PER_SAMPLE = 2.6e5    # c0 / c1 in units of H*D*L^2
_MASK_MAX_T = 4096                   # the (T, T) mask and SDPA's scores grow as T^2


def _torch_attention_method(bounds, heads_x_dim: int) -> str:
    """'batch' when every sample has one length (the loop's work in one call), else 'mask' or
    'loop', the faster for these cu_seqlens (measured rule above)."""
    T, n = bounds[-1], len(bounds) - 1
    if n > 1 and bounds[0] == 0 and len({e - s for s, e in zip(bounds[:-1], bounds[1:])}) == 1:
        return "batch"
    if n <= 1 or T > _MASK_MAX_T:
        return "loop"
    sum_sq = sum((e - s) ** 2 for s, e in zip(bounds[:-1], bounds[1:]))
    return "mask" if n * _MASK_OVERHEAD_PER_SAMPLE > heads_x_dim * (T * T - sum_sq) else "loop"


def packed_attention_torch(q, k, v, cu_seqlens, causal: bool, scale=None, method=None):
    """Reference and CPU path. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    method: 'loop' (one SDPA per sample), 'mask' (one SDPA with a block-diagonal mask), 'batch'
    (samples of one length as a batch) or None (pick, `_torch_attention_method`).
    """
    bounds = cu_seqlens.tolist()
    variants = {"loop": _packed_attention_loop, "mask": _packed_attention_masked, "batch": _packed_attention_batched}
    if method is None:                    # picked per call (every layer): the rule is checked once
        return variants[_torch_attention_method(bounds, q.shape[1] * q.shape[2])](q, k, v, bounds, causal, scale)
    if method not in variants or (method == "batch" and _torch_attention_method(bounds, 1) != "batch"):
        raise ValueError(f"packed_attention_torch: method must be 'loop', 'mask', 'batch' (samples of one "
                         f"length) or None, got {method!r}")
    return variants[method](q, k, v, bounds, causal, scale)


# --- Triton path: flash attention over cu_seqlens (FA2 online softmax, exp2) -----------------
#
# Work split. The pack is cut into CHUNK-row blocks that never straddle a sample (a sample of
# length L owns ceil(L / CHUNK) blocks); `_attn_block_table` lists them as (sample, block) pairs
# on the device (no host sync) so the grid has no program per (sample, max_len) slot that would
# sit idle. The table is sorted heaviest-first (causal: late query blocks; for dk/dv: early key
# blocks) so that the long programs start first. Each kernel splits a CHUNK block into
# CHUNK / BLOCK sub-blocks with grid axis 1, so autotuning may change the tile without changing
# the table. Grid = (heads, sub-blocks, table entries): the heads of one block run side by side
# (GQA heads that share k/v are neighbours, good for L2).
#
# Inside a sample, the key loop of a query tile is split into blocks that need no mask (wholly
# before the diagonal, wholly inside the sample) and the few that do (diagonal, sample end): the
# masked variant is the same code with MASKED=True.
#
# Numerics: scores in base 2 (qk_scale = scale * log2 e), fp32 accumulators, LSE stored per row
# (log2 units) for the backward; bf16/fp16 tiles go to tl.dot as they are (tensor cores, fp32
# accumulate). Under TRITON_INTERPRET=1 every load is upcast to fp32 first (UPCAST) because the
# interpreter's bf16 arithmetic is silently wrong (Triton issue #4972: the interpreter stores bf16 as uint16 bits). Row offsets are int64
# (bos * stride, pointer increments), so T * H * D may exceed 2^31.
#
# Backward: delta = rowsum(o * do) (a small kernel), then two kernels without atomics (hence
# deterministic): dk/dv per key tile, looping over the query tiles of its sample and over the
# GROUP query heads that share the kv head (so dk/dv are summed over the GQA group in registers),
# and dq per query tile, looping over its keys.

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_load(ptrs, mask, USE_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """Load a tile (masked only when needed), upcast to fp32 under the interpreter."""
    if USE_MASK:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, q_rows, offs_n, d_ok,
                    lo, hi, L, qk_scale,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi) of one sample; k/v pointers start at row lo."""
    for start in range(lo, hi, BLOCK_N):
        kv_rows = start + offs_n                                             # (BN,) in-sample
        kv_ok = kv_rows < L
        kT = _attn_load(k_ptrs, kv_ok[None, :] & d_ok[:, None], MASKED or not EVEN_D, UPCAST)
        qk = tl.dot(q, kT, input_precision=PRECISION)                        # (BM, BN) unscaled
        if MASKED:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (q_rows[:, None] >= kv_rows[None, :])
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)                    # (BM,) log2 units
        alpha = tl.math.exp2(m_i - m_new)                                    # rescale old terms
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])                     # (BM, BN), one FMA
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _attn_load(v_ptrs, kv_ok[:, None] & d_ok[None, :], MASKED or not EVEN_D, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU, TABLE,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ot, stride_oh, T, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one sample, one query head -> O rows and their LSE."""
    h = tl.program_id(0)
    sub = tl.program_id(1)
    entry = tl.program_id(2)
    sample = tl.load(TABLE + 2 * entry)
    if sample < 0:                                                           # table padding
        return
    bos = tl.load(CU + sample)
    L = tl.load(CU + sample + 1) - bos
    m0 = tl.load(TABLE + 2 * entry + 1) * CHUNK + sub * BLOCK_M              # first row, in-sample
    if m0 >= L:
        return
    bos64 = bos.to(tl.int64)
    kvh = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = m0 + offs_m
    q_ok = q_rows < L
    q_ptrs = (Q + (bos64 + m0) * stride_qt + h * stride_qh
              + offs_m[:, None] * stride_qt + offs_d[None, :])
    q = _attn_load(q_ptrs, q_ok[:, None] & d_ok[None, :], True, UPCAST)      # (BM, BD)

    k_base = K + bos64 * stride_kt + kvh * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None]
    v_base = V + bos64 * stride_vt + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, L)
        full_hi = (m0 // BLOCK_N) * BLOCK_N          # key tiles wholly left of the diagonal
    else:
        hi = L
        full_hi = (L // BLOCK_N) * BLOCK_N           # key tiles wholly inside the sample
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile gives no NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt,
                                    q_rows, offs_n, d_ok, 0, full_hi, L, qk_scale,
                                    BLOCK_N, CAUSAL, False, EVEN_D, UPCAST, PRECISION)
    lo64 = full_hi.to(tl.int64)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base + lo64 * stride_kt,
                                    v_base + lo64 * stride_vt, stride_kt, stride_vt,
                                    q_rows, offs_n, d_ok, full_hi, hi, L, qk_scale,
                                    BLOCK_N, CAUSAL, True, EVEN_D, UPCAST, PRECISION)
    o = acc / l_i[:, None]
    o_ptrs = (O + (bos64 + m0) * stride_ot + h * stride_oh
              + offs_m[:, None] * stride_ot + offs_d[None, :])
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h.to(tl.int64) * T + bos64 + q_rows, m_i + tl.math.log2(l_i), mask=q_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, T,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d o[t, h, d] * do[t, h, d] (fp32), the softmax-backward row term."""
    h = tl.program_id(0)
    rows = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt,
                         stride_dot, kv_rows, offs_m, d_ok, lo, hi, L, qk_scale,
                         BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                         EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dk, dv (BN, BD) of one key tile over query tiles [lo, hi) (transposed: P^T)."""
    for start in range(lo, hi, BLOCK_M):
        q_rows = start + offs_m                                              # (BM,) in-sample
        q_ok = q_rows < L
        qT = _attn_load(qT_ptrs, q_ok[None, :] & d_ok[:, None], MASKED or not EVEN_D, UPCAST)
        do = _attn_load(do_ptrs, q_ok[:, None] & d_ok[None, :], MASKED or not EVEN_D, UPCAST)
        lse = _attn_load(lse_ptrs, q_ok, MASKED, False)                      # (BM,) log2 units
        delta = _attn_load(delta_ptrs, q_ok, MASKED, False)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            ok = q_ok[None, :]
            if CAUSAL:
                ok = ok & (q_rows[None, :] >= kv_rows[:, None])
            pT = tl.where(ok, pT, 0.0)                                       # (BN, BM)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)            # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
        qT_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, TABLE,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                          T, qk_scale, sm_scale,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          EVEN_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr):
    """One program: BLOCK_N key rows of one sample, one kv head -> dk, dv summed over its GROUP."""
    kvh = tl.program_id(0)
    sub = tl.program_id(1)
    entry = tl.program_id(2)
    sample = tl.load(TABLE + 2 * entry)
    if sample < 0:
        return
    bos = tl.load(CU + sample)
    L = tl.load(CU + sample + 1) - bos
    n0 = tl.load(TABLE + 2 * entry + 1) * CHUNK + sub * BLOCK_N
    if n0 >= L:
        return
    bos64 = bos.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_rows = n0 + offs_n
    kv_mask = (kv_rows < L)[:, None] & d_ok[None, :]
    k = _attn_load(K + (bos64 + n0) * stride_kt + kvh * stride_kh
                   + offs_n[:, None] * stride_kt + offs_d[None, :], kv_mask, True, UPCAST)
    v = _attn_load(V + (bos64 + n0) * stride_vt + kvh * stride_vh
                   + offs_n[:, None] * stride_vt + offs_d[None, :], kv_mask, True, UPCAST)
    # query tiles of the sample that see this key tile: [diag_lo, diag_hi) straddle the diagonal
    # (masked), [diag_hi, full_hi) are whole tiles past it, [full_hi, L) is the partial last one
    if CAUSAL:
        diag_lo = (n0 // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(n0 + BLOCK_N, BLOCK_M) * BLOCK_M, L)
    else:
        diag_lo = tl.cast(0, tl.int32)
        diag_hi = tl.cast(0, tl.int32)
    full_hi = diag_hi + ((L - diag_hi) // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):                                   # the query heads sharing this kv head
        h = kvh * GROUP + g
        qT_base = (Q + bos64 * stride_qt + h * stride_qh
                   + offs_m[None, :] * stride_qt + offs_d[:, None])                # (BD, BM)
        do_base = (DO + bos64 * stride_dot + h * stride_doh
                   + offs_m[:, None] * stride_dot + offs_d[None, :])               # (BM, BD)
        lse_base = LSE + h.to(tl.int64) * T + bos64 + offs_m
        delta_base = DELTA + h.to(tl.int64) * T + bos64 + offs_m
        if CAUSAL:
            lo64 = diag_lo.to(tl.int64)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_base + lo64 * stride_qt,
                                          do_base + lo64 * stride_dot, lse_base + lo64,
                                          delta_base + lo64, stride_qt, stride_dot, kv_rows, offs_m,
                                          d_ok, diag_lo, diag_hi, L, qk_scale,
                                          BLOCK_M, CAUSAL, True, EVEN_D, UPCAST, PRECISION)
        lo64 = diag_hi.to(tl.int64)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_base + lo64 * stride_qt,
                                      do_base + lo64 * stride_dot, lse_base + lo64,
                                      delta_base + lo64, stride_qt, stride_dot, kv_rows, offs_m,
                                      d_ok, diag_hi, full_hi, L, qk_scale,
                                      BLOCK_M, CAUSAL, False, EVEN_D, UPCAST, PRECISION)
        lo64 = full_hi.to(tl.int64)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qT_base + lo64 * stride_qt,
                                      do_base + lo64 * stride_dot, lse_base + lo64,
                                      delta_base + lo64, stride_qt, stride_dot, kv_rows, offs_m,
                                      d_ok, full_hi, L, L, qk_scale,
                                      BLOCK_M, CAUSAL, True, EVEN_D, UPCAST, PRECISION)
    dk = dk * sm_scale
    dk_ptrs = (DK + (bos64 + n0) * stride_dkt + kvh * stride_dkh
               + offs_n[:, None] * stride_dkt + offs_d[None, :])
    dv_ptrs = (DV + (bos64 + n0) * stride_dvt + kvh * stride_dvh
               + offs_n[:, None] * stride_dvt + offs_d[None, :])
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt,
                       q_rows, offs_n, d_ok, lo, hi, L, qk_scale,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                       EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dq (BM, BD) of one query tile over key tiles [lo, hi)."""
    for start in range(lo, hi, BLOCK_N):
        kv_rows = start + offs_n
        kv_ok = kv_rows < L
        kT = _attn_load(kT_ptrs, kv_ok[None, :] & d_ok[:, None], MASKED or not EVEN_D, UPCAST)
        vT = _attn_load(vT_ptrs, kv_ok[None, :] & d_ok[:, None], MASKED or not EVEN_D, UPCAST)
        p = tl.math.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (q_rows[:, None] >= kv_rows[None, :])
            p = tl.where(ok, p, 0.0)                                         # (BM, BN)
        dp = tl.dot(do, vT, input_precision=PRECISION)                       # (BM, BN)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
        kT_ptrs += BLOCK_N * stride_kt
        vT_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, TABLE,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dqt, stride_dqh,
                        T, qk_scale, sm_scale,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        EVEN_D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one sample, one query head -> dq rows."""
    h = tl.program_id(0)
    sub = tl.program_id(1)
    entry = tl.program_id(2)
    sample = tl.load(TABLE + 2 * entry)
    if sample < 0:
        return
    bos = tl.load(CU + sample)
    L = tl.load(CU + sample + 1) - bos
    m0 = tl.load(TABLE + 2 * entry + 1) * CHUNK + sub * BLOCK_M
    if m0 >= L:
        return
    bos64 = bos.to(tl.int64)
    kvh = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = m0 + offs_m
    q_ok = q_rows < L
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = _attn_load(Q + (bos64 + m0) * stride_qt + h * stride_qh
                   + offs_m[:, None] * stride_qt + offs_d[None, :], q_mask, True, UPCAST)
    do = _attn_load(DO + (bos64 + m0) * stride_dot + h * stride_doh
                    + offs_m[:, None] * stride_dot + offs_d[None, :], q_mask, True, UPCAST)
    lse = tl.load(LSE + h.to(tl.int64) * T + bos64 + q_rows, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + h.to(tl.int64) * T + bos64 + q_rows, mask=q_ok, other=0.0)
    kT_base = (K + bos64 * stride_kt + kvh * stride_kh
               + offs_n[None, :] * stride_kt + offs_d[:, None])                     # (BD, BN)
    vT_base = (V + bos64 * stride_vt + kvh * stride_vh
               + offs_n[None, :] * stride_vt + offs_d[:, None])
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, L)
        full_hi = (m0 // BLOCK_N) * BLOCK_N
    else:
        hi = L
        full_hi = (L // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_base, vT_base, stride_kt, stride_vt,
                            q_rows, offs_n, d_ok, 0, full_hi, L, qk_scale,
                            BLOCK_N, CAUSAL, False, EVEN_D, UPCAST, PRECISION)
    lo64 = full_hi.to(tl.int64)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kT_base + lo64 * stride_kt,
                            vT_base + lo64 * stride_vt, stride_kt, stride_vt,
                            q_rows, offs_n, d_ok, full_hi, hi, L, qk_scale,
                            BLOCK_N, CAUSAL, True, EVEN_D, UPCAST, PRECISION)
    dq = dq * sm_scale
    dq_ptrs = (DQ + (bos64 + m0) * stride_dqt + h * stride_dqh
               + offs_m[:, None] * stride_dqt + offs_d[None, :])
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)


# Tiles. CHUNK is the table's block (every BLOCK_M / BLOCK_N below divides it). Under the
# interpreter the tiles are tiny and deliberately unequal (BLOCK_N > BLOCK_M in dq, the reverse
# in the forward) so that CPU tests walk every diagonal / partial-tile path with T ~ 200.
_ATTN_CHUNK_GPU = 128
_ATTN_INTERPRET = dict(chunk=32, fwd=(32, 16), dkdv=(32, 16), dq=(16, 32))  # (BLOCK_M, BLOCK_N)


def _attn_gpu_configs(kind: str, head_dim: int):
    """A small autotune set per kernel and head-dim class: (BLOCK_M, BLOCK_N, warps, stages).

    'fwd' and 'dq': BLOCK_M query rows per program, BLOCK_N keys per step; 'dkdv': BLOCK_N key
    rows per program, BLOCK_M queries per step. Chosen from a wider set compiled ahead of time for
    sm_90 with Triton 3.6 and 3.9 (ptxas -v): only tiles with no register spills and <= 160 KB
    of shared memory are kept (e.g. dkdv 64x64 with 4 warps spills ~800 B at D=128: dk and dv
    accumulate in registers). The first entry is the FA2-like default.
    """
    tiles = {
        ("fwd", "small"): [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
        ("fwd", "d128"): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        ("fwd", "large"): [(64, 32, 8, 2), (128, 32, 8, 2)],
        ("dq", "small"): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        ("dq", "d128"): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
        ("dq", "large"): [(32, 32, 4, 2), (64, 32, 8, 2)],
        ("dkdv", "small"): [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
        ("dkdv", "d128"): [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3)],
        ("dkdv", "large"): [(32, 32, 8, 2)],
    }[kind, _attn_dim_class(head_dim)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in tiles]


def _attn_dim_class(head_dim: int) -> str:
    return "small" if head_dim <= 64 else "d128" if head_dim <= 128 else "large"


_attn_tuned_cache = {}


def _attn_tuned(kernel, kind: str, head_dim: int):
    """The autotuned wrapper of `kernel` for this head-dim class (built on first use, GPU only)."""
    key = (kind, _attn_dim_class(head_dim))
    if key not in _attn_tuned_cache:
        _attn_tuned_cache[key] = triton.autotune(
            configs=_attn_gpu_configs(kind, head_dim), key=["HEAD_DIM", "GROUP", "CAUSAL"])(kernel)
    return _attn_tuned_cache[key]


def _attn_launch(kernel, kind, grid_of, args, consts, head_dim):
    """Launch with fixed interpreter tiles, or through the autotuner on a GPU.
    grid_of(BLOCK_M, BLOCK_N) -> grid; consts: the constexprs other than the tiles."""
    if _interpreting():
        bm, bn = _ATTN_INTERPRET[kind]
        kernel[grid_of(bm, bn)](*args, CHUNK=_ATTN_INTERPRET["chunk"], BLOCK_M=bm, BLOCK_N=bn,
                                UPCAST=True, **consts)
    else:
        tuned = _attn_tuned(kernel, kind, head_dim)
        tuned[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](
            *args, CHUNK=_ATTN_CHUNK_GPU, UPCAST=False, **consts)


def _attn_chunk() -> int:
    return _ATTN_INTERPRET["chunk"] if _interpreting() else _ATTN_CHUNK_GPU


def _attn_block_table(cu_seqlens, total: int, chunk: int, causal: bool):
    """(sample, block) pairs of the pack, on the device, heaviest first; padded with sample -1.

    Returns (table_q, table_kv), int32 (G, 2) each: the order for query-tile kernels (fwd, dq)
    and for key-tile kernels (dkdv). G = floor((T + n (chunk - 1)) / chunk) >= sum ceil(L_i /
    chunk) is known without reading cu_seqlens, so building the table needs no host sync.
    """
    n = cu_seqlens.numel() - 1
    G = (total + n * (chunk - 1)) // chunk
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()                # (n,)
    nblocks = (lengths + chunk - 1) // chunk                             # (n,)
    ends = nblocks.cumsum(0)                                             # (n,) last block + 1
    j = torch.arange(G, device=cu_seqlens.device)
    sample = torch.searchsorted(ends, j, right=True)                     # (G,) owning sample
    valid = sample < n
    sample = sample.clamp_max(n - 1)
    block = j - (ends - nblocks)[sample]                                 # (G,) block in sample
    nb = nblocks[sample]
    # work of a query tile: causal ~ block + 1, else ~ sample blocks; of a key tile: nb - block
    key_q = torch.where(valid, block if causal else nb, -1)
    key_kv = torch.where(valid, nb - block if causal else nb, -1)
    pairs = torch.stack([torch.where(valid, sample, -1), block], 1).to(torch.int32)  # (G, 2)
    table_q = pairs[torch.argsort(key_q, descending=True)].contiguous()
    table_kv = pairs[torch.argsort(key_kv, descending=True)].contiguous()
    return table_q, table_kv


_attn_table_memo = {}  # causal -> (weakref to cu_seqlens, key, tables): the last pack seen


def _attn_block_table_cached(cu_seqlens, total: int, chunk: int, causal: bool):
    """`_attn_block_table`, remembered for the last cu_seqlens tensor (per causal flag).

    Every layer of a step passes the same cu_seqlens tensor, so the table is built once per step,
    as FlexAttention builds one BlockMask per batch. An in-place edit of the tensor bumps its
    version and rebuilds. A tensor made under torch.inference_mode() (generation's image encoding)
    has no version to read: its table is built each call.
    """
    if cu_seqlens.is_inference():
        return _attn_block_table(cu_seqlens, total, chunk, causal)
    key = (total, chunk, cu_seqlens.data_ptr(), cu_seqlens._version, str(cu_seqlens.device))
    memo = _attn_table_memo.get(causal)
    if memo is not None and memo[0]() is cu_seqlens and memo[1] == key:
        return memo[2]
    tables = _attn_block_table(cu_seqlens, total, chunk, causal)
    _attn_table_memo[causal] = (weakref.ref(cu_seqlens), key, tables)
    return tables


def _attn_store_dtype(dtype):
    """The dtype the kernels write: fp32 under TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates
    where a GPU rounds, and torch rounds after; the CPU tests then hold the kernel's error vs fp32
    to ~2x PyTorch-bf16's (the FlashAttention tests' rule) with like-for-like rounding."""
    return torch.float32 if _interpreting() else dtype


@_on_device_of_inputs
def _attn_forward(q, k, v, cu, table_q, causal, scale):
    T, H, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty(T, H, D, dtype=_attn_store_dtype(q.dtype), device=q.device)
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)   # log2 units
    chunk = _attn_chunk()
    BLOCK_D = max(16, triton.next_power_of_2(D))
    consts = dict(GROUP=H // Hkv, HEAD_DIM=D, BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D, CAUSAL=causal,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    args = (q, k, v, o, lse, cu, table_q, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), o.stride(0), o.stride(1), T, scale * _LOG2E)
    _attn_launch(_attn_fwd_kernel, "fwd", lambda bm, bn: (H, chunk // bm, table_q.shape[0]), args, consts, D)
    return o.to(q.dtype), lse


@_on_device_of_inputs
def _attn_backward(do, q, k, v, o, lse, cu, table_q, table_kv, causal, scale):
    T, H, D = q.shape
    Hkv = k.shape[1]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    delta = torch.empty(H, T, dtype=torch.float32, device=q.device)
    BLOCK_T = 64
    _attn_bwd_delta_kernel[(H, triton.cdiv(T, BLOCK_T))](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T)
    dq, dk, dv = (torch.empty(t.shape, dtype=_attn_store_dtype(t.dtype), device=t.device)
                  for t in (q, k, v))
    chunk = _attn_chunk()
    consts = dict(GROUP=H // Hkv, HEAD_DIM=D, BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D, CAUSAL=causal,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              do.stride(0), do.stride(1))
    args = (q, k, v, do, lse, delta, dk, dv, cu, table_kv, *common,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), T, scale * _LOG2E, scale)
    _attn_launch(_attn_bwd_dkdv_kernel, "dkdv",
                 lambda bm, bn: (Hkv, chunk // bn, table_kv.shape[0]), args, consts, D)
    args = (q, k, v, do, lse, delta, dq, cu, table_q, *common, dq.stride(0), dq.stride(1),
            T, scale * _LOG2E, scale)
    _attn_launch(_attn_bwd_dq_kernel, "dq", lambda bm, bn: (H, chunk // bm, table_q.shape[0]),
                 args, consts, D)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _PackedAttentionFn(torch.autograd.Function):
    """Triton packed attention with its own backward (dq, dk, dv; dk/dv summed over GQA groups)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        cu = cu_seqlens.contiguous()
        table_q, table_kv = _attn_block_table_cached(cu, q.shape[0], _attn_chunk(), causal)
        o, lse = _attn_forward(q, k, v, cu, table_q, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu, table_q, table_kv)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu, table_q, table_kv = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, cu, table_q, table_kv, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def packed_attention_triton(q, k, v, cu_seqlens, causal: bool, scale=None):
    """The Triton flash-attention path (CUDA, or CPU under TRITON_INTERPRET=1); differentiable."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"packed_attention: Triton path supports fp32/bf16/fp16, got {q.dtype}")
    if q.shape[-1] > ATTN_MAX_HEAD_DIM:
        raise ValueError(f"packed_attention: Triton path supports head dim <= {ATTN_MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}")
    if q.shape[0] == 0:
        return q.clone()                                  # empty pack: nothing to attend
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _PackedAttentionFn.apply(q, k, v, cu_seqlens, causal, scale)


def packed_attention(q, k, v, cu_seqlens, causal: bool, scale=None):
    """q (T, H, D), k/v (T, Hkv, D), cu_seqlens int32 (n+1,) -> out (T, H, D).

    No token attends across a sample boundary; `causal` for the LLM, bidirectional for the ViT.
    Triton when `use_triton(q)`, else the torch path. cu_seqlens values are validated on CPU
    tensors; a CUDA one is checked by its maker (`check_cu_seqlens` syncs: not once per layer).
    """
    _check_attention_inputs(q, k, v, cu_seqlens)
    if not cu_seqlens.is_cuda:
        check_cu_seqlens(cu_seqlens, q.shape[0])
    if use_triton(q, q.dtype in TRITON_DTYPES and q.shape[-1] <= ATTN_MAX_HEAD_DIM):
        return packed_attention_triton(q, k, v, cu_seqlens, causal, scale)
    return packed_attention_torch(q, k, v, cu_seqlens, causal, scale)


# ----------------------------------------------------------------------------------------------
# MoE grouped expert SwiGLU, paper §5.2 ("optimized kernel fusion for expert operations")
#
# Notation: T tokens, k experts per token, M = T*k (token, expert) pairs, H hidden, I expert
# intermediate size, E experts. Pair p = t*k + j is token t's j-th choice (topk_ids[t, j]).
#
# Triton design (vLLM-style block alignment, ScatterMoE-style gathers, no token copies):
#   routing  : pairs are sorted by expert and each expert's run is padded to a multiple of
#              BLOCK_M, so every BLOCK_M-row block of the "padded sorted" layout belongs to ONE
#              expert. Only indices move: `pair_of_row` (P,) maps a padded row to its pair
#              (sentinel M on padding rows) and `block_expert` (NB,) gives each block's expert
#              (E past the last used block: those programs exit at once). NB is a bound known
#              from shapes alone (M // BLOCK_M + min(E, M)), so nothing syncs with the host.
#   forward  : K1 gate+up: one program per (block, I-tile) loads the gathered x rows once and
#              multiplies them by the expert's gate AND up tiles (two fp32 accumulators), then
#              writes h = silu(g) * u (and g, u for the backward) in the padded sorted layout.
#              K2 down: h @ W_down[e]^T, the router weight multiplied in the epilogue, each row
#              written to its pair's slot of y_pairs (M, H); y = y_pairs.view(T, k, H).sum(1)
#              (a fixed-order reduction: no atomics, bitwise deterministic).
#   backward : B1 (fused): dy rows @ W_down[e] gives d(unweighted h); its epilogue forms the
#              router-weight gradient <dy_t, o_p> = sum_i (dy_t W_down)_i h_i (per-I-tile
#              partials, summed in torch), scales by the router weight and applies the SwiGLU
#              backward -> dgu = [dg, du] (padded sorted layout).
#              B2 dx: dgu @ [W_gate[e]; W_up[e]] written per pair, summed over k like the forward.
#              B3 dW_gate/dW_up and B4 dW_down: one program per (expert, output tile) loops over
#              that expert's contiguous rows (ScatterMoE's groupXtY): no atomics.
#   numerics : loads in the storage dtype, tl.dot with fp32 accumulation, epilogue math in fp32,
#              intermediates (g, u, h, dg, du, per-pair rows) stored in the storage dtype.
#              Under TRITON_INTERPRET=1 every load is upcast to fp32 before arithmetic (the
#              interpreter computes wrong bf16 math, Triton issue #4972), fp32 -> bf16 stores are
#              rounded to nearest even by hand (the interpreter truncates) and a single autotune
#              config is used. All row/token offsets are int64 before they meet a stride.
#   host syncs: none; every grid size and buffer size follows from the shapes alone.

def moe_grouped_mlp_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Reference: sort token-expert pairs by expert, one matmul per expert, weighted scatter-add.

    x (T, H); w_gate, w_up (E, I, H); w_down (E, H, I); topk_weights (T, k); topk_ids (T, k) -> (T, H)
    """
    T, Hd = x.shape
    E = w_gate.shape[0]
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)                          # (T*k,)
    order = torch.argsort(flat_ids, stable=True)             # pairs grouped by expert
    token_of = order // k                                    # (T*k,) source token of each pair
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    xs = x[token_of]                                         # (T*k, H) gathered rows
    outs = []
    for e, xe in enumerate(xs.split(counts)):                # split, not slices: one cat backward
        if xe.shape[0] == 0:
            continue
        h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())  # (n, I)
        outs.append(h @ w_down[e].t())                       # (n, H)
    ys = torch.cat(outs, 0) if outs else xs.new_zeros(0, Hd)
    ys = ys * topk_weights.reshape(-1)[order].unsqueeze(1).to(ys.dtype)
    y = torch.zeros(T, Hd, dtype=ys.dtype, device=x.device)
    y.index_add_(0, token_of, ys)
    return y


def _check_moe_args(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Shape/dtype checks with messages that name the argument (no host sync on GPU)."""
    where = "kernels.moe_grouped_mlp"
    if x.dim() != 2:
        raise ValueError(f"{where}: x must be (T, H), got shape {tuple(x.shape)}")
    T, H = x.shape
    if w_gate.dim() != 3 or w_gate.shape[2] != H:
        raise ValueError(f"{where}: w_gate must be (E, I, H={H}), got {tuple(w_gate.shape)}")
    E, I, _ = w_gate.shape
    if tuple(w_up.shape) != (E, I, H):
        raise ValueError(f"{where}: w_up must be (E, I, H) = {(E, I, H)}, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (E, H, I):
        raise ValueError(f"{where}: w_down must be (E, H, I) = {(E, H, I)}, got {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"{where}: topk_ids must be (T={T}, k), got {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"{where}: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"{where}: topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    if not topk_ids.is_cuda and topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= E):
        raise ValueError(f"{where}: topk_ids must lie in [0, E={E}), got range "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")


def _configs(gpu16, gpu32, interp):
    """Autotune configs: a few bf16/fp16 tiles (tensor cores) and one small fp32 tile (exact fp32
    dots run on FMA units: the 16-bit tiles would spill and take a minute each to compile, seen in
    sm_90 AOT builds); exactly one config under the interpreter (multi-config autotune needs a GPU to benchmark)."""
    if _interpreting():
        return [triton.Config(dict(interp), num_warps=4, num_stages=1)]
    configs = [triton.Config(dict(kw), num_warps=warps, num_stages=stages)
               for kw, warps, stages in gpu16 + gpu32]
    for i, cfg in enumerate(configs):
        cfg.moe_fp32 = i >= len(gpu16)  # the storage dtype this tile is for (`_moe_prune` filters on it)
    return configs


# Row-block kernels (K1, K2, B1, B2): BLOCK_M is fixed by the routing alignment, the rest tunes.
# sm_90 AOT builds of every bf16 tile below: wgmma + cp.async pipelines, no register spills.
_MOE_GATE_UP_CONFIGS = _configs(  # two (BLOCK_M, BLOCK_N) accumulators: keep BLOCK_N moderate
    [(dict(BLOCK_N=128, BLOCK_K=64), 8, 3), (dict(BLOCK_N=64, BLOCK_K=64), 4, 4),
     (dict(BLOCK_N=128, BLOCK_K=32), 8, 4)],
    [(dict(BLOCK_N=32, BLOCK_K=32), 4, 2)],
    dict(BLOCK_N=32, BLOCK_K=32))
_MOE_ROWS_CONFIGS = _configs(
    [(dict(BLOCK_N=128, BLOCK_K=64), 4, 4), (dict(BLOCK_N=256, BLOCK_K=64), 8, 3),
     (dict(BLOCK_N=128, BLOCK_K=64), 8, 3)],
    [(dict(BLOCK_N=64, BLOCK_K=32), 4, 2)],
    dict(BLOCK_N=32, BLOCK_K=32))
# B1 also reads three (BLOCK_M, BLOCK_N) tiles in its epilogue: no 256-wide tiles (register spills).
_MOE_DOWN_BWD_CONFIGS = _configs(
    [(dict(BLOCK_N=128, BLOCK_K=64), 8, 3), (dict(BLOCK_N=64, BLOCK_K=64), 8, 4),
     (dict(BLOCK_N=64, BLOCK_K=128), 8, 3)],
    [(dict(BLOCK_N=32, BLOCK_K=32), 4, 2)],
    dict(BLOCK_N=32, BLOCK_K=32))
# Per-expert weight-gradient kernels (B3, B4): output tile (BLOCK_M, BLOCK_N), rows by BLOCK_K.
_MOE_DW_CONFIGS = _configs(
    [(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3), (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), 4, 4),
     (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 4, 4)],
    [(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 2)],
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16))
_MOE_GROUP_M = 8  # L2 swizzle: this many row blocks share a weight column tile before moving on


_moe_pinned_config = None  # set by `_moe_pin_config` (GPU tests run every config); None: autotune


def _moe_prune(configs, named_args, **kwargs):
    """The configs for this storage dtype (that of the kernel's first pointer): all, or the pinned one."""
    fp32 = next(iter(named_args.values())).dtype == torch.float32
    configs = [c for c in configs if getattr(c, "moe_fp32", fp32) == fp32]
    if _moe_pinned_config is None:
        return configs
    return [configs[min(_moe_pinned_config, len(configs) - 1)]]


_MOE_PRUNE = {"early_config_prune": _moe_prune}


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


@triton.jit
def _moe_cast(v, DT: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> storage dtype DT, rounded to nearest even as the GPU does: the interpreter truncates
    fp32 -> bf16 (a -2.8e-3 relative bias, seen with Triton 3.9), so under it the bits are rounded first."""
    if UPCAST:
        if DT == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            v = b.to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def _moe_row_block(pid, num_m, N, M, pair_ptr, bexp_ptr, TOPK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (column tile, its columns and their validity, expert, padded rows, pairs, row
    validity, source tokens). GROUP_M row blocks sweep a column tile together so the expert's
    weight tile stays in L2."""
    width = GROUP_M * ((N + BLOCK_N - 1) // BLOCK_N)
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.load(bexp_ptr + pid_m).to(tl.int64)                          # E: unused block
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)        # (BM,) padded sorted rows
    pair = tl.load(pair_ptr + rows).to(tl.int64)                        # sentinel M on padding
    row_ok = pair < M
    tok = tl.where(row_ok, pair // TOPK, 0)
    return pid_n, offs_n, offs_n < N, e, rows, pair, row_ok, tok


@triton.jit
def _moe_k_masks(row_ok, n_ok, offs_k, k_left, EVEN_K: tl.constexpr):
    """Load masks of one K step: A (BM, BK) by row, B (BK, BN) by column; K tested unless EVEN_K."""
    if EVEN_K:
        a_mask = row_ok[:, None]
        b_mask = n_ok[None, :]
    else:
        k_ok = offs_k < k_left
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
    return a_mask, b_mask


@triton.autotune(configs=_MOE_GATE_UP_CONFIGS, key=["N", "K", "BLOCK_M"], prune_configs_by=_MOE_PRUNE)
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _moe_gate_up_fwd_kernel(
        x_ptr, wg_ptr, wu_ptr, gu_ptr, h_ptr, pair_ptr, bexp_ptr,
        M, N, K, E, num_m,
        s_xt, s_xk, s_ge, s_gn, s_gk, s_ue, s_un, s_uk, s_gu, s_h,
        TOPK: tl.constexpr, SAVE_GU: tl.constexpr, UPCAST: tl.constexpr, LD: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """K1: g = x W_gate[e]^T, u = x W_up[e]^T on one (row block, I tile); h = silu(g) * u.

    N = I, K = H. Reads x rows by token index; writes gu (P, 2I) = [g | u] and h (P, I).
    """
    pid_n, offs_n, n_ok, e, rows, pair, row_ok, tok = _moe_row_block(
        tl.program_id(0), num_m, N, M, pair_ptr, bexp_ptr, TOPK, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * s_xt + offs_k[None, :] * s_xk                     # (BM, BK)
    g_ptrs = wg_ptr + e * s_ge + offs_n[None, :].to(tl.int64) * s_gn + offs_k[:, None] * s_gk  # (BK, BN)
    u_ptrs = wu_ptr + e * s_ue + offs_n[None, :].to(tl.int64) * s_un + offs_k[:, None] * s_uk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask, b_mask = _moe_k_masks(row_ok, n_ok, offs_k, K - k0, EVEN_K)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(LD)
        bg = tl.load(g_ptrs, mask=b_mask, other=0.0).to(LD)
        bu = tl.load(u_ptrs, mask=b_mask, other=0.0).to(LD)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        a_ptrs += BLOCK_K * s_xk
        g_ptrs += BLOCK_K * s_gk
        u_ptrs += BLOCK_K * s_uk
    out_mask = n_ok[None, :]  # every row of a used block lies inside the (P, .) buffers
    if SAVE_GU:
        gu_ptrs = gu_ptr + rows[:, None] * s_gu + offs_n[None, :]
        tl.store(gu_ptrs, _moe_cast(acc_g, gu_ptr.dtype.element_ty, UPCAST), mask=out_mask)
        tl.store(gu_ptrs + N, _moe_cast(acc_u, gu_ptr.dtype.element_ty, UPCAST), mask=out_mask)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u                          # silu(g) * u
    h_ptrs = h_ptr + rows[:, None] * s_h + offs_n[None, :]
    tl.store(h_ptrs, _moe_cast(h, h_ptr.dtype.element_ty, UPCAST), mask=out_mask)


@triton.autotune(configs=_MOE_ROWS_CONFIGS, key=["N", "K", "BLOCK_M"], prune_configs_by=_MOE_PRUNE)
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _moe_down_fwd_kernel(
        h_ptr, wd_ptr, tw_ptr, yp_ptr, pair_ptr, bexp_ptr,
        M, N, K, E, num_m,
        s_h, s_de, s_dn, s_dk, s_yp,
        TOPK: tl.constexpr, UPCAST: tl.constexpr, LD: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """K2: y_pairs[p] = w_p * (h_row W_down[e]^T), N = H, K = I; router weight in the epilogue."""
    pid_n, offs_n, n_ok, e, rows, pair, row_ok, tok = _moe_row_block(
        tl.program_id(0), num_m, N, M, pair_ptr, bexp_ptr, TOPK, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * s_h + offs_k[None, :]                               # (BM, BK)
    b_ptrs = wd_ptr + e * s_de + offs_n[None, :].to(tl.int64) * s_dn + offs_k[:, None] * s_dk  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask, b_mask = _moe_k_masks(row_ok, n_ok, offs_k, K - k0, EVEN_K)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(LD)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0).to(LD)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * s_dk
    w = tl.load(tw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)                 # (BM,)
    out = acc * w[:, None]
    y_ptrs = yp_ptr + pair[:, None] * s_yp + offs_n[None, :]
    tl.store(y_ptrs, _moe_cast(out, yp_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_MOE_DOWN_BWD_CONFIGS, key=["N", "K", "BLOCK_M"], prune_configs_by=_MOE_PRUNE,
                 reset_to_zero=["dwp_ptr"])
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _moe_down_bwd_kernel(
        dy_ptr, wd_ptr, tw_ptr, gu_ptr, h_ptr, dgu_ptr, dwp_ptr, pair_ptr, bexp_ptr,
        M, N, K, E, num_m,
        s_dyt, s_dyk, s_de, s_dk, s_dn, s_gu, s_h, s_dgu, s_dwp,
        TOPK: tl.constexpr, UPCAST: tl.constexpr, LD: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """B1: a = dy_t W_down[e] (N = I, K = H); router grad partial <a, h>; dgu = SwiGLU'(w_p a).

    dwp (M, n_tiles) gets one partial sum per I tile (summed in torch: deterministic).
    """
    pid_n, offs_n, n_ok, e, rows, pair, row_ok, tok = _moe_row_block(
        tl.program_id(0), num_m, N, M, pair_ptr, bexp_ptr, TOPK, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + tok[:, None] * s_dyt + offs_k[None, :] * s_dyk                  # (BM, BK)
    b_ptrs = wd_ptr + e * s_de + offs_k[:, None].to(tl.int64) * s_dk + offs_n[None, :] * s_dn  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask, b_mask = _moe_k_masks(row_ok, n_ok, offs_k, K - k0, EVEN_K)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(LD)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0).to(LD)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * s_dyk
        b_ptrs += BLOCK_K * s_dk
    # epilogue in fp32: acc (BM, BN) is d(output) / d(h) before the router weight
    m2 = n_ok[None, :]
    h = tl.load(h_ptr + rows[:, None] * s_h + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(dwp_ptr + pair * s_dwp + pid_n, tl.sum(acc * h, axis=1), mask=row_ok)
    w = tl.load(tw_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)                 # 0 on padding
    gu_ptrs = gu_ptr + rows[:, None] * s_gu + offs_n[None, :]
    g = tl.load(gu_ptrs, mask=m2, other=0.0).to(tl.float32)
    u = tl.load(gu_ptrs + N, mask=m2, other=0.0).to(tl.float32)
    dh = acc * w[:, None]
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    dg = dh * u * (sig + silu * (1.0 - sig))                           # silu'(g) = s (1 + g (1 - s))
    du = dh * silu
    dgu_ptrs = dgu_ptr + rows[:, None] * s_dgu + offs_n[None, :]
    tl.store(dgu_ptrs, _moe_cast(dg, dgu_ptr.dtype.element_ty, UPCAST), mask=m2)
    tl.store(dgu_ptrs + N, _moe_cast(du, dgu_ptr.dtype.element_ty, UPCAST), mask=m2)


@triton.autotune(configs=_MOE_ROWS_CONFIGS, key=["N", "K", "BLOCK_M"], prune_configs_by=_MOE_PRUNE)
@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _moe_gate_up_bwd_dx_kernel(
        dgu_ptr, wg_ptr, wu_ptr, dxp_ptr, pair_ptr, bexp_ptr,
        M, N, K, E, num_m,
        s_dgu, s_ge, s_gk, s_gn, s_ue, s_uk, s_un, s_dxp,
        TOPK: tl.constexpr, UPCAST: tl.constexpr, LD: tl.constexpr,
        PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """B2: dx_pairs[p] = dg W_gate[e] + du W_up[e] (N = H, K = I), written by pair."""
    pid_n, offs_n, n_ok, e, rows, pair, row_ok, tok = _moe_row_block(
        tl.program_id(0), num_m, N, M, pair_ptr, bexp_ptr, TOPK, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for half in tl.static_range(2):  # dg against W_gate, then du against W_up, one accumulator
        if half == 0:
            b_ptrs = wg_ptr + e * s_ge + offs_k[:, None].to(tl.int64) * s_gk + offs_n[None, :] * s_gn
            s_bk = s_gk
        else:
            b_ptrs = wu_ptr + e * s_ue + offs_k[:, None].to(tl.int64) * s_uk + offs_n[None, :] * s_un
            s_bk = s_uk
        a_ptrs = dgu_ptr + rows[:, None] * s_dgu + half * K + offs_k[None, :]             # (BM, BK)
        for k0 in range(0, K, BLOCK_K):
            a_mask, b_mask = _moe_k_masks(row_ok, n_ok, offs_k, K - k0, EVEN_K)
            a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(LD)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0).to(LD)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * s_bk
    dx_ptrs = dxp_ptr + pair[:, None] * s_dxp + offs_n[None, :]
    tl.store(dx_ptrs, _moe_cast(acc, dxp_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_expert_tile(pid, M, N, rstart_ptr, rend_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program id of a dW kernel -> (expert e, rows and row validity, columns and column validity of
    its (M, N) output tile, e's real rows [r0, r1) in the padded sorted layout)."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    e = pid // (num_m * num_n)
    pid_m = (pid % (num_m * num_n)) // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, offs_m, offs_m < M, offs_n, offs_n < N, tl.load(rstart_ptr + e), tl.load(rend_ptr + e)


@triton.autotune(configs=_MOE_DW_CONFIGS, key=["I", "H"], prune_configs_by=_MOE_PRUNE)
@triton.jit
def _moe_gate_up_bwd_dw_kernel(
        dgu_ptr, x_ptr, dwg_ptr, dwu_ptr, pair_ptr, rstart_ptr, rend_ptr,
        I, H,
        s_dgu, s_xt, s_xk, s_we, s_wi, s_wh,
        TOPK: tl.constexpr, UPCAST: tl.constexpr, LD: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """B3: [dW_gate[e]; dW_up[e]] (2I, H) = dgu_e^T x_e over expert e's contiguous rows."""
    e, offs_m, m_ok, offs_n, n_ok, r0, r1 = _moe_expert_tile(                 # offs_m over [g | u]
        tl.program_id(0), 2 * I, H, rstart_ptr, rend_ptr, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(r0, r1, BLOCK_K):
        rows = r + tl.arange(0, BLOCK_K)
        r_ok = rows < r1
        rows = rows.to(tl.int64)
        tok = tl.load(pair_ptr + rows, mask=r_ok, other=0).to(tl.int64) // TOPK
        a_mask = r_ok[:, None] & m_ok[None, :]
        b_mask = r_ok[:, None] & n_ok[None, :]
        a = tl.load(dgu_ptr + rows[:, None] * s_dgu + offs_m[None, :], mask=a_mask, other=0.0).to(LD)
        b = tl.load(x_ptr + tok[:, None] * s_xt + offs_n[None, :] * s_xk, mask=b_mask, other=0.0).to(LD)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)                         # (BM, BN)
    out = _moe_cast(acc, dwg_ptr.dtype.element_ty, UPCAST)
    e64 = e.to(tl.int64)
    is_g = offs_m < I
    off_g = e64 * s_we + offs_m[:, None].to(tl.int64) * s_wi + offs_n[None, :] * s_wh
    tl.store(dwg_ptr + off_g, out, mask=is_g[:, None] & n_ok[None, :])
    off_u = e64 * s_we + tl.where(is_g, 0, offs_m - I)[:, None].to(tl.int64) * s_wi + offs_n[None, :] * s_wh
    tl.store(dwu_ptr + off_u, out, mask=(m_ok & ~is_g)[:, None] & n_ok[None, :])


@triton.autotune(configs=_MOE_DW_CONFIGS, key=["I", "H"], prune_configs_by=_MOE_PRUNE)
@triton.jit
def _moe_down_bwd_dw_kernel(
        dy_ptr, h_ptr, tw_ptr, dwd_ptr, pair_ptr, rstart_ptr, rend_ptr,
        I, H,
        s_dyt, s_dyk, s_h, s_de, s_dh, s_di,
        TOPK: tl.constexpr, UPCAST: tl.constexpr, LD: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """B4: dW_down[e] (H, I) = (w * dy)_e^T h_e over expert e's contiguous rows."""
    e, offs_m, m_ok, offs_n, n_ok, r0, r1 = _moe_expert_tile(                 # (H, I) tile
        tl.program_id(0), H, I, rstart_ptr, rend_ptr, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(r0, r1, BLOCK_K):
        rows = r + tl.arange(0, BLOCK_K)
        r_ok = rows < r1
        rows = rows.to(tl.int64)
        pair = tl.load(pair_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        w = tl.load(tw_ptr + pair, mask=r_ok, other=0.0).to(tl.float32)
        a_mask = r_ok[:, None] & m_ok[None, :]
        b_mask = r_ok[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + (pair // TOPK)[:, None] * s_dyt + offs_m[None, :] * s_dyk,
                     mask=a_mask, other=0.0).to(tl.float32)
        a = (dy * w[:, None]).to(LD)      # (BK, BM), rounded to bf16 on GPU as torch's autograd does
        b = tl.load(h_ptr + rows[:, None] * s_h + offs_n[None, :], mask=b_mask, other=0.0).to(LD)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
    off = e.to(tl.int64) * s_de + offs_m[:, None].to(tl.int64) * s_dh + offs_n[None, :] * s_di
    tl.store(dwd_ptr + off, _moe_cast(acc, dwd_ptr.dtype.element_ty, UPCAST),
             mask=m_ok[:, None] & n_ok[None, :])


_MOE_KERNELS = (_moe_gate_up_fwd_kernel, _moe_down_fwd_kernel, _moe_down_bwd_kernel,
                _moe_gate_up_bwd_dx_kernel, _moe_gate_up_bwd_dw_kernel, _moe_down_bwd_dw_kernel)


def _moe_pin_config(index):
    """Run every MoE kernel with its index-th config (None: autotune again); forgets tuned choices."""
    global _moe_pinned_config
    _moe_pinned_config = index
    for kernel in _MOE_KERNELS:
        kernel.cache.clear()


def _moe_block_m(M: int, E: int, dtype) -> int:
    """Rows per block (= routing alignment): ~the mean rows per expert, a power of 2 in [16, 128]
    (64 for fp32, whose FMA-unit tiles are small)."""
    if _interpreting():
        return 16
    mean = max(1, M // max(E, 1))
    return min(64 if dtype == torch.float32 else 128, max(16, triton.next_power_of_2(mean)))


def _moe_align(topk_ids, E: int, block_m: int):
    """Group pairs by expert, each expert's run padded to a multiple of block_m (no host sync).

    Returns pair_of_row (P,) int32 (sentinel M on padding), block_expert (NB,) int32 (E when the
    block is unused), row_start/row_end (E,) int32: expert e's real rows are [row_start, row_end).
    """
    T, k = topk_ids.shape
    M = T * k
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    sorted_e, order = torch.sort(flat, stable=True)                     # (M,), pairs by expert
    counts = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    start = counts.cumsum(0) - counts
    dest = pad_start[sorted_e] + torch.arange(M, device=dev) - start[sorted_e]
    num_blocks = M // block_m + min(E, M)                               # >= sum_e ceil(n_e / BM)
    pair_of_row = torch.full((num_blocks * block_m,), M, dtype=torch.int32, device=dev)
    pair_of_row[dest] = order.to(torch.int32)
    block_expert = torch.searchsorted(pad_end // block_m, torch.arange(num_blocks, device=dev), right=True)
    return (pair_of_row, block_expert.to(torch.int32), pad_start.to(torch.int32),
            (pad_start + counts).to(torch.int32))


def _moe_sum_pairs(pairs, T: int, k: int):
    """(T*k, H) per-pair rows -> (T, H), summed over each token's k choices in fixed order."""
    return pairs.view(T, k, -1).sum(1) if k > 1 else pairs.view(T, -1)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _moe_kernel_flags(x):
    """(UPCAST, LD, PREC): interpreter -> upcast every load to fp32 (LD), exact fp32 dots;
    GPU -> operands stay in the storage dtype (tensor cores), fp32 inputs use exact fp32 dots."""
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"kernels.moe_grouped_mlp: Triton path supports fp32/bf16/fp16, got {x.dtype}")
    if _interpreting():
        return True, tl.float32, "ieee"
    return False, _TL_DTYPES[x.dtype], ("ieee" if x.dtype == torch.float32 else None)


def _moe_grid(n, N, M=None):
    """Launch grid: n row blocks (or experts) x the BLOCK_N tiles of N (x the BLOCK_M tiles of M)."""
    return lambda meta: (n * triton.cdiv(N, meta["BLOCK_N"])
                         * (1 if M is None else triton.cdiv(M, meta["BLOCK_M"])),)


class _MoEGroupedMLP(torch.autograd.Function):
    """Triton expert SwiGLU: forward K1+K2, backward B1..B4 (see the comment at the section top)."""

    @staticmethod
    @_on_device_of_inputs
    def forward(ctx, x, w_gate, w_up, w_down, topk_weights, topk_ids, grad_enabled):
        T, H = x.shape
        E, I, _ = w_gate.shape
        k = topk_ids.shape[1]
        M = T * k
        bm = _moe_block_m(M, E, x.dtype)
        pair_of_row, block_expert, row_start, row_end = _moe_align(topk_ids, E, bm)
        num_m, P = block_expert.numel(), pair_of_row.numel()
        tw = topk_weights.reshape(-1).contiguous()
        upcast, ld, prec = _moe_kernel_flags(x)
        save = grad_enabled and any(ctx.needs_input_grad)  # else inference: keep nothing
        gu = x.new_empty(P, 2 * I) if save else x.new_empty(1, 1)          # [g | u] pre-activations
        h = x.new_empty(P, I)                                               # silu(g) * u
        _moe_gate_up_fwd_kernel[_moe_grid(num_m, I)](
            x, w_gate, w_up, gu, h, pair_of_row, block_expert,
            M, I, H, E, num_m,
            x.stride(0), x.stride(1), *w_gate.stride(), *w_up.stride(), gu.stride(0), h.stride(0),
            TOPK=k, SAVE_GU=save, UPCAST=upcast, LD=ld, PREC=prec, BLOCK_M=bm, GROUP_M=_MOE_GROUP_M)
        y_pairs = x.new_empty(M, H)
        _moe_down_fwd_kernel[_moe_grid(num_m, H)](
            h, w_down, tw, y_pairs, pair_of_row, block_expert,
            M, H, I, E, num_m,
            h.stride(0), *w_down.stride(), y_pairs.stride(0),
            TOPK=k, UPCAST=upcast, LD=ld, PREC=prec, BLOCK_M=bm, GROUP_M=_MOE_GROUP_M)
        if save:
            ctx.save_for_backward(x, w_gate, w_up, w_down, tw, pair_of_row, block_expert,
                                  row_start, row_end, gu, h)
            ctx.shape = (T, H, E, I, k, bm)
            ctx.tw_dtype = topk_weights.dtype
        return _moe_sum_pairs(y_pairs, T, k)

    @staticmethod
    @_on_device_of_inputs
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, tw, pair_of_row, block_expert, row_start, row_end, gu, h = ctx.saved_tensors
        T, H, E, I, k, bm = ctx.shape
        M, num_m, P = T * k, block_expert.numel(), pair_of_row.numel()
        need_x, need_g, need_u, need_d, need_w = ctx.needs_input_grad[:5]
        dy = dy.to(x.dtype).contiguous()                    # autocast may hand back another dtype
        upcast, ld, prec = _moe_kernel_flags(x)
        dx = dwg = dwu = dwd = dtw = None
        if need_x or need_g or need_u or need_w:
            dgu = x.new_empty(P, 2 * I)
            min_bn = min(c.kwargs["BLOCK_N"] for c in _MOE_DOWN_BWD_CONFIGS)
            dwp = torch.zeros(M, triton.cdiv(I, min_bn), dtype=torch.float32, device=x.device)
            _moe_down_bwd_kernel[_moe_grid(num_m, I)](
                dy, w_down, tw, gu, h, dgu, dwp, pair_of_row, block_expert,
                M, I, H, E, num_m,
                *dy.stride(), *w_down.stride(), gu.stride(0), h.stride(0), dgu.stride(0), dwp.stride(0),
                TOPK=k, UPCAST=upcast, LD=ld, PREC=prec, BLOCK_M=bm, GROUP_M=_MOE_GROUP_M)
            if need_w:
                dtw = dwp.sum(1).view(T, k).to(ctx.tw_dtype)
            if need_x:
                dx_pairs = x.new_empty(M, H)
                _moe_gate_up_bwd_dx_kernel[_moe_grid(num_m, H)](
                    dgu, w_gate, w_up, dx_pairs, pair_of_row, block_expert,
                    M, H, I, E, num_m,
                    dgu.stride(0), *w_gate.stride(), *w_up.stride(), dx_pairs.stride(0),
                    TOPK=k, UPCAST=upcast, LD=ld, PREC=prec, BLOCK_M=bm, GROUP_M=_MOE_GROUP_M)
                dx = _moe_sum_pairs(dx_pairs, T, k)
            if need_g or need_u:
                dwg = torch.empty_like(w_gate, memory_format=torch.contiguous_format)
                dwu = torch.empty_like(dwg)
                _moe_gate_up_bwd_dw_kernel[_moe_grid(E, H, 2 * I)](
                    dgu, x, dwg, dwu, pair_of_row, row_start, row_end,
                    I, H,
                    dgu.stride(0), x.stride(0), x.stride(1), *dwg.stride(),
                    TOPK=k, UPCAST=upcast, LD=ld, PREC=prec)
        if need_d:
            dwd = torch.empty_like(w_down, memory_format=torch.contiguous_format)
            _moe_down_bwd_dw_kernel[_moe_grid(E, I, H)](
                dy, h, tw, dwd, pair_of_row, row_start, row_end,
                I, H,
                dy.stride(0), dy.stride(1), h.stride(0), *dwd.stride(),
                TOPK=k, UPCAST=upcast, LD=ld, PREC=prec)
        return dx, dwg, dwu, dwd, dtw, None, None


def moe_grouped_mlp_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """The Triton path of `moe_grouped_mlp` (same arguments; differentiable in all float inputs);
    under CUDA autocast the inputs are cast to the autocast dtype, as F.linear would do."""
    dev = x.device.type
    if dev == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        dtype = x.dtype
        if not (w_gate.dtype == w_up.dtype == w_down.dtype == dtype):
            raise ValueError(f"kernels.moe_grouped_mlp: x and the expert weights must share a dtype "
                             f"outside autocast, got x {x.dtype}, w_gate {w_gate.dtype}, "
                             f"w_up {w_up.dtype}, w_down {w_down.dtype}")
    if x.shape[0] == 0:  # nothing routed: the reference handles the empty case
        return moe_grouped_mlp_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    with torch.autocast(dev, enabled=False):  # keep autocast off the internal sums
        return _MoEGroupedMLP.apply(x, w_gate, w_up, w_down, topk_weights, topk_ids,
                                    torch.is_grad_enabled())


def moe_grouped_mlp(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Expert SwiGLU for routed tokens: y[t] = sum_j w[t,j] * down_e(silu(gate_e x_t) * up_e x_t).

    x (T, H); w_gate, w_up (E, I, H); w_down (E, H, I); topk_weights (T, k); topk_ids (T, k) int
    -> (T, H). Triton grouped GEMM when `use_triton(x)`, else the torch reference.
    torch.compile never traces into it: its shapes follow the routing (tokens per expert), which
    recompiled a compiled generation step for every new routing until Dynamo's recompile limit. A
    compiled step without gradients (generation) sees one opaque op of output (T, H); with
    gradients the graph breaks here and the experts run eagerly. A compiled graph runs with autocast
    off (its casts are traced into it), so under autocast the op's inputs are cast here, as autocast
    casts a product's.
    """
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, w_gate, w_up, w_down = (t.to(dt) for t in (x, w_gate, w_up, w_down))
        return _moe_op(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    return _moe_grouped_mlp(x, w_gate, w_up, w_down, topk_weights, topk_ids)


@torch.compiler.disable
def _moe_grouped_mlp(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    _check_moe_args(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")     # the Triton path casts to its dtype
    if use_triton(x, autocast or x.dtype in TRITON_DTYPES):
        return moe_grouped_mlp_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    return moe_grouped_mlp_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids)


@torch.library.custom_op("sailvl::moe_grouped_mlp", mutates_args=())
def _moe_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
            topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """moe_grouped_mlp as one op for a compiled graph, its output in x's dtype so that its shape and
    dtype follow from x's (the graph runs with autocast off: moe_grouped_mlp casts the inputs first)."""
    return _moe_grouped_mlp(x, w_gate, w_up, w_down, topk_weights, topk_ids).to(x.dtype)


@_moe_op.register_fake
def _(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    return x.new_empty(x.shape[0], w_down.shape[1])
