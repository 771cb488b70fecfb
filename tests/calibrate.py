"""MoE expert-activation calibration (paper §2.2) of a checkpoint, from the command line.

    python tests/calibrate.py --ckpt out/pretrain2 --data mm.jsonl --text text.jsonl   # writes out/pretrain2-calibrated
    python tests/calibrate.py --help                                                    # every option
    python train_stage.py calibrate ...                                                  # the same (forwarded here)

The algorithm is moe.calibrate (moe.py imports no model or data file, so it cannot read a
checkpoint or a manifest itself); this file is the tool around it: it loads a checkpoint
(model.py), reads probe samples (data.py), fits, prints a routing report before / after on
held-out samples and writes the calibrated checkpoint (model.save_checkpoint).
"""
import math
import os
import sys

import repo_path

repo_path.add_repo_root()              # the project's files, after transformers has bound HF's `kernels`

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import model as modeling  # noqa: E402
import moe  # noqa: E402
import train_stage  # noqa: E402
from data import InputError  # noqa: E402
from sample import Parser  # noqa: E402
from train_stage import UsageError, tokenizer_files  # noqa: E402


# ==============================================================================================
# MoE expert-activation calibration (§2.2) on a checkpoint: the algorithm is moe.calibrate

def calibration_batches(manifest: str, model: modeling.SAILVL, tok, max_samples: int) -> list:
    """Samples of a manifest as model inputs with two token masks, `probe_mask` (every token) and
    `text_mask` (not <IMG_CONTEXT>), built with the data geometry the model was trained with."""
    dcfg = data.DataConfig.from_model(model.cfg)
    ds = data.JsonlDataset(manifest, tok, dcfg)
    bad = data.BadData(dcfg.max_bad_fraction, dcfg.bad_check_after)
    device = next(model.parameters()).device
    batches = []
    for i in tqdm(range(min(len(ds), max_samples)), desc=f"load {os.path.basename(manifest)}"):
        try:
            s = ds.load(i)
        except data.DataError as e:
            bad.bad(e)
            continue
        bad.good()
        ids = s["input_ids"].to(device)[None]                            # (1, T)
        pv = s["pixel_values"]
        pv = None if pv is None else [p.to(device) for p in pv] if isinstance(pv, list) else pv.to(device)
        batches.append(dict(input_ids=ids, pixel_values=pv, probe_mask=torch.ones_like(ids[0], dtype=torch.bool),
                            text_mask=ids[0] != model.cfg.img_context_token_id))
    bad.check()
    if not batches:
        raise UsageError(f"{manifest}: no usable sample ({bad.report()})")
    return batches


def print_routing_report(title: str, rep: dict):
    mean = lambda xs: sum(xs) / len(xs)                                  # noqa: E731
    print(f"\n{title}  ({rep['tokens']} tokens; log E = {rep['log_E']:.3f})")
    print(f"  {'layer':>5} {'entropy before':>15} {'after':>8} {'max/mean before':>16} {'after':>8} "
          f"{'top-k agree':>12} {'router KL':>10}")
    rows = [(str(i), rep["entropy_before"][i], rep["entropy_after"][i], rep["max_load_before"][i],
             rep["max_load_after"][i], rep["topk_agreement"][i], rep["router_kl"][i])
            for i in range(len(rep["entropy_before"]))]
    rows.append(("mean", *(mean(rep[k]) for k in ("entropy_before", "entropy_after", "max_load_before",
                                                   "max_load_after", "topk_agreement", "router_kl"))))
    for name, eb, ea, mb, ma, ag, kl in rows:
        print(f"  {name:>5} {eb:>15.3f} {ea:>8.3f} {mb:>16.2f} {ma:>8.2f} {ag:>12.3f} {kl:>10.4f}")
    print(f"  next-token KL {rep['next_token_kl']:.5f}")


def check_options(args):
    """Refuse (UsageError, one line) what would otherwise fail later with a traceback, or silently
    do something else: a rank of 0 would be a full-rank correction (moe.contrast_directions), a
    negative --kl-weight would push text routing away, a --temperature of 0 divides by zero."""
    if not 0 <= args.holdout < 1:
        raise UsageError(f"--holdout must be in [0, 1), got {args.holdout}")
    for name, zero_ok in (("lr", False), ("temperature", False), ("kl_weight", True)):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            raise UsageError(f"--{name.replace('_', '-')} must be a number {'>=' if zero_ok else '>'} 0, got {value}")
    for name in ("rank", "steps", "max_tokens", "max_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        modeling.parse_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    if not os.path.isdir(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt}: no such folder")
    if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        raise InputError(f"--ckpt {args.ckpt}: not a checkpoint folder (no config.json)")
    for option in ("data", "text"):
        for path in getattr(args, option) or ():
            if not os.path.isfile(path):
                raise UsageError(f"--{option} {path}: no such file")


