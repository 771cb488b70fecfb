"""sample.py: answer extraction per synthetic family (reference replies score 1, wrong ones 0,
hostile output stays fast), batched evaluation against one-prompt-at-a-time greedy decoding and
against a stand-in model that answers from a table built independently with data.prompt_inputs,
blank images, chance levels by hand, the VLMEvalKit TSV reader, and the command line (generation
equals the model's own greedy decode; usage and input errors are one line on stderr)."""
import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import data
import model as modeling
import recipe
import sample
import synth as synthetic      # the name `synth` is the data fixture
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain little from a second OpenMP thread, and on a shared 2-core machine two
    spinning threads per process stalled the batched test 30-fold (82 s vs 2.4 s); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    m = modeling.build_model("tiny", seed=0).eval()
    tok = data.load_tokenizer(None)
    return m, tok, data.DataConfig.from_model(m.cfg)


QUIET = sample.EvalMode(progress=False)
QUIET_BLANK = sample.EvalMode(blank=True, progress=False)


def eval_records(synth, family, limit=None):
    ds = data.JsonlDataset(synth / family / "eval.jsonl", None, None)
    return [ds.record(i) for i in range(len(ds) if limit is None else limit)]


def held_back(text):
    """The test's own split of a synthetic text record: (prompt, final word + period)."""
    body = text.rstrip()
    cut = body.rstrip(".").rfind(" ")
    return body[:cut], body[cut:]


# ----------------------------------------------------------------------------------------------
# scoring

def test_every_familys_reference_replies_score_one(synth):
    """The assistant turn of every eval record of a fresh synthetic set, fed back as the prediction."""
    assert set(sample.synth_families(synth)) == set(data.SYNTH_FAMILIES)
    for family in data.SYNTH_FAMILIES:
        recs = eval_records(synth, family)
        assert len(recs) >= 32
        for rec in recs:
            if rec.text is not None:
                reference = held_back(rec.text)[1]
                ok, got = sample.score("text", reference, sample.split_last_word(rec)[1], None)
            else:
                reference = rec.turns[-1][1]
                ok, got = sample.score(family, reference, reference, rec.answer)
            assert ok, (family, reference, rec.answer, got)


CAPTION = "a green triangle at the bottom right and a blue square at the middle centre."

RIGHT = [  # (family, reply, gold): other wordings of a right answer
    ("count", "2", "2"), ("count", "There are two circles", "2"), ("count", "THE ANSWER IS \\boxed{2}.", "2"),
    ("count", "<think>I see 3 things, no, 2</think>There are 2 circles.", "2"),
    ("math", "<think>\n2 + 2 is 4.\n</think>\nThe answer is \\boxed{4.0}.", "4"), ("math_direct", "It is 12.", "12"),
    ("count_cot", "<think>a, b, c</think> so \\boxed{3}", "3"),
    ("chart", "Dog.", "dog"), ("chart", "The largest slice is dog, with 5.", "dog"),
    ("chart", "cat has the value 6", "6"), ("chart", "There are 4 bars.", "4"),
    ("ocr", "The word is QUEEN.", "queen"), ("ocr", "queen", "queen"),
    ("multi", "Yes, they do.", "yes"), ("multi", "The second one.", "second"), ("multi", "no", "no"),
    ("video", "It moves upwards.", "up"), ("video", "to the LEFT", "left"),
    ("caption_qa", "It is purple.", "purple"), ("caption_qa", "The triangle is at the Bottom Left.", "bottom left"),
    ("caption_qa", "That is a square", "square"), ("caption_qa", "at the middle center.", "middle centre"),
    ("caption_qa", "a red triangles.", "triangle"),
]
WRONG = [  # (family, reply, gold): wrong answers, including ones that mention the right one
    ("count", "There are 3 circles.", "2"), ("count", "", "2"), ("count", "circles", "2"),
    ("math", "<think>\n2 + 2 is 4.\n</think>\nThe answer is \\boxed{5}.", "4"),
    ("math_direct", "The answer is \\boxed{4}. Or 3.", "3"), ("count_cot", "<think>3</think> \\boxed{}", "3"),
    ("chart", "cat", "dog"), ("chart", "The value is 7.", "6"), ("chart", "6", "dog"),
    ("ocr", "tiger", "queen"), ("ocr", "The word is tiger, not queen.", "queen"),
    ("multi", "no.", "yes"), ("multi", "the first image.", "second"),
    ("video", "It moves up.", "down"), ("video", "It moves.", "down"),
    ("caption_qa", "blue.", "purple"), ("caption_qa", "at the top left.", "bottom left"),
    ("caption_qa", "a circle.", "triangle"), ("caption_qa", "bottom", "bottom left"),
]


def test_hand_made_replies_score_as_a_reader_would():
    for family, reply, gold in RIGHT:
        assert sample.score(family, reply, "", gold)[0], (family, reply, gold)
    for family, reply, gold in WRONG:
        assert not sample.score(family, reply, "", gold)[0], (family, reply, gold)
    # caption: exactly the reference's objects, each with its colour, shape and position
    assert sample.score("caption", "A blue square in the middle center, and a green triangle at the bottom right.", CAPTION, None)[0]
    for wrong in ("a green triangle at the bottom right.",                                   # one missing
                  "a blue triangle at the bottom right and a green square at the middle centre.",  # swapped
                  "a green triangle at the middle centre and a blue square at the bottom right.",  # moved
                  CAPTION[:-1] + " and a red circle at the top left."):                         # one extra
        assert not sample.score("caption", wrong, CAPTION, None)[0], wrong
    # text: the held-back word, as the first word of the continuation
    assert sample.score("text", " water. the", " water.", None)[0] and not sample.score("text", " wat", " water.", None)[0]
    # the held-back word itself: "circle" is not "circles" (the shape families fold plurals, this one must not)
    assert sample.score("text", " circles.", " circles.", None) == (True, "circles")
    assert not sample.score("text", " circle.", " circles.", None)[0] and not sample.score("text", " circle is", " circles.", None)[0]
    # unknown families: \boxed{} or the whole answer against `answer`, else the exact reply
    assert sample.score("vqa", "<think>x</think> The answer is \\boxed{4.0}.", "", "4")[0]
    assert sample.score("vqa", "<think>x</think> 4.", "", "4")[0]
    assert not sample.score("vqa", "There are 4.", "", "4")[0]
    assert sample.score("vqa", "A red circle at the top left", "a red circle at the top left.", None)[0]
    assert not sample.score("vqa", "a red circle", "a red circle at the top left.", None)[0]
    # compared in the reply's own spelling, as math-verify does: 28.0 is not 28%, 28 is; 4.0 is 4
    assert not sample.score("vqa", "\\boxed{28.0}", "", "28%")[0] and sample.score("vqa", "\\boxed{28}", "", "28%")[0]
    assert not sample.score("vqa", "28.0", "28%", None)[0] and sample.score("vqa", "Paris.", "paris", None)[0]
    assert sample.score("vqa", "\\boxed{4.0}", "", "4") == (True, "4")      # reported in the normal form
    assert sample.reply_word_f1("<think>x</think>a red circle", "a red circle at the top left") == 2 * (1 * 3 / 7) / (1 + 3 / 7)
    assert sample.reply_word_f1("<think>cut off", "a red circle") == 0.0


# Each extraction rule of extract_answer's docstring, with a reply where the rule and its nearest
# wrong rule disagree (first vs last number, box vs no box, the asked kind vs the first kind, ...):
# (family, reply, gold, the answer the rule extracts)
RULES = [
    ("count", "2 circles, not 3", "2", "2"),                                  # the first number, not the last
    ("count", "I see two circles and 3 squares", "2", "2"),                  # number words count as numbers
    ("count", "Of 5 shapes, \\boxed{2} are circles", "2", "2"),              # inside the last box
    ("count", "<think>I count 3</think> There are 2.", "2", "2"),            # after </think>
    ("count", "<think>I count 3, so 3", "3", None),                          # a think never closed: no answer
    ("count", " " * 2000 + "2", "2", None),                                  # beyond MAX_SCAN
    ("math", "3 + 4 = 7", "7", "7"),                                         # no box: the last number, not the first
    ("math", "The count is 7. " + "blah " * 500 + "Final: 9", "9", "9"),     # ... of the whole reply, not its first 2,000 characters
    ("math", "-2 + 5 = 3, so -3 + 1 = -2", "-2", "-2"),                      # ... with its sign
    ("math_direct", "\\boxed{7}, and 9 is wrong", "7", "7"),                  # a box wins over later numbers
    ("count_cot", "\\boxed{3} no: \\boxed{4}", "4", "4"),                      # the last box
    ("math", "\\boxed{4.0}", "4", "4"),                                       # normalised, agrees with 4
    ("math", "so \\boxed{\\frac{1}{2}}", "0.5", "\\frac{1}{2}"),                # the whole box, not a number in it
    ("math", " " * 2000 + "7", "7", "7"),                                    # the last number: read from the end
    ("chart", "cat has 6 and dog has 4", "6", "6"),                          # numeric gold: the first number
    ("chart", "cat has 6 and dog has 4", "dog", "cat"),                      # label gold: the first label
    ("chart", "the dogs", "dog", "dog"),                                      # plural labels made singular
    ("ocr", "it says tiger, or queen", "queen", "tiger"),                    # the first vocabulary word
    ("ocr", "it reads hello", "hello", "hello"),                             # none: the last word
    ("ocr", "QUEEN", "Queen", "queen"),                                      # case does not matter
    ("multi", "no, yes", "yes", "no"),                                       # the first of yes / no / first / second
    ("multi", "the second, not the first", "second", "second"),
    ("video", "up, then down", "down", "up"),                                # the first direction
    ("video", "It moves upwards.", "up", "up"),                              # synonyms
    ("caption_qa", "a red circle at the top left", "red", "red"),            # the kind asked: colour
    ("caption_qa", "a red circle at the top left", "circle", "circle"),      # shape
    ("caption_qa", "a red circle at the top left", "top left", "top left"),  # position
    ("caption_qa", "the circle is red", None, "circle"),                     # no gold: the first of any kind
    ("caption_qa", "two blue triangles", "triangle", "triangle"),            # plurals made singular
    ("vqa", "<think>x</think> The Top Left.", "top left", "the top left"),   # other families: the span, normalised
]


