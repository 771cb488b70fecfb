"""Qwen3-MoE sparse block of SAIL-VL2-A3B (paper §2.2).

Router: Linear(H, E) without bias, softmax in fp32, top-k, optional renormalisation
(`norm_topk_prob`); experts: SwiGLU of width `moe_intermediate_size`, no shared experts;
the expert computation goes through `kernels.moe_grouped_mlp` (grouped GEMM, §5.2).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels


@dataclass
class MoEConfig:
    hidden_size: int = 64
    moe_intermediate_size: int = 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate/up (E, I, H), down (E, H, I)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x, topk_weights, topk_ids):
        return kernels.moe_grouped_mlp(x, self.gate_proj, self.up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """x (B, T, H) -> (y (B, T, H), router_logits (B*T, E))."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)

    def route(self, x2d):
        """x2d (N, H) -> router_logits (N, E), topk_weights (N, k) in x's dtype, topk_ids (N, k)."""
        logits = self.gate(x2d)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return logits, w.to(x2d.dtype), ids

    def forward(self, x):
        B, T, H = x.shape
        x2d = x.reshape(-1, H)
        logits, w, ids = self.route(x2d)
        y = self.experts(x2d, w, ids)
        return y.reshape(B, T, H), logits


def load_balancing_loss(router_logits, num_experts: int, top_k: int):
    """Switch-style auxiliary loss over all MoE layers (as HF `load_balancing_loss_func`):
    E · Σ_e (fraction of top-k slots routed to e) · (mean router probability of e)."""
    logits = torch.cat(list(router_logits), 0)                          # (L*N, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    ids = torch.topk(probs, top_k, dim=-1).indices                      # (L*N, k)
    tokens_per_expert = torch.nn.functional.one_hot(ids, num_experts).float().mean(0)  # (k, E)
    return num_experts * (tokens_per_expert * probs.mean(0)[None]).sum()
