"""The CPU benches of tests/bench.py run at tiny sizes through their command line, and their
baselines are what they claim: HF's twin of our LLM computes our loss and our greedy tokens.

Speed is not asserted (CPU timings on a shared machine are noise); what is asserted is that each
bench runs and prints its ratio, so a change to a component's API cannot silently break a bench.
"""
import re

import pytest
import torch

import bench


def run_bench(capsys, *argv) -> str:
    assert bench.main(list(argv)) == 0
    return capsys.readouterr().out


def test_attention_bench_times_both_torch_variants(capsys):
    out = run_bench(capsys, "attention", "--total", "96", "--lengths", "8", "40", "--heads", "2", "--dim", "16")
    assert "the torch path picks:" in out
    for method in ("sdpa per-sample loop", "sdpa block-diag mask"):
        assert re.search(rf"^  {method} +[\d.]+ +[\d.]+ .* [\d.]+x$", out, re.M), out


def test_moe_bench_prints_the_skewed_to_uniform_ratio(capsys):
    out = run_bench(capsys, "moe", "--tokens", "64", "--experts", "4", "--hidden", "32", "--inter", "48")
    assert re.search(r"^  loop \(HF v4\) .* [\d.]+x$", out, re.M), out
    assert re.search(r"skewed / uniform fwd\+bwd time: [\d.]+x", out), out


def test_packing_bench_beats_padding_on_both_streams(capsys):
    out = run_bench(capsys, "packing", "--samples", "600", "--steps", "3", "--ranks", "2")
    fills = re.findall(r"^(longtail|anyres) +600 +\d+ +([\d.]+)% +([\d.]+)% +([\d.]+)%", out, re.M)
    assert [f[0] for f in fills] == ["longtail", "anyres"], out
    assert all(float(packed) > float(pad) for _, pad, _, packed in fills)


def test_video_bench_seeks_to_the_same_frames_as_decoding_from_the_start(capsys):
    out = run_bench(capsys, "video", "--seconds", "4", "--size", "64", "--gop", "10", "--frames", "4",
                    "--tile", "32", "--repeats", "1")
    assert re.search(r"^  seeking +[\d.]+ ms +[\d.]+ ms$", out, re.M), out
    assert re.search(r"^  speed-up +[\d.]+x +[\d.]+x +\(frames identical: True\)$", out, re.M), out


def test_step_bench_hf_twin_has_our_first_loss(capsys):
    out = run_bench(capsys, "step", "--seq", "32", "--batch", "2", "--repeats", "1")
    ours, hf = re.search(r"first-step loss: ours ([\d.]+) \| HF ([\d.]+)", out).groups()
    assert ours == hf, out
    assert re.search(r"ratio ours / HF [\d.]+x", out), out


def test_decode_bench_hf_generate_gives_our_greedy_tokens(capsys):
    out = run_bench(capsys, "decode", "--batch", "2", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1")
    assert "greedy outputs identical: True" in out, out


def test_varlen_baseline_says_why_it_is_skipped(capsys):
    q = k = v = torch.zeros(8, 2, 16)                         # fp32: torch's varlen_attn takes bf16 / fp16 only
    assert bench.torch_varlen_attention([8], q, k, v, torch.tensor([0, 8], dtype=torch.int32), True) == {}
    assert "torch varlen_attn: skipped (" in capsys.readouterr().out


def test_a_usage_mistake_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["step", "--seq", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seq" in err, err


def test_rollout_bench_times_our_engine_against_hf(capsys):
    out = run_bench(capsys, "rollout", "--case", "both", "--batch", "4", "--prompt-len", "8", "--new-tokens", "4",
                    "--prompts", "2", "--group", "2", "--repeats", "1", "--no-compile", "--episode-procs", "0")
    assert len(re.findall(r"^  eager +[\d,]+ tok/s, +[\d.]+x HF", out, re.M)) == 2, out
    out = run_bench(capsys, "rollout", "--case", "rl", "--prompts", "1", "--group", "2", "--repeats", "1",
                    "--no-compile", "--episode-procs", "0", "--dtype", "bf16")     # as RL generates on a GPU
    assert "rollout engine vs HF generate, bf16," in out and re.search(r"^  eager +[\d,]+ tok/s", out, re.M), out
    with pytest.raises(SystemExit):                                   # its profile is of the CPU's fp32 step
        bench.main(["rollout", "--case", "text", "--breakdown", "--dtype", "bf16", "--episode-procs", "0"])
    assert "--breakdown profiles the CPU's fp32 decode step" in capsys.readouterr().err


def test_checkpoint_bench_writes_with_both_writers(capsys):
    out = run_bench(capsys, "checkpoint", "--preset", "tiny", "--layers", "1")
    assert "step checkpoint of 'tiny' with 1 LLM and ViT layers" in out, out
    for writer in ("ours", "dcp"):
        assert re.search(rf"^  {writer} +resident memory added while writing +[\d.]+ GiB .* \| +[\d.]+ s$", out, re.M), out


def test_load_bench_reads_with_both_loaders_and_its_baseline_loads_the_same_weights(capsys, tmp_path):
    out = run_bench(capsys, "load", "--preset", "tiny-moe", "--layers", "1")
    assert "from_pretrained of 'tiny-moe' with 1 LLM and ViT layers" in out, out
    for loader in ("ours", "stacked"):
        assert re.search(rf"^  {loader} +host memory added beyond the model +-?[\d.]+ GiB .* \| +[\d.]+ s$", out, re.M), out
    import model as modeling
    torch.manual_seed(0)
    modeling.build_model("tiny-moe", seed=0).save_pretrained(str(tmp_path / "ck"))   # initialised: no NaN to compare
    ours = modeling.SAILVL.from_pretrained(str(tmp_path / "ck")).state_dict()
    base = bench.stacked_from_pretrained(str(tmp_path / "ck")).state_dict()
    assert ours.keys() == base.keys() and all(torch.equal(ours[k], base[k]) for k in ours)


def test_start_bench_places_a_random_model_both_ways(capsys):
    """(The way the stages take gives the whole build's weights, a tensor at a time: the composed-start
    tests in tests/test_train_stage.py; the baseline makes the same tensors, all before the first is sent.)"""
    out = run_bench(capsys, "start", "--preset", "tiny", "--layers", "1")
    assert "random start of 'tiny' with 1 LLM and ViT layers on 2 processes" in out, out
    for made in ("tensors", "whole"):
        assert re.search(rf"^  {made} +rank 0's host memory added beyond its shards +-?[\d.]+ GiB .* \| +[\d.]+ s$",
                         out, re.M), out