def test_each_extraction_rule_is_the_documented_one():
    for family, reply, gold, want in RULES:
        got = sample.extract_answer(family, reply, gold)
        assert got == want, (family, reply, gold, got)
        right = want is not None and sample.answers_match(want, sample.normalize_answer(gold or ""))
        assert sample.score(family, reply, "", gold)[0] == right, (family, reply, gold)


HOSTILE = ["\\boxed{" * 150_000, "{" * 1_000_000, "1 " * 500_000, "a" * 1_000_000, "</think>" * 130_000,
           "<think>" + "answer is " * 100_000, " " * 1_000_000, "red circle top " * 70_000, "(" * 1_000_000,
           "A " * 500_000, "answer" + " " * 1_000_000 + "B"]


def test_hostile_replies_score_fast():
    options = {"A": "cat", "B": "dog", "C": "red circle top", "D": "1"}
    for reply in HOSTILE:
        assert len(reply) >= 1_000_000
        t0 = time.perf_counter()
        for family in list(data.SYNTH_FAMILIES) + ["vqa"]:
            sample.score(family, reply, CAPTION, None if family in ("caption", "text") else "2")
        sample.reply_word_f1(reply, CAPTION)
        sample.extract_choice(reply, options)
        assert time.perf_counter() - t0 < 0.5, reply[:20]


# ----------------------------------------------------------------------------------------------
# batched evaluation

def test_batched_greedy_equals_one_prompt_at_a_time(tiny, synth):
    """Token ids of one left-padded generate call over prompts of different lengths, with and
    without images (no image, 1 tile, 5 tiles, 2 images, 16 video frames; AnyRes images of two
    sizes), equal those of one call per prompt; and evaluate_families' replies equal `answer` run
    on each record alone."""
    m, tok, dcfg = tiny
    anyres = modeling.build_model("tiny-anyres", seed=1).eval()
    stop = sample.stop_ids(tok)
    for model, families in ((m, ("text", "caption", "chart", "multi", "video", "count")),
                            (anyres, ("text", "caption", "chart", "ocr"))):
        cfg = data.DataConfig.from_model(model.cfg)
        items = [sample.record_item(tok, cfg, rec, False, False, 10)[0] for f in families for rec in eval_records(synth, f, 2)]
        batched = model.generate([it.ids for it in items], sample.concat_pixels([it.pixels for it in items]),
                                 max_new_tokens=10, stop_tokens=stop, n_valid_tokens=tok.n_vocab)
        single = [model.generate([it.ids], it.pixels, max_new_tokens=10, stop_tokens=stop, n_valid_tokens=tok.n_vocab)[0]
                  for it in items]
        assert batched == single
        assert len({tuple(s) for s in single}) >= 3               # the prompts do lead to different replies
    rep = sample.evaluate_families(m, tok, dcfg, synth, families=["text", "chart", "video", "multi"], limit=2,
                                   mode=sample.EvalMode(batch_size=3, max_new_tokens=10, progress=False))
    assert sum(rep["n"].values()) == 8
    for p in rep["predictions"]:
        path, line = p["where"].rsplit(":", 1)
        rec = data.JsonlDataset(path, None, None).record(int(line) - 1)
        if rec.text is not None:
            ids = m.generate([data.encode(tok, held_back(rec.text)[0])], None, max_new_tokens=10, stop_tokens=stop,
                             n_valid_tokens=tok.n_vocab)[0]
            want = sample.decode_reply(tok, ids, stop)
        else:
            want = sample.answer(m, tok, dcfg, rec.turns[:-1], rec.images, rec.videos, max_new_tokens=10)
        assert p["prediction"] == want, p["where"]


def test_evaluation_and_answer_make_every_tensor_on_the_models_device(tiny, synth, monkeypatch, on_the_cpu):
    """The evaluation's batched generation (tiles, video frames, AnyRes images) and `answer`
    (sampling, streaming), run inside `torch.device("meta")`: a tensor they made without the model's
    device would raise on meeting the model's, as a CPU tensor meeting a CUDA model's does
    (conftest.on_the_cpu). Prompts are built on the CPU (data.prompt_inputs)."""
    m, tok, _ = tiny
    monkeypatch.setattr(data, "prompt_inputs", on_the_cpu(data.prompt_inputs))
    for model, families in ((m, ("text", "chart", "video")),
                            (modeling.build_model("tiny-anyres", seed=1).eval(), ("ocr", "caption"))):
        dcfg = data.DataConfig.from_model(model.cfg)
        recs = [rec for f in families for rec in eval_records(synth, f, 2)]
        items = [on_the_cpu(sample.record_item)(tok, dcfg, rec, False, False, 4)[0] for rec in recs]
        with torch.device("meta"), torch.inference_mode():
            replies = sample.generate_all(model, tok, items, batch_size=3)
            one = sample.answer(model, tok, dcfg, recs[-1].turns[:-1], recs[-1].images, recs[-1].videos,
                                max_new_tokens=4, temperature=1.0, stream=True)
        assert len(replies) == len(items) and isinstance(one, str)


