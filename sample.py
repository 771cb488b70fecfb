"""Generate from and evaluate a SAIL-VL2 checkpoint from the command line (paper §2; template facts §1.6).

    python sample.py --ckpt out/vit1 --image data_synth/caption/images/eval_00000.png --prompt "Describe the image."
    python sample.py --ckpt out/sft4 --video data_synth/video/videos/eval_00000.mp4 --prompt "Where does it move?"
    python sample.py --ckpt out/longcot --image IMG --prompt "What is the result?" --think
    python sample.py --ckpt out/sft4 --eval data_synth/count/eval.jsonl --out report.json
    python sample.py bench                     # decode tokens/s: ours vs HF transformers, same weights

Works on our checkpoints and on an official SAIL-VL2 folder: the tokenizer is the folder's own
(`tokenizer.json` or `vocab.json` + `merges.txt`) when present, else the embedded default. Images
are tiled as the checkpoint was trained (dynamic tiling + thumbnail, or AnyRes), videos give one
tile per frame. The answer streams to stdout token by token.

Evaluation scores each record of a manifest: records with an `"answer"` are right when the last
`\\boxed{}` of the generation (or, without one, the whole answer) matches it; others are right on
an exact match of the reference reply. Scores are reported per task family with a word-F1.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
from tqdm import tqdm

import data
import model as M


def load(ckpt: str):
    """(model, tokenizer, DataConfig) for a checkpoint folder."""
    model = M.SAILVL.from_pretrained(ckpt).eval()
    has_tok = any(os.path.exists(os.path.join(ckpt, f)) for f in ("tokenizer.json", "vocab.json"))
    tok = data.load_tokenizer(ckpt if has_tok else None)
    if model.cfg.llm_config.vocab_size < tok.n_vocab:
        raise SystemExit(f"{ckpt}: the tokenizer has {tok.n_vocab} tokens but the model only {model.cfg.llm_config.vocab_size}")
    c = model.cfg
    dcfg = data.DataConfig(image_size=c.vision_config.image_size, patch_size=c.vision_config.patch_size,
                           min_tiles=c.min_dynamic_patch, max_tiles=c.max_dynamic_patch, use_thumbnail=c.use_thumbnail,
                           anyres=c.anyres, anyres_max_patches=4 * c.anyres_max_tokens, system=c.system_prompt,
                           max_len=c.llm_config.max_position_embeddings)
    return model, tok, dcfg


class Streamer:
    """Prints the decoded text as tokens arrive (bytes are buffered until they form valid UTF-8)."""

    def __init__(self, tok, stop: set):
        self.tok, self.stop, self.ids, self.shown, self.done = tok, stop, [], "", False

    def __call__(self, next_ids):
        t = int(next_ids[0])
        if self.done or t in self.stop:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode_bytes(self.ids).decode("utf-8", errors="ignore")
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def answer(model, tok, dcfg, question, images=(), videos=(), think=False, max_new_tokens=256,
           temperature=0.0, top_p=1.0, seed=0, stream=False) -> str:
    """One reply to `question` (a string, or [(role, content)] turns) about the given media."""
    sample = data.prompt_inputs(tok, dcfg, question, images, videos, think=think)
    ids = data.special_ids(tok)
    stop = {ids.im_end, ids.endoftext}
    gen = torch.Generator().manual_seed(seed)
    streamer = Streamer(tok, stop) if stream else None
    out = model.generate([sample["input_ids"].tolist()], sample["pixel_values"], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, stop_tokens=stop, generator=gen, on_token=streamer,
                         n_valid_tokens=tok.n_vocab)[0]
    if out and out[-1] in stop:
        out = out[:-1]
    return tok.decode_bytes(out).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# evaluation on a held-out manifest

def word_f1(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if not common:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def strip_think(text: str) -> str:
    end = text.rfind("</think>")
    return text[end + len("</think>"):] if end >= 0 else text


def is_correct(pred: str, reference: str, gold_answer) -> bool:
    """\\boxed{} (or whole-answer) match against the record's `answer`, else exact reply match."""
    if gold_answer is not None:
        got = data.last_boxed(pred)
        got = got if got is not None else strip_think(pred)
        return data.normalize_answer(got) == data.normalize_answer(gold_answer)
    return data.normalize_answer(strip_think(pred)) == data.normalize_answer(strip_think(reference))


