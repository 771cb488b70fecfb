"""What a run at scale needs, tested on the CPU: the chunked training loss equals the full-logits
loss in value and in every gradient; activation checkpointing (--ac=block) recomputes every LLM and
ViT block in backward, keeps far fewer tensors and leaves the step's gradients unchanged; nothing of
a micro-batch outlives it; the FLOP count behind MFU against a hand count; the step line's new
fields; tests/bench_memory.py's estimate runs; sample.py --device puts every input on the model's
device."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import model as modeling
import sample
import train_stage
from test_train_stage import Recorder, fixed_samples, packs_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOCAST = lambda: torch.autocast("cpu", enabled=False)                    # noqa: E731
CPU = torch.device("cpu")


def tiny_batch(seed=0, rows=2, length=60, tiles=2):
    """A tiny SAILVL, two rows with image slots in the first, labels with an ignored prompt."""
    torch.manual_seed(seed)
    model = modeling.build_model("tiny", seed=seed)
    cfg = model.cfg
    ids = torch.randint(300, cfg.llm_config.vocab_size, (rows, length))
    ids[0, 3:3 + tiles * cfg.tokens_per_tile] = cfg.img_context_token_id
    labels = ids.masked_fill(ids == cfg.img_context_token_id, -100)
    labels[:, :5] = -100
    pixels = torch.randn(tiles, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    return model, ids, labels, pixels


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [7, 64, 4096])              # ragged last chunk, several chunks, one chunk
def test_chunked_loss_and_every_gradient_equal_the_full_logits_path(monkeypatch, chunk):
    model, ids, labels, pixels = tiny_batch()
    full = modeling.shifted_cross_entropy(model(ids, pixels).logits, labels)   # the (T, V) fp32 logits, as before
    want = grads_of(model, full[0])
    monkeypatch.setattr(modeling, "CE_CHUNK", chunk)
    out = model(ids, pixels, labels=labels)                             # what the training step calls
    assert out.logits is None                                           # no (T, V) logits in training
    got = grads_of(model, out.ce_sum)
    assert int(out.n_targets) == int(full[1]) > 0
    assert float(out.ce_sum.detach()) == pytest.approx(float(full[0].detach()), rel=1e-6)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))   # every parameter
    for name in want:                      # fp32 sums in another order: 1e-6 of the tensor's largest entry
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * float(want[name].abs().max()))


def count_body_calls(model, monkeypatch) -> dict:
    calls = {"llm": 0, "vit": 0}
    for key, cls in (("llm", modeling.DecoderLayer), ("vit", modeling.vit.Block)):
        real = cls.body

        def body(self, *a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(cls, "body", body)
    return calls


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_activation_checkpointing_recomputes_each_block_keeps_less_and_changes_no_gradient(monkeypatch):
    model, ids, labels, pixels = tiny_batch()
    cfg = model.cfg
    pack = {"input_ids": ids[:1], "labels": labels[:1], "pixel_values": pixels,
            "position_ids": torch.arange(ids.shape[1])[None], "cu_seqlens": torch.tensor([0, 20, ids.shape[1]],
                                                                                         dtype=torch.int32)}
    calls = count_body_calls(model, monkeypatch)
    params = list(model.parameters())
    results = {}
    for on in (False, True):
        modeling.set_activation_checkpointing(model, on)
        calls.update(llm=0, vit=0)
        kept, _ = saved_bytes(lambda: train_stage.forward_pack(model, pack))
        calls.update(llm=0, vit=0)
        opt = Recorder(params)
        train_stage.train_step(model, opt, [pack], params, 1e9, 1, CPU, NOCAST)   # the real step
        results[on] = (kept, dict(calls), opt.seen)
    n_llm, n_vit = cfg.llm_config.num_hidden_layers, cfg.vision_config.num_hidden_layers
    assert results[False][1] == {"llm": n_llm, "vit": n_vit}
    assert results[True][1] == {"llm": 2 * n_llm, "vit": 2 * n_vit}     # forward, then again in backward
    assert results[True][0] < 0.5 * results[False][0], (results[True][0], results[False][0])
    for a, b in zip(results[False][2], results[True][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():                                                # generation: nothing recomputed
        calls.update(llm=0, vit=0)
        model.generate([ids[0, :45].tolist()], pixels, max_new_tokens=2)
        assert calls["llm"] > 0 and calls == {"llm": calls["llm"], "vit": n_vit}


def test_ac_option_reaches_every_block_through_the_stage_config(tmp_path):
    cfg, mcfg, _ = train_stage.parse_args(["--stage", "vit3", "--ac=block", "--init-from=random", f"--out_dir={tmp_path}"])
    model, _ = train_stage.place_model(cfg, mcfg, 0, 1, CPU, lambda *a: None)
    blocks = [*model.language_model.model.layers, *model.vision_model.trunk.blocks]
    assert all(b.checkpoint_activations for b in blocks)
    cfg, mcfg, _ = train_stage.parse_args(["--stage", "vit3", "--init-from=random", f"--out_dir={tmp_path}"])
    assert cfg.ac == "none" and not any(b.checkpoint_activations for b in train_stage.place_model(
        cfg, mcfg, 0, 1, CPU, lambda *a: None)[0].language_model.model.layers)


def test_step_flops_against_a_hand_count():
    """PaLM's count written out for the tiny preset: per token 6 N (trains) / 4 N (frozen, gradients
    cross) / 2 N (forward only) of the matmul weights, plus attention over each sample's pairs."""
    model = modeling.build_model("tiny", device="meta")
    cfg = model.cfg
    L, V = cfg.llm_config, cfg.vision_config
    H, hd, I = L.hidden_size, L.head_dim, L.intermediate_size
    n_llm = L.num_hidden_layers * (H * L.num_attention_heads * hd * 2 + 2 * H * L.num_key_value_heads * hd
                                   + 3 * H * I) + L.vocab_size * H
    D = V.hidden_size
    n_vit = V.num_hidden_layers * (4 * D * D + 3 * D * V.intermediate_size) + 3 * V.patch_size ** 2 * D
    n_mlp1 = 4 * D * H + H * H
    weights = modeling.matmul_weights(model)
    assert weights == {"vision_model": n_vit, "mlp1": n_mlp1, "language_model": n_llm}
    P = V.grid ** 2                                                       # patches per 112-px tile
    pack = {"cu_seqlens": torch.tensor([0, 100, 130]), "pixel_values": torch.zeros(2, 3, 112, 112)}
    att_llm = L.num_hidden_layers * L.num_attention_heads * hd * (100 ** 2 + 30 ** 2)
    att_vit = V.num_hidden_layers * D * 2 * P ** 2
    everything = 6 * (n_llm * 130 + n_vit * 2 * P + n_mlp1 * 2 * P // 4) + 12 * (att_llm + att_vit)
    assert modeling.training_flops(cfg, weights, [pack], list(modeling.MODULES)) == everything
    adapter_only = 2 * n_vit * 2 * P + 4 * att_vit + 6 * n_mlp1 * 2 * P // 4 + 4 * n_llm * 130 + 12 * att_llm
    assert modeling.training_flops(cfg, weights, [pack], ["mlp1"]) == adapter_only   # vit1: ViT forward only, LLM crossed
    moe = modeling.build_model("tiny-moe", device="meta")
    c = moe.cfg.llm_config
    dense_part = weights["language_model"] - L.num_hidden_layers * 3 * H * I
    active = c.num_hidden_layers * (3 * H * c.moe_intermediate_size * c.num_experts_per_tok + c.num_experts * H)
    assert modeling.matmul_weights(moe)["language_model"] == dense_part + active


def test_step_report_fields():
    cfg = train_stage.StageConfig(steps=10)
    cfg.packing.max_tokens, cfg.packing.micro_batches = 100, 2
    res = {"loss": 1.5, "grad_norm": 0.5, "tokens": 360}
    rec, line = train_stage.step_report(3, cfg, res, 1e-3, {"step": 2.0, "data": 0.5}, 2, CPU)
    assert rec["tok_per_s"] == 180 and rec["tok_per_s_per_device"] == 90 and rec["data_wait_frac"] == 0.25
    assert rec["pad_frac"] == pytest.approx(0.1) and rec["peak_mem_gib"] > 0.01 and "mfu" not in rec
    assert line.startswith("step 00003/00010 | loss 1.5000 | lr 1.00e-03 | gnorm 0.500 | tok/s 180 | pad 10.0% |")
    assert "tok/s/dev 90 |" in line and " GiB | data 25%" in line and "mfu" not in line
    rec, line = train_stage.step_report(3, cfg, res, 1e-3, {"step": 2.0, "data": 0.5, "ideal": 0.8}, 2, CPU)
    assert rec["mfu"] == pytest.approx(0.2) and "| mfu 20.0% |" in line


def test_the_step_line_and_metrics_of_a_run(synth, tmp_path):
    out = train_stage.run_stage("lm0", [f"--data_dir={synth}", f"--out_dir={tmp_path}", "--steps=2", "--save_every=0",
                              "--eval_every=0", "--packing.max_tokens=256"])
    recs = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    assert len(recs) == 2
    for r in recs:
        assert r["tok_per_s_per_device"] == pytest.approx(r["tok_per_s"]) and 0 <= r["data_wait_frac"] < 1
        assert r["peak_mem_gib"] > 0.05 and "mfu" not in r                # CPU: the process's peak RSS, no MFU


BENCH = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[:1]
import bench_memory
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
undo = bench_memory.patched()
peaks = {(ac, loss): bench_memory.estimate("tiny", 512, 4, 2, ac, loss)["Total"] for ac, loss in
         (("none", "full"), ("none", "chunked"), ("block", "chunked"))}
print(peaks)
assert peaks[("none", "chunked")] < peaks[("none", "full")] and peaks[("block", "chunked")] < peaks[("none", "chunked")]
"""


def test_bench_memory_estimates_under_a_fake_process_group(tmp_path):
    """tests/bench_memory.py's estimate runs (FSDP2 under a fake process group, fake tensors) and
    orders the options: the chunked loss and --ac=block each lower the peak."""
    (tmp_path / "b.py").write_text(BENCH)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(tmp_path / "b.py"), os.path.join(ROOT, "tests")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_nothing_of_a_micro_batch_is_alive_when_the_next_one_runs(synth, monkeypatch):
    """train_step drops each micro-batch's output (a MoE model's router logits, the CE sum) before
    the next forward: the previous one's tensors are freed by then."""
    import weakref

    samples, _ = fixed_samples(synth, n=4)
    torch.manual_seed(0)
    model = modeling.SAILVL(modeling.preset_config("tiny-moe"))
    model.init_weights()
    packs = packs_of(samples, 200)
    assert len(packs) >= 2
    alive, real = [], train_stage.forward_pack

    def watching(model_, pack):
        assert all(r() is None for r in alive), "the previous micro-batch's output is still referenced"
        out = real(model_, pack)
        alive.extend(weakref.ref(t) for t in (out.ce_sum, *out.router_logits))
        return out
    monkeypatch.setattr(train_stage, "forward_pack", watching)
    params = list(model.parameters())
    train_stage.train_step(model, Recorder(params), packs, params, 1e9, 1, CPU, NOCAST)
    assert len(alive) == len(packs) * (1 + model.cfg.llm_config.num_hidden_layers)


def test_sample_device_option_moves_every_input_to_the_models_device(synth):
    """The batched evaluation hands generate pixels on the model's device (a meta-device model
    stands in for a GPU one); --device cuda without a GPU is one line and exit 2."""
    class Spy:
        def parameters(self):
            return iter([torch.empty(0, device="meta")])

        def generate(self, prompts, pixels, **kw):
            self.pixels = pixels
            return [[] for _ in prompts]
    spy, tok = Spy(), data.load_tokenizer(None)
    items = [sample.Item([1, 2], torch.zeros(1, 3, 8, 8), 4), sample.Item([3], torch.zeros(2, 3, 8, 8), 4)]
    sample.generate_batch(spy, tok, items)
    assert spy.pixels.device.type == "meta" and spy.pixels.shape[0] == 3
    assert [p.device.type for p in modeling.on_device([torch.zeros(3, 8, 8)], modeling.model_device(spy))] == ["meta"]   # AnyRes lists
    assert modeling.on_device(None, torch.device("meta")) is None
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "sample.py", "--ckpt", str(synth), "--device", "cuda"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "--device: " in res.stderr \
        and "got 'cuda'" in res.stderr
