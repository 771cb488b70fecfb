"""Rollout engine benchmark (paper §4.2.3: RL samples G completions per prompt).

Tokens/s of `model.generate_from_embeds` (eager, and compiled with torch.compile) against HF
transformers' `generate` on the same weights, fp32, the same rows, sampling at T = 1, measured in
the same run. Two cases:
  text  the tiny LLM, 64 rows of random 48-token prompts, 64 new tokens, no stop token (the shape
        of `rl.py bench`);
  rl    the tiny SAILVL on image prompts of the synthetic RL mix (rl.read_prompts), 8 prompts x
        G = 8 rows, the RL stage's token limit, its stop tokens, banned ids and tokenizer size.
        Both engines get the same prompt embeddings (images encoded once per prompt, not timed);
        ours prefills each prompt once (`repeats=G`), HF gets each embedding repeated G times.
Tokens = generated tokens up to each row's stop token (included). Compilation is timed apart (the
first call) and reported beside the steady state.

    OMP_NUM_THREADS=1 python tests/bench_rollout.py [--case text|rl|both] [--threads N] [--no-compile]
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import model as M  # noqa: E402


def timed(fn):
    """(wall seconds, process CPU seconds, fn())"""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def hf_copy(lm):
    """HF Qwen3ForCausalLM with the weights of our LLM (written by model.save_hf_llm)."""
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        M.save_hf_llm(lm, d)
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def hf_generate(hf, embeds: list, max_new: int, stop=(), suppress=(), min_new: int = 0) -> list:
    """HF generate on left-padded prompt embeddings (one row each), sampling at T = 1 -> id lists
    cut after each row's first stop token."""
    L = max(e.shape[0] for e in embeds)
    x = torch.stack([torch.nn.functional.pad(e, (0, 0, L - e.shape[0], 0)) for e in embeds])
    mask = torch.stack([torch.arange(L) >= L - e.shape[0] for e in embeds]).long()
    out = hf.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=min_new,
                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, pad_token_id=0,
                      eos_token_id=list(stop) or None, suppress_tokens=list(suppress) or None)
    rows = []
    for r in out.tolist():
        cut = next((k + 1 for k, t in enumerate(r) if t in stop), len(r))
        rows.append(r[:cut])
    return rows


def measure(engines: dict, repeats: int) -> dict:
    """Per engine: the best wall and CPU seconds of `repeats` calls, the generated tokens and the
    first call's seconds (warm-up; compilation). The engines are interleaved, so a loaded machine
    slows them alike; CPU seconds are the steadier measure there (one thread)."""
    first = {name: timed(fn)[0] for name, fn in engines.items()}
    best = {name: [float("inf"), float("inf"), 0] for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            wall, cpu, rows = timed(fn)
            b = best[name]
            b[0], b[1], b[2] = min(b[0], wall), min(b[1], cpu), sum(len(r) for r in rows)
    return {name: (wall, cpu, n, first[name]) for name, (wall, cpu, n) in best.items()}


def report(title: str, res: dict):
    print(title)
    hf_wall, hf_cpu, hf_n, _ = res["hf"]
    for name, (wall, cpu, n, first) in res.items():
        extra = f" | first call (compiling) {first:5.1f} s" if name == "compiled" else ""
        print(f"  {name:9s} {n / wall:9,.0f} tok/s, {n / wall / (hf_n / hf_wall):5.2f}x HF | per CPU second "
              f"{n / cpu:9,.0f} tok, {n / cpu / (hf_n / hf_cpu):5.2f}x HF | {n} tokens{extra}")


def text_case(args) -> dict:
    torch.manual_seed(0)
    lm = M.build_model("tiny").eval().language_model
    hf = hf_copy(lm)
    ids = torch.randint(0, 256, (args.batch, args.prompt_len))
    n = args.new_tokens
    with torch.inference_mode():
        rows = list(lm.model.embed_tokens(ids))

    def ours(compile):
        return lambda: M.generate_from_embeds(lm, rows, n, 1.0, 1.0, (), torch.Generator().manual_seed(0),
                                              logprobs=[], compile=compile)
    engines = {"eager": ours(False), "hf": lambda: hf_generate(hf, rows, n, min_new=n)}
    if args.compile:
        engines["compiled"] = ours(True)
    with torch.inference_mode():
        return measure(engines, args.repeats)


def rl_prompts(sailvl, n_prompts: int):
    """n_prompts prompts of the tiny rl-verifiable stage's mix (images included), the tokenizer and
    the RL config, as rl.py reads them."""
    import rl
    cfg, _ = rl.rl_config([])
    sc = rl.stage_view(cfg)
    tok = data.load_tokenizer(data.ensure_synth(cfg.data_dir, progress=False))
    dcfg = data.DataConfig.from_model(sailvl.cfg, label_mode="rl", think="on", max_len=cfg.max_tokens)
    return rl.read_prompts(sc, tok, dcfg, "train", n_prompts), tok, cfg


def rl_case(args) -> dict:
    import rl
    import sample
    torch.manual_seed(0)
    sailvl = M.build_model("tiny").eval()
    lm = sailvl.language_model
    hf = hf_copy(lm)
    prompts, tok, cfg = rl_prompts(sailvl, args.prompts)
    G, n = args.group, args.rl_new_tokens or cfg.max_new_tokens
    stop, banned = sorted(sample.stop_ids(tok)), rl.banned_ids(tok)
    with torch.inference_mode():
        flat = torch.tensor([t for p in prompts for t in p.ids])[None]
        x = sailvl.embed(flat, sample.concat_pixels([p.pixels for p in prompts]))[0]
        unique = list(x.split([len(p.ids) for p in prompts]))
    repeated = [e for e in unique for _ in range(G)]
    suppress = list(banned) + list(range(tok.n_vocab, lm.cfg.vocab_size))
    print(f"rl case: {len(prompts)} prompts x G = {G}, prompt lengths {sorted(len(p.ids) for p in prompts)}, "
          f"up to {n} new tokens")

    def ours(compile):
        return lambda: M.generate_from_embeds(lm, unique, n, 1.0, 1.0, stop, torch.Generator().manual_seed(0),
                                              n_valid_tokens=tok.n_vocab, logprobs=[], banned=banned,
                                              repeats=G, compile=compile)
    engines = {"eager": ours(False), "hf": lambda: hf_generate(hf, repeated, n, stop, suppress)}
    if args.compile:
        engines["compiled"] = ours(True)
    with torch.inference_mode():
        return measure(engines, args.repeats)


def bench_rollout(argv):
    ap = argparse.ArgumentParser(prog="bench_rollout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="both", choices=("text", "rl", "both"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd engine")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--rl-new-tokens", type=int, default=0, help="0 = the RL stage's max_new_tokens")
    args = ap.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("bench_rollout compares against HF transformers: pip install -r tests/requirements.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"rollout engine vs HF generate, fp32, sampling T=1, {torch.get_num_threads()} threads, "
          f"best of {args.repeats} (engines interleaved)")
    if args.case in ("text", "both"):
        report(f"text: tiny LLM, {args.batch} rows, prompt {args.prompt_len}, {args.new_tokens} new tokens",
               text_case(args))
    if args.case in ("rl", "both"):
        report("rl: tiny SAILVL, image prompts, per-token log-probs", rl_case(args))


if __name__ == "__main__":
    bench_rollout(sys.argv[1:])
