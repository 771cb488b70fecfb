"""train_stage.py (paper §2.1.1, §3.2, §4.2, §5): the recipe table against the paper, every stage
learns and trains only the modules the paper says, the one loss (global token mean, aux term
once, world size once) is invariant to packing / micro-batches / ranks through the real step,
the MoE path, AdaLRS, warm-up and clipping in the loop, data -> packing resume and rank splits,
FSDP2 over 2 CPU processes, kill -9 + --resume, one checkpoint writer and reader, the soup, and
the command line as a new user meets it."""
import dataclasses
import datetime
import gc
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import model as modeling
import packing
import train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOCAST = lambda: torch.autocast("cpu", enabled=False)                    # noqa: E731
CPU = torch.device("cpu")


def cfg_of(stage, *overrides):
    """The config the command line builds (the recipe table the CLI uses), with overrides."""
    cfg, mcfg, _ = train_stage.parse_args(["--stage", stage, *overrides])
    return cfg, mcfg


def run(args, env_extra=None, timeout=300, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def losses_of(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


# ----------------------------------------------------------------------------------------------
# the recipe table against the paper

# Written out from the paper, independently of RECIPE: which modules each stage trains.
# §2.1.1 SAIL-ViT: I adapter, II ViT + adapter, III all; §3.2.1 basic pre-training: the adapter
# (from random init), multi-task pre-training: all; §4.2.1-§4.2.5 every SFT / RL stage: all. The
# control vit3-direct (stage III without I-II) trains what stage III trains.
ALL = {"vision_model", "mlp1", "language_model"}
PAPER_TRAINS = {"vit1": {"mlp1"}, "vit2": {"vision_model", "mlp1"}, "vit3": ALL, "vit3-direct": ALL, "pretrain1": {"mlp1"},
                "pretrain2": ALL, "sft1": ALL, "sft2": ALL, "sft3": ALL, "sft4": ALL, "sft4-twin": ALL,
                "longcot": ALL, "rl-verifiable": ALL, "thinkfusion": ALL, "rl-mixed": ALL}
PAPER_ORDER = ["vit1", "vit2", "vit3", "pretrain1", "pretrain2", "sft1", "sft2", "sft3", "sft4", "soup", "longcot",
               "rl-verifiable", "thinkfusion", "rl-mixed"]                # §2.1.1, §3.2, §4.2 in order


def test_recipe_table_follows_the_paper():
    names = [s.name for s in train_stage.RECIPE]
    assert [n for n in names if n in PAPER_ORDER] == PAPER_ORDER
    for name, modules in PAPER_TRAINS.items():
        assert set(train_stage.STAGES[name].trainable) == modules, name
        if train_stage.STAGES[name].runner == "rl.py":      # the miniature's RL trains the LLM only (its tiny value)
            import rl
            assert set(train_stage.modules_of(rl.rl_config(["--stage", name])[0].trainable)) == {"language_model"}, name
            continue
        assert set(train_stage.modules_of(cfg_of(name)[0].trainable)) == modules, name     # what the CLI trains
    assert train_stage.STAGES["lm0"].auto and train_stage.STAGES["lm0"].section == ""                 # the stand-in is marked
    assert train_stage.init_rule(train_stage.STAGES["pretrain1"]) == {"vision_model": "vit3", "mlp1": "fresh", "language_model": "lm0"}
    assert train_stage.init_rule(train_stage.STAGES["vit2"]) == {m: "vit1" for m in ALL}             # previous stage
    direct, vit3 = train_stage.STAGES["vit3-direct"], train_stage.STAGES["vit3"]                       # the control: III where I starts
    assert train_stage.init_rule(direct) == train_stage.init_rule(train_stage.STAGES["vit1"]) and (direct.mix, direct.tiny) == (vit3.mix, vit3.tiny)
    assert train_stage.STAGES["soup"].inputs == ("sft4", "sft4-twin")
    assert cfg_of("pretrain1")[0].adalrs and not cfg_of("pretrain2")[0].adalrs   # §3.2.1: AdaLRS in basic only
    assert cfg_of("pretrain2")[0].ngram_rebalance                                  # §3.2.2 step 2
    assert cfg_of("longcot")[0].label_mode == "longcot" and cfg_of("thinkfusion")[0].label_mode == "thinkfusion"
    p = train_stage.STAGES["vit1"].paper_values
    assert (p["lr"], p["batch"], p["seq"], p["samples"]) == (2e-4, 1920, 8192, 8_000_000)     # Table / §2.1.1
    assert train_stage.STAGES["pretrain1"].paper_values["lr"] == 2e-4 and train_stage.STAGES["sft4"].paper_values["seq"] == 16384
    assert train_stage.STAGES["longcot"].paper_values["lr"] == 1e-6 == train_stage.STAGES["rl-verifiable"].paper_values["lr"]
    mix = dict(train_stage.STAGES["thinkfusion"].mix)                                        # §4.2.4: direct:CoT 9:1
    assert sum(v for k, v in mix.items() if k.startswith("out:")) * 9 == pytest.approx(
        sum(v for k, v in mix.items() if not k.startswith("out:")))
    sft4 = dict(train_stage.STAGES["sft4"].mix)                                              # §4.2.1: image:video 1:1
    assert sft4["video"] == pytest.approx(sum(sft4.values()) - sft4["video"])
    for row in train_stage.RECIPE:                                                           # every mix names real data
        assert all(k.startswith("out:") or k in data.SYNTH_FAMILIES for k, _ in row.mix), row.name
    assert train_stage.next_name(train_stage.STAGES["vit1"]) == "vit2" and train_stage.previous_name(train_stage.STAGES["vit1"]) == "lm0"
    assert [train_stage.next_name(train_stage.STAGES[n]) for n in ("vit3", "vit3-direct", "sft4", "rl-mixed")] == \
        ["pretrain1", "pretrain1", "sft4-twin", None]              # (vit3-direct, a control, is no next stage)


def test_scale_paper_applies_the_paper_values_and_says_what_changed(capsys):
    lines = []
    cfg = train_stage.stage_config("vit1", "paper", log=lines.append)
    assert (cfg.lr, cfg.packing.max_tokens, cfg.steps, cfg.preset) == (2e-4, 8192, 8_000_000 // 1920, "2b")
    assert cfg.ac == "block" and "ac none -> block" in lines[0]         # 2b at 8k packs does not fit without
    assert "packs of max_tokens (the paper's: 1,920 samples; --packing.micro_batches sets it)" in lines[0]
    assert "lr 0.003 -> 0.0002" in lines[0] and f"steps {train_stage.stage_config('vit1').steps} -> 4166" in lines[0]
    lines.clear()
    train_stage.stage_config("pretrain2", "paper", log=lines.append)
    assert f"does not state lr, batch: kept lr 0.001, {train_stage.stage_config('pretrain2').steps} steps" in lines[0]
    lines.clear()                                        # vit2: a batch, but neither samples nor tokens to count steps
    train_stage.stage_config("vit2", "paper", log=lines.append)
    assert f"does not state samples or tokens: kept {train_stage.stage_config('vit2').steps} steps" in lines[0]
    capsys.readouterr()                                  # an option given on the command line wins, and is said to
    cfg, _ = cfg_of("vit1", "--scale=paper", "--steps=3", "--ac=none")
    said = capsys.readouterr().out
    assert (cfg.steps, cfg.ac, cfg.lr) == (3, "none", 2e-4) and "steps 4166 not applied (--steps given)" in said
    assert "ac block not applied (--ac given)" in said and "a starting checkpoint keeps its shapes" in said
    cfg, _ = cfg_of("vit2", "--scale=paper", "--steps=2")               # no steps from the paper: those given
    said = capsys.readouterr().out
    assert cfg.steps == 2 and "does not state samples or tokens: --steps as given;" in said and "kept" not in said


# ----------------------------------------------------------------------------------------------
# every stage learns, and trains only the modules the paper says

def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


TRAINING_STAGES = [s.name for s in train_stage.RECIPE if s.runner == "train_stage.py"]


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_stage_learns_on_fixed_data_and_trains_only_the_papers_modules(stage, synth, tmp_path):
    cfg, mcfg = cfg_of(stage, f"--data_dir={synth}", f"--out_dir={tmp_path}", "--lr=2e-3", "--adalrs=false",
                       "--init-from=random")
    if stage == "thinkfusion":          # its CoT half is the harvest's output; a synthetic CoT file stands in
        os.makedirs(tmp_path / "harvest")
        os.symlink(os.path.join(synth, "math", "train.jsonl"), tmp_path / "harvest" / "cot.jsonl")
    cfg.packing.max_tokens = max(512, cfg.packing.max_tokens // 2)          # video samples need ~600 tokens
    model = train_stage.build_stage_model(cfg, mcfg, lambda *a: None)
    trainable = train_stage.modules_of(cfg.trainable)
    modeling.freeze(model, trainable)
    tok = data.load_tokenizer(None)
    packs = train_stage.build_batches(cfg, mcfg, tok, "train", 0, 1, verbose=False).next()
    assert packs[0]["labels"][0, 1:].ne(-100).sum() > 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    before = params_of(model)
    losses = [train_stage.train_step(model, opt, packs, params, 1.0, 1, CPU, NOCAST)["loss"] for _ in range(6)]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.05, f"{stage}: loss did not fall on fixed data: {losses}"
    after = params_of(model)
    for name in ALL:
        changed = [k for k in before if k.startswith(name + ".") and not torch.equal(before[k], after[k])]
        if name in PAPER_TRAINS.get(stage, {"language_model"}):             # lm0: the LLM only
            assert changed, f"{stage}: trainable {name} did not change"
        else:
            assert not changed, f"{stage}: frozen {name} changed: {changed[:3]}"
            assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(name + "."))


@pytest.mark.parametrize("stage,options", [("sft4", ["--ac=block"]), ("pretrain2", ["--preset=tiny-moe"]),
                                           ("sft1", ["--preset=tiny-anyres"])])
def test_the_step_and_the_held_out_loss_make_every_tensor_on_the_models_device(stage, options, synth, tmp_path,
                                                                              on_the_cpu):
    """The training step and the held-out loss (images, video frames, AnyRes, MoE routing,
    activation checkpointing), run inside `torch.device("meta")`: a tensor they made without the
    model's device would be a meta tensor (no data) and raise on meeting the model's, as a CPU
    tensor meeting a CUDA model's does. The packs are the loader's (CPU), moved by to_device as the
    loop does."""
    cfg, mcfg = cfg_of(stage, f"--data_dir={synth}", f"--out_dir={tmp_path}", "--init-from=random",
                       "--adalrs=false", *options)
    model = train_stage.build_stage_model(cfg, mcfg, lambda *a: None)
    packs = train_stage.build_batches(cfg, mcfg, data.load_tokenizer(None), "train", 0, 1, verbose=False).next()
    params = [p for p in model.parameters() if p.requires_grad]
    held_out = type("HeldOut", (), {"next": lambda self: packs})
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step = on_the_cpu(opt.step)           # torch.optim's own step counters (conftest.on_the_cpu)
    with torch.device("meta"):
        res = train_stage.train_step(model, opt, [train_stage.to_device(p, CPU) for p in packs], params, 1.0, 1,
                                     CPU, NOCAST)
        loss = train_stage.evaluate(model, held_out, 1, CPU, NOCAST)
    assert math.isfinite(res["loss"]) and not res["skipped"] and math.isfinite(loss)


def test_a_sample_longer_than_a_pack_follows_the_packers_overlong_rule(tmp_path):
    """Through build_batches, as the trainer reads: a text sample longer than --packing.max_tokens but
    within the model's context is cut to a pack (overlong=truncate) or packed whole, alone
    (own_pack), and not counted as bad data; one beyond the model's context is bad ('too_long')."""
    tok = data.load_tokenizer(None)
    context = modeling.preset_config("tiny").llm_config.max_position_embeddings
    lines = [{"text": f"short sample {i}.", "task": "text"} for i in range(40)]
    lines[7] = {"text": "long " + "word " * 200, "task": "text"}                   # > 64 tokens, < the context
    lines[30] = {"text": "huge " + "word " * (2 * context), "task": "text"}         # > the context
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for rule in ("truncate", "own_pack"):
        cfg, mcfg = cfg_of("lm0", f"--manifests={tmp_path}/m.jsonl", f"--out_dir={tmp_path}", "--packing.max_tokens=64",
                           "--packing.buffer_size=8", "--packing.max_wait=4", f"--packing.overlong={rule}",
                           "--max_bad_fraction=0.5")
        batches = train_stage.build_batches(cfg, mcfg, tok, "train", 0, 1, verbose=False)
        where = re.escape(f"{(tmp_path / 'm.jsonl').resolve()}:8 has ")            # the warning names file:line
        with pytest.warns(UserWarning, match=where + ".*max_tokens=64"):
            long = [(p["input_ids"].shape[1], len(p["sample_ids"])) for _ in range(12) for p in batches.next()
                    if 7 in [batches.mixture.sample_index(k) for k in p["sample_ids"]]]
        assert long and {"truncate": all(n <= 64 for n, _ in long), "own_pack": all(n > 64 and k == 1 for n, k in long)}[rule]
        counted = batches.overlong()                    # what the stage output's meta.json reports
        assert counted[{"truncate": "truncated", "own_pack": "own_pack"}[rule]] >= 1 and counted["skipped"] == 0
        assert dict(batches.mixture.bad.counts) == {"too_long": 1}


def test_a_pack_with_bad_boundaries_is_refused_before_it_moves_to_the_device():
    """packed_attention reads only CPU tensors' boundaries (a CUDA one's would wait for the GPU in
    every layer): to_device checks a pack's on the host, so a bad one is a clear error on a GPU too."""
    pack = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "labels": torch.zeros(1, 6, dtype=torch.long),
            "position_ids": torch.zeros(1, 6, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4, 6], dtype=torch.int32)}
    assert train_stage.to_device(pack, CPU)["cu_seqlens"].tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match="cu_seqlens"):
        train_stage.to_device({**pack, "cu_seqlens": torch.tensor([0, 4, 5], dtype=torch.int32)}, CPU)


@pytest.mark.parametrize("stage,preset", [("sft4", "tiny"), ("pretrain2", "tiny-moe"), ("sft1", "tiny-anyres"),
                                          ("lm0", "tiny"), ("lm0", "tiny-anyres")])
