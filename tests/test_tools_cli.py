"""The tools' command lines (tests/synth.py, curate.py, bench.py, calibrate.py) refuse a user's mistake
in one line naming the option, with exit status 2 (1: an input that exists but is unusable), and no
traceback; run through each tool's main(argv) as a user runs it, and two through the scripts that
forward to them (rl.py bench, train_stage.py calibrate). Tiny inputs: the whole file takes seconds."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import calibrate
import curate
import model as modeling
import moe
import synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(main, argv, capsys, code=2) -> str:
    """main(argv) exits with `code` and one error line (its last stderr line; progress bars may
    precede it), no traceback: that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last, err
    return last


def run_script(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- tests/synth.py ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [(["--size", "-5"], "--size"), (["--size", "0"], "--size"),
                                          (["charts", "--n", "0"], "--n"), (["charts", "--n", "-2"], "--n")])
def test_synth_refuses_a_count_below_1(tmp_path, capsys, argv, option):
    line = refused(synth.main, argv + ["--out", str(tmp_path / "s")], capsys)
    assert f"{option} must be at least 1" in line
    assert not (tmp_path / "s").exists()                     # nothing written


@pytest.mark.parametrize("charts", [[], ["charts", "--n", "1"]])
def test_synth_unwritable_out_is_one_line(tmp_path, capsys, charts):
    (tmp_path / "file").write_text("")
    line = refused(synth.main, charts + ["--out", str(tmp_path / "file" / "s"), "--size", "1"], capsys)
    assert f"--out {tmp_path / 'file' / 's'}: cannot write there" in line


def test_synth_charts_help_says_out_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        synth.main(["charts", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "output folder (required)" in out and "default: None" not in out


# --- tests/curate.py ---------------------------------------------------------------------------

@pytest.fixture
def manifests(tmp_path):
    """good.jsonl (two text records: filter keeps them unscored), bad.jsonl (a blank line, then bad
    JSON and a bad record), empty.jsonl."""
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(2)))
    (tmp_path / "bad.jsonl").write_text('\nnot json\n{"x": 1}\n')
    (tmp_path / "empty.jsonl").write_text("")
    return tmp_path


def test_curate_filter_out_folder_is_refused_before_the_work(manifests, capsys):
    line = refused(curate.main, ["filter", str(manifests / "good.jsonl"), str(manifests)], capsys)
    assert f"OUT {manifests} is a folder" in line


def test_curate_filter_fails_clearly_on_a_manifest_with_nothing_usable(manifests, capsys):
    line = refused(curate.main, ["filter", str(manifests / "empty.jsonl"), str(manifests / "o.jsonl")], capsys, 1)
    assert line.endswith(f"{manifests / 'empty.jsonl'}: holds no records")
    line = refused(curate.main, ["filter", str(manifests / "bad.jsonl"), str(manifests / "o.jsonl")], capsys, 1)
    assert "no usable record" in line and "bad:json 1" in line and f"{manifests / 'bad.jsonl'}:2" in line
    curate.main(["filter", str(manifests / "good.jsonl"), str(manifests / "o.jsonl")])     # still fine
    assert "kept_unscored                2" in capsys.readouterr().out


def test_the_curation_pipelines_fail_clearly_on_an_input_with_nothing_usable(manifests, capsys):
    out = str(manifests / "out")
    line = refused(curate.main, ["curate-instructions", "--in", str(manifests / "bad.jsonl"), "--out", out], capsys, 1)
    assert "no usable record" in line and "json" in line
    line = refused(curate.main, ["curate-video", "--in", str(manifests / "bad.jsonl"), "--out", out], capsys, 1)
    assert "no usable record" in line and f"{manifests / 'bad.jsonl'}:2" in line


@pytest.mark.parametrize("argv, message", [
    (["caption2qa", "M", "O", "--pairs", "-1"], "--pairs must be at least 0"),
    (["curate-instructions", "--in", "M", "--out", "O", "--cap", "-1"], "--cap must be above 0"),
    (["curate-instructions", "--in", "M", "--out", "O", "--classes", "0"], "--classes must be at least 1"),
    (["curate-instructions", "--in", "M", "--out", "O", "--reannotate-frac", "5"],
     "--reannotate-frac must be in [0, 1]"),
    (["curate-video", "--in", "M", "--out", "O", "--num-frames", "0"], "--num-frames must be at least 1"),
    (["curate-video", "--in", "M", "--out", "O", "--num-frames", "-3"], "--num-frames must be at least 1"),
    (["curate-instructions", "--in", "M", "--out", "O", "--annotator", "NOPE"], "--annotator NOPE: no such folder"),
    (["curate-video", "--in", "M", "--out", "O", "--scorer", "NOPE"], "--scorer NOPE: no such folder")])
