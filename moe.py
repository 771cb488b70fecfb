"""Mixture-of-experts of SAIL-VL2-A3B (paper §2.2; fused expert kernels §5.2).

Reads top-down in the order of §2.2:

  1. The Qwen3-MoE sparse block, exactly as HF `Qwen3MoeSparseMoeBlock` (modeling_qwen3_moe.py): router
     `gate` = Linear(H, E) without bias, softmax in fp32, top-k, optional renormalisation of the
     k weights (`norm_topk_prob`), weights cast back to the input dtype, E SwiGLU experts of width
     `moe_intermediate_size`, no shared experts. The experts run through
     `kernels.moe_grouped_mlp` (grouped GEMM, §5.2). Which decoder layers are sparse is HF's rule
     (`model.LLMConfig.is_moe_layer`: `decoder_sparse_step`, `mlp_only_layers`). For generation the
     experts can be spread over the ranks (`hold_rank_experts`, `SparseMoeBlock.expert_parallel`:
     each rank holds E / world of them, each layer's tokens gathered from every rank), as MoE
     models are served: RL's rollouts of a model whose full copy would not fit beside its training
     state (rl.py --generate_on=experts).
  2. The load-balancing loss: "an auxiliary load-balancing loss [...] and average activation
     across ranks". Switch-style, equal to HF `load_balancing_loss_func` on one rank; across
     data-parallel ranks the expert-load statistics are all-reduced first and each rank returns its
     share of the global batch's loss (details at `load_balancing_loss`).
  3. Expert-activation entropy: per-layer load entropy and max/mean load (`expert_load`, one
     summary for the trainer's log).
  4. Calibration: "data probing and automatic calibration [...] which maximizes expert activation
     entropy", which "maintains activation behavior on text-only calibration sets and significantly
     improves entropy on multimodal sets". The paper gives no procedure; ours is documented at
     `calibrate`; the command line that loads a checkpoint and data for it is
     `python tests/calibrate.py --help` (this file imports no model or data file).
"""
import contextlib
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from tqdm import tqdm
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels


# ==============================================================================================
# 1. The sparse block (HF Qwen3MoeSparseMoeBlock)

