"""The recipe as one command (python train_stage.py --stage all) and the faults a long run meets:
the golden test (a shortened chain must see: accuracy above chance, above the pre-SFT model and
above its own blank-image accuracy), an interrupted recipe continuing to the same report, a
manifest salted with every kind of bad sample, and non-finite losses."""
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

import model as modeling
import sample
import rl
import recipe
import train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=900, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          **kw)


def report_of(out_dir):
    with open(os.path.join(out_dir, "recipe", "report.json")) as f:
        return json.load(f)


# The golden chain: lm0 -> vit1 -> sft1, each shortened, the stages between skipped (vit2 .. pretrain2
# make counting work, which takes the full recipe; OCR shows the visual path in two minutes).
GOLDEN = (("lm0", 200), ("vit1", 300), ("sft1", 200))
GOLDEN_N = 32                  # held-out OCR samples: the eval split's first 32 (16 tokens each, cheap)


def test_golden_a_shortened_chain_learns_to_see(synth, tmp_path):
    """After SFT the model reads the word beyond noise: its OCR accuracy's Wilson interval lies above
    chance, and the paired differences on the same samples (sft1 real - sft1 blank images, sft1 -
    vit1) have intervals above 0; a change that makes the model blind again fails here. Run
    through the stage table (run_stage), scored by the recipe's own evaluate_stage and compared with
    its own paired_difference. Measured (2 CPU cores): ocr 0.00 / 0.31 / 0.81 after lm0 / vit1 /
    sft1, blank 0.00 after sft1, chance 0.125; 130 s."""
    ev, preds, prev = {}, {}, None
    for name, steps in GOLDEN:
        args = [f"--out_dir={tmp_path}", f"--data_dir={synth}", f"--steps={steps}", "--eval_every=0", "--save_every=0"]
        out = train_stage.run_stage(name, args + ([f"--init-from={tmp_path}/{prev}"] if name == "sft1" else []))
        ev[name], preds[name] = recipe.evaluate_stage(out, train_stage.StageConfig(data_dir=synth), False, GOLDEN_N, ["ocr"])
        prev = name
    side = lambda name, mode: [p for p in preds[name] if recipe.mode_of(p) == mode]             # noqa: E731
    chance = sample.chance(synth, ["ocr"], limit=GOLDEN_N)["ocr"]
    sft1 = ev["sft1"]["real"]["ocr"]
    assert sft1["n"] == GOLDEN_N and sft1["interval"][0] > chance, (ev, chance)                   # sees
    blind = sample.paired_difference(side("sft1", "real"), side("sft1", "blank"))
    assert blind["interval"][0] > 0, (blind, ev)                                                  # not blind
    taught = sample.paired_difference(side("sft1", "real"), side("vit1", "real"))
    assert taught["interval"][0] > 0, (taught, ev)                                                # SFT taught it
    assert ev["vit1"]["real"]["ocr"]["accuracy"] > ev["lm0"]["real"]["ocr"]["accuracy"], ev      # alignment started it
    assert {p["blank"] for p in preds["sft1"]} == {True, False}         # every prediction kept, both modes
    assert sum(p["correct"] for p in side("sft1", "real")) == sft1["correct"]


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
    res = run([*args, f"--out_dir={tmp_path}/cut", "--resume"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
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
    assert list(alt) == ["RL mixed: after vs before", "RL mixed: after vs before, thinking",
                         "rl-mixed: its own held-out, after vs before"]
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
    """--seeds=N: run k passes each stage the seed it would run with + 1000 (k - 1); run 1 passes none."""
    rows = {n: train_stage.STAGES[n] for n in ("vit1", "sft4", "sft4-twin", "soup", "rl-verifiable")}
    seed = lambda cmd: [a for a in cmd if a.startswith("--seed=")]                         # noqa: E731
    assert all(seed(recipe.stage_command(r, 1, ["--out_dir=o"])) == [] for r in rows.values())
    got = {n: seed(recipe.stage_command(r, 1, ["--out_dir=o"], seed_offset=1000)) for n, r in rows.items()}
    assert got == {"vit1": ["--seed=2337"], "sft4": ["--seed=2337"], "sft4-twin": ["--seed=8331"],
                   "soup": ["--seed=2337"], "rl-verifiable": ["--seed=2337"]}             # the twin stays a twin
    assert seed(recipe.stage_command(rows["vit1"], 1, ["--seed=5"], seed_offset=2000))[-1] == "--seed=2005"   # the last wins
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
