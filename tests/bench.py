"""Benchmarks of SAIL-VL2's speed claims: each times ours and a baseline in the same run and prints the ratio.

    python tests/bench.py attention   packed attention fwd+bwd (paper §5.1). GPU: Triton vs one SDPA with a
                                      dense block-diagonal mask, flex_attention with a document mask, torch's
                                      varlen_attn, an SDPA loop and FA2 (when installed); CPU: the torch path's
                                      two variants
    python tests/bench.py moe         MoE expert SwiGLU layer fwd+bwd (§5.2). GPU: Triton vs the HF-v4 expert
                                      loop and sort + torch._grouped_mm; CPU: the torch reference vs the loop
    python tests/bench.py packing     stream packing vs pad-to-longest on long-tailed streams (§5.1): useful
                                      tokens, per-rank balance; --real adds the synthetic data's own samples
                                      and the tiny model's useful tokens/s, packed vs padded
    python tests/bench.py video       a training sample's frames of a long video: seeking to the keyframe
                                      before each frame (vit.load_video) vs decoding from the start
    python tests/bench.py step        one training step, our Qwen3 vs HF's Qwen3ForCausalLM, same weights
    python tests/bench.py adalrs      pretrain1 with a fixed LR vs with AdaLRS (§3.2.3), from the recipe's vit3
    python tests/bench.py decode      greedy decode, ours (KV cache) vs HF generate, same weights
    python tests/bench.py rollout     RL rollouts vs HF generate (text-only and G rows per image prompt), eager and
                                      compiled; one RL episode with 1 vs 2 processes and its generation share
    python tests/bench.py checkpoint  host memory and time of writing a step checkpoint (weights + AdamW state):
                                      our one-tensor-at-a-time shard writer vs torch.distributed.checkpoint's own
    python tests/bench.py load        host memory of reading an MoE checkpoint stored expert by expert: each
                                      expert copied into its rows vs the experts stacked first
    python tests/bench.py start       rank 0's host memory of a random start under FSDP2: each tensor made alone
                                      as it is scattered vs the whole model made first

`python tests/bench.py NAME --help` lists a bench's options; defaults depend on the device (GPU: the
sizes of the paper's models, CPU: small ones). One timer serves every bench (`timed`). Correctness is
tested in tests/, not here. On a shared CPU, run with OMP_NUM_THREADS=1.
"""
import argparse
import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Sequence

import repo_path

repo_path.add_repo_root()              # the project's files, after transformers has bound HF's `kernels`

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import data  # noqa: E402
import kernels  # noqa: E402
import model as modeling  # noqa: E402
import packing  # noqa: E402
import rl  # noqa: E402
import sample  # noqa: E402
import synth  # noqa: E402
import train_stage  # noqa: E402
import vit  # noqa: E402
from packing import PackingConfig, SampleMeta  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# the one timer, and the HF twin of our LLM that three benches compare against