def test_the_sharded_step_trains_under_fsdp2s_bf16_mixed_precision(stage, preset, synth, tmp_path, sharded_in_bf16,
                                                                   on_the_cpu):
    """Sharded runs on CUDA compute with bf16 copies of the weights and reduce gradients in fp32
    (FSDP2's MixedPrecisionPolicy, set by place_model on CUDA only); here the same on CPU, in a
    process group of one, with activation checkpointing, inside `torch.device("meta")` as the test
    above (no tensor made off the model's device): the first loss is the fp32 model's up to bf16
    rounding, and the loss falls. lm0's packs hold no image: the blank tile every sharded rank runs
    through the ViT must come in the gathered weights' bf16 (an fp32 one failed in the patch conv)."""
    cfg, mcfg = cfg_of(stage, f"--data_dir={synth}", f"--out_dir={tmp_path}", "--init-from=random", "--adalrs=false",
                       f"--preset={preset}", "--ac=block")
    packs = [train_stage.to_device(p, CPU)
             for p in train_stage.build_batches(cfg, mcfg, data.load_tokenizer(None), "train", 0, 1, verbose=False).next()]
    reference = train_stage.build_stage_model(cfg, mcfg, lambda *a: None)
    params = [p for p in reference.parameters() if p.requires_grad]
    want = train_stage.train_step(reference, Recorder(params), packs, params, 1.0, 1, CPU, NOCAST)["loss"]
    model, _ = train_stage.place_model(cfg, mcfg, 0, 1, CPU, lambda *a: None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step = on_the_cpu(opt.step)           # torch.optim's own step counters (conftest.on_the_cpu)
    with torch.device("meta"):
        losses = [train_stage.train_step(model, opt, packs, params, 1.0, 1, CPU, NOCAST)["loss"] for _ in range(3)]
    assert next(model.language_model.model.layers[0].parameters()).dtype == torch.float32   # fp32 shards
    assert abs(losses[0] - want) < 0.02 and losses[0] != want, (losses, want)   # bf16, not the fp32 forward
    assert losses[2] < losses[0] - 0.1, losses


def no_second_model(monkeypatch):
    """Make building a whole model (or an LLM / ViT) from a folder an error: a stage composed from
    several sources copies each one's tensors into its model straight from the files."""
    def refuse(*a, **k):
        raise AssertionError("a second model was built beside the stage's")
    monkeypatch.setattr(modeling.SAILVL, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(modeling, "load_hf_llm", refuse)
    monkeypatch.setattr(modeling.vit, "load_hf_vit", refuse)


def test_pretrain1_starts_from_vit3s_vit_lm0s_llm_and_a_fresh_adapter(tmp_path, monkeypatch):
    def trained(seed):                    # a checkpoint whose every module is far from a fresh init
        m = modeling.build_model("tiny", seed=seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn_like(p))
        return m
    vit3, lm0 = trained(1), trained(2)
    modeling.save_checkpoint(str(tmp_path / "vit3"), vit3, {"stage": "vit3"}, 0, 1)
    modeling.save_checkpoint(str(tmp_path / "lm0"), lm0, {"stage": "lm0"}, 0, 1)
    no_second_model(monkeypatch)
    cfg, mcfg = cfg_of("pretrain1", f"--out_dir={tmp_path}")
    logs = []
    m = train_stage.build_stage_model(cfg, mcfg, logs.append)
    sd = m.state_dict()
    for k, v in vit3.state_dict().items():
        if k.startswith("vision_model."):
            assert torch.equal(sd[k], v), k
    for k, v in lm0.state_dict().items():
        if k.startswith("language_model."):
            assert torch.equal(sd[k], v), k
    # a fresh adapter: nn's own init (LayerNorm weight 1, bias 0; Linear weights ~U(+-1/sqrt(fan_in)))
    assert torch.equal(m.mlp1[0].weight, torch.ones_like(m.mlp1[0].weight))
    assert torch.equal(m.mlp1[0].bias, torch.zeros_like(m.mlp1[0].bias))
    lin = m.mlp1[1].weight
    assert lin.abs().max() <= 1 / math.sqrt(lin.shape[1]) and not torch.equal(lin, vit3.mlp1[1].weight)
    assert any("mlp1 freshly initialised" in line for line in logs)
    # --init_modules changes the rule for the modules it names: the adapter vit3's, the rest as before
    cfg, mcfg = cfg_of("pretrain1", f"--out_dir={tmp_path}", "--init_modules=mlp1:vit3")
    m = train_stage.build_stage_model(cfg, mcfg, logs.append)
    want = {**{k: v for k, v in vit3.state_dict().items() if not k.startswith("language_model.")},
            **{k: v for k, v in lm0.state_dict().items() if k.startswith("language_model.")}}
    assert all(torch.equal(m.state_dict()[k], v) for k, v in want.items())
    for bad, match in ((["--init_modules=mlp1=vit3"], "module:stage pairs"),
                       (["--init_modules=adapter:vit3"], "unknown module"),
                       (["--init_modules=mlp1:vit9"], "unknown stage 'vit9' \\(did you mean vit.*, rl-mixed, fresh$"),
                       (["--init_modules=:vit3"], "a pair without its module"),
                       (["--init_modules=mlp1:vit3,mlp1:fresh"], "named twice"),
                       (["--init_modules=mlp1:vit3", f"--init_from={tmp_path}"], "give one of them")):
        with pytest.raises(train_stage.UsageError, match=match):
            cfg_of("pretrain1", f"--out_dir={tmp_path}", *bad)


def test_a_stage_from_one_checkpoint_is_that_checkpoints_model_without_a_random_one_beside(tmp_path, monkeypatch):
    """A stage whose every module comes from one checkpoint (RL, SFT phases, --init-from): the
    checkpoint's model itself, no random model built and overwritten beside it (host memory: each
    rank holds the weights once, not twice); with a --model.* option that changes its config (RoPE
    θ), a model of that config given the same weights, also without a random model (and, asked for
    bf16 matrices on the device, read straight into them)."""
    ck = modeling.build_model("tiny", seed=3)
    modeling.save_checkpoint(str(tmp_path / "ck"), ck, {"stage": "sft4"}, 0, 1)
    random_inits = []
    init_weights = modeling.SAILVL.init_weights
    monkeypatch.setattr(modeling.SAILVL, "init_weights", lambda self: random_inits.append(1) or init_weights(self))
    for options, theta, how in (([], ck.cfg.llm_config.rope_theta, "with its model config"),
                                (["--model.llm_config.rope_theta=5e5"], 5e5,
                                 "with its model config and the --preset / --model.* options given (same shapes)")):
        logs = []
        cfg, mcfg = cfg_of("sft1", f"--out_dir={tmp_path}/out", f"--init-from={tmp_path}/ck", *options)
        m = train_stage.build_stage_model(cfg, mcfg, logs.append)
        assert not random_inits and m.cfg.llm_config.rope_theta == theta
        assert all(torch.equal(m.state_dict()[k], v) for k, v in ck.state_dict().items())
        lm = m.language_model
        assert (lm.lm_head.weight is lm.model.embed_tokens.weight) == ck.cfg.llm_config.tie_word_embeddings
        assert logs == [f"init: all weights from {tmp_path}/ck, {how}"]
        m = train_stage.build_stage_model(cfg, mcfg, logs.append, matrices_dtype=torch.bfloat16)
        assert not random_inits and m.language_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert m.cfg.llm_config.rope_theta == theta


# ----------------------------------------------------------------------------------------------
# the one loss: invariant to packing, micro-batches and ranks, through the real step function

def fixed_samples(synth, n=12):
    """Real samples of three synthetic families (images, text, different lengths)."""
    mcfg = modeling.preset_config("tiny")
    tok, dcfg = data.load_tokenizer(None), data.DataConfig.from_model(mcfg, max_len=4096)
    out = []
    for family in ("count", "caption_qa", "ocr", "text"):
        ds = data.JsonlDataset(os.path.join(synth, family, "train.jsonl"), tok,
                               data.DataConfig.from_model(mcfg, label_mode="text") if family == "text" else dcfg)
        out += [ds[i] for i in range(n // 4)]
    return out, mcfg


def packs_of(samples, max_tokens):
    plans = packing.plan_packs([packing.sample_meta(s, i) for i, s in enumerate(samples)],
                               packing.PackingConfig(max_tokens=max_tokens))
    return [packing.collate_pack([samples[m.index] for m in p], p) for p in plans]


def reference_loss_and_grads(model, samples):
    """Hand-computed: each sample on its own, -log softmax(logits[j-1])[labels[j]] over its targets
    (F.log_softmax + gather, not the model's CE helper), summed and divided by the target count."""
    total, n = 0.0, 0
    for s in samples:
        logits = model(s["input_ids"][None], s["pixel_values"]).logits[0].float()
        tgt = s["labels"][1:]
        keep = tgt != -100
        logp = F.log_softmax(logits[:-1][keep], -1).gather(1, tgt[keep][:, None])
        total = total - logp.sum()
        n += int(keep.sum())
    loss = total / n
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.item(), grads


class Recorder(torch.optim.Optimizer):
    """An optimizer that records the gradients it is asked to apply (and applies nothing)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen = None

    def step(self, closure=None):
        self.seen = [None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]]


@pytest.mark.parametrize("max_tokens,micro", [(4096, 1), (400, 1), (400, 2), (250, 3)])
def test_step_loss_and_gradients_do_not_depend_on_packs_or_micro_batches(synth, max_tokens, micro):
    samples, mcfg = fixed_samples(synth)
    torch.manual_seed(0)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    params = list(model.parameters())
    ref_loss, ref_grads = reference_loss_and_grads(model, samples)
    packs = packs_of(samples, max_tokens)
    assert len(packs) >= micro
    # `micro` micro-batches per step: the packs concatenated into that many groups (uneven sizes)
    groups = [packs[i::micro] for i in range(micro)]
    merged = [packing.collate_pack(samples_of(grp, samples)) for grp in groups]
    for batch in (packs, merged):
        opt = Recorder(params)
        res = train_stage.train_step(model, opt, batch, params, 1e9, 1, CPU, NOCAST)
        assert res["loss"] == pytest.approx(ref_loss, rel=1e-5)
        for got, want in zip(opt.seen, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if len(packs) > 1:                     # not vacuous: a mean of per-pack means differs here, by 10x the
        with torch.no_grad():              # tolerance above (at random init every token's loss is near ln 512)
            naive = [float(model(p["input_ids"], p["pixel_values"], labels=p["labels"], position_ids=p["position_ids"],
                                 cu_seqlens=p["cu_seqlens"]).ce_sum) / int((p["labels"][:, 1:] != -100).sum())
                     for p in packs]
        assert abs(sum(naive) / len(naive) - ref_loss) > 1e-4 * ref_loss


def samples_of(pack_list, samples):
    ids = [i for p in pack_list for i in p["sample_ids"]]
    return [samples[i] for i in ids]


FSDP_STEP = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
import model as modeling, train_stage, test_train_stage as helpers
rank, world, device = train_stage.setup_distributed()
samples, mcfg = helpers.fixed_samples(os.environ["SYNTH"])
with torch.device("meta"):
    model = modeling.SAILVL(mcfg)
modeling.parallelize(model, device, mixed_precision=False)
from torch.distributed.fsdp import FSDPModule
assert all(isinstance(b, FSDPModule) for b in [*model.vision_model.trunk.blocks, *model.language_model.model.layers])
assert not isinstance(model.vision_model, FSDPModule)       # ViT blocks are the units, not the whole ViT
model.to_empty(device=device)
torch.manual_seed(0)                                       # the same weights as the one-process reference
full = modeling.SAILVL(mcfg)
full.init_weights()
modeling.scatter_weights(model, full.state_dict, rank, device, "the reference", "the reference weights")
packs = helpers.packs_of(samples, 300)
text_packs = helpers.packs_of([s for s in samples if s.get("pixel_values") is None], 300)
rank1 = text_packs if os.environ.get("RANK1") == "text" else packs[2:4]    # text only: no ViT work on rank 1
mine = packs[:2] if rank == 0 else rank1                   # rank 0 and rank 1 hold very different packs
params = list(model.parameters())
opt = torch.optim.SGD(params, lr=1.0)
res = train_stage.train_step(model, opt, mine, params, 1e9, world, device, helpers.NOCAST)
sd = modeling.full_state_dict(model)
if rank == 0:
    torch.save({"loss": res["loss"], "sd": sd,
                "tokens": [int((p["labels"][:, 1:] != -100).sum()) for p in packs[:2] + rank1]}, os.environ["OUT"])
train_stage.shutdown_distributed()
train_stage.exit_process()
"""


SHARDED_LOAD = r"""
import os, sys, torch
sys.path.insert(0, os.environ["REPO"])
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
import model as modeling, train_stage, test_train_stage as helpers
rank, world, device = train_stage.setup_distributed()
def no_full_model(*a, **k):
    raise AssertionError("a whole model was built on a rank")
modeling.SAILVL.from_pretrained = classmethod(no_full_model)
modeling.SAILVL.init_weights = no_full_model                # nor a random one
read = modeling.checkpoint_tensors
if os.environ.get("FAIL") == "unmade" and rank == 0:        # a meta tensor with no fill to make it from
    def unmade(*a, **k):
        return {**read(*a, **k), "mlp1.1.weight": torch.empty(read(*a, **k)["mlp1.1.weight"].shape, device="meta")}
    modeling.checkpoint_tensors = unmade
elif os.environ.get("FAIL") and rank == 0:                  # a failure that is no OSError / ValueError
    def fail(*a, **k):
        raise KeyError(os.environ["FAIL"])
    modeling.checkpoint_tensors = fail
cfg, mcfg = helpers.cfg_of("sft1", "--out_dir=" + os.environ["OUT_DIR"], "--init-from=" + os.environ["CK"],
                           *os.environ.get("OPTIONS", "").split())
logs = []
model, _ = train_stage.place_model(cfg, mcfg, rank, world, device, logs.append)
sd = modeling.full_state_dict(model)
if rank == 0:
    torch.save({"sd": sd, "logs": logs, "theta": model.cfg.llm_config.rope_theta}, os.environ["OUT"])
train_stage.shutdown_distributed()
train_stage.exit_process()
"""


def test_a_stage_that_would_tie_a_checkpoints_own_head_to_its_embedding_is_refused(tmp_path):
    """--model.llm_config.tie_word_embeddings=true on an untied checkpoint keeps every shape, but one
    tensor cannot hold both trained ones: refused in one line (InputError), where it loaded the
    checkpoint's lm_head into the shared embedding without a word."""
    cfg = modeling.preset_config("tiny")
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=False))
    torch.manual_seed(3)
    ck = modeling.SAILVL(cfg)
    ck.init_weights()
    modeling.save_checkpoint(str(tmp_path / "ck"), ck, {"stage": "sft4"}, 0, 1)
    cfg, mcfg = cfg_of("sft1", f"--out_dir={tmp_path}/out", f"--init-from={tmp_path}/ck",
                       "--model.llm_config.tie_word_embeddings=true")
    with pytest.raises(train_stage.InputError, match="lm_head of its own .* would be lost"):
        train_stage.build_stage_model(cfg, mcfg, lambda *a: None)


@pytest.mark.parametrize("preset,options", [("tiny", ""), ("tiny-moe", "--model.llm_config.rope_theta=5e5")])
def test_two_ranks_read_a_checkpoint_into_their_shards_a_tensor_at_a_time(tmp_path, preset, options):
    """A stage from one checkpoint under FSDP2 on 2 gloo processes (place_model, as every sharded
    stage starts): each rank's shards come straight from the checkpoint's files, a tensor at a time
    (experts stored one by one joined per tensor), with no whole model built on any rank (rank 0
    held one in fp32 before: 122 GB for 30b-a3b), and the gathered weights are the checkpoint's;
    so too with a --model.* option that changes a setting (RoPE θ), not a shape."""
    ck = modeling.build_model(preset, seed=3)
    modeling.save_checkpoint(str(tmp_path / "ck"), ck, {"stage": "sft4"}, 0, 1)
    (tmp_path / "load.py").write_text(SHARDED_LOAD)
    res = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "load.py")],
              env_extra={"REPO": ROOT, "CK": str(tmp_path / "ck"), "OUT_DIR": str(tmp_path / "out"),
                         "OUT": str(tmp_path / "out.pt"), "OPTIONS": options}, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    want = ck.state_dict()
    assert got["sd"].keys() == want.keys() and all(torch.equal(got["sd"][k], want[k]) for k in want)
    how = "with its model config" + " and the --preset / --model.* options given (same shapes)" * bool(options)
    assert f"init: all weights from {tmp_path}/ck, {how}" in got["logs"]
    assert got["theta"] == (5e5 if options else ck.cfg.llm_config.rope_theta)


def whole_build(cfg, mcfg):
    """The reference for a stage's starting model from several sources: built whole and random on
    the host (seed, SAILVL, init_weights), the rule's fresh modules re-initialised beside modules
    from checkpoints, then every module from a file loaded over it; and the generator's state after."""
    sources = train_stage.init_sources(cfg)
    folders = sorted({s for s in sources.values() if s != "fresh"})
    whole = len(folders) == 1 and all(s == folders[0] for s in sources.values())
    torch.manual_seed(cfg.seed)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    for name, src in sources.items():
        if src == "fresh" and folders and not whole:
            modeling.reinit_module(getattr(model, name), cfg.seed + 1)
        elif src != "fresh":
            modeling.vit.load_state_dict_strict(getattr(model, name), modeling.checkpoint_tensors(src, model, name), name)
    if cfg.init_vit:
        modeling.vit.load_vit_weights(model.vision_model, cfg.init_vit)
    if cfg.init_llm:
        modeling.load_llm_weights(model.language_model, cfg.init_llm)
    return model, torch.get_rng_state()


def composed_sources(tmp_path, preset="tiny"):
    """Stage outputs lm0, vit1 and vit3, and two other checkpoints standing in for --init-llm / --init-vit folders
    (a SAIL-VL2 folder gives its LLM or its ViT), each of other random weights."""
    for i, name in enumerate(("lm0", "vit1", "vit3", "ck", "llm", "vit")):
        modeling.save_checkpoint(str(tmp_path / name), modeling.build_model(preset, seed=10 + i), {"stage": name}, 0, 1)


LM, VIT = "language_model", "vision_model"
COMPOSED = [("tiny", "vit2", ["--init_modules=mlp1:fresh"], {LM, VIT}),  # vit1's LLM and ViT, a fresh adapter
            ("tiny", "pretrain1", [], {LM, VIT}),                         # ViT from vit3, LLM from lm0, adapter fresh
            ("tiny", "vit1", ["--init-llm={d}/llm", "--init-vit={d}/vit"], {LM, VIT}),   # the replication's start
            ("tiny-moe", "pretrain1", ["--init-llm={d}/llm"], {LM, VIT}),  # ViT from vit3, an MoE LLM from Qwen3
            ("tiny", "sft1", ["--init-from={d}/ck", "--init-llm={d}/llm"], {LM, VIT, "mlp1"}),   # its LLM replaced
            ("tiny", "pretrain1", ["--init_modules=language_model:fresh",  # an untied LLM made, re-initialised
                                   "--model.llm_config.tie_word_embeddings=false"], {VIT}),
            ("tiny", "lm0", [], set())]                                   # all random


def counting_remade(monkeypatch) -> dict:
    """model.remade, counting the tensors it makes and the most alive at once (weak references)."""
    made, remade = {"names": [], "alive": 0, "most": 0}, modeling.remade

    def gone():
        made["alive"] -= 1

    def counting(t, name="a meta tensor"):
        out = remade(t, name)
        made["names"].append(name)
        made["alive"] += 1
        made["most"] = max(made["most"], made["alive"])
        weakref.finalize(out, gone)
        return out
    monkeypatch.setattr(modeling, "remade", counting)
    return made


@pytest.mark.parametrize("preset,stage,options,read", COMPOSED)
def test_a_stage_from_several_sources_is_the_whole_builds_model_without_making_the_read_modules(tmp_path, preset, stage,
                                                                                                options, read,
                                                                                                monkeypatch):
    """build_stage_model (one process) gives the model a whole random build with its modules loaded
    over it gives, bit for bit, and leaves the generator in the same state, while nothing is made
    whole: stage_start leaves the model on the meta device (its random draws made on scratch,
    model.HostDraws), and each tensor no file gives is made alone as it is filled (model.remade; a
    tied head once). Made for generation, its LLM's matrices held in bf16, it is the whole build's cast."""
    composed_sources(tmp_path, preset)
    cfg, mcfg = cfg_of(stage, f"--out_dir={tmp_path}", *[o.format(d=tmp_path) for o in options])
    want, rng = whole_build(cfg, train_stage.stage_model_config(cfg, mcfg))
    made = counting_remade(monkeypatch)
    model = train_stage.build_stage_model(cfg, mcfg, lambda *a: None)
    assert torch.equal(torch.get_rng_state(), rng)
    got, ref = model.state_dict(), want.state_dict()
    assert got.keys() == ref.keys() and [k for k in ref if not torch.equal(got[k], ref[k])] == []
    tied = mcfg.llm_config.tie_word_embeddings and LM not in read      # (the head is the embedding: made once)
    assert sorted(made["names"]) == sorted({k for k in ref if k.split(".")[0] not in read}
                                           - ({"language_model.lm_head.weight"} if tied else set()))
    assert made["most"] <= 1                                        # one at a time
    start, files = train_stage.stage_start(cfg, train_stage.stage_model_config(cfg, mcfg), lambda *a: None)
    assert set(files) == read
    # for generation (harvest, rl.py filter): made with its LLM's matrices in bf16, as for_generation holds them
    low = train_stage.build_stage_model(cfg, mcfg, lambda *a: None, matrices_dtype=torch.bfloat16).state_dict()
    modeling.hold_matrices_in(want.language_model, torch.bfloat16)
    ref = want.state_dict()
    assert low.keys() == ref.keys() and [k for k in ref if not (low[k].dtype == ref[k].dtype and torch.equal(low[k], ref[k]))] == []
    assert low["language_model.lm_head.weight"].dtype == torch.bfloat16


