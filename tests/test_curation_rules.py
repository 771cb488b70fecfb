"""The rules of the curation tools (tests/curate.py): which records each tool keeps, drops or rewrites,
what it counts, and how its options and seeds act.

From a hand mutation round: each test guards one behaviour that a small change of curate.py altered
without any other test noticing (tests/test_curation.py holds the §4.1 pipelines end to end on the
synthetic data; tests/test_data.py and tests/test_answers.py the first cases of the §3.1 and §4.2.2
tools). Expected values are worked out by hand in the comments; inputs are a few lines written into
tmp_path, text-only where the rule needs no media, and 64 x 64 videos of 16 frames where it does."""
import json
import random
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

import curate
import synth
from test_curation import write_jsonl


def conv(user, answer, **fields):
    return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}], **fields}


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def answers(path):
    return [r["conversations"][-1]["value"] for r in read_jsonl(path)]


# ----------------------------------------------------------------------------------------------
# §3.1 quality filter (quality_filter, heuristic_judge)

SCENE = [("red", "circle", "top", "left"), ("blue", "square", "bottom", "right")]


@pytest.fixture
def scene(tmp_path):
    """tmp_path/s.png: a red circle and a blue square on white (VIR ~0.23)."""
    synth.scene_image(SCENE).save(tmp_path / "s.png")
    return tmp_path / "s.png"


def test_vir_score_stays_within_0_and_1_on_a_busy_image():
    """Uniform noise: colour entropy ~1 and nearly every pixel an edge; the edge term is capped at 1,
    so VIR is ~1 and never above it."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert 0.99 < curate.vir_score(noise) <= 1.0


def test_ita_score_counts_a_colour_named_twice_once():
    """Red is present, green is not: {red, green} -> 1/2, however often the text says red."""
    img = synth.scene_image([("red", "circle", "top", "left")])
    assert curate.ita_score(img, "a red circle, a red square and a green one") == 0.5


def test_a_caption_naming_no_colour_scores_0_5_and_passes_the_default_filter(tmp_path, scene):
    """No colour word: ITA 0.5 (no evidence), which meets the default --min-ita 0.5 ("at least")."""
    assert curate.ita_score(Image.open(scene), "a circle and a square") == 0.5
    write_jsonl(tmp_path / "m.jsonl", [conv("<image>\nDescribe.", "a circle and a square.", image="s.png")])
    stats = curate.quality_filter(tmp_path / "m.jsonl", tmp_path / "o.jsonl", progress=False)
    assert stats == {"kept": 1}
    assert read_jsonl(tmp_path / "o.jsonl")[0]["scores"]["ita"] == 0.5


def test_scores_equal_to_the_thresholds_are_kept(tmp_path, scene):
    """Kept when VIR >= min_vir and ITA >= min_ita: a judge scoring exactly the thresholds keeps the record."""
    write_jsonl(tmp_path / "m.jsonl", [conv("<image>\nDescribe.", "x.", image="s.png")])
    stats = curate.quality_filter(tmp_path / "m.jsonl", tmp_path / "o.jsonl", progress=False,
                                  judge=lambda img, text: {"vir": 0.25, "ita": 0.75}, min_vir=0.25, min_ita=0.75)
    assert stats == {"kept": 1}


def multi_image(tmp_path, scene):
    """m.jsonl: one record with two images (s.png twice)."""
    return write_jsonl(tmp_path / "m.jsonl", [conv("<image>\n<image>\nCompare.", "a red circle.",
                                                   image=["s.png", "s.png"])])


def test_a_multi_image_record_passes_unscored_whatever_the_judge_says(tmp_path, scene):
    reject = lambda img, text: {"vir": 0.0, "ita": 0.0}          # noqa: E731
    stats = curate.quality_filter(multi_image(tmp_path, scene), tmp_path / "o.jsonl", judge=reject, progress=False)
    assert stats == {"kept_unscored": 1}
    assert "scores" not in read_jsonl(tmp_path / "o.jsonl")[0]


def test_an_unscored_record_s_media_paths_are_rebased_to_the_output_folder(tmp_path, scene):
    """m.jsonl's s.png, written to out/o.jsonl: "../s.png"."""
    curate.quality_filter(multi_image(tmp_path, scene), tmp_path / "out" / "o.jsonl", progress=False)
    assert read_jsonl(tmp_path / "out" / "o.jsonl")[0]["image"] == ["../s.png", "../s.png"]