def test_where_the_device_computes_in_bf16_the_loaded_model_holds_the_llms_matrices_in_it(tiny, synth, tmp_path,
                                                                                          monkeypatch):
    """On CUDA (model.COMPUTE_DTYPE; here the CPU made to compute in bf16) sample.load holds the LLM's
    matrices in bf16, cast before the model moves to the device, the lm_head untied from the fp32 embedding, the ViT and the adapter fp32, and
    the evaluation and `answer` run under bf16 autocast: the replies are the fp32 model's under
    autocast, greedy and sampled."""
    m, tok, dcfg = tiny
    m.save_pretrained(tmp_path / "ck")
    monkeypatch.setitem(modeling.COMPUTE_DTYPE, "cpu", torch.bfloat16)
    moved, to = [], modeling.SAILVL.to                   # the dtype the matrices move in (a GPU holds that)
    monkeypatch.setattr(modeling.SAILVL, "to", lambda self, *a, **k: moved.append(
        self.language_model.lm_head.weight.dtype) or to(self, *a, **k))
    read, from_pretrained = [], modeling.SAILVL.from_pretrained.__func__      # the head, its dtype as read
    monkeypatch.setattr(modeling.SAILVL, "from_pretrained", classmethod(lambda cls, *a, **k: (
        out := from_pretrained(cls, *a, **k), read.append((h := out.language_model.lm_head.weight, h.dtype)))[0]))
    held, _, _ = sample.load(str(tmp_path / "ck"))
    assert moved[-1] == torch.bfloat16
    lm = held.language_model
    (head, dtype), = read                     # read straight into bf16 (no fp32 model first), and kept: no second copy
    assert dtype == torch.bfloat16 and head is lm.lm_head.weight
    matrices = {f"language_model.{name}.weight" for name, mod in lm.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {n for n, p in held.named_parameters() if p.dtype == torch.bfloat16} == matrices
    assert lm.lm_head.weight is not lm.model.embed_tokens.weight
    rec = eval_records(synth, "chart", 1)[0]
    replies = []
    for model in (m, held):                  # the fp32 model: autocast casts its matrices in every step
        rep = sample.evaluate_families(model, tok, dcfg, synth, families=["text", "chart", "video"], limit=2,
                                       mode=sample.EvalMode(batch_size=3, max_new_tokens=6, progress=False))
        one = sample.answer(model, tok, dcfg, rec.turns[:-1], rec.images, max_new_tokens=6, temperature=1.0)
        replies.append(([p["prediction"] for p in rep["predictions"]], one))
    assert replies[0] == replies[1] and len(replies[0][0]) == 6


class TableModel:
    """Stands in for SAILVL.generate: answers each prompt from a table keyed by (prompt ids, digest of
    the prompt's own tiles), so a prompt given another prompt's pixels gets no answer. Each reply is
    followed by <|im_end|> and junk, as a batch row that keeps decoding after its stop."""

    def __init__(self, tok, dcfg, table, junk):
        self.tok, self.per_tile, self.table, self.junk, self.calls = tok, dcfg.tokens_per_tile, table, junk, []
        self.img, self.end = data.special_ids(tok).img_context, data.special_ids(tok).im_end

    def generate(self, prompts, pixel_values=None, max_new_tokens=32, temperature=0.0, top_p=1.0, stop_tokens=(),
                 generator=None, on_token=None, n_valid_tokens=None, banned=()):
        assert temperature == 0.0 and self.end in stop_tokens
        self.calls.append({"n": len(prompts), "max_new_tokens": max_new_tokens, "pixels": pixel_values})
        out, at = [], 0
        for p in prompts:
            n = p.count(self.img) // self.per_tile
            tiles = pixel_values[at:at + n] if n else None
            at += n
            reply = self.table.get((tuple(p), digest(tiles)), "")
            out.append((data.encode(self.tok, reply) + [self.end] + self.junk)[:max_new_tokens])
        assert at == (0 if pixel_values is None else len(pixel_values))
        return out


def digest(pixels):
    return None if pixels is None else hashlib.sha1(pixels.numpy().tobytes()).hexdigest()


def reference_table(tok, dcfg, synth, limit, think):
    """{(prompt ids, tiles digest): reference reply} built with data.prompt_inputs, not sample.py."""
    table = {}
    for family in data.SYNTH_FAMILIES:
        for rec in eval_records(synth, family, limit):
            if rec.text is not None:
                prompt, ref = held_back(rec.text)
                table[(tuple(data.encode(tok, prompt)), None)] = ref
                continue
            s = data.prompt_inputs(tok, dcfg, rec.turns[:-1], rec.images, rec.videos, think=think, system=rec.system)
            table[(tuple(s["input_ids"].tolist()), digest(s["pixel_values"]))] = rec.turns[-1][1]
    return table


def test_evaluate_families_on_a_model_that_answers_the_references(tiny, synth):
    _, tok, dcfg = tiny
    junk = data.encode(tok, " no \\boxed{9} 9 left, first, a red circle at the top left")
    for think in (False, True):
        fake = TableModel(tok, dcfg, reference_table(tok, dcfg, synth, 4, think), junk)
        rep = sample.evaluate_families(fake, tok, dcfg, synth, limit=4,
                                       mode=sample.EvalMode(think=think, batch_size=3, progress=False))
        assert rep["n"] == {f: 4 for f in data.SYNTH_FAMILIES}
        assert rep["accuracy"] == {f: 1.0 for f in data.SYNTH_FAMILIES}, [p for p in rep["predictions"] if not p["correct"]]
        assert rep["word_f1"] == {f: 1.0 for f in data.SYNTH_FAMILIES}       # the junk after <|im_end|> is cut
        assert [p["where"].rsplit(":", 1)[1] for p in rep["predictions"] if p["family"] == "ocr"] == ["1", "2", "3", "4"]
        assert {p["think"] for p in rep["predictions"] if p["family"] != "text"} == {think}
        assert {c["max_new_tokens"] for c in fake.calls} == {sample.default_new_tokens(f, think) for f in data.SYNTH_FAMILIES}
        assert max(c["n"] for c in fake.calls) == 3
        json.dumps(rep)
    assert sample.DIRECT_NEW_TOKENS["count"] == 32 and sample.default_new_tokens("ocr", True) == 192


def test_prompts_kept_across_calls_give_the_same_evaluation(tiny, synth, monkeypatch):
    """The recipe keeps each record's built prompt for every stage: the second call decodes
    nothing and scores exactly as a call that builds everything; modes do not share prompts."""
    _, tok, dcfg = tiny
    junk = data.encode(tok, " no")
    fake = TableModel(tok, dcfg, reference_table(tok, dcfg, synth, 3, False), junk)
    fams = ["count", "video", "text"]
    plain = sample.evaluate_families(fake, tok, dcfg, synth, families=fams, limit=3, mode=QUIET)
    kept = {}
    first = sample.evaluate_families(fake, tok, dcfg, synth, families=fams, limit=3, mode=QUIET, prompts=kept)
    blank = sample.evaluate_families(fake, tok, dcfg, synth, families=fams, limit=3, mode=QUIET_BLANK, prompts=kept)
    assert len(kept) == 9 + 9 and blank["accuracy"]["count"] < 1.0     # real and blank prompts kept apart
    monkeypatch.setattr(data, "load_media", lambda *a, **k: pytest.fail("decoded again"))
    again = sample.evaluate_families(fake, tok, dcfg, synth, families=fams, limit=3, mode=QUIET, prompts=kept)
    for rep in (first, again):
        assert rep["accuracy"] == plain["accuracy"] == {f: 1.0 for f in fams}
        assert [p["prediction"] for p in rep["predictions"]] == [p["prediction"] for p in plain["predictions"]]


def test_blank_mode_shows_white_images_of_the_same_shapes(tiny, synth):
    _, tok, dcfg = tiny
    img = synth / "chart" / "images" / "eval_00000.png"
    pv, _ = vit.load_image(img, dcfg.max_tiles, dcfg.min_tiles, dcfg.image_size)
    white = vit.blank_pixels(pv)
    assert white.shape == pv.shape and not torch.equal(white, pv)
    assert torch.allclose(white * vit.IMAGENET_STD + vit.IMAGENET_MEAN, torch.ones_like(pv), atol=1e-6)
    anyres = vit.blank_pixels([pv[:1], pv[1:3]])
    assert [a.shape for a in anyres] == [pv[:1].shape, pv[1:3].shape]
    fake = TableModel(tok, dcfg, {}, [])
    plain = sample.evaluate_families(fake, tok, dcfg, synth, families=["chart", "multi", "video"], limit=2, mode=QUIET)
    seen = TableModel(tok, dcfg, {}, [])
    rep = sample.evaluate_families(seen, tok, dcfg, synth, families=["chart", "multi", "video"], limit=2, mode=QUIET_BLANK)
    assert all(p["blank"] for p in rep["predictions"]) and not any(p["blank"] for p in plain["predictions"])
    for a, b in zip(fake.calls, seen.calls):
        assert a["pixels"].shape == b["pixels"].shape
        assert torch.allclose(b["pixels"] * vit.IMAGENET_STD + vit.IMAGENET_MEAN, torch.ones_like(b["pixels"]),
                              atol=1e-6)


def test_chance_is_the_majority_share(tmp_path, capsys):
    def write(family, lines):
        (tmp_path / family).mkdir()
        (tmp_path / family / "eval.jsonl").write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n"
                                                              for x in lines))
    conv = lambda a: {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}]}
    # a bad line is shown with its file and line, and left out as the evaluation leaves it out
    write("count", [{**conv("x"), "answer": a} for a in ("2", "2.0")] + ["{not json\n"] +
          [{**conv("x"), "answer": a} for a in ("3", "4", "2")])
    write("caption", [conv("a red circle at the top left."), conv("A red circle at the top left"),
                      conv("a blue circle at the top left.")])
    write("text", [{"text": t} for t in ("the word is kite.", "a b kite.", "x water.", "y z.")])
    got = sample.chance(tmp_path, limit=6)
    assert got == {"caption": 2 / 3, "text": 2 / 4, "count": 3 / 5}
    assert "count/eval.jsonl:3" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# how sure a number is: Wilson intervals, paired differences; the report

def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: z²/n = 0.38415, centre (0.8 + 0.19207) / 1.38415 = 0.71674,
    # half 1.96 sqrt(0.016 + 0.0096037) / 1.38415 = 0.22658 -> [0.49016, 0.94332]
    lo, hi = sample.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-5) and hi == pytest.approx(0.94332, abs=1e-5)
    # 0 of 10: centre = half = 0.19207 / 1.38415 = 0.13877 -> [0, 0.27753]; and n = 0 says nothing
    assert sample.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert sample.wilson_interval(0, 0) == (0.0, 1.0)
    assert sample.accuracy_cell(8, 10) == {"n": 10, "correct": 8, "accuracy": 0.8, "interval": [0.4902, 0.9433]}
    assert sample.plus_minus(0.8, (0.4902, 0.9433)) == "0.80 ±0.31"          # the larger side, rounded up
    assert sample.plus_minus(0.5, (0.41, 0.59)) == "0.50 ±0.09"
    # the ± is measured from the centre printed, so the printed range holds the interval: 31/64 = 0.484,
    # [0.3663, 0.6042], printed 0.48: ±0.13 (0.12 from 0.484 would print [0.36, 0.60], missing 0.6042)
    assert sample.plus_minus(31 / 64, sample.wilson_interval(31, 64)) == "0.48 ±0.13"
    for n in (10, 32, 64, 100, 128):
        for k in range(n + 1):
            lo, hi = sample.wilson_interval(k, n)
            centre, half = (float(x) for x in sample.plus_minus(k / n, (lo, hi)).split(" ±"))
            assert centre - half <= lo + 1e-9 and hi <= centre + half + 1e-9, (k, n)


def predictions(pattern):
    """[(a, b)] right/wrong pairs -> two prediction lists on the same samples (two families)."""
    a = [{"family": "fa" if i % 2 else "fb", "where": f"s{i}", "correct": x} for i, (x, _) in enumerate(pattern)]
    b = [{"family": "fa" if i % 2 else "fb", "where": f"s{i}", "correct": y} for i, (_, y) in enumerate(pattern)]
    return a, b