def test_host_draws_refuses_a_random_op_whose_draws_it_cannot_make_and_logs_name_what_is_read(tmp_path):
    """model.HostDraws replays uniform_ / normal_ fills of meta tensors; another random op that meets or
    makes one (torch.randn under the meta device) is refused, not skipped (its draws would go missing
    and every later module's values with them). A tensor whose last fill wrote only part of it is not
    made again (model.remade) from an earlier fill. A module --init-vit gives is not said to come from its
    rule's folder, which is never read (pretrain1 with --init-vit and no vit3)."""
    with torch.device("meta"), modeling.HostDraws(), pytest.raises(NotImplementedError, match="randn"):
        torch.randn(3)
    draws = modeling.HostDraws()
    with torch.device("meta"), draws:
        emb = torch.nn.Embedding(4, 2, padding_idx=0)               # drawn whole, then a row zeroed: a part
        norm, lin = torch.nn.LayerNorm(2), torch.nn.Linear(2, 2)
        lin.weight.data.mul_(2)                                     # written through aliases: reads itself,
        lin.bias.detach().zero_()                                   # or fills the whole
    for m in (emb, norm, lin):
        draws.keep_fills(m)
    for t in (emb.weight, lin.weight):                              # (not the earlier whole draw)
        with pytest.raises(RuntimeError, match="x.weight \\(.*no fill of the whole of it"):
            modeling.remade(t, "x.weight")
    assert torch.equal(modeling.remade(norm.weight), torch.ones(2)) and torch.equal(modeling.remade(norm.bias), torch.zeros(2))
    assert torch.equal(modeling.remade(lin.bias), torch.zeros(2))
    composed_sources(tmp_path)
    shutil.rmtree(tmp_path / "vit3")
    logs = []
    cfg, mcfg = cfg_of("pretrain1", f"--out_dir={tmp_path}", f"--init-vit={tmp_path}/vit")
    train_stage.build_stage_model(cfg, mcfg, logs.append)
    assert logs[:2] == ["init: mlp1 freshly initialised (random), as the stage starts it",
                        f"init: language_model from {tmp_path}/lm0"]
    assert len(logs) == 3 and logs[2].startswith(f"init: vision encoder from {tmp_path}/vit (")


SHARDED_COMPOSED = r"""
import os, sys, torch
sys.path.insert(0, os.environ["REPO"])
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
import model as modeling, train_stage, test_train_stage as helpers
rank, world, device = train_stage.setup_distributed()
import pytest
made = helpers.counting_remade(pytest.MonkeyPatch())       # which tensors a rank makes, and how many at once
cfg, mcfg = helpers.cfg_of(os.environ["STAGE"], *os.environ["OPTIONS"].split())
logs = []
model, _ = train_stage.place_model(cfg, mcfg, rank, world, device, logs.append)
sd = modeling.full_state_dict(model)
if rank == 0:
    torch.save({"sd": sd, "logs": logs, "made": made, "rng": torch.get_rng_state()}, os.environ["OUT"])
else:
    assert made["names"] == [], made                        # rank 1 makes no tensor and reads no file
train_stage.shutdown_distributed()
train_stage.exit_process()
"""


@pytest.mark.parametrize("preset,stage,options,says", [
    ("tiny-moe", "vit1", ["--init-llm={d}/llm", "--init-vit={d}/vit"], "init: language model from"),
    ("tiny", "pretrain1", [], "init: mlp1 freshly"),
    ("tiny", "lm0", [], "init: random weights"),                                                # all random
    ("tiny", "lm0", ["--model.llm_config.tie_word_embeddings=false"], "init: random weights")])
def test_two_ranks_start_a_stage_from_several_sources_with_rank_0_making_no_module_whole(tmp_path, preset, stage,
                                                                                          options, says):
    """A stage from several sources, or from random weights, under FSDP2 on 2 gloo processes
    (place_model): its gathered weights are the one-process build's, bit for bit, and so is rank 0's
    generator state after, while rank 0 makes no module whole: it scatters every tensor, read a
    tensor at a time from its files (of the replication's first stage, from Qwen3 and AIMv2 folders,
    an MoE LLM's experts stored one by one) or made alone (model.remade: the adapter, a random
    start's every tensor; at most two alive at once). It built the whole model in fp32 first (30b-a3b:
    125 GB of host memory)."""
    composed_sources(tmp_path, preset)
    options = [f"--out_dir={tmp_path}", *[o.format(d=tmp_path) for o in options]]
    cfg, mcfg = cfg_of(stage, *options)
    want, rng = whole_build(cfg, train_stage.stage_model_config(cfg, mcfg))
    want = want.state_dict()
    (tmp_path / "load.py").write_text(SHARDED_COMPOSED)
    res = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "load.py")],
              env_extra={"REPO": ROOT, "STAGE": stage, "OPTIONS": " ".join(options), "OUT": str(tmp_path / "out.pt")},
              timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["sd"].keys() == want.keys() and [k for k in want if not torch.equal(got["sd"][k], want[k])] == []
    assert torch.equal(got["rng"], rng)                                 # rank 0's generator as after the whole build
    files = {"vit1": {LM, VIT}, "pretrain1": {LM, VIT}, "lm0": set()}[stage]
    tied = mcfg.llm_config.tie_word_embeddings and LM not in files     # (the head is the embedding: made once)
    assert sorted(got["made"]["names"]) == sorted({k for k in want if k.split(".")[0] not in files}
                                                  - ({"language_model.lm_head.weight"} if tied else set()))
    assert got["made"]["most"] <= 2                                     # (the one being sent, the last one sent)
    assert any(ln.startswith(says) for ln in got["logs"])


@pytest.mark.parametrize("failure", ["missing", "other", "unmade"])
def test_a_checkpoint_missing_a_tensor_stops_both_ranks_with_one_error(tmp_path, failure):
    """Rank 0 alone reads the files: a tensor missing there is its error on every rank, not a
    rank 1 left waiting for a tensor that never comes; so is any other failure of rank 0's read
    (rank 0 keeps its own traceback, rank 1 is told what it was), and a tensor to be made that
    cannot be (checked before any is sent)."""
    from safetensors.torch import save_file
    modeling.save_checkpoint(str(tmp_path / "ck"), modeling.build_model("tiny", seed=3), {"stage": "sft4"}, 0, 1)
    if failure == "missing":
        sd = load_file(str(tmp_path / "ck" / "model.safetensors"))
        del sd["mlp1.1.weight"]
        save_file(sd, str(tmp_path / "ck" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "load.py").write_text(SHARDED_LOAD)
    res = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "load.py")],
              env_extra={"REPO": ROOT, "CK": str(tmp_path / "ck"), "OUT_DIR": str(tmp_path / "out"),
                         "OUT": str(tmp_path / "out.pt"),
                         "FAIL": {"missing": "", "other": "boom", "unmade": "unmade"}[failure]}, timeout=240)
    assert res.returncode != 0
    if failure == "missing":
        assert res.stderr.count("1 missing keys, e.g. ['mlp1.1.weight']") >= 2, res.stderr[-3000:]   # on both ranks
    elif failure == "unmade":
        says = "mlp1.1.weight (128, 384): no fill of the whole of it to make again (HostDraws)"
        assert f"[rank0]: RuntimeError: {says}" in res.stderr, res.stderr[-3000:]
        assert f"[rank1]: data.InputError: rank 0 failed reading {tmp_path}/ck: RuntimeError: {says}" in res.stderr, \
            res.stderr[-3000:]
    else:
        assert "[rank0]: KeyError: 'boom'" in res.stderr, res.stderr[-3000:]
        assert f"[rank1]: data.InputError: rank 0 failed reading {tmp_path}/ck: KeyError: 'boom'" in res.stderr, \
            res.stderr[-3000:]


@pytest.mark.parametrize("rank1", ["images", "text"])
def test_two_ranks_with_uneven_packs_give_the_one_process_step(synth, tmp_path, rank1):
    """2 gloo processes under FSDP2, each with 2 packs of different sizes, take the same step
    (loss and updated weights, SGD lr 1 = minus the gradient) as 1 process with all 4 packs. With
    rank 1's packs text only, that rank still runs the ViT's gathers (on a blank tile whose
    features count 0 times): without it the ranks' collectives diverge and the step hangs."""
    samples, mcfg = fixed_samples(synth)
    packs = packs_of(samples, 300)
    assert len(packs) >= 4
    if rank1 == "text":
        packs = packs[:2] + packs_of([s for s in samples if s.get("pixel_values") is None], 300)
        assert all(p.get("pixel_values") is None for p in packs[2:]) and packs[0]["pixel_values"] is not None
    four = [s for p in packs[:4] for s in samples_of([p], samples)]
    torch.manual_seed(0)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    ref = train_stage.train_step(model, opt, packs[:4], params, 1e9, 1, CPU, NOCAST)
    (tmp_path / "step.py").write_text(FSDP_STEP)
    res = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "step.py")],
              env_extra={"REPO": ROOT, "SYNTH": synth, "OUT": str(tmp_path / "out.pt"), "RANK1": rank1}, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert len(set(got["tokens"][:2])) + len(set(got["tokens"][2:])) >= 2 and sum(got["tokens"][:2]) != sum(got["tokens"][2:])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    want = model.state_dict()
    assert max((got["sd"][k] - want[k]).abs().max().item() for k in want) < 1e-5
    assert len(four) == sum(len(p["sample_ids"]) for p in packs[:4])


# ----------------------------------------------------------------------------------------------
# the MoE path of the trainer, AdaLRS in the loop, warm-up and clipping

def test_moe_step_applies_the_aux_coefficient_once(synth):
    samples, _ = fixed_samples(synth, n=8)
    mcfg = modeling.preset_config("tiny-moe")
    mcfg.llm_config.router_aux_loss_coef = 0.5                          # large, so a double count shows
    torch.manual_seed(0)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    params = list(model.parameters())
    packs = packs_of(samples, 400)
    assert len(packs) >= 2
    # reference: CE global token mean + coef x mean over micro-batches of each pack's aux loss
    ce, n, aux = 0.0, 0, 0.0
    for p in packs:
        out = model(p["input_ids"], p["pixel_values"], labels=p["labels"], position_ids=p["position_ids"],
                    cu_seqlens=p["cu_seqlens"])
        ce, n, aux = ce + out.ce_sum, n + int(out.n_targets), aux + out.aux_loss / len(packs)
    ref = ce / n + 0.5 * aux
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    opt = Recorder(params)
    res = train_stage.train_step(model, opt, packs, params, 1e9, 1, CPU, NOCAST)
    assert res["loss"] == pytest.approx(float(ce.detach() / n), rel=1e-5)   # the logged loss is the CE
    assert res["moe_aux"] == pytest.approx(float(aux.detach()), rel=1e-5) and 0 < res["moe_entropy"] <= math.log(8)
    gate = [i for i, (k, _) in enumerate(model.named_parameters()) if k.endswith("mlp.gate.weight")]
    for i in gate:
        torch.testing.assert_close(opt.seen[i], ref_grads[i], rtol=1e-4, atol=1e-7)


def test_moe_stage_logs_expert_entropy(synth, tmp_path):
    out = train_stage.run_stage("vit3", [f"--data_dir={synth}", f"--out_dir={tmp_path}", "--preset=tiny-moe", "--steps=2",
                               "--init-from=random", "--eval_every=0", "--save_every=0", "--packing.max_tokens=384"])
    recs = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    assert len(recs) == 2 and all(0 < r["moe_entropy"] <= math.log(8) and r["moe_aux"] > 0 for r in recs)


def test_loop_applies_the_adalrs_scale_and_the_warm_up(synth, tmp_path, monkeypatch):
    scales = [1.0]                                  # the scale AdaLRS leaves after each observed step
    observe = train_stage.AdaLRS.observe

    def recording(self, loss):
        observe(self, loss)
        scales.append(self.lr_scale)
    monkeypatch.setattr(train_stage.AdaLRS, "observe", recording)
    out = train_stage.run_stage("pretrain1", [f"--data_dir={synth}", f"--out_dir={tmp_path}", "--init-from=random",
                                    "--steps=24", "--warmup_steps=4", "--adalrs_cfg.window=3", "--adalrs_cfg.start=0",
                                    "--adalrs_cfg.end=1", "--eval_every=0", "--save_every=0",
                                    "--packing.max_tokens=384", "--lr=1e-3"])
    assert len(set(scales)) > 1, "the search never moved the LR"
    recs = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 25))
    # by hand: linear warm-up over 4 steps, then cosine from 1e-3 to 1e-4 over the remaining 20
    mult = [(s + 1) / 4 if s < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 20)) for s in range(24)]
    for r in recs:                                  # step s trains at the scale left after step s - 1
        assert r["lr"] == pytest.approx(1e-3 * mult[r["step"] - 1] * scales[r["step"] - 1], rel=1e-9), r
    assert mult[:4] == [0.25, 0.5, 0.75, 1.0]


def test_the_loop_feeds_a_skipped_step_to_adalrs_and_reports_bad_held_out_samples(synth, tmp_path, monkeypatch,
                                                                                  capsys):
    """A step skipped for a non-finite loss still reaches AdaLRS (in a trial that is a rejection:
    the weights rolled back, the LR lowered; its step count stays the trainer's). The held-out
    stream is read at every evaluation: its bad samples are reported with file and line at the
    first read (not silently skipped), once."""
    seen, real_step, calls = [], train_stage.train_step, []
    monkeypatch.setattr(train_stage.AdaLRS, "observe", lambda self, loss: seen.append(loss))

    def nan_at_3(*a, **k):
        calls.append(1)
        res = real_step(*a, **k)
        return dict(res, loss=float("nan"), skipped=True) if len(calls) == 3 else res
    monkeypatch.setattr(train_stage, "train_step", nan_at_3)
    recs = [json.loads(ln) for ln in open(os.path.join(synth, "ocr", "eval.jsonl")).read().splitlines()[:30]]
    lines = [json.dumps(dict(r, image=os.path.join(synth, "ocr", r["image"]))) for r in recs]
    (tmp_path / "held.jsonl").write_text("\n".join(lines[:5] + ["{not json"] + lines[5:]) + "\n")
    train_stage.run_stage("pretrain1", [f"--data_dir={synth}", f"--out_dir={tmp_path}", "--init-from=random",
                                        "--steps=5", "--eval_every=2", "--eval_packs=1", "--save_every=0",
                                        "--packing.max_tokens=512", f"--eval_manifests={tmp_path / 'held.jsonl'}"])
    assert len(seen) == 5 and math.isnan(seen[2]) and all(math.isfinite(x) for x in seen[:2] + seen[3:])
    reported = [ln for ln in capsys.readouterr().err.splitlines() if "skipping bad sample" in ln]
    assert len(reported) == 1 and "held.jsonl:6" in reported[0]


def test_gradient_clipping_bounds_the_update(synth):
    samples, mcfg = fixed_samples(synth, n=4)
    torch.manual_seed(0)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    params = list(model.parameters())
    _, grads = reference_loss_and_grads(model, samples)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    opt = Recorder(params)
    res = train_stage.train_step(model, opt, packs_of(samples, 4096), params, 0.1 * norm, 1, CPU, NOCAST)
    assert res["grad_norm"] == pytest.approx(norm, rel=1e-4)          # the norm before clipping, logged
    clipped = torch.sqrt(sum((g ** 2).sum() for g in opt.seen)).item()
    assert clipped == pytest.approx(0.1 * norm, rel=1e-4)
    torch.testing.assert_close(opt.seen[0], grads[0] * 0.1, rtol=1e-3, atol=1e-8)


def test_a_non_finite_loss_skips_the_update(synth):
    samples, mcfg = fixed_samples(synth, n=4)
    torch.manual_seed(0)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    with torch.no_grad():
        model.mlp1[1].weight[0, 0] = float("nan")
    params = list(model.parameters())
    before = params_of(model)
    res = train_stage.train_step(model, torch.optim.SGD(params, lr=1.0), packs_of(samples, 4096), params, 1.0, 1, CPU, NOCAST)
    assert res["skipped"] and not math.isfinite(res["loss"])
    after = params_of(model)
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def test_a_micro_batch_whose_samples_all_failed_to_decode_still_steps(synth):
    """A rank's micro-batch whose samples all failed to decode is PackDecoder's one-token empty
    pack: it adds a loss of 0 with zero gradients (backward still runs, as every rank must), and
    the step equals the one of the real pack alone."""
    samples, mcfg = fixed_samples(synth, n=4)
    grads = []
    for packs in (packs_of(samples, 4096), packs_of(samples, 4096) + [packing.empty_pack()]):
        torch.manual_seed(0)
        model = modeling.SAILVL(mcfg)
        model.init_weights()
        params = list(model.parameters())
        opt = Recorder(params)
        res = train_stage.train_step(model, opt, packs, params, 1.0, 1, CPU, NOCAST)
        assert not res["skipped"]
        grads.append(opt.seen)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# data -> packing: exact resume on every rank, disjoint rank splits

def batches(synth, rank, world, mix_stage="sft4", workers=0):
    cfg, mcfg = cfg_of(mix_stage, f"--data_dir={synth}", "--packing.max_tokens=1024", "--packing.micro_batches=2",
                       f"--num_workers={workers}")
    return train_stage.build_batches(cfg, mcfg, data.load_tokenizer(None), "train", rank, world, verbose=False)