@dataclass
class MoEConfig:
    """The sparse block's sizes. Field names are HF's Qwen3-MoE config names, so model.LLMConfig's
    `moe_config()` reads them off the LLM config (the aux-loss coefficient stays there: the trainer
    applies it once)."""
    hidden_size: int = 64
    moe_intermediate_size: int = 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate/up (E, I, H), down (E, H, I)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x, topk_weights, topk_ids):
        """x (N, H), topk_weights (N, k), topk_ids (N, k) -> (N, H): Σ_j w_j · expert_{id_j}(x)."""
        return kernels.moe_grouped_mlp(x, self.gate_proj, self.up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """x (B, T, H) -> (y (B, T, H), router_logits (B*T, E))."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
            raise ValueError(f"MoEConfig: num_experts_per_tok={cfg.num_experts_per_tok} must be in "
                             f"1..num_experts={cfg.num_experts}")
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)   # HF key `mlp.gate.weight`
        self.experts = Experts(cfg)
        self.expert_slice = None     # (lo, hi): this rank holds experts lo..hi-1 only (hold_rank_experts)

    def route(self, x2d):
        """x2d (N, H) -> router_logits (N, E), topk_weights (N, k) in x's dtype, topk_ids (N, k)."""
        logits = self.gate(x2d)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)      # fp32 even under bf16, as HF
        w, ids = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return logits, w.to(x2d.dtype), ids

    def forward(self, x):
        B, T, H = x.shape
        x2d = x.reshape(-1, H)
        if self.expert_slice is not None:
            y, logits = self.expert_parallel(x2d)
        else:
            logits, w, ids = self.route(x2d)
            y = self.experts(x2d, w, ids)
        return y.reshape(B, T, H), logits

    def expert_parallel(self, x2d):
        """The block with the experts spread over the ranks (a collective: every rank calls it, each
        with its own tokens, any number, none included). The ranks' tokens are gathered (padded to
        the most any rank has), each rank routes all of them (the router is replicated) and runs the
        pairs that chose its experts, and a sum over ranks gives every token its k experts' output.
        x2d (N, H) -> (y (N, H), router_logits (N, E)) of this rank's tokens. (Two host reads: the
        most tokens of any rank, the count of this rank's pairs.)"""
        (lo, hi), rank, world = self.expert_slice, dist.get_rank(), dist.get_world_size()
        n = torch.tensor(x2d.shape[0], device=x2d.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        n = int(n)
        padded = F.pad(x2d, (0, 0, 0, n - x2d.shape[0]))                           # (n, H)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        x_all = torch.cat(parts)                                                     # (world * n, H)
        logits, w, ids = self.route(x_all)
        token, slot = ((ids >= lo) & (ids < hi)).nonzero(as_tuple=True)             # this rank's pairs
        y_pairs = self.experts(x_all[token], w[token, slot, None], ids[token, slot, None] - lo)   # (P, H)
        y = torch.zeros(x_all.shape, device=x2d.device).index_add_(0, token, y_pairs.float())   # summed in fp32
        dist.all_reduce(y)                                                           # every token's k experts
        mine = slice(rank * n, rank * n + x2d.shape[0])
        return y[mine].to(y_pairs.dtype), logits[mine]


def hold_rank_experts(block: SparseMoeBlock, rank: int, world: int):
    """`block` keeping only this rank's E / world experts (empty weights, for the caller to fill):
    expert parallelism, as MoE models are served (each GPU holds a share of the experts; tokens
    travel to them), for generation (rl.py --generate_on=experts)."""
    E = block.cfg.num_experts
    if world < 2 or E % world:
        raise ValueError(f"expert parallelism: {E} experts do not split evenly over {world} ranks")
    w = block.experts.gate_proj
    with torch.device(w.device):
        block.experts = Experts(replace(block.cfg, num_experts=E // world)).to(w.dtype)
    block.expert_slice = (rank * E // world, (rank + 1) * E // world)


def is_expert_parallel(model) -> bool:
    return any(b.expert_slice is not None for b in moe_blocks(model))


# ==============================================================================================
# 2. Load-balancing loss, with activation statistics averaged across ranks (§2.2)

def _flat_mask(attention_mask, n_rows: int, device):
    """attention_mask (B, T) or (N,) of 0/1 -> float (N,), checked against the router rows."""
    if attention_mask is None:
        return None
    m = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if m.numel() != n_rows:
        raise ValueError(f"attention_mask has {m.numel()} entries but the router logits have {n_rows} rows "
                         "(expected one mask entry per token, shape (B, T) with B*T rows)")
    return m


def slot_counts(logits, top_k: int, mask=None):
    """Top-k slots each expert receives over one layer's rows: logits (N, E), mask (N,) float | None
    -> counts (E,) float (no gradient: top-k is discrete), rows () (unmasked tokens)."""
    ids = torch.topk(logits.detach(), top_k, dim=-1).indices            # (N, k); top-k of logits = of softmax
    w = torch.ones_like(ids, dtype=torch.float32) if mask is None else mask[:, None].expand_as(ids)
    counts = torch.zeros(logits.shape[-1], device=logits.device).index_add_(0, ids.reshape(-1), w.reshape(-1))
    rows = torch.tensor(float(logits.shape[0]), device=logits.device) if mask is None else mask.sum()
    return counts, rows


def _sum_over_ranks(counts, rows, sync: bool, group):
    """counts (any shape) and rows (), summed over the ranks of `group` in one all-reduce when `sync`
    and torch.distributed runs more than one rank there; else returned as they are."""
    if not (sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return counts, rows
    stats = torch.cat([counts.reshape(-1), rows.reshape(1)])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return stats[:-1].reshape(counts.shape), stats[-1]


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None,
                        sync: bool = True, group=None):
    """Switch-style auxiliary loss over all MoE layers, HF `load_balancing_loss_func`'s value:

        aux = E · Σ_e f_e · P_e,  f_e = (top-k slots routed to e) / rows,  P_e = Σ prob_e / rows

    over all layers' rows (a row = one unmasked token at one layer; `attention_mask` (B, T) drops
    padding). Probabilities are softmaxed in fp32 (HF uses the logits' dtype; equal in fp32).

    Across data-parallel ranks (§2.2 "average activation across ranks"; on when `sync` and
    torch.distributed is initialised with >1 ranks in `group`): the slot counts f and the row
    count are all-reduced (no gradient: they are discrete), and each rank returns its SHARE
    `E · Σ_e f_e^global · prob_sum_e^local / rows^global`. The shares of all ranks sum exactly to
    the loss of the concatenated global batch, like each rank's share of the summed CE; the trainer
    applies the one world-size convention to both (train_stage.train_step). On one rank the share
    is the loss. Every rank must call it (it is a collective)."""
    if not router_logits:
        raise ValueError("no router logits given (the model has no MoE layer?)")
    device = router_logits[0].device
    counts = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1])                   # (N, E)
        if logits.shape[-1] != num_experts:
            raise ValueError(f"router logits have {logits.shape[-1]} experts, expected {num_experts}")
        m = _flat_mask(attention_mask, logits.shape[0], device)
        c, r = slot_counts(logits, top_k, m)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)      # (N, E), with gradient
        counts, rows = counts + c, rows + r
        prob_sum = prob_sum + (probs if m is None else probs * m[:, None]).sum(0)
    counts, rows = _sum_over_ranks(counts, rows, sync, group)
    rows = rows.clamp(min=1.0)                                          # all padding: loss 0, not NaN
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()


# ==============================================================================================
# 3. Expert-activation entropy (§2.2), for the training log

class ExpertLoad(NamedTuple):
    load: torch.Tensor           # (L, E) share of the top-k slots each expert received (rows sum to 1)
    entropy: torch.Tensor        # (L,) load entropy in nats; log(E) is perfectly balanced
    max_over_mean: torch.Tensor  # (L,) busiest expert's load over the mean load 1/E (1 is balanced)
    tokens: torch.Tensor         # () tokens counted per layer

    def summary(self) -> dict:
        """Floats for the trainer's log (this reads the tensors back: call it at logging steps):
        mean / min entropy over layers (nats), norm_entropy = mean / log E (1 = balanced),
        max_over_mean (mean over layers), per_layer entropies."""
        E = self.load.shape[-1]
        ent = self.entropy.float().tolist()
        return {"mean_entropy": sum(ent) / len(ent), "min_entropy": min(ent),
                "norm_entropy": sum(ent) / len(ent) / math.log(E) if E > 1 else 1.0,
                "max_over_mean": self.max_over_mean.float().mean().item(), "per_layer": ent}


def load_entropy(load):
    """load (..., E) non-negative, summing to 1 -> entropy (...) in nats (0 · log 0 = 0)."""
    return -(load * torch.log(load.clamp(min=1e-30))).sum(-1)


@torch.no_grad()
def expert_load(router_logits, top_k: int, attention_mask=None, sync: bool = False, group=None) -> ExpertLoad:
    """Per-layer expert load from router logits (sequence of (N, E)): top-k slot shares, their
    entropy and max/mean. Cheap (a top-k per layer, no host sync); `sync=True` all-reduces the
    counts over `group` first so every rank logs the global-batch load."""
    if not router_logits:
        raise ValueError("no router logits given (the model has no MoE layer?)")
    counts, n = [], None
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1])
        c, n = slot_counts(logits, top_k, _flat_mask(attention_mask, logits.shape[0], logits.device))
        counts.append(c)
    counts = torch.stack(counts)                                        # (L, E)
    counts, n = _sum_over_ranks(counts, n, sync, group)
    load = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)         # (L, E)
    return ExpertLoad(load, load_entropy(load), load.amax(-1) * load.shape[-1], n)