def test_paired_difference_against_the_normal_approximation():
    # 60 samples right in a only, 20 in b only, 320 the same: d = 0.1; var(d) = 80/400 - 0.01 = 0.19;
    # normal 95% interval 0.1 ± 1.96 sqrt(0.19 / 400) = [0.0573, 0.1427]
    a, b = predictions([(True, False)] * 60 + [(False, True)] * 20 + [(True, True)] * 200 + [(False, False)] * 120)
    e = sample.paired_difference(a, b)
    assert (e["n"], e["difference"], e["a_only"], e["b_only"]) == (400, 0.1, 60, 20) and e["excludes_0"]
    assert e["interval"] == pytest.approx([0.0573, 0.1427], abs=0.01)
    assert (e["accuracy_a"], e["accuracy_b"]) == (0.65, 0.55)
    assert sample.paired_difference(a, b) == e                                   # a fixed seed: the same interval
    null = sample.paired_difference(*predictions([(True, False)] * 10 + [(False, True)] * 10 + [(True, True)] * 80))
    assert null["difference"] == 0 and null["interval"][0] < 0 < null["interval"][1] and not null["excludes_0"]
    with pytest.raises(ValueError, match="same samples"):
        sample.paired_difference(a, b[1:])                                       # one sample missing on one side
    with pytest.raises(ValueError, match="same samples"):
        sample.paired_difference(a, b[:-1] + [b[0]])                             # one sample twice


def test_report_markdown_and_picture(tmp_path):
    cells = lambda *ks: {f: sample.accuracy_cell(k, 128) for f, k in zip(("ocr", "count", "math"), ks)}   # noqa: E731
    stages = {"vit1": {"seconds": 10, "eval_loss_start": 1.0, "eval_loss": 0.5,
                       "eval": {"real": cells(100, 30, 5), "blank": cells(2, 30, 4)}},
              "longcot": {"seconds": 20, "eval": {"real": cells(120, 90, 20), "blank": cells(3, 25, 4),
                                                  "think": {"count": sample.accuracy_cell(110, 128)}}}}
    a, b = predictions([(True, False)] * 60 + [(True, True)] * 40)
    effect = {"name": "sees", "a": "vit1 (real images)", "b": "vit1 (blank images)", "families": ["ocr"],
              **sample.paired_difference(a, b)}
    report = {"stages": stages, "eval_limit": 128, "chance": {"ocr": 0.12, "count": 0.25, "math": 0.16},
              "effects": [effect], "seeds": [{"run": 1, "seed_offset": 0, "effects": [effect]},
                                             {"run": 2, "seed_offset": 1000, "effects": [{**effect, "excludes_0": False}]}]}
    pass1 = {"difference": 0.05, "interval": [0.01, 0.09]}
    stages["rl-verifiable"] = {"seconds": 30, "eval": {}, "rl_eval": {
        "before": {"n": 512, "k": 8, "pass@1": {"mean": 0.5, "se": 0.02}},
        "after": {"n": 512, "k": 8, "pass@1": {"mean": 0.55, "se": 0.02}}, "paired": {"pass@1": pass1}}}
    md = recipe.report_markdown(report)           # a report.json written before the intervals: marked se
    assert "| rl-verifiable | pass@1 | 512 × 8 | 0.500 ± 0.020 se | 0.550 ± 0.020 se | +0.050 [+0.010, +0.090] |" in md
    stages["rl-verifiable"]["rl_eval"]["after"]["pass@1"]["interval"] = [0.5108, 0.5892]
    md = recipe.report_markdown(report)           # now: the larger side of the 95% interval, rounded up
    assert "| rl-verifiable | pass@1 | 512 × 8 | 0.500 ± 0.020 se | 0.550 ±0.040 | +0.050 [+0.010, +0.090] |" in md
    del stages["rl-verifiable"]
    md = recipe.report_markdown(report)
    # 30 of 128: Wilson [0.1694, 0.3148] around 0.2344, the larger side 0.0805 -> ±0.09
    assert "| vit1 | 10 | 1.000 → 0.500 | 0.78 ±0.08 | 0.23 ±0.09 | 0.04 ±0.05 |" in md      # 100, 30, 5 of 128
    assert "### Blank images" in md and "| longcot | 0.02 ±0.05 | 0.20 ±0.08 | 0.03 ±0.05 |" in md
    assert "### Thinking mode" in md and "| longcot |  | 0.86 ±0.08 |  |" in md
    assert "| sees: vit1 (real images) vs vit1 (blank images) | ocr | 100 | 1.00 | 0.40 | +0.60 [" in md
    assert md.count("shown") == 2 and "| sees | +0.60 [" in md and " * | +0.60 [" in md      # both runs listed
    recipe.report_picture(report, {"vit1": [3.0, 2.0, 1.0], "longcot": [1.0, 0.5]}, str(tmp_path / "r.png"))
    img = Image.open(tmp_path / "r.png")
    assert img.width >= 900 and img.height > 400


# ----------------------------------------------------------------------------------------------
# VLMEvalKit TSV

def test_mcq_prompt_follows_the_vlmevalkit_layout():
    row = {"question": "What is shown?", "hint": "Look closely.", "A": "a cat", "B": "a dog", "C": "a fish", "D": "a bird"}
    assert sample.mcq_prompt(row) == ("Hint: Look closely.\nQuestion: What is shown?\nOptions:\nA. a cat\nB. a dog\n"
                                 "C. a fish\nD. a bird\nPlease select the correct answer from the options above.")
    row = {"question": "Which?", "hint": "nan", "A": "yes", "B": "no", "C": "", "D": "NaN"}
    assert sample.mcq_prompt(row) == "Question: Which?\nOptions:\nA. yes\nB. no\nPlease select the correct answer from the options above."


def test_extract_choice_cases():
    opts = {"A": "a cat", "B": "a dog", "C": "a red fish", "D": "the bird"}
    cases = {"B": "B", "(B)": "B", "B.": "B", " c ": "C", "The answer is B": "B", "Answer: (C)": "C",
             "the answer is D.": "D", "B. a dog": "B", "(D) the bird": "D", "a dog": "B", "A red fish.": "C",
             "I think the correct choice is C here": "C", "A cat sat, so B": "", "<think>A? no</think>D": "D",
             "\\boxed{A}": "A", "answer is A, no wait, the answer is C": "C",
             "": "", "I do not know": "", "A or B": "", "E": "", "a bird": ""}
    for reply, want in cases.items():
        assert sample.extract_choice(reply, opts) == want, reply
    assert sample.extract_choice("C", {"A": "x", "B": "y"}) == ""      # not one of this row's options


def png_b64(objects, fmt="PNG"):
    buf = io.BytesIO()
    synthetic.scene_image(objects).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path):
    """Six rows: two categories, l2-categories, a JPEG, a row whose image refers to another row, a bad image."""
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    red = png_b64([("red", "circle", "top", "left")])
    rows = [
        ["0", "q0 colour?", "", "red", "blue", "", "", "A", "colour", "attr", red],
        ["1", "q1 shape?", "a hint", "square", "circle", "triangle", "", "B", "shape", "attr", red],
        ["2", "q2 colour?", "nan", "green", "red", "nan", "nan", "B", "colour", "attr",
         png_b64([("green", "square", "middle", "centre")], "JPEG")],
        ["3", "q3 where?", "", "top left", "bottom right", "", "", "A", "position", "space", "0"],
        ["4", "q4 colour?", "", "red", "blue", "", "", "B", "colour", "attr", "bm90IGFuIGltYWdl" * 8],
        ["5", "q5 shape?", "", "circle", "square", "", "", "A", "shape", "attr", red],
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        w.writerows(rows)
    return columns


class ScriptedModel:
    """Replies chosen by the question in the prompt (the generation is stubbed: answers are known)."""
    REPLIES = {"q0": "A", "q1": "The answer is (B).", "q2": "red", "q3": "C", "q5": "Circle."}

    def __init__(self, tok):
        self.tok, self.end, self.prompts = tok, data.special_ids(tok).im_end, []

    def generate(self, prompts, pixel_values=None, max_new_tokens=32, **_):
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            self.prompts.append(text)
            q = text.split("Question: ")[1][:2]
            out.append(data.encode(self.tok, self.REPLIES[q]) + [self.end])
        return out


def test_tsv_evaluation_per_category_and_predictions_file(tmp_path, tiny, monkeypatch, capsys):
    _, tok, dcfg = tiny
    columns = write_tsv(tmp_path / "bench.tsv")
    fake = ScriptedModel(tok)
    rep = sample.evaluate_tsv(fake, tok, dcfg, str(tmp_path / "bench.tsv"), mode=sample.EvalMode(batch_size=16, progress=False))
    # by hand: q0 A=A right, q1 B=B right, q2 "red" -> B right, q3 C is no option -> wrong, q4 bad image, q5 A right
    assert rep["n"] == 5 and rep["accuracy"] == 4 / 5 and "image" in rep["bad"]
    assert rep["category"] == {"colour": {"accuracy": 1.0, "n": 2}, "position": {"accuracy": 0.0, "n": 1},
                               "shape": {"accuracy": 1.0, "n": 2}}
    assert rep["l2-category"] == {"attr": {"accuracy": 1.0, "n": 4}, "space": {"accuracy": 0.0, "n": 1}}
    assert any("Hint: a hint\nQuestion: q1 shape?\nOptions:\nA. square\nB. circle\nC. triangle\n" in p for p in fake.prompts)
    assert sum(p.count("<img>") for p in fake.prompts) == 5           # row 3 borrowed row 0's image
    # the command line writes the JSON report and the predictions TSV beside it
    ck = tmp_path / "ck"
    ck.mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (fake, tok, dcfg))
    sample.main(["--ckpt", str(ck), "--eval", str(tmp_path / "bench.tsv")])
    printed = capsys.readouterr().out
    assert "accuracy 0.800 over 5 rows" in printed and "category position" in printed
    report = json.loads((ck / "eval" / "bench.json").read_text())
    assert report["accuracy"] == 0.8 and len(report["predictions"]) == 6
    with open(ck / "eval" / "bench_predictions.tsv", newline="") as f:
        got = list(csv.reader(f, delimiter="\t"))
    assert got[0] == columns + ["prediction", "extracted"]
    assert [r[-2:] for r in got[1:]] == [["A", "A"], ["The answer is (B).", "B"], ["red", "B"], ["C", ""], ["", ""],
                                         ["Circle.", "A"]]
    with open(tmp_path / "bench.tsv", newline="") as f:
        assert [r[:-2] for r in got[1:]] == list(csv.reader(f, delimiter="\t"))[1:]     # the original columns



