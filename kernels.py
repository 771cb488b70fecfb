"""Hand-written kernels of SAIL-VL2's training stack (paper §5.1 packed attention, §5.2 fused MoE).

Two kernel families, each with a plain-torch reference that is both the CPU path and the test
oracle:

  packed_attention(q, k, v, cu_seqlens, causal)   varlen (stream-packed) attention, §5.1
  moe_grouped_mlp(x, w_gate, w_up, w_down, topk_weights, topk_ids)
                                                  grouped-GEMM expert SwiGLU, §5.2

Backend choice: env SAILVL_KERNELS=auto|triton|torch (auto: Triton on CUDA tensors, torch
elsewhere). With TRITON_INTERPRET=1 and SAILVL_KERNELS=triton the Triton kernels run on CPU
tensors; that is how CI tests them.
"""
import inspect
import itertools
import math
import os
import time
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# ----------------------------------------------------------------------------------------------
# dispatch

def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton path should run for tensor `t` (read from the env at call time)."""
    choice = os.environ.get("SAILVL_KERNELS", "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"SAILVL_KERNELS must be auto, triton or torch, got {choice!r}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("SAILVL_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.is_cuda


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

    Reads the values (a device sync on CUDA): packed_attention calls it only for CPU tensors, so
    a CUDA caller (the model) should call it once per batch, not once per layer.
    """
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"packed_attention: cu_seqlens must be a 1-D int32 tensor (n+1,), got "
                         f"dtype {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"packed_attention: cu_seqlens[0] must be 0, got {cu[0]}")
    if cu[-1] != total:
        raise ValueError(f"packed_attention: cu_seqlens[-1] must equal T={total} (q.shape[0]), "
                         f"got {cu[-1]}")
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
        raise ValueError(f"packed_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"packed_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")


# --- torch path: per-sample SDPA, or one SDPA with a block-diagonal mask ----------------------

def _packed_attention_loop(q, k, v, bounds, causal, scale):
    """One SDPA call per sample. bounds: cu_seqlens as a Python list."""
    H, Hkv = q.shape[1], k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qi = q[s:e].transpose(0, 1)                          # (H, L, D)
        ki = k[s:e].transpose(0, 1)                          # (Hkv, L, D)
        vi = v[s:e].transpose(0, 1)
        if Hkv != H:  # GQA: each kv head serves H // Hkv consecutive query heads
            ki = ki.repeat_interleave(H // Hkv, dim=0)
            vi = vi.repeat_interleave(H // Hkv, dim=0)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale)
        outs.append(oi.transpose(0, 1))                      # (L, H, D)
    return torch.cat(outs, 0) if outs else torch.empty_like(q)


def _packed_attention_masked(q, k, v, bounds, causal, scale):
    """One SDPA call over the whole pack with a (T, T) block-diagonal (and causal) boolean mask."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=q.device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)  # (T,)
    mask = seg[:, None] == seg[None, :]                      # (T, T) same sample
    if causal:
        mask &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)   # (heads, T, D)
    if Hkv != H:
        kh = kh.repeat_interleave(H // Hkv, dim=0)
        vh = vh.repeat_interleave(H // Hkv, dim=0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)                               # (T, H, D)


# When is one masked SDPA faster than a loop of per-sample SDPAs? Measured on the 2-core CPU dev
# box (fp32, causal, forward+backward, 1 thread, min of 9 interleaved runs; H*D = heads * dim):
#      T    n  H*D | loop ms  mask ms  mask/loop
#    128    4  128 |    1.64     1.12       0.68
#    128   16  512 |    4.90     2.32       0.47
#    128   32  128 |    5.95     1.23       0.21
#    512   16  128 |    5.34    18.36       3.44
#    512   64  128 |   26.87    17.26       0.64
#    512   64  512 |   51.45    57.31       1.11
#   2048   16  512 |  259.47  1934.28       7.45
#   2048  128  128 |  113.00   666.66       5.90
# Cost model: loop ~ n * c0 + c1 * H*D * sum L^2 (c0 ~ 0.2-0.4 ms of per-call overhead), mask ~
# c1 * H*D * T^2 (it computes the whole square), c1 ~ 0.5 ns; so the mask wins when
# n * c0 / c1 = n * 6e5 > H*D * (T^2 - sum L^2). Over 36 measured (T, n, H*D) cases this rule
# picked the faster variant 30 times; the misses were near-ties (worst 1.16x the best, mean 1.01x).
# `python kernels.py bench attention` on a CPU machine prints the comparison again.
_MASK_OVERHEAD_PER_SAMPLE = 6e5      # c0 / c1 in units of H*D*L^2
_MASK_MAX_T = 4096                   # the (T, T) mask and SDPA's scores grow as T^2


def _torch_attention_method(bounds, heads_x_dim: int) -> str:
    """'mask' or 'loop': the faster torch variant for these cu_seqlens (measured rule above)."""
    T, n = bounds[-1], len(bounds) - 1
    if n <= 1 or T > _MASK_MAX_T:
        return "loop"
    sum_sq = sum((e - s) ** 2 for s, e in zip(bounds[:-1], bounds[1:]))
    return "mask" if n * _MASK_OVERHEAD_PER_SAMPLE > heads_x_dim * (T * T - sum_sq) else "loop"


def packed_attention_torch(q, k, v, cu_seqlens, causal: bool, scale=None, method=None):
    """Reference and CPU path. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    method: 'loop' (one SDPA per sample), 'mask' (one SDPA with a block-diagonal mask) or None
    (pick the faster for these lengths, `_torch_attention_method`).
    """
    bounds = cu_seqlens.tolist()
    method = method or _torch_attention_method(bounds, q.shape[1] * q.shape[2])
    if method == "loop":
        return _packed_attention_loop(q, k, v, bounds, causal, scale)
    if method == "mask":
        return _packed_attention_masked(q, k, v, bounds, causal, scale)
    raise ValueError(f"packed_attention_torch: method must be 'loop', 'mask' or None, "
                     f"got {method!r}")


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
# interpreter's bf16 arithmetic is silently wrong (kernels-notes §C). Row offsets are int64
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
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale             # (BM, BN) log2 units
        if MASKED:
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (q_rows[:, None] >= kv_rows[None, :])
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))                               # (BM,)
        alpha = tl.math.exp2(m_i - m_new)                                    # rescale old terms
        p = tl.math.exp2(qk - m_new[:, None])                                # (BM, BN)
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
    rows per program, BLOCK_M queries per step. Starting points: the Triton tutorial's tiles for
    D=64 (dkdv 32x128, dq 128x32) and FA2's 128x64 forward; D=128 halves the dkdv key tile
    because dk and dv accumulate in registers (2 x 128 x 128 fp32 would spill).
    """
    tiles = {
        ("fwd", "small"): [(128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 128, 8, 3)],
        ("fwd", "d128"): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
        ("fwd", "large"): [(64, 32, 4, 2), (64, 64, 8, 2)],
        ("dq", "small"): [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        ("dq", "d128"): [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        ("dq", "large"): [(64, 32, 4, 2), (32, 32, 4, 2)],
        ("dkdv", "small"): [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
        ("dkdv", "d128"): [(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 3)],
        ("dkdv", "large"): [(32, 64, 4, 2), (32, 32, 4, 2)],
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

    grid_of(BLOCK_M, BLOCK_N) -> grid; consts: the constexprs other than the tiles.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        bm, bn = _ATTN_INTERPRET[kind]
        kernel[grid_of(bm, bn)](*args, CHUNK=_ATTN_INTERPRET["chunk"], BLOCK_M=bm, BLOCK_N=bn,
                                UPCAST=True, **consts)
    else:
        tuned = _attn_tuned(kernel, kind, head_dim)
        tuned[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](
            *args, CHUNK=_ATTN_CHUNK_GPU, UPCAST=False, **consts)


def _attn_chunk() -> int:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return _ATTN_INTERPRET["chunk"] if interpret else _ATTN_CHUNK_GPU


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
    version and rebuilds.
    """
    key = (total, chunk, cu_seqlens.data_ptr(), cu_seqlens._version, str(cu_seqlens.device))
    memo = _attn_table_memo.get(causal)
    if memo is not None and memo[0]() is cu_seqlens and memo[1] == key:
        return memo[2]
    tables = _attn_block_table(cu_seqlens, total, chunk, causal)
    _attn_table_memo[causal] = (weakref.ref(cu_seqlens), key, tables)
    return tables


def _attn_store_dtype(dtype):
    """The dtype the kernels write. The interpreter's fp32 -> bf16 cast truncates where a GPU
    rounds to nearest, so under TRITON_INTERPRET=1 the kernels write fp32 and torch rounds: the
    CPU tests then compare like-for-like rounding with PyTorch's bf16 (kernels-notes §D)."""
    return torch.float32 if os.environ.get("TRITON_INTERPRET") == "1" else dtype


def _attn_forward(q, k, v, cu, table_q, causal, scale):
    T, H, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty(T, H, D, dtype=_attn_store_dtype(q.dtype), device=q.device)
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)   # log2 units
    chunk = _attn_chunk()
    G = table_q.shape[0]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    consts = dict(GROUP=H // Hkv, HEAD_DIM=D, BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D, CAUSAL=causal,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    args = (q, k, v, o, lse, cu, table_q, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), o.stride(0), o.stride(1), T, scale * _LOG2E)
    _attn_launch(_attn_fwd_kernel, "fwd", lambda bm, bn: (H, chunk // bm, G), args, consts, D)
    return o.to(q.dtype), lse


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
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, cu, table_q, table_kv, ctx.causal,
                                    ctx.scale)
        return dq, dk, dv, None, None, None


def packed_attention_triton(q, k, v, cu_seqlens, causal: bool, scale=None):
    """The Triton flash-attention path (CUDA, or CPU under TRITON_INTERPRET=1); differentiable."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"packed_attention: Triton path supports fp32/bf16/fp16, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"packed_attention: Triton path supports head dim <= 256, got "
                         f"{q.shape[-1]}")
    if q.shape[0] == 0:
        return q.clone()                                  # empty pack: nothing to attend
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _PackedAttentionFn.apply(q, k, v, cu_seqlens, causal, scale)


def packed_attention(q, k, v, cu_seqlens, causal: bool, scale=None):
    """q (T, H, D), k/v (T, Hkv, D), cu_seqlens int32 (n+1,) -> out (T, H, D).

    No token attends across a sample boundary; `causal` for the LLM, bidirectional for the ViT.
    Triton when `use_triton(q)`, else the torch path. cu_seqlens values are validated on CPU
    tensors; CUDA callers validate once per batch with `check_cu_seqlens` (it syncs).
    """
    _check_attention_inputs(q, k, v, cu_seqlens)
    if not cu_seqlens.is_cuda:
        check_cu_seqlens(cu_seqlens, q.shape[0])
    if use_triton(q):
        return packed_attention_triton(q, k, v, cu_seqlens, causal, scale)
    return packed_attention_torch(q, k, v, cu_seqlens, causal, scale)


# --- benchmark: `python kernels.py bench attention` (the CLI at the bottom calls this) ---------

def _bench_lengths(total: int, seed: int, lo: int = 64, hi: int = 4096):
    """Fixed-seed sample lengths drawn from U[lo, hi], the last one cut so they sum to `total`."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def _attention_flops(lengths, heads: int, dim: int, causal: bool) -> float:
    """Forward FLOPs, 2 matmuls x 2 FLOP per MAC: 4 H D sum_i L_i(L_i+1)/2 causal, 4 H D sum L_i^2
    otherwise (the tutorial's convention, kernels-notes §D). Backward = 2.5 x forward."""
    pairs = sum(L * (L + 1) // 2 if causal else L * L for L in lengths)
    return 4.0 * heads * dim * pairs


def _block_diagonal_mask(lengths, causal: bool, device):
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device))               # (T,)
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    return mask                                                                        # (T, T)


def bench_attention(args):
    """Packed attention forward+backward: Triton vs dense block-diagonal-mask SDPA, FlexAttention
    with a document mask, and a per-sample SDPA loop (GPU); the two torch variants (CPU).

    Reads from `args` (all optional): total (int or list of ints, default 8192 32768 on GPU),
    heads (16), kv_heads (= heads), dim (128), dtype ('bf16'), seed (0), causal (True).
    """
    heads = getattr(args, "heads", None) or 16
    kv_heads = getattr(args, "kv_heads", None) or heads
    dim = getattr(args, "dim", None) or 128
    seed = getattr(args, "seed", None) or 0
    causal = getattr(args, "causal", True)
    totals = getattr(args, "total", None)
    if not torch.cuda.is_available():
        return _bench_attention_cpu(causal, seed)
    totals = [8192, 32768] if totals is None else totals if isinstance(totals, (list, tuple)) \
        else [totals]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        str(getattr(args, "dtype", None) or "bf16")]
    import triton.testing
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; H={heads} Hkv={kv_heads} D={dim} {dtype} causal={causal}; "
          f"lengths U[64, 4096], seed {seed}")
    print("FLOPs: fwd = 4 H D sum_i L_i(L_i+1)/2 (causal; sum L_i^2 otherwise), bwd = 2.5 fwd")
    for total in totals:
        _bench_attention_gpu(int(total), heads, kv_heads, dim, dtype, causal, seed)


def _bench_attention_cpu(causal: bool, seed: int):
    """The torch path on CPU (what CPU training runs): per-sample loop vs block-diagonal mask."""
    print(f"CPU (no CUDA): torch path only, fp32, fwd+bwd, {torch.get_num_threads()} threads; "
          "min of 5 interleaved runs")
    print(f"{'T':>5} {'n':>4} {'H':>3} {'D':>3} | {'loop ms':>8} {'mask ms':>8} {'mask/loop':>9}"
          " | auto")
    for T, lo, hi, H, D in ((256, 4, 32, 4, 32), (256, 16, 128, 4, 32), (1024, 64, 512, 4, 64),
                            (1024, 8, 64, 4, 64)):
        lengths = _bench_lengths(T, seed, lo, hi)
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
        q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
        best = {}
        for _ in range(5):
            for method in ("loop", "mask"):
                t0 = time.perf_counter()
                packed_attention_torch(q, k, v, cu, causal, method=method).sum().backward()
                best[method] = min(best.get(method, 1e9), time.perf_counter() - t0)
        auto = _torch_attention_method(cu.tolist(), H * D)
        print(f"{T:5d} {len(lengths):4d} {H:3d} {D:3d} | {best['loop'] * 1e3:8.2f} "
              f"{best['mask'] * 1e3:8.2f} {best['mask'] / best['loop']:9.2f} | {auto}")


def _bench_attention_gpu(total, heads, kv_heads, dim, dtype, causal, seed):
    from triton.testing import do_bench
    dev = "cuda"
    lengths = _bench_lengths(total, seed)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(total, heads, dim, device=dev, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(total, kv_heads, dim, device=dev, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(total, kv_heads, dim, device=dev, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(total, heads, dim, device=dev, dtype=dtype, generator=g)
    fwd_flops = _attention_flops(lengths, heads, dim, causal)
    print(f"\nT={total}: {len(lengths)} samples {lengths}")

    # correctness first: Triton and torch-at-dtype vs an fp32 per-sample reference
    def grads(fn, *inputs):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*inputs)
        out.backward(do.to(out.dtype))
        return [out.detach()] + [x.grad for x in inputs]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref32 = grads(lambda a, b, c: packed_attention_torch(a, b, c, cu, causal, method="loop"),
                  q.float(), k.float(), v.float())
    refpt = grads(lambda a, b, c: packed_attention_torch(a, b, c, cu, causal, method="loop"),
                  q, k, v)
    tri = grads(lambda a, b, c: packed_attention_triton(a, b, c, cu, causal), q, k, v)
    tri2 = grads(lambda a, b, c: packed_attention_triton(a, b, c, cu, causal), q, k, v)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    verdicts = []
    for name, r, p, t, t2, slack in zip(("out", "dq", "dk", "dv"), ref32, refpt, tri, tri2,
                                        (2, 3, 3, 3)):
        e_t = (t.float() - r).abs().max().item()
        e_p = (p.float() - r).abs().max().item()
        ok = e_t <= slack * e_p + 1e-3 and math.isfinite(e_t)
        verdicts.append(f"{name} {e_t:.2e} (torch {e_p:.2e}) {'ok' if ok else 'FAIL'}"
                        f"{'' if torch.equal(t, t2) else ' NONDETERMINISTIC'}")
    print("max |err| vs fp32 reference, triton (torch at dtype), rule <= 2x/3x torch + 1e-3: "
          + "; ".join(verdicts))

    # the contenders, each fwd+bwd on the same inputs
    mask = _block_diagonal_mask(lengths, causal, dev)           # built once, not timed (as flex)

    def sdpa_dense():
        kk, vv = k, v
        if kv_heads != heads:
            kk, vv = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                             vv.transpose(0, 1)[None], attn_mask=mask)
        return out[0].transpose(0, 1)
    runs = {
        "triton": lambda: packed_attention_triton(q, k, v, cu, causal),
        "sdpa dense block-diag mask": sdpa_dense,
        "sdpa per-sample loop": lambda: packed_attention_torch(q, k, v, cu, causal, method="loop"),
    }
    flex = _flex_document_attention(lengths, heads, kv_heads, total, causal, dev)
    if flex is not None:
        runs["flex_attention doc mask"] = lambda: flex(q, k, v)
    try:
        from flash_attn import flash_attn_varlen_func
        mx = max(lengths)
        runs["flash_attn varlen (FA2)"] = lambda: flash_attn_varlen_func(
            q, k, v, cu, cu, mx, mx, causal=causal)
    except ImportError:
        pass

    ms_table = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ms_table[0].record()
    _attn_block_table(cu, total, _attn_chunk(), causal)
    ms_table[1].record()
    torch.cuda.synchronize()
    print(f"triton block table build {ms_table[0].elapsed_time(ms_table[1]):.3f} ms (once per "
          "step, "
          "memoised per cu_seqlens like a BlockMask)")
    results = {}
    for name, fn in runs.items():
        try:
            fwd = do_bench(fn, warmup=25, rep=100)
            both = do_bench(lambda: fn().backward(do), warmup=25, rep=100, grad_to_none=[q, k, v])
            results[name] = (fwd, both)
        except Exception as e:                                  # e.g. out of memory at 32k
            print(f"  {name}: skipped ({type(e).__name__}: {str(e)[:120]})")
            torch.cuda.empty_cache()
    base = results.get("triton")
    print(f"  {'method':28s} {'fwd ms':>8} {'fwd+bwd ms':>11} {'fwd TF/s':>9} {'bwd TF/s':>9} "
          f"{'f+b TF/s':>9} {'its f+b time / triton':>22}")
    for name, (fwd, both) in results.items():
        ratio = f"{both / base[1]:.2f}x" if base else "-"
        bwd_tf = 2.5 * fwd_flops / max(both - fwd, 1e-6) / 1e9
        print(f"  {name:28s} {fwd:8.3f} {both:11.3f} {fwd_flops / fwd / 1e9:9.1f} {bwd_tf:9.1f} "
              f"{3.5 * fwd_flops / both / 1e9:9.1f} {ratio:>22}")
    for kind in ("fwd", "dkdv", "dq"):
        tuned = _attn_tuned_cache.get((kind, _attn_dim_class(dim)))
        if tuned is not None and getattr(tuned, "best_config", None) is not None:
            print(f"  autotuned {kind}: {tuned.best_config}")


def _flex_document_attention(lengths, heads, kv_heads, total, causal, dev):
    """Compiled flex_attention with a (causal) document BlockMask, or None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("  flex_attention: not available in this torch")
        return None
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=dev),
                                  torch.tensor(lengths, device=dev))

    def document_mask(b, h, qi, ki):
        same = seg[qi] == seg[ki]
        return same & (qi >= ki) if causal else same
    can_compile = "_compile" in inspect.signature(create_block_mask).parameters
    opts = {"_compile": True} if can_compile else {}
    t0 = time.perf_counter()
    block_mask = create_block_mask(document_mask, None, None, total, total, device=dev, **opts)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    block_mask = create_block_mask(document_mask, None, None, total, total, device=dev, **opts)
    torch.cuda.synchronize()
    print(f"flex BlockMask build: {(time.perf_counter() - t1) * 1e3:.2f} ms (first call, with "
          f"compile: {(t1 - t0) * 1e3:.0f} ms), excluded from its timing")
    compiled = torch.compile(flex_attention)
    gqa = kv_heads != heads

    def run(q, k, v):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=gqa)
        return out[0].transpose(0, 1)
    return run


# ----------------------------------------------------------------------------------------------
# MoE grouped expert SwiGLU, paper §5.2

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
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = xs[start:start + n]
        h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())  # (n, I)
        outs.append(h @ w_down[e].t())                       # (n, H)
        start += n
    ys = torch.cat(outs, 0) if outs else xs.new_zeros(0, Hd)
    ys = ys * topk_weights.reshape(-1)[order].unsqueeze(1).to(ys.dtype)
    y = torch.zeros(T, Hd, dtype=ys.dtype, device=x.device)
    y.index_add_(0, token_of, ys)
    return y


def moe_grouped_mlp(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Expert SwiGLU for routed tokens: y[t] = sum_j w[t,j] * down_e(silu(gate_e x_t) * up_e x_t)."""
    return moe_grouped_mlp_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids)
