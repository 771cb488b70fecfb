"""The whole recipe in one command: every stage of train_stage.RECIPE in order, each evaluated, with a report.

    python tests/recipe.py --until=vit1 --step_scale=0.05      # a short run; --help lists every option
    python train_stage.py --stage all ...                       # the same (train_stage.main forwards here)

Each stage runs as its own process (`train_stage.py` or `rl.py` through `stage_command`, resuming
if it was cut), then is evaluated on the held-out samples of every synthetic family (real images,
blank images, thinking mode from LongCoT on; `evaluate_stage`), its predictions written to
<out_dir>/recipe/predictions/<stage>.jsonl. The report (<out_dir>/recipe/report.{json,md,png})
holds every stage's accuracy with Wilson intervals and the effects the recipe claims as paired
differences on the same samples (`recipe_effects`, sample.paired_difference); a finished stage is
skipped, so an interrupted run continues where it stopped. `--seeds=N` runs the recipe N times.

This is tooling beside the components: the stages, their values and commands are train_stage.py's
(RECIPE, stage_config, command_for), the statistics sample.py's (wilson_interval, accuracy_cell,
paired_difference); this file runs, evaluates and reports. Options: the recipe's own
(train_stage.RECIPE_OPTIONS), every other one goes to every stage.
"""
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Optional

import repo_path

repo_path.add_repo_root()              # the project's files, after transformers has bound HF's `kernels`

import torch  # noqa: E402
from PIL import Image, ImageFont  # noqa: E402

import data  # noqa: E402
import model as modeling  # noqa: E402
import rl  # noqa: E402
import sample  # noqa: E402
import train_stage  # noqa: E402
from train_stage import (RECIPE, RECIPE_HELP, RECIPE_OPTIONS, RL_HELDOUT, STAGES, TRAINING_ONLY, Stage,  # noqa: E402
                         StageConfig, UsageError, parse_args, same_tokens, split_options, stage_dir, stage_row, writable_dir)


# ==============================================================================================
# the recipe runner: each stage as its own process, evaluated, its report entry

SEED_STEP = 1000
EVAL_BATCH = 64                  # prompts per generate call in the recipe's evaluation
# Thinking mode is measured (from LongCoT on) where LongCoT trains (math, count_cot) and on their
# direct twins (math_direct, count): every thinking effect the recipe claims lies there.
THINK_FAMILIES = ("count", "count_cot", "math", "math_direct")
MODE_WORDS = {"real": "real images", "blank": "blank images", "think": "thinking mode"}


def recipe_effects() -> list:
    """The effects the recipe claims, each a paired difference A - B on the same held-out samples:
    [(name, (stage A, mode), (stage B, mode), families)], modes as evaluate_stage's (real, blank,
    think). An RL stage may add its own held-out before / after: RL_HELDOUT in its output folder,
    one {"side": "before" | "after", "family", "where", "correct"} per line (recipe_effect_results)."""
    mix = lambda stage: tuple(f for f, _ in STAGES[stage].mix if f in data.SYNTH_FAMILIES)    # noqa: E731
    return [("progressive alignment (stages I-III vs III alone)", ("vit3", "real"), ("vit3-direct", "real"), mix("vit3")),
            ("SFT", ("sft4", "real"), ("vit1", "real"), VISUAL),
            ("soup vs its first input", ("soup", "real"), ("sft4", "real"), mix("sft4")),
            ("soup vs its second input", ("soup", "real"), ("sft4-twin", "real"), mix("sft4")),
            ("LongCoT: thinking vs direct", ("longcot", "think"), ("longcot", "real"), THINK_FAMILIES),
            ("Think-Fusion direct vs LongCoT thinking", ("thinkfusion", "real"), ("longcot", "think"), THINK_FAMILIES),
            ("RL verifiable: after vs before", ("rl-verifiable", "think"), ("longcot", "think"), THINK_FAMILIES),
            ("RL mixed: after vs before", ("rl-mixed", "real"), ("thinkfusion", "real"), mix("rl-mixed")),
            ("RL mixed: after vs before, thinking", ("rl-mixed", "think"), ("thinkfusion", "think"), THINK_FAMILIES),
            ("vit1 sees (OCR)", ("vit1", "real"), ("vit1", "blank"), ("ocr",)),
            ("sft4 sees", ("sft4", "real"), ("sft4", "blank"), VISUAL)] + [
            (f"sft4 sees ({f})", ("sft4", "real"), ("sft4", "blank"), (f,)) for f in VISUAL]