def test_tsv_with_a_limit_finds_an_image_stored_in_a_row_past_it(tmp_path, tiny):
    """MMBench stores an image once; another row's image cell is that row's index. With --limit 1 the
    kept row (index 0) points at row 1, past the limit: its image is still found (scored, not bad)."""
    _, tok, dcfg = tiny
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    with open(tmp_path / "b.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        w.writerow(["0", "q0 colour?", "", "red", "blue", "", "", "A", "colour", "attr", "1"])
        w.writerow(["1", "q1 shape?", "", "square", "circle", "", "", "B", "shape", "attr",
                    png_b64([("red", "circle", "top", "left")])])
    fake = ScriptedModel(tok)
    rep = sample.evaluate_tsv(fake, tok, dcfg, str(tmp_path / "b.tsv"), limit=1,
                              mode=sample.EvalMode(batch_size=16, progress=False))
    assert (rep["n"], rep["accuracy"]) == (1, 1.0) and "no bad samples" in rep["bad"], rep["bad"]
    assert sum(p.count("<img>") for p in fake.prompts) == 1

# ----------------------------------------------------------------------------------------------
# command line

def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}                   # as the in-process side (one_thread)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_generation_and_eval_reports(tmp_path, tiny, synth, capsys):
    m, tok, dcfg = tiny
    m.save_pretrained(tmp_path / "ck")
    img = str(synth / "caption" / "images" / "eval_00000.png")
    out = run_cli("--ckpt", str(tmp_path / "ck"), "--image", img, "--prompt", "Describe the image.", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr[-2000:]
    # the streamed text is the model's own greedy continuation of the univl-chat prompt
    model, tok, dcfg = sample.load(str(tmp_path / "ck"))
    assert out.stdout.rstrip("\n") == sample.answer(model, tok, dcfg, "Describe the image.", [img], max_new_tokens=8)
    # eval of a synthetic folder: one report per family, named per mode, and a table
    for flags, suffix in (([], ""), (["--think", "--blank"], "-think-blank")):
        sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(synth), "--limit", "2", "--max-new-tokens", "3", *flags])
        table = capsys.readouterr().out
        for family in data.SYNTH_FAMILIES:
            rep = json.loads((tmp_path / "ck" / "eval" / f"{family}{suffix}.json").read_text())
            assert rep["family"] == family and rep["n"] == 2 and len(rep["predictions"]) == 2
            assert rep["think"] == bool(flags) and rep["blank"] == bool(flags)
            assert f"\n{family:14s}    2" in table
        assert f"reports: {tmp_path}/ck/eval/{data.SYNTH_FAMILIES[0]}{suffix}.json, " in table
    sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(synth / "count" / "eval.jsonl"), "--limit", "3",
            "--max-new-tokens", "3", "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["n"] == {"count": 3}


def test_cli_eval_shows_each_bad_line_once(tmp_path, tiny, synth, capsys):
    """`--eval FOLDER` evaluates the families and then counts their chance level on the same lines:
    a bad line is shown once, by the evaluation, not again by the chance count."""
    m, tok, dcfg = tiny
    m.save_pretrained(tmp_path / "ck")
    (tmp_path / "set" / "count").mkdir(parents=True)
    lines = (synth / "count" / "eval.jsonl").read_text().splitlines(keepends=True)[:2]
    (tmp_path / "set" / "count" / "eval.jsonl").write_text(lines[0] + "{not json\n" + lines[1])
    (tmp_path / "set" / "count" / "images").symlink_to(synth / "count" / "images")
    sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(tmp_path / "set"), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert err.count("count/eval.jsonl:2") == 1, err