# ==============================================================================================
# 4. Calibration: data probing, then per-layer router correction folded into the gate weights

@dataclass
class CalibConfig:
    rank: int = 16               # r: probed directions per layer (the correction's rank)
    steps: int = 200             # Adam steps per layer
    lr: float = 0.1
    kl_weight: float = 3.0       # λ: weight of the text-routing KL (trust region); higher keeps text closer
    l2_weight: float = 1e-3      # μ: pull of the correction towards zero
    temperature: float = 0.05    # final τ of the soft top-k indicator, × the probe logits' std (annealed from 1×)
    ridge: float = 1e-3          # ε: ridge on the text second moment, relative to its mean eigenvalue
    max_tokens: int = 32768      # tokens kept per set and layer (random subset), bounds memory


def contrast_directions(probe_h, anchor_h, rank: int, ridge: float = 1e-3):
    """Probing: the r directions u in which the probe tokens have the most energy relative to the
    anchor (text) tokens, i.e. the top generalised eigenvectors of E_probe[h hᵀ] u = λ E_anchor[h hᵀ] u.
    probe_h (Np, H), anchor_h (Na, H) -> U (H, r), each column scaled to unit RMS of uᵀh on the probe.
    Uncentred moments on purpose: the logit change B Uᵀ h includes the mean of h."""
    if rank < 1:            # V[:, -0:] below would take every column: a full-rank correction, not none
        raise ValueError(f"the correction's rank must be at least 1, got {rank}")
    H = probe_h.shape[1]
    Cp = probe_h.double().T @ probe_h.double() / probe_h.shape[0]      # (H, H)
    Ca = anchor_h.double().T @ anchor_h.double() / anchor_h.shape[0]
    Ca = Ca + ridge * Ca.diagonal().mean().clamp(min=1e-12) * torch.eye(H, dtype=Ca.dtype, device=Ca.device)
    L = torch.linalg.cholesky(Ca)                                       # Ca = L Lᵀ
    X = torch.linalg.solve_triangular(L, Cp, upper=False)               # L⁻¹ Cp
    M = torch.linalg.solve_triangular(L, X.T, upper=False)              # L⁻¹ Cp L⁻ᵀ (symmetric)
    _, V = torch.linalg.eigh((M + M.T) / 2)                             # ascending eigenvalues
    r = min(rank, H)
    U = torch.linalg.solve_triangular(L.T, V[:, -r:].flip(-1), upper=True)   # L⁻ᵀ v, largest first
    U = U / (probe_h.double() @ U).pow(2).mean(0).sqrt().clamp(min=1e-12)
    return U.to(probe_h.dtype)