def mode_of(p: dict) -> str:
    return "think" if p["think"] else "blank" if p["blank"] else "real"


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def recipe_effect_results(rdir: str, cfg: StageConfig, stand_in: Optional[tuple] = None,
                          against: Optional[tuple] = None) -> list:
    """The effects whose two sides this run has measured (predictions/<stage>.jsonl), each
    {"name", "a", "b", "families", **sample.paired_difference}; an RL stage's own held-out before /
    after (RL_HELDOUT) as one more. Sides scored on different samples stop the recipe.
    stand_in: (stage, its folder, its predictions): an output made outside the recipe, first against
    this run's own stage (or `against`: (folder, predictions), another output of that stage), then in
    that stage's place in the effects it is part of (compare_output)."""
    preds = {} if stand_in is None else {stand_in[0]: stand_in[2]}

    def run_predictions(stage):                    # this run's, [] for a stage it has not scored
        path = os.path.join(rdir, "predictions", f"{stage}.jsonl")
        return read_jsonl(path) if os.path.exists(path) else []

    def side(stage, mode, fams):
        if stage not in preds:
            preds[stage] = run_predictions(stage)
        return [p for p in preds[stage] if mode_of(p) == mode and p["family"] in fams]

    effects, specs = recipe_effects(), []
    if stand_in is not None:            # first, mode by mode, the outside output against this run's own stage;
        stage, folder, theirs = stand_in      # then its effects, over the families it was scored on
        keys = {(p["family"], p["where"]) for p in theirs}
        words, label, ours = (("--against", f"{stage} ({against[0]})", against[1]) if against else
                              ("this run's", f"{stage} (this run)", run_predictions(stage)))
        ours = [p for p in ours if (p["family"], p["where"]) in keys]
        specs = [(f"{stage}: --compare vs {words}, {MODE_WORDS[mode]}", f"{stage} ({folder})",
                  [p for p in theirs if mode_of(p) == mode], label, [p for p in ours if mode_of(p) == mode])
                 for mode in dict.fromkeys(mode_of(p) for p in theirs)]
        scored = {family for family, _ in keys}
        effects = [(name, a, b, tuple(f for f in fams if f in scored)) for name, a, b, fams in effects
                   if stage in (a[0], b[0])]
    specs += [(name, f"{sa} ({MODE_WORDS[ma]})", side(sa, ma, fams), f"{sb} ({MODE_WORDS[mb]})", side(sb, mb, fams))
              for name, (sa, ma), (sb, mb), fams in effects]
    for row in RECIPE:
        if stand_in is not None and row.name != stand_in[0]:
            continue
        path = os.path.join(stand_in[1] if stand_in else stage_dir(cfg, row.name), RL_HELDOUT)
        if row.runner == "rl.py" and os.path.exists(path):
            held = read_jsonl(path)
            specs.append((f"{row.name}: its own held-out, after vs before", f"{row.name} (after)",
                          [p for p in held if p["side"] == "after"], f"{row.name} (before)",
                          [p for p in held if p["side"] == "before"]))
    out = []
    for name, a_label, a, b_label, b in specs:
        if not a or not b:
            continue
        try:
            diff = sample.paired_difference(a, b)
        except ValueError as e:
            raise UsageError(f"effect {name!r}: {e}; were the stages evaluated with different --eval_limit or "
                             f"--eval_families? Remove {rdir} or pass the earlier values") from None
        fams = list(dict.fromkeys(p["family"] for p in a))          # in evaluation order
        out.append({"name": name, "a": a_label, "b": b_label, "families": fams, **diff})
    return out


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def stage_command(row: Stage, nproc: int, passthrough: list, seed_offset: int = 0) -> list:
    """The command that runs one row of the recipe as its own process (resuming if it was cut), with
    the seed the row would run with (its tiny default, else StageConfig's) + the offset; a --seed given
    replaces StageConfig's there, so a row with a seed of its own (sft4-twin, the soup's second input)
    keeps its distance from the others' and stays a twin, not a copy."""
    script = os.path.join(repo_path.ROOT, "train_stage.py" if row.runner == "soup" else row.runner)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    given = dict(split_options(passthrough)).get("seed")
    own = dict(row.tiny).get("seed", StageConfig.seed)
    base = own if given is None else int(given) + own - StageConfig.seed
    seed = [f"--seed={base + seed_offset}"] if seed_offset or given is not None else []
    skip = {"soup": TRAINING_ONLY, "rl.py": (*rl.RL_UNUSED, *(rl.HARVEST_UNUSED if row.name == "harvest" else ()))
            }.get(row.runner, ())
    passthrough = [a for a in passthrough if split_options([a])[0][0].split(".")[0] not in skip]   # what it reads
    return launch + [script, "--stage", row.name, *passthrough, *seed] + (["--resume"] if row.trainable else [])


# the evaluation's prompts (token ids and decoded pixels), built once per process and reused for
# every stage: the same held-out records with the same tokenizer and data config each time
PROMPTS = {}


TOKENIZERS = []                  # one of each distinct tokenizer the evaluation has met


def tokenizer_key(tok) -> int:
    """The index of the first tokenizer met that encodes as `tok` does (train_stage.same_tokens, both
    ways). Not its name, which is the folder it was read from: every stage's checkpoint carries
    its own copy of the same tokenizer."""
    for i, ref in enumerate(TOKENIZERS):
        if same_tokens(tok, ref) and same_tokens(ref, tok):
            return i
    TOKENIZERS.append(tok)
    return len(TOKENIZERS) - 1


def evaluate_stage(folder: str, cfg: StageConfig, think: bool, limit: int, families=None, scope=None) -> tuple:
    """({mode: {family: cell}}, predictions) of a stage output on the first `limit` held-out samples
    of each synthetic family; a cell is sample.accuracy_cell (n, correct, accuracy, Wilson 95%
    interval). Modes: real images; blank images (every family with images: all but text); thinking
    mode from LongCoT on (THINK_FAMILIES). Every mode reads the same samples of a family.
    scope: {mode: families} to score only those (comparison_scope); None = every mode and family."""
    model, tok, dcfg = sample.load(folder, device=sample.default_device())
    fams = families or sample.synth_families(cfg.data_dir)
    modes = {"real": (fams, False, False), "blank": ([f for f in fams if f != "text"], False, True)}
    if think:
        modes["think"] = ([f for f in fams if f in THINK_FAMILIES], True, False)
    if scope is not None:
        modes = {m: ([f for f in fs if f in scope.get(m, ())], t, blank) for m, (fs, t, blank) in modes.items()}
    evals, preds = {}, []
    for mode, (fs, t, blank) in modes.items():
        if not fs:
            continue
        res = sample.evaluate_families(model, tok, dcfg, cfg.data_dir, fs, limit=limit,
                                       mode=sample.EvalMode(think=t, blank=blank, batch_size=EVAL_BATCH, progress=False),
                                       prompts=PROMPTS.setdefault((cfg.data_dir, repr(dcfg), tokenizer_key(tok)), {}))
        right = Counter(p["family"] for p in res["predictions"] if p["correct"])
        evals[mode] = {f: sample.accuracy_cell(right[f], n) for f, n in res["n"].items()}
        preds += [{k: p[k] for k in ("family", "where", "answer", "prediction", "correct", "blank", "think")}
                  for p in res["predictions"]]
    return evals, preds


