"""rl.py's stage half (§4.2.3-§4.2.5): rollouts, the first update's ratio, the update's loss and
gradients under any micro-batch split, dynamic sampling at its cap, the CoT harvest, the model
judge, and the rl-verifiable stage end to end with an exact resume. (The pure losses and rewards
are tested against hand-computed values and math-verify in test_rl.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import model as M
import rl
import train_stage as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth):
    """A tiny checkpoint saved as a finished stage (the synthetic data's tokenizer beside it) and
    a few rl-verifiable prompts."""
    root = tmp_path_factory.mktemp("rl")
    m = M.build_model("tiny", seed=0)
    T.save_checkpoint(str(root / "out" / "longcot"), m, {"stage": "longcot"}, 0, 1,
                      extra_files=T.tokenizer_files(str(synth)))
    cfg = rl.RLConfig(out_dir=str(root / "out"), data_dir=str(synth), max_new_tokens=12, group_size=4,
                      prompts_per_episode=2, pool_size=8, filter_k=0)
    sc = rl.stage_view(cfg)
    tok = data.load_tokenizer(str(synth))
    dcfg = data.DataConfig.from_model(m.cfg, label_mode="rl", think="on", max_len=2048)
    prompts = rl.read_prompts(sc, tok, dcfg, "train", 8)
    return root, synth, m, tok, cfg, prompts


def test_rollouts_are_grouped_and_their_logprobs_match_a_recompute(setup):
    _, _, m, tok, cfg, prompts = setup
    rolls = rl.rollouts(m, tok, prompts[:3], 4, 12, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert len(rolls) == 12 and [r.prompt for r in rolls[::4]] == prompts[:3]
    assert all(r.prompt is rolls[4 * (i // 4)].prompt for i, r in enumerate(rolls))
    assert all(len(r.rollout_logp) == len(r.completion) and (r.truncated == (len(r.completion) == 12)) for r in rolls)
    ids = data.special_ids(tok)
    assert not any(t in (ids.img_context, ids.img_start, ids.img_end) for r in rolls for t in r.completion)
    # independent reference: the full forward of prompt + completion, log-softmax at each position
    # over the tokens the policy may emit (the image tokens are not among them)
    m.eval()
    for r in rolls[:4]:
        ids_ = torch.tensor([r.prompt.ids + r.completion])
        with torch.no_grad():
            logits = m(ids_, r.prompt.pixels).logits[0].float()
        logits[:, [ids.img_context, ids.img_start, ids.img_end]] = float("-inf")
        lp = torch.log_softmax(logits[len(r.prompt.ids) - 1:-1], -1).gather(1, torch.tensor(r.completion)[:, None])[:, 0]
        assert torch.allclose(lp, torch.tensor(r.rollout_logp), atol=1e-4)


def scored(rolls, rewards):
    for r, x in zip(rolls, rewards):
        r.reward, r.advantage = x, 0.0
    adv = rl.group_advantages(torch.tensor(rewards), 4)
    for r, a in zip(rolls, adv.tolist()):
        r.advantage = a
    return rolls


class Recorder(torch.optim.Optimizer):
    """Records the gradients of each step (applies nothing)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() if p.grad is not None else None for g in self.param_groups
                          for p in g["params"]])


def test_first_update_has_ratio_exactly_one_and_splits_do_not_change_the_gradient(setup):
    _, _, m, tok, cfg, prompts = setup
    rolls = rl.rollouts(m, tok, prompts[:4], 4, 12, 1.0, 1.0, torch.Generator().manual_seed(1))
    rolls = scored(rolls, [float(i % 3 == 0) for i in range(16)])
    cfg = rl.resolve_algo(rl.RLConfig(mini_batches=1, epochs=1, max_tokens=4096), m.cfg)
    params = list(m.parameters())
    grads = []
    for max_tokens in (4096, 300, 120):                  # one pack, a few, many: the same mini-batch gradient
        opt = Recorder(params)
        st = rl.update_episode(m, opt, params, rolls, rl.dataclasses.replace(cfg, max_tokens=max_tokens),
                               torch.device("cpu"), 1, m.cfg.img_context_token_id, rl.banned_ids(tok))
        assert st["first_ratio_max_dev"] == 0.0                         # old log-probs = the policy: r = 1
        grads.append(opt.seen[0])
    n_packs = len(rl.micro_batches(rolls, 120, m.cfg.img_context_token_id))
    assert n_packs >= 3
    assert rl.banned_ids(tok)
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(a is not None and a.abs().max() > 0 for a in grads[0])    # not vacuous