def test_filter_cli_applies_min_vir_and_min_ita_to_their_own_scores(tmp_path, scene):
    """The scene's VIR is ~0.23, its ITA 1 against "red circle", 0 against "green circle": with
    --min-vir 0 --min-ita 0.6 the first is kept and the second dropped (swapped, both would go)."""
    write_jsonl(tmp_path / "m.jsonl", [conv("<image>\nDescribe.", "a red circle.", image="s.png"),
                                       conv("<image>\nDescribe.", "a green circle.", image="s.png")])
    curate.main(["filter", str(tmp_path / "m.jsonl"), str(tmp_path / "o.jsonl"), "--min-vir", "0", "--min-ita", "0.6"])
    assert answers(tmp_path / "o.jsonl") == ["a red circle."]


# ----------------------------------------------------------------------------------------------
# §3.1 Caption2-QA (caption_to_qa, template_qa)

CAPTION = "a red circle at the top left and a blue square at the bottom right."
PAIRS = [("What colour is the circle at the top left?", "red."), ("Where is the red circle?", "at the top left."),
         ("What shape is at the top left?", "a circle."),
         ("What colour is the square at the bottom right?", "blue."),
         ("Where is the blue square?", "at the bottom right."), ("What shape is at the bottom right?", "a square.")]


def qa_of(record):
    c = record["conversations"]
    return [(c[k]["value"], c[k + 1]["value"]) for k in range(0, len(c), 2)]


def test_caption2qa_cli_pairs_0_writes_every_pair(tmp_path, scene):
    write_jsonl(tmp_path / "m.jsonl", [conv("<image>\nDescribe.", CAPTION, image="s.png")])
    curate.main(["caption2qa", str(tmp_path / "m.jsonl"), str(tmp_path / "o.jsonl"), "--pairs", "0"])
    (rec,) = read_jsonl(tmp_path / "o.jsonl")
    assert qa_of(rec) == [("<image>\n" + PAIRS[0][0], PAIRS[0][1])] + PAIRS[1:]


def test_caption2qa_cli_seed_picks_the_pairs(tmp_path):
    """--pairs 1 over four copies of one caption: the pairs random.Random(seed) draws, one per record."""
    write_jsonl(tmp_path / "m.jsonl", [conv("Describe.", CAPTION)] * 4)
    got = {}
    for seed in (0, 1):
        curate.main(["caption2qa", str(tmp_path / "m.jsonl"), str(tmp_path / f"o{seed}.jsonl"), "--seed", str(seed)])
        rng = random.Random(seed)
        got[seed] = [qa_of(r) for r in read_jsonl(tmp_path / f"o{seed}.jsonl")]
        assert got[seed] == [rng.sample(PAIRS, 1) for _ in range(4)]
    assert got[0] != got[1]