def stage_losses(folder: str) -> tuple:
    """(train losses per step, held-out loss at the start) from a stage's metrics.jsonl."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return [], None
    recs = read_jsonl(path)
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    return [r["loss"] for r in recs if "loss" in r], evals[0] if evals else None


# options that decide how often a stage saves and how it reads its data, not what it trains
RUN_ONLY = ("save_every", "keep_checkpoints", "num_workers", "prefetch_factor")


def refuse_if_trained_otherwise(row: Stage, cfg: StageConfig, passthrough: list, seed_offset: int, path: str = ""):
    """A finished output the recipe would keep, or the step checkpoint (`path`) it would resume, must
    have been trained with the settings this run's command for the stage gives (its meta.json's
    options against them, RUN_ONLY aside, --out_dir as the folder it names; an RL row's algorithm and
    clips filled in as rl.py fills them), or the report would present another run's stage (a stage
    run by hand, or the recipe at another --step_scale) as this run's. One that records no options
    (written before the harvest saved them) is refused too."""
    args = stage_command(row, 1, passthrough, seed_offset)[2:]            # after `python script`
    folder = stage_dir(cfg, row.name)
    path = path or folder
    now = rl.rl_config(args)[0] if row.runner == "rl.py" else parse_args(args)[0]
    if row.runner == "rl.py" and row.name != "harvest":
        now = rl.resolve_algo(now, modeling.read_config(path))
    saved = modeling.verify_checkpoint(path).get("config")
    if saved is None:
        raise UsageError(f"{path} records no options to check against this run's (an output of an older version): "
                         f"remove {folder} and {folder}.run to train it again, or use another --out_dir")
    folder_of = lambda c: {**c, "out_dir": os.path.abspath(c.get("out_dir", ""))}             # noqa: E731
    changed = [c for c in train_stage.changed_options(folder_of(saved), folder_of(dataclasses.asdict(now)))
               if c.split(" ")[0] not in RUN_ONLY]
    if changed:
        raise UsageError(f"{path} was trained with other settings than this run gives {row.name} ({', '.join(changed[:3])}"
                         f"{', ...' if len(changed) > 3 else ''}): use another --out_dir, or remove {folder} and "
                         f"{folder}.run to train it again")


def train_row(row: Stage, cfg: StageConfig, own: dict, passthrough: list, seed_offset: int,
              while_running=lambda: None) -> float:
    """Run one row as its own process (unless its output verifies, trained as this run would), calling
    while_running() every minute it runs; its seconds: the process's wall clock, or where it resumed a
    cut run or had finished before (a run killed before the recipe recorded it), the stage's own time,
    every attempt's up to its last checkpoint (its meta.json)."""
    t0, folder = time.time(), stage_dir(cfg, row.name)
    if modeling.is_finished_stage(folder):
        refuse_if_trained_otherwise(row, cfg, passthrough, seed_offset)
        return modeling.verify_checkpoint(folder).get("seconds")
    resumes = row.trainable and modeling.find_resume_checkpoint(folder + ".run", lambda *a: None)
    if resumes:                                        # the run the stage's --resume would continue
        refuse_if_trained_otherwise(row, cfg, passthrough, seed_offset, resumes)
    code = run_stage_process(stage_command(row, int(own["nproc"]), passthrough, seed_offset), while_running)
    if code:
        raise UsageError(f"the recipe stopped at {row.name} (exit {code}); fix it and run the "
                         f"same command again: finished stages are skipped")
    seconds = time.time() - t0
    return modeling.verify_checkpoint(folder).get("seconds", seconds) if resumes else seconds


def run_stage_process(cmd: list, while_running=lambda: None, every: float = 60.0) -> int:
    """Run a stage's command, calling while_running() every `every` seconds until it ends; its exit
    code. On Ctrl-C the stage, quiet (the recipe says how to go on: RECIPE_CHILD), is given time to
    leave: a terminal's Ctrl-C reaches it too, a SIGINT to the recipe alone is passed on, and only a
    stage still there after a minute is killed (subprocess.run killed it after 0.25 s: torchrun's
    workers were left running on their own)."""
    p = subprocess.Popen(cmd, env={**os.environ, train_stage.RECIPE_CHILD: "1"})
    try:
        while True:
            try:
                return p.wait(timeout=every)
            except subprocess.TimeoutExpired:
                while_running()
    except KeyboardInterrupt:
        for nudge, wait in ((None, 2), (signal.SIGINT, 60), (signal.SIGKILL, None)):
            if nudge is not None:
                p.send_signal(nudge)
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise


# rows that exist for one comparison: scored only on what the effects read of them
COMPARISON_ROWS = ("vit3-direct", "sft4-twin")


def comparison_scope(name: str):
    """{mode: families} a row is scored on, or None for everything: a comparison row on what
    recipe_effects reads of it; lm0, the text-only stand-in for Qwen3's own pre-training, on text
    (it has never seen an image). A full row costs 13-20 s of evaluation on 2 cores; lm0 1 s, vit3-direct
    2 s, sft4-twin 7 s (the recipe run recorded in README)."""
    if name == "lm0":
        return {"real": ("text",)}
    if name not in COMPARISON_ROWS:
        return None
    scope = defaultdict(set)
    for _, side_a, side_b, fams in recipe_effects():
        for stage, mode in (side_a, side_b):
            if stage == name:
                scope[mode] |= set(fams)
    return dict(scope)


def evaluate_row(row: Stage, cfg: StageConfig, own: dict, folder: Optional[str] = None) -> tuple:
    """evaluate_stage for a trained row (RL stages that train nothing, harvest, are not evaluated);
    folder: its output when not the recipe's own (compare_output)."""
    names = [r.name for r in RECIPE]
    think = names.index(row.name) >= names.index("longcot")
    families = [f for f in own["eval_families"].split(",") if f] or None
    if row.runner == "rl.py" and not row.trainable:
        return {}, []
    return evaluate_stage(folder or stage_dir(cfg, row.name), cfg, think, int(own["eval_limit"]), families,
                          comparison_scope(row.name))