def evaluate(model, tok, dcfg, manifest: str, limit=None, max_new_tokens=128, think=None) -> dict:
    ds = data.JsonlDataset(manifest, tok, dcfg)
    per_task = defaultdict(lambda: {"n": 0, "correct": 0, "f1": 0.0})
    bad = data.BadData(max_fraction=1.0)
    examples = []
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in tqdm(range(n), desc=f"eval {os.path.basename(manifest)}"):
        try:
            rec = ds.record(i)
            if rec.text is not None or rec.turns[-1][0] != "assistant":
                raise data.DataError("schema", rec.where, "an eval record needs a final assistant turn to score")
            t = rec.think if think is None else think
            pred = answer(model, tok, dcfg, list(rec.turns[:-1]), rec.images, rec.videos, think=bool(t),
                          max_new_tokens=max_new_tokens)
        except data.DataError as e:
            bad.bad(e)
            continue
        bad.good()
        ref = rec.turns[-1][1]
        s = per_task[rec.task]
        s["n"] += 1
        s["correct"] += is_correct(pred, ref, rec.answer)
        s["f1"] += word_f1(strip_think(pred), strip_think(ref))
        if len(examples) < 5:
            examples.append({"where": rec.where, "prediction": pred, "reference": ref, "answer": rec.answer})
    report = {"manifest": manifest, "n": sum(s["n"] for s in per_task.values()), "bad": bad.report(),
              "tasks": {t: {"n": s["n"], "accuracy": s["correct"] / s["n"], "word_f1": s["f1"] / s["n"]}
                        for t, s in sorted(per_task.items())},
              "examples": examples}
    return report


# ----------------------------------------------------------------------------------------------
# benchmark: decode speed against HF transformers on the same weights

def bench(args):
    """Greedy decode tokens/s of our Qwen3LM (KV cache) vs HF `generate` on the same weights, one run."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("sample.py bench compares against HF transformers: pip install -r tests/requirements.txt")
    import tempfile
    torch.manual_seed(0)
    lm = (M.SAILVL.from_pretrained(args.ckpt) if args.ckpt else M.build_model(args.preset)).language_model.eval()
    with tempfile.TemporaryDirectory() as d:
        M.save_hf_llm(lm, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    V = lm.cfg.vocab_size
    prompts = torch.randint(0, min(V, 256), (args.batch, args.prompt_len)).tolist()
    n = args.new_tokens

    def ours():
        return lm.generate(prompts, max_new_tokens=n)

    def theirs():
        with torch.no_grad():
            out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(args.batch, args.prompt_len, dtype=torch.long),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

    same = ours() == theirs()                                            # also a warm-up of both
    times = {"ours": [], "hf": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("hf", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tps = {k: args.batch * n / min(v) for k, v in times.items()}
    print(f"decode, {args.preset if not args.ckpt else args.ckpt}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{n} new tokens, fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"  ours (KV cache)     {tps['ours']:9.1f} tok/s")
    print(f"  HF generate         {tps['hf']:9.1f} tok/s")
    print(f"  ratio ours / HF     {tps['ours'] / tps['hf']:9.2f}x   (greedy outputs identical: {same})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        ap = argparse.ArgumentParser(prog="sample.py bench", description=bench.__doc__)
        ap.add_argument("--preset", default="tiny")
        ap.add_argument("--ckpt", default=None, help="a checkpoint instead of a random preset")
        ap.add_argument("--batch", type=int, default=4)
        ap.add_argument("--prompt-len", type=int, default=64)
        ap.add_argument("--new-tokens", type=int, default=64)
        ap.add_argument("--repeats", type=int, default=3)
        return bench(ap.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ckpt", required=True, help="a checkpoint folder (ours or an official SAIL-VL2 one)")
    ap.add_argument("--image", nargs="*", default=[], help="image file(s); each gets an <image> placeholder")
    ap.add_argument("--video", nargs="*", default=[], help="video file(s), sampled to 16 frames")
    ap.add_argument("--prompt", default="Describe the image.")
    ap.add_argument("--think", action="store_true", help="thinking mode: ask for <think>...</think> + \\boxed{}")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", default=None, help="score a held-out manifest instead of answering one prompt")
    ap.add_argument("--limit", type=int, default=None, help="eval: first N records only")
    ap.add_argument("--out", default=None, help="eval: where to write the JSON report")
    args = ap.parse_args(argv)
    model, tok, dcfg = load(args.ckpt)
    if args.eval:
        report = evaluate(model, tok, dcfg, args.eval, args.limit, args.max_new_tokens)
        for t, s in report["tasks"].items():
            print(f"{t:14s} n={s['n']:4d}  accuracy {s['accuracy']:.3f}  word-F1 {s['word_f1']:.3f}")
        print(report["bad"])
        out = args.out or os.path.join(args.ckpt, "eval_" + os.path.basename(args.eval).replace(".jsonl", ".json"))
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report: {out}")
        return report
    answer(model, tok, dcfg, args.prompt, args.image, args.video, think=args.think,
           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
           stream=True)
    print()


if __name__ == "__main__":
    main()
