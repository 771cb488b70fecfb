"""train_stage.py (paper §2.1.1, §3.2, §4.2, §5): every stage learns and freezes what it should,
FSDP2 over 2 CPU processes equals 1 process, kill -9 + --resume is bit-exact, corrupt
checkpoints are refused, the soup of identical checkpoints is the identity."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import model as M
import train_stage as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth") / "data"
    data.ensure_synth(d, progress=False)
    return str(d)


def test_overrides_are_typed_and_unknown_keys_refused():
    cfg, mcfg = T.stage_config("vit1"), M.preset_config("tiny")
    T.apply_overrides({"": cfg, "model": mcfg}, ["--steps=7", "--lr=2e-3", "--adalrs=false", "--trainable=mlp1",
                                                 "--model.llm_config.num_hidden_layers=2", "--model.anyres=yes"])
    assert (cfg.steps, cfg.lr, cfg.adalrs, mcfg.llm_config.num_hidden_layers, mcfg.anyres) == (7, 2e-3, False, 2, True)
    for bad in (["--stepz=3"], ["--steps=three"], ["--adalrs=maybe"], ["--model.llm_config.nope=1"], ["steps=3"]):
        with pytest.raises(ValueError):
            T.apply_overrides({"": cfg, "model": mcfg}, bad)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


TRAINING_STAGES = [s for s in T.STAGE_NAMES if s != "soup"]


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_stage_learns_on_fixed_data_and_only_its_modules_change(stage, synth, tmp_path):
    cfg = T.stage_config(stage)
    max_tokens = max(512, cfg.max_tokens // 2)                         # video samples need ~600 tokens
    T.apply_overrides({"": cfg}, [f"--data_dir={synth}", f"--out_dir={tmp_path}", f"--max_tokens={max_tokens}",
                                  "--lr=2e-3", "--adalrs=false"])
    mcfg = M.preset_config("tiny")
    model = T.build_stage_model(cfg, mcfg, lambda *a: None)
    trainable = T.modules_of(cfg.trainable)
    T.freeze(model, trainable)
    tok = data.load_tokenizer(None)
    _, loader = T.build_loader(cfg, mcfg, tok, "train", 0, 1, cfg.seed, verbose=False)
    packs = next(iter(loader))
    assert packs[0]["labels"][0, 1:].ne(-100).sum() > 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    before = params_of(model)
    nocast = lambda: torch.autocast("cpu", enabled=False)              # noqa: E731
    losses = [T.train_step(model, opt, packs, params, 1.0, 1, torch.device("cpu"), nocast)["loss"] for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.05, f"{stage}: loss did not fall on fixed data: {losses}"
    after = params_of(model)
    for name in ("vision_model", "mlp1", "language_model"):
        changed = [k for k in before if k.startswith(name + ".") and not torch.equal(before[k], after[k])]
        if name in trainable:
            assert changed, f"{stage}: trainable {name} did not change"
        else:
            assert not changed, f"{stage}: frozen {name} changed: {changed[:3]}"
            assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(name + "."))
    frozen_ids = {id(p) for n, p in model.named_parameters() if n.split(".")[0] not in trainable}
    assert not frozen_ids & {id(p) for g in opt.param_groups for p in g["params"]}


def run(args, env_extra=None, timeout=300, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def losses_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln)["loss"] for ln in f]


COMMON = ["--max_tokens=384", "--eval_every=0", "--save_every=0", "--warmup_steps=1"]


def test_fsdp_two_processes_match_one_process(synth, tmp_path):
    one = run(["train_stage.py", "--stage", "vit3", f"--data_dir={synth}", f"--out_dir={tmp_path}/one",
               "--steps=3", "--micro_batches=2", *COMMON])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "train_stage.py", "--stage", "vit3",
               f"--data_dir={synth}", f"--out_dir={tmp_path}/two", "--steps=3", "--micro_batches=1", *COMMON])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses_of(f"{tmp_path}/one/vit3"), losses_of(f"{tmp_path}/two/vit3")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    wa = load_file(f"{tmp_path}/one/vit3/model.safetensors")
    wb = load_file(f"{tmp_path}/two/vit3/model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_kill_minus_9_then_resume_is_bit_identical(synth, tmp_path):
    args = ["train_stage.py", "--stage", "vit2", f"--data_dir={synth}", "--steps=6", "--save_every=2",
            "--max_tokens=384", "--eval_every=0", "--warmup_steps=1", "--keep_checkpoints=5"]
    ref = run([*args, f"--out_dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.Popen([sys.executable, *args, f"--out_dir={tmp_path}/crash"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = f"{tmp_path}/crash/vit2/step-000004"
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(ck, "meta.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(ck), "the run ended before its step-4 checkpoint"
    assert not os.path.exists(f"{tmp_path}/crash/vit2/model.safetensors"), "killed too late to test resume"
    res = run([*args, f"--out_dir={tmp_path}/crash", "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: continuing from" in res.stdout
    wa = load_file(f"{tmp_path}/ref/vit2/model.safetensors")
    wb = load_file(f"{tmp_path}/crash/vit2/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses_of(f"{tmp_path}/ref/vit2") == losses_of(f"{tmp_path}/crash/vit2")


def test_truncated_checkpoint_is_refused_and_previous_kept(synth, tmp_path):
    args = ["train_stage.py", "--stage", "lm0", f"--data_dir={synth}", "--steps=5", "--save_every=2",
            "--max_tokens=256", "--eval_every=0", "--keep_checkpoints=3", f"--out_dir={tmp_path}"]
    res = run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    good, bad = f"{tmp_path}/lm0/step-000002", f"{tmp_path}/lm0/step-000004"
    # step-4 is the newest checkpoint kept; truncate its weights
    path = os.path.join(bad, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(T.CheckpointError, match="corrupted"):
        T.verify_checkpoint(bad)
    T.verify_checkpoint(good)
    assert T.find_resume_checkpoint(f"{tmp_path}/lm0", lambda *a: None) == good
    res = run([*args, f"--resume={bad}"])
    assert res.returncode != 0 and "corrupted" in res.stderr
    os.remove(os.path.join(good, "meta.json"))                       # a partial folder: refused too
    with pytest.raises(T.CheckpointError, match="incomplete"):
        T.verify_checkpoint(good)


def test_soup_of_identical_checkpoints_is_identity_and_mismatch_refused(synth, tmp_path):
    m = M.build_model("tiny", seed=3)
    m.save_pretrained(f"{tmp_path}/a")
    m.save_pretrained(f"{tmp_path}/b")
    cfg = T.stage_config("soup")
    T.apply_overrides({"": cfg}, [f"--data_dir={synth}", f"--out_dir={tmp_path}/out", "--eval_packs=1",
                                  "--max_tokens=1024"])
    out = T.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/b"])
    souped = M.SAILVL.from_pretrained(out)
    for k, v in m.state_dict().items():
        assert torch.equal(souped.state_dict()[k], v), k
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["eval_loss"]["soup"] == pytest.approx(meta["eval_loss"][f"{tmp_path}/a"], rel=1e-6)
    # a real average: two different checkpoints give their mean
    m2 = M.build_model("tiny", seed=4)
    m2.save_pretrained(f"{tmp_path}/c")
    out = T.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/c"])
    w = M.SAILVL.from_pretrained(out).state_dict()["mlp1.1.weight"]
    assert torch.allclose(w, (m.state_dict()["mlp1.1.weight"] + m2.state_dict()["mlp1.1.weight"]) / 2, atol=1e-7)
    other = M.SAILVL(M.preset_config("tiny-moe"))
    other.init_weights()
    other.save_pretrained(f"{tmp_path}/moe")
    with pytest.raises(SystemExit, match="different architecture"):
        T.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/moe"])


def test_vit1_on_a_fresh_machine_runs_lm0_first(synth, tmp_path):
    res = run(["train_stage.py", "--stage", "vit1", f"--data_dir={synth}", f"--out_dir={tmp_path}", "--steps=2",
               "--lm0_steps=2", "--max_tokens=256", "--eval_every=0"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "running the short lm0 stage first" in res.stdout
    assert "init: all weights from" in res.stdout and f"{tmp_path}/lm0" in res.stdout
    assert os.path.exists(f"{tmp_path}/lm0/model.safetensors") and os.path.exists(f"{tmp_path}/vit1/model.safetensors")
    assert "next: torchrun train_stage.py --stage vit2" in res.stdout and "try it: python sample.py" in res.stdout


def test_resume_in_the_middle_of_an_adalrs_trial_is_bit_identical(synth, tmp_path):
    args = ["train_stage.py", "--stage", "pretrain1", f"--data_dir={synth}", "--steps=10", "--save_every=5",
            "--max_tokens=384", "--eval_every=0", "--warmup_steps=1", "--adalrs_cfg.window=3",
            "--adalrs_cfg.start=0", "--adalrs_cfg.end=1", "--keep_checkpoints=5"]
    ref = run([*args, f"--out_dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "adalrs: step" in ref.stdout
    ck = f"{tmp_path}/ref/pretrain1/step-000005"
    assert os.path.exists(os.path.join(ck, "adalrs_rank0.pt")), "no trial was running at step 5"
    res = run([*args, f"--out_dir={tmp_path}/again", f"--resume={ck}"])
    assert res.returncode == 0, res.stderr[-3000:]
    wa = load_file(f"{tmp_path}/ref/pretrain1/model.safetensors")
    wb = load_file(f"{tmp_path}/again/pretrain1/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_from_hf_qwen3_and_aimv2_folders(tmp_path):
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, Qwen3Config, Qwen3ForCausalLM
    mcfg = M.preset_config("tiny")
    L, V = mcfg.llm_config, mcfg.vision_config
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=L.vocab_size, hidden_size=L.hidden_size,
                                       intermediate_size=L.intermediate_size, num_hidden_layers=L.num_hidden_layers,
                                       num_attention_heads=L.num_attention_heads, head_dim=L.head_dim,
                                       num_key_value_heads=L.num_key_value_heads, tie_word_embeddings=True,
                                       rope_theta=L.rope_theta))
    vis = Aimv2VisionModel(Aimv2VisionConfig(hidden_size=V.hidden_size, intermediate_size=V.intermediate_size,
                                             num_hidden_layers=V.num_hidden_layers, image_size=V.image_size,
                                             num_attention_heads=V.num_attention_heads, use_head=False))
    llm.save_pretrained(tmp_path / "llm")
    vis.save_pretrained(tmp_path / "vit")
    cfg = T.stage_config("vit1")
    T.apply_overrides({"": cfg}, [f"--out_dir={tmp_path}/out", f"--init_llm={tmp_path}/llm",
                                  f"--init_vit={tmp_path}/vit"])
    model = T.build_stage_model(cfg, mcfg, lambda *a: None).eval()
    ids = torch.randint(0, 256, (1, 12))
    pix = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert (model.language_model(ids) - llm(ids).logits).abs().max() < 1e-4
        assert (model.vision_model(pix) - vis(pix).last_hidden_state).abs().max() < 1e-4