def assert_same_packs(got_steps, want_steps):
    for got, want in zip(got_steps, want_steps, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g["sample_ids"] == w["sample_ids"]
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(g[key], w[key])
            assert (g["pixel_values"] is None) == (w["pixel_values"] is None)
            if g["pixel_values"] is not None:                          # video frames (training jitter) too
                assert torch.equal(g["pixel_values"], w["pixel_values"])


@pytest.mark.parametrize("workers", [(0, 0, 0), (0, 2, 1)])
def test_batches_resume_bit_for_bit_on_every_rank(synth, workers):
    """6 steps in one go equal 3 steps, a state saved (as meta.json holds it), 3 steps after loading
    it; also when the three runs decode with 0, 2 and 1 loader workers (2 read 4 packs ahead), and
    the saved state (position, sample counts) is the same whatever was read ahead."""
    for rank in range(2):
        a = batches(synth, rank, 2, workers=workers[0])
        ref = [a.next() for _ in range(3)]
        ref_state = json.loads(json.dumps(a.state_dict()))
        ref += [a.next() for _ in range(3)]
        b = batches(synth, rank, 2, workers=workers[1])
        head = [b.next() for _ in range(3)]
        state = json.loads(json.dumps(b.state_dict()))
        assert state == ref_state
        c = batches(synth, rank, 2, workers=workers[2])
        c.load_state_dict(state)
        tail = [c.next() for _ in range(3)]
        assert len(ref[0]) == 2
        assert_same_packs(head + tail, ref)


@pytest.mark.parametrize("workers, max_tokens", [(0, 600), (2, 350)])     # 177-token samples: 2 or 1 a pack
def test_an_image_truncated_after_its_header_is_dropped_by_its_rank_and_counted_once(tmp_path, capsys, workers,
                                                                                     max_tokens):
    """The salted manifest (tests/test_data.py) through StageBatches: plans come from headers, so
    the truncated PNG (its header reads) is planned and fails when decoded. It is dropped from its
    pack (a pack left empty becomes one padding token), reported once with file and line and
    counted once however often it is visited, and every count equals the decode-everything scan's;
    the loss normaliser, counted on the collated packs, covers exactly the samples trained."""
    from test_data import salted_manifest
    path, expected = salted_manifest(tmp_path)
    tok, dcfg = data.load_tokenizer(None), data.DataConfig(image_size=112, max_len=300, max_bad_fraction=1.0)
    mixture = data.Mixture([path], tok, dcfg, seed=3)
    pcfg = packing.PackingConfig(max_tokens=max_tokens, micro_batches=2, buffer_size=3, max_wait=4)
    b = train_stage.StageBatches(mixture, pcfg, 0, 1, 64, num_workers=workers)
    truncated = next(i for i, line in enumerate(path.read_text().split("\n")) if "trunc.png" in line) + 1
    dropped_at, empty, trained = [], 0, set()
    while b.state_dict()["data"]["epoch"] < 3:                       # three passes over the manifest
        packs = b.next()
        planned = [m.index for j in b.loader.groups[0] for m in b.loader.plans[j]]
        got = [k for p in packs for k in p["sample_ids"]]
        assert got == [k for k in planned if k not in {k for k, _ in b.loader.dropped}]
        dropped_at += [k for k, _ in b.loader.dropped]
        empty += sum(p["sample_ids"] == [] for p in packs)
        trained |= {s for p in packs for s in p["sources"]}
        want = sum(int((mixture.load(k)["labels"][1:] != -100).sum()) for k in got)
        assert train_stage.global_targets(packs, CPU) == want
    assert len(dropped_at) >= 2 and empty == (len(dropped_at) if max_tokens < 2 * 177 else 0)   # visited in 2+ passes
    assert all(mixture.sample_index(k) == mixture.sample_index(dropped_at[0]) for k in dropped_at)
    assert dict(mixture.bad.counts) == expected and mixture.bad.seen == 12 + sum(expected.values())
    assert trained == {f"{path.resolve()}:{n}" for n, line in enumerate(path.read_text().split("\n"), 1)
                       if "red." in line and n != truncated and "missing" not in line and "LLLL" not in line
                       and "<image><image>" not in line and "<IMG_CONTEXT>" not in line}
    reported = [ln for ln in capsys.readouterr().err.splitlines() if "skipping bad sample" in ln]
    assert len(reported) == sum(expected.values()) == len(set(reported))
    assert [ln for ln in reported if "(image)" in ln] == [ln for ln in reported if f"m.jsonl:{truncated}:" in ln]


def write_salted(synth, folder):
    """A small manifest (salted.jsonl) with two PNGs truncated after their header, which only
    decoding finds. Written once, before the ranks start: ranks that each rewrote it could read it
    while the other had just truncated it (the likely cause of a rank 0 failure in a clean-clone CI
    run on 2026-12-05, whose error the log had cut)."""
    good = json.loads(open(os.path.join(synth, "count", "train.jsonl")).readline())
    img = os.path.join(synth, "count", good["image"])
    for name in ("cut1.png", "cut2.png"):
        with open(img, "rb") as f, open(os.path.join(folder, name), "wb") as g:
            g.write(f.read()[:100])
    lines = [dict(good, image=img)] * 6 + [dict(good, image=os.path.join(folder, n)) for n in ("cut1.png", "cut2.png")]
    with open(os.path.join(folder, "salted.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)


def salted_stream(synth, folder):
    """sft4's video and counting samples plus write_salted's manifest (the tiny model's data
    geometry, 4 frames per video, so the frames drawn depend on the stream position's generator)."""
    sources = [(os.path.join(synth, "video", "train.jsonl"), 1.0), (os.path.join(synth, "count", "train.jsonl"), 1.0),
               (os.path.join(folder, "salted.jsonl"), 0.1)]
    dcfg = data.DataConfig.from_model(modeling.preset_config("tiny"), max_len=1024, max_bad_fraction=1.0,
                                      num_frames=4)          # 4 of 16 frames: training picks one of 4 per segment
    return data.Mixture(sources, data.load_tokenizer(None), dcfg, seed=4, verbose=False)


TWO_RANK_DATA = r"""
import os, sys, torch
sys.path.insert(0, os.environ["REPO"])
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
import data, packing, train_stage, test_train_stage
rank, world, device = train_stage.setup_distributed()
load = data.Mixture.load
def counted(self, k, decode=True):                         # every decode, in whichever worker process
    if decode:
        with open(os.path.join(os.environ["OUT"], f"decoded{rank}.txt"), "a") as f:
            f.write(f"{k}\n")
    return load(self, k, decode)
data.Mixture.load = counted
mixture = test_train_stage.salted_stream(os.environ["SYNTH"], os.environ["OUT"])
b = train_stage.StageBatches(mixture, packing.PackingConfig(max_tokens=1024, micro_batches=2, buffer_size=16),
                            rank, world, 64, num_workers=1)
steps = [b.next() for _ in range(int(os.environ["STEPS"]))]
ahead = [m.index for st in b.loader.planner.pending.values() for j in st["groups"][rank] for m in st["plans"][j]]
torch.save({"steps": steps, "ahead": ahead, "bad": dict(mixture.bad.counts), "seen": mixture.bad.seen},
           os.path.join(os.environ["OUT"], f"rank{rank}.pt"))
train_stage.shutdown_distributed()
train_stage.exit_process()
"""


def test_two_ranks_decode_only_their_own_samples_and_equal_the_one_process_split(synth, tmp_path):
    """2 gloo processes, each decoding in a loader worker: every sample of a step's packs is decoded
    on exactly one rank, the rank whose packs hold it (besides what its worker read ahead for later
    steps), none twice; each rank's packs equal the 1-process plan of the same stream split for 2
    ranks; a truncated image dropped on one rank is counted on both."""
    steps = 4
    write_salted(synth, tmp_path)
    (tmp_path / "step.py").write_text(TWO_RANK_DATA)
    res = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "step.py")],
              env_extra={"REPO": ROOT, "SYNTH": synth, "OUT": str(tmp_path), "STEPS": str(steps)})
    assert res.returncode == 0, res.stderr[:4000] + "\n...\n" + res.stderr[-2000:]     # the first rank's error first
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    decoded = [[int(x) for x in (tmp_path / f"decoded{r}.txt").read_text().split()] for r in range(2)]
    planner = packing.PackPlanner(salted_stream(synth, tmp_path), packing.PackingConfig(
        max_tokens=1024, micro_batches=2, buffer_size=16), 0, 2, 64)
    decoder = packing.PackDecoder(planner.stream.load, (data.DataError,), planner.packer.cfg.max_tokens)
    planned, dropped_by = [[], []], {}
    for step in range(1, steps + 1):
        planner.plan_step()
        plan = planner.pending[step]
        for r in range(2):
            want = [decoder[(step, plan["plans"][j])] for j in plan["groups"][r]]
            assert_same_packs([got[r]["steps"][step - 1]], [want])
            planned[r] += [m.index for j in plan["groups"][r] for m in plan["plans"][j]]
            for p in want:
                for k, _ in p["dropped"]:
                    dropped_by.setdefault(planner.stream.sample_index(k), set()).add(r)
    for r in range(2):
        assert len(decoded[r]) == len(set(decoded[r]))                      # none decoded twice
        assert decoded[r][:len(planned[r])] == planned[r]                    # its own, in order
        assert set(decoded[r][len(planned[r]):]) <= set(got[r]["ahead"])     # then only its next steps' samples
    assert not set(planned[0]) & set(decoded[1]) and not set(planned[1]) & set(decoded[0])
    assert any(len(ranks) == 1 for ranks in dropped_by.values())           # a bad image only one rank decoded
    assert got[0]["bad"] == got[1]["bad"] == {"image": len(dropped_by)} and got[0]["seen"] == got[1]["seen"]


def test_ranks_split_each_step_disjointly_and_miss_no_sample(synth):
    ranks = [batches(synth, r, 2) for r in range(2)]
    seen = []
    for _ in range(5):
        steps = [b.next() for b in ranks]
        ids = [{i for p in s for i in p["sample_ids"]} for s in steps]
        assert not ids[0] & ids[1] and all(len(s) == 2 for s in steps)
        seen += sorted(ids[0] | ids[1])
    assert len(seen) == len(set(seen))
    # every stream position up to the last packed one was trained once, except those still buffered
    buffered = {m.index for _, _, _, m in ranks[0].loader.planner.packer.buffer}
    assert set(range(max(seen) + 1)) - set(seen) <= buffered


# ----------------------------------------------------------------------------------------------
# checkpoints: one writer, one reader, atomic folders, RNG in the per-rank file

def test_rng_state_round_trips_through_the_rank_file(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    torch.rand(3), random.random(), np.random.rand()
    m = modeling.build_model("tiny", seed=0)
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 1, rank_state={"rng": modeling.rng_state()},
                      opt=torch.optim.AdamW(m.parameters()))
    want = (torch.rand(4), random.random(), np.random.rand(3))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    modeling.set_rng_state(torch.load(tmp_path / "ck" / "rank0.pt", weights_only=True)["rng"])
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])
    meta = modeling.verify_checkpoint(str(tmp_path / "ck"), resumable=True)
    shards = [n for n in meta["files"] if n.startswith("state/")]
    assert set(meta["files"]) == {"config.json", "rank0.pt", *shards} and len(shards) == 1


def test_an_unwritable_folder_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = modeling.build_model("tiny", seed=0)
    modeling.save_checkpoint(str(tmp_path / "out" / "ck"), m, {"stage": "x"}, 0, 1)
    first = modeling.verify_checkpoint(str(tmp_path / "out" / "ck"))
    os.chmod(tmp_path / "out", 0o500)                       # no writes into the parent any more
    try:
        if os.access(tmp_path / "out", os.W_OK):            # root writes anyway: the OS's answer to others
            def refuse(*args, dir=None, **kwargs):
                raise PermissionError(13, "Permission denied", dir)
            monkeypatch.setattr(modeling.tempfile, "mkdtemp", refuse)
        with pytest.raises(modeling.CheckpointError, match="cannot write checkpoint"):
            modeling.save_checkpoint(str(tmp_path / "out" / "ck"), modeling.build_model("tiny", seed=1), {"stage": "y"}, 0, 1)
    finally:
        os.chmod(tmp_path / "out", 0o700)
    assert modeling.verify_checkpoint(str(tmp_path / "out" / "ck")) == first


def test_a_full_disk_at_save_time_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = modeling.build_model("tiny", seed=0)
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x"}, 0, 1)
    first = modeling.verify_checkpoint(str(tmp_path / "ck"))

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(modeling, "write_weights", full_disk)
    with pytest.raises(modeling.CheckpointError, match="No space left on device"):
        modeling.save_checkpoint(str(tmp_path / "ck"), modeling.build_model("tiny", seed=1), {"stage": "y"}, 0, 1)
    assert modeling.verify_checkpoint(str(tmp_path / "ck")) == first
    assert not [p for p in os.listdir(tmp_path) if p != "ck"]           # no staging folder left behind


def _one_rank_fails_to_save(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = modeling.build_model("tiny", seed=0)
    if rank == 1:                                       # only rank 1's disk is full when it writes its rank file
        def full(*a, **k):
            raise OSError(28, "No space left on device")
        torch.save = full
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    try:
        modeling.save_checkpoint(os.path.join(out_dir, "ck"), m, {"stage": "x"}, rank, world, {}, opt=opt)
    except modeling.CheckpointError as e:
        open(os.path.join(out_dir, f"error{rank}"), "w").write(str(e))
    train_stage.shutdown_distributed()
    train_stage.exit_process()                  # as the command lines end


def test_a_write_that_fails_on_one_rank_fails_on_every_rank_without_a_hang(tmp_path):
    """Rank 1 alone cannot write: every rank raises the one CheckpointError (rank 0 would otherwise
    wait in the next collective for a rank that left), and nothing half-written is left."""
    import torch.multiprocessing as mp
    mp.spawn(_one_rank_fails_to_save, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    errors = [open(tmp_path / f"error{r}").read() for r in range(2)]
    assert errors[0] == errors[1] and "No space left on device (rank 1)" in errors[0]
    assert not os.path.exists(tmp_path / "ck") and not os.path.exists(tmp_path / "ck.staging")


def _ranks_on_their_own_disks(rank, world, init_file, base):
    import torch.distributed as dist
    os.chdir(os.path.join(base, f"node{rank}"))       # a relative --out_dir: each "node" its own disk
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = modeling.build_model("tiny", seed=0)
    try:
        modeling.save_checkpoint("out/ck", m, {"stage": "x"}, rank, world, {}, opt=torch.optim.SGD(m.parameters(), lr=0.1))
    except modeling.CheckpointError as e:
        open(os.path.join(base, f"error{rank}"), "w").write(str(e))
    train_stage.shutdown_distributed()
    train_stage.exit_process()


def test_a_step_checkpoint_on_node_local_disks_is_one_clear_error(tmp_path):
    """Ranks on nodes that do not share the output folder: each wrote its shards into a folder of its
    own node (torch.distributed.checkpoint makes it), and rank 0 renamed a checkpoint without them,
    which every resume then refused. Now every rank first looks for rank 0's staging folder."""
    import torch.multiprocessing as mp
    for r in range(2):
        os.makedirs(tmp_path / f"node{r}")
    mp.spawn(_ranks_on_their_own_disks, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    errors = [open(tmp_path / f"error{r}").read() for r in range(2)]
    assert errors[0] == errors[1] and "a file system every node shares (rank 1)" in errors[0]
    assert not os.path.exists(tmp_path / "node0" / "out" / "ck") and os.listdir(tmp_path / "node0" / "out") == []
    assert not os.path.exists(tmp_path / "node1" / "out")                      # rank 1 wrote nothing


def test_a_full_disk_while_shards_are_written_keeps_the_previous_step_checkpoint(tmp_path, monkeypatch):
    m = modeling.build_model("tiny", seed=0)
    opt = torch.optim.AdamW(m.parameters())
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 1, {}, opt=opt)
    first = modeling.verify_checkpoint(str(tmp_path / "ck"), resumable=True)

    def full_disk(path, *a, **k):                                       # a shard half written, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(modeling, "write_safetensors", full_disk)
    with pytest.raises(modeling.CheckpointError, match="cannot write checkpoint .*No space left on device"):
        modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 2}, 0, 1, {}, opt=opt)
    assert modeling.verify_checkpoint(str(tmp_path / "ck"), resumable=True) == first
    assert os.listdir(tmp_path) == ["ck"]                                # no staging folder left behind


def test_write_safetensors_gives_what_the_safetensors_library_reads(tmp_path):
    """model.write_safetensors (the step checkpoint's shard writer) against the safetensors library:
    every dtype a checkpoint holds, a transposed (non-contiguous) tensor, a 0-dim one and an empty
    one read back equal, with the metadata, the header padded to a multiple of 8."""
    from safetensors import safe_open
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(5, 3, generator=g).T, "bf": torch.randn(7, generator=g).bfloat16(),
               "step": torch.tensor(3.0), "ids": torch.arange(6).view(2, 3), "flags": torch.tensor([True, False]),
               "half": torch.randn(2, 2, generator=g).half(), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "x.safetensors")
    modeling.write_safetensors(path, [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()],
                               {"format": "pt", "note": "ok"})
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt", "note": "ok"}
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k
    with open(path, "rb") as f:
        assert int.from_bytes(f.read(8), "little") % 8 == 0
    with pytest.raises(modeling.CheckpointError, match="planned"):            # a plan that does not match its data
        modeling.write_safetensors(path, [("w", torch.float32, (3, 3), lambda: tensors["w"])], {})
    with pytest.raises(modeling.CheckpointError, match="planned twice"):
        modeling.write_safetensors(path, [("w", torch.float32, (3, 5), lambda: tensors["w"])] * 2, {})