def test_caption2qa_counts_a_longer_conversation_as_no_caption(tmp_path):
    long = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": CAPTION},
                              {"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]}
    write_jsonl(tmp_path / "m.jsonl", [conv("Describe.", CAPTION), long])
    stats = curate.caption_to_qa(tmp_path / "m.jsonl", tmp_path / "o.jsonl", progress=False)
    assert stats == {"converted": 1, "not_a_caption": 1}
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 1


def test_caption2qa_adds_no_image_placeholder_to_a_record_without_an_image(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [conv("Describe.", CAPTION)])
    curate.caption_to_qa(tmp_path / "m.jsonl", tmp_path / "o.jsonl", pairs=0, progress=False)
    assert qa_of(read_jsonl(tmp_path / "o.jsonl")[0]) == PAIRS


def test_template_qa_reads_a_capitalised_caption():
    assert curate.template_qa("A red circle at the top left.") == PAIRS[:3]


# ----------------------------------------------------------------------------------------------
# §4.2.2 LongCoT cleaning (clean_longcot, format_longcot, longcot_overlap)

def cot(question, chain, answer=r"\boxed{4}", **fields):
    return conv(question, f"<think>{chain}</think>{answer}", **fields)


def clean(tmp_path, rows, **kw):
    write_jsonl(tmp_path / "m.jsonl", rows)
    return curate.clean_longcot(tmp_path / "m.jsonl", tmp_path / "o.jsonl", progress=False, **kw)


def test_the_same_question_on_another_image_is_no_duplicate(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "white").save(tmp_path / name)
    stats = clean(tmp_path, [cot("<image>\nHow many?", "two plus two", image=n) for n in ("a.png", "b.png")],
                  balance=False)
    assert stats["kept"] == 2 and stats["duplicate"] == 0


def test_questions_differing_in_case_and_spacing_are_duplicates(tmp_path):
    stats = clean(tmp_path, [cot("How many?", "two plus two"), cot("how   MANY?", "two and two")], balance=False)
    assert stats["kept"] == 1 and stats["duplicate"] == 1


def test_an_overlap_equal_to_max_overlap_is_kept(tmp_path):
    r"""Answer tokens a b c d e f g \ boxed { 4 }: 10 word 3-grams, of which the chain
    "a b c d e f g \boxed{5}" holds the first 8 -> overlap 0.8, the default max_overlap: kept."""
    chain, answer = r"a b c d e f g \boxed{5}", r"a b c d e f g \boxed{4}"
    assert curate.longcot_overlap(chain, answer) == 0.8
    stats = clean(tmp_path, [cot("q", chain, answer)], balance=False)
    assert stats["kept"] == 1 and stats["redundant"] == 0


def test_a_short_answer_is_never_redundant(tmp_path):
    r"""\boxed{4} has 3 word 3-grams (\ boxed {, boxed { 4, { 4 }), fewer than 4: overlap 0 even
    though the chain ends with the same box."""
    chain = r"two plus two is four so \boxed{4}"
    assert curate.longcot_overlap(chain, r"\boxed{4}") == 0.0
    stats = clean(tmp_path, [cot("q", chain)], balance=False)
    assert stats["kept"] == 1 and stats["redundant"] == 0


def test_length_balancing_caps_buckets_at_the_ceiling_of_the_median_size(tmp_path):
    """Bucket sizes {2^1: 1, 2^3: 4}: median 2.5, target ceil(2.5) = 3, so one long chain goes."""
    rows = [cot("s0", "a b")] + [cot(f"l{i}", "a b c d e f g h") for i in range(4)]
    stats = clean(tmp_path, rows)
    assert stats["cot_len_2^3_before"] == 4 and stats["cot_len_2^3_after"] == 3 and stats["cot_len_2^1_after"] == 1
    assert stats["kept"] == 4 and stats["length_balanced_away"] == 1


def test_clean_longcot_cli_seed_picks_what_balancing_keeps(tmp_path):
    """Six 2-word chains and two 8-word ones: the short bucket is cut to 4 of 6; seeds 0 and 1 keep
    different ones (random.Random(0).sample(range(6), 4) = {0, 1, 3, 5}, seed 1: {0, 1, 4, 5})."""
    rows = [cot(f"s{i}", "a b") for i in range(6)] + [cot(f"l{i}", "a b c d e f g h") for i in range(2)]
    write_jsonl(tmp_path / "m.jsonl", rows)
    kept = {}
    for seed in (0, 1):
        curate.main(["clean-longcot", str(tmp_path / "m.jsonl"), str(tmp_path / f"o{seed}.jsonl"), "--seed", str(seed)])
        kept[seed] = [r["conversations"][0]["value"] for r in read_jsonl(tmp_path / f"o{seed}.jsonl")]
    assert kept == {0: ["s0", "s1", "s3", "s5", "l0", "l1"], 1: ["s0", "s1", "s4", "s5", "l0", "l1"]}


def test_clean_longcot_cli_no_balance_keeps_every_length(tmp_path):
    rows = [cot(f"s{i}", "a b") for i in range(6)] + [cot(f"l{i}", "a b c d e f g h") for i in range(2)]
    write_jsonl(tmp_path / "m.jsonl", rows)
    curate.main(["clean-longcot", str(tmp_path / "m.jsonl"), str(tmp_path / "o.jsonl"), "--no-balance"])
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 8


def test_cot_length_buckets_are_floor_log2_of_the_word_count(tmp_path):
    """3 words -> 2^1 (log2 3 = 1.58), 7 words -> 2^2 (log2 7 = 2.81)."""
    stats = clean(tmp_path, [cot("q1", "a b c"), cot("q2", "a b c d e f g")], balance=False)
    assert stats["cot_len_2^1_before"] == 1 and stats["cot_len_2^2_before"] == 1
    assert stats["cot_len_2^3_before"] == 0


def test_a_whitespace_only_chain_is_a_format_error(tmp_path):
    stats = clean(tmp_path, [cot("q1", " \n "), cot("q2", "two plus two")], balance=False)
    assert stats["bad:format"] == 1 and stats["kept"] == 1


def test_a_messages_record_is_rewritten_in_its_content_field(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": r"<think>t</think>\boxed{1}"}]}
    clean(tmp_path, [row], balance=False)
    assert read_jsonl(tmp_path / "o.jsonl")[0]["messages"] == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nt\n</think>\n\\boxed{1}"}]


# ----------------------------------------------------------------------------------------------
# §4.1.2 SAIL-Instruction2: the answer rules (answer_rule, class_stats)

NO_CLASS = {"median_chars": 0.0, "punct_rate": 0.0, "whole": set(), "prefixes": set()}   # no truncation evidence


def test_a_word_said_twice_is_no_repetition():
    """"the" twice covers half of "the cat, the dog." (4 words), but a repetition needs 3 times."""
    assert curate.answer_rule("Who is there?", "the cat, the dog.", NO_CLASS) is None


def test_a_word_said_three_times_in_a_long_answer_is_no_repetition():
    """"the" x 3 in 14 words: under half the words."""
    answer = "the cat sat on the mat by the door of a big red house."
    assert curate.answer_rule("Where is it?", answer, NO_CLASS) is None


def test_an_answer_with_exactly_80_percent_of_its_bigrams_in_the_question_copies_it():
    """Bigrams of "the colour of the big box": 5, of which 4 are in the question (all but "big box")."""
    question = "what is the colour of the big ball"
    assert curate.answer_rule(question, "the colour of the big box.", NO_CLASS) == "copies_question"


def test_the_answer_rules_are_linear_on_hostile_answers():
    """An answer copying an 8,000-word question took 8 s (the question's bigrams rebuilt for each of
    the answer's); a 100,000-letter word made 5 GB of prefixes. Both now take well under a second."""
    words = " ".join(f"w{i}" for i in range(8000))
    t = time.perf_counter()
    assert curate.answer_rule(words, words + ".", NO_CLASS) == "copies_question"
    stats = curate.class_stats(["a " + "x" * 100_000, "b."])
    assert curate.answer_rule("q?", "a " + "x" * 100, stats) is None
    assert time.perf_counter() - t < 1.0


def test_clean_longcot_counts_lines_that_are_json_but_no_object(tmp_path):
    """A line holding JSON that is no object (5, [1], "s") is a bad record, counted; it stopped the tool."""
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<think>t</think>\\boxed{1}"}]}
    (tmp_path / "m.jsonl").write_text("\n".join(["5", "[1]", '"s"', json.dumps(good)]) + "\n")
    stats = curate.clean_longcot(tmp_path / "m.jsonl", tmp_path / "o.jsonl", balance=False, progress=False)
    assert stats["kept"] == 1 and stats["bad:schema"] == 3


def curate_text(tmp_path, pairs, **kw):
    """curate_instructions on text-only (question, answer) records, one class unless told."""
    write_jsonl(tmp_path / "m.jsonl", [conv(q, a) for q, a in pairs])
    return curate.curate_instructions([tmp_path / "m.jsonl"], tmp_path / "out", **{"classes": 1, "progress": False,
                                                                                   **kw})


def test_an_unpunctuated_answer_ending_in_a_word_seen_whole_is_not_cut(tmp_path):
    """Class answers "a car." "a cart." "a carton." "a car": "car" begins "cart" but is also seen whole,
    so "a car" (2 words, shorter than the median 6.5) is no mid-word cut."""
    report = curate_text(tmp_path, [("Vehicle one?", "a car."), ("Vehicle two?", "a cart."),
                                    ("Vehicle three?", "a carton."), ("Vehicle four?", "a car")])
    assert report["counts"] == {"low_score": 0, "upsampled": 0} and report["written"] == 4


def test_a_longer_unpunctuated_answer_is_not_truncated(tmp_path):
    """Class answers "a b." "c d." "the elephant is big": median 4 characters; the last has 3+ words
    and most of the class ends with punctuation, but it is longer than the median: kept."""
    report = curate_text(tmp_path, [("First?", "a b."), ("Second?", "c d."), ("Third?", "the elephant is big")])
    assert report["counts"] == {"low_score": 0, "upsampled": 0} and report["written"] == 3


# ----------------------------------------------------------------------------------------------
# §4.1.2 SAIL-Instruction2: scores, re-annotation, balancing, classes

QA = [("What is the capital of France?", "Paris is the capital."), ("What is two plus two?", "It is four."),
      ("Name a primary colour.", "Red."), ("Which planet is largest?", "Jupiter is the largest planet.")]


class Annotator:
    def __init__(self, reply):
        self.reply = reply

    def generate(self, recs, max_new_tokens):
        return [self.reply for _ in recs]


def test_a_reannotation_scoring_the_same_keeps_the_old_answer(tmp_path):
    """Every score 0: z 0 throughout, the lowest floor(0.25 x 4) = 1 is the first record (ties by
    index); its new answer also scores 0, not higher: the old one stays."""
    report = curate_text(tmp_path, QA, scorer=lambda rec: 0.0, annotator=Annotator("A fresh answer."),
                         reannotate_frac=0.25)
    assert report["counts"]["reannotated_kept_old"] == 1 and "reannotated_kept_new" not in report["counts"]
    out = read_jsonl(tmp_path / "out" / "curated.jsonl")
    assert [r["conversations"][-1]["value"] for r in out] == [a for _, a in QA]
    assert out[0]["curation"]["kept"] == "old" and out[0]["curation"]["new_answer"] == "A fresh answer."


def test_without_an_annotator_the_lowest_scored_share_is_dropped(tmp_path):
    """Score = answer length: the shortest ("Red.", 4 characters) is the lowest 25%."""
    report = curate_text(tmp_path, QA, scorer=lambda rec: float(len(rec.turns[-1][1])), reannotate_frac=0.25)
    assert report["dropped"] == {"low_score": 1, "balancing": 0} and report["written"] == 3
    assert [r["conversations"][-1]["value"] for r in read_jsonl(tmp_path / "out" / "curated.jsonl")] == \
        [a for _, a in QA if a != "Red."]


def test_balancing_limit_is_the_ceiling_of_cap_times_the_median():
    """Sizes 3 and 1: median 2, limit ceil(1.25 x 2) = 3: nothing cut."""
    assert curate.balance_classes([[0, 1, 2], [3]], cap=1.25, upsample=False, seed=0) == ([0, 1, 2, 3], 2.0, 3)


def test_upsampling_repeats_a_small_class_to_the_ceiling_of_the_median():
    """Sizes 4 and 1: median 2.5, the class of 1 repeated to ceil(2.5) = 3."""
    assert curate.balance_classes([[0, 1, 2, 3], [4]], cap=2.0, upsample=True, seed=0) == \
        ([0, 1, 2, 3, 4, 4, 4], 2.5, 5)


def test_upsampled_repeats_are_not_counted_as_balanced_away(tmp_path):
    """Four sky questions and one translation, 2 classes: sizes 4 and 1, the 1 repeated to 3."""
    sky = [(f"What colour is the sky at {t}?", f"It is {c}.") for t, c in
           (("dawn", "pink"), ("noon", "blue"), ("dusk", "orange"), ("night", "black"))]
    report = curate_text(tmp_path, sky + [("Translate bonjour into English please.", "Hello.")], classes=2,
                         upsample=True)
    assert report["dropped"] == {"balancing": 0} and report["counts"]["upsampled"] == 2 and report["written"] == 7


def test_kmeans_numbers_classes_in_order_of_their_first_member():
    """Four well separated blobs in a shuffled order: label 0 is the first point's, and each class's
    first member comes after the previous class's."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    X = (centres[rng.permutation(np.repeat(np.arange(4), 5))] + rng.normal(0, 0.1, (20, 2))).astype(np.float32)
    for seed in range(3):
        labels = curate.kmeans(X, 4, seed=seed)[0]
        firsts = [int(np.flatnonzero(labels == j)[0]) for j in range(4)]
        assert firsts == sorted(firsts) and firsts[0] == 0, (seed, labels)


class Named:
    """A stub model: its class name is what report["scorer"] shows."""

    def __call__(self, rec):
        return 0.0

    def generate(self, recs, max_new_tokens):
        return [None for _ in recs]


def test_curate_instructions_cli_scores_with_scorer_not_annotator(tmp_path, monkeypatch):
    """Both given: --scorer scores (and the annotator only re-annotates)."""
    models = {"--scorer": type("Judge", (Named,), {})(), "--annotator": type("Writer", (Named,), {})()}
    monkeypatch.setattr(curate, "load_scorer", lambda ckpt, option, **kw: models[option] if ckpt else None)
    write_jsonl(tmp_path / "m.jsonl", [conv(q, a) for q, a in QA])
    curate.main(["curate-instructions", "--in", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out"),
                 "--classes", "1", "--scorer", "J", "--annotator", "W"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["scorer"] == "Judge"


# ----------------------------------------------------------------------------------------------
# §4.1.1 SAIL-Video (curate_video, video_richness, answer_passes)

def frames(kind, n=16):
    """64 x 64 frames: 'still' (a red square), 'moving' (it moves 2 px right a frame), 'noise',
    'alternating' (white, then the red square, and so on)."""
    out, rng = [], np.random.default_rng(0)
    for t in range(n):
        if kind == "noise":
            out.append(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
            continue
        img = Image.new("RGB", (64, 64), "white")
        x = 8 + 2 * t if kind == "moving" else 20
        if kind != "alternating" or t % 2:
            ImageDraw.Draw(img).rectangle([x, 20, x + 20, 40], fill=(220, 40, 40))
        out.append(img)
    return out


@pytest.fixture
def video(tmp_path):
    def make(kind):
        path = tmp_path / f"{kind}.mp4"
        if not path.exists():
            synth.write_video(path, frames(kind))
        return str(path)
    return make


def test_richness_saturates_at_1_on_noise(video):
    """Every frame new (distinct term 0.5 x 15/15) and motion far above 0.05 (capped: 0.5)."""
    assert curate.video_richness(video("noise"))["richness"] == 1.0


def test_a_frame_seen_before_is_not_distinct(video):
    """White, square, white, square, ...: two distinct frames, however often they come back."""
    assert curate.video_richness(video("alternating"))["distinct_frames"] == 2


def test_a_record_is_as_rich_as_its_poorest_video(tmp_path, video):
    row = conv("<video>\n<video>\nWhat moves?", "the square.", video=[video("still"), video("moving")])
    report = curate.curate_video([write_jsonl(tmp_path / "v.jsonl", [row])], tmp_path / "out", progress=False)
    assert report["counts"] == {"dropped:low_richness": 1, "fail:low_richness": 1}


class Scorer:
    """Mean log-likelihood `ll` on the video, `blank` on white frames; replies "no"."""

    def __init__(self, ll, blank):
        self.ll, self.blank = ll, blank

    def loglik(self, rec, blank=False):
        return self.blank if blank else self.ll

    def generate(self, recs, max_new_tokens):
        return ["no" for _ in recs]


def test_a_record_is_dropped_for_its_first_failing_check(tmp_path, video):
    """A still video (richness 0) that also lowers the answer's likelihood (alignment -1 - 0 = -1):
    both failures counted, dropped for richness, the first check."""
    rows = [conv("<video>\nWhat moves?", "the square.", video=video("still"))]
    report = curate.curate_video([write_jsonl(tmp_path / "v.jsonl", rows)], tmp_path / "out", scorer=Scorer(-1.0, 0.0),
                                 progress=False)
    assert report["counts"] == {"dropped:low_richness": 1, "fail:low_richness": 1, "fail:low_alignment": 1}


def test_without_an_answer_the_pass_rate_is_the_per_token_probability(tmp_path, video):
    """Mean log-likelihood -0.5: pass rate exp(-0.5) = 0.6065; alignment -0.5 - (-1) = 0.5."""
    rows = [conv("<video>\nWhat moves?", "the square.", video=video("moving"))]
    curate.curate_video([write_jsonl(tmp_path / "v.jsonl", rows)], tmp_path / "out", scorer=Scorer(-0.5, -1.0),
                        progress=False)
    scores = read_jsonl(tmp_path / "out" / "curated.jsonl")[0]["scores"]
    assert scores["pass_rate"] == 0.6065 and scores["alignment"] == 0.5


def test_an_alignment_equal_to_min_alignment_is_kept(tmp_path, video):
    """The video leaves the likelihood as white frames do: alignment 0, the default minimum: kept."""
    rows = [conv("<video>\nWhat moves?", "the square.", video=video("moving"))]
    report = curate.curate_video([write_jsonl(tmp_path / "v.jsonl", rows)], tmp_path / "out", scorer=Scorer(-1.0, -1.0),
                                 progress=False)
    assert report["counts"] == {"kept": 1}


def test_a_record_without_video_is_written_unscored(tmp_path):
    write_jsonl(tmp_path / "v.jsonl", [conv("Hello?", "Hi.")])
    report = curate.curate_video([tmp_path / "v.jsonl"], tmp_path / "out", progress=False)
    assert report["counts"] == {"kept_unscored": 1} and report["written"] == 1
    assert read_jsonl(tmp_path / "out" / "curated.jsonl") == [conv("Hello?", "Hi.")]


def test_answer_passes_on_whole_words_only():
    assert curate.answer_passes("the cat sat down", "cat")
    assert not curate.answer_passes("a category of its own", "cat")