def timed(fn, repeats: int = 1, reset=(), kernel: bool = False) -> float:
    """Seconds per fn() call, the GPU's queued work included: the fastest of `repeats` calls, each
    after the .grad of the tensors in `reset` is set to None. kernel=True, for calls of a few ms:
    on CUDA the median of triton's do_bench (L2 flushed, 25 ms warm-up, 100 ms of repeats), on CPU
    one warm-up call and the fastest of 5 (CPU boxes are often shared)."""
    cuda = torch.cuda.is_available()
    if kernel and cuda:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(reset),
                                       return_mode="median") / 1e3
    if kernel:
        fn()
        repeats = 5
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = math.inf
    for _ in range(repeats):
        for t in reset:
            t.grad = None
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def hf_twin(lm: modeling.Qwen3LM, dtype=torch.float32):
    """HF transformers' Qwen3ForCausalLM with our LLM's weights in `dtype` (through the HF checkpoint writer)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("this bench compares against HF transformers: pip install -r tests/requirements.txt")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                   # (its "Loading weights" bar between the bench's lines)
    with tempfile.TemporaryDirectory() as d:
        modeling.save_hf_llm(lm, d)
        return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(lm.lm_head.weight.device)


# ----------------------------------------------------------------------------------------------
# attention: packed (cu_seqlens) attention fwd+bwd, kernels.packed_attention vs its baselines

def bench_lengths(total: int, seed: int, lo: int = 64, hi: int = 4096):
    """Fixed-seed sample lengths drawn from U[lo, hi], the last one cut so they sum to `total`."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def time_table(runs, leaves, grad_out, flop_fwd, flop_bwd):
    """Time the forward (autograd on) and forward+backward of each runs[name]() -> output; print
    ms, TFLOP/s and the first method's speed-up (this row's fwd+bwd time / the first row's).
    Returns {name: fwd+bwd ms}; a method that cannot run here is reported and skipped."""
    rows = {}
    for name, run in runs.items():
        try:
            rows[name] = (1e3 * timed(run, kernel=True),
                          1e3 * timed(lambda: run().backward(grad_out), reset=leaves, kernel=True))
        except Exception as exc:  # e.g. out of memory at 32k: must not hide the other methods
            print(f"  {name}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
            torch.cuda.empty_cache()
    first = next(iter(runs))
    print(f"  {'method':26s} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd TF/s':>9} {'bwd TF/s':>9} "
          f"{'f+b TF/s':>9}  {first} speed-up (f+b)")
    for name, (fwd, both) in rows.items():
        ratio = f"{both / rows[first][1]:.2f}x" if first in rows else "-"
        tflops = (flop_fwd / fwd, flop_bwd / max(both - fwd, 1e-6), (flop_fwd + flop_bwd) / both)
        print(f"  {name:26s} {fwd:9.3f} {both:11.3f} "
              + " ".join(f"{x / 1e9:9.4g}" for x in tflops) + f"  {ratio}")
    return {name: both for name, (_, both) in rows.items()}


def bench_attention(args):
    """Packed attention fwd+bwd. GPU: Triton vs one SDPA with a dense block-diagonal mask, compiled
    FlexAttention with a document BlockMask, torch's varlen_attn, a per-sample SDPA loop and FA2
    varlen (if installed). CPU: the torch path's two variants (per-sample loop, masked SDPA), the one
    its rule picks, and the loop on 3-D inputs (SDPA's math path, what the torch path ran before)."""
    if args.lengths[0] > args.lengths[1]:
        raise train_stage.UsageError(f"--lengths LO HI: LO must not exceed HI, got {args.lengths[0]} {args.lengths[1]}")
    gpu = torch.cuda.is_available()
    dev, H, D, causal = "cuda" if gpu else "cpu", args.heads, args.dim, args.causal
    Hkv = args.kv_heads or H
    print(f"packed attention on {torch.cuda.get_device_name() if gpu else 'CPU'}, torch "
          f"{torch.__version__}, triton {triton.__version__}; H={H} Hkv={Hkv} D={D} {args.dtype} "
          f"causal={causal}; lengths U{args.lengths}, seed {args.seed}")
    print("FLOPs: fwd = 4 H D sum_i L_i(L_i+1)/2 (causal; sum L_i^2 otherwise), bwd = 2.5 fwd")
    for T in args.total:
        lengths = bench_lengths(T, args.seed, *args.lengths)
        cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=dev)
        g = torch.Generator(device=dev).manual_seed(args.seed)
        q, k, v, do = (torch.randn(T, h, D, device=dev, dtype=DTYPES[args.dtype], generator=g)
                       for h in (H, Hkv, Hkv, H))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        print(f"\nT={T}: {len(lengths)} samples {lengths}")
        loop = lambda: kernels.packed_attention_torch(q, k, v, cu, causal, method="loop")  # noqa: E731
        if gpu:
            runs = {"triton": lambda: kernels.packed_attention_triton(q, k, v, cu, causal),
                    "sdpa dense block-diag mask": dense_mask_attention(lengths, q, k, v, causal),
                    "sdpa per-sample loop": loop, **flex_document_attention(lengths, q, k, v, causal),
                    **torch_varlen_attention(lengths, q, k, v, cu, causal)}
            try:
                from flash_attn import flash_attn_varlen_func
                runs["flash_attn varlen (FA2)"] = lambda: flash_attn_varlen_func(
                    q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)
            except ImportError:
                pass
            ms = 1e3 * timed(lambda: kernels._attn_block_table(cu, T, kernels._attn_chunk(), causal), kernel=True)
            print(f"triton block table build: {ms:.3f} ms, excluded from its timing (built once "
                  "per step, memoised per cu_seqlens tensor, like a BlockMask)")
        else:
            runs = {"sdpa per-sample loop": loop, "sdpa block-diag mask":
                    lambda: kernels.packed_attention_torch(q, k, v, cu, causal, method="mask"),
                    "loop, 3-D (math path)": math_path_loop(lengths, q, k, v, causal)}
            print(f"the torch path picks: {kernels._torch_attention_method(cu.tolist(), H * D)}")
        flop = 4.0 * H * D * sum(L * (L + 1) // 2 if causal else L * L for L in lengths)
        time_table(runs, (q, k, v), do, flop, 2.5 * flop)
        for kind in ("fwd", "dkdv", "dq"):
            tuned = kernels._attn_tuned_cache.get((kind, kernels._attn_dim_class(D)))
            if getattr(tuned, "best_config", None) is not None:
                print(f"  autotuned {kind}: {tuned.best_config}")


def math_path_loop(lengths, q, k, v, causal):
    """The per-sample loop as the torch path ran it before 2026-12-05: SDPA on 3-D (heads, L, D)
    inputs, which CPU runs on its math path (the whole (L, L) scores), kv heads repeated for GQA."""
    rep = q.shape[1] // k.shape[1]

    def run():
        outs = []
        for qi, ki, vi in zip(*(t.split(lengths) for t in (q, k, v))):
            ki, vi = (t.transpose(0, 1).repeat_interleave(rep, dim=0) for t in (ki, vi))
            outs.append(F.scaled_dot_product_attention(qi.transpose(0, 1), ki, vi, is_causal=causal).transpose(0, 1))
        return torch.cat(outs)
    return run


def dense_mask_attention(lengths, q, k, v, causal):
    """One SDPA over the pack as a batch of 1 (4-D, so SDPA's fused kernels apply) with a
    block-diagonal mask built here, once: like flex's BlockMask it is not timed."""
    mask = kernels._block_diagonal_mask(lengths, causal, q.device)
    rep = q.shape[1] // k.shape[1]

    def run():
        kk, vv = (k, v) if rep == 1 else (t.repeat_interleave(rep, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                             vv.transpose(0, 1)[None], attn_mask=mask)
        return out[0].transpose(0, 1)
    return run


def flex_document_attention(lengths, q, k, v, causal):
    """{name: run} for compiled flex_attention with a (causal) document BlockMask; {} without it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        print("flex_attention: not available in this torch")
        return {}
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                  torch.tensor(lengths, device=q.device))

    def document_mask(b, h, qi, ki):
        same = seg[qi] == seg[ki]
        return same & (qi >= ki) if causal else same

    def build():
        T = q.shape[0]
        return create_block_mask(document_mask, None, None, T, T, device=q.device, _compile=True)
    t0 = time.perf_counter()
    block_mask = build()
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - t0) * 1e3
    print(f"flex BlockMask build: {1e3 * timed(build, kernel=True):.2f} ms (first call, with compile: "
          f"{first_ms:.0f} ms), excluded from its timing")
    compiled = torch.compile(flex_attention)

    def run():
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)
    return {"flex_attention doc mask": run}


def torch_varlen_attention(lengths, q, k, v, cu, causal):
    """{name: run} for torch.nn.attention.varlen.varlen_attn (flash attention over cu_seqlens, the
    same packed (T, H, D) layout as ours); {} with the reason printed where this torch lacks it.
    Causal is `window_size=(-1, 0)` from torch 2.11 on (2.10 took `is_causal`); `enable_gqa` is
    newer than 2.11 (2.13 has it), so for GQA without it the kv heads are repeated inside the run."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        print("torch varlen_attn: skipped (torch.nn.attention.varlen is not in this torch)")
        return {}
    if q.dtype not in (torch.float16, torch.bfloat16):
        print(f"torch varlen_attn: skipped (its flash attention takes bf16 or fp16, not {q.dtype})")
        return {}
    params = inspect.signature(varlen_attn).parameters
    options = {"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in params else {"is_causal": causal}
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and "enable_gqa" in params:
        options["enable_gqa"], rep = True, 1
    longest = max(lengths)

    def run():
        kk, vv = (k, v) if rep == 1 else (t.repeat_interleave(rep, dim=1) for t in (k, v))
        return varlen_attn(q, kk, vv, cu, cu, longest, longest, **options)
    return {"torch varlen_attn": run}


# ----------------------------------------------------------------------------------------------
# moe: the expert layer fwd+bwd, kernels.moe_grouped_mlp vs its baselines

def moe_loop_hf_v4(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Baseline: the HF transformers v4 Qwen3-MoE expert loop (mask, torch.where, index_add_)."""
    E = w_gate.shape[0]
    y = torch.zeros_like(x)
    expert_mask = F.one_hot(topk_ids, E).permute(2, 1, 0)              # (E, k, T)
    for e in range(E):
        slot, tok = torch.where(expert_mask[e])                          # host sync per expert
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())
        ye = (h @ w_down[e].t()) * topk_weights[tok, slot, None].to(h.dtype)
        y.index_add_(0, tok, ye.to(x.dtype))
    return y


def moe_sorted_grouped_mm(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Baseline: sort pairs by expert, torch._grouped_mm per projection (CUTLASS on SM90), un-permute."""
    T, H = x.shape
    E = w_gate.shape[0]
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)                           # group end offsets
    xs = x[order // k]                                                   # (M, H) sorted copy
    g = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)         # (M, I)
    u = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    o = torch._grouped_mm(F.silu(g) * u, w_down.transpose(1, 2), offs=offs)  # (M, H)
    o = o * topk_weights.reshape(-1)[order, None].to(o.dtype)
    y_pairs = torch.empty_like(o).index_copy(0, order, o)               # back to pair order
    return y_pairs.view(T, k, H).sum(1)


def grouped_mm_unavailable(x) -> str:
    """'' when sort+torch._grouped_mm is a fair baseline here (bf16, CUDA SM90/SM100), else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm missing"
    if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return "needs CUDA SM90/SM100 (elsewhere it is an mm loop with host syncs)"
    if x.dtype != torch.bfloat16:
        return "bf16 only"
    return ""


def moe_make_inputs(T, E, k, H, I, dtype, device, routing="uniform", seed=0):
    """Random layer inputs; routing 'uniform' (random top-k) or 'skewed' (half the tokens route
    among 8 hot experts). Weights ~1/sqrt(fan_in) so activations stay O(1)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = randn(T, H)
    w_gate, w_up = randn(E, I, H, scale=H ** -0.5), randn(E, I, H, scale=H ** -0.5)
    w_down = randn(E, H, I, scale=I ** -0.5)
    logits = torch.rand(T, E, generator=g, device=device)
    if routing == "skewed":
        hot = torch.rand(T, generator=g, device=device) < 0.5
        logits[hot, :min(E, max(8, k))] += 2.0
    elif routing != "uniform":
        raise ValueError(f"routing must be 'uniform' or 'skewed', got {routing!r}")
    probs, ids = logits.softmax(-1).topk(k, dim=-1)
    topk_weights = (probs / probs.sum(-1, keepdim=True)).to(dtype)
    dy = randn(T, H)
    return [x, w_gate, w_up, w_down, topk_weights], ids, dy


def bench_moe(args):
    """MoE layer fwd+bwd, the same inputs for every method, per routing. GPU: Triton vs the HF-v4
    expert loop vs sort + torch._grouped_mm; CPU: the sorted torch reference vs the loop."""
    T, E, k, H, I = args.tokens, args.experts, args.topk, args.hidden, args.inter
    gpu = torch.cuda.is_available()
    dtype = DTYPES[args.dtype]
    flop_fwd = 6 * T * k * H * I                                         # 3 GEMMs of 2*T*k*H*I
    print(f"MoE layer: T={T} E={E} k={k} d={H} f={I} {args.dtype} on "
          f"{torch.cuda.get_device_name() if gpu else 'CPU (torch paths only)'}, torch "
          f"{torch.__version__}, triton {triton.__version__}; FLOP fwd {flop_fwd / 1e12:.3g} T, "
          f"fwd+bwd {3 * flop_fwd / 1e12:.3g} T")
    methods = ({"triton": kernels.moe_grouped_mlp_triton} if gpu else
               {"sorted reference": kernels.moe_grouped_mlp_torch})
    if not args.skip_loop:
        methods["loop (HF v4)"] = moe_loop_hf_v4
    first_ms = {}
    for routing in args.routing.split(","):
        leaves, ids, dy = moe_make_inputs(T, E, k, H, I, dtype, "cuda" if gpu else "cpu", routing)
        req = [t.detach().requires_grad_() for t in leaves]
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        print(f"\n[{routing}] tokens per expert: min {int(counts.min())} mean {T * k / E:.0f} "
              f"max {int(counts.max())}")
        if gpu:
            t0 = time.perf_counter()
            kernels.moe_grouped_mlp_triton(*req, ids).backward(dy)   # compile + autotune (first call only)
            torch.cuda.synchronize()
            print(f"triton first call (compile + autotune): {time.perf_counter() - t0:.1f} s")
            bm = kernels._moe_block_m(T * k, E, dtype)
            ms = 1e3 * timed(lambda: kernels._moe_align(ids, E, bm), kernel=True)
            print(f"triton routing alone (sort + block alignment, BLOCK_M={bm}): {ms:.3f} ms (included in "
                  "the layer times)")
            why_not = grouped_mm_unavailable(leaves[0])
            if why_not:
                print(f"sort+grouped_mm: skipped ({why_not})")
            else:
                methods["sort+grouped_mm"] = moe_sorted_grouped_mm
        runs = {name: (lambda fn=fn: fn(*req, ids)) for name, fn in methods.items()}
        first_ms[routing] = time_table(runs, req, dy, flop_fwd, 2 * flop_fwd).get(next(iter(runs)))
    if first_ms.get("uniform") and first_ms.get("skewed"):
        print(f"\n{next(iter(methods))} skewed / uniform fwd+bwd time: "
              f"{first_ms['skewed'] / first_ms['uniform']:.2f}x (target <= 1.5x)")
    return 0


# ----------------------------------------------------------------------------------------------
# packing: stream packing vs pad-to-longest, rank balance; --real: the synthetic data's samples

def synthetic_metas(kind: str, n: int, seed: int = 0, max_tokens: int = 8192) -> list:
    """Long-tailed sample metadata for the benchmark (no tensors).

    "longtail": SFT-like mix; 30% text-only with log-normal length (median 400, sigma 1.1),
                70% images of 1-12 tiles + thumbnail (256 visual tokens per tile, as the 448-px
                tiles of SAIL-ViT after the 2x2 pixel shuffle) with a log-normal text part
                (median 150, sigma 1.0).
    "anyres":   AnyRes-like; 25% text-only as above, 75% one image whose side is log-uniform in
                224..1792 px -> (side / 28)^2 = 64..4096 visual tokens (patch 14, 2x2 shuffle),
                plus log-normal text. Lengths are clipped to max_tokens."""
    rng = random.Random(seed)
    metas = []
    for i in range(n):
        text_only = rng.random() < (0.3 if kind == "longtail" else 0.25)
        if text_only:
            n_vis, n_img, text = 0, 0, int(rng.lognormvariate(math.log(400), 1.1))
        elif kind == "longtail":
            tiles = min(12, max(1, int(rng.expovariate(1 / 3.0)) + 1))
            n_img = tiles + (tiles > 1)                      # thumbnail when tiled
            n_vis, text = 256 * n_img, int(rng.lognormvariate(math.log(150), 1.0))
        elif kind == "anyres":
            side = math.exp(rng.uniform(math.log(224), math.log(1792)))
            n_img, n_vis = 1, int(side / 28) ** 2
            text = int(rng.lognormvariate(math.log(150), 1.0))
        else:
            raise ValueError(f"synthetic_metas: unknown kind {kind!r} (longtail, anyres)")
        n_tok = min(max_tokens, n_vis + max(8, text))
        metas.append(SampleMeta(i, n_tok, min(n_vis, n_tok), n_img))
    return metas


def padding_useful_fraction(lengths: Sequence[int], batch_size: int, grouped: bool) -> float:
    """Useful-token fraction of pad-to-longest batches of `batch_size` samples in stream order,
    or length-grouped (LLaVA's group_by_length: sort megabatches of 50 batches, then split)."""
    lengths = list(lengths)
    if grouped:
        mega = 50 * batch_size
        lengths = [L for s in range(0, len(lengths), mega) for L in sorted(lengths[s:s + mega], reverse=True)]
    useful = padded = 0
    for s in range(0, len(lengths), batch_size):
        batch = lengths[s:s + batch_size]
        useful += sum(batch)
        padded += max(batch) * len(batch)
    return useful / padded


def bench_fill(metas, cfg: PackingConfig, batch_size: int):
    """(pad-to-longest random, pad-to-longest grouped, stream packing) useful fractions, packs, forced."""
    lengths = [m.n_tokens for m in metas]
    packer = packing.StreamPacker(cfg)
    plans = []
    for m in metas:
        packer.push(m)
        if packer.full:
            plans.append(packer.pop())
    while (plan := packer.pop()) is not None:
        plans.append(plan)
    packed = sum(m.n_tokens for p in plans for m in p) / (len(plans) * cfg.max_tokens)
    return (padding_useful_fraction(lengths, batch_size, False),
            padding_useful_fraction(lengths, batch_size, True), packed, len(plans), packer.stats["forced"])


def bench_balance(metas, cfg: PackingConfig, n_ranks: int, steps: int, hidden_size: int = 4096):
    """Mean over steps of max/mean per-rank visual tokens and work: naive (no visual packing,
    round-robin packs) vs balanced (work only) vs visual packing (pack steering + 2-D balance)."""
    out = {}
    for name, visual_packing, assign in (("naive", False, "rr"), ("work-balanced", False, "work"),
                                         ("visual packing", True, "visual")):
        c = PackingConfig(**{**asdict(cfg), "visual_packing": visual_packing})
        stream = packing.pack_stream(itertools.cycle(metas), c)   # endless: as many steps as asked
        ratios_v, ratios_w, worst_v = [], [], 0.0
        for _ in range(steps):
            plans = list(itertools.islice(stream, n_ranks * c.micro_batches))
            groups = (packing.round_robin(len(plans), n_ranks) if assign == "rr" else
                      packing.balance_packs(plans, n_ranks, hidden_size, visual=(assign == "visual")))
            v = [sum(packing.pack_visual(plans[j]) for j in g) for g in groups]
            w = [sum(packing.pack_work(plans[j], hidden_size) for j in g) for g in groups]
            ratios_v.append(max(v) / (sum(v) / n_ranks))
            ratios_w.append(max(w) / (sum(w) / n_ranks))
            worst_v = max(worst_v, ratios_v[-1])
        out[name] = (sum(ratios_v) / steps, worst_v, sum(ratios_w) / steps)
    return out


def print_fill_and_balance(streams: dict, cfg: PackingConfig, batch_size: int, ranks: int, steps: int,
                           hidden_size: int = 4096) -> None:
    """Parts [1] and [2] of the bench for {name: metas} streams."""
    print(f"\n[1] useful-token fraction (padding baseline: batches of {batch_size} samples)")
    print(f"{'distribution':<12} {'samples':>8} {'mean len':>9} {'pad random':>11} {'pad grouped':>12} "
          f"{'stream pack':>12} {'packs':>6} {'forced':>7}")
    for kind, metas in streams.items():
        rnd, grp, packed, n_packs, forced = bench_fill(metas, cfg, batch_size)
        mean_len = sum(m.n_tokens for m in metas) / len(metas)
        print(f"{kind:<12} {len(metas):>8} {mean_len:>9.0f} {rnd:>11.1%} {grp:>12.1%} {packed:>12.1%} "
              f"{n_packs:>6} {forced:>7}")
    print(f"\n[2] per-rank balance over {ranks} ranks x {cfg.micro_batches} micro-batches, "
          f"{steps} steps: max/mean per step, mean (worst)")
    print(f"{'distribution':<12} {'assignment':<16} {'visual tokens':>18} {'LLM work':>10}")
    for kind, metas in streams.items():
        for name, (mv, wv, mw) in bench_balance(metas, cfg, ranks, steps, hidden_size).items():
            print(f"{kind:<12} {name:<16} {mv:>10.3f} ({wv:.3f}) {mw:>10.3f}")


def bench_packing(args):
    """Stream packing vs pad-to-longest: useful tokens and per-rank balance on long-tailed synthetic
    streams; with --real also on the synthetic data's own samples, and the tiny model's useful
    tokens/s, packed vs padded."""
    cfg = PackingConfig(max_tokens=args.max_tokens, buffer_size=args.buffer_size,
                        micro_batches=args.micro_batches, max_images_per_pack=args.max_images)
    streams = {kind: synthetic_metas(kind, args.samples, args.seed, cfg.max_tokens) for kind in ("longtail", "anyres")}
    print(f"packing bench: buffer={cfg.buffer_size} max_images/pack={cfg.max_images_per_pack} "
          f"ranks={args.ranks} micro_batches={cfg.micro_batches}; max_tokens={cfg.max_tokens}")
    print_fill_and_balance(streams, cfg, args.batch_size, args.ranks, args.steps)
    if args.real:
        print()
        bench_packing_real(args)
    else:
        print("\n(the synthetic data's own samples and tokens/s of the tiny model, packed vs padded: --real)")


def collate_padded(samples: Sequence[dict], pad_id: int = 0) -> dict:
    """The baseline the paper's packing replaces: right-pad to the longest sample.

    Pads are at the end of each row, so causal attention never lets a real token see one, and
    their labels are -100; no attention mask is needed. input_ids/labels/position_ids (B, Lmax)."""
    for i, s in enumerate(samples):
        packing.check_sample(s, i)
    Lmax = max(s["input_ids"].numel() for s in samples)
    B = len(samples)
    input_ids = torch.full((B, Lmax), pad_id, dtype=torch.long)
    labels = torch.full((B, Lmax), packing.IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        L = s["input_ids"].numel()
        input_ids[b, :L] = s["input_ids"]
        labels[b, :L] = s["labels"]
    pvs = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    if not pvs:
        pixel_values = None
    elif all(isinstance(p, torch.Tensor) for p in pvs):
        pixel_values = torch.cat(pvs)
    else:
        pixel_values = [im for p in pvs for im in (p.split(1) if isinstance(p, torch.Tensor) else p)]
    return dict(input_ids=input_ids, labels=labels,
                position_ids=torch.arange(Lmax).expand(B, Lmax).clone(), pixel_values=pixel_values)


def bench_packing_real(args):
    """Real samples of every synthetic train manifest (tiny preset geometry): packing fill and
    rank balance as above, then useful tokens/s of one tiny SAILVL forward + backward over the
    same samples, pad-to-longest batches vs stream packs."""
    mcfg = modeling.preset_config("tiny")
    dcfg = data.DataConfig.from_model(mcfg)
    root = synth.ensure_synth(args.synth_dir, progress=False)
    tok = data.load_tokenizer(root)                                     # the synthetic data's own BPE
    rng = random.Random(args.seed)
    samples = []
    for path in sorted(root.glob("*/train.jsonl")):
        ds = data.JsonlDataset(path, tok, dcfg)
        for i in rng.sample(range(len(ds)), min(args.per_family, len(ds))):
            samples.append({**ds[i], "family": path.parent.name, "weight": len(ds)})
    # a stream drawn from the loaded samples, each family in proportion to its manifest size
    metas = [packing.sample_meta(s, i) for i, s in enumerate(samples)]
    per_family = {f: sum(1 for s in samples if s["family"] == f) for f in {s["family"] for s in samples}}
    picks = rng.choices(range(len(metas)), weights=[s["weight"] / per_family[s["family"]] for s in samples],
                        k=args.samples)
    stream = [metas[j]._replace(index=k) for k, j in enumerate(picks)]
    pcfg = PackingConfig(max_tokens=args.tiny_max_tokens, micro_batches=4)
    print(f"synthetic manifests, tiny preset: {len(samples)} samples loaded, a stream of {len(stream)}; "
          f"packs of {args.tiny_max_tokens} tokens")
    print_fill_and_balance({"synthetic": stream}, pcfg, 16, 8, 100, mcfg.llm_config.hidden_size)

    torch.set_num_threads(args.threads)       # 1 by default: waiting OpenMP threads make timings noisy
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = modeling.build_model("tiny").train().to(device)
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)
    padded = [collate_padded([samples[i] for i in order[k:k + args.tiny_batch_size]])
              for k in range(0, len(order), args.tiny_batch_size)]
    plans = packing.plan_packs([metas[i] for i in order], PackingConfig(max_tokens=args.tiny_max_tokens,
                                                                        max_images_per_pack=10 ** 6))
    packed = [packing.collate_pack([samples[m.index] for m in p], p) for p in plans]
    to_dev = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    padded, packed = [to_dev(b) for b in padded], [to_dev(b) for b in packed]
    useful = sum(s["input_ids"].numel() for s in samples)

    # on a GPU under bf16 autocast as the trainer runs there: both sides on their fast attention kernels
    # (packed: the Triton varlen kernel; padded: SDPA's flash kernel, which fp32 would reduce to its math path)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"

    def run(batches, is_packed):
        for b in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = net(b["input_ids"], pixel_values=b["pixel_values"], labels=b["labels"],
                          position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"] if is_packed else None)
            out.ce_sum.backward()              # summed CE: the global token mean only rescales it
            net.zero_grad(set_to_none=True)

    run(padded[:1], False), run(packed[:1], True)                       # warm-up
    t_pad, t_pack = [], []
    for _ in range(args.repeats):                                        # alternate: same machine load
        t_pad.append(timed(lambda: run(padded, False)))
        t_pack.append(timed(lambda: run(packed, True)))
    med_pad, med_pack = sorted(t_pad)[args.repeats // 2], sorted(t_pack)[args.repeats // 2]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n[3] tiny SAILVL forward+backward, {precision}, {where}, {len(samples)} "
          f"samples, {useful} useful tokens, median of {args.repeats}")
    for name, batches, t in ((f"pad-to-longest, {args.tiny_batch_size} samples", padded, med_pad),
                             (f"stream packs, {args.tiny_max_tokens} tokens", packed, med_pack)):
        computed = sum(b["input_ids"].numel() for b in batches)
        print(f"  {name:<28} computed {computed:>7} | useful {useful / computed:6.1%} | {t:6.2f} s | "
              f"{useful / t:8,.0f} useful tok/s")
    print(f"packed / padded useful tokens/s: {med_pad / med_pack:.2f}x")


# ----------------------------------------------------------------------------------------------
# video: frames by seeking against decoding from the start

def write_long_video(path: str, seconds: int, size: int, gop: int, fps: int = 25):
    """An MPEG-4 video (as the synthetic data's) of a square crossing a gradient, a keyframe every `gop` frames."""
    import av
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps, options={"sc_threshold": "1000000000"})
        s.width = s.height = size
        s.pix_fmt, s.bit_rate, s.codec_context.gop_size = "yuv420p", 2_000_000, gop
        for i in range(seconds * fps):
            a = np.repeat(((ramp[None, :] + ramp[:, None] + 3 * i) % 256)[..., None], 3, -1).astype(np.uint8)
            x = (7 * i) % (size - size // 8)
            a[x:x + size // 8, x:x + size // 8] = (220, 40, 40)
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode())


def bench_video(args):
    """The frames of one training sample (uniform segments, a random frame in each, §6.1) of a long
    video: vit.load_video, which seeks to the keyframe before each frame, vs the way before, one
    decode from frame 0 to the last frame wanted; the frames are checked equal."""
    import av
    from PIL import Image
    with tempfile.TemporaryDirectory(prefix="video_bench_") as tmp:
        path = os.path.join(tmp, "long.mp4")
        t0 = time.perf_counter()
        write_long_video(path, args.seconds, args.size, args.gop)
        n = args.seconds * 25
        print(f"video: {args.seconds} s at 25 fps ({n} frames), {args.size}x{args.size} MPEG-4, a keyframe every "
              f"{args.gop} frames (written in {time.perf_counter() - t0:.1f} s); {args.frames} frames per sample "
              f"(training's random frame per segment), best of {args.repeats}")

        idx = vit.frame_indices(n, args.frames, True, np.random.default_rng(0))

        def seeking():
            return vit.video_frames(path, args.frames, training=True, rng=np.random.default_rng(0))

        def from_start():
            got = {}
            with av.open(path) as c:
                for i, frame in enumerate(c.decode(video=0)):
                    if i in idx:
                        got[i] = frame.to_image()
                    if i == max(idx):
                        break
            return [got[i] for i in idx]

        def tiles(frames):
            return vit.to_pixels([f.resize((args.tile, args.tile), Image.BICUBIC) for f in frames])
        frames = from_start()
        same = torch.equal(tiles(seeking()), tiles(frames))
        t_seek, t_start = timed(seeking, args.repeats), timed(from_start, args.repeats)
        t_tiles = timed(lambda: tiles(frames), args.repeats)              # the same work after either way
        print(f"                     frames     frames + {args.tile}-px tiles (vit.load_video)")
        print(f"  from the start  {t_start * 1e3:9.1f} ms {(t_start + t_tiles) * 1e3:9.1f} ms")
        print(f"  seeking         {t_seek * 1e3:9.1f} ms {(t_seek + t_tiles) * 1e3:9.1f} ms")
        print(f"  speed-up        {t_start / t_seek:9.1f}x   {(t_start + t_tiles) / (t_seek + t_tiles):9.1f}x   "
              f"(frames identical: {same})")


# ----------------------------------------------------------------------------------------------
# step, adalrs: the training step against HF's, and AdaLRS against a fixed LR

def bench_step(args):
    """Tokens/s of one training step (forward + backward + AdamW) of a preset's LLM, ours vs
    HF transformers' Qwen3ForCausalLM with the same weights and inputs, measured in one run."""
    torch.manual_seed(0)
    ours = modeling.build_model(args.preset).language_model.train()
    hf = hf_twin(ours).train()
    ids = torch.randint(0, min(256, ours.cfg.vocab_size), (args.batch, args.seq))

    def step_fn(m, is_hf):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            logits = m(ids).logits if is_hf else m(ids)
            ce, n = modeling.shifted_cross_entropy(logits, ids)
            (ce / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(ce.detach() / n)
        return step

    runs = {"ours": step_fn(ours, False), "hf": step_fn(hf, True)}
    first = {k: f() for k, f in runs.items()}                           # warm-up; same weights, same loss
    best = {k: timed(f, args.repeats) for k, f in runs.items()}
    tok = args.batch * args.seq
    print(f"train step (fwd+bwd+AdamW), {args.preset} LLM ({modeling.count_params(ours) / 1e6:.2f}M params), batch "
          f"{args.batch}x{args.seq}, fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"  first-step loss: ours {first['ours']:.5f} | HF {first['hf']:.5f}")
    print(f"  ours {tok / best['ours']:10,.0f} tok/s | HF Qwen3 {tok / best['hf']:10,.0f} tok/s | "
          f"ratio ours / HF {best['hf'] / best['ours']:.2f}x")


def final_eval_loss(folder: str) -> float:
    with open(os.path.join(folder, "meta.json")) as f:
        return float(json.load(f)["eval_loss"])


def bench_adalrs(args):
    """pretrain1 (tiny) with a fixed LR vs with AdaLRS from the same start and the same data, for
    several seeds, through `train_stage.run_stage` (the stage table the CLI uses); held-out loss at the end."""
    init = args.init_from or train_stage.stage_dir(train_stage.StageConfig(out_dir=args.out_dir), "vit3")
    if not modeling.is_finished_stage(init):
        raise train_stage.UsageError(f"bench adalrs starts pretrain1 from {init}, which is missing: run the "
                                     f"recipe up to vit3 first, or pass --init-from=DIR")
    lm0 = train_stage.stage_dir(train_stage.StageConfig(out_dir=args.out_dir), "lm0")
    diffs = []
    with tempfile.TemporaryDirectory(prefix="adalrs_bench_") as tmp:
        for seed in range(args.seeds):
            res = {}
            for name, on in (("fixed", "false"), ("adalrs", "true")):
                out = os.path.join(tmp, f"{name}{seed}")
                os.makedirs(out)
                for src, dst in ((init, "vit3"), (lm0, "lm0")):         # pretrain1's sources, per its init rule
                    shutil.copytree(src, os.path.join(out, dst))
                res[name] = final_eval_loss(train_stage.run_stage(
                    "pretrain1", [f"--out_dir={out}", f"--adalrs={on}", f"--data_dir={args.data_dir}",
                                  f"--lr={args.lr}", f"--seed={1337 + seed}", f"--step_scale={args.step_scale}"]))
            diffs.append(res["fixed"] - res["adalrs"])
            print(f"seed {seed}: held-out loss fixed LR {args.lr:g} {res['fixed']:.4f} | AdaLRS {res['adalrs']:.4f} "
                  f"| fixed - AdaLRS = {diffs[-1]:+.4f}")
    print(f"mean over {args.seeds} seeds: fixed - AdaLRS = {sum(diffs) / len(diffs):+.4f} "
          f"(paper §3.2.1, full scale: > +0.06)")


# ----------------------------------------------------------------------------------------------
# decode, rollout: generation against HF generate on the same weights

def bench_decode(args):
    """Greedy decode tokens/s of our Qwen3LM (KV cache) vs HF `generate` on the same weights, one run."""
    torch.manual_seed(0)
    lm = (modeling.SAILVL.from_pretrained(args.ckpt) if args.ckpt else modeling.build_model(args.preset)).language_model.eval()
    hf = hf_twin(lm).eval()
    V = lm.cfg.vocab_size
    prompts = torch.randint(0, min(V, 256), (args.batch, args.prompt_len)).tolist()
    n = args.new_tokens

    def ours():
        return lm.generate(prompts, max_new_tokens=n)

    def theirs():
        with torch.no_grad():
            ids = torch.tensor(prompts)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

    same = ours() == theirs()                                            # also a warm-up of both
    times = {"ours": [], "hf": []}
    for _ in range(args.repeats):                                        # alternate: same machine load
        for name, fn in (("ours", ours), ("hf", theirs)):
            times[name].append(timed(fn))
    tps = {k: args.batch * n / min(v) for k, v in times.items()}
    print(f"decode, {args.preset if not args.ckpt else args.ckpt}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{n} new tokens, fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"  ours (KV cache)     {tps['ours']:9.1f} tok/s")
    print(f"  HF generate         {tps['hf']:9.1f} tok/s")
    print(f"  ratio ours / HF     {tps['ours'] / tps['hf']:9.2f}x   (greedy outputs identical: {same})")


def hf_generate(hf, embeds: list, max_new: int, stop=(), suppress=(), min_new: int = 0) -> list:
    """HF generate on left-padded prompt embeddings (one row each), sampling at T = 1 -> id lists
    cut after each row's first stop token."""
    L = max(e.shape[0] for e in embeds)
    x = torch.stack([torch.nn.functional.pad(e, (0, 0, L - e.shape[0], 0)) for e in embeds]).to(hf.dtype)
    mask = torch.stack([torch.arange(L, device=x.device) >= L - e.shape[0] for e in embeds]).long()
    out = hf.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=min_new,
                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, pad_token_id=0,
                      eos_token_id=list(stop) or None, suppress_tokens=list(suppress) or None)
    return [r[:next((k + 1 for k, t in enumerate(r) if t in stop), len(r))] for r in out.tolist()]


def interleaved(engines: dict, repeats: int) -> dict:
    """{engine: (best wall s, best CPU s, generated tokens, first call s)}; the engines take turns,
    so a loaded machine slows them alike (CPU seconds are the steadier measure there)."""
    def one(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        rows = fn()
        return time.perf_counter() - t0, time.process_time() - c0, sum(len(r) for r in rows)
    first = {name: one(fn)[0] for name, fn in engines.items()}
    best = {name: (float("inf"), float("inf"), 0) for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            wall, cpu, n = one(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu), n)
    return {name: (*best[name], first[name]) for name in engines}


def print_engines(title: str, res: dict):
    print(title)
    hf_wall, hf_cpu, hf_n, _ = res["hf"]
    for name, (wall, cpu, n, first) in res.items():
        extra = f" | first call (compiling) {first:5.1f} s" if name in ("compiled", "graphs") else ""
        print(f"  {name:9s} {n / wall:9,.0f} tok/s, {n / wall / (hf_n / hf_wall):5.2f}x HF | per CPU second "
              f"{n / cpu:9,.0f} tok, {n / cpu / (hf_n / hf_cpu):5.2f}x HF | {n} tokens{extra}")


def print_decode_steps(res: dict, names: list, steps: int):
    """The whole call split into its first token (the prefill, the same work in every engine) and
    the decode steps after it: (whole call - a 1-token call) / steps, the time per output token;
    returns those, {engine: s per step}."""
    per_step = {name: (res[name][0] - res[name + "@1"][0]) / steps for name in names}
    print(f"  after the first token ({steps} steps): " + ", ".join(
        f"{name} {1e3 * t:.2f} ms/step ({per_step['hf'] / t:.2f}x HF)" for name, t in per_step.items())
        + " | first token: " + ", ".join(f"{name} {1e3 * res[name + '@1'][0]:.0f} ms" for name in names))
    return per_step


def step_profile(call, first, steps: int) -> dict:
    """Self CPU seconds per decode step of the compiled engine by kind, from torch.profiler: (the
    whole call - a 1-token call) / steps, each call the least of 3 profiled. Products: aten::mm;
    attention: SDPA; fused kernels: inductor's compiled graph (its C++ kernels report no events of
    their own); guards: Dynamo's cache lookup; other: every other op (the loop's bookkeeping,
    sampling's ops inductor leaves to aten, allocations)."""
    from torch.profiler import ProfilerActivity, profile

    def kinds(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        out = dict.fromkeys(("products", "attention", "fused kernels", "guards", "other"), 0.0)
        for e in prof.key_averages():
            kind = ("products" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else
                    "attention" if "scaled_dot_product" in e.key else
                    "fused kernels" if e.key.startswith("## Call CompiledFxGraph") else
                    "guards" if e.key == "TorchDynamo Cache Lookup" else "other")
            out[kind] += e.self_cpu_time_total / 1e6
        return out
    whole, one = (min((kinds(fn) for _ in range(3)), key=lambda d: sum(d.values())) for fn in (call, first))
    return {k: (whole[k] - one[k]) / steps for k in whole}


def attention_alone(q, kv, mask, evict=None) -> float:
    """Seconds of SDPA over each layer's (k, v) once, the fastest of 30 rounds; evict(): run before
    each call and not timed (writing more than the last-level cache holds leaves the KV cold)."""
    best = math.inf
    for _ in range(30):
        total = 0.0
        for k, v in zip(kv[::2], kv[1::2]):
            if evict is not None:
                evict()
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            total += time.perf_counter() - t0
        best = min(best, total)
    return best


def print_step_breakdown(lm, rows: list, n: int, step_s: float, call, first):
    """Where a compiled decode step's `step_s` goes (--breakdown): a profile of the real call
    (step_profile), and beside it the step's matrix products run alone (each F.linear at the
    batch's rows, eager) and its attention run alone (SDPA over each layer's KV cache at the call's
    mean length), with the cache warm and with it evicted before each call, as in the step, where
    each layer's cache is read once per step and the rest of the step runs in between; the rates
    beside this machine's: one 2048² product, one 256 MB copy (read + write)."""
    cfg, B, L = lm.cfg, len(rows), rows[0].shape[0]
    S, Hkv, hd, dev = L + n // 2, cfg.num_key_value_heads, cfg.head_dim, rows[0].device
    weights = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]   # lm_head too, tied or not
    x = {w.shape[1]: torch.randn(B, w.shape[1], device=dev) for w in weights}
    products = timed(lambda: [F.linear(x[w.shape[1]], w) for w in weights], repeats=50)   # ~1 ms each
    flop = 2 * B * sum(w.numel() for w in weights)
    q = torch.randn(B, cfg.num_attention_heads, 1, hd, device=dev)
    kv = [torch.randn(B, Hkv, S + n, hd, device=dev)[:, :, :S] for _ in range(2 * cfg.num_hidden_layers)]
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=dev)
    kv_bytes = sum(t.numel() for t in kv) * 4
    a, big, out = torch.randn(2048, 2048), torch.randn(2 ** 26), torch.empty(2 ** 26)
    flush = torch.empty(2 ** 24)                     # 64 MB written before each call: twice this machine's L3
    warm, cold = attention_alone(q, kv, mask), attention_alone(q, kv, mask, evict=lambda: flush.fill_(0))
    peak = 2 * 2048 ** 3 / timed(lambda: a @ a, kernel=True)
    copy = 2 * big.numel() * 4 / timed(lambda: out.copy_(big), kernel=True)
    prof = step_profile(call, first, n - 1)
    gb = lambda t: f"{kv_bytes / t / 1e9:.1f} GB/s"                     # noqa: E731
    print(f"  the compiled step's {1e3 * step_s:.2f} ms, profiled ({1e3 * sum(prof.values()):.2f} ms with the "
          f"profiler's own cost): matrix products {1e3 * prof['products']:.2f} ms "
          f"({flop / prof['products'] / 1e9:.0f} GFLOP/s; run alone {1e3 * products:.2f} ms, "
          f"{flop / products / 1e9:.0f} GFLOP/s; one 2048² product: {peak / 1e9:.0f}), attention "
          f"{1e3 * prof['attention']:.2f} ms ({kv_bytes / 1e6:.1f} MB of cache at {gb(prof['attention'])}; run alone "
          f"{1e3 * warm:.2f} ms with the cache warm, {gb(warm)}, {1e3 * cold:.2f} ms with it evicted, {gb(cold)}; "
          f"a 256 MB copy: {copy / 1e9:.1f} GB/s), inductor's fused kernels {1e3 * prof['fused kernels']:.2f} ms, "
          f"Dynamo's guards {1e3 * prof['guards']:.2f} ms, other ops {1e3 * prof['other']:.2f} ms")


def rollout_engines(lm, rows, n, stop=(), gen_kw=None, hf_rows=None, hf_kw=None, compile=True, low=None) -> dict:
    """{engine: a call}: ours eager, compiled and (CUDA) graphed, and HF generate. `low` (bf16): ours
    under autocast to it with `lm`'s matrices held in it (as RL generates on a GPU: rl.generation_copy),
    HF's model wholly in it."""
    def ours(mode):
        generator = torch.Generator(rows[0].device).manual_seed(0)
        with_autocast = torch.autocast(rows[0].device.type, dtype=low) if low else contextlib.nullcontext()

        def call():
            with with_autocast:
                return modeling.generate_from_embeds(lm, rows, n, 1.0, 1.0, stop, generator.manual_seed(0),
                                                     logprobs=[], compile=mode, **(gen_kw or {}))
        return call
    hf = hf_twin(lm, low or torch.float32).eval()
    engines = {"eager": ours(False), "hf": lambda: hf_generate(hf, hf_rows or rows, n, stop, **(hf_kw or {}))}
    if compile:
        engines["compiled"] = ours(True)
    if compile and rows[0].is_cuda:
        engines["graphs"] = ours("graphs")                              # compiled, decode steps as CUDA graphs
    return engines


def rl_setup(preset: str, n_prompts: int, data_dir: str = data.DEFAULT_SYNTH_DIR):
    """The tiny rl-verifiable stage's config, tokenizer and first prompts (images included), from the
    synthetic data in `data_dir` (generated there first if missing)."""
    cfg, _ = rl.rl_config([f"--data_dir={data_dir}"])
    sailvl = modeling.build_model(preset).eval()
    cfg = rl.resolve_algo(cfg, sailvl.cfg)
    tok = data.load_tokenizer(synth.ensure_synth(cfg.data_dir, progress=False))
    dcfg = rl.prompt_data_config(cfg, sailvl.cfg)
    return sailvl, cfg, tok, rl.read_prompts(cfg, tok, dcfg, "train", n_prompts)


def bench_rollout(args):
    """Rollout generation (§4.2.3): tokens/s of model.generate_from_embeds, eager and compiled (on CUDA
    also compiled with its decode steps as CUDA graphs), vs HF transformers' generate on the same
    weights, sampling at T = 1, engines interleaved. In fp32, or with --dtype=bf16 (the default on CUDA) as
    RL generates there: our LLM's matrices in bf16 under bf16 autocast, HF's model in bf16.
    text: the tiny LLM, random prompts, no stop token. rl: the tiny SAILVL on image prompts of the
    rl-verifiable mix, G rows per prompt (ours prefills each prompt once, HF gets it G times), the
    stage's token limit, stop tokens, banned ids and tokenizer size. Then one RL episode (rollouts
    + updates) under torchrun with 1 and with 2 processes on the same total rollouts."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    low = torch.bfloat16 if dtype == "bf16" else None
    if args.breakdown and (dev.type != "cpu" or low):
        raise train_stage.UsageError("--breakdown profiles the CPU's fp32 decode step: give --device=cpu --dtype=fp32")
    print(f"rollout engine vs HF generate, {dtype}, sampling T=1, {where}, best of {args.repeats} (engines interleaved)")
    with torch.inference_mode():
        if args.case in ("text", "both"):
            lm = modeling.build_model(args.preset).eval().language_model.to(dev)
            ids = torch.randint(0, 256, (args.batch, args.prompt_len), device=dev)
            rows = list(lm.model.embed_tokens(ids))
            if low:
                modeling.hold_matrices_in(lm, low)
            engines = rollout_engines(lm, rows, args.new_tokens, hf_kw={"min_new": args.new_tokens}, compile=args.compile,
                                      low=low)
            first = rollout_engines(lm, rows, 1, hf_kw={"min_new": 1}, compile=args.compile, low=low)   # prefill + 1 token
            res = interleaved({**engines, **{name + "@1": fn for name, fn in first.items()}}, args.repeats)
            print_engines(f"text: {args.preset} LLM, {args.batch} rows, prompt {args.prompt_len}, "
                          f"{args.new_tokens} new tokens", {name: res[name] for name in engines})
            per_step = print_decode_steps(res, list(engines), args.new_tokens - 1)
            if args.breakdown and "compiled" in per_step:
                print_step_breakdown(lm, rows, args.new_tokens, per_step["compiled"], engines["compiled"],
                                     first["compiled"])
        if args.case in ("rl", "both"):
            sailvl, cfg, tok, prompts = rl_setup(args.preset, args.prompts, args.synth_dir)
            sailvl.to(dev)
            lm, G = sailvl.language_model, args.group
            stop, banned = sorted(sample.stop_ids(tok)), rl.banned_ids(tok)
            flat = torch.tensor([t for p in prompts for t in p.ids], device=dev)[None]
            x = sailvl.embed(flat, modeling.on_device(sample.concat_pixels([p.pixels for p in prompts]), dev))[0]
            unique = list(x.split([len(p.ids) for p in prompts]))
            suppress = list(banned) + list(range(tok.n_vocab, lm.cfg.vocab_size))
            if low:
                modeling.hold_matrices_in(lm, low)
            engines = rollout_engines(lm, unique, cfg.max_new_tokens, stop,
                                      {"n_valid_tokens": tok.n_vocab, "banned": banned, "repeats": G},
                                      [e for e in unique for _ in range(G)], {"suppress": suppress}, args.compile, low)
            print_engines(f"rl: {args.preset} SAILVL, {len(prompts)} image prompts x G = {G}, up to "
                          f"{cfg.max_new_tokens} new tokens, per-token log-probs", interleaved(engines, args.repeats))
    if args.episode_procs:
        episode_scaling(args)


def worker_result(cmd: list, env: dict) -> dict:
    """A worker process's result, the JSON of its last output line; a failed worker's own error
    (its stderr's tail) is raised, not only its command line."""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        worker = cmd[cmd.index(os.path.abspath(__file__)) + 1]                   # rl-episode | ckpt-worker
        raise RuntimeError(f"bench.py {worker} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def episode_scaling(args):
    """One RL episode (rollouts of prompts x G, then the updates) with 1 and with N processes on the
    same total rollouts, each process one thread: each rank samples and trains on its share. The
    two alternate --episode-repeats times (this machine's speed drifts); the median ratio counts."""
    ratios, shares = [], []
    for rep in range(args.episode_repeats):
        times = {}
        for procs in (1, args.episode_procs):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   os.path.abspath(__file__), "rl-episode", "--prompts", str(args.episode_prompts),
                   "--group", str(args.group), "--preset", args.preset, "--synth-dir", args.synth_dir]
            times[procs] = worker_result(cmd, env)
        one, many = times[1]["total"], times[args.episode_procs]["total"]
        ratios.append(one / many)
        shares.append(times[1]["generation"] / one)
        print(f"one RL episode, run {rep + 1}: 1 process {times[1]}, {args.episode_procs} processes "
              f"{times[args.episode_procs]}: {one:.1f} s -> {many:.1f} s, {one / many:.2f}x")
    print(f"episode time 1 -> {args.episode_procs} processes: median {np.median(ratios):.2f}x over "
          f"{len(ratios)} runs ({', '.join(f'{r:.2f}' for r in ratios)}); generation share "
          f"{np.median(shares):.0%} with 1 process")


def rl_episode_worker(args):
    """(run by episode_scaling under torchrun) one episode of the tiny model on its share of the
    prompts; the rewards are random so that every group trains; prints the times as JSON (on a GPU
    with rank 0's peak memory), in the update memory --update-memory names, generating where
    --generate-on says (a copy, or the sharded model itself), both resolved as rl.train_rl does."""
    rank, world, device = train_stage.setup_distributed()
    torch.manual_seed(0)
    sailvl, cfg, tok, prompts = rl_setup(args.preset, args.prompts, args.synth_dir)
    d = modeling.all_gather(tempfile.mkdtemp() if rank == 0 else None)[0]     # rank 0's folder, for every rank
    modeling.save_checkpoint(os.path.join(d, "ck"), sailvl, {"stage": "bench"}, rank, world)   # a collective
    cfg = dataclasses.replace(cfg, init_from=os.path.join(d, "ck"), group_size=args.group)
    model, _ = train_stage.place_model(cfg, sailvl.cfg, rank, world, device, lambda *a: None)
    modeling.barrier()
    if rank == 0:
        shutil.rmtree(d)
    cfg = dataclasses.replace(cfg, update_memory=args.update_memory, generate_on=args.generate_on)
    place, policy, lean = rl.generation_and_update_memory(cfg, model, lambda *a: None)   # as rl.train_rl
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    modeling.barrier()
    t0 = time.perf_counter()
    rolls = rl.rollouts(policy, tok, rl.my_share(prompts), cfg, torch.Generator().manual_seed(rank))
    t_gen = time.perf_counter() - t0
    g = torch.Generator().manual_seed(rank)
    for r in rolls:
        r.reward = float(torch.rand(1, generator=g) < 0.5)
    for r, a in zip(rolls, rl.group_advantages(torch.tensor([r.reward for r in rolls]), cfg.group_size).tolist()):
        r.advantage = a
    if lean and policy is not model:
        policy = None                                                    # as rl.train_rl: lean frees the copy
    rl.update_episode(model.train(), opt, params, rolls, cfg, tok, rl.Rollout(prompts[0], [0], "", False, [0.0]),
                      lean=lean)
    rl.generation_policy(model, policy, place)
    modeling.barrier()
    total = time.perf_counter() - t0
    peak = {"peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3)} if device.type == "cuda" else {}
    if rank == 0:
        print(json.dumps({"generation": round(t_gen, 2), "total": round(total, 2), "lean": lean, "generate_on": place,
                          **peak}))
    train_stage.shutdown_distributed()


# ----------------------------------------------------------------------------------------------
# command line: python tests/bench.py NAME [options]; size defaults depend on the device

class Parser(argparse.ArgumentParser):
    def error(self, message):               # one line on stderr, exit 2 (not argparse's usage block)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


# argparse types: a bad value is Parser.error's one line naming the option, not a traceback mid-bench

def bench_checkpoint(args):
    """Writing a step checkpoint (model.save_checkpoint with the optimizer: every rank's shards of the
    weights and AdamW state): peak resident memory above the state's and seconds, with our shard
    writer (model.write_safetensors, one tensor at a time) vs torch.distributed.checkpoint's own
    safetensors writer (HuggingFaceStorageWriter, which builds each shard file as one bytes object).
    Each writer in its own process (one thread), alternating --repeats times; RSS sampled every 5 ms.
    On CUDA (--device=cuda) the host memory is what the writers copy out of the GPU."""
    runs = {"ours": [], "dcp": []}
    for _ in range(args.repeats):
        for writer in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "ckpt-worker", "--writer", writer,
                   "--preset", args.preset, "--layers", str(args.layers), "--device", args.device]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            runs[writer].append(worker_result(cmd, env))
    first = runs["ours"][0]
    print(f"step checkpoint of '{args.preset}' with {args.layers} LLM and ViT layers on {args.device}: "
          f"{first['params'] / 1e6:.0f}M parameters, weights + AdamW state {first['state_gib']:.2f} GiB, "
          f"{args.repeats} run(s) per writer")
    print_memory_runs(runs, "resident memory added while writing", lambda r: r["peak_gib"] - r["before_gib"])


def print_memory_runs(runs: dict, what: str, extra):
    """One line per way of the memory benches: the least of `extra(run)` in GiB over its runs (each
    listed), and its fastest run."""
    width = max(map(len, runs))
    for name, rs in runs.items():
        xs = [extra(r) for r in rs]
        print(f"  {name:{width}s} {what} {min(xs):5.2f} GiB (runs: {', '.join(f'{x:.2f}' for x in xs)}) | "
              f"{min(r['seconds'] for r in rs):5.1f} s")


def checkpoint_worker(args):
    """(run by bench_checkpoint) one step checkpoint with one writer; prints JSON."""
    cfg = modeling.preset_config(args.preset)
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, num_hidden_layers=args.layers),
                              vision_config=dataclasses.replace(cfg.vision_config, num_hidden_layers=args.layers))
    model = modeling.SAILVL(cfg).to(args.device)              # untrained weights: what is written, not their values
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()                                               # AdamW's two moments exist, as after any step
    opt.zero_grad(set_to_none=True)
    if args.writer == "dcp":                                 # the writer torch.distributed.checkpoint brings
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        class DCPWriter(HuggingFaceStorageWriter):
            def __init__(self, path):
                super().__init__(path, save_distributed=True)

            def write_data(self, plan, planner):
                future = super().write_data(plan, planner)
                self.written = sorted({os.path.basename(r.storage_data.relative_path) for r in future.wait()})
                return future
        modeling.shard_writer = lambda: DCPWriter
    d = tempfile.mkdtemp()
    (_, seconds), before, peak = with_peak_memory(lambda: modeling.save_checkpoint(
        os.path.join(d, "ck"), model, {"stage": "bench", "step": 1}, 0, 1, {}, opt=opt))
    shutil.rmtree(d)
    state = sum(t.numel() * t.element_size() for t in [*model.parameters(),
                *(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))])
    gib = 2 ** 30
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "state_gib": state / gib,
                      "before_gib": before / gib, "peak_gib": peak / gib, "seconds": seconds}))


def bench_load(args):
    """Reading a checkpoint whose MoE experts are stored one by one (the hub layout, bf16, as the
    official Qwen3-MoE and SAIL-VL2 folders are) into the fp32 model: host memory added beyond the
    model's own, ours (model.from_pretrained: each expert copied into its rows of the (E, I, H)
    tensor straight from the memory-mapped file) vs the loader before 2026-12-07 (each layer's
    experts first stacked into a new tensor). Each loader in its own process (one thread); the
    anonymous resident memory (RssAnon: not the file's mapped pages, which the kernel can drop)
    sampled every 5 ms. The preset's widths with --layers LLM and ViT layers."""
    cfg = modeling.preset_config(args.preset)
    if not cfg.llm_config.num_experts:
        raise SystemExit(f"bench load: --preset {args.preset} has no MoE experts")
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, num_hidden_layers=args.layers),
                              vision_config=dataclasses.replace(cfg.vision_config, num_hidden_layers=args.layers))
    d = tempfile.mkdtemp()
    try:
        with torch.device("meta"):
            model = modeling.SAILVL(cfg)
        model.to_empty(device="cpu").to(torch.bfloat16).save_pretrained(os.path.join(d, "ck"))   # values unused
        del model
        runs = {"ours": [], "stacked": []}
        for _ in range(args.repeats):
            for loader in runs:
                cmd = [sys.executable, os.path.abspath(__file__), "load-worker", "--loader", loader,
                       "--path", os.path.join(d, "ck")]
                runs[loader].append(worker_result(cmd, dict(os.environ, OMP_NUM_THREADS="1")))
    finally:
        shutil.rmtree(d)
    first = runs["ours"][0]
    print(f"from_pretrained of '{args.preset}' with {args.layers} LLM and ViT layers (experts one by one, bf16) into "
          f"fp32: {first['params'] / 1e6:.0f}M parameters, the model {first['model_gib']:.2f} GiB, {args.repeats} run(s) each")
    print_memory_runs(runs, "host memory added beyond the model", lambda r: r["peak_gib"] - r["before_gib"] - r["model_gib"])