def test_step_checkpoint_shards_hold_no_file_sized_buffer_and_load_back_exactly(tmp_path):
    """A step checkpoint's shard is written one tensor at a time: Python's heap peaks far below the
    shard's size (torch.distributed.checkpoint's own safetensors writer builds the file as one bytes
    object, the shard's size: on a GPU, after a host copy of every tensor, twice the rank's share of
    weights and Adam state in host memory). Weights and optimizer state load back exactly."""
    import tracemalloc
    m = modeling.build_model("tiny", seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 300, (1, 16)), labels=torch.randint(0, 300, (1, 16))).ce_sum.backward()
    opt.step()
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 1, {}, opt=opt)  # imports
    tracemalloc.start()
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 1, {}, opt=opt)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    shard = sum(os.path.getsize(p) for p in glob.glob(str(tmp_path / "ck/state/*.safetensors")))
    # weights + two Adam moments, fp32: 12.6 MB; the peak 2.2 MB (hashing's reads, meta), 13.4 MB before
    assert shard > 10e6 and peak < shard / 3, (peak, shard)
    m2 = modeling.build_model("tiny", seed=1)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    modeling.load_checkpoint(str(tmp_path / "ck"), m2, opt2, 0, 1)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_minus_9_then_resume_is_bit_identical(synth, tmp_path):
    """sft4: video in the data (training-time frame jitter) and AdamW state, killed mid-run. The
    reference decodes in the trainer, the killed run in 2 loader workers (reading ahead of the
    checkpoint it is killed after), the resumed run in 1."""
    args = ["train_stage.py", "--stage", "sft4", f"--data_dir={synth}", "--steps=6", "--save_every=2",
            "--packing.max_tokens=1024", "--eval_every=0", "--warmup_steps=1", "--keep_checkpoints=5",
            "--init-from=random"]
    ref = run([*args, f"--out_dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.Popen([sys.executable, *args, f"--out_dir={tmp_path}/crash", "--num_workers=2"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = f"{tmp_path}/crash/sft4.run/step-000004"
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(ck, "meta.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(ck), "the run ended before its step-4 checkpoint"
    assert not os.path.exists(f"{tmp_path}/crash/sft4"), "killed too late to test resume"
    res = run([*args, f"--out_dir={tmp_path}/crash", "--resume", "--num_workers=1"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: continuing from" in res.stdout
    wa = load_file(f"{tmp_path}/ref/sft4/model.safetensors")
    wb = load_file(f"{tmp_path}/crash/sft4/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses_of(f"{tmp_path}/ref/sft4") == losses_of(f"{tmp_path}/crash/sft4")


def test_truncated_checkpoint_is_refused_and_previous_kept(synth, tmp_path):
    args = ["train_stage.py", "--stage", "lm0", f"--data_dir={synth}", "--steps=5", "--save_every=2",
            "--packing.max_tokens=256", "--eval_every=0", "--keep_checkpoints=3", f"--out_dir={tmp_path}"]
    res = run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    good, bad = f"{tmp_path}/lm0.run/step-000002", f"{tmp_path}/lm0.run/step-000004"
    path = next(os.path.join(bad, n) for n in modeling.verify_checkpoint(bad)["files"] if n.startswith("state/"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(modeling.CheckpointError, match="corrupted"):
        modeling.verify_checkpoint(bad)
    modeling.verify_checkpoint(good)
    assert modeling.find_resume_checkpoint(f"{tmp_path}/lm0.run", lambda *a: None) == good
    res = run([*args, f"--resume={bad}"])
    assert res.returncode == 1 and "corrupted" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    os.remove(os.path.join(good, "rank0.pt"))                           # a partial folder: refused too
    with pytest.raises(modeling.CheckpointError, match="incomplete"):
        modeling.verify_checkpoint(good)
    with pytest.raises(modeling.CheckpointError, match="not a resumable"):
        modeling.verify_checkpoint(f"{tmp_path}/lm0", resumable=True)          # a stage output has no optimizer


def test_a_fresh_start_removes_an_earlier_runs_checkpoints(synth, tmp_path):
    """An earlier, longer run's step checkpoints in the same run folder would outrank this run's
    (pruned as soon as written) and a --resume would continue the other run: a fresh start removes them."""
    args = ["--init-from=random", f"--data_dir={synth}", f"--out_dir={tmp_path}", "--packing.max_tokens=256",
            "--eval_every=0", "--keep_checkpoints=2"]
    train_stage.run_stage("lm0", [*args, "--steps=7", "--save_every=3"])          # leaves step-3, step-6
    train_stage.run_stage("lm0", [*args, "--steps=5", "--save_every=2", "--lr=0.002"])  # a fresh run: step-2, step-4
    kept = modeling.step_checkpoints(f"{tmp_path}/lm0.run")
    assert [os.path.basename(p) for p in kept] == ["step-000002", "step-000004"]
    assert all(modeling.verify_checkpoint(p)["config"]["lr"] == 0.002 for p in kept)
    assert modeling.find_resume_checkpoint(f"{tmp_path}/lm0.run", lambda *a: None) == kept[-1]


def test_a_resume_from_an_earlier_checkpoint_removes_the_abandoned_runs_later_ones(synth, tmp_path):
    """--resume=<step-2> of a run that saved steps 2, 4 and 6: its steps 4 and 6 are another history.
    Kept, they outranked the resumed run's own step-3 (pruned as soon as written, with
    --keep_checkpoints=1) and a bare --resume would have continued the abandoned run."""
    args = ["--init-from=random", f"--data_dir={synth}", f"--out_dir={tmp_path}", "--packing.max_tokens=256",
            "--eval_every=0"]
    train_stage.run_stage("lm0", [*args, "--steps=6", "--save_every=2", "--keep_checkpoints=3"])
    run = f"{tmp_path}/lm0.run"
    shutil.copytree(f"{run}/step-000004", f"{run}/step-000008.staging")    # as a kill -9 mid-save leaves it
    train_stage.run_stage("lm0", [*args, "--steps=5", "--save_every=3", "--keep_checkpoints=1"],
                          resume=f"{run}/step-000002")
    assert [d for d in os.listdir(run) if d.startswith("step-")] == ["step-000003"]   # the half-written one too
    assert modeling.find_resume_checkpoint(run, lambda *a: None) == f"{run}/step-000003"


def test_step_checkpoints_are_ordered_by_step_past_six_digits(tmp_path):
    for n in (999_998, 1_000_000, 999_999):
        os.makedirs(tmp_path / f"step-{n:06d}")
    modeling.prune_checkpoints(str(tmp_path), 2, 1_000_000)
    assert sorted(os.listdir(tmp_path)) == ["step-1000000", "step-999999"]


def test_the_non_finite_steps_in_a_row_survive_a_resume(synth, tmp_path, monkeypatch):
    """--max_bad_steps counts skipped steps in a row across a resume: a run whose steps 3, 4, 5, ...
    are non-finite stops at step 5, resumed from its step-4 checkpoint or not."""
    real_step, calls = train_stage.train_step, []

    def nan_from(first):
        def step(*a, **k):
            calls.append(1)
            res = real_step(*a, **k)
            return dict(res, loss=float("nan"), skipped=True) if len(calls) >= first else res
        return step
    args = ["--init-from=random", f"--data_dir={synth}", f"--out_dir={tmp_path}", "--packing.max_tokens=256",
            "--eval_every=0", "--save_every=1", "--keep_checkpoints=10", "--steps=10"]
    monkeypatch.setattr(train_stage, "train_step", nan_from(3))
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 5"):
        train_stage.run_stage("lm0", args)
    calls.clear()
    monkeypatch.setattr(train_stage, "train_step", nan_from(1))                    # steps 5, 6, ... non-finite
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 5"):
        train_stage.run_stage("lm0", args, resume=f"{tmp_path}/lm0.run/step-000004")


def test_resume_in_the_middle_of_an_adalrs_trial_is_bit_identical(synth, tmp_path):
    args = ["train_stage.py", "--stage", "pretrain1", f"--data_dir={synth}", "--steps=10", "--save_every=5",
            "--packing.max_tokens=384", "--eval_every=0", "--warmup_steps=1", "--adalrs_cfg.window=3",
            "--adalrs_cfg.start=0", "--adalrs_cfg.end=1", "--keep_checkpoints=5", "--init-from=random"]
    ref = run([*args, f"--out_dir={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "adalrs: step" in ref.stdout
    ck = f"{tmp_path}/ref/pretrain1.run/step-000005"
    st = torch.load(os.path.join(ck, "rank0.pt"), weights_only=True)
    assert st["adalrs_snapshot"] is not None, "no trial was running at step 5"
    res = run([*args, f"--out_dir={tmp_path}/again", f"--resume={ck}"])
    assert res.returncode == 0, res.stderr[-3000:]
    wa = load_file(f"{tmp_path}/ref/pretrain1/model.safetensors")
    wb = load_file(f"{tmp_path}/again/pretrain1/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


RESUME_ON_RANK0_ONLY = r"""
import os, sys
sys.path.insert(0, os.environ["REPO"])
import train_stage
args = ["--init-from=random", "--data_dir=" + os.environ["SYNTH"], "--out_dir=" + os.environ["OUT"], "--steps=3",
        "--save_every=1", "--packing.max_tokens=384", "--eval_every=0", "--warmup_steps=1"]
mine = os.environ["CK"] if os.environ["RANK"] == "0" else None       # rank 1's file system lists no checkpoint
train_stage.run_command(lambda: train_stage.run_stage("vit3", args, resume=mine))
"""


def test_every_rank_resumes_from_rank_0s_choice(synth, tmp_path):
    """Each rank found its resume checkpoint in the run folder itself, before the process group
    existed: nodes whose shared file system listed it differently loaded different steps (or one
    started afresh) and met in mismatched collectives. Rank 0's choice now holds on every rank."""
    one = run(["train_stage.py", "--stage", "vit3", f"--data_dir={synth}", "--steps=3", "--save_every=1",
               "--packing.max_tokens=384", "--eval_every=0", "--warmup_steps=1", "--init-from=random",
               f"--out_dir={tmp_path}/one"])
    assert one.returncode == 0, one.stderr[-3000:]
    (tmp_path / "resume.py").write_text(RESUME_ON_RANK0_ONLY)
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "resume.py")],
              env_extra={"REPO": ROOT, "SYNTH": str(synth), "OUT": str(tmp_path / "two"),
                         "CK": f"{tmp_path}/one/vit3.run/step-000001"}, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resume: continuing from" in two.stdout and "step 00001/" not in two.stdout and "step 00003/" in two.stdout


def test_step_checkpoints_reshard_from_one_process_to_two_and_back(synth, tmp_path):
    """torch.distributed.checkpoint: a 1-process checkpoint resumed by 2 gloo processes, whose own
    step checkpoint (one shard file per rank) is resumed by 1 process; both end where the
    uninterrupted 1-process run ends (the 1- and 2-process steps agree to float rounding)."""
    args = ["train_stage.py", "--stage", "vit3", f"--data_dir={synth}", "--steps=3", "--save_every=1",
            "--packing.max_tokens=384", "--eval_every=0", "--warmup_steps=1", "--keep_checkpoints=5",
            "--init-from=random"]
    one = run([*args, f"--out_dir={tmp_path}/one", "--packing.micro_batches=2"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, f"--out_dir={tmp_path}/two",
               "--packing.micro_batches=1", f"--resume={tmp_path}/one/vit3.run/step-000001"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "init: no starting weights read" in two.stdout and "init: random weights" not in two.stdout   # (not made)
    ck = f"{tmp_path}/two/vit3.run/step-000002"
    meta = modeling.verify_checkpoint(ck, resumable=True)
    shards = sorted(n for n in meta["files"] if n.startswith("state/"))
    assert meta["world_size"] == 2 and len(shards) == 2 and {"rank0.pt", "rank1.pt"} <= set(meta["files"])
    for name, rec in meta["files"].items():                        # each rank's files hashed (by that rank)
        with open(os.path.join(ck, name), "rb") as f:
            assert rec["sha256"] == hashlib.sha256(f.read()).hexdigest(), name
    back = run([*args, f"--out_dir={tmp_path}/back", "--packing.micro_batches=2", f"--resume={ck}"])
    assert back.returncode == 0, back.stderr[-3000:]
    ref = losses_of(f"{tmp_path}/one/vit3")                        # a resumed run logs the steps it ran
    for got, want in ((losses_of(f"{tmp_path}/two/vit3"), ref[1:]), (losses_of(f"{tmp_path}/back/vit3"), ref[2:])):
        assert len(got) == len(want) and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(want, got)), (want, got)
    wa = load_file(f"{tmp_path}/one/vit3/model.safetensors")
    for folder in ("two", "back"):
        wb = load_file(f"{tmp_path}/{folder}/vit3/model.safetensors")
        assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5, folder


def test_a_stages_time_leaves_out_the_synthetic_datas_generation(synth, tmp_path, monkeypatch, capsys):
    """The first stage run on a machine generates the synthetic data (ensure_synth, minutes at the
    default size): the stage's time (meta.json "seconds", the recipe report's) is the stage's own.
    Here the generation is a stand-in that moves the clock 1000 s on."""
    later = [0.0]
    clock = time.time
    monkeypatch.setattr(time, "time", lambda: clock() + later[0])
    monkeypatch.setattr(data, "ensure_synth", lambda *a, **k: later.__setitem__(0, 1000.0))
    out = train_stage.run_stage("lm0", [f"--data_dir={synth}", f"--out_dir={tmp_path}", "--steps=1", "--eval_every=0",
                                        "--packing.max_tokens=256"])
    assert later[0] == 1000.0 and 0 < modeling.verify_checkpoint(out)["seconds"] < 1000
    # (and a run shorter than its warm-up says its LR never reaches --lr: lm0's is 10 steps)
    assert "note: --steps 1 is under --warmup_steps 10: the LR rises to 1/10 of --lr 0.003 and never reaches it" \
        in capsys.readouterr().out


def test_resume_restores_the_process_rngs(synth, tmp_path, monkeypatch):
    """No stage draws from the process RNGs after start-up (data order, frame jitter and AdaLRS are
    seeded by the config and the stream position), so a stand-in step draws from torch, random and
    numpy before each real step: the run resumed from its step-2 checkpoint through run_stage's
    resume path must draw what the uninterrupted run drew in steps 3 and 4."""
    import random

    import numpy as np
    draws, real_step = [], train_stage.train_step

    def drawing_step(*a, **k):
        draws.append((torch.rand(2).tolist(), random.random(), float(np.random.rand())))
        return real_step(*a, **k)
    monkeypatch.setattr(train_stage, "train_step", drawing_step)
    args = [f"--data_dir={synth}", f"--out_dir={tmp_path}", "--steps=4", "--save_every=2", "--eval_every=0",
            "--packing.max_tokens=256", "--keep_checkpoints=5"]
    train_stage.run_stage("lm0", args)
    ref = list(draws)
    draws.clear()
    before = modeling.verify_checkpoint(f"{tmp_path}/lm0.run/step-000002")["seconds"]
    t0 = time.time()

    def starting_weights(*a, **k):
        raise AssertionError("a resumed run made its starting weights, which its step checkpoint replaces")
    with monkeypatch.context() as m:
        m.setattr(train_stage, "build_stage_model", starting_weights)
        train_stage.run_stage("lm0", args, resume=f"{tmp_path}/lm0.run/step-000002")
    assert len(ref) == 4 and draws == ref[2:]
    # the stage's time counts the run before the resume up to its checkpoint, and this one
    assert before < modeling.verify_checkpoint(f"{tmp_path}/lm0")["seconds"] <= before + time.time() - t0 + 0.1
    # options changed since the checkpoint are said; turning AdaLRS on or off is refused (its state)
    logged = []
    monkeypatch.setattr(train_stage, "print0", lambda rank, *a: logged.append(" ".join(map(str, a))))
    train_stage.run_stage("lm0", [*args, "--lr=0.002"], resume=f"{tmp_path}/lm0.run/step-000002")
    assert any("options changed" in ln and "lr 0.003 -> 0.002" in ln for ln in logged)
    with pytest.raises(train_stage.UsageError, match="saved without AdaLRS: resume with --adalrs=false"):
        train_stage.run_stage("lm0", [*args, "--adalrs=true"], resume=f"{tmp_path}/lm0.run/step-000002")
    # the optimizer runs with the options given, not the loaded state's; a step past --steps is refused
    groups = []

    def noting_step(model, opt, *a, **k):
        groups.append([(g["weight_decay"], tuple(g["betas"])) for g in opt.param_groups])
        if len(groups) > 4:
            raise RuntimeError("the run went on past its last step")
        return real_step(model, opt, *a, **k)
    monkeypatch.setattr(train_stage, "train_step", noting_step)
    train_stage.run_stage("lm0", [*args, "--weight_decay=0.5", "--beta1=0.5"], resume=f"{tmp_path}/lm0.run/step-000002")
    assert groups == [[(0.5, (0.5, 0.95)), (0.0, (0.5, 0.95))]] * 2
    with pytest.raises(train_stage.UsageError, match="at step 2, past this run's 1 steps: resume with --steps of at least 2"):
        train_stage.run_stage("lm0", [*args, "--steps=1"], resume=f"{tmp_path}/lm0.run/step-000002")


def test_checkpoint_files_are_hashed_once_when_written_and_not_when_read(synth, tmp_path, monkeypatch):
    calls = []
    real = modeling.hashlib.sha256

    def counting(*a):
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(modeling.hashlib, "sha256", counting)
    out = train_stage.run_stage("lm0", [f"--data_dir={synth}", f"--out_dir={tmp_path}", "--steps=2", "--save_every=1",
                              "--eval_every=0", "--packing.max_tokens=256"])
    ck = f"{tmp_path}/lm0.run/step-000001"
    written = len(modeling.verify_checkpoint(ck)["files"]) + len(modeling.verify_checkpoint(out)["files"])
    assert len(calls) == written                    # every file of the step checkpoint and of the output, once
    calls.clear()
    model = modeling.build_model("tiny")
    assert modeling.find_resume_checkpoint(f"{tmp_path}/lm0.run", print) == ck and modeling.is_finished_stage(out)
    modeling.load_checkpoint(ck, model, torch.optim.AdamW(model.parameters()), 0, 1)
    assert calls == []                              # start-up and --resume read sizes, never hash


def test_fsdp_two_processes_match_one_process(synth, tmp_path):
    common = ["--packing.max_tokens=384", "--eval_every=0", "--save_every=0", "--warmup_steps=1", "--steps=3",
              "--init-from=random", f"--data_dir={synth}"]
    one = run(["train_stage.py", "--stage", "vit3", f"--out_dir={tmp_path}/one", "--packing.micro_batches=2", *common])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_stage.py", "--stage", "vit3",
               f"--out_dir={tmp_path}/two", "--packing.micro_batches=1", "--ac=block", *common])   # FSDP2 + AC
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses_of(f"{tmp_path}/one/vit3"), losses_of(f"{tmp_path}/two/vit3")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    wa, wb = load_file(f"{tmp_path}/one/vit3/model.safetensors"), load_file(f"{tmp_path}/two/vit3/model.safetensors")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


# the end of a 2-process run where gloo's worker thread, not Python, drops a collective's tensor
# (freeing a finished work, as after FSDP2's reduce-scatters) while the main thread, holding the
# GIL, goes on to exit: that thread asks for the GIL as the interpreter shuts down. Rank 1 joins
# the collective late, so it completes only after rank 0 is ending; the switch interval keeps the
# main thread from handing the GIL over before then.
TEARDOWN = """
import sys, time
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import train_stage
rank, world, device = train_stage.setup_distributed()
dist.barrier()                                      # both ranks are past the set-up before either leaves
mesh = dist.group.WORLD                             # the group stays referenced, as FSDP2's mesh keeps it
sys.setswitchinterval(1000.0)
if rank == 1:
    time.sleep(0.5)
t = torch.randn(1 << 10)
dist.all_reduce(t, async_op=True)
del t
train_stage.exit_process()
"""


def test_a_process_whose_gloo_thread_still_holds_a_tensor_exits_cleanly(tmp_path):
    """train_stage.exit_process, the commands' last step. Without it rank 1 died by SIGABRT
    ("terminate called without an active exception") in 10 of 10 such runs on a quiet machine
    (less often with other work running); with it, 10 of 10, and 6 of 6 under load, ended cleanly.
    shutdown_distributed's barrier narrows that window in a real run (a few CI runs aborted so)
    but cannot close it: the thread frees the work after the barrier has seen it complete."""
    import socket
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN.format(root=ROOT))
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        procs = [subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                                           MASTER_PORT=port, RANK=str(r), LOCAL_RANK="0", WORLD_SIZE="2"))
                 for r in range(2)]
        ends = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        assert all(code == 0 and "terminate called" not in err for code, err in ends), ends


def test_soup_of_identical_checkpoints_is_identity_and_mismatch_refused(synth, tmp_path):
    m = modeling.build_model("tiny", seed=3)
    m.save_pretrained(f"{tmp_path}/a")
    m.save_pretrained(f"{tmp_path}/b")
    cfg, _ = cfg_of("soup", f"--data_dir={synth}", f"--out_dir={tmp_path}/out", "--eval_packs=1")
    out = train_stage.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/b"])
    souped = modeling.SAILVL.from_pretrained(out)
    for k, v in m.state_dict().items():
        assert torch.equal(souped.state_dict()[k], v), k
    meta = modeling.verify_checkpoint(out)                                     # the one writer made it
    assert meta["eval_loss"]["soup"] == meta["eval_loss"][f"{tmp_path}/a"] == meta["eval_loss"][f"{tmp_path}/b"]
    m2 = modeling.build_model("tiny", seed=4)
    m2.save_pretrained(f"{tmp_path}/c")
    out = train_stage.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/c"])
    w = modeling.SAILVL.from_pretrained(out).state_dict()["mlp1.1.weight"]
    assert torch.allclose(w, (m.state_dict()["mlp1.1.weight"] + m2.state_dict()["mlp1.1.weight"]) / 2, atol=1e-7)
    other = modeling.SAILVL(modeling.preset_config("tiny-moe"))
    other.init_weights()
    other.save_pretrained(f"{tmp_path}/moe")
    with pytest.raises(train_stage.UsageError, match="different architecture"):
        train_stage.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/moe"])


def test_the_soup_evaluates_one_model_on_the_device_at_a_time_in_its_compute_dtype(synth, tmp_path, monkeypatch):
    """Each input and the soup are evaluated in turn, one model alive at a time (N + 1 8B models on
    one GPU at once do not fit), each made on the device with its LLM's matrices in the device's
    compute dtype (30b-a3b in fp32 does not fit an H100), under the device's autocast as a stage's
    evaluation; the inputs are never loaded whole on the host: the mean is summed from their files."""
    models = [modeling.build_model("tiny", seed=seed) for seed in (3, 4)]
    for name, m in zip("ab", models):
        m.save_pretrained(f"{tmp_path}/{name}")
    evaluated, casts = [], []

    def evaluate(m, factory, n, device, autocast):
        gc.collect()
        assert all(ref() is None for ref in evaluated), "an earlier model is still alive"
        evaluated.append(weakref.ref(m))
        with autocast():
            casts.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                          m.language_model.lm_head.weight.dtype, m.mlp1[1].weight.dtype))
        return 1.0
    monkeypatch.setattr(train_stage, "evaluate", evaluate)
    monkeypatch.setitem(modeling.COMPUTE_DTYPE, "cpu", torch.bfloat16)         # the CPU standing in for CUDA
    read = []
    from_pretrained = modeling.SAILVL.from_pretrained.__func__
    monkeypatch.setattr(modeling.SAILVL, "from_pretrained", classmethod(
        lambda cls, *a, **k: read.append(k.get("matrices_dtype")) or from_pretrained(cls, *a, **k)))
    cfg, _ = cfg_of("soup", f"--data_dir={synth}", f"--out_dir={tmp_path}/out", "--eval_packs=1")
    out = train_stage.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/b"])
    assert casts == [(torch.bfloat16, torch.bfloat16, torch.float32)] * 3 and len(evaluated) == 3
    assert read == [torch.bfloat16] * 2                          # read for evaluation only, into bf16 matrices
    got = load_file(f"{out}/model.safetensors")                                     # the mean itself stays fp32
    assert got["mlp1.1.weight"].dtype == torch.float32
    want = (models[0].mlp1[1].weight.double() + models[1].mlp1[1].weight.double()) / 2
    assert torch.equal(got["mlp1.1.weight"], want.float())


def test_the_soup_under_torchrun_matches_one_process(synth, tmp_path):
    """`torchrun --nproc_per_node 2 train_stage.py --stage soup`: rank 0 alone computes the mean, sends
    it to rank 1 for its share of the evaluation, and writes it: the same weights as one process, and
    the same held-out losses as one process evaluating both ranks' packs (2 steps of 2 ranks' packs
    are the first 4 packs of the held-out stream)."""
    for name, seed in (("a", 3), ("b", 4)):
        modeling.build_model("tiny-moe", seed=seed).save_pretrained(f"{tmp_path}/{name}")
    args = ["train_stage.py", "--stage", "soup", "--ckpts", f"{tmp_path}/a", f"{tmp_path}/b", f"--data_dir={synth}"]
    one = run([*args, f"--out_dir={tmp_path}/one", "--eval_packs=4"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, f"--out_dir={tmp_path}/two",
               "--eval_packs=2"])
    assert two.returncode == 0, two.stderr[-3000:]
    wa, wb = load_file(f"{tmp_path}/one/soup/model.safetensors"), load_file(f"{tmp_path}/two/soup/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = (modeling.verify_checkpoint(f"{tmp_path}/{d}/soup")["eval_loss"] for d in ("one", "two"))
    assert la.keys() == lb.keys() and all(abs(la[k] - lb[k]) <= 1e-5 * abs(la[k]) for k in la), (la, lb)
    assert la["soup"] != la[f"{tmp_path}/a"]


def test_the_soup_refuses_unusable_inputs_in_one_line_and_averages_on_every_core(synth, tmp_path, monkeypatch):
    """A soup input that is no SAIL-VL2 checkpoint or lacks a tensor is one line (InputError), not a
    traceback; rank 0 averages on every core of the machine while the other ranks wait (torchrun
    gives each process one thread), then goes back to its own; on a CPU the soup is evaluated as
    it is, with no second copy."""
    m = modeling.build_model("tiny", seed=3)
    for name in "ab":
        m.save_pretrained(f"{tmp_path}/{name}")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(m.cfg.llm_config.to_dict()))
    sd = load_file(f"{tmp_path}/b/model.safetensors")
    del sd["mlp1.1.weight"]
    from safetensors.torch import save_file
    save_file(sd, f"{tmp_path}/b/model.safetensors")
    cfg, _ = cfg_of("soup", f"--data_dir={synth}", f"--out_dir={tmp_path}/out", "--eval_packs=1")
    with pytest.raises(train_stage.InputError, match="soup: .*qwen: .*is not a SAIL-VL2 config"):
        train_stage.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/qwen"])
    with pytest.raises(train_stage.InputError, match="cannot load the soup's input .*/b:\n  1 missing keys"):
        train_stage.soup(cfg, [f"{tmp_path}/a", f"{tmp_path}/b"])
    m.save_pretrained(f"{tmp_path}/b")
    monkeypatch.setattr(train_stage.os, "cpu_count", lambda: 3)
    threads, rows_of = [], modeling.vit.rows_of
    monkeypatch.setattr(modeling.vit, "rows_of", lambda *a: threads.append(torch.get_num_threads()) or rows_of(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        souped = train_stage.mean_weights([f"{tmp_path}/a", f"{tmp_path}/b"], m.cfg)
        assert set(threads) == {3} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert train_stage.evaluation_model("soup", souped, m.cfg, torch.device("cpu"), 0, 1) is souped


def test_the_soup_of_moe_checkpoints_is_their_mean_expert_by_expert(tmp_path, monkeypatch):
    """Experts stored one by one (the hub layout) are averaged in slices of rows that span several
    of them: every tensor is the float64 mean of the inputs', rounded once."""
    monkeypatch.setattr(train_stage, "MEAN_CHUNK", 5000)          # a few experts' rows per slice, not whole ones
    models = [modeling.build_model("tiny-moe", seed=s) for s in (3, 4, 5)]
    for i, m in enumerate(models):
        m.save_pretrained(f"{tmp_path}/{i}")
    got = train_stage.mean_weights([f"{tmp_path}/{i}" for i in range(3)], models[0].cfg).state_dict()
    sds = [m.state_dict() for m in models]
    assert got.keys() == sds[0].keys()
    for k, v in got.items():
        assert torch.equal(v, (sum(sd[k].double() for sd in sds) / 3).float()), k


def test_init_from_hf_qwen3_and_aimv2_folders(tmp_path, monkeypatch):
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, Qwen3Config, Qwen3ForCausalLM
    mcfg = modeling.preset_config("tiny")
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
    cfg, _ = cfg_of("vit1", f"--out_dir={tmp_path}/out", f"--init-llm={tmp_path}/llm", f"--init-vit={tmp_path}/vit",
                    "--init-from=random")
    no_second_model(monkeypatch)
    model = train_stage.build_stage_model(cfg, mcfg, lambda *a: None).eval()
    ids = torch.randint(0, 256, (1, 12))
    pix = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert (model.language_model(ids) - llm(ids).logits).abs().max() < 1e-4
        assert (model.vision_model(pix) - vis(pix).last_hidden_state).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# the command line, as a new user meets it

def error_line(res):
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    return lines


def test_nested_and_range_options_are_checked_where_they_are_parsed():
    """--packing.* options pass the packer's own checks (a typo in --packing.overlong was silently
    'truncate', --packing.micro_batches=0 divided by zero later); an Optional one takes "none"."""
    for args, says in ((["--packing.overlong=bogus"], "overlong must be 'truncate' or 'own_pack'"),
                       (["--packing.micro_batches=0"], "micro_batches must be >= 1"),
                       (["--grad_clip=0"], "--grad_clip must be above 0"), (["--eval_packs=0"], "--eval_packs at least 1")):
        with pytest.raises(train_stage.UsageError, match=says):
            train_stage.parse_args(["--stage", "sft1", *args, "--help"])
    cfg, _, _ = train_stage.parse_args(["--stage", "sft1", "--packing.max_wait=none", "--help"])
    assert cfg.packing.max_wait is None


@pytest.mark.parametrize("args,code,match", [
    (["--stage", "nosuch"], 2, "; stages: lm0, vit1, vit2, vit3, vit3-direct, pretrain1, pretrain2, sft1, sft2, sft3, sft4, sft4-twin, soup, "
     "longcot, rl-verifiable, harvest, thinkfusion, rl-mixed, all\n"),   # all: the recipe
    (["--stage", "al"], 2, "unknown stage 'al' (did you mean all?)"),
    (["--stage="], 2, "unknown stage ''"),               # empty: not the default stage
    (["--scale="], 2, "--scale must be tiny or paper, got ''"),
    (["--stage", "vit1", "--lr=abc"], 2, "--lr: expected a number, got 'abc'"),
    (["--nosuchkey=1"], 2, "unknown option --nosuchkey"),
    (["--stepz=3"], 2, "did you mean --steps"),
    (["--packing.max_tokenz=3"], 2, "did you mean --packing.max_tokens"),
    (["--stage", "rl-verifiable"], 2, "runs in rl.py"),
    (["--init-from", "/no/such/folder"], 2, "is not a folder"),
    (["--tokenizer=tests"], 2, "--tokenizer: tests holds no tokenizer (tokenizer.json, or vocab.json + merges.txt)"),
    (["--ac=sometimes"], 2, "--ac must be none or block, got 'sometimes'"),
    (["--steps=0"], 2, "--steps must be at least 1"),
    (["--steps=-5"], 2, "--steps must be at least 1"),
    (["--stage", "sft1", "--init-from=random", "--manifests=/no/such.jsonl"], 2, "manifest not found: /no/such.jsonl"),
    (["--stage", "sft1", "--init-from=random", "--eval_manifests=/no/x.jsonl:2"], 2, "manifest not found: /no/x.jsonl"),
    (["--stage", "sft1", "--init-from=random", "--manifests=README.md:abc"], 2, "bad weight 'abc'"),
    (["--preset=nosuch"], 2, "unknown model preset 'nosuch'"),
    (["--model.llm_config.num_layers=2"], 2, "did you mean --model.llm_config.num_hidden_layers?"),
    (["--stage", "all", "--eval_families=nosuch"], 2, "--eval_families: unknown nosuch"),
    (["--stage", "all", "--seeds=0"], 2, "--seeds must be a whole number >= 1"),
    (["--stage", "all", "--compare=x", "--as=vit1", "--eval_limit=abc"], 2, "--eval_limit must be a whole number"),
    (["--stage", "all", "--compare=x", "--as=vit1", "--seeds=3"], 2, "--seeds runs the recipe again"),
    (["--num_workers=-1"], 2, "--num_workers must be >= 0"),
    (["--save_every=-1"], 2, "--save_every must be >= 0 (step checkpoint every N steps; 0 = only the stage output), got -1"),
    (["--eval_every=-5"], 2, "--eval_every must be >= 0 (held-out loss every N steps (and at step 0 and the end); 0 = never), got -5"),
    (["--keep_checkpoints=-2"], 2, "--keep_checkpoints must be >= 0 (step checkpoints kept in out/<stage>.run/ (0 = all)), got -2"),
    (["--lr=-1"], 2, "--lr must be a positive number, got -1.0"),
    (["--lr=nan"], 2, "--lr must be a positive number, got nan"),
    (["--beta2=1"], 2, "--beta1 and --beta2 must be in [0, 1)"),
    (["--stage", "vit1", "--ckpts", "a", "b"], 2, "--ckpts names the checkpoints the soup averages"),
    (["--stage", "soup", "--ckpts", "a", "b", "--steps=500"], 2, "--steps does not apply to the soup"),
    (["--stage", "lm0", "--resume=/no/such/step-000002"], 2, "--resume /no/such/step-000002: no such folder"),
])
def test_usage_errors_are_one_line_with_exit_2(args, code, match, capsys, monkeypatch):
    """Through main in this process (--stage all: tests/recipe.py's main, which main's exec would
    run); the real command line for the first case."""
    if args == ["--stage", "nosuch"]:
        res = run(["train_stage.py", *args], timeout=60)
        rc, err = res.returncode, res.stderr
    else:
        if "all" in args:
            import recipe
            monkeypatch.setattr(os, "execv", lambda exe, argv: recipe.main(argv[2:]))
        with pytest.raises(SystemExit) as e:
            train_stage.main(args)
        rc, err = e.value.code, capsys.readouterr().err
    assert rc == code and len(err.strip().splitlines()) == 1 and match in err, err


def test_ctrl_c_is_one_line_saying_how_to_go_on(monkeypatch, capsys):
    """Ctrl-C in a stage, an RL stage or the recipe: exit 130 with one line saying how the run goes on,
    not a KeyboardInterrupt traceback (the recipe printed two, one per process)."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    import recipe
    import rl
    monkeypatch.setattr(train_stage, "run_cli", interrupted)
    monkeypatch.setattr(rl, "run_cli", interrupted)
    monkeypatch.setattr(recipe, "run_recipe", interrupted)
    over = "error: interrupted; run the same command again: it starts over"      # nothing to resume from
    resume = "error: interrupted; the same command with --resume goes on from the newest step checkpoint in"
    for main, argv, says in ((train_stage.main, [], f"train_stage.py: {resume} out/vit1.run/\n"),
                             (train_stage.main, ["--stage", "vit2", "--out-dir", "/tmp/o3"], f"train_stage.py: {resume} /tmp/o3/vit2.run/\n"),
                             (rl.main, ["--out_dir=o"], f"rl.py: {resume} o/rl-verifiable.run/\n"),
                             (recipe.main, ["--stage", "all"], "tests/recipe.py: error: interrupted; run the same command again to go on"),
                             (train_stage.main, ["--stage", "soup"], f"train_stage.py: {over}"),
                             (rl.main, ["--stage", "harvest"], f"rl.py: {over}"), (rl.main, ["filter"], f"rl.py: {over}")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 130 and len(err.strip().splitlines()) == 1 and err.startswith(says), (argv, err)


def test_ranks_wait_half_an_hour_in_a_collective_not_nccls_ten_minutes(monkeypatch):
    """Under torchrun the process group waits COLLECTIVE_TIMEOUT (30 min) for a late rank, not NCCL's
    default 10 (rank 0 building a large model alone; an RL rank with longer rollouts); asked of both
    backends, so gloo's tests run with the value a GPU run gets."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_stage.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_stage.dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(os, "environ", {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert train_stage.setup_distributed()[:2] == (1, 2)
    assert calls == [(("gloo",), {"timeout": datetime.timedelta(minutes=30)})]


def test_fsdp_on_one_process_without_torchrun(synth, tmp_path):
    """--fsdp=true under plain `python` (no torchrun environment): a process group of one, sharded."""
    res = run(["train_stage.py", "--stage", "vit1", "--init-from=random", "--fsdp=true", f"--data_dir={synth}",
               f"--out_dir={tmp_path}", "--steps=1", "--eval_every=0", "--packing.max_tokens=256"], timeout=120)
    assert res.returncode == 0 and "step 00001/00001" in res.stdout, res.stderr[-2000:]


def test_usage_error_under_torchrun_names_the_problem(tmp_path):
    res = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train_stage.py", "--stage", "nosuch"],
              timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("train_stage.py: error: unknown stage 'nosuch'") == 1 and "Traceback (most recent call last)" \
        not in res.stderr.split("train_stage.py: error:")[0]
    assert "unknown stage 'nosuch'" in res.stderr.split("Root Cause")[-1]   # torchrun's summary shows it too


def test_a_missing_previous_stage_refuses_with_what_to_run(synth, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:                                  # through main, in this process
        train_stage.main(["--stage", "vit2", f"--data_dir={synth}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"torchrun train_stage.py --stage vit1 --out_dir={tmp_path}" in err and "--init-from" in err
    ok = run(["train_stage.py", "--stage", "vit2", f"--data_dir={synth}", f"--out_dir={tmp_path}", "--steps=1",
              "--init-from=random", "--eval_every=0", "--packing.max_tokens=256"])
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_too_much_bad_data_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("not json\n" * 30 + json.dumps({"text": "fine"}) + "\n")
    with pytest.raises(SystemExit) as e:                                  # through main, in this process
        train_stage.main(["--stage", "lm0", f"--manifests={tmp_path}/bad.jsonl", f"--out_dir={tmp_path}", "--steps=2",
                          "--eval_manifests=" + str(tmp_path / "bad.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "max_bad_fraction" in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1


def test_an_empty_manifest_or_one_of_only_bad_lines_is_one_line_naming_why(tmp_path, capsys):
    """An empty manifest, and a small one whose every line is bad: one error line (exit 1) that says
    why, the bad lines reported with file and line and counted in it (they were counted after it)."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{not json\n" * 3)
    for name, says in (("empty", "holds no samples"), ("bad", "'json': 3")):
        with pytest.raises(SystemExit) as e:
            train_stage.main(["--stage", "lm0", "--init-from=random", f"--manifests={tmp_path}/{name}.jsonl",
                              f"--out_dir={tmp_path}", "--steps=2", "--eval_every=0"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and says in err and len([ln for ln in err.splitlines() if "error:" in ln]) == 1, err
    assert "bad.jsonl:1" in err


def test_a_refused_command_makes_no_output_folder_and_an_unwritable_one_is_one_line(synth, tmp_path, capsys):
    """A stage, an RL stage or the soup refused for a missing source leaves no empty --out_dir behind
    (the folder was made first); an --out_dir that cannot be written is one line naming the option."""
    import rl
    for main, args in ((train_stage.main, ["--stage", "pretrain1"]), (rl.main, ["--stage", "rl-verifiable"]),
                       (train_stage.main, ["--stage", "soup"])):
        with pytest.raises(SystemExit) as e:
            main([*args, f"--out_dir={tmp_path}/new", f"--data_dir={synth}"])
        assert e.value.code == 2 and "missing" in capsys.readouterr().err and not (tmp_path / "new").exists(), args
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        train_stage.main(["--stage", "sft1", "--init-from=random", f"--out_dir={tmp_path}/file/out", f"--data_dir={synth}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot write to the output folder {tmp_path}/file/out" in err and "--out_dir" in err


def test_init_llm_from_a_stage_output_keeps_its_presets_vit(tmp_path):
    """--init-llm names a Qwen3 folder (then the 2b preset: the paper's ViT and tiles; test_replicate)
    or one of our outputs, lm0's: then the preset whose ViT that output has, not a random 0.7B
    SAIL-ViT-Huge beside a tiny LLM (a new user's first try took 4.6 GB and 30 s a step)."""
    for preset in ("tiny", "tiny-anyres"):
        modeling.save_checkpoint(str(tmp_path / preset), modeling.build_model(preset, seed=0), {"stage": "lm0"}, 0, 1)
        cfg, mcfg = cfg_of("vit1", f"--out_dir={tmp_path}", f"--init-llm={tmp_path}/{preset}")
        assert cfg.preset == preset and mcfg.vision_config == modeling.preset_config(preset).vision_config
    cfg, _ = cfg_of("vit1", f"--out_dir={tmp_path}", f"--init-llm={tmp_path}/tiny", "--preset=tiny-anyres")
    assert cfg.preset == "tiny-anyres"                               # (a --preset given is kept)


def test_own_data_without_eval_manifests_says_whose_held_out_loss_it_measures(synth, tmp_path, capsys):
    """--manifests without --eval_manifests: the held-out loss is the stage's synthetic families'
    (said in a note), and where --data_dir lacks them, one usage error naming the way out at start-up
    (it was a bare "manifest not found" after the model was built)."""
    own = [f"--manifests={synth}/ocr/train.jsonl", f"--out_dir={tmp_path}", "--steps=1", "--init-from=random",
           "--packing.max_tokens=512"]
    with pytest.raises(SystemExit) as e:
        train_stage.main(["--stage", "sft1", *own, f"--data_dir={tmp_path}/none", "--eval_every=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"held-out data: {tmp_path}/none/" in err and "--eval_manifests=FILE" in err, err
    train_stage.main(["--stage", "sft1", *own, f"--data_dir={synth}", "--eval_every=1", "--save_every=0"])
    out = capsys.readouterr().out
    assert "note: the held-out loss is measured on the stage's synthetic families" in out, out
    assert "try it: " not in out                       # (your data trained: a synthetic sample says nothing of it)
    for held_out, says in ((f"{synth}/ocr/../ocr/train.jsonl:2", 1), (f"{synth}/ocr/eval.jsonl", 0)):
        logs = []                                      # a held-out file that is a training file, however spelled
        cfg, _ = cfg_of("sft1", *own, f"--eval_manifests={held_out}")
        train_stage.check_held_out_data(cfg, logs.append)
        assert len(logs) == says and all("is in --manifests and --eval_manifests: its held-out loss is measured on "
                                         "training samples" in line for line in logs), logs


def test_an_unreadable_weights_file_is_one_line_naming_it(tmp_path, capsys):
    m = modeling.build_model("tiny", seed=0)
    m.save_pretrained(str(tmp_path / "cut"))
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:7])
    with pytest.raises(SystemExit) as e:
        train_stage.main(["--stage", "vit2", f"--init-from={tmp_path}/cut", f"--out_dir={tmp_path}", "--steps=1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and f"{weights}: not a readable safetensors" in err, err


def test_the_next_line_carries_the_data_and_the_llm_a_stand_in_would_replace(synth, tmp_path, capsys):
    """A replication on its own data (README: vit1 from Qwen3 and AIMv2 on a LLaVA manifest): the next:
    line dropped --manifests, --eval_manifests and --image_root (the next stage trained on the synthetic
    data without a word) and, after vit3, --init-llm, so pretrain1 ran the stand-in lm0 (a tiny LLM on
    synthetic text, its tokenizer) beside vit3's Qwen-aligned ViT. The line now carries them; a
    pretrain1 whose stand-in would meet another LLM's shape is refused."""
    data_opts = ["--manifests=/d/train.jsonl", "--eval_manifests=/d/heldout.jsonl", "--image_root=/d"]
    cfg, _ = cfg_of("vit1", f"--out_dir={tmp_path}")
    cfg = dataclasses.replace(cfg, init_llm="/models/Qwen3", init_vit="/models/aimv2", manifests="/d/train.jsonl",
                              eval_manifests="/d/heldout.jsonl", image_root="/d")        # (no file read here)
    after_vit1 = train_stage.command_for(train_stage.STAGES["vit2"], cfg, from_output=True)
    assert after_vit1 == f"torchrun train_stage.py --stage vit2 --out_dir={tmp_path} {' '.join(data_opts)}"
    after_vit3 = train_stage.command_for(train_stage.STAGES["pretrain1"], dataclasses.replace(cfg, stage="vit3"), True)
    assert after_vit3 == f"{after_vit1.replace('vit2', 'pretrain1')} --init-llm=/models/Qwen3"   # its LLM again
    from test_replicate import write_qwen_tokenizer
    qwen = tmp_path / "qwen-sail"
    data.add_image_tokens(write_qwen_tokenizer(tmp_path / "qwen"), qwen)
    for name, tok_dir in (("vit3", qwen), ("ours", synth)):           # a vit3 beside Qwen3, one of the miniature's
        modeling.save_checkpoint(str(tmp_path / name / "vit3"), modeling.build_model("tiny", seed=0), {"stage": "vit3"}, 0,
                                 1, extra_files=train_stage.tokenizer_files(str(tok_dir)))
    args = ["--stage", "pretrain1", f"--data_dir={synth}", "--steps=1", "--auto_steps=1", "--eval_every=0"]
    with pytest.raises(SystemExit) as e:
        train_stage.main([*args, f"--out_dir={tmp_path}/vit3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"pretrain1 would run the stand-in lm0 (a small LLM trained on synthetic text) " \
        f"beside {tmp_path}/vit3/vit3, trained with another tokenizer" in err and "pass --init-llm=DIR" in err, err
    assert not os.path.exists(tmp_path / "vit3" / "lm0")
    train_stage.main([*args, f"--out_dir={tmp_path}/ours", "--packing.max_tokens=256"])     # the stand-in runs
    assert modeling.is_finished_stage(str(tmp_path / "ours" / "lm0"))


def test_vit1_on_a_fresh_machine_runs_lm0_first_and_hints_carry_the_options(synth, tmp_path):
    res = run(["train_stage.py", "--stage", "vit1", f"--data_dir={synth}", f"--out_dir={tmp_path}", "--steps", "200",
               "--step_scale=0.01", "--packing.max_tokens=256", "--eval_every=0"])    # the stand-in's steps scale too
    assert res.returncode == 0, res.stderr[-3000:]
    lm0_steps = round(train_stage.stage_config("lm0").steps * 0.01)
    assert f"running the stand-in stage lm0 first ({lm0_steps} steps" in res.stdout and "skip it with --init-llm=" in res.stdout
    assert f"init: all weights from {tmp_path}/lm0" in res.stdout
    took = modeling.verify_checkpoint(f"{tmp_path}/lm0")["seconds"]
    assert f"lm0 done: {tmp_path}/lm0 after {took:.0f} s; now vit1\n" in res.stdout         # the stand-in's time too
    modeling.verify_checkpoint(f"{tmp_path}/vit1")
    assert f"next: torchrun train_stage.py --stage vit2 --out_dir={tmp_path} --data_dir={synth} --step_scale=0.01\n" \
        in res.stdout                                        # (how the run is sized carries over)
    hint = next(ln for ln in res.stdout.splitlines() if ln.startswith("try it: "))[len("try it: "):]
    assert hint.startswith(f"python sample.py --ckpt {tmp_path}/vit1 --image ")
    img = hint.split("--image ")[1].split(" --prompt")[0].strip("'")
    assert os.path.exists(img) and "/ocr/" in img                      # a held-out image of the stage's data
    ref = json.loads(open(os.path.join(synth, "ocr", "eval.jsonl")).readline())["conversations"][-1]["value"]
    assert hint.endswith(f"# reference: {ref}")
    # the done line says how long the stage took (as its meta.json does) and that the tokenizer is there
    seconds = modeling.verify_checkpoint(f"{tmp_path}/vit1")["seconds"]
    assert f"done: vit1 checkpoint in {tmp_path}/vit1/ (config.json, model.safetensors, meta.json, metrics.jsonl, " \
           f"the tokenizer) after {seconds:.0f} s\n" in res.stdout and 0 < seconds < 300
    # a fresh start says it will replace the finished output (a short trial replaces a long stage)
    logs = []
    train_stage.clear_earlier_run(cfg_of("vit1", f"--data_dir={synth}", f"--out_dir={tmp_path}")[0], logs.append)
    step = round(200 * 0.01)
    assert logs == [f"note: {tmp_path}/vit1 holds an earlier vit1 output (step {step}); this run replaces it when it ends"]


def test_the_done_line_names_the_tokenizer_only_where_the_output_holds_one(synth, tmp_path):
    """A stage on the built-in byte tokenizer saves none (its own data from a random start; a soup of
    outputs without one): its done line does not claim one. Its time, where meta.json records it."""
    m = modeling.build_model("tiny", seed=0)
    modeling.save_checkpoint(str(tmp_path / "bare"), m, {"stage": "sft1", "seconds": 12.4}, 0, 1)
    modeling.save_checkpoint(str(tmp_path / "tok"), m, {"stage": "sft1"}, 0, 1,
                             extra_files=train_stage.tokenizer_files(str(synth)))
    assert train_stage.output_files(str(tmp_path / "bare")) == ["config.json", "model.safetensors", "meta.json"]
    assert train_stage.output_files(str(tmp_path / "tok")) == ["config.json", "model.safetensors", "meta.json",
                                                                "the tokenizer"]
    assert (train_stage.took(str(tmp_path / "bare")), train_stage.took(str(tmp_path / "tok"))) == (" after 12 s", "")
    logs = []
    train_stage.log_done(logs.append, "sft1 checkpoint", str(tmp_path / "bare"))
    assert logs == [f"done: sft1 checkpoint in {tmp_path}/bare/ (config.json, model.safetensors, meta.json) after 12 s"]


def test_the_done_line_reads_the_output_on_rank_0_only(tmp_path, monkeypatch):
    """Another node may see a finished output late on a shared file system: a rank other than 0, which
    prints nothing, does not read it (a good stage would fail there)."""
    monkeypatch.setenv("RANK", "1")
    train_stage.log_done(print, "sft1 checkpoint", str(tmp_path / "not-yet-visible"))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(modeling.CheckpointError, match="does not exist"):
        train_stage.log_done(print, "sft1 checkpoint", str(tmp_path / "not-yet-visible"))


def test_a_hint_runs_the_stage_as_this_run_is_run(monkeypatch, tmp_path):
    """The next: line keeps the processes, --scale and --step_scale of the run it follows (a user on 8
    GPUs at --scale=paper was sent to tiny defaults on one process); rl.py, which has neither option, and
    the soup get only the processes."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg, _ = cfg_of("vit3", "--scale=paper", "--step_scale=0.5", f"--out_dir={tmp_path}")
    assert train_stage.command_for(train_stage.STAGES["pretrain1"], cfg, from_output=True) == \
        f"torchrun --nproc_per_node 8 train_stage.py --stage pretrain1 --out_dir={tmp_path} --scale=paper --step_scale=0.5"
    for name, tool in (("rl-verifiable", "rl.py"), ("soup", "train_stage.py")):
        assert train_stage.command_for(train_stage.STAGES[name], cfg, from_output=True) == \
            f"torchrun --nproc_per_node 8 {tool} --stage {name} --out_dir={tmp_path}"


def test_the_try_it_hint_of_a_text_only_stage_is_none_and_media_options_are_apart(synth):
    assert train_stage.try_it(cfg_of("lm0", f"--data_dir={synth}")[0], "o/lm0") is None    # it never saw the media
    hint = train_stage.try_it(cfg_of("sft4", f"--data_dir={synth}", "--init-from=random")[0], "o/sft4")
    assert " --image " in hint and "--prompt" in hint and not re.search(r"\S--(image|video)", hint)
    # a thinking-mode sample (longcot's): asked with --think, its answer as the reference, on one line to paste
    hint = train_stage.try_it(cfg_of("longcot", f"--data_dir={synth}", "--init-from=random")[0], "o/longcot")
    assert " --think " in hint and "\n" not in hint and "</think>" not in hint.split("# reference:")[1], hint


def test_stage_all_calibrate_and_rl_bench_run_the_tools_in_tests(monkeypatch, capsys):
    """`--stage all`, `calibrate` and `rl.py bench` are forwarded (exec) to tests/recipe.py,
    tests/calibrate.py and tests/bench.py rollout, which the component files never import. The
    exec itself once for real (rl.py bench), the other two caught and their tools run here."""
    import importlib
    import rl
    res = run(["rl.py", "bench", "--help"], timeout=60)
    assert res.returncode == 0 and "usage: bench.py rollout" in res.stdout and "--case" in res.stdout, res.stderr

    class Exec(Exception):
        pass

    def execv(path, args):
        raise Exec(args)
    monkeypatch.setattr(os, "execv", execv)
    for main, argv, tool, passed, says in (
            (train_stage.main, ["--stage", "all", "--help"], "recipe.py", ["--stage", "all", "--help"], "usage: python tests/recipe.py"),
            (train_stage.main, ["calibrate", "--help"], "calibrate.py", ["--help"], "usage: tests/calibrate.py"),
            (rl.main, ["bench", "--help"], "bench.py", ["rollout", "--help"], "usage: bench.py rollout")):
        with pytest.raises(Exec) as e:
            main(argv)
        exe, script, *args = e.value.args[0]
        assert exe == sys.executable and script == os.path.join(ROOT, "tests", tool), script
        assert args == passed, args
        try:                                                              # the tool, given what the exec passes
            code = importlib.import_module(tool[:-3]).main(args)
        except SystemExit as done:
            code = done.code
        out = capsys.readouterr().out
        assert code in (0, None) and says in out, out[-2000:]
        if tool == "recipe.py":
            assert all(f"  --{k}=" in out for k in train_stage.RECIPE_OPTIONS)
        if tool == "calibrate.py":
            assert "--ckpt" in out


def test_help_shows_each_option_with_its_description_and_the_stages_values(capsys):
    res = run(["train_stage.py", "--stage", "pretrain1", "--help"], timeout=60)      # the real command line once
    assert res.returncode == 0
    out = res.stdout
    assert all(f"  {s.name} " in out for s in train_stage.RECIPE)
    assert f"--lr={train_stage.stage_config('pretrain1').lr}" in out and "--adalrs=True" in out and "peak learning rate" in out
    assert "--packing.max_tokens=1024" in out and "--adalrs_cfg.window=0" in out
    try:                                                                # then through main, in this process
        train_stage.main(["--help"])
    except SystemExit as e:
        assert e.code in (0, None)
    generic = capsys.readouterr().out
    assert "--lr=0.003" in generic                                      # vit1's values without --stage
    for option in train_stage.RECIPE_OPTIONS:                           # --stage all's own options are listed
        assert f"  --{option}=" in generic and train_stage.RECIPE_HELP[option] in generic
    rows = [ln for ln in generic.splitlines() if ln.startswith("  --") and "=" in ln.split()[0]]
    starts = {len(ln) - len(ln[2:].split(" ", 1)[1].lstrip()) for ln in rows if " " in ln[2:].strip()}
    assert len(starts) == 1, starts                                     # every description in one column


def test_an_img_context_option_against_the_tokenizer_is_refused(synth, tmp_path):
    """--model.img_context_token_id that the stage's tokenizer contradicts cannot take effect (no
    <IMG_CONTEXT> slot would be found): one line, exit 2. (A preset whose id differs, with no option
    given, is adopted: test_replicate.)"""
    res = run(["train_stage.py", "--stage", "vit3", f"--out_dir={tmp_path}", f"--data_dir={synth}", "--init-from=random",
               "--steps=1", "--eval_every=0", "--model.img_context_token_id=300"], timeout=120)
    assert res.returncode == 2 and len(error_line(res)) == 1, res.stderr
    assert "--model.img_context_token_id=300, but <IMG_CONTEXT> is token 263" in res.stderr


def tiny_checkpoint(path, synth, preset="tiny"):
    """A fixed-resolution tiny checkpoint with the synthetic data's tokenizer, as a stage writes one."""
    modeling.build_model(preset).save_pretrained(str(path))
    shutil.copy(os.path.join(synth, "tokenizer.json"), path)
    return str(path)


def test_anyres_on_a_fixed_resolution_checkpoint_takes_effect(synth, tmp_path, capsys):
    """--preset=tiny-anyres / --model.anyres=true from a fixed-resolution checkpoint: the same ViT
    weights, so a valid fine-tuning switch that applies (before: the checkpoint's config won silently
    and the next: hint repeated the ignored preset)."""
    ck = tiny_checkpoint(tmp_path / "ck", synth)
    base = [f"--init-from={ck}", f"--data_dir={synth}", "--steps=1", "--eval_every=0", "--save_every=0",
            "--packing.max_tokens=512", f"--manifests={synth}/chart/train.jsonl"]   # 224-px: tiles differ from AnyRes
    _, mcfg, _ = train_stage.parse_args(["--stage", "vit2", *base, "--model.anyres=true"])
    assert mcfg.anyres and mcfg.llm_config == modeling.preset_config("tiny").llm_config
    train_stage.main(["--stage", "vit2", *base, f"--out_dir={tmp_path}/fixed"])
    train_stage.main(["--stage", "vit2", *base, f"--out_dir={tmp_path}/anyres", "--preset=tiny-anyres"])
    log = capsys.readouterr().out
    cfg = json.load(open(f"{tmp_path}/anyres/vit2/config.json"))
    assert cfg["anyres"] is True and cfg["anyres_max_patches"] == modeling.preset_config("tiny-anyres").anyres_max_patches
    assert json.load(open(f"{tmp_path}/fixed/vit2/config.json"))["anyres"] is False
    assert losses_of(f"{tmp_path}/anyres/vit2") != losses_of(f"{tmp_path}/fixed/vit2")   # it changed what trained
    assert f"next: torchrun train_stage.py --stage vit3 --out_dir={tmp_path}/anyres --data_dir={synth} " \
        f"--manifests={synth}/chart/train.jsonl\n" in log                    # (no preset: the output carries it)


@pytest.mark.parametrize("option,flag", [("--preset=tiny-moe", "--preset=tiny-moe"),
                                         ("--model.llm_config.num_hidden_layers=2",
                                          "--model.llm_config.num_hidden_layers=2")])
def test_a_shape_option_a_checkpoint_cannot_load_is_refused_in_one_line(synth, tmp_path, capsys, option, flag):
    ck = tiny_checkpoint(tmp_path / "ck", synth)
    with pytest.raises(SystemExit) as e:
        train_stage.main(["--stage", "vit2", f"--init-from={ck}", f"--data_dir={synth}", f"--out_dir={tmp_path}", option])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    assert f"{flag} changes the shape of weights loaded from {ck}" in err and "--init-from=random" in err
    assert "None" not in err and "-> no such weight)" in err          # (an MoE has no MLP; 2 layers no layer 2)


# ----------------------------------------------------------------------------------------------
# mutation-review additions: the held-out loss's token mean, the stages' mixture settings

def test_the_held_out_loss_is_the_global_token_mean_over_packs_of_different_sizes(synth):
    """evaluate(): every held-out target counts once, however the samples were packed: a pack of
    one short answer (few targets) and one of many samples (hundreds), read as two steps, give the
    hand-computed token mean (F.log_softmax + gather per sample, summed, divided by the target
    count), not the mean of the two packs' means; only the first n_packs steps are read."""
    samples, mcfg = fixed_samples(synth)
    torch.manual_seed(0)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    model.eval()
    with torch.no_grad():               # peaky logits: a fresh model's CE is about log V on every token
        model.language_model.model.norm.weight.mul_(30.0)
    small, big = packs_of(samples[:1], 4096), packs_of(samples[1:], 4096)
    assert len(small) == len(big) == 1
    counts = [int((p["labels"][:, 1:] != -100).sum()) for p in small + big]
    assert counts[1] > 20 * counts[0]
    total, n, means = 0.0, 0, []
    with torch.no_grad():
        for group in (samples[:1], samples[1:]):
            pack_total, pack_n = 0.0, 0
            for s in group:
                logits = model(s["input_ids"][None], s["pixel_values"]).logits[0].float()
                tgt = s["labels"][1:]
                keep = tgt != -100
                pack_total -= float(F.log_softmax(logits[:-1][keep], -1).gather(1, tgt[keep][:, None]).sum())
                pack_n += int(keep.sum())
            total, n = total + pack_total, n + pack_n
            means.append(pack_total / pack_n)
    want = total / n
    assert abs(sum(means) / 2 - want) > 0.01 * want                  # not vacuous: the two readings differ

    class HeldOut:
        def __init__(self):
            self.steps = iter([small, big, [{"input_ids": None}]])    # a third step must not be read

        def next(self):
            return next(self.steps)
    made = []
    factory = lambda: made.append(1) or HeldOut()                           # noqa: E731
    model.train()
    got = train_stage.evaluate(model, factory, 2, CPU, NOCAST)
    assert got == pytest.approx(want, rel=1e-5) and made == [1] and model.training


def test_the_stages_build_their_mixtures_with_their_rebalancing_and_label_modes(synth, tmp_path):
    """Through build_batches with the config the command line builds: pretrain2's training mixture is
    n-gram rebalanced (non-uniform sample weights; its held-out mixture is not); longcot builds its
    samples in label mode longcot (an answer without a <think> chain is bad data, counted 'format',
    where sft would train on it) and thinkfusion in label mode thinkfusion (the empty think block
    of a direct answer and its line breaks carry no loss; the answer after it does)."""
    tok = data.load_tokenizer(None)
    cfg, mcfg = cfg_of("pretrain2", f"--data_dir={synth}", "--packing.max_tokens=1024")
    assert cfg.ngram_rebalance
    train = train_stage.build_batches(cfg, mcfg, tok, "train", 0, 1, verbose=False).mixture
    assert len(train.sample_weights) == 7 and all(w is not None for w in train.sample_weights)
    assert any(w.max() > 1.5 * w.min() for w in train.sample_weights)           # rebalanced, not uniform
    held_out = train_stage.build_batches(cfg, mcfg, tok, "eval", 0, 1, verbose=False).mixture
    assert all(w is None for w in held_out.sample_weights)

    conv = lambda a: {"conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": a}]}  # noqa: E731
    chain = "<think>\nOne, two, three.\n</think>\nThe answer is \\boxed{3}."
    (tmp_path / "cot.jsonl").write_text("".join(json.dumps(conv(a)) + "\n" for a in [chain] * 5 + ["There are 3."]))
    cfg, mcfg = cfg_of("longcot", f"--manifests={tmp_path}/cot.jsonl", "--packing.max_tokens=4096",
                       "--max_bad_fraction=0.5")
    batches = train_stage.build_batches(cfg, mcfg, tok, "train", 0, 1, verbose=False)
    assert batches.mixture.cfg.label_mode == "longcot"
    batches.next()
    assert batches.mixture.bad.counts == {"format": 1} and batches.mixture.bad.seen == 6

    direct = "<think>\n\n</think>\n\nThere are 3 circles."
    (tmp_path / "fusion.jsonl").write_text(json.dumps(conv(direct)) + "\n")
    cfg, mcfg = cfg_of("thinkfusion", f"--manifests={tmp_path}/fusion.jsonl", "--packing.max_tokens=4096")
    batches = train_stage.build_batches(cfg, mcfg, tok, "train", 0, 1, verbose=False)
    assert batches.mixture.cfg.label_mode == "thinkfusion"
    pack = batches.next()[0]
    trained = tok.decode([int(t) for t in pack["labels"][0] if t != -100])   # the sample, repeated to fill it
    k = len(pack["cu_seqlens"]) - 1
    assert k >= 1 and trained == "There are 3 circles.<|im_end|>" * k, trained
    assert tok.decode(pack["input_ids"][0].tolist()).count("<think>\n\n</think>\n\nThere are 3") == k


# ----------------------------------------------------------------------------------------------
# the schedule's constant mode, AdamW's decay groups, the aux term's world factor, --step_scale, the soup of N

def test_the_constant_schedule_holds_the_peak_lr_after_the_warm_up():
    """--schedule=constant: linear warm-up, then the peak LR to the last step (no cosine, no floor)."""
    cfg, _ = cfg_of("lm0", "--schedule=constant", "--warmup_steps=4", "--steps=20", "--min_lr_ratio=0.1")
    got = [train_stage.lr_multiplier(s, cfg) for s in range(20)]
    assert got == [0.25, 0.5, 0.75] + [1.0] * 17
    cfg.schedule = "cosine"                                   # not vacuous: the cosine ends near the floor
    assert train_stage.lr_multiplier(19, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))


def test_adamw_decays_the_matrices_only():
    """build_optimizer: with zero gradients AdamW's update is its decoupled decay alone, so by hand
    every matrix is multiplied by (1 - lr x weight_decay) and every vector (biases, norm scales) stays."""
    cfg, _ = cfg_of("lm0", "--lr=0.01", "--weight_decay=0.1")
    model = modeling.build_model("tiny", seed=0)
    params = list(model.parameters())
    opt = train_stage.build_optimizer(cfg, params, cuda=False)
    before = params_of(model)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    n_mat = n_vec = 0
    for k, p in model.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p.detach(), before[k] * (1 - 0.01 * 0.1), rtol=1e-6, atol=0)
            n_mat += 1
        else:
            assert torch.equal(p.detach(), before[k]), k
            n_vec += 1
    assert n_mat and n_vec


def test_the_moe_aux_term_is_scaled_by_the_world_size_like_the_ce(synth):
    """The one world-size convention (FSDP averages gradients over ranks): every share of the loss,
    the aux term's too, is multiplied by `world`. One process with world=2 (no process group: the
    global target count is this process's) backprops 2 x (CE token mean + coef x mean aux)."""
    samples, _ = fixed_samples(synth, n=8)
    mcfg = modeling.preset_config("tiny-moe")
    mcfg.llm_config.router_aux_loss_coef = 0.5
    torch.manual_seed(0)
    model = modeling.SAILVL(mcfg)
    model.init_weights()
    params = list(model.parameters())
    packs = packs_of(samples, 400)
    ce, n, aux = 0.0, 0, 0.0
    for p in packs:
        out = model(p["input_ids"], p["pixel_values"], labels=p["labels"], position_ids=p["position_ids"],
                    cu_seqlens=p["cu_seqlens"])
        ce, n, aux = ce + out.ce_sum, n + int(out.n_targets), aux + out.aux_loss / len(packs)
    ref_grads = torch.autograd.grad(2 * (ce / n + 0.5 * aux), params, allow_unused=True)
    opt = Recorder(params)
    train_stage.train_step(model, opt, packs, params, 1e9, 2, CPU, NOCAST)
    gate = [i for i, (k, _) in enumerate(model.named_parameters()) if k.endswith("mlp.gate.weight")]
    assert gate
    for i in gate:
        torch.testing.assert_close(opt.seen[i], ref_grads[i], rtol=1e-4, atol=1e-7)


def test_step_scale_rounds_the_steps_to_the_nearest_and_keeps_at_least_one():
    assert cfg_of("vit1", "--steps=10", "--step_scale=0.29")[0].steps == 3        # 2.9 -> 3, not 2
    assert cfg_of("vit1", "--steps=10", "--step_scale=0.21")[0].steps == 2        # 2.1 -> 2
    assert cfg_of("vit1", "--steps=10", "--step_scale=0.01")[0].steps == 1        # 0.1 -> at least one step
    assert cfg_of("vit1", "--steps=10", "--step_scale=3")[0].steps == 30


def test_the_soup_names_its_inputs_and_how_their_recipes_differ(synth, tmp_path, monkeypatch):
    """The soup logs each input's stage and step; inputs trained differently (their options but the
    seed and the run's bookkeeping, their stage's data and start) get one note naming how (the
    paper: heterogeneous merges collapse), homogeneous ones (sft4 and its twin, another seed) none."""
    monkeypatch.setattr(train_stage, "evaluate", lambda *a, **k: 0.0)        # the log is the subject here
    m = modeling.build_model("tiny", seed=3)
    for name, stage, *args in (("a", "sft4"), ("twin", "sft4-twin", "--num_workers=2"), ("b", "sft4", "--lr=0.001"),
                               ("c", "sft2")):
        run_cfg, _ = cfg_of(stage, *args)
        modeling.save_checkpoint(f"{tmp_path}/{name}", m, {"stage": stage, "step": 5, "config": dataclasses.asdict(run_cfg)},
                                 0, 1)
    m.save_pretrained(f"{tmp_path}/hf")                                      # no meta.json: an export
    cfg, _ = cfg_of("soup", f"--data_dir={synth}", f"--out_dir={tmp_path}/out", "--eval_packs=1")
    logs = []
    monkeypatch.setattr(train_stage, "print0", lambda rank, *a: logs.append(" ".join(map(str, a))))
    a, twin, b, c, hf = (f"{tmp_path}/{n}" for n in ("a", "twin", "b", "c", "hf"))
    train_stage.soup(cfg, [a, twin, hf])
    assert f"soup: averaging {a} (sft4, step 5), {twin} (sft4-twin, step 5), {hf} (no meta.json)" in logs
    assert not any(line.startswith("note:") for line in logs), logs
    logs.clear()
    train_stage.soup(cfg, [a, b, c])
    notes = [line for line in logs if line.startswith("note: the inputs were trained differently")]
    assert len(notes) == 1 and f"{b}: lr 0.0003 -> 0.001; {c}: " in notes[0] and "data_mix" in notes[0] \
        and "start 'sft3' -> 'sft1'" in notes[0] and "heterogeneous" in notes[0], notes
    assert not any("soup's held-out loss" in line for line in logs)
    run_cfg, _ = cfg_of("sft4")                                             # inputs evaluated on your held-out data
    modeling.save_checkpoint(f"{tmp_path}/own", m, {"stage": "sft4", "step": 5, "config": dataclasses.asdict(
        dataclasses.replace(run_cfg, eval_manifests="/d/heldout.jsonl"))}, 0, 1)
    logs.clear()
    train_stage.soup(cfg, [a, f"{tmp_path}/own"])
    assert [line for line in logs if "soup's held-out loss" in line] == [
        f"note: the soup's held-out loss is measured on the synthetic families' eval splits in {synth}; its inputs "
        "were evaluated on /d/heldout.jsonl: --eval_manifests=/d/heldout.jsonl measures that"]


def test_the_soup_of_three_checkpoints_is_their_mean(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(train_stage, "evaluate", lambda *a, **k: 0.0)        # the weights are the subject here
    models = [modeling.build_model("tiny", seed=s) for s in (3, 4, 5)]
    for i, m in enumerate(models):
        m.save_pretrained(f"{tmp_path}/{i}")
    cfg, _ = cfg_of("soup", f"--data_dir={synth}", f"--out_dir={tmp_path}/out", "--eval_packs=1")
    out = train_stage.soup(cfg, [f"{tmp_path}/{i}" for i in range(3)])
    got = modeling.SAILVL.from_pretrained(out).state_dict()
    for k in ("mlp1.1.weight", "language_model.lm_head.weight"):
        if k not in got:
            continue
        want = sum(m.state_dict()[k].double() for m in models) / 3
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-6)
    w = got["mlp1.1.weight"]
    assert not torch.allclose(w, (models[0].state_dict()["mlp1.1.weight"] + models[2].state_dict()["mlp1.1.weight"]) / 2)


def test_place_model_trains_only_the_stages_modules(tmp_path):
    """The loop's own model (place_model, one process): requires_grad on the stage's modules alone."""
    for stage in ("vit1", "pretrain1", "vit2"):
        cfg, mcfg = cfg_of(stage, f"--out_dir={tmp_path}", "--init-from=random")
        model, _ = train_stage.place_model(cfg, mcfg, 0, 1, CPU, lambda *a: None)
        trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trained == PAPER_TRAINS[stage], stage