def print_effects(effects: list):
    for e in effects:
        print(f"effect | {e['name']}: {e['a']} vs {e['b']} | {', '.join(e['families'])} | n {e['n']} | "
              f"{e['accuracy_a']:.3f} vs {e['accuracy_b']:.3f} | "
              f"{e['difference']:+.3f} [{e['interval'][0]:+.3f}, {e['interval'][1]:+.3f}] | "
              f"{'shown' if e['excludes_0'] else 'within noise'}", flush=True)


def compare_output(cfg: StageConfig, own: dict) -> list:
    """--compare=DIR --as=STAGE: the stage output DIR, made outside the recipe (another seed or
    setting, e.g. `python rl.py --stage rl-mixed --seed=2 --out_dir=...`), evaluated as the recipe
    evaluates STAGE (the same samples, modes and scope), then, against the predictions of the recipe
    run in --out_dir, DIR vs the run's own STAGE (mode by mode) and the recipe's effects STAGE is part
    of with DIR in its place (over the families DIR was scored on). --against=DIR2 (another output of
    STAGE, e.g. the same stage on other data) takes the run's STAGE's place in the first comparison,
    so two settings beside a run are paired directly. Each output's predictions go to
    <output>/recipe_predictions.jsonl, DIR's effects to DIR/recipe_effects.json."""
    folder, name, other = own["compare"], own["as"], own["against"]
    row = stage_row(name)
    for option, path in (("compare", folder), ("against", other)):
        if path and not modeling.is_finished_stage(path):
            raise UsageError(f"--{option}={path}: not a finished stage output (no verified checkpoint there)")
    rdir = os.path.join(cfg.out_dir, "recipe")
    if not other and not os.path.isdir(os.path.join(rdir, "predictions")):
        raise UsageError(f"--compare needs a recipe run to compare against: {rdir}/predictions is missing "
                         f"(--out_dir names the run)")

    def scored(path):
        _, preds = evaluate_row(row, cfg, own, path)
        data.write_atomic(os.path.join(path, "recipe_predictions.jsonl"), "".join(json.dumps(p) + "\n" for p in preds))
        return preds

    preds = scored(folder)
    effects = recipe_effect_results(rdir, cfg, (name, folder, preds), (other, scored(other)) if other else None)
    data.write_json(os.path.join(folder, "recipe_effects.json"), effects)
    print_effects(effects)
    if not effects:
        print(f"effect | none: {name} has no predictions in {rdir}/predictions to compare with, and is part of no "
              f"recipe effect", flush=True)
    return effects


def stage_entry(row: Stage, cfg: StageConfig, seconds: float, evals: dict, preds: list, rdir: str) -> dict:
    """A row's report entry from its output's meta and its evaluation; writes its predictions."""
    out = stage_dir(cfg, row.name)
    meta = modeling.verify_checkpoint(out)
    losses, start = stage_losses(out)
    entry = {"seconds": None if seconds is None else round(seconds, 1), "first_loss": meta.get("first_loss"),
             "final_loss": meta.get("final_loss"), "eval_loss_start": start, "eval_loss": meta.get("eval_loss"), "eval": evals}
    for key in ("reward", "kept", "rl_eval"):         # RL: held-out greedy / pass@1 / maj@k / pass@k, paired
        if key in meta:
            entry[key] = meta[key]
    if isinstance(entry["eval_loss"], dict):                  # the soup: its own held-out loss
        entry["eval_loss"] = entry["eval_loss"].get("soup")
    data.write_atomic(os.path.join(rdir, "predictions", f"{row.name}.jsonl"), "".join(json.dumps(p) + "\n" for p in preds))
    print_stage_line(row.name, entry, meta)
    return entry


def print_stage_line(name: str, entry: dict, meta: dict):
    """recipe | stage  seconds | what it did | mean visual accuracy (blank) | per family ± interval."""
    if "reward" in entry:
        what = f"held-out reward {entry['reward']['before']:.3f} -> {entry['reward']['after']:.3f}"
    elif "kept" in entry:
        what = f"{meta['kept']} chains kept of {meta['samples']} samples"
    else:
        fmt = lambda x: "—" if x is None else f"{x:.3f}"                                # noqa: E731
        what = f"held-out loss {fmt(entry['eval_loss_start'])} -> {fmt(entry['eval_loss'])}"
    real, blank = entry["eval"].get("real", {}), entry["eval"].get("blank", {})
    mean = lambda cells: sum(c["accuracy"] for f, c in cells.items() if f in VISUAL) / max(1, len(  # noqa: E731
        [f for f in cells if f in VISUAL]))
    seen = f" | visual accuracy {mean(real):.3f}" if any(f in VISUAL for f in real) else ""
    seen += f" (blank {mean(blank):.3f})" if seen and blank else ""
    accs = seen + " | " + " ".join(f"{f} {sample.plus_minus(c['accuracy'], c['interval'])}"
                                   for f, c in real.items()) if real else ""
    print(f"recipe | {name:13s} {seconds_text(entry['seconds']):>6s} s | {what}{accs}", flush=True)


def seconds_text(seconds: Optional[float]) -> str:
    """A stage's seconds as the report shows them; "?" for an output that does not record its time
    (written before outputs did)."""
    return "?" if seconds is None else f"{seconds:.0f}"


def write_report(rdir: str, report: dict, cfg: StageConfig):
    data.write_json(os.path.join(rdir, "report.json"), report)
    data.write_atomic(os.path.join(rdir, "report.md"), report_markdown(report))
    report_picture(report, {n: stage_losses(stage_dir(cfg, n))[0] for n in report["stages"]},
                          os.path.join(rdir, "report.png"))