def bench_start(args):
    """A random start under FSDP2 (lm0, 2 gloo processes, one thread each): rank 0's resident host
    memory added while the sharded model is placed (train_stage.place_model), beyond its own shards,
    with each tensor made alone as it is scattered (model.remade, since 2026-12-08) vs the whole
    model made on rank 0's host first, as before. The preset's widths
    with --layers LLM and ViT layers; the two alternate --repeats times."""
    runs = {"tensors": [], "whole": []}
    for _ in range(args.repeats):
        for made in runs:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.abspath(__file__), "start-worker", "--made", made, "--preset", args.preset,
                   "--layers", str(args.layers)]
            runs[made].append(worker_result(cmd, dict(os.environ, OMP_NUM_THREADS="1")))
    first = runs["tensors"][0]
    print(f"random start of '{args.preset}' with {args.layers} LLM and ViT layers on 2 processes: "
          f"{first['params'] / 1e6:.0f}M parameters, the model {first['model_gib']:.2f} GiB in fp32, rank 0's "
          f"shards {first['shards_gib']:.2f} GiB, its largest tensor {first['largest_gib']:.2f} GiB")
    print_memory_runs(runs, "rank 0's host memory added beyond its shards",
                      lambda r: r["peak_gib"] - r["before_gib"] - r["shards_gib"])