def test_cli_refuses_options_it_would_ignore(tmp_path):
    (tmp_path / "ck").mkdir()
    for args, says in ((["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
                       (["--limit", "0"], "--limit, --batch-size"),
                       (["--eval", str(tmp_path), "--temperature", "0.7"], "--temperature do not apply"),
                       (["--eval", str(tmp_path), "--seed", "7", "--prompt", "Hi"], "--prompt, --seed do not apply"),
                       (["--blank"], "--blank: only with --eval"),
                       (["--limit", "3", "--out", "r.json"], "--limit, --out: only with --eval")):
        with pytest.raises(sample.UsageError, match=says):
            sample.cli(["--ckpt", str(tmp_path / "ck"), *args])


def test_cli_errors_are_one_line_and_an_exit_code(tmp_path, tiny, capsys):
    m, _, _ = tiny
    m.save_pretrained(tmp_path / "ck")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x01 not a video" * 10)
    ck = str(tmp_path / "ck")
    cases = [(["--ckpt", str(tmp_path / "missing")], 2, "no such folder"),
             (["--ckpt", str(tmp_path / "empty")], 1, "not a checkpoint"),
             (["--ckpt", ck, "--image", str(tmp_path / "not_an_image.png")], 1, "cannot decode image"),
             (["--ckpt", ck, "--image", str(tmp_path / "nope.png")], 2, "no such file"),
             (["--ckpt", ck, "--video", str(tmp_path / "bad.mp4")], 1, "cannot decode video"),
             (["--ckpt", ck, "--eval", str(tmp_path / "nope.jsonl")], 2, "no such file"),
             (["--ckpt", ck, "--no-such-flag"], 2, "unrecognized arguments"),
             (["--ckpt", ck, "--image", "--prompt", "Hi"], 2, "--image: expected at least one argument"),
             (["--ckpt", ck, "--video"], 2, "--video: expected at least one argument")]
    out = run_cli(*cases[0][0])                                       # the real command line, once
    results = [(out.returncode, out.stderr)]
    for args, _, _ in cases[1:]:                                      # the rest through its main, in this process
        with pytest.raises(SystemExit) as e:
            sample.main(args)
        results.append((e.value.code, capsys.readouterr().err))
    for (args, code, words), (got, err) in zip(cases, results):
        lines = err.strip().splitlines()
        assert got == code and len(lines) == 1 and words in lines[0], (args, got, err)
        assert lines[0].startswith("sample.py: error: ")


# ----------------------------------------------------------------------------------------------
# mutation-review additions: fractional paired scores, per-family intervals and bad-data counts of
# the --eval path, refused sampling settings, unusable --eval inputs, file:line of a missing
# image, repeated --image options

def test_paired_difference_of_fractional_scores_against_the_normal_approximation():
    """Graded scores (the share right of k, as rl.paired and tests/rl_compare.py pass them) take the
    plain bootstrap branch: resampled within each family, a sample's two sides together. Two
    families of 200; fa: 100 samples a 0.75 / b 0.25 (d = +0.5) and 100 a = b = 0.5 (d = 0),
    fb: 100 a 0.25 / b 0.5 (d = -0.25) and 100 a 0.5 / b 0.25 (d = +0.25). By hand: difference
    (50 + 0) / 400 = 0.125; each family's d has population variance 0.0625, so the resampled sum
    has variance 200 x 0.0625 x 2 = 25 (sd 5), the mean sd 5 / 400 = 0.0125, and the normal 95%
    interval is 0.125 ± 1.96 x 0.0125 = [0.1005, 0.1495]."""
    pattern = ([("fa", 0.75, 0.25)] * 100 + [("fa", 0.5, 0.5)] * 100 +
               [("fb", 0.25, 0.5)] * 100 + [("fb", 0.5, 0.25)] * 100)
    a = [{"family": f, "where": f"s{i}", "correct": x} for i, (f, x, _) in enumerate(pattern)]
    b = [{"family": f, "where": f"s{i}", "correct": y} for i, (f, _, y) in enumerate(pattern)]
    e = sample.paired_difference(a, b)
    assert (e["n"], e["difference"], e["a_only"], e["b_only"]) == (400, 0.125, 200, 100)
    assert (e["accuracy_a"], e["accuracy_b"]) == (0.5, 0.375)
    lo, hi = e["interval"]
    assert hi - lo > 0.04 and lo < 0.125 < hi and e["excludes_0"]          # a width, around the difference
    assert (lo, hi) == pytest.approx((0.1005, 0.1495), abs=0.004)


class QuestionModel:
    """Stands in for SAILVL.generate: each prompt holds a question "qN"; its reply is REPLIES[N],
    followed by <|im_end|>."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.end = tok, replies, data.special_ids(tok).im_end

    def generate(self, prompts, pixel_values=None, max_new_tokens=32, **_):
        out = []
        for p in prompts:
            n = int(self.tok.decode(p).split("question q")[1].split()[0])
            out.append(data.encode(self.tok, self.replies[n]) + [self.end])
        return out


def test_cli_eval_of_a_manifest_reads_its_media_under_image_root(tmp_path, tiny, monkeypatch, capsys):
    """A LLaVA-style manifest's image paths are relative to the dataset folder (training's --image_root):
    --eval could not score one (every image "not found" beside the manifest); --image-root reads them."""
    _, tok, dcfg = tiny
    (tmp_path / "data" / "coco").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "data" / "coco" / "a.png")
    rec = {"task": "count", "image": "coco/a.png", "answer": "3",
           "conversations": [{"from": "human", "value": "<image>\nquestion q0 ?"}, {"from": "gpt", "value": "3"}]}
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "m.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (QuestionModel(tok, {0: "3"}), tok, dcfg))
    argv = ["--ckpt", str(tmp_path / "ck"), "--eval", str(tmp_path / "ann" / "m.jsonl")]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == 1 and "missing_file" in capsys.readouterr().err
    sample.main([*argv, "--image-root", str(tmp_path / "data")])
    assert json.loads((tmp_path / "ck" / "eval" / "m.count.json").read_text())["accuracy"] == 1.0
    for wrong in (["--eval", str(tmp_path / "ann"), "--image-root", str(tmp_path)], [*argv, "--image-root", "/no/such"]):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(tmp_path / "ck"), *wrong[wrong.index("--eval"):]] if wrong[0] == "--eval" else wrong)
        assert e.value.code == 2 and "for --eval of a manifest (.jsonl) only" in capsys.readouterr().err


def write_manifest(path, good_count=10, good_ocr=4, extra=()):
    """count: 10 records (q0-q9, answer 3), ocr: 4 records (q10-q13, answer queen); then `extra` lines."""
    conv = lambda q, a: [{"from": "human", "value": f"question q{q} ?"}, {"from": "gpt", "value": a}]  # noqa: E731
    lines = [json.dumps({"task": "count", "conversations": conv(i, "3"), "answer": "3"}) for i in range(good_count)]
    lines += [json.dumps({"task": "ocr", "conversations": conv(good_count + i, "queen"), "answer": "queen"})
              for i in range(good_ocr)]
    path.write_text("\n".join([*lines, *extra]) + "\n")


def test_cli_eval_of_a_manifest_gives_each_familys_wilson_interval_and_counts_each_sample_once(tmp_path, tiny,
                                                                                              monkeypatch, capsys):
    """Through sample.main --eval MANIFEST --out (the path run_eval takes): count 8 of 10 right, ocr
    1 of 4 right; a line of bad JSON and a record whose image is missing are counted bad once each,
    the 14 good ones good once: 16 seen. Wilson by hand (z = 1.96): 8 of 10 -> [0.49016, 0.94332]
    (test_wilson_interval_by_hand); 1 of 4: z²/n = 0.96037, centre (0.25 + 0.48018) / 1.96037 =
    0.37247, half 1.96 sqrt(0.046875 + 0.060023) / 1.96037 = 0.32689 -> [0.04558, 0.69936]. The
    missing image is reported with the manifest's file and line, not as "<prompt>"."""
    _, tok, dcfg = tiny
    replies = {i: "3" for i in range(8)} | {8: "4", 9: "5", 10: "queen", 11: "tiger", 12: "lion", 13: "cat"}
    missing = json.dumps({"task": "count", "image": "nope.png",
                          "conversations": [{"from": "human", "value": "<image>\nquestion q99 ?"},
                                            {"from": "gpt", "value": "3"}], "answer": "3"})
    write_manifest(tmp_path / "m.jsonl", extra=["{not json", missing])
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (QuestionModel(tok, replies), tok, dcfg))
    sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["n"] == {"count": 10, "ocr": 4} and rep["accuracy"] == {"count": 0.8, "ocr": 0.25}
    assert rep["interval"]["count"] == pytest.approx([0.49016, 0.94332], abs=1e-5)
    assert rep["interval"]["ocr"] == pytest.approx([0.04558, 0.69936], abs=1e-5)
    assert rep["bad"] == "bad samples by reason: {'json': 1, 'missing_file': 1} of 16 seen"
    assert f"{tmp_path / 'm.jsonl'}:16: image file not found" in err and "<prompt>" not in err


def test_record_item_names_the_records_file_and_line_for_a_missing_image(tiny, tmp_path):
    _, tok, dcfg = tiny
    rec = data.parse_record({"image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                    {"from": "gpt", "value": "3"}]},
                            tmp_path, "m.jsonl:7", "count")
    with pytest.raises(data.DataError) as e:
        sample.record_item(tok, dcfg, rec, None, False, 4)
    assert e.value.where == "m.jsonl:7" and str(e.value).startswith("m.jsonl:7: image file not found")
    assert e.value.reason == "missing_file"


@pytest.mark.parametrize("args, says", [
    (["--top-p=0"], "--top-p 0.0: must be in (0, 1]"), (["--top-p=5"], "--top-p 5.0: must be in (0, 1]"),
    (["--top-p=nan"], "--top-p nan"), (["--top-p=-0.5"], "--top-p -0.5"),
    (["--temperature=nan"], "--temperature nan: must be a finite number >= 0"),
    (["--temperature=inf"], "--temperature inf"), (["--temperature=-1"], "--temperature -1.0")])
def test_cli_refuses_sampling_settings_outside_their_range(tmp_path, capsys, monkeypatch, args, says):
    """Usage errors (exit 2, one line), refused before a checkpoint is loaded: --top-p=0 masked every
    token (an index error), --top-p=5 and a negative temperature were taken silently, NaN raised."""
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("loaded a checkpoint"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "ck"), "--prompt", "Hi", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error: ") and says in lines[0]


def test_generation_never_emits_an_id_its_tokenizer_cannot_decode(tmp_path):
    """A vocab whose entries no merge makes (the replication test's cut-down Qwen vocab: 151,643 ids,
    ~500 reachable) has ids tiktoken cannot decode; sampled, one stopped sample.py, the evaluation,
    rl.py and its filter with a KeyError. data.undecodable_ids lists exactly the ids decode refuses,
    and generation (sample.answer, generate_batch, RL's banned_ids) never emits them: here the
    head makes two of them the only non-zero logits, one of them the largest whatever the state."""
    from test_replicate import write_qwen_tokenizer
    data.add_image_tokens(write_qwen_tokenizer(tmp_path / "qwen"), tmp_path / "sail")
    tok = data.load_tokenizer(tmp_path / "sail")
    holes = data.undecodable_ids(tok)

    def decodes(i):
        try:
            tok.decode_bytes([i])
            return True
        except KeyError:
            return False
    assert 150_000 < len(holes) < tok.n_vocab and [i for i in range(tok.n_vocab) if not decodes(i)] == list(holes)
    cfg = modeling.preset_config("tiny")
    cfg.llm_config.vocab_size, cfg.llm_config.tie_word_embeddings = 151_936, False      # (the head alone zeroed)
    m = modeling.SAILVL(cfg)
    m.init_weights()
    with torch.no_grad():
        head = m.language_model.lm_head.weight
        head.zero_()
        head[holes[0]], head[holes[1]] = 1e3, -1e3                           # (h . 1) > 0 or < 0: a hole wins
    dcfg = data.DataConfig.from_model(m.cfg)
    first = tok.decode([0]) * 3                                              # id 0: the top of the rest (all 0)
    assert sample.answer(m.eval(), tok, dcfg, "Hi", max_new_tokens=3) == first
    item = sample.Item(data.prompt_inputs(tok, dcfg, "Hi")["input_ids"].tolist(), None, 3)
    assert sample.generate_batch(m, tok, [item]) == [first]
    import rl
    assert set(holes) <= set(rl.banned_ids(tok))


def test_cli_refuses_a_picture_given_as_a_video(tmp_path, capsys, monkeypatch):
    """--video a.png was read as a one-frame video (PyAV opens pictures) and answered from it without
    a word: a usage error naming --image."""
    (tmp_path / "ck").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.PNG", format="PNG")
    monkeypatch.setattr(sample, "load", lambda *a, **k: pytest.fail("loaded a checkpoint"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "ck"), "--prompt", "Hi", "--video", str(tmp_path / "a.PNG")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines == [f"sample.py: error: --video {tmp_path}/a.PNG: a picture (one frame, read as a "
                                           "still video): give it as --image"]


def test_cli_accepts_the_edges_of_the_sampling_ranges(tmp_path, tiny, monkeypatch):
    m, tok, dcfg = tiny
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (m, tok, dcfg))
    seen = []
    monkeypatch.setattr(sample, "answer", lambda *a, **k: seen.append((k["temperature"], k["top_p"])))
    for args in (["--top-p=1", "--temperature=0"], ["--top-p=0.01", "--temperature=2.5"]):
        sample.main(["--ckpt", str(tmp_path / "ck"), "--prompt", "Hi", *args])
    assert seen == [(0.0, 1.0), (2.5, 0.01)]


def test_cli_makes_the_device_it_is_given_the_current_one(tmp_path, tiny, monkeypatch, capsys):
    """--device cuda:1: the kernels' Triton launches go to the current CUDA device, so it is made cuda:1
    before the model loads there (else they run on cuda:0 with cuda:1's pointers); plain --device cuda
    is the current device already (set_device refuses a device without an index); --device cuda:2 on
    two GPUs is one usage error, not CUDA's traceback. (torch.cuda stubbed: two devices.)"""
    _, tok, dcfg = tiny
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    def set_device(d):
        torch._utils._get_device_index(d, optional=False)          # torch's own check: an index is required
        calls.append(("set_device", str(d)))
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": calls.append(("load", device)) or
                        (QuestionModel(tok, {0: "3"}), tok, dcfg))
    write_manifest(tmp_path / "one.jsonl", good_count=1, good_ocr=0)
    for device in ("cuda:1", "cuda"):
        sample.main(["--ckpt", str(tmp_path), "--eval", str(tmp_path / "one.jsonl"), "--device", device])
    assert calls == [("set_device", "cuda:1"), ("load", "cuda:1"), ("load", "cuda")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path), "--eval", str(tmp_path / "one.jsonl"), "--device", "cuda:2"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(
        "--device: expected cpu or cuda[:N] (2 CUDA devices here: N < 2), got 'cuda:2'")
    assert len(calls) == 3                                           # refused before anything moved