def soft_load_entropy(logits, top_k: int, temperature: float):
    """Differentiable stand-in for the load entropy: each token's top-k membership is
    σ((z_e - θ)/τ) with θ midway between its k-th and (k+1)-th logit (detached), so it tends to
    the hard top-k indicator as τ -> 0. logits (N, E) -> entropy of the mean membership (nats)."""
    top = torch.topk(logits.detach(), top_k + 1, dim=-1).values         # (N, k+1)
    theta = (top[:, -2:].sum(-1, keepdim=True) / 2)                     # (N, 1)
    member = torch.sigmoid((logits - theta) / temperature)              # (N, E)
    load = member.mean(0)
    return load_entropy(load / load.sum())


def routing_change(logits_before, logits_after, top_k: int):
    """Top-k agreement (mean |S_before ∩ S_after| / k) and mean KL(p_before || p_after) of the router
    distributions, for logits (N, E) of the same tokens."""
    a = torch.topk(logits_before, top_k, dim=-1).indices                # (N, k)
    b = torch.topk(logits_after, top_k, dim=-1).indices
    agree = (a[:, :, None] == b[:, None, :]).any(-1).float().mean()
    lp, lq = F.log_softmax(logits_before.float(), -1), F.log_softmax(logits_after.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return agree.item(), kl.item()


def fit_gate_correction(weight, probe_h, anchor_h, top_k: int, cfg: CalibConfig = CalibConfig()):
    """Automatic calibration of one router: ΔW = B Uᵀ (E, H) with U from `contrast_directions` and
    B (E, r) fitted by Adam to maximise the soft load entropy of the probe tokens while keeping the
    anchor (text) routing: minimise  -H_soft(probe)/log E + λ·KL(p_anchor || p'_anchor) + μ·mean(B²).
    weight (E, H) is the gate's; returns ΔW (E, H) in its dtype. Logits are linear in W, so the
    inner loop needs only the (N, r) projections: it costs O(steps · N · r · E)."""
    E = weight.shape[0]
    if top_k >= E:
        return torch.zeros_like(weight)                                 # every expert always chosen
    W = weight.detach().float()
    probe_h, anchor_h = probe_h.float(), anchor_h.float()
    U = contrast_directions(probe_h, anchor_h, cfg.rank, cfg.ridge)     # (H, r)
    zp0, za0 = probe_h @ W.T, anchor_h @ W.T                            # (Np, E), (Na, E) before
    pp, pa = probe_h @ U, anchor_h @ U                                  # (Np, r), (Na, r)
    logp0 = F.log_softmax(za0, -1)
    B = torch.zeros(E, U.shape[1], device=W.device, requires_grad=True)
    opt = torch.optim.Adam([B], lr=cfg.lr)
    # Anneal τ geometrically from the logits' own scale down to `temperature` × it: a collapsed
    # router has margins of many τ, where a sharp sigmoid has no gradient at all.
    scale = zp0.std(dim=-1).mean().clamp(min=1e-6)
    with torch.enable_grad():
        for step in range(cfg.steps):
            tau = scale * cfg.temperature ** (step / max(cfg.steps - 1, 1))
            ent = soft_load_entropy(zp0 + pp @ B.T, top_k, tau)
            logq = F.log_softmax(za0 + pa @ B.T, -1)
            kl = (logp0.exp() * (logp0 - logq)).sum(-1).mean()
            loss = -ent / math.log(E) + cfg.kl_weight * kl + cfg.l2_weight * B.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (B.detach() @ U.T).to(weight.dtype)


# -- probing a whole model ----------------------------------------------------------------------

def moe_blocks(model) -> list:
    """The SparseMoeBlocks of a Qwen3LM or SAILVL, in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def _forward(model, batch):
    """One forward pass of a SAILVL (input_ids + pixel_values) or a Qwen3LM (input_ids): logits."""
    if hasattr(model, "language_model"):
        return model(batch["input_ids"], batch.get("pixel_values")).logits
    return model(batch["input_ids"])


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_gate_inputs(model, block: SparseMoeBlock, batches, key: str, max_tokens: int, seed: int = 0):
    """Probing: the router inputs (N, H) of `block` over `batches`, keeping the positions where
    `batch[key]` (T,) is true; the forward stops at the block. At most `max_tokens` (random subset)."""
    got = []

    def hook(_, args):
        x = args[0]                                                     # (1, T, H)
        got.append(x.reshape(-1, x.shape[-1])[batch[key].to(x.device)].float())
        raise _StopForward

    with block.register_forward_pre_hook(hook):                        # removed on exit
        for batch in batches:
            if batch[key].any():
                with contextlib.suppress(_StopForward):
                    _forward(model, batch)
    if not got:
        raise ValueError(f"no tokens selected by {key!r} in the calibration data")
    h = torch.cat(got)
    if h.shape[0] > max_tokens:
        g = torch.Generator().manual_seed(seed)
        h = h[torch.randperm(h.shape[0], generator=g)[:max_tokens].to(h.device)]
    return h


def calibrate(model, probe_batches, anchor_batches, cfg: CalibConfig = CalibConfig(), progress: bool = True):
    """Expert-activation-entropy calibration (§2.2; the paper gives no procedure, this is ours).

    Algorithm. For each MoE layer in order, *probe*: run the model (with the layers before already
    calibrated) on the probe set (multimodal samples, all tokens) and on the anchor set (text
    tokens) and record the router inputs h; find the r directions U where probe tokens carry much
    more energy than text tokens (generalised eigenvectors of the two second-moment matrices).
    *Calibrate*: fit B (E, r) by Adam so that the soft top-k load entropy of the probe tokens is
    maximal while KL(text routing before || after) stays small, then fold ΔW = B Uᵀ into the gate:
    W <- W + ΔW. The model is modified in place; returns {layer_index: ΔW}.

    Why this form. A per-expert logit bias (the usual load-balancing knob) cannot be folded exactly
    into HF's bias-free `Linear(H, E)` gate (that needs an input direction constant over all
    tokens), and it moves text and multimodal tokens alike. A rank-r correction along directions
    text hardly uses acts as a bias for the multimodal tokens only, folds exactly into the gate
    weight, and so survives export to any Qwen3-MoE loader (HF included): no new tensor.

    Limits. (1) It can only separate what the router input separates: if multimodal and text
    tokens share the same directions (ratio eigenvalues near 1, e.g. calibrating on text alone,
    which the paper's "on language data" also allows), it degrades to an entropy / text-KL trade-off
    set by `kl_weight`. (2) The entropy objective is a soft surrogate of the hard top-k load; the
    result is measured with the hard load. (3) Layers are fitted one after another, each on the
    hidden states left by the calibrated layers before it; a layer's fit does not look ahead.
    (4) Too little probe data over-fits: judge it on held-out samples (the CLI does)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("calibrate: the model has no MoE layer")
    deltas = {}
    hide = None if progress else True                 # tqdm's None: no bar where stderr is no terminal (a log file)
    for i, block in enumerate(tqdm(blocks, desc="calibrate MoE layers", disable=hide)):
        probe_h = capture_gate_inputs(model, block, probe_batches, "probe_mask", cfg.max_tokens, seed=i)
        anchor_h = capture_gate_inputs(model, block, anchor_batches, "text_mask", cfg.max_tokens, seed=i)
        W = block.gate.weight
        delta = fit_gate_correction(W, probe_h.to(W.device), anchor_h.to(W.device),
                                    block.cfg.num_experts_per_tok, cfg)
        with torch.no_grad():
            W.add_(delta)
        deltas[i] = delta
    return deltas


# -- measuring the effect: hard loads, top-k agreement, next-token KL -------------------------

def _set_gates(blocks, weights):
    with torch.no_grad():
        for b, w in zip(blocks, weights):
            b.gate.weight.copy_(w)


@torch.no_grad()
def compare_routing(model, batches, gates_before, gates_after, key: str = "probe_mask"):
    """Run every batch under both sets of gate weights (the rest of the model is shared) and
    compare over the positions where `batch[key]` is true: per-layer hard load entropy before and
    after, max/mean load, top-k agreement and router KL, and the next-token KL of the model's
    output distribution. Differences at layer l include the effect of the layers before it."""
    blocks = moe_blocks(model)
    captured = []
    hooks = [b.register_forward_hook(lambda mod, args, out: captured.append(out[1].float())) for b in blocks]
    E, k = blocks[0].cfg.num_experts, blocks[0].cfg.num_experts_per_tok
    L = len(blocks)
    counts = {"before": torch.zeros(L, E), "after": torch.zeros(L, E)}
    agree, rkl, nkl, n_tok = torch.zeros(L), torch.zeros(L), 0.0, 0
    try:
        for batch in batches:
            sel = batch[key].reshape(-1)
            if not sel.any():
                continue
            runs = {}
            for name, gates in (("before", gates_before), ("after", gates_after)):
                _set_gates(blocks, gates)
                captured.clear()
                logits = _forward(model, batch)[0].float()                   # (T, V)
                runs[name] = ([c[sel.to(c.device)].cpu() for c in captured], logits[sel.to(logits.device)].cpu())
            n = int(sel.sum())
            for l in range(L):
                zb, za = runs["before"][0][l], runs["after"][0][l]
                for name, z in (("before", zb), ("after", za)):
                    counts[name][l].index_add_(0, torch.topk(z, k, -1).indices.reshape(-1), torch.ones(n * k))
                a, kl = routing_change(zb, za, k)
                agree[l] += a * n
                rkl[l] += kl * n
            lp, lq = F.log_softmax(runs["before"][1], -1), F.log_softmax(runs["after"][1], -1)
            nkl += (lp.exp() * (lp - lq)).sum(-1).sum().item()
            n_tok += n
    finally:
        for h in hooks:
            h.remove()
        _set_gates(blocks, gates_after)
    if n_tok == 0:
        raise ValueError(f"compare_routing: no tokens selected by {key!r}")
    out = {"tokens": n_tok, "topk_agreement": (agree / n_tok).tolist(), "router_kl": (rkl / n_tok).tolist(),
           "next_token_kl": nkl / n_tok, "log_E": math.log(E)}
    for name, c in counts.items():
        load = c / c.sum(-1, keepdim=True)
        out[f"entropy_{name}"] = load_entropy(load).tolist()
        out[f"max_load_{name}"] = (load.amax(-1) * E).tolist()
    return out