def start_worker(args):
    """(run by bench_start under torchrun) place one random lm0 model; rank 0 prints JSON."""
    rank, world, device = train_stage.setup_distributed()
    layers = [f"--model.llm_config.num_hidden_layers={args.layers}", f"--model.vision_config.num_hidden_layers={args.layers}"]
    cfg, model_cfg, _ = train_stage.parse_args(["--stage", "lm0", f"--preset={args.preset}", *layers])
    if args.made == "whole":                                  # the start before: rank 0 made the whole model
        start = train_stage.stage_start

        def made_whole(*a):
            model, tensors = start(*a)
            made = {}                                         # (a tied head is the embedding: made once)
            for m in train_stage.MODULES:
                if m not in tensors:
                    tensors[m] = {k: made[id(v)] if id(v) in made else made.setdefault(id(v), modeling.remade(v))
                                  for k, v in getattr(model, m).state_dict(keep_vars=True).items()}
            return model, tensors
        train_stage.stage_start = made_whole
    (model, seconds), before, peak = with_peak_memory(
        lambda: train_stage.place_model(cfg, model_cfg, rank, world, device, lambda *a: None)[0])
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    gib = 2 ** 30
    if rank == 0:
        print(json.dumps({"params": modeling.count_params(model), "before_gib": before / gib, "peak_gib": peak / gib,
                          "model_gib": modeling.count_params(model) * 4 / gib, "seconds": seconds,
                          "shards_gib": sum(t.numel() * t.element_size() for t in local) / gib,
                          "largest_gib": max(p.numel() for p in model.parameters()) * 4 / gib}), flush=True)
    train_stage.shutdown_distributed()
    train_stage.exit_process()