def run_recipe_once(cfg: StageConfig, own: dict, passthrough: list, seed_offset: int) -> dict:
    """Every stage of the recipe in order into cfg.out_dir, each from the previous one, each
    evaluated, with <out_dir>/recipe/report.{json,md,png} and every prediction in
    <out_dir>/recipe/predictions/<stage>.jsonl. A finished stage (its output verifies and the
    report has it) is skipped, so an interrupted run continues where it stopped (a stage trained
    but not yet evaluated is evaluated then, not trained again). Evaluating while the next stage
    trains was tried twice on 2 cores: at equal priority the two compete and the training slows by
    about as much as the evaluation it hides; in a thread at the lowest priority the training keeps
    its speed, but its threads leave the evaluation only ~13% of a core (measured over a whole
    recipe run), so most of the evaluation still waited for the end."""
    rdir = os.path.join(cfg.out_dir, "recipe")
    writable_dir(os.path.join(rdir, "predictions"))
    path = os.path.join(rdir, "report.json")
    report = json.load(open(path)) if os.path.exists(path) else {"stages": {}}
    t_start, wall_before = time.time(), report.get("wall_seconds", 0.0)
    data.ensure_synth(cfg.data_dir)
    families = [f for f in own["eval_families"].split(",") if f] or None
    report.update(machine=machine(), eval_limit=int(own["eval_limit"]), seed_offset=seed_offset,
                  interval="Wilson 95%", effect_interval=f"paired bootstrap 95%, {sample.BOOTSTRAP_RESAMPLES} resamples",
                  chance={f: round(c, 4) for f, c in sample.chance(cfg.data_dir, families, limit=int(own["eval_limit"])).items()})
    rows = RECIPE[:[r.name for r in RECIPE].index(own["until"]) + 1] if own["until"] else RECIPE
    trained = False

    def keep_wall_clock():           # every minute of a stage: a killed recipe (kill -9) loses at most that
        report["wall_seconds"] = round(wall_before + time.time() - t_start, 1)
        data.write_json(path, report)
    try:
        for row in rows:
            if row.name in report["stages"] and modeling.is_finished_stage(stage_dir(cfg, row.name)):
                refuse_if_trained_otherwise(row, cfg, passthrough, seed_offset)
                took = seconds_text(report["stages"][row.name]["seconds"])
                print(f"recipe | {row.name:13s} done before ({took} s): skipped", flush=True)
            else:
                found = modeling.is_finished_stage(stage_dir(cfg, row.name))     # trained outside the recipe
                seconds = train_row(row, cfg, own, passthrough, seed_offset, keep_wall_clock)
                t_eval = time.time()
                report["stages"][row.name] = stage_entry(row, cfg, seconds, *evaluate_row(row, cfg, own), rdir)
                report["stages"][row.name]["found_trained"] = found
                report["stages"][row.name]["eval_seconds"] = round(time.time() - t_eval, 1)
                report["total_seconds"] = round(sum(st["seconds"] or 0 for st in report["stages"].values()), 1)
                report["eval_seconds"] = round(sum(st.get("eval_seconds", 0) for st in report["stages"].values()), 1)
                report["wall_seconds"] = round(wall_before + time.time() - t_start, 1)
                report["effects"] = recipe_effect_results(rdir, cfg)
                write_report(rdir, report, cfg)                  # written after every stage: a cut run keeps it
                trained = True
    finally:             # an interrupted or failed run's time counts too (a killed one's, up to its last minute)
        keep_wall_clock()
    if not trained:                                          # every stage skipped: the report still refreshed
        report["effects"] = recipe_effect_results(rdir, cfg)
        write_report(rdir, report, cfg)
    print_effects(report["effects"])
    print(f"recipe done: {report.get('wall_seconds', 0) / 60:.1f} min of wall clock over its runs (this one "
          f"{(time.time() - t_start) / 60:.1f} min), {stage_time_text(report)}: "
          f"{rdir}/report.md, report.png, report.json")
    return report


def run_recipe(argv: list):
    """python train_stage.py --stage all [--seeds=N]: the recipe (run_recipe_once), N times with
    different seeds; the first run's report then also holds every run's effects ("seeds")."""
    opts = dict(split_options(argv))
    own = {**RECIPE_OPTIONS, **{k: opts.pop(k) or v for k, v in RECIPE_OPTIONS.items() if k in opts}}
    opts.pop("stage", None)
    passthrough = [f"--{k}={v}" for k, v in opts.items() if k not in ("resume", "help")]
    cfg, _, _ = parse_args(["--stage", "vit1", *passthrough])         # usage errors now, not in stage 7
    if own["until"]:
        stage_row(own["until"])
    if bool(own["compare"]) != bool(own["as"]):
        raise UsageError("--compare=DIR and --as=STAGE go together")
    if own["against"] and not own["compare"]:
        raise UsageError("--against=DIR is compared with --compare=DIR --as=STAGE")
    for key in ("seeds", "nproc", "eval_limit"):
        if not own[key].isdigit() or int(own[key]) < 1:
            raise UsageError(f"--{key} must be a whole number >= 1, got {own[key]!r}")
    unknown = sorted(set(own["eval_families"].split(",")) - set(data.SYNTH_FAMILIES) - {""})
    if unknown:
        raise UsageError(f"--eval_families: unknown {', '.join(unknown)}; choose from {', '.join(data.SYNTH_FAMILIES)}")
    if own["compare"]:
        if own["seeds"] != RECIPE_OPTIONS["seeds"]:
            raise UsageError("--seeds runs the recipe again; --compare evaluates one stage output against a run")
        return compare_output(cfg, own)
    runs = []
    for k in range(1, int(own["seeds"]) + 1):
        out_dir = cfg.out_dir if k == 1 else os.path.join(cfg.out_dir, f"seed{k}")
        run_cfg = dataclasses.replace(cfg, out_dir=out_dir)
        args = [a for a in passthrough if not a.startswith("--out_dir=")] + [f"--out_dir={out_dir}"]
        report = run_recipe_once(run_cfg, own, args, SEED_STEP * (k - 1))
        runs.append({"run": k, "seed_offset": SEED_STEP * (k - 1), "out_dir": out_dir, "effects": report["effects"]})
    if len(runs) > 1:
        first = json.load(open(os.path.join(cfg.out_dir, "recipe", "report.json")))
        first["seeds"] = runs
        write_report(os.path.join(cfg.out_dir, "recipe"), first, cfg)
        print(f"{len(runs)} runs: every run's effects in {cfg.out_dir}/recipe/report.md (\"Effects in every run\")")