def test_cli_eval_of_a_file_with_no_usable_sample_is_one_error_line(tmp_path, tiny, monkeypatch, capsys):
    """An empty manifest, one whose every line is bad, a file that is no manifest (README.md) and a
    synthetic folder of empty manifests: exit 1, one error line naming the file and the bad-data
    count, and no report written (the table and "reports:" were printed over nothing)."""
    _, tok, dcfg = tiny
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (QuestionModel(tok, {}), tok, dcfg))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{not json\n[1, 2]\n" + json.dumps({"conversations": []}) + "\n")
    (tmp_path / "synth" / "count").mkdir(parents=True)
    (tmp_path / "synth" / "count" / "eval.jsonl").write_text("")
    readme = os.path.join(ROOT, "README.md")
    n_readme = sum(1 for line in open(readme, "rb") if line.strip())
    cases = [(tmp_path / "empty.jsonl", "no samples seen"),
             (tmp_path / "bad.jsonl", "bad samples by reason: {'json': 1, 'schema': 2} of 3 seen"),
             (readme, f"of {n_readme} seen"), (tmp_path / "synth", "no samples seen")]
    for path, says in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(path)])
        out = capsys.readouterr()
        errors = [ln for ln in out.err.splitlines() if ln.startswith("sample.py: error:")]
        assert e.value.code == 1 and len(errors) == 1, (path, out.err[-500:])
        assert errors[0].startswith(f"sample.py: error: --eval {path}: no usable sample to score (") and says in errors[0]
        assert "reports:" not in out.out and "family" not in out.out
    assert not (tmp_path / "ck" / "eval").exists()
    write_manifest(tmp_path / "one.jsonl", good_count=1, good_ocr=0)          # one usable sample is enough
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (QuestionModel(tok, {0: "3"}), tok, dcfg))
    sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(tmp_path / "one.jsonl")])
    report = tmp_path / "ck" / "eval" / "one.count.json"              # the manifest's name: not the family's report
    assert json.loads(report.read_text())["accuracy"] == 1.0 and f"reports: {report}\n" in capsys.readouterr().out


def test_cli_repeated_image_options_accumulate(tmp_path, tiny, synth, monkeypatch):
    """--image A --image B gives both images (argparse's store kept only B), in order; likewise --video."""
    m, tok, dcfg = tiny
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (m, tok, dcfg))
    seen = []
    monkeypatch.setattr(sample, "answer", lambda model, tok, dcfg, q, images, videos, **k: seen.append((images, videos)))
    a, b, c = (str(synth / "caption" / "images" / f"eval_0000{i}.png") for i in range(3))
    v1, v2 = (str(synth / "video" / "videos" / f"eval_0000{i}.mp4") for i in range(2))
    sample.main(["--ckpt", str(tmp_path / "ck"), "--image", a, "--image", b, c, "--video", v1, "--video", v2])
    sample.main(["--ckpt", str(tmp_path / "ck"), "--image", a, b])
    assert seen == [([a, b, c], [v1, v2]), ([a, b], [])]


# ----------------------------------------------------------------------------------------------
# mutation-review additions (2): the Wilson interval's clamp, the paired bootstrap's edges (an
# interval touching 0, per-family resampling, nothing to compare, its Monte-Carlo noise), kept
# prompts per budget, each record's own thinking mode, families named by their folder, the TSV in
# thinking / blank mode, the --eval defaults of a synthetic folder and the report names

def test_wilson_interval_stays_in_0_1_at_none_and_all_correct():
    """0 of n and n of n: the interval is [0, hi] and [lo, 1] and never leaves [0, 1]. Unclamped, the
    formula's rounding gives e.g. 1.0000000000000002 for 11 of 11 and -1.2e-17 for 0 of 21 (a report
    cell -0.0, an upper end above 1; clamped, 3.6e-17 for 0 of 7). By hand: at p = 0 the centre
    z²/2n equals the half width z sqrt(z²/4n²), so the lower end is exactly 0 and the upper one
    (z²/n) / (1 + z²/n) = z²/(n + z²); by symmetry [n/(n + z²), 1] at p = 1."""
    z2 = sample.Z95 ** 2
    for n in range(1, 200):
        lo0, hi0 = sample.wilson_interval(0, n)
        lon, hin = sample.wilson_interval(n, n)
        assert lo0 == 0.0 and hin == 1.0, n
        assert hi0 == pytest.approx(z2 / (n + z2), rel=1e-12) and lon == pytest.approx(n / (n + z2), rel=1e-12), n
        for k in range(n + 1):
            lo, hi = sample.wilson_interval(k, n)
            assert 0.0 <= lo and hi <= 1.0 and lo < k / n + 1e-12 and hi > k / n - 1e-12, (k, n)


def test_paired_difference_whose_interval_touches_0_does_not_exclude_it():
    """An interval with an end exactly 0 does not exclude 0. Identical sides: every resample's
    difference is 0, the interval [0, 0]. 2 of 100 right in a only and no sample right in b only:
    no resample can go below 0, and 0 is drawn with probability 0.98^100 = 0.133 > 0.025, so the
    lower end is exactly 0 while the difference is +0.02."""
    a, b = predictions([(True, True)] * 50 + [(False, False)] * 50)
    same = sample.paired_difference(a, b)
    assert same["interval"] == [0.0, 0.0] and same["difference"] == 0 and not same["excludes_0"]
    a, b = predictions([(True, False)] * 2 + [(True, True)] * 49 + [(False, False)] * 49)
    edge = sample.paired_difference(a, b)
    assert edge["difference"] == 0.02 and edge["interval"][0] == 0.0 and edge["interval"][1] > 0
    assert not edge["excludes_0"]


def test_paired_difference_resamples_within_each_family():
    """The design fixes each family's n, so the bootstrap draws within each family: family fa, 50
    samples all right in a only (d = +1), family fb, 50 samples all the same (d = 0). Within each
    family every resample is the family itself, so every resampled difference is 50 / 100 = 0.5:
    the interval is [0.5, 0.5]. Pooling the families would give a width (sd sqrt(0.25 / 100) = 0.05)."""
    a = [{"family": "fa", "where": f"s{i}", "correct": True} for i in range(50)] + \
        [{"family": "fb", "where": f"t{i}", "correct": i % 2 == 0} for i in range(50)]
    b = [{"family": "fa", "where": f"s{i}", "correct": False} for i in range(50)] + \
        [{"family": "fb", "where": f"t{i}", "correct": i % 2 == 0} for i in range(50)]
    e = sample.paired_difference(a, b)
    assert e["difference"] == 0.5 and e["interval"] == [0.5, 0.5] and e["excludes_0"]
    frac = sample.paired_difference([dict(p, correct=0.75 if p["family"] == "fa" else 0.5) for p in a],
                                    [dict(p, correct=0.25 if p["family"] == "fa" else 0.5) for p in b])
    assert frac["difference"] == 0.25 and frac["interval"] == [0.25, 0.25]          # the graded branch too


def test_paired_difference_of_no_samples_is_a_value_error():
    """Two empty lists hold no common sample: ValueError, as the docstring says (not a division by 0)."""
    with pytest.raises(ValueError, match="same samples"):
        sample.paired_difference([], [])