def stacked_from_pretrained(path: str) -> modeling.SAILVL:
    """Baseline: from_pretrained as it was before 2026-12-07, each layer's experts stacked first."""
    cfg = modeling.SAILVLConfig.from_dict(json.loads(open(os.path.join(path, "config.json")).read()))
    with torch.device("meta"):
        model = modeling.SAILVL(cfg)
    model = model.to_empty(device="cpu")
    if cfg.llm_config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    sd = modeling.normalize_state_dict(vit.read_safetensors_folder(path), cfg.llm_config, "language_model.")
    sd = {k: torch.cat(v) if isinstance(v, list) else v for k, v in sd.items()}    # every stack made, then loaded
    vit.load_state_dict_strict(model, sd, path)
    return model


def load_worker(args):
    """(run by bench_load) one from_pretrained with one loader; prints JSON."""
    def load():
        return modeling.SAILVL.from_pretrained(args.path) if args.loader == "ours" else stacked_from_pretrained(args.path)
    (model, seconds), before, peak = with_peak_memory(load, anonymous=True)
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "before_gib": before / 2 ** 30,
                      "peak_gib": peak / 2 ** 30, "seconds": seconds,
                      "model_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30}))


def with_peak_memory(fn, anonymous: bool = False) -> tuple:
    """((fn(), seconds), resident bytes before, peak resident bytes during), sampled every 5 ms by a
    thread. `anonymous`: RssAnon only (memory-mapped file pages left out)."""
    import threading
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        if anonymous:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    peak, done = [0], threading.Event()

    def sample_rss():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)
    before = rss()
    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    return (out, seconds), before, max(peak[0], rss())