# ==============================================================================================
# the recipe's report: tables (report.md) and a picture (report.png) of every stage

VISUAL = ("count", "chart", "ocr", "multi", "video", "caption_qa", "caption")
MODES = {"real": "Real images", "blank": "Blank images (every image and video frame white: the blindness measure)",
         "think": "Thinking mode (the think prompt appended)"}


def report_families(report: dict) -> list:
    """The families a report holds, in SYNTH_FAMILIES order."""
    found = {f for st in report["stages"].values() for cells in st.get("eval", {}).values() for f in cells}
    return [f for f in data.SYNTH_FAMILIES if f in found] + sorted(found - set(data.SYNTH_FAMILIES))


def accuracy_table(report: dict, mode: str) -> list:
    """Markdown lines: one row per stage measured in `mode`, `0.72 ±0.08` cells, a chance row."""
    fams, stages = report_families(report), report["stages"]
    lead = ["stage", "s", "held-out loss"] if mode == "real" else ["stage"]
    lines = ["| " + " | ".join(lead + fams) + " |", "|" + "---|" * (len(lead) + len(fams))]
    for name, st in stages.items():
        cells = st.get("eval", {}).get(mode)
        if not cells:
            continue
        loss = lambda k: "—" if st.get(k) is None else f"{st[k]:.3f}"                      # noqa: E731
        row = [name] + ([seconds_text(st.get("seconds")), f"{loss('eval_loss_start')} → {loss('eval_loss')}"
                         if st.get("eval_loss") is not None else "—"] if mode == "real" else [])
        row += [sample.plus_minus(cells[f]["accuracy"], cells[f]["interval"]) if f in cells else "" for f in fams]
        lines.append("| " + " | ".join(row) + " |")
    chance = report.get("chance", {})
    lines.append("| " + " | ".join(["chance"] + [""] * (len(lead) - 1) + [f"{chance.get(f, 0):.2f}" for f in fams]) + " |")
    return lines


def signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def effect_cell(e: dict) -> str:
    return f"{signed(e['difference'])} [{signed(e['interval'][0])}, {signed(e['interval'][1])}]"


def effects_table(effects: list) -> list:
    lines = ["| effect (A vs B) | families | n | A | B | A − B [95% interval] | reading |", "|---|---|---|---|---|---|---|"]
    for e in effects:
        lines.append(f"| {e['name']}: {e['a']} vs {e['b']} | {', '.join(e['families'])} | {e['n']} | "
                     f"{e['accuracy_a']:.2f} | {e['accuracy_b']:.2f} | {effect_cell(e)} | "
                     f"{'shown' if e['excludes_0'] else 'within noise'} |")
    return lines