def test_dynamic_sampling_reaches_its_cap_and_training_goes_on(setup, monkeypatch):
    """Every group scores the same (no spread): sampling stops after max_sampling_rounds and the
    episode trains on nothing, with a log line, instead of raising."""
    _, _, m, tok, cfg, prompts = setup
    calls = []
    real = rl.rollouts

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(rl, "rollouts", counting)
    monkeypatch.setattr(rl, "score_rollouts", lambda rolls, *a, **k: [setattr(r, "reward", 0.5) for r in rolls])
    kept, st = rl.sample_groups(m, tok, rl.PromptPool(prompts, 0), rl.dataclasses.replace(cfg, max_sampling_rounds=3),
                                torch.Generator().manual_seed(0))
    assert kept == [] and st["kept"] == 0 and st["groups"] == 3 * cfg.prompts_per_episode and len(calls) == 3


def test_harvest_keeps_only_correct_well_formed_chains_once(setup, monkeypatch, tmp_path):
    root, synth, m, tok, cfg, prompts = setup
    T.save_checkpoint(str(tmp_path / "rl-verifiable"), m, {"stage": "rl-verifiable"}, 0, 1,
                      extra_files=T.tokenizer_files(str(synth)))

    def fake(model, tok_, ps, g, *a, **k):               # per prompt: right, right again, wrong, unformatted
        out = []
        for p in ps:
            good = f"<think>\nI count them.\n</think>\nThe answer is \\boxed{{{p.answer}}}."
            for text in (good, good, "<think>\nhm\n</think>\n\\boxed{999}", f"\\boxed{{{p.answer}}}")[:g]:
                out.append(rl.Rollout(p, [], text, False, []))
        return out
    monkeypatch.setattr(rl, "rollouts", fake)
    hcfg = rl.RLConfig(stage="harvest", out_dir=str(tmp_path), data_dir=str(synth), pool_size=6, harvest_samples=4)
    out = rl.harvest(hcfg)
    meta = T.verify_checkpoint(out)                      # the one writer, a data output
    lines = [json.loads(x) for x in open(os.path.join(out, "cot.jsonl"))]
    assert meta["kept"] == len(lines) == 6 and meta["counts"]["duplicate"] == 6
    ds = data.JsonlDataset(os.path.join(out, "cot.jsonl"), tok,
                           data.DataConfig.from_model(m.cfg, label_mode="thinkfusion", max_len=2048))
    assert all(ds[i]["labels"].ne(-100).sum() > 0 for i in range(len(ds)))   # loads as Think-Fusion data


def test_model_judge_is_a_probability(setup):
    root, synth, m, tok, cfg, prompts = setup
    judge = rl.ModelJudge(str(root / "out" / "longcot"))
    p = judge("How many?", "I see 3.", "3", "3")
    assert 0.0 <= p <= 1.0 and judge("How many?", "I see 3.", "3", "3") == p


def run(args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_rl_stage_end_to_end_and_resume_is_bit_identical(setup, tmp_path):
    root, synth, m, tok, cfg, prompts = setup
    for d in ("a", "b"):
        os.makedirs(tmp_path / d)
        os.symlink(root / "out" / "longcot", tmp_path / d / "longcot")
    args = ["rl.py", "--stage", "rl-verifiable", f"--data_dir={synth}", "--episodes=3", "--pool_size=8",
            "--group_size=4", "--prompts_per_episode=2", "--max_new_tokens=12", "--eval_prompts=4", "--filter_k=0",
            "--save_every=2", "--keep_checkpoints=5", "--temperature=1.5"]
    ref = run([*args, f"--out_dir={tmp_path}/a"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "update 0003/0003 | reward" in ref.stdout
    meta = T.verify_checkpoint(f"{tmp_path}/a/rl-verifiable")
    assert set(meta["reward"]) == {"before", "after"}
    # resume from the episode-2 checkpoint of the same run into a fresh folder: the same final weights
    os.makedirs(tmp_path / "b" / "rl-verifiable.run")
    os.symlink(tmp_path / "a" / "rl-verifiable.run" / "step-000002", tmp_path / "b" / "rl-verifiable.run" / "step-000002")
    res = run([*args, f"--out_dir={tmp_path}/b", "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: continuing from" in res.stdout
    wa, wb = load_file(f"{tmp_path}/a/rl-verifiable/model.safetensors"), load_file(f"{tmp_path}/b/rl-verifiable/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rl_usage_errors_are_one_line():
    res = run(["rl.py", "--stage", "vit1"], timeout=60)
    assert res.returncode == 2 and "not an RL stage" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run(["rl.py", "--stage", "rl-verifiable", "--reward_weights=0.5,0.5,0.5"], timeout=60)
    assert res.returncode != 0 and "sum" in res.stderr