def positive(text: str) -> int:
    """A count or a size: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device(text: str) -> str:
    """cpu or cuda[:N], the latter only for a CUDA device here (model.parse_device, as sample.py's --device)."""
    try:
        modeling.parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def routings(text: str) -> str:
    """The moe bench's comma list of routings (moe_make_inputs)."""
    if not text or set(text.split(",")) - {"uniform", "skewed"}:
        raise argparse.ArgumentTypeError(f"expected a comma list of uniform, skewed; got {text!r}")
    return text


def summary(fn) -> str:
    """A bench's help line in the list of benches: its docstring's first sentence, whole."""
    text = " ".join(fn.__doc__.split())
    return re.match(r".*?\.(?=\s|$)", text)[0]


def add_kernel_benches(sub, gpu: bool):
    what = ("packed (cu_seqlens) attention fwd+bwd: Triton vs dense-mask SDPA, flex_attention, torch's "
            "varlen_attn, an SDPA loop (and FA2) on GPU; the torch path's two variants on CPU (small shapes)")
    p = sub.add_parser("attention", help=what, description=what)
    p.add_argument("--total", type=positive, nargs="+", default=[8192, 32768] if gpu else [256, 1024],
                   help="packed tokens T, one run each")
    p.add_argument("--lengths", type=positive, nargs=2, default=[64, 4096] if gpu else [8, 128],
                   metavar=("LO", "HI"), help="sample lengths ~ U[LO, HI], fixed seed")
    p.add_argument("--heads", type=positive, default=16 if gpu else 4, help="query heads H")
    p.add_argument("--kv-heads", type=positive, default=None, help="kv heads for GQA (default = heads)")
    p.add_argument("--dim", type=positive, default=128 if gpu else 32, help="head dim D")
    p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0, help="length sampling seed")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal within each sample (default) or bidirectional (--no-causal)")
    p.set_defaults(func=bench_attention)
    what = ("MoE expert SwiGLU layer fwd+bwd, uniform and skewed routing: Triton vs HF-v4 expert loop "
            "vs sort+torch._grouped_mm on GPU; the torch reference vs the loop on CPU (small shape)")
    p = sub.add_parser("moe", help=what, description=what)
    for flag, on_gpu, on_cpu, text in (
            ("tokens", 8192, 512, "T, tokens in the batch"), ("experts", 64, 8, "E, number of experts"),
            ("topk", 8, 2, "k, experts per token"), ("hidden", 2048, 128, "d, model width"),
            ("inter", 1024, 256, "f, expert intermediate size")):
        p.add_argument(f"--{flag}", type=positive, default=on_gpu if gpu else on_cpu, help=text)
    p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=list(DTYPES),
                   help="storage dtype of inputs and weights (accumulation is fp32)")
    p.add_argument("--routing", type=routings, default="uniform,skewed", help="comma list of uniform, skewed")
    p.add_argument("--skip-loop", action="store_true", help="skip the (slow) per-expert loop baseline")
    p.set_defaults(func=bench_moe)


