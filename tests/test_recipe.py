"""The recipe as one command (python train_stage.py --stage all) and the faults a long run meets:
the golden test (a shortened chain must see new renderings: accuracy above chance, above the model
before alignment and above its own blank-image accuracy), an interrupted recipe continuing to the same report, a
manifest salted with every kind of bad sample, and non-finite losses."""
import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import model as modeling
import sample
import rl
import recipe
import train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=900, env_extra=None, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          **kw)


def report_of(out_dir):
    with open(os.path.join(out_dir, "recipe", "report.json")) as f:
        return json.load(f)


# The golden chain: lm0 (shortened) -> vit1 at the recipe's length. Since version 4 of the synthetic
# data every held-out OCR image is a new rendering (no pixels repeat a training image); the adapter reads
# more of them the longer it trains (300 steps: 0.04, as with white images; 600: 0.15, its interval's low
# end 0.10 against chance 0.09; 1,200: 0.29 [0.22, 0.37]), so the test and the recipe run 1,200.
GOLDEN = (("lm0", 200), ("vit1", 1200))
GOLDEN_N = 128                 # held-out OCR samples: the eval split's 128 (16 tokens each, cheap)


def test_golden_a_shortened_chain_learns_to_see(synth, tmp_path):
    """After vit1 the model reads words it has not seen drawn this way: its OCR accuracy on the 128
    held-out renderings is above chance and above lm0's, and the paired difference on the same samples
    against white images has its interval above 0; a change that makes the model blind fails here. Run
    through the stage table (run_stage), scored by the recipe's own evaluate_stage and compared with its
    own paired_difference. Measured (2 CPU cores, data v4): ocr 0.00 / 0.29 [0.22, 0.37] after lm0 /
    vit1, blank 0.00, chance 0.09; vit1 - blank +0.29 [+0.21, +0.37]; 117 s."""
    ev, preds = {}, {}
    for name, steps in GOLDEN:
        args = [f"--out_dir={tmp_path}", f"--data_dir={synth}", f"--steps={steps}", "--eval_every=0", "--save_every=0"]
        out = train_stage.run_stage(name, args)
        ev[name], preds[name] = recipe.evaluate_stage(out, train_stage.StageConfig(data_dir=synth), False, GOLDEN_N, ["ocr"])
    side = lambda name, mode: [p for p in preds[name] if recipe.mode_of(p) == mode]             # noqa: E731
    chance = sample.chance(synth, ["ocr"], limit=GOLDEN_N)["ocr"]
    vit1 = ev["vit1"]["real"]["ocr"]
    assert vit1["n"] == GOLDEN_N and vit1["interval"][0] > chance, (ev, chance)                   # sees
    blind = sample.paired_difference(side("vit1", "real"), side("vit1", "blank"))
    assert blind["interval"][0] > 0, (blind, ev)                                                  # not blind
    taught = sample.paired_difference(side("vit1", "real"), side("lm0", "real"))
    assert taught["interval"][0] > 0, (taught, ev)                                                # alignment taught it
    assert {p["blank"] for p in preds["vit1"]} == {True, False}         # every prediction kept, both modes
    assert sum(p["correct"] for p in side("vit1", "real")) == vit1["correct"]
    print(f"golden: ocr lm0 {ev['lm0']['real']['ocr']['accuracy']:.2f}, vit1 {vit1['accuracy']:.2f} {vit1['interval']}, "
          f"blank {ev['vit1']['blank']['ocr']['accuracy']:.2f}, chance {chance:.2f}; vit1 - blank {blind['difference']:+.2f} "
          f"{blind['interval']} (pytest -s shows this)")