def test_paired_difference_interval_varies_little_with_the_bootstrap_seed():
    """BOOTSTRAP_RESAMPLES (10,000, the number report.md states) keeps the Monte-Carlo noise of an
    interval end well below the 0.01 the report prints. Graded scores, one family of 100 with d
    spread evenly over [-0.45, 0.45] + 0.05 (sd 0.287, so the mean's sd is 0.0287): the 2.5%
    quantile of B resamples has a Monte-Carlo sd of about sqrt(0.025 x 0.975 / B) / 0.0584 x 0.0287
    = 0.0008 at B = 10,000 (0.0024 at 1,000). Over 10 seeds the ends must stay within 0.004."""
    a = [{"family": "f", "where": f"s{i}", "correct": 0.5 + (i % 10 - 4.5) / 10 / 2 + 0.025} for i in range(100)]
    b = [{"family": "f", "where": f"s{i}", "correct": 0.5 - (i % 10 - 4.5) / 10 / 2 - 0.025} for i in range(100)]
    ends = [sample.paired_difference(a, b, seed=s)["interval"] for s in range(10)]
    for k in (0, 1):
        got = [e[k] for e in ends]
        assert max(got) - min(got) < 0.004, got
    assert sample.BOOTSTRAP_RESAMPLES == 10_000


def test_kept_prompts_are_kept_per_token_budget(tiny, synth):
    """A prompt kept in `prompts` (the recipe's cache) is reused only with the same max_new_tokens:
    a second call with another budget generates with its own."""
    _, tok, dcfg = tiny
    fake, kept = TableModel(tok, dcfg, {}, []), {}
    for budget in (5, 9):
        sample.evaluate_families(fake, tok, dcfg, synth, families=["count"], limit=2,
                                 mode=sample.EvalMode(max_new_tokens=budget, progress=False), prompts=kept)
    assert [c["max_new_tokens"] for c in fake.calls] == [5, 9] and len(kept) == 4


def test_eval_mode_think_none_answers_each_record_in_its_own_mode(tiny, synth):
    """EvalMode(think=None): each record's own `think` (count_cot and math are thinking records,
    count is not): its prompt, its budget and its prediction's "think" follow the record."""
    _, tok, dcfg = tiny
    fake = TableModel(tok, dcfg, {}, [])
    rep = sample.evaluate_families(fake, tok, dcfg, synth, families=["count", "count_cot", "math"], limit=2,
                                   mode=sample.EvalMode(think=None, progress=False))
    assert {p["family"]: p["think"] for p in rep["predictions"]} == {"count": False, "count_cot": True, "math": True}
    assert {c["max_new_tokens"] for c in fake.calls} == {sample.DIRECT_NEW_TOKENS["count"], sample.THINK_NEW_TOKENS["count_cot"],
                                                        sample.THINK_NEW_TOKENS["math"]}


def test_a_folder_of_other_families_is_scored_per_folder(tmp_path, tiny):
    """synth_families: the known families in SYNTH_FAMILIES order, then any other sub-folder holding
    eval.jsonl (sorted); a record's family is its folder whatever its "task" says."""
    _, tok, dcfg = tiny
    for name, first in (("zeta", 0), ("count", 10), ("alpha", 20)):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"task": "count", "answer": "3", "conversations": [
            {"from": "human", "value": f"question q{first + i} ?"}, {"from": "gpt", "value": "3"}]}) for i in range(3)]
        (tmp_path / name / "eval.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "empty").mkdir()                                           # no eval.jsonl: not a family
    assert sample.synth_families(tmp_path) == ["count", "alpha", "zeta"]
    replies = {i: "3" if i % 10 == 0 else "4" for i in range(30)}          # the first of each folder right
    rep = sample.evaluate_families(QuestionModel(tok, replies), tok, dcfg, tmp_path, mode=QUIET)
    assert rep["n"] == {"count": 3, "alpha": 3, "zeta": 3}
    assert rep["accuracy"] == {"count": 1 / 3, "alpha": 1 / 3, "zeta": 1 / 3}


class RecordingModel(ScriptedModel):
    """ScriptedModel that also keeps each call's pixels and token budget."""

    def generate(self, prompts, pixel_values=None, max_new_tokens=32, **kw):
        self.calls = getattr(self, "calls", []) + [(pixel_values, max_new_tokens)]
        return super().generate(prompts, pixel_values, max_new_tokens, **kw)


def test_tsv_in_thinking_and_blank_mode(tmp_path, tiny):
    """evaluate_tsv with EvalMode(think=True, blank=True): every prompt ends with the think prompt,
    the budget is MCQ_NEW_TOKENS[True] = 1024, every image is white (blank_pixels: ones after
    un-normalising); the answer column is read case-blind ("b" is B)."""
    _, tok, dcfg = tiny
    write_tsv(tmp_path / "bench.tsv")
    text = (tmp_path / "bench.tsv").read_text().replace("\tB\tshape\t", "\tb\tshape\t")     # q1's answer in lower case
    (tmp_path / "bench.tsv").write_text(text)
    fake = RecordingModel(tok)
    rep = sample.evaluate_tsv(fake, tok, dcfg, str(tmp_path / "bench.tsv"),
                              mode=sample.EvalMode(think=True, blank=True, batch_size=16, progress=False))
    assert rep["think"] and rep["blank"] and rep["n"] == 5
    assert [p["correct"] for p in rep["predictions"]] == [True, True, True, False, False, True]
    assert all(data.THINK_PROMPT.strip()[:40] in p for p in fake.prompts) and len(fake.prompts) == 5
    assert {m for _, m in fake.calls} == {1024}
    for pixels, _ in fake.calls:
        assert torch.allclose(pixels * vit.IMAGENET_STD + vit.IMAGENET_MEAN, torch.ones_like(pixels), atol=1e-6)
    plain = RecordingModel(tok)
    sample.evaluate_tsv(plain, tok, dcfg, str(tmp_path / "bench.tsv"), mode=sample.EvalMode(batch_size=16, progress=False))
    assert not any(data.THINK_PROMPT.strip()[:40] in p for p in plain.prompts)
    assert {m for _, m in plain.calls} == {32}


def test_cli_eval_of_a_folder_reads_eval_limit_records_and_names_reports_by_mode(tmp_path, tiny, monkeypatch):
    """--eval FOLDER: without --limit the first EVAL_LIMIT = 128 records of each family (of 130), with
    --limit N the first N; `chance` over the same records (first 4: all "3" -> 1.0; first 128: 4 + 42
    "3"s of 128 -> 46 / 128); --blank alone writes <family>-blank.json (not -think)."""
    _, tok, dcfg = tiny
    (tmp_path / "synth" / "count").mkdir(parents=True)
    answers = ["3"] * 4 + [("3", "4", "5")[i % 3] for i in range(126)]    # i = 0, 3, .. 123 of the 126: 42 "3"s
    lines = [json.dumps({"task": "count", "answer": a, "conversations": [
        {"from": "human", "value": f"question q{i} ?"}, {"from": "gpt", "value": a}]}) for i, a in enumerate(answers)]
    (tmp_path / "synth" / "count" / "eval.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (QuestionModel(tok, {i: "3" for i in range(130)}), tok, dcfg))
    sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(tmp_path / "synth"), "--limit", "4", "--blank"])
    assert os.listdir(tmp_path / "ck" / "eval") == ["count-blank.json"]
    rep = json.loads((tmp_path / "ck" / "eval" / "count-blank.json").read_text())
    assert rep["n"] == 4 and rep["chance"] == 1.0 and rep["blank"] and not rep["think"]
    sample.main(["--ckpt", str(tmp_path / "ck"), "--eval", str(tmp_path / "synth"), "--out", str(tmp_path / "r.json")])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["n"] == {"count": 128} and rep["chance"] == {"count": 46 / 128}
    assert rep["accuracy"]["count"] == 46 / 128


def test_cli_generation_defaults_to_256_new_tokens(tmp_path, tiny, monkeypatch):
    """Without --max-new-tokens a single answer may run to 256 tokens (the option's help)."""
    m, tok, dcfg = tiny
    (tmp_path / "ck").mkdir()
    monkeypatch.setattr(sample, "load", lambda path, device="cpu": (m, tok, dcfg))
    seen = []
    monkeypatch.setattr(sample, "answer", lambda *a, **k: seen.append(k["max_new_tokens"]))
    sample.main(["--ckpt", str(tmp_path / "ck"), "--prompt", "Hi"])
    sample.main(["--ckpt", str(tmp_path / "ck"), "--prompt", "Hi", "--max-new-tokens", "7"])
    assert seen == [256, 7]


def test_accuracy_cell_keeps_four_decimals():
    """A report cell rounds the accuracy and the interval ends to 4 decimals (report.json keeps
    them; the tables print 2): 1 of 3 -> 0.3333. Wilson by hand (z = 1.96): z²/n = 1.28049, centre
    (1/3 + 0.64024) / 2.28049 = 0.42691, half 1.96 sqrt(2/27 + 0.10671) / 2.28049 = 0.36544 ->
    [0.0615, 0.7923]."""
    assert sample.accuracy_cell(1, 3) == {"n": 3, "correct": 1, "accuracy": 0.3333, "interval": [0.0615, 0.7923]}
    assert sample.accuracy_cell(0, 0) == {"n": 0, "correct": 0, "accuracy": 0.0, "interval": [0.0, 1.0]}
