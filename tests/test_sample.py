"""sample.py: answer parsing that survives hostile output, scoring by hand-computed cases, and the
command line on a checkpoint (generation equals the model's own greedy decode)."""
import json
import os
import subprocess
import sys
import time


import data
import model as M
import sample as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_last_boxed_is_bounded_and_takes_the_last():
    assert data.last_boxed(r"so \boxed{3} no, \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert data.last_boxed("no box here") is None
    assert data.last_boxed(r"\boxed{unclosed {x}") is None
    hostile = "\\boxed{" + "{" * 200_000 + "a" * 200_000
    t0 = time.perf_counter()
    assert data.last_boxed(hostile) is None
    assert data.last_boxed(("\\boxed{" * 50_000) + "7}") == "7"
    assert time.perf_counter() - t0 < 1.0


def test_scoring_rules_by_hand():
    assert S.is_correct("<think>2+2</think>The answer is \\boxed{4.0}.", "", "4")
    assert not S.is_correct("The answer is \\boxed{5}.", "", "4")
    assert S.is_correct("<think>x</think> 4.", "", "4")                 # no box: the whole answer
    assert S.is_correct("A red circle at the top left", "a red circle at the top left.", None)
    assert not S.is_correct("a red circle", "a red circle at the top left.", None)
    assert S.word_f1("a red circle", "a red circle at the top left") == 2 * (1 * 3 / 7) / (1 + 3 / 7)
    assert S.word_f1("", "") == 1.0


def test_cli_generation_and_eval_on_a_checkpoint(tmp_path):
    m = M.build_model("tiny", seed=0)
    m.save_pretrained(tmp_path / "ck")
    synth = data.ensure_synth(tmp_path / "synth", progress=False)
    img = str(synth / "caption" / "images" / "eval_00000.png")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "ck"), "--image", img, "--prompt",
                          "Describe the image.", "--max-new-tokens", "8"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # the streamed text is the model's own greedy continuation of the univl-chat prompt
    model, tok, dcfg = S.load(str(tmp_path / "ck"))
    want = S.answer(model, tok, dcfg, "Describe the image.", [img], max_new_tokens=8)
    assert out.stdout.rstrip("\n") == want
    rep = S.evaluate(model, tok, dcfg, str(synth / "count" / "eval.jsonl"), limit=3, max_new_tokens=4)
    assert rep["n"] == 3 and set(rep["tasks"]) == {"count"}
    json.dumps(rep)