def seeds_table(runs: list) -> list:
    """One row per effect, one column per run of the recipe (`--seeds=N`); * marks an interval
    that excludes 0."""
    names = list(dict.fromkeys(e["name"] for r in runs for e in r["effects"]))
    lines = ["| effect | " + " | ".join(f"run {r['run']} (seed +{r['seed_offset']})" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for name in names:
        got = [{e["name"]: e for e in r["effects"]}.get(name) for r in runs]
        lines.append(f"| {name} | " + " | ".join("" if e is None else effect_cell(e) + (" *" if e["excludes_0"] else "")
                                                 for e in got) + " |")
    return lines


def stage_time_text(report: dict) -> str:
    """The stages' time as the report states it: the part within the recipe's wall clock, and apart
    from it the stages the recipe found trained (by hand, before it ran: their time is not its own)."""
    found = {name: st["seconds"] or 0 for name, st in report["stages"].items() if st.get("found_trained")}
    text = f"{(report.get('total_seconds', 0) - sum(found.values())) / 60:.1f} min of it in the stages"
    return text + (f" (and {sum(found.values()) / 60:.1f} min in stages it found trained: {', '.join(found)})"
                   if found else "")


def report_markdown(report: dict) -> str:
    """report.md: per mode a table of every stage's accuracy per family (± its Wilson interval),
    then the effects (paired differences), the RL rewards and, with several seeds, every run's effects."""
    out = [f"Machine: {report.get('machine', '?')}; {report.get('wall_seconds', 0) / 60:.1f} min wall clock, "
           f"{stage_time_text(report)}, {report.get('eval_seconds', 0) / 60:.1f} min evaluating them.", "",
           f"Accuracy on the first {report.get('eval_limit', '?')} held-out samples of each synthetic family (greedy). "
           "± is the larger side of the Wilson 95% interval (report.json holds both ends); `chance`: always "
           "giving the most common answer."]
    for mode, title in MODES.items():
        if any(st.get("eval", {}).get(mode) for st in report["stages"].values()):
            out += ["", f"### {title}", ""] + accuracy_table(report, mode)
    if report.get("effects"):
        out += ["", "### Effects: paired differences on the same samples", "",
                "A − B over the same held-out samples, with a 95% paired bootstrap interval "
                f"({sample.BOOTSTRAP_RESAMPLES:,} resamples within each family); `shown` when the interval "
                "excludes 0.", ""] + effects_table(report["effects"])
    rl = {n: st["rl_eval"] for n, st in report["stages"].items() if st.get("rl_eval")}
    if rl:
        out += ["", "### RL stages: their own held-out prompts, before and after", "",
                "Greedy accuracy, sampled pass@1, maj@k and pass@k over the stage's own held-out prompts (k samples "
                "each, the same draws before and after), in thinking mode (rl-mixed asks a share of them in direct "
                "mode: `thinking_greedy_acc` and `direct_greedy_acc` split its greedy accuracy by mode; its "
                "`greedy_fmt` is each mode's format); the mean ± the larger side of its 95% interval (Wilson's where "
                "every prompt's value is 0 or 1, as greedy, maj@k, pass@k and format always are; else ± 1.96 "
                "standard errors, as for pass@1 and reward unless each prompt's k samples agree; "
                "a stage run before the intervals were kept: ± its standard error, marked se), and the paired "
                "difference after − before with its 95% bootstrap interval.", "",
                "| stage | metric | n × k | before | after | after − before [95%] |", "|---|---|---|---|---|---|"]
        for n, ev in rl.items():
            b, a, d = ev["before"], ev["after"], ev["paired"]
            for m in d:
                out.append(f"| {n} | {m} | {b[m].get('n', b['n'])} × {b['k']} | {rl_value(b[m])} | "
                           f"{rl_value(a[m])} | {d[m]['difference']:+.3f} "
                           f"[{d[m]['interval'][0]:+.3f}, {d[m]['interval'][1]:+.3f}] |")
    if len(report.get("seeds", [])) > 1:
        out += ["", "### Effects in every run (`--seeds`)", "", "A − B [95% interval]; * excludes 0.", ""]
        out += seeds_table(report["seeds"])
    return "\n".join(out) + "\n"


def rl_value(stat: dict) -> str:
    """An RL held-out metric for report.md: mean ± the larger side of its 95% interval (rl.summarize);
    of a report.json written before the intervals were kept, mean ± its standard error."""
    if "interval" in stat:
        return sample.plus_minus(stat["mean"], stat["interval"], digits=3)
    return f"{stat['mean']:.3f} ± {stat['se']:.3f} se"


# the picture: a stage x family heatmap of held-out accuracy, and the training loss of the recipe.
# Colours: one sequential ramp (YlGnBu) whose lightness falls steadily, so it reads in grayscale.
RAMP = ((0.0, (255, 255, 217)), (0.25, (199, 233, 180)), (0.5, (65, 182, 196)), (0.75, (34, 94, 168)),
        (1.0, (8, 29, 88)))


def ramp(x: float) -> tuple:
    """The heatmap colour of an accuracy x in [0, 1] (linear between the RAMP's stops)."""
    x = min(1.0, max(0.0, x))
    for (a, ca), (b, cb) in zip(RAMP, RAMP[1:]):
        if x <= b:
            t = (x - a) / (b - a)
            return tuple(round(u + (v - u) * t) for u, v in zip(ca, cb))
    return RAMP[-1][1]


def ink(fill: tuple) -> str:
    """Black on light cells, white on dark ones (by luminance)."""
    return "black" if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 140 else "white"


def draw_heatmap(d, report: dict, x0: int, y0: int, cw: int, ch: int, fonts) -> int:
    """Rows: stages; columns: families. A cell: the accuracy with real images (its colour and the
    big number), below it b = blank images and t = thinking mode; hatched when its Wilson interval
    reaches chance. Returns the y below the chance row."""
    big, small, label = fonts
    fams, chance = report_families(report), report.get("chance", {})
    for j, f in enumerate(fams):
        d.text((x0 + j * cw + cw / 2, y0 - 6), f, fill="black", font=label, anchor="md")
    rows = [(n, st["eval"]) for n, st in report["stages"].items() if st.get("eval", {}).get("real")]
    for i, (name, ev) in enumerate(rows):
        y = y0 + i * ch
        d.text((x0 - 8, y + ch / 2), name, fill="black", font=label, anchor="rm")
        for j, f in enumerate(fams):
            cell, box = ev["real"].get(f), (x0 + j * cw, y, x0 + (j + 1) * cw - 2, y + ch - 2)
            if cell is None:
                d.rectangle(box, fill=(245, 245, 245))
                continue
            fill = ramp(cell["accuracy"])
            d.rectangle(box, fill=fill)
            if cell["interval"][0] <= chance.get(f, 0.0):          # not above chance: hatched
                for k in range(-ch, cw, 12):
                    d.line((box[0] + max(k, 0), box[1] + max(-k, 0), box[0] + min(k + ch, cw - 2),
                            box[1] + min(ch - 2, cw - 2 - k)), fill=(170, 170, 170), width=1)
            d.text(((box[0] + box[2]) / 2, y + 3), f"{cell['accuracy']:.2f}", fill=ink(fill), font=big, anchor="ma")
            extra = [f"{k[0]} {ev[k][f]['accuracy']:.2f}" for k in ("blank", "think") if f in ev.get(k, {})]
            d.text(((box[0] + box[2]) / 2, y + ch - 4), "  ".join(extra), fill=ink(fill), font=small, anchor="md")
    y = y0 + len(rows) * ch + 4
    d.text((x0 - 8, y + ch / 3), "chance", fill="black", font=label, anchor="rm")
    for j, f in enumerate(fams):
        d.text((x0 + j * cw + cw / 2, y + ch / 3), f"{chance.get(f, 0):.2f}", fill="black", font=big, anchor="mm")
    return y + ch


def draw_losses(d, names: list, losses: dict, box: tuple, fonts):
    """Training loss per step, every stage in order on one axis (log scale), stage borders marked."""
    big, small, label = fonts
    x0, y0, x1, y1 = box
    series = [(n, losses[n]) for n in names if losses.get(n)]
    total = sum(len(v) for _, v in series)
    if not total:
        return
    ticks = [m * 10 ** e for e in range(-3, 4) for m in (1, 2, 5)]                 # 0.001 .. 5000
    lo = max([t for t in ticks if t <= max(1e-3, min(min(v) for _, v in series))], default=ticks[0])
    hi = min([t for t in ticks if t >= max(max(v) for _, v in series)], default=ticks[-1])
    hi = max(hi, ticks[ticks.index(lo) + 1])
    ypos = lambda v: y1 - (y1 - y0) * (math.log10(max(v, lo)) - math.log10(lo)) / math.log10(hi / lo)  # noqa: E731
    d.rectangle(box, outline="black")
    for v in (t for t in ticks if lo <= t <= hi):
        d.line((x0 - 4, ypos(v), x0, ypos(v)), fill="black")
        d.line((x0, ypos(v), x1, ypos(v)), fill=(225, 225, 225))
        d.text((x0 - 6, ypos(v)), f"{v:g}", fill="black", font=small, anchor="rm")
    start, ends = 0, [x0] * 3                      # the right end of the last name in each of 3 rows
    for k, (name, v) in enumerate(series):
        xa, xb = x0 + (x1 - x0) * start / total, x0 + (x1 - x0) * (start + len(v)) / total
        if k:
            d.line((xa, y0, xa, y1), fill=(160, 160, 160))
        half = small.getlength(name) / 2
        mid = min(max((xa + xb) / 2, x0 + half + 2), x1 - half - 2)          # the name stays inside the axes
        row = next((r for r in range(3) if ends[r] + 4 < mid - half), 0)
        ends[row] = mid + half
        d.text((mid, y0 + 4 + 13 * row), name, fill="black", font=small, anchor="ma")
        w = max(1, len(v) // 50)                                   # a running mean over ~2% of the stage
        smooth = [sum(v[max(0, i - w):i + 1]) / len(v[max(0, i - w):i + 1]) for i in range(len(v))]
        pts = [(xa + (xb - xa) * i / max(1, len(v) - 1), ypos(y)) for i, y in enumerate(smooth)]
        if len(pts) > 1:
            d.line(pts, fill=(20, 20, 20), width=2)
        start += len(v)
    d.text(((x0 + x1) / 2, y1 + 6), "training step (every stage of the recipe in order; borders: grey lines)",
           fill="black", font=label, anchor="ma")
    d.text((x0 - 44, (y0 + y1) / 2), "loss", fill="black", font=label, anchor="rm")


def report_picture(report: dict, losses: dict, path: str):
    """report.png (Pillow only): the stage x family heatmap of held-out accuracy, then the training
    loss of every stage on one axis."""
    from PIL import ImageDraw
    fonts = tuple(ImageFont.load_default(size=s) for s in (15, 11, 13))     # Pillow's embedded font
    fams = report_families(report)
    rows = sum(bool(st.get("eval", {}).get("real")) for st in report["stages"].values())
    cw, ch, x0, top = 86, 38, 110, 84
    width = max(900, x0 + cw * len(fams) + 20)
    heat_bottom = top + (rows + 1) * ch + 4
    img = Image.new("RGB", (width, heat_bottom + 86 + 260 + 30), "white")
    d = ImageDraw.Draw(img)
    n = max((c["n"] for st in report["stages"].values() for c in st.get("eval", {}).get("real", {}).values()), default=0)
    d.text((x0, 10), f"Held-out accuracy per stage and task family (greedy; {n} samples per family)", fill="black",
           font=fonts[0])
    d.text((x0, 32), "Big number and colour: real images. b: the same model with blank images. t: thinking mode. "
           "Hatched: not above chance", fill="black", font=fonts[1])
    d.text((x0, 46), "(the Wilson 95% interval reaches the chance row). Light = low, dark = high.",
           fill="black", font=fonts[1])
    y = draw_heatmap(d, report, x0, top, cw, ch, fonts)
    for k in range(101):                                          # the colour scale, 0 .. 1
        d.rectangle((x0 + 3 * k, y + 12, x0 + 3 * k + 3, y + 26), fill=ramp(k / 100))
    for v in (0, 0.5, 1):
        d.text((x0 + 300 * v, y + 30), f"{v:g}", fill="black", font=fonts[1], anchor="ma")
    d.text((x0 + 320, y + 19), "accuracy", fill="black", font=fonts[1], anchor="lm")
    draw_losses(d, list(report["stages"]), losses, (x0, y + 86, width - 20, y + 86 + 260), fonts)
    img.save(path)


# ==============================================================================================
# command line

def help_text() -> str:
    return "\n".join([
        "usage: python tests/recipe.py [--stage all] [OPTIONS]   (or: python train_stage.py --stage all [OPTIONS])",
        "", "Every stage of train_stage.RECIPE in order, each from the previous one, each evaluated on the held-out",
        "synthetic split; the report in <out_dir>/recipe/report.{json,md,png}. A finished stage is skipped, so an",
        "interrupted run continues where it stopped.", "", "the recipe's own options:"]
        + [train_stage.option_line(f"--{k}={v}", RECIPE_HELP[k]) for k, v in RECIPE_OPTIONS.items()]
        + ["", "Every other option (--out_dir, --data_dir, --step_scale, ...) goes to every stage: "
           "python train_stage.py --help lists them."])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    os.environ.pop(train_stage.RECIPE_CHILD, None)     # the recipe is no stage of another's: it says how to go on
    opts = train_stage.one_line_errors(lambda: dict(split_options(argv)), "tests/recipe.py")
    if "help" in opts:
        print(help_text())
    elif opts.get("stage", "all") != "all":
        train_stage.fail(f"the recipe runs every stage (--stage all); for one stage: python train_stage.py --stage "
                         f"{opts['stage']}", 2, "tests/recipe.py")
    else:
        train_stage.one_line_errors(lambda: run_recipe(argv), "tests/recipe.py", on_interrupt="run the same "
                                    "command again to go on: finished stages are skipped, a cut one resumes")


if __name__ == "__main__":
    main()