def test_curate_bad_option_values_are_refused_naming_the_option(manifests, capsys, argv, message):
    names = {"M": str(manifests / "good.jsonl"), "O": str(manifests / "out"), "NOPE": str(manifests / "nope")}
    line = refused(curate.main, [names.get(a, a) for a in argv], capsys)
    assert message.replace("NOPE", names["NOPE"]) in line
    assert not (manifests / "out").exists()


# --- tests/bench.py ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["step", "--preset=huge"], "argument --preset: invalid choice: 'huge'"),
    (["video", "--seconds", "0"], "argument --seconds: must be at least 1"),
    (["attention", "--total", "0"], "argument --total: must be at least 1"),
    (["moe", "--routing", "foo"], "argument --routing: expected a comma list of uniform, skewed"),
    (["packing", "--max_tokens", "0"], "argument --max-tokens: must be at least 1")])
def test_bench_bad_option_values_are_one_line(capsys, argv, message):
    assert message in refused(bench.main, argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no CUDA")
def test_bench_rollout_on_cuda_without_cuda_is_one_line(capsys):
    assert "argument --device: expected cpu or cuda[:N] (no CUDA device here), got 'cuda'" in \
        refused(bench.main, ["rollout", "--device=cuda"], capsys)


def test_bench_packing_takes_underscored_options(capsys):
    assert bench.main(["packing", "--max_tokens", "2048", "--samples", "40", "--steps", "2", "--ranks", "2"]) == 0
    assert "max_tokens=2048" in capsys.readouterr().out


def test_bench_help_lists_every_bench_with_whole_sentences(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")          # no line wrap, which splits hyphenated words ("held- out")
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for fn in (bench.bench_packing, bench.bench_video, bench.bench_step, bench.bench_adalrs, bench.bench_decode,
               bench.bench_rollout, bench.bench_checkpoint):
        assert bench.summary(fn).endswith(".") and bench.summary(fn) in out
    assert "engines interleaved." in out and "measured in one run." in out      # were cut mid-sentence
    assert " memory the memory of one training step" in out


def test_rl_bench_forwards_and_refuses_in_one_line():
    done = run_script("rl.py", "bench", "--preset=huge")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "argument --preset: invalid choice: 'huge'" in done.stderr


# --- tests/calibrate.py, moe.contrast_directions -----------------------------------------------

def test_a_correction_of_rank_0_is_refused():
    h = torch.randn(64, 8)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        moe.contrast_directions(h, h, rank=0)                # was: every column, a full-rank correction


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    modeling.build_model("tiny").save_pretrained(str(d / "dense"))
    (d / "t.jsonl").write_text(json.dumps({"text": "a sample"}) + "\n")
    return d


def test_calibrate_mistakes_are_one_line(dense_ckpt, capsys):
    ckpt, manifest = str(dense_ckpt / "dense"), str(dense_ckpt / "t.jsonl")
    base = ["--ckpt", ckpt, "--data", manifest]
    assert "--rank must be at least 1, got 0" in refused(calibrate.main, base + ["--rank", "0"], capsys)
    for option, value, want in (("--lr", "0", "> 0"), ("--temperature", "0", "> 0"), ("--kl-weight", "-1", ">= 0"),
                                ("--lr", "nan", "> 0")):
        assert f"{option} must be a number {want}, got {float(value)}" in \
            refused(calibrate.main, base + [option, value], capsys)
    assert "no MoE layer" in refused(calibrate.main, base + ["--kl-weight", "0"], capsys, code=1)   # 0 is allowed
    line = refused(calibrate.main, ["--ckpt", str(dense_ckpt / "nope"), "--data", manifest], capsys)
    assert f"--ckpt {dense_ckpt / 'nope'}: no such folder" in line
    assert f"--data {dense_ckpt / 'nope.jsonl'}: no such file" in \
        refused(calibrate.main, ["--ckpt", ckpt, "--data", str(dense_ckpt / "nope.jsonl")], capsys)
    # --max_samples is --max-samples: accepted, then the dense model is refused before any data is read
    with pytest.raises(SystemExit) as e:
        calibrate.main(base + ["--max_samples", "8"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err             # an input that exists but is unusable
    assert err.strip().endswith("the model has no MoE layer: calibration tunes MoE routers (a tiny-moe or 30b-a3b "
                                "checkpoint)"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no CUDA")
def test_calibrate_on_cuda_without_cuda_is_one_line(dense_ckpt, capsys):
    line = refused(calibrate.main, ["--ckpt", str(dense_ckpt / "dense"), "--data", str(dense_ckpt / "t.jsonl"),
                                    "--device", "cuda"], capsys)
    assert "--device: expected cpu or cuda[:N] (no CUDA device here), got 'cuda'" in line


def test_train_stage_calibrate_forwards_underscored_options():
    done = run_script("train_stage.py", "calibrate", "--ckpt", "x", "--data", "y", "--max_samples", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == "tests/calibrate.py: error: --max-samples must be at least 1, got 0"