def add_packing_bench(sub):
    p = sub.add_parser("packing", help=summary(bench_packing), description=bench_packing.__doc__)
    p.add_argument("--max-tokens", type=positive, default=8192, help="pack length (paper: 8192)")
    p.add_argument("--buffer-size", type=positive, default=256, help="packer buffer (samples)")
    p.add_argument("--max-images", type=positive, default=48, help="tiles/images per pack cap")
    p.add_argument("--samples", type=positive, default=20000, help="samples per synthetic distribution (and of the "
                                                              "--real stream)")
    p.add_argument("--batch-size", type=positive, default=16, help="samples per pad-to-longest batch")
    p.add_argument("--ranks", type=positive, default=8, help="simulated data-parallel ranks")
    p.add_argument("--micro-batches", type=positive, default=4, help="packs per rank per step")
    p.add_argument("--steps", type=positive, default=100, help="steps simulated for the balance part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true", help="also the synthetic data's samples and the tiny model's "
                                                       "useful tokens/s, packed vs padded")
    p.add_argument("--synth-dir", default=data.DEFAULT_SYNTH_DIR, help="--real: the synthetic data (made if missing)")
    p.add_argument("--per-family", type=positive, default=8, help="--real: samples loaded per manifest")
    p.add_argument("--tiny-max-tokens", type=positive, default=2048, help="--real: pack length for the tiny model")
    p.add_argument("--tiny-batch-size", type=positive, default=8,
                   help="--real: pad-to-longest batch for the tiny model")
    p.add_argument("--repeats", type=positive, default=3, help="--real: timed passes per batching (median reported)")
    p.add_argument("--threads", type=positive, default=1, help="--real: torch CPU threads for the tokens/s part")
    p.add_argument("--device", type=device, default="cpu", help="--real: cpu | cuda (the tokens/s part)")
    p.set_defaults(func=bench_packing)