def test_an_interrupted_recipe_continues_to_the_same_report(synth, tmp_path):
    args = ["train_stage.py", "--stage", "all", f"--data_dir={synth}", "--until=vit1", "--step_scale=0.05",
            "--eval_limit=4", "--eval_families=count,ocr", "--save_every=10"]
    ref = run([*args, f"--out_dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    rep = report_of(f"{tmp_path}/ref")                                 # the report's shape
    assert list(rep["stages"]) == ["lm0", "vit1"] and set(rep["chance"]) == {"count", "ocr"}
    for st in rep["stages"].values():
        assert {"seconds", "eval_seconds", "first_loss", "final_loss", "eval_loss", "eval"} <= set(st)
    assert rep["stages"]["lm0"]["eval"] == {}               # lm0 is scored on text alone, not asked for here
    st = rep["stages"]["vit1"]
    assert set(st["eval"]) == {"real", "blank"} and set(st["eval"]["real"]) == {"count", "ocr"}
    assert all(c["n"] == 4 and len(c["interval"]) == 2 for c in st["eval"]["real"].values())
    assert [e["name"] for e in rep["effects"]] == ["vit1 sees (OCR)"] and rep["effects"][0]["n"] == 4
    assert rep["total_seconds"] == pytest.approx(sum(st["seconds"] for st in rep["stages"].values()), abs=0.2)
    assert rep["wall_seconds"] >= rep["total_seconds"]                 # the stages train one after another
    assert sum(ln.startswith("recipe | ") for ln in ref.stdout.splitlines()) == 2          # one line per stage
    assert "next: " not in ref.stdout and "no usable checkpoint" not in ref.stdout          # the recipe runs them
    assert "| vit1 |" in open(f"{tmp_path}/ref/recipe/report.md").read()
    assert "effect | vit1 sees (OCR)" in ref.stdout                     # the summary prints the effects
    assert os.path.getsize(f"{tmp_path}/ref/recipe/report.png") > 10_000
    preds = [json.loads(x) for x in open(f"{tmp_path}/ref/recipe/predictions/vit1.jsonl")]
    assert len(preds) == 2 * 2 * 4 and {p["blank"] for p in preds} == {True, False}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.Popen([sys.executable, *args, f"--out_dir={tmp_path}/cut"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and \
            not modeling.find_resume_checkpoint(f"{tmp_path}/cut/vit1.run", log=lambda *a: None):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)                                    # the recipe and its stage, mid-vit1
    p.wait()
    assert modeling.is_finished_stage(f"{tmp_path}/cut/lm0") and not modeling.is_finished_stage(f"{tmp_path}/cut/vit1")
    again = run([*args, f"--out_dir={tmp_path}/cut"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "lm0           done before" in again.stdout and "resume: continuing from" in again.stdout, \
        again.stdout[-3000:]
    a, b = report_of(f"{tmp_path}/ref"), report_of(f"{tmp_path}/cut")
    for stage in ("lm0", "vit1"):
        for key in ("first_loss", "final_loss", "eval_loss", "eval"):
            assert a["stages"][stage][key] == b["stages"][stage][key], (stage, key)


@pytest.mark.parametrize("to", ["group", "recipe"])
def test_ctrl_c_in_the_recipe_is_its_one_line_and_its_time_counts(synth, tmp_path, to):
    """Ctrl-C (SIGINT to the terminal's process group: the recipe and its stage) mid-stage: exit 130
    with the recipe's one line (the stage, told by RECIPE_CHILD, adds none: its "--resume" advice was
    wrong for the recipe's user), and the run's time is kept in report.json for the next run's total.
    A SIGINT to the recipe alone (kill -INT, a scheduler) with the stage under torchrun (--nproc=2) is
    passed on to torchrun, which stops its workers before the recipe leaves (subprocess.run killed
    torchrun after 0.25 s and its workers trained on, orphaned; torchrun logs lines of its own). A
    RECIPE_CHILD in the recipe's own environment does not silence it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{train_stage.RECIPE_CHILD: "1"})
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.Popen([sys.executable, "train_stage.py", "--stage", "all", f"--data_dir={synth}", "--until=lm0",
                          f"--out_dir={tmp_path}", f"--nproc={1 if to == 'group' else 2}"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in p.stdout:                                               # the stage is training
        if line.startswith("step "):
            break
    os.killpg(p.pid, signal.SIGINT) if to == "group" else p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    left = [c for c in glob.glob("/proc/[0-9]*/cmdline") if str(tmp_path).encode() in open_or_empty(c)]
    for c in left:                                                      # (they hold the pipes: gone before reading)
        with contextlib.suppress(OSError):
            os.kill(int(c.split("/")[2]), signal.SIGKILL)
    assert left == [], left                                             # no stage runs on without the recipe
    err = p.stderr.read()
    said = "tests/recipe.py: error: interrupted; run the same command again to go on: finished stages are skipped, " \
           "a cut one resumes"
    assert p.returncode == 130 and (err.splitlines() if to == "group" else err.splitlines()[-1:]) == [said], err[-3000:]
    assert report_of(tmp_path)["wall_seconds"] > 0 and report_of(tmp_path)["stages"] == {}


def open_or_empty(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:                                                     # a process that ended meanwhile
        return b""


# ----------------------------------------------------------------------------------------------
# bad data of every kind, counted exactly; non-finite losses

def salted_manifest(tmp_path, synth):
    """Good count samples plus one bad sample of every kind the loader must survive."""
    lines = [json.loads(x) for x in open(os.path.join(synth, "count", "train.jsonl"))][:40]
    for r in lines:
        r["image"] = os.path.join(synth, "count", r["image"])
    (tmp_path / "trunc.png").write_bytes(open(lines[0]["image"], "rb").read()[:200])      # truncated PNG
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(3000))                             # not a video
    conv = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "x"}]      # noqa: E731
    bad = ["{not json", json.dumps({"image": "missing.png", "conversations": conv("<image>\nHow many?")}),
           json.dumps({"image": "trunc.png", "conversations": conv("<image>\nHow many?")}),
           json.dumps({"video": "garbage.mp4", "conversations": conv("<video>\nWhere?")}),
           json.dumps({"conversations": []}),
           json.dumps({"conversations": conv("word " * 3000)})]                          # over-long
    text = [json.dumps(r) for r in lines]
    for k, b in enumerate(bad):
        text.insert(5 + 6 * k, b)
    (tmp_path / "salted.jsonl").write_text("\n".join(text) + "\n")
    return str(tmp_path / "salted.jsonl"), {"json": 1, "missing_file": 1, "image": 1, "video": 1, "schema": 1,
                                            "too_long": 1}


def test_a_salted_manifest_trains_to_the_end_and_reports_exact_counts(synth, tmp_path):
    path, expected = salted_manifest(tmp_path, synth)
    res = run(["train_stage.py", "--stage", "vit3", f"--manifests={path}", f"--eval_manifests={path}",
               f"--out_dir={tmp_path}/out", f"--data_dir={synth}", "--init-from=random", "--steps=6",
               "--eval_every=0", "--save_every=0", "--max_bad_fraction=0.2", "--packing.max_tokens=1024"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = modeling.verify_checkpoint(f"{tmp_path}/out/vit3")
    assert meta["bad_data"]["counts"] == expected and meta["bad_data"]["seen"] == 46   # distinct samples
    assert meta["bad_data"]["overlong"] == {"truncated": 0, "skipped": 0, "own_pack": 0}    # all fit a pack
    reported = [ln for ln in res.stderr.splitlines() if "skipping bad sample" in ln]
    assert len(reported) == 6 and all("salted.jsonl:" in ln for ln in reported)       # once each, file and line


def test_non_finite_losses_skip_the_step_and_stop_the_run(synth, tmp_path, monkeypatch, capsys):
    real = train_stage.forward_pack
    calls = {"n": 0}

    def sometimes_nan(model, pack):
        calls["n"] += 1
        out = real(model, pack)
        if calls["n"] in (3,) or calls["n"] >= 6:                  # one bad step, later three in a row
            return out._replace(ce_sum=out.ce_sum * float("nan"))
        return out
    monkeypatch.setattr(train_stage, "forward_pack", sometimes_nan)
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        train_stage.run_stage("lm0", [f"--out_dir={tmp_path}", f"--data_dir={synth}", "--steps=20", "--eval_every=0",
                            "--save_every=0", "--packing.max_tokens=256", "--max_bad_steps=3"])
    out = capsys.readouterr().out
    assert out.count("update skipped") == 4                            # step 3, then steps 6, 7, 8
    recs = [json.loads(x) for x in open(tmp_path / "lm0.run" / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 4, 5] and all(math.isfinite(r["loss"]) for r in recs)
    # (an unwritable output folder, a full disk: test_train_stage.py)


def test_an_output_folder_that_is_a_file_is_one_clear_error(synth, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    res = run(["train_stage.py", "--stage", "lm0", f"--out_dir={tmp_path}/out", f"--data_dir={synth}", "--steps=1",
               "--eval_every=0"], timeout=120)
    assert res.returncode != 0 and "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_rl_stage_killed_at_a_random_point_resumes_to_the_same_weights(synth, tmp_path):
    m = modeling.build_model("tiny", seed=0)
    for d in ("ref", "cut"):
        modeling.save_checkpoint(str(tmp_path / d / "longcot"), m, {"stage": "longcot"}, 0, 1,
                          extra_files=train_stage.tokenizer_files(synth))
    args = ["rl.py", "--stage", "rl-verifiable", f"--data_dir={synth}", "--episodes=4", "--pool_size=8",
            "--group_size=4", "--prompts_per_episode=2", "--max_new_tokens=12", "--eval_prompts=4", "--filter_k=0",
            "--save_every=1", "--keep_checkpoints=10", "--temperature=1.5"]
    ref = run([*args, f"--out_dir={tmp_path}/ref"], timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "next: torchrun rl.py --stage harvest" in ref.stdout
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.Popen([sys.executable, *args, f"--out_dir={tmp_path}/cut"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(modeling.step_checkpoints(f"{tmp_path}/cut/rl-verifiable.run")) < 2:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not modeling.is_finished_stage(f"{tmp_path}/cut/rl-verifiable"), "killed too late"
    res = run([*args, f"--out_dir={tmp_path}/cut", "--resume"], timeout=300, env_extra={train_stage.RECIPE_CHILD: "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "next: " not in res.stdout                                   # (as the recipe runs it: it goes on itself)
    from safetensors.torch import load_file
    wa = load_file(f"{tmp_path}/ref/rl-verifiable/model.safetensors")
    wb = load_file(f"{tmp_path}/cut/rl-verifiable/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------
# effects: both sides on the same samples

def test_every_effect_compares_both_sides_on_the_same_samples(synth, tmp_path, monkeypatch):
    """Every stage's predictions made as the recipe makes them (evaluate_stage, thinking mode from
    LongCoT on; the RL harvest row is not evaluated), then the recipe's effects: each one of the
    table is computed, over its families x the limit, from two sides that hold the same samples.
    A side missing a sample, or an RL stage's own before / after on different prompts, stops it."""
    monkeypatch.setattr(sample, "default_new_tokens", lambda family, think: 2)    # the replies do not matter here
    modeling.build_model("tiny", seed=0).save_pretrained(str(tmp_path / "ck"))
    cfg, limit = train_stage.StageConfig(data_dir=str(synth), out_dir=str(tmp_path)), 2
    rdir, later = tmp_path / "recipe", [r.name for r in train_stage.RECIPE].index("longcot")
    (rdir / "predictions").mkdir(parents=True)
    files, made = {}, {}
    for i, row in enumerate(train_stage.RECIPE):
        if row.runner != "rl.py" or row.trainable:              # scored as evaluate_row scores it (its scope)
            scope = recipe.comparison_scope(row.name)
            key = (i >= later, repr(scope))
            if key not in made:
                made[key] = recipe.evaluate_stage(str(tmp_path / "ck"), cfg, i >= later, limit, None, scope)[1]
            files[row.name] = made[key]
            (rdir / "predictions" / f"{row.name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in made[key]))
    assert len(files["vit3-direct"]) < len(files["vit3"]) and {p["family"] for p in files["lm0"]} == {"text"}
    got = {e["name"]: e for e in recipe.recipe_effect_results(str(rdir), cfg)}
    assert set(got) == {name for name, *_ in recipe.recipe_effects()}
    for name, (sa, ma), (sb, mb), fams in recipe.recipe_effects():
        keys = lambda stage, mode: {(p["family"], p["where"]) for p in files[stage]                 # noqa: E731
                                    if recipe.mode_of(p) == mode and p["family"] in fams}
        assert keys(sa, ma) == keys(sb, mb) and len(keys(sa, ma)) == got[name]["n"] == limit * len(fams), name
    # an RL stage's own held-out before / after: one more effect; on different prompts, refused
    held = [{"side": side, "family": "math", "where": f"p{i}", "correct": side == "after" or i < 2}
            for side in ("before", "after") for i in range(6)]                # right: 2 of 6 before, 6 after
    (tmp_path / "rl-verifiable").mkdir()
    (tmp_path / "rl-verifiable" / train_stage.RL_HELDOUT).write_text("".join(json.dumps(p) + "\n" for p in held))
    extra = recipe.recipe_effect_results(str(rdir), cfg)[-1]
    assert extra["name"] == "rl-verifiable: its own held-out, after vs before" and extra["n"] == 6
    assert (extra["a"], extra["accuracy_a"], extra["accuracy_b"], extra["difference"]) == \
        ("rl-verifiable (after)", 1.0, 0.3333, 0.6667)
    (tmp_path / "rl-verifiable" / train_stage.RL_HELDOUT).write_text("".join(json.dumps(p) + "\n" for p in held[:-1]))
    with pytest.raises(train_stage.UsageError, match="not scored on the same samples"):
        recipe.recipe_effect_results(str(rdir), cfg)
    (tmp_path / "rl-verifiable" / train_stage.RL_HELDOUT).unlink()
    # an output made outside the recipe in place of rl-mixed (--compare): only the effects it is part
    # of, its side read from its own predictions and its own held-out
    flipped = [dict(p, correct=not p["correct"]) for p in files["rl-mixed"]]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / train_stage.RL_HELDOUT).write_text("".join(json.dumps(p) + "\n" for p in held))
    alt = {e["name"]: e for e in recipe.recipe_effect_results(str(rdir), cfg, ("rl-mixed", str(tmp_path / "other"), flipped))}
    modes = list(dict.fromkeys(recipe.mode_of(p) for p in flipped))
    against_own = [f"rl-mixed: --compare vs this run's, {recipe.MODE_WORDS[m]}" for m in modes]
    assert len(modes) >= 2 and list(alt) == against_own + ["RL mixed: after vs before", "RL mixed: after vs before, thinking",
                                                           "rl-mixed: its own held-out, after vs before"]
    for m, name in zip(modes, against_own):               # every answer flipped: a = 1 - b, over each mode's samples
        assert alt[name]["n"] == sum(recipe.mode_of(p) == m for p in flipped)
        assert alt[name]["accuracy_a"] == pytest.approx(1 - alt[name]["accuracy_b"], abs=1e-4)
    one_family = [p for p in flipped if p["family"] == "ocr"]              # --compare with --eval_families=ocr
    alt1 = {e["name"]: e for e in recipe.recipe_effect_results(str(rdir), cfg, ("rl-mixed", str(tmp_path / "other"), one_family))}
    ocr_modes = list(dict.fromkeys(recipe.mode_of(p) for p in one_family))
    assert list(alt1) == [f"rl-mixed: --compare vs this run's, {recipe.MODE_WORDS[m]}" for m in ocr_modes] + \
        ["RL mixed: after vs before", "rl-mixed: its own held-out, after vs before"]
    assert alt1["RL mixed: after vs before"]["families"] == ["ocr"] and alt1["RL mixed: after vs before"]["n"] == limit
    for name in ("RL mixed: after vs before", "RL mixed: after vs before, thinking"):
        assert alt[name]["accuracy_a"] == pytest.approx(1 - got[name]["accuracy_a"], abs=1e-4)
        assert alt[name]["accuracy_b"] == got[name]["accuracy_b"]              # the recipe's thinkfusion side
    assert alt["rl-mixed: its own held-out, after vs before"]["difference"] == 0.6667
    dropped = next(i for i, p in enumerate(files["soup"]) if p["family"] == "ocr" and recipe.mode_of(p) == "real")
    (rdir / "predictions" / "soup.jsonl").write_text("".join(json.dumps(p) + "\n" for i, p in enumerate(files["soup"])
                                                             if i != dropped))
    with pytest.raises(train_stage.UsageError, match="soup vs its first input.*not scored on the same samples"):
        recipe.recipe_effect_results(str(rdir), cfg)


def test_the_evaluation_builds_each_prompt_once_for_every_stage(synth, tmp_path, monkeypatch):
    """Every stage's checkpoint carries its own copy of the tokenizer (named after its folder): the
    recipe still builds each held-out prompt (its decoded pixels) once per run, not once per stage
    (that cost ~10 s of every stage's evaluation on 2 cores)."""
    monkeypatch.setattr(sample, "default_new_tokens", lambda family, think: 2)
    monkeypatch.setattr(recipe, "PROMPTS", {})
    built = []
    real_item = sample.record_item
    monkeypatch.setattr(sample, "record_item", lambda *a, **k: built.append(1) or real_item(*a, **k))
    cfg = train_stage.StageConfig(data_dir=str(synth), out_dir=str(tmp_path))
    got = []
    for name in ("sft1", "sft2"):
        modeling.build_model("tiny", seed=0).save_pretrained(str(tmp_path / name))
        shutil.copy(os.path.join(synth, "tokenizer.json"), tmp_path / name)
        got.append(recipe.evaluate_stage(str(tmp_path / name), cfg, False, 3, ["ocr", "count"]))
    assert sample.load(str(tmp_path / "sft1"))[1].name != sample.load(str(tmp_path / "sft2"))[1].name
    assert len(built) == 3 * 2 * 2 and len(recipe.PROMPTS) == 1                     # 3 samples x 2 families x 2 modes
    assert got[0] == got[1]                                                           # the same weights, the same answers


def test_seeds_offset_every_stages_own_seed():
    """--seeds=N: run k passes each stage the seed it would run with + 1000 (k - 1); run 1 passes none.
    A --seed given to the recipe moves every stage's seed with it, the twin's too (else the soup would
    average two copies of sft4)."""
    rows = {n: train_stage.STAGES[n] for n in ("vit1", "sft4", "sft4-twin", "soup", "rl-verifiable")}
    seed = lambda cmd: [a for a in cmd if a.startswith("--seed=")]                         # noqa: E731
    assert all(seed(recipe.stage_command(r, 1, ["--out_dir=o"])) == [] for r in rows.values())
    got = {n: seed(recipe.stage_command(r, 1, ["--out_dir=o"], seed_offset=1000)) for n, r in rows.items()}
    assert got == {"vit1": ["--seed=2337"], "sft4": ["--seed=2337"], "sft4-twin": ["--seed=8331"],
                   "soup": ["--seed=2337"], "rl-verifiable": ["--seed=2337"]}             # the twin stays a twin
    assert seed(recipe.stage_command(rows["vit1"], 1, ["--seed=5"], seed_offset=2000))[-1] == "--seed=2005"   # the last wins
    given = {n: seed(recipe.stage_command(r, 1, ["--seed=5"]))[-1] for n, r in rows.items()}   # --seed given: the
    assert given == {"vit1": "--seed=5", "sft4": "--seed=5", "sft4-twin": "--seed=5999",   # twin keeps its distance
                     "soup": "--seed=5", "rl-verifiable": "--seed=5"}
    assert recipe.stage_command(rows["rl-verifiable"], 1, [], seed_offset=1000)[1].endswith("rl.py")


def test_every_stage_of_the_recipe_takes_the_options_it_reads():
    """An option given to the recipe goes to every stage that reads it: --step_scale shortens the RL
    stages' episodes too, the soup gets no training option, an RL stage none it refuses."""
    given = ["--step_scale=0.5", "--lr=1e-3", "--packing.max_tokens=512", "--eval_packs=2", "--out_dir=o"]
    for name in ("vit1", "soup", "rl-verifiable", "harvest"):
        row = train_stage.STAGES[name]
        args = recipe.stage_command(row, 1, given)[2:]
        if name == "harvest":
            assert rl.rl_config(args)[0].stage == "harvest"
        elif row.runner == "rl.py":
            cfg, _ = rl.rl_config(args)
            assert cfg.episodes == round(dict(row.tiny)["episodes"] * 0.5) and cfg.lr == 1e-3
        else:
            cfg, _, _ = train_stage.parse_args([a for a in args if a != "--resume"])
            assert cfg.eval_packs == 2 and (name == "soup" or cfg.steps == round(dict(row.tiny)["steps"] * 0.5))


# ----------------------------------------------------------------------------------------------
# mutation-review additions: the effects of a partial run and of a stand-in, a stage's report entry,
# train_row's skip and failure, evaluate_row's modes, --seeds / --compare, the chance row,
# tests/rl_compare.py per metric

def preds_of(fams, mode, right):
    """Hand-made predictions of one stage in one mode: 4 samples per family, the first `right` correct."""
    return [{"family": f, "where": f"{f}/eval.jsonl:{i + 1}", "answer": "x", "prediction": "x", "correct": i < right,
             "blank": mode == "blank", "think": mode == "think"} for f in fams for i in range(4)]


def write_preds(rdir, stage, preds):
    (rdir / "predictions").mkdir(parents=True, exist_ok=True)
    (rdir / "predictions" / f"{stage}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))


def test_effects_of_a_partial_run_are_the_ones_with_both_sides(tmp_path):
    """A run that has measured vit1, sft4 and soup (ocr and count, evaluated in that order): only the
    effects whose two sides exist, no error for the others (an interrupted or --until run), each
    effect's families in evaluation order. By hand: vit1 real 4 of 4 ocr right, blank 0 -> +1.0;
    sft4 real 3 of 4 per family, blank 1 -> +0.5; sft4 real vs vit1 real (ocr 4 + count 4 vs 3 + 3)
    -> (6 - 8) / 8 = -0.25. With sft4's output made elsewhere standing in (all right), the effects sft4
    is part of, as A (SFT, sft4 sees) and as B (soup vs its first input), after it against the run's own
    sft4, mode by mode: real 4 vs 3 of 4 per family -> +0.25, blank 4 vs 1 -> +0.75."""
    rdir, cfg = tmp_path / "recipe", train_stage.StageConfig(out_dir=str(tmp_path))
    fams = ["ocr", "count"]
    write_preds(rdir, "vit1", preds_of(fams, "real", 4) + preds_of(fams, "blank", 0))
    write_preds(rdir, "sft4", preds_of(fams, "real", 3) + preds_of(fams, "blank", 1))
    write_preds(rdir, "soup", preds_of(fams, "real", 2))
    got = {e["name"]: e for e in recipe.recipe_effect_results(str(rdir), cfg)}
    assert list(got) == ["SFT", "soup vs its first input", "vit1 sees (OCR)", "sft4 sees", "sft4 sees (count)",
                         "sft4 sees (ocr)"]
    assert got["vit1 sees (OCR)"]["difference"] == 1.0 and got["vit1 sees (OCR)"]["n"] == 4
    assert got["sft4 sees"]["difference"] == 0.5 and got["sft4 sees"]["families"] == ["ocr", "count"]
    assert got["SFT"]["difference"] == -0.25 and got["SFT"]["families"] == ["ocr", "count"]
    other = preds_of(fams, "real", 4) + preds_of(fams, "blank", 4)
    alt = {e["name"]: e for e in recipe.recipe_effect_results(str(rdir), cfg, ("sft4", str(tmp_path / "o"), other))}
    own = ["sft4: --compare vs this run's, real images", "sft4: --compare vs this run's, blank images"]
    assert list(alt) == own + ["SFT", "soup vs its first input", "sft4 sees", "sft4 sees (count)", "sft4 sees (ocr)"]
    assert alt["SFT"]["difference"] == 0.0 and alt["soup vs its first input"]["difference"] == -0.5
    assert (alt[own[0]]["difference"], alt[own[1]]["difference"]) == (0.25, 0.75)      # 4 vs 3 and 4 vs 1 of 4


def test_stage_entry_takes_the_first_held_out_loss_and_the_soups_own(tmp_path, monkeypatch, capsys):
    """A report entry: eval_loss_start is the first held-out loss in metrics.jsonl (before training),
    eval_loss the checkpoint's; for the soup, whose meta holds a loss per input and its own, its own.
    Its predictions are written to predictions/<stage>.jsonl."""
    cfg, rdir = train_stage.StageConfig(out_dir=str(tmp_path)), tmp_path / "recipe"
    (rdir / "predictions").mkdir(parents=True)
    metas = {"vit1": {"first_loss": 5.0, "final_loss": 2.0, "eval_loss": 1.75},
             "soup": {"eval_loss": {"sft4": 1.25, "sft4-twin": 1.5, "soup": 1.0}}}
    monkeypatch.setattr(modeling, "verify_checkpoint", lambda path, **k: metas[os.path.basename(path)])
    (tmp_path / "vit1").mkdir()
    recs = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 1.75}]
    (tmp_path / "vit1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    preds = preds_of(["ocr"], "real", 2)
    entry = recipe.stage_entry(train_stage.STAGES["vit1"], cfg, 12.34, {"real": {}}, preds, str(rdir))
    assert (entry["seconds"], entry["first_loss"], entry["final_loss"], entry["eval_loss_start"], entry["eval_loss"]) == \
        (12.3, 5.0, 2.0, 3.0, 1.75)
    assert recipe.read_jsonl(str(rdir / "predictions" / "vit1.jsonl")) == preds
    soup = recipe.stage_entry(train_stage.STAGES["soup"], cfg, 1.0, {}, [], str(rdir))
    assert soup["eval_loss"] == 1.0 and soup["eval_loss_start"] is None
    assert "recipe | vit1" in capsys.readouterr().out


def test_a_recipe_killed_mid_stage_keeps_its_wall_clock_up_to_the_last_minute(synth, tmp_path, monkeypatch):
    """report.json's wall clock was written after each stage and when the recipe left: a recipe killed
    (kill -9) in a stage lost that stage's time. run_stage_process calls back every minute while a
    stage runs (here a child that sleeps, every 0.2 s), and the recipe writes its wall clock then."""
    beats = []
    assert recipe.run_stage_process([sys.executable, "-c", "import time; time.sleep(1.5)"],
                                    lambda: beats.append(1), every=0.2) == 0 and len(beats) >= 4
    later, clock, seen = [0.0], time.time, []
    monkeypatch.setattr(time, "time", lambda: clock() + later[0])

    def stage_killed_after_an_hour(row, cfg, own, passthrough, seed_offset, while_running):
        later[0] = 3600.0
        while_running()
        seen.append(report_of(tmp_path)["wall_seconds"])          # on disk now: what a kill -9 leaves
        raise SystemExit(137)
    monkeypatch.setattr(recipe, "train_row", stage_killed_after_an_hour)
    cfg = train_stage.StageConfig(out_dir=str(tmp_path), data_dir=str(synth))
    with pytest.raises(SystemExit):
        recipe.run_recipe_once(cfg, {**recipe.RECIPE_OPTIONS, "until": "lm0", "eval_limit": "4"}, [], 0)
    assert len(seen) == 1 and 3600 <= seen[0] < 3660


def test_stages_found_trained_are_timed_apart_from_the_recipes_wall_clock(synth, tmp_path, monkeypatch, capsys):
    """The quick start, then the recipe: it takes lm0 and vit1 as trained (their outputs verify),
    whose time was not the recipe's. The report said "0.0 min of wall clock, 2.0 min of it training";
    it now counts them apart, by name."""
    finished = {str(tmp_path / "lm0"), str(tmp_path / "vit1")}               # the quick start's outputs
    monkeypatch.setattr(modeling, "is_finished_stage", lambda path: str(path) in finished)
    monkeypatch.setattr(recipe, "train_row", lambda row, *a: {"lm0": 40.0, "vit1": 80.0, "vit2": 30.0}[row.name])
    monkeypatch.setattr(recipe, "evaluate_row", lambda *a: ({}, []))
    monkeypatch.setattr(recipe, "stage_entry", lambda row, cfg, seconds, *a: {"seconds": seconds})
    monkeypatch.setattr(recipe, "recipe_effect_results", lambda *a: [])
    written = []
    monkeypatch.setattr(recipe, "write_report", lambda rdir, report, cfg: written.append(recipe.report_markdown(report)))
    cfg = train_stage.StageConfig(out_dir=str(tmp_path), data_dir=str(synth))
    recipe.run_recipe_once(cfg, {**recipe.RECIPE_OPTIONS, "until": "vit2", "eval_limit": "4"}, [], 0)
    said = "0.5 min of it in the stages (and 2.0 min in stages it found trained: lm0, vit1)"
    assert said in written[-1].splitlines()[0] and f"min), {said}: " in capsys.readouterr().out


def test_train_row_skips_a_verified_stage_and_stops_on_a_failed_one(tmp_path, monkeypatch):
    """A stage whose output verifies is not run again; otherwise its stage_command runs, and a
    non-zero exit stops the recipe with a usage error naming the stage and the exit code."""
    cfg, row = train_stage.StageConfig(out_dir=str(tmp_path)), train_stage.STAGES["vit1"]
    finished, calls, rc = {str(tmp_path / "vit1"): True}, [], [0]
    monkeypatch.setattr(modeling, "is_finished_stage", lambda path: finished.get(path, False))
    monkeypatch.setattr(recipe, "refuse_if_trained_otherwise", lambda *a: None)
    monkeypatch.setattr(modeling, "verify_checkpoint", lambda path: {"seconds": 12.5})
    monkeypatch.setattr(recipe, "run_stage_process", lambda cmd, while_running: calls.append(cmd) or rc[0])
    own = {"nproc": "1"}
    assert recipe.train_row(row, cfg, own, ["--out_dir=o"], 0) == 12.5     # finished before: its own recorded time
    assert calls == []
    finished.clear()
    recipe.train_row(row, cfg, own, ["--out_dir=o"], 1000)
    assert calls == [recipe.stage_command(row, 1, ["--out_dir=o"], 1000)]
    rc[0] = 3
    with pytest.raises(train_stage.UsageError, match="stopped at vit1 \\(exit 3\\)"):
        recipe.train_row(row, cfg, own, ["--out_dir=o"], 0)


def test_the_recipe_keeps_a_finished_stage_only_if_this_run_would_train_it_so(synth, tmp_path):
    """A finished output is kept (not trained again) only when its meta.json's options are those this
    run's command gives the stage: a stage run by hand, or by the recipe at another --step_scale, is
    refused in one line, where the report presented it as this run's. Where its files go and how often
    it saved (recipe.RUN_ONLY, a path spelt with a slash) are no other training."""
    row, passthrough = train_stage.STAGES["vit2"], [f"--out_dir={tmp_path}", f"--data_dir={synth}", "--step_scale=0.02"]
    cfg = train_stage.parse_args(["--stage", "vit2", *passthrough])[0]
    modeling.save_checkpoint(str(tmp_path / "vit2"), modeling.build_model("tiny", seed=0),
                             {"stage": "vit2", "config": dataclasses.asdict(cfg)}, 0, 1)
    recipe.refuse_if_trained_otherwise(row, cfg, passthrough, 0)                  # as this run would: kept
    recipe.refuse_if_trained_otherwise(row, cfg, [f"--out_dir={tmp_path}/", *passthrough[1:], "--save_every=3",
                                                  "--keep_checkpoints=5"], 0)
    for other, says in ((["--step_scale=0.5"], "step_scale 0.02 -> 0.5"), ([], "seed 1337 -> 2337")):
        args = [a for a in passthrough if not a.startswith(tuple(o.split("=")[0] for o in other))] + other
        with pytest.raises(train_stage.UsageError, match=f"vit2 was trained with other settings .*{says}.* remove "
                                                         f"{tmp_path}/vit2 and {tmp_path}/vit2.run to train it again"):
            recipe.refuse_if_trained_otherwise(row, cfg, args, 1000 if not other else 0)
    for meta, says in (({"stage": "vit2", "config": {**dataclasses.asdict(cfg), "out_dir": "/elsewhere"}},
                        "trained with other settings than this run gives vit2 \\(out_dir '/elsewhere' -> "),
                       ({"stage": "vit2"}, "records no options to check against this run's")):   # copied in; older
        modeling.save_checkpoint(str(tmp_path / "vit2"), modeling.build_model("tiny", seed=0), meta, 0, 1)
        with pytest.raises(train_stage.UsageError, match=says):
            recipe.refuse_if_trained_otherwise(row, cfg, passthrough, 0)


def test_the_recipe_keeps_the_rl_stage_it_trained(synth, tmp_path):
    """rl.py saves its options with the algorithm and clips filled in (dapo, 0.2, 0.28 for a dense
    model): the recipe's check fills them in alike, so a rerun keeps the RL stage it trained (it
    refused every finished RL stage), and still refuses one trained otherwise. Run through rl.py on
    the recipe's own command for the row."""
    modeling.save_checkpoint(str(tmp_path / "longcot"), modeling.build_model("tiny", seed=0), {"stage": "longcot"}, 0, 1,
                             extra_files=train_stage.tokenizer_files(str(synth)))
    row, cfg = train_stage.STAGES["rl-verifiable"], train_stage.StageConfig(out_dir=str(tmp_path))
    passthrough = [f"--out_dir={tmp_path}", f"--data_dir={synth}", "--step_scale=0.02", "--eval_prompts=2",
                   "--eval_samples=2", "--max_new_tokens=8", "--prompts_per_episode=2", "--group_size=2", "--pool_size=8"]
    rl.run_cli(recipe.stage_command(row, 1, passthrough)[2:])
    assert modeling.verify_checkpoint(str(tmp_path / "rl-verifiable"))["config"]["algo"] == "dapo"
    recipe.refuse_if_trained_otherwise(row, cfg, passthrough, 0)
    with pytest.raises(train_stage.UsageError, match="rl-verifiable was trained with other settings .*lr 0.0001 -> 0.0002"):
        recipe.refuse_if_trained_otherwise(row, cfg, [*passthrough, "--lr=2e-4"], 0)


def test_the_recipe_refuses_to_resume_a_run_trained_otherwise(synth, tmp_path, monkeypatch):
    """A cut stage's step checkpoint is resumed only if this run's command would have trained it so: a
    stage run by hand, its output then removed, left its run folder, which the recipe's --resume
    continued (the other run's state under this run's name) or stopped on (past this run's steps)."""
    row = train_stage.STAGES["lm0"]
    train_stage.run_stage("lm0", [f"--out_dir={tmp_path}", f"--data_dir={synth}", "--steps=4", "--save_every=2",
                                  "--eval_every=0"])
    shutil.rmtree(tmp_path / "lm0")
    calls = []
    monkeypatch.setattr(recipe, "run_stage_process", lambda cmd, while_running: calls.append(cmd))
    with pytest.raises(train_stage.UsageError, match=f"{tmp_path}/lm0.run/step-000002 was trained with other settings "
                                                     "than this run gives lm0 \\(steps 4 -> 10, "):
        recipe.train_row(row, train_stage.StageConfig(out_dir=str(tmp_path)), {"nproc": "1"},
                         [f"--out_dir={tmp_path}", f"--data_dir={synth}", "--step_scale=0.02"], 0)
    assert calls == []


def test_evaluate_row_modes_per_stage(tmp_path, monkeypatch):
    """Real and blank images for every stage (blank: every family but text), thinking mode from
    LongCoT on (LongCoT itself included) on THINK_FAMILIES; harvest (RL that trains nothing) is not
    evaluated; a comparison row only on what the effects read of it."""
    tok = data.load_tokenizer(None)
    dcfg = data.DataConfig.from_model(modeling.build_model("tiny", seed=0).cfg)
    monkeypatch.setattr(sample, "load", lambda folder, device="cpu": (None, tok, dcfg))
    monkeypatch.setattr(recipe, "PROMPTS", {})
    monkeypatch.setattr(recipe, "TOKENIZERS", [])
    seen = []

    def fake_eval(model, tok, dcfg, data_dir, fams, limit, mode, prompts):
        seen.append((tuple(fams), mode.think, mode.blank, limit))
        return {"n": {f: limit for f in fams}, "predictions": []}
    monkeypatch.setattr(sample, "evaluate_families", fake_eval)
    cfg = train_stage.StageConfig(out_dir=str(tmp_path), data_dir=str(tmp_path))
    own = {"eval_families": "text,count,math,ocr", "eval_limit": "3"}
    got = {}
    for name in ("sft4", "longcot", "thinkfusion", "harvest", "sft4-twin"):
        seen.clear()
        evals, _ = recipe.evaluate_row(train_stage.STAGES[name], cfg, own)
        got[name] = list(seen)
        assert all(c["n"] == 3 for cells in evals.values() for c in cells.values())
    real, blank = (("text", "count", "math", "ocr"), False, False, 3), (("count", "math", "ocr"), False, True, 3)
    assert got["sft4"] == [real, blank]
    assert got["longcot"] == got["thinkfusion"] == [real, blank, (("count", "math"), True, False, 3)]
    assert got["harvest"] == []
    assert got["sft4-twin"] == [(("count", "ocr"), False, False, 3)]          # soup vs its second input: mix("sft4")


def test_seeds_run_the_recipe_again_with_offsets_and_compare_needs_as(tmp_path, monkeypatch):
    """--seeds=2: run 1 into --out_dir with seed offset 0, run 2 into <out_dir>/seed2 with +1000;
    the first run's report then lists both runs' effects. --compare and --as only together."""
    runs = []

    def fake_once(cfg, own, passthrough, seed_offset):
        runs.append((cfg.out_dir, seed_offset, [a for a in passthrough if a.startswith("--out_dir=")]))
        os.makedirs(os.path.join(cfg.out_dir, "recipe"), exist_ok=True)
        report = {"stages": {}, "effects": [{"name": f"e{seed_offset}"}]}
        with open(os.path.join(cfg.out_dir, "recipe", "report.json"), "w") as f:
            json.dump(report, f)
        return report
    written = []
    monkeypatch.setattr(recipe, "run_recipe_once", fake_once)
    monkeypatch.setattr(recipe, "write_report", lambda rdir, report, cfg: written.append((rdir, report)))
    out = str(tmp_path / "o")
    recipe.run_recipe([f"--out_dir={out}", f"--data_dir={tmp_path}", "--seeds=2"])
    assert runs == [(out, 0, [f"--out_dir={out}"]), (os.path.join(out, "seed2"), 1000, [f"--out_dir={out}/seed2"])]
    assert written[-1][0] == os.path.join(out, "recipe")
    assert [(r["run"], r["seed_offset"], r["effects"][0]["name"]) for r in written[-1][1]["seeds"]] == \
        [(1, 0, "e0"), (2, 1000, "e1000")]
    for given in ("--as=vit1", f"--compare={tmp_path}"):
        with pytest.raises(train_stage.UsageError, match="go together"):
            recipe.run_recipe([f"--out_dir={out}", given])
    assert len(runs) == 2


def test_compare_against_pairs_two_outputs_beside_a_run(tmp_path, monkeypatch):
    """--compare=A --as=sft4 --against=B (the command line's path): A and B each evaluated as the recipe
    evaluates sft4 and written beside their checkpoints, then A vs B mode by mode, not A vs the run's
    own sft4; the run's other effects with A in sft4's place. By hand: A real 4 of 4 per family, B 2
    of 4 -> +0.5; blank 1 vs 3 -> -0.5; SFT (A real vs the run's vit1 real 3 of 4) -> +0.25. Without
    a run (no predictions in --out_dir) A vs B and A's own effects (real vs blank); --against alone is
    refused."""
    fams = ["ocr", "count"]
    scored = {"A": preds_of(fams, "real", 4) + preds_of(fams, "blank", 1),
              "B": preds_of(fams, "real", 2) + preds_of(fams, "blank", 3)}
    monkeypatch.setattr(modeling, "is_finished_stage", lambda path: os.path.basename(path) in scored)
    monkeypatch.setattr(recipe, "evaluate_row", lambda row, cfg, own, folder: ({}, scored[os.path.basename(folder)]))
    run, a, b = tmp_path / "run", tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    write_preds(run / "recipe", "vit1", preds_of(fams, "real", 3))
    write_preds(run / "recipe", "sft4", preds_of(fams, "real", 0) + preds_of(fams, "blank", 0))
    args = [f"--data_dir={tmp_path}", f"--compare={a}", "--as=sft4", f"--against={b}"]
    got = {e["name"]: e for e in recipe.run_recipe([f"--out_dir={run}", *args])}
    pair = [f"sft4: --compare vs --against, {recipe.MODE_WORDS[m]}" for m in ("real", "blank")]
    assert list(got)[:2] == pair and "SFT" in got
    assert (got[pair[0]]["difference"], got[pair[1]]["difference"], got["SFT"]["difference"]) == (0.5, -0.5, 0.25)
    assert got[pair[0]]["b"] == f"sft4 ({b})" and got[pair[0]]["n"] == 8
    for name in "AB":
        assert recipe.read_jsonl(str(tmp_path / name / "recipe_predictions.jsonl")) == scored[name]
    alone = recipe.run_recipe([f"--out_dir={tmp_path / 'none'}", *args])
    assert [e["name"] for e in alone] == pair + ["sft4 sees", "sft4 sees (count)", "sft4 sees (ocr)"]
    with pytest.raises(train_stage.UsageError, match="--against=DIR is compared with --compare"):
        recipe.run_recipe([f"--out_dir={run}", f"--against={b}"])


def test_accuracy_table_chance_row_lines_up_with_the_families():
    """report.md's chance row has one cell per column: under each family its chance, under the
    real-images table's stage / s / loss columns nothing."""
    report = {"stages": {"vit1": {"seconds": 5, "eval": {"real": {"ocr": sample.accuracy_cell(3, 4)},
                                                         "blank": {"ocr": sample.accuracy_cell(1, 4)}}}},
              "chance": {"ocr": 0.125}}
    for mode, lead in (("real", 3), ("blank", 1)):
        head, _, row, chance = recipe.accuracy_table(report, mode)
        cells = [c.strip() for c in chance.strip("|").split("|")]
        assert len(cells) == len(head.strip("|").split("|")) == len(row.strip("|").split("|")) == lead + 1
        assert cells == ["chance"] + [""] * (lead - 1) + ["0.12"]


def test_rl_compare_compares_each_metric_on_its_own(tmp_path):
    """tests/rl_compare.py: per metric, A - B of that metric's after-side values (hand-made, a
    different difference for each metric); before rows are left out."""
    import rl_compare
    values = {"a": {"greedy_acc": [1, 1, 1, 1], "pass@1": [0.5] * 4, "maj@k": [1, 0, 0, 0], "pass@k": [1] * 4,
                    "reward": [0.75] * 4},
              "b": {"greedy_acc": [0, 0, 0, 0], "pass@1": [0.25] * 4, "maj@k": [0] * 4, "pass@k": [1] * 4,
                    "reward": [0.5] * 4}}
    for name, v in values.items():
        (tmp_path / name).mkdir()
        rows = [{"side": side, "family": "math", "where": f"p{i}",
                 **{m: (v[m][i] if side == "after" else 0.0) for m in rl_compare.METRICS}}
                for side in ("before", "after") for i in range(4)]
        (tmp_path / name / "heldout_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = rl_compare.compare(rl_compare.after_side(str(tmp_path / "a")), rl_compare.after_side(str(tmp_path / "b")))
    assert {m: r["difference"] for m, r in got.items()} == {"greedy_acc": 1.0, "pass@1": 0.25, "maj@k": 0.25,
                                                            "pass@k": 0.0, "reward": 0.25}
    assert all(r["n"] == 4 for r in got.values())
    for name, fmt in (("a", [1, 1, 0, 0]), ("b", [0, 0, 0, 0])):             # rl.py's greedy shape, on both sides
        rows = [dict(json.loads(x), greedy_fmt=fmt[i % 4] if json.loads(x)["side"] == "after" else 0.0, greedy_think=0.5)
                for i, x in enumerate((tmp_path / name / "heldout_predictions.jsonl").read_text().splitlines())]
        (tmp_path / name / "heldout_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = rl_compare.compare(rl_compare.after_side(str(tmp_path / "a")), rl_compare.after_side(str(tmp_path / "b")))
    assert got["greedy_fmt"]["difference"] == 0.5 and got["greedy_think"]["difference"] == 0.0


def test_evaluate_stage_cells_count_the_samples_scored(tmp_path, monkeypatch):
    """A family with fewer held-out samples than --eval_limit (or bad ones): its cell's n is what
    was scored, not the limit. ocr: 2 scored of a limit of 5, 1 right -> n 2, accuracy 0.5, Wilson
    by hand (z = 1.96): z²/n = 1.92073, centre (0.5 + 0.96037) / 2.92073 = 0.5, half
    1.96 sqrt(0.125 + 0.24009) / 2.92073 = 0.40547 -> [0.0945, 0.9055]."""
    tok = data.load_tokenizer(None)
    dcfg = data.DataConfig.from_model(modeling.build_model("tiny", seed=0).cfg)
    monkeypatch.setattr(sample, "load", lambda folder, device="cpu": (None, tok, dcfg))
    monkeypatch.setattr(recipe, "PROMPTS", {})
    monkeypatch.setattr(recipe, "TOKENIZERS", [])
    scored = [{"family": "ocr", "where": f"ocr/eval.jsonl:{i}", "answer": "a", "prediction": "a", "correct": i == 1}
              for i in (1, 2)]
    monkeypatch.setattr(sample, "evaluate_families", lambda *a, mode, **k: {
        "n": {"ocr": 2}, "predictions": [dict(p, blank=mode.blank, think=mode.think) for p in scored]})
    evals, preds = recipe.evaluate_stage(str(tmp_path), train_stage.StageConfig(data_dir=str(tmp_path)), False, 5, ["ocr"])
    assert evals == {m: {"ocr": {"n": 2, "correct": 1, "accuracy": 0.5, "interval": [0.0945, 0.9055]}}
                     for m in ("real", "blank")}
    assert len(preds) == 4 and {p["blank"] for p in preds} == {False, True}


def test_stage_command_launches_torchrun_for_several_processes():
    """--nproc=N > 1: the stage runs under torchrun --standalone --nproc_per_node=N; one process: plain python."""
    row = train_stage.STAGES["vit1"]
    assert recipe.stage_command(row, 2, ["--out_dir=o"])[:5] == [sys.executable, "-m", "torch.distributed.run",
                                                                 "--standalone", "--nproc_per_node=2"]
    one = recipe.stage_command(row, 1, ["--out_dir=o"])
    assert one[0] == sys.executable and one[1].endswith("train_stage.py") and one[-1] == "--resume"
