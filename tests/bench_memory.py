"""Memory of one training step, without a GPU (paper §5: the 2b / 8b models trained at 8k-16k packs).

    python tests/bench.py memory                         # '2b', 8k packs, 8 ranks: estimates, 8 configurations
    python tests/bench.py memory --preset 8b --tokens 16384 --world 16 --tiles 1
    python tests/bench.py memory loss                    # measured on this CPU: chunked vs full-logits loss

`estimate` runs one real training step of the preset (model.SAILVL built on the meta device,
FSDP2-sharded by model.parallelize for `world` ranks under a fake process group, AdamW from
train_stage.build_optimizer, forward -> train_stage.step_loss -> backward -> clip -> step, twice
so the optimizer state exists) on fake tensors (torch's FakeTensorMode: shapes and dtypes, no
storage, no arithmetic) and reads rank 0's peak from torch's FSDPMemTracker. It is an estimate:
  * tensor bytes only, as torch.cuda.max_memory_allocated counts them: no CUDA context (~0.5 GB),
    no NCCL buffers, no allocator fragmentation (torch.cuda.max_memory_reserved is larger);
  * the Triton packed attention cannot run on fake tensors: a stand-in with its exact allocations
    (output, the (H, T) fp32 log-sum-exp saved for backward; delta, dq, dk, dv in backward) runs
    instead, so no (T, T) score matrix appears, as on the GPU;
  * SAILVL.embed checks the <IMG_CONTEXT> count against the visual tokens with int(), a value fake
    tensors do not have: the bench fills the slots without that check;
  * the fake ranks are CPU ranks (FSDP2 on a CUDA mesh needs a real GPU), bf16 parameters and fp32
    gradient reduction as parallelize sets for CUDA;
  * MoE presets are refused: the Triton MoE kernel's buffers are not modelled;
  * every pack holds at least one tile: FSDPMemTracker fails on an FSDP unit that does not run in
    the tracked step (a ViT block in a text-only pack), so "text-heavy" is 1 tile + text.
The 'full' loss is the path before chunking (the (T, V) logits of the pack, their fp32 copy and
fp32 log-softmax: model.shifted_cross_entropy); 'chunked' is what training runs now
(model.chunked_cross_entropy through SAILVL.forward with labels).
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import model as modeling  # noqa: E402
import train_stage  # noqa: E402

GiB = 2 ** 30


class FlashAttentionMemory(torch.autograd.Function):
    """kernels._PackedAttentionFn's allocations without its arithmetic: forward makes o (T, H, D)
    and the (H, T) fp32 log-sum-exp and saves q, k, v, o, lse; backward makes the (H, T) fp32
    delta and dq, dk, dv (kernels._attn_forward / _attn_backward)."""

    @staticmethod
    def forward(ctx, q, k, v):
        o = torch.empty_like(q)
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        delta = torch.empty_like(lse)                                   # noqa: F841 (allocated, as on the GPU)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_attention_memory(q, k, v, cu_seqlens, causal, scale=None):
    return FlashAttentionMemory.apply(q, k, v)


def embed_without_count_check(self, input_ids, pixel_values=None):
    """SAILVL.embed without the slot-count check (it reads a value; fake tensors have none)."""
    x = self.language_model.model.embed_tokens(input_ids)                # (1, T, H)
    if pixel_values is None:
        return x
    slots = (input_ids == self.cfg.img_context_token_id)[..., None]
    return x.masked_scatter(slots, self.encode_images(pixel_values).to(x.dtype))


def fake_pack(cfg: modeling.SAILVLConfig, tokens: int, tiles: int, sample_len: int, device) -> dict:
    """One pack of `tokens` positions: `tiles` full-size tiles (their visual tokens first), then
    text; samples of `sample_len`; every text position a target."""
    S = cfg.vision_config.image_size
    n_visual = tiles * cfg.tokens_per_tile
    if n_visual > tokens or tiles < 1:
        raise SystemExit(f"{tiles} tiles: a pack needs 1 to {tokens // cfg.tokens_per_tile} of them here")
    ids = torch.full((1, tokens), 7, dtype=torch.long, device=device)
    ids[0, :n_visual] = cfg.img_context_token_id
    labels = ids.masked_fill(ids == cfg.img_context_token_id, -100)
    bounds = list(range(0, tokens, sample_len)) + [tokens]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(b - a, device=device) for a, b in zip(bounds[:-1], bounds[1:])])[None]
    pixels = torch.zeros(tiles, 3, S, S, device=device) if tiles else None
    return dict(input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=cu, pixel_values=pixels,
                n_targets=tokens - n_visual - 1)


def estimate(preset: str, tokens: int, tiles: int, world: int, ac: str, loss: str, sample_len: int = 1024) -> dict:
    """Rank 0's peak memory (bytes, by category) of a training step with every module trained."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    cfg = modeling.preset_config(preset)
    if cfg.llm_config.num_experts:
        raise SystemExit(f"{preset} is a MoE preset: the Triton MoE kernel's buffers are not modelled here")
    device = torch.device("cpu")
    with torch.device("meta"):
        model = modeling.SAILVL(cfg)
    modeling.set_activation_checkpointing(model, ac == "block")
    modeling.parallelize(model, device, mixed_precision=True)                  # outside fake mode: it builds the mesh
    stage = train_stage.StageConfig()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = train_stage.build_optimizer(stage, params, cuda=False)              # foreach, as on CUDA
        # a first step on an image pack: every module's AdamW state and FSDP buffers exist, as in a
        # mixed run (and FSDPMemTracker needs every FSDP unit to have run once); then the measured step
        image_heavy = (tokens * 7 // 8) // cfg.tokens_per_tile
        for pack, tracker in ((fake_pack(cfg, tokens, image_heavy, sample_len, device), None),
                              (fake_pack(cfg, tokens, tiles, sample_len, device), FSDPMemTracker(model, opt))):
            with tracker or contextlib.nullcontext():
                training_step(model, opt, params, pack, loss, world, stage.grad_clip)
        peak = tracker.get_tracker_snapshot("peak")
    return {getattr(k, "value", k): v for k, v in next(iter(peak.values())).items()}


def training_step(model, opt, params, pack: dict, loss: str, world: int, grad_clip: float):
    """train_stage.train_step's work on one pack, without its float()s (fake tensors hold no values):
    forward (chunked loss: train_stage.forward_pack; full: the logits, then their CE), the loss
    scaled as train_stage.step_loss does, backward, clipping, AdamW."""
    n_targets = int(pack["n_targets"])
    if loss == "chunked":
        out = train_stage.forward_pack(model, pack)
        ce = out.ce_sum
    else:
        out = model(pack["input_ids"], pack["pixel_values"], position_ids=pack["position_ids"],
                    cu_seqlens=pack["cu_seqlens"])
        ce = modeling.shifted_cross_entropy(out.logits, pack["labels"])[0]
    (ce * (world / n_targets)).backward()
    del out, ce
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def patched():
    """Swap in the fake-tensor stand-ins (see the module docstring); returns the undo."""
    saved = kernels.packed_attention, modeling.SAILVL.embed
    kernels.packed_attention, modeling.SAILVL.embed = flash_attention_memory, embed_without_count_check

    def undo():
        kernels.packed_attention, modeling.SAILVL.embed = saved
    return undo


def estimate_table(args):
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.world)
    cfg = modeling.preset_config(args.preset)
    tiles = [int(t) for t in args.tiles.split(",")] if args.tiles else \
        [1, (args.tokens * 7 // 8) // cfg.tokens_per_tile]
    print(f"ESTIMATE (fake tensors, not measured): peak memory of rank 0 in one training step, preset {args.preset}, "
          f"packs of {args.tokens} tokens, {args.world} ranks (FSDP2, bf16 params, fp32 grads/AdamW), every module "
          f"trained; GiB of tensor bytes (CUDA context, NCCL and allocator fragmentation not included)")
    cols = ("Sharded Param", "Unsharded Param", "Sharded Grad", "Unsharded Grad", "OptState", "Activation", "Temp")
    print(f"{'pack':<22} {'--ac':<6} {'loss':<8} {'peak':>7} | " + " ".join(f"{c:>15}" for c in cols))
    rows = []
    undo = patched()
    try:
        for n_tiles in tiles:
            what = f"{n_tiles} tile{'s' if n_tiles > 1 else ''} + text"
            for ac in ("none", "block"):
                for loss in ("full", "chunked"):
                    t0 = time.time()
                    parts = estimate(args.preset, args.tokens, n_tiles, args.world, ac, loss)
                    rows.append(dict(tiles=n_tiles, ac=ac, loss=loss, peak_gib=parts["Total"] / GiB))
                    print(f"{what:<22} {ac:<6} {loss:<8} {parts['Total'] / GiB:7.2f} | "
                          + " ".join(f"{parts.get(c, 0) / GiB:15.2f}" for c in cols) + f"   ({time.time() - t0:.0f} s)",
                          flush=True)
    finally:
        undo()
    return rows


def bench_loss(args):
    """Measured on this CPU: SAILVL forward + backward with the chunked loss vs the full-logits loss
    (same weights, same pack): best-of-N time, loss and gradient equality, peak tensor memory."""
    from torch.distributed._tools.mem_tracker import MemTracker
    torch.set_num_threads(args.threads)
    cfg = modeling.preset_config("tiny")
    cfg.llm_config.vocab_size = args.vocab
    torch.manual_seed(0)
    model = modeling.SAILVL(cfg)
    model.init_weights()
    ids = torch.randint(0, args.vocab, (1, args.tokens))
    labels = ids.clone()
    labels[:, : args.tokens // 8] = -100                                # a prompt without loss

    def chunked():
        return model(ids, labels=labels).ce_sum

    def full():
        return modeling.shifted_cross_entropy(model(ids).logits, labels)[0]

    results = {}
    for name, fn in (("full", full), ("chunked", chunked)):
        times = []
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            ce = fn()
            ce.backward()
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            fn().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[name] = dict(time=min(times), loss=float(ce.detach()), grads=grads,
                             peak=tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    f, c = results["full"], results["chunked"]
    grad_diff = max((a - b).abs().max().item() for a, b in zip(f["grads"], c["grads"]))
    print(f"MEASURED on this CPU ({torch.get_num_threads()} threads, fp32): tiny SAILVL LLM with a {args.vocab}-token "
          f"vocabulary, one pack of {args.tokens} tokens, forward + backward, best of {args.repeats}; "
          f"chunks of {modeling.CE_CHUNK} positions")
    for name, r in results.items():
        print(f"  {name:<8} {r['time'] * 1e3:8.1f} ms | summed CE {r['loss']:.6f} | peak tensor memory "
              f"{r['peak'] / 2 ** 20:8.1f} MiB")
    print(f"  chunked / full time {c['time'] / f['time']:.2f}x | peak memory {c['peak'] / f['peak']:.2f}x | "
          f"|loss difference| {abs(c['loss'] - f['loss']):.2e} (relative {abs(c['loss'] - f['loss']) / f['loss']:.1e}) "
          f"| max |gradient difference| {grad_diff:.2e}")
    return results


def bench_memory(argv):
    ap = argparse.ArgumentParser(prog="tests/bench.py memory", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what")
    loss = sub.add_parser("loss", help=bench_loss.__doc__.split("\n")[0])
    loss.add_argument("--vocab", type=int, default=32768)
    loss.add_argument("--tokens", type=int, default=4096)
    loss.add_argument("--repeats", type=int, default=3)
    loss.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--tokens", type=int, default=8192, help="pack length (--packing.max_tokens)")
    ap.add_argument("--world", type=int, default=8, help="ranks the model is sharded over")
    ap.add_argument("--tiles", default="", help="comma list of tile counts per pack, each >= 1 (default: 1, text-"
                                                "heavy, and as many as fill 7/8 of the pack, image-heavy)")
    args = ap.parse_args(argv)
    return bench_loss(args) if args.what == "loss" else estimate_table(args)


if __name__ == "__main__":
    bench_memory(sys.argv[1:])