def add_video_bench(sub):
    p = sub.add_parser("video", help=summary(bench_video), description=bench_video.__doc__)
    p.add_argument("--seconds", type=positive, default=120, help="video length (25 fps)")
    p.add_argument("--size", type=positive, default=448, help="frame side in pixels")
    p.add_argument("--gop", type=positive, default=50, help="frames from one keyframe to the next")
    p.add_argument("--frames", type=positive, default=16, help="frames per sample (DataConfig.num_frames)")
    p.add_argument("--tile", type=positive, default=448, help="tile side the frames are resized to")
    p.add_argument("--repeats", type=positive, default=3)
    p.set_defaults(func=bench_video)


def add_model_benches(sub):
    p = sub.add_parser("step", help=summary(bench_step), description=bench_step.__doc__)
    p.add_argument("--preset", default="tiny", choices=modeling.PRESETS)
    p.add_argument("--batch", type=positive, default=4)
    p.add_argument("--seq", type=positive, default=512)
    p.add_argument("--repeats", type=positive, default=5, help="timed steps per model (best one reported)")
    p.set_defaults(func=bench_step)
    p = sub.add_parser("adalrs", help=summary(bench_adalrs), description=bench_adalrs.__doc__)
    p.add_argument("--out-dir", default="out", help="where the recipe's vit3 and lm0 outputs are")
    p.add_argument("--init-from", default="", help="the vit3 output to start from (default OUT_DIR/vit3)")
    p.add_argument("--lr", type=float, default=train_stage.stage_config("pretrain1").lr, help="the start / fixed LR")
    p.add_argument("--seeds", type=positive, default=2)
    p.add_argument("--data-dir", default=data.DEFAULT_SYNTH_DIR, help="the synthetic data the recipe ran on")
    p.add_argument("--step-scale", type=float, default=1.0, help="pretrain1's steps x this (a short check: 0.1)")
    p.set_defaults(func=bench_adalrs)
    p = sub.add_parser("decode", help=summary(bench_decode), description=bench_decode.__doc__)
    p.add_argument("--preset", default="tiny", choices=modeling.PRESETS)
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of a random preset")
    p.add_argument("--batch", type=positive, default=4, help="rows per generate call")
    p.add_argument("--prompt-len", type=positive, default=64)
    p.add_argument("--new-tokens", type=positive, default=64)
    p.add_argument("--repeats", type=positive, default=3)
    p.set_defaults(func=bench_decode)
    p = sub.add_parser("rollout", help=summary(bench_rollout), description=bench_rollout.__doc__)
    p.add_argument("--case", default="both", choices=("text", "rl", "both"))
    p.add_argument("--synth-dir", default=data.DEFAULT_SYNTH_DIR, help="the synthetic data of the rl case and episode "
                   "(made if missing)")
    p.add_argument("--preset", default="tiny", choices=modeling.PRESETS)
    p.add_argument("--batch", type=positive, default=64, help="text case: rows")
    p.add_argument("--prompt-len", type=positive, default=48, help="text case: prompt tokens")
    p.add_argument("--new-tokens", type=positive, default=64, help="text case: generated tokens per row")
    p.add_argument("--prompts", type=positive, default=8, help="rl case: image prompts")
    p.add_argument("--group", type=positive, default=8, help="rl case and episode: G rows per prompt")
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd engine")
    p.add_argument("--breakdown", action="store_true", help="text case: a profile of a compiled decode step by "
                   "kind (products, attention, fused kernels, guards, other ops), the products and the attention "
                   "also timed alone (the attention with its cache warm and evicted)")
    p.add_argument("--device", type=device, default="cpu", help="cpu | cuda: where the engines run (the episode "
                   "part: CPU)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="fp32 | bf16 (as RL generates on a GPU); default "
                   "bf16 on CUDA, fp32 on the CPU (whose bf16 products are ~100x slower)")
    p.add_argument("--episode-procs", type=int, default=2, help="processes of the episode-scaling part (0 = skip)")
    p.add_argument("--episode-prompts", type=positive, default=32, help="prompts of that episode (x G rollouts)")
    p.add_argument("--episode-repeats", type=positive, default=3,
                   help="alternating runs of that episode with 1 and N processes")
    p.set_defaults(func=bench_rollout)
    p = sub.add_parser("checkpoint", help=summary(bench_checkpoint), description=bench_checkpoint.__doc__)
    p.add_argument("--preset", default="2b", choices=modeling.PRESETS)
    p.add_argument("--layers", type=positive, default=4, help="LLM and ViT layers (the preset's widths)")
    p.add_argument("--repeats", type=positive, default=1, help="runs per writer, alternating")
    p.add_argument("--device", type=device, default="cpu", help="cpu | cuda: where the weights and AdamW state live")
    p.set_defaults(func=bench_checkpoint)
    p = sub.add_parser("ckpt-worker", help="(internal: one step checkpoint, for checkpoint)")
    p.add_argument("--writer", choices=("ours", "dcp"), required=True)
    p.add_argument("--preset", default="2b", choices=modeling.PRESETS)
    p.add_argument("--layers", type=positive, default=4)
    p.add_argument("--device", type=device, default="cpu")
    p.set_defaults(func=checkpoint_worker)
    p = sub.add_parser("load", help=summary(bench_load), description=bench_load.__doc__)
    p.add_argument("--preset", default="30b-a3b", choices=[n for n in modeling.PRESETS if "moe" in n or "a3b" in n])
    p.add_argument("--layers", type=positive, default=1, help="LLM and ViT layers (the preset's widths)")
    p.add_argument("--repeats", type=positive, default=1, help="runs per loader, alternating")
    p.set_defaults(func=bench_load)
    p = sub.add_parser("start", help=summary(bench_start), description=bench_start.__doc__)
    p.add_argument("--preset", default="8b", choices=modeling.PRESETS)
    p.add_argument("--layers", type=positive, default=4, help="LLM and ViT layers (the preset's widths)")
    p.add_argument("--repeats", type=positive, default=1, help="runs per way, alternating")
    p.set_defaults(func=bench_start)
    p = sub.add_parser("start-worker", help="(internal: one random start under torchrun, for start)")
    p.add_argument("--made", choices=("tensors", "whole"), required=True)
    p.add_argument("--preset", default="8b", choices=modeling.PRESETS)
    p.add_argument("--layers", type=positive, default=4)
    p.set_defaults(func=start_worker)
    p = sub.add_parser("load-worker", help="(internal: one from_pretrained, for load)")
    p.add_argument("--loader", choices=("ours", "stacked"), required=True)
    p.add_argument("--path", required=True)
    p.set_defaults(func=load_worker)
    p = sub.add_parser("rl-episode", help="one RL episode (rollouts, then the updates) under torchrun: its time "
                       "and rank 0's peak memory per --update-memory / --generate-on (rollout runs it with 1 and 2 "
                       "processes)")
    p.add_argument("--preset", default="tiny", choices=modeling.PRESETS)
    p.add_argument("--prompts", type=positive, default=32)
    p.add_argument("--group", type=positive, default=8)
    p.add_argument("--synth-dir", default=data.DEFAULT_SYNTH_DIR, help="the synthetic data (made if missing)")
    p.add_argument("--update-memory", default="auto", choices=("auto", "full", "lean"),
                   help="rl.py's --update_memory: the generation copy kept and FSDP units gathered once per update, "
                        "or not")
    p.add_argument("--generate-on", default="auto", choices=("auto", "copy", "experts", "model"),
                   help="rl.py's --generate_on: rollouts on a full copy of the model per rank, on a copy holding the "
                        "rank's share of the experts (MoE presets), or on the sharded model itself")
    p.set_defaults(func=rl_episode_worker)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory"]:                 # the memory estimate keeps its own options (tests/bench_memory.py)
        import bench_memory
        return bench_memory.bench_memory(data.dashed_options(argv[1:])) and 0
    parser = Parser(prog="bench.py", description=__doc__.split("\n")[0],
                    epilog="Correctness is tested, not benchmarked: python -m pytest tests/. "
                    "python tests/bench.py memory --help: the memory of one training step, estimated")
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    add_kernel_benches(sub, torch.cuda.is_available())
    add_packing_bench(sub)
    add_video_bench(sub)
    add_model_benches(sub)
    sub.add_parser("memory", help="the memory of one training step, estimated (tests/bench_memory.py; its "
                   "options: memory --help)")       # run above, before this parser: listed here for --help
    args = parser.parse_args(data.dashed_options(argv))      # --max_tokens as well as --max-tokens
    try:
        args.func(args)
    except train_stage.UsageError as e:
        print(f"bench.py {args.bench}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return 0


if __name__ == "__main__":
    train_stage.run_command(main)