def calibrate_cli(argv):
    ap = Parser(                                 # its errors are UsageErrors: one line (main)
        prog="tests/calibrate.py", description="Expert-activation-entropy calibration of a MoE checkpoint "
        "(§2.2, moe.calibrate): probe the router inputs of each MoE layer on --data (multimodal) and --text "
        "(text-only), fold a low-rank correction into each gate that raises the expert-load entropy of --data "
        "while keeping text routing; prints entropy, max/mean load, top-k agreement and KL before/after on "
        "held-out samples and writes the calibrated checkpoint.")
    ap.add_argument("--ckpt", required=True, help="SAIL-VL2 checkpoint folder (ours or official) with MoE layers")
    ap.add_argument("--data", required=True, nargs="+", help="JSONL manifest(s) of probe samples (multimodal)")
    ap.add_argument("--text", nargs="+", help="JSONL manifest(s) of text-only samples whose routing is kept "
                                             "(default: the text tokens of --data)")
    ap.add_argument("--out", help="output folder (default: CKPT-calibrated)")
    ap.add_argument("--max-samples", type=int, default=64, help="samples read from each manifest")
    ap.add_argument("--holdout", type=float, default=0.25, help="share of each manifest kept out of the fit")
    for name in ("rank", "steps", "lr", "kl_weight", "temperature", "max_tokens"):
        default = getattr(moe.CalibConfig, name)
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=f"CalibConfig.{name}")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(data.dashed_options(argv))          # --max_samples as well as --max-samples
    check_options(args)
    torch.manual_seed(args.seed)
    try:
        sailvl = modeling.SAILVL.from_pretrained(args.ckpt, dtype=getattr(torch, args.dtype), device=args.device).eval()
    except Exception as e:      # any reason (bad JSON, missing or corrupt weights): one line, as sample.load
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--ckpt {args.ckpt}: cannot load the checkpoint: {why}") from None
    if not moe.moe_blocks(sailvl):              # found now, not after reading the probe data
        raise InputError(f"--ckpt {args.ckpt}: the model has no MoE layer: calibration tunes MoE routers "
                         "(a tiny-moe or 30b-a3b checkpoint)")
    has_tok = any(os.path.exists(os.path.join(args.ckpt, f)) for f in ("tokenizer.json", "vocab.json"))
    tok = data.load_tokenizer(args.ckpt if has_tok else None)

    def split(manifests):                        # the last `holdout` of each manifest measures the effect
        fit, held = [], []
        for m in manifests:
            b = calibration_batches(m, sailvl, tok, args.max_samples)
            cut = max(1, round(len(b) * (1 - args.holdout))) if len(b) > 1 else len(b)
            fit, held = fit + b[:cut], held + (b[cut:] or b)
        return fit, held
    probe_fit, probe_eval = split(args.data)
    anchor_fit, anchor_eval = split(args.text) if args.text else (probe_fit, probe_eval)
    ccfg = moe.CalibConfig(**{k: getattr(args, k) for k in ("rank", "steps", "lr", "kl_weight", "temperature",
                                                            "max_tokens")})
    blocks = moe.moe_blocks(sailvl)
    before = [b.gate.weight.detach().clone() for b in blocks]
    moe.calibrate(sailvl, probe_fit, anchor_fit, ccfg)
    after = [b.gate.weight.detach().clone() for b in blocks]
    rep_mm = moe.compare_routing(sailvl, probe_eval, before, after, "probe_mask")
    rep_text = moe.compare_routing(sailvl, anchor_eval, before, after, "text_mask")
    print_routing_report(f"--data held-out ({len(probe_eval)} samples), all tokens", rep_mm)
    print_routing_report(f"{'--text' if args.text else '--data text tokens'} held-out ({len(anchor_eval)} samples)",
                         rep_text)
    out = args.out or args.ckpt.rstrip("/") + "-calibrated"
    report = os.path.join(os.path.dirname(os.path.abspath(out)), ".calibration.json")
    data.write_json(report, {"config": vars(args), "multimodal": rep_mm, "text": rep_text})
    extra = {"calibration.json": report, **tokenizer_files(args.ckpt)}
    modeling.save_checkpoint(out, sailvl, {"stage": "calibrate", "source": args.ckpt}, 0, 1, extra_files=extra)
    os.remove(report)
    print(f"\ncalibrated checkpoint written to {out} (gate weights changed in place; HF-compatible)")
    return rep_mm, rep_text


def main(argv=None):
    """A bad manifest or checkpoint is one line on stderr, no traceback (train_stage.one_line_errors)."""
    train_stage.one_line_errors(lambda: calibrate_cli(sys.argv[1:] if argv is None else argv), "tests/calibrate.py")


if __name__ == "__main__":
    main()
