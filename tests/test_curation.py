"""Tests of the §4.1 curation tools in tests/curate.py: SAIL-Instruction2 (curate_instructions, §4.1.2) and
SAIL-Video (curate_video, §4.1.1).

Each test checks against something independent of the code under test: labels planted by the test
(the adjusted Rand index is computed here), degradations salted by the test at known lines, stub
annotators / scorers whose answers and scores the test fixes, a stub video scorer that reads the
motion direction from the pixels itself, bad lines written by the test.

Also a demonstration (not a test): `python tests/test_curation.py salt --synth DIR --out OUT` writes
salted copies of the synthetic sft2 families and of the video manifest (each salted record carries
"salted": KIND) for `python tests/curate.py curate-instructions` / `curate-video` to find, and
`python tests/test_curation.py audit --in SALTED --curated OUT/curated.jsonl` counts, per kind, what
curation flagged, kept and dropped, and how many answers agree with the record's `answer` before and
after (sample.score, the evaluation's own rule).
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import curate  # noqa: E402
import data  # noqa: E402
import sample  # noqa: E402
import synth as synthetic  # noqa: E402   (the name `synth` is the data fixture)
import vit  # noqa: E402

SFT2_FAMILIES = ("caption_qa", "count", "ocr", "chart", "multi")
KINDS = ("truncated", "copy", "empty", "repeated", "wrong")


# ----------------------------------------------------------------------------------------------
# helpers (also used by the demonstration)

def read_lines(manifest: Path) -> list:
    """The manifest's records with media paths made absolute (so a copy can live anywhere)."""
    out = []
    for line in manifest.read_text().splitlines():
        obj = json.loads(line)
        for key in ("image", "video"):
            if key in obj:
                v = obj[key]
                obj[key] = [str(manifest.parent / p) for p in v] if isinstance(v, list) else str(manifest.parent / v)
        out.append(obj)
    return out


def question_of(obj) -> str:
    return " ".join(obj["conversations"][0]["value"].replace("<image>", " ").replace("<video>", " ").split())


def degrade(kind: str, obj: dict, other: dict) -> dict:
    """`obj` with its answer degraded in one of KINDS (tagged "salted": kind)."""
    a = obj["conversations"][-1]["value"]
    if kind == "truncated":         # cut inside the longest word
        w = max(a.split(), key=len)
        start = a.index(w)
        a = a[:start + len(w) // 2]
    elif kind == "copy":
        a = question_of(obj)
    elif kind == "empty":
        a = ""
    elif kind == "repeated":
        a = " ".join([a.rstrip(".")] * 4)
    else:                           # wrong: the answer of a sample of another task
        a = other["conversations"][-1]["value"]
    conv = [dict(t) for t in obj["conversations"]]
    conv[-1]["value"] = a
    return {**obj, "conversations": conv, "salted": kind}


def salt(records: list, per_kind: dict, seed: int = 0) -> tuple:
    """(records with per_kind[kind] degraded answers at random lines, {index: kind})."""
    rng = random.Random(seed)
    longest = [max(r["conversations"][-1]["value"].split(), key=len) for r in records]
    seen = Counter((r["task"], w) for r, w in zip(records, longest))
    # truncation candidates: a word of >= 4 characters to cut that another answer of the task has whole
    cut = [i for i, (r, w) in enumerate(zip(records, longest)) if len(w) >= 4 and seen[r["task"], w] > 1]
    chosen, truth = set(), {}
    for kind, n in per_kind.items():
        pool = [i for i in (cut if kind == "truncated" else range(len(records))) if i not in chosen]
        for i in rng.sample(pool, n):
            chosen.add(i)
            truth[i] = kind
    out = []
    for i, r in enumerate(records):
        if i in truth:
            other = rng.choice([o for o in records if o["task"] != r["task"]])
            r = degrade(truth[i], r, other)
        out.append(r)
    return out, truth


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def static_copy(src_video: str, dst: Path, n_frames: int = 16):
    """A still video: the first frame of `src_video` repeated."""
    import av
    with av.open(src_video) as c:
        first = next(c.decode(video=0)).to_image()
    synthetic.write_video(dst, [first] * n_frames)


def salt_videos(records: list, out_dir: Path, n_static: int, n_mismatched: int, seed: int = 0) -> list:
    """Video records with n_static videos replaced by still copies and n_mismatched answers swapped
    with a sample of another direction (tagged "salted")."""
    rng = random.Random(seed)
    idx = rng.sample(range(len(records)), n_static + n_mismatched)
    out = [dict(r) for r in records]
    (out_dir / "static").mkdir(parents=True, exist_ok=True)
    for i in idx[:n_static]:
        dst = out_dir / "static" / f"static_{i:05d}.mp4"
        static_copy(out[i]["video"], dst)
        out[i] = {**out[i], "video": str(dst), "salted": "static"}
    for i in idx[n_static:]:
        other = rng.choice([r for r in records if r["answer"] != records[i]["answer"]])
        conv = [dict(t) for t in out[i]["conversations"]]
        conv[-1]["value"] = other["conversations"][-1]["value"]
        out[i] = {**out[i], "conversations": conv, "answer": other["answer"], "salted": "mismatched"}
    return out


def curated(out_dir: Path) -> list:
    return [json.loads(x) for x in (out_dir / "curated.jsonl").read_text().splitlines()]


def adjusted_rand_index(a, b) -> float:
    """ARI from the contingency table (Hubert & Arabie 1985)."""
    a, b = np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    comb = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    index, rows, cols, total = comb(table), comb(table.sum(1)), comb(table.sum(0)), comb(np.array([len(a)]))
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second OpenMP thread only spin-waits on a shared 2-core machine (measured: the
    tiny ViT on 3 tiles takes 1 s with 2 threads under load, 7 ms with 1); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic.make_synth(tmp_path_factory.mktemp("curation") / "synth", size=16, progress=False)


# ----------------------------------------------------------------------------------------------
# SAIL-Instruction2

def test_clustering_recovers_planted_classes():
    rng = random.Random(0)
    fillers = [f"w{i}" for i in range(40)]
    templates = ["What colour is the {} next to the {}?", "How many {} are on the {}?",
                 "Translate '{} {}' into French, please.", "Write a short poem about a {} and a {}."]
    planted = [t for t in range(4) for _ in range(40)]
    rng.shuffle(planted)
    texts = [templates[t].format(*rng.sample(fillers, 2)) for t in planted]
    X, names = curate.tfidf_embed(texts)
    assert X.shape == (160, curate.HASH_BUCKETS) and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    labels, centres, inertia = curate.kmeans(X, 4, seed=0)
    assert adjusted_rand_index(planted, labels) > 0.95
    joined = [" " + " ".join(data.WORD_RE.findall(t.lower())) + " " for t in texts]
    for j, name in enumerate(curate.class_names(X, labels, names)):    # each name n-gram: in the class, not outside
        assert len(name) == 3, name
        inside = [f" {g} " in joined[i] for g in name for i in np.flatnonzero(labels == j)]
        outside = [f" {g} " in joined[i] for g in name for i in np.flatnonzero(labels != j)]
        assert np.mean(inside) > 0.9 and np.mean(outside) < 0.1, (j, name)


def test_rules_find_degraded_answers_and_drop_them_without_annotator(synth, tmp_path):
    records = [r for f in ("caption_qa", "count", "ocr") for r in read_lines(synth / f / "train.jsonl")]
    per_kind = {"truncated": 3, "copy": 2, "empty": 2, "repeated": 2}
    salted, truth = salt(records, per_kind, seed=1)
    report = curate.curate_instructions([write_jsonl(tmp_path / "in.jsonl", salted)], tmp_path / "out", classes=5,
                                      progress=False)
    rule_of = {"truncated": "truncated", "copy": "copies_question", "empty": "empty", "repeated": "repeated"}
    assert {k: v for k, v in report["counts"].items() if k.startswith("rule:")} == \
        {f"rule:{rule_of[k]}": n for k, n in per_kind.items()}
    assert report["dropped"] == {**{f"rule:{rule_of[k]}": n for k, n in per_kind.items()}, "balancing": 0}
    kept = [r["conversations"] for r in curated(tmp_path / "out")]
    assert kept == [r["conversations"] for i, r in enumerate(records) if i not in truth]    # the clean ones, in order
    assert report["written"] == len(records) - sum(per_kind.values())
    assert {"classes.json", "report.json", "curated.jsonl"} <= {p.name for p in (tmp_path / "out").iterdir()}


class StubAnnotator:
    def __init__(self, replies):
        self.replies, self.asked = replies, []

    def generate(self, recs, max_new_tokens):
        self.asked += [r.turns[-1][1] for r in recs]
        return [self.replies[r.turns[-1][1]] for r in recs]


def test_reannotation_is_kept_only_when_it_scores_higher(synth, tmp_path):
    records = read_lines(synth / "ocr" / "train.jsonl")                  # 16 records, one class
    times = Counter(r["answer"] for r in records)
    ia = next(i for i, r in enumerate(records) if times[r["answer"]] > 1 and len(r["answer"]) >= 4)
    ib = next(i for i, r in enumerate(records) if times[r["answer"]] == 1)
    a, b = records[ia], records[ib]
    # not a's word: its other record must stay whole, or the cut is a prefix of no word the class shows
    ic = next(i for i, r in enumerate(records) if i not in (ia, ib) and r["answer"] != a["answer"])
    c = records[ic]
    word_a, word_b = a["answer"], b["answer"]
    records[ia] = degrade("truncated", a, a)                             # rule failure -> re-annotated
    records[ic] = degrade("empty", c, c)                                 # rule failure, reply fails too
    cut = records[ia]["conversations"][-1]["value"]
    scores = {word_b: -5.0, word_a: 1.0, "zzz": -9.0}                    # the stub scorer's values
    scorer = lambda rec: scores.get(rec.turns[-1][1], 0.0)              # noqa: E731
    annot = StubAnnotator({cut: word_a, word_b: "zzz", "": "no no no no"})
    report = curate.curate_instructions([write_jsonl(tmp_path / "in.jsonl", records)], tmp_path / "out",
                                      classes=1, scorer=scorer, annotator=annot, reannotate_frac=0.1,
                                      progress=False)
    assert sorted(annot.asked) == sorted([cut, word_b, ""])              # rule failures + the lowest 10% (1 of 14)
    by_name = {Path(r["image"][0]).name: r for r in curated(tmp_path / "out")}
    key = lambda r: Path(r["image"]).name                                # noqa: E731
    ra, rb = by_name[key(a)], by_name[key(b)]
    assert ra["conversations"][-1]["value"] == word_a
    assert ra["curation"].items() >= {"old_answer": cut, "new_answer": word_a, "old_score": None, "new_score": 1.0,
                                      "old_rule": "truncated", "kept": "new"}.items()
    assert rb["conversations"][-1]["value"] == word_b
    assert rb["curation"].items() >= {"old_answer": word_b, "new_answer": "zzz", "old_score": -5.0,
                                      "new_score": -9.0, "kept": "old"}.items()
    assert key(c) not in by_name                                          # empty answer, repeated reply: dropped
    assert report["dropped"] == {"reannotation_not_better": 1, "balancing": 0}
    assert report["counts"]["reannotated_kept_new"] == 1 and report["counts"]["reannotated_kept_old"] == 2
    assert report["written"] == 15


def test_cli_end_to_end_with_a_tiny_checkpoint(synth, tmp_path):
    import model
    ckpt = tmp_path / "ckpt"
    model.build_model("tiny", seed=0).save_pretrained(str(ckpt))
    records = read_lines(synth / "ocr" / "train.jsonl")[:8] + read_lines(synth / "count" / "train.jsonl")[:8]
    records[2] = degrade("copy", records[2], records[2])
    manifest = write_jsonl(tmp_path / "in.jsonl", records)
    curate.main(["curate-instructions", "--in", str(manifest), "--out", str(tmp_path / "i"), "--annotator", str(ckpt),
               "--classes", "2", "--max-new-tokens", "4", "--reannotate-frac", "0.25"])
    report = json.loads((tmp_path / "i" / "report.json").read_text())
    assert report["scorer"] == "CheckpointScorer" and report["counts"]["rule:copies_question"] == 1
    assert report["counts"]["low_score"] >= 2            # floor(0.25 x 7 or 8) per class
    assert sum(v for k, v in report["counts"].items() if k.startswith("reannotated_kept_")) == \
        1 + report["counts"]["low_score"]
    assert len(json.loads((tmp_path / "i" / "classes.json").read_text())) == 2
    assert all(isinstance(r["curation"]["score"], float) for r in curated(tmp_path / "i") if not r["curation"]["rule"])
    videos = write_jsonl(tmp_path / "v.jsonl", read_lines(synth / "video" / "train.jsonl")[:3])
    curate.main(["curate-video", "--in", str(videos), "--out", str(tmp_path / "v"), "--scorer", str(ckpt),
               "--num-frames", "4"])
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["scores"]["alignment"]["n"] == 3 and report["scores"]["pass_rate"]["n"] == 3
    assert report["scores"]["alignment"]["max"] != 0.0                   # the blank frames changed the likelihood


# ----------------------------------------------------------------------------------------------
# SAIL-Video

def test_static_video_scores_lower_richness_and_is_dropped(synth, tmp_path):
    moving = read_lines(synth / "video" / "train.jsonl")[:6]
    salted = salt_videos(moving, tmp_path, n_static=2, n_mismatched=0)
    for r in salted:
        rich = curate.video_richness(r["video"])
        if r.get("salted") == "static":
            assert rich["richness"] == 0.0 and rich["distinct_frames"] == 1
        else:
            assert rich["richness"] > 0.3 and rich["distinct_frames"] >= 8
    report = curate.curate_video([write_jsonl(tmp_path / "v.jsonl", salted)], tmp_path / "out", progress=False)
    assert report["counts"] == {"dropped:low_richness": 2, "fail:low_richness": 2, "kept": 4}
    assert "alignment" not in report["scores"] and "not computed" in report["note"]
    assert [r["conversations"] for r in curated(tmp_path / "out")] == \
        [r["conversations"] for r in salted if "salted" not in r]


class PixelScorer:
    """A scorer we control: log-likelihood +1 when the answer names the direction the shape moves
    in the frames (read from the pixels here), -1 when it names another, 0 on blank frames."""

    def direction(self, rec):
        f = vit.load_video(rec.videos[0], 16, image_size=32) * vit.IMAGENET_STD + vit.IMAGENET_MEAN
        ink = (f < 0.8).any(1).numpy()                                    # (T, 32, 32) non-white pixels
        if not ink[0].any():
            return None
        (y0, x0), (y1, x1) = [np.argwhere(ink[t]).mean(0) for t in (0, -1)]
        return ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")

    def loglik(self, rec, blank=False):
        if blank:
            return 0.0
        return 1.0 if self.direction(rec) in curate.words_of(rec.turns[-1][1]) else -1.0

    def generate(self, recs, max_new_tokens):
        return [f"It moves {self.direction(r)}." for r in recs]


def test_mismatched_answer_scores_lower_alignment_and_is_dropped(synth, tmp_path):
    records = read_lines(synth / "video" / "train.jsonl")[:8]
    salted = salt_videos(records, tmp_path, n_static=0, n_mismatched=3, seed=2)
    report = curate.curate_video([write_jsonl(tmp_path / "v.jsonl", salted)], tmp_path / "out", scorer=PixelScorer(),
                               progress=False)
    assert report["counts"] == {"dropped:low_alignment": 3, "fail:low_alignment": 3, "kept": 5}
    kept = curated(tmp_path / "out")
    assert [r["conversations"] for r in kept] == [r["conversations"] for r in salted if "salted" not in r]
    assert all(r["scores"]["alignment"] == 1.0 and r["scores"]["pass_rate"] == 1.0 for r in kept)
    assert report["scores"]["alignment"].items() >= {"min": -1.0, "max": 1.0, "n": 8}.items()
    # difficulty: the stub answers every kept one, so a max pass rate of 0.5 drops them as too easy
    report = curate.curate_video([tmp_path / "v.jsonl"], tmp_path / "out2", scorer=PixelScorer(), max_pass_rate=0.5,
                               progress=False)
    assert report["counts"]["dropped:too_easy"] == 5 and report["written"] == 0


# ----------------------------------------------------------------------------------------------
# bad input and determinism

def test_bad_input_counts_are_exact(synth, tmp_path):
    good = read_lines(synth / "ocr" / "train.jsonl")[:6]
    missing = {**good[0], "image": str(tmp_path / "nope.png")}
    no_answer = {"image": good[1]["image"], "conversations": good[1]["conversations"][:1]}
    text = "".join(json.dumps(r) + "\n" for r in good) + "{not json\n" + json.dumps(missing) + "\n" + \
        json.dumps(no_answer) + "\n" + json.dumps(good[2])[:40]           # the last line cut mid-record
    (tmp_path / "i.jsonl").write_text(text)
    report = curate.curate_instructions([tmp_path / "i.jsonl"], tmp_path / "i", classes=2, progress=False)
    assert report["dropped"] == {"bad:json": 2, "bad:missing_file": 1, "bad:not_instruction": 1, "balancing": 0}
    assert report["records"] == 6 and report["written"] == 6

    videos = read_lines(synth / "video" / "train.jsonl")[:4]
    (tmp_path / "garbage.mp4").write_bytes(bytes(range(256)) * 40)
    real = Path(videos[0]["video"]).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(real[:len(real) // 3])
    bad = [{**videos[1], "video": str(tmp_path / "absent.mp4")}, {**videos[2], "video": str(tmp_path / "garbage.mp4")},
           {**videos[3], "video": str(tmp_path / "cut.mp4")}]
    text = "".join(json.dumps(r) + "\n" for r in videos) + "[1, 2\n" + "".join(json.dumps(r) + "\n" for r in bad)
    (tmp_path / "v.jsonl").write_text(text)
    report = curate.curate_video([tmp_path / "v.jsonl"], tmp_path / "v", progress=False)
    assert report["counts"] == {"bad:json": 1, "bad:missing_file": 1, "bad:video": 2, "kept": 4}


def test_same_seed_same_bytes(synth, tmp_path):
    records = [r for f in ("ocr", "count", "caption_qa") for r in read_lines(synth / f / "train.jsonl")]
    records += read_lines(synth / "chart" / "train.jsonl")[:4]
    salted, _ = salt(records, {"truncated": 2, "wrong": 2}, seed=3)
    manifest = write_jsonl(tmp_path / "in.jsonl", salted)
    scorer = lambda rec: float(len(rec.turns[-1][1]) % 7)               # noqa: E731  (deterministic stub)

    def run(d, seed):
        return curate.curate_instructions([manifest], d, classes=6, scorer=scorer, cap=1.0, seed=seed, progress=False)

    report = run(tmp_path / "a", 0)
    run(tmp_path / "b", 0)
    run(tmp_path / "c", 1)
    assert report["dropped"]["balancing"] > 0                             # the seed has something to decide
    for name in ("curated.jsonl", "classes.json", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "curated.jsonl").read_bytes() != (tmp_path / "c" / "curated.jsonl").read_bytes()
    videos = write_jsonl(tmp_path / "v.jsonl", salt_videos(read_lines(synth / "video" / "train.jsonl")[:4], tmp_path,
                                                           1, 1))
    for d in ("va", "vb"):
        curate.curate_video([videos], tmp_path / d, scorer=PixelScorer(), progress=False)
    for name in ("curated.jsonl", "report.json"):
        assert (tmp_path / "va" / name).read_bytes() == (tmp_path / "vb" / name).read_bytes(), name


def answer_right(rec: dict) -> bool:
    """Whether a record's reply gives its own `answer`, by the evaluation's rule for its task."""
    return sample.score(rec["task"], rec["conversations"][-1]["value"], None, rec["answer"])[0]


def audit(salted: list, curated: list) -> dict:
    """Per salted kind (and "clean"): {"in", "kept" (written), "reannotated" (written after a rule or a
    low score sent it to the annotator, whichever answer won), "right_in" / "right_out" (answers that
    agree with the record's `answer`, before curation / in what was written)}. Curated records carry
    their input's fields."""
    rows = {k: Counter() for k in ("clean", *KINDS)}
    for rec in salted:
        row = rows[rec.get("salted", "clean")]
        row["in"] += 1
        row["right_in"] += answer_right(rec)
    for rec in curated:
        row = rows[rec.get("salted", "clean")]
        row["kept"] += 1
        row["reannotated"] += "kept" in rec["curation"]
        row["right_out"] += answer_right(rec)
    return {k: dict(v) for k, v in rows.items() if v}


def test_audit_counts_flags_and_right_answers_by_kind():
    """Hand-made: a clean count record kept as is (right), a clean one re-annotated wrong, a copied
    question re-annotated right, an empty answer dropped -> clean: in 2, re-annotated 1, right 2 -> 1;
    copy: 0 -> 1 right; empty: in 1, kept 0."""
    def rec(reply, kind=None, kept=None):
        r = {"task": "count", "answer": "3", "conversations": [{"from": "human", "value": "How many?"},
                                                                {"from": "gpt", "value": reply}]}
        return {**r, **({"salted": kind} if kind else {}), "curation": {"rule": None, **({"kept": kept} if kept else {})}}
    salted = [rec("3."), rec("3."), rec("How many?", "copy"), rec("", "empty")]
    curated = [rec("3."), rec("5.", kept="new"), rec("3.", "copy", kept="new")]
    got = audit([{k: v for k, v in r.items() if k != "curation"} for r in salted], curated)
    assert got == {"clean": {"in": 2, "right_in": 2, "kept": 2, "reannotated": 1, "right_out": 1},
                   "copy": {"in": 1, "right_in": 0, "kept": 1, "reannotated": 1, "right_out": 1},
                   "empty": {"in": 1, "right_in": 0}}


# ----------------------------------------------------------------------------------------------
# demonstration: salted copies of the synthetic data

def main(argv=None):
    p = argparse.ArgumentParser(description="salt: write salted copies of the synthetic sft2 families and video "
                                "manifest; audit: what curate-instructions did with each kind of salted record")
    p.add_argument("cmd", choices=["salt", "audit"])
    p.add_argument("--synth", default="data_synth", help="a `python tests/synth.py` folder")
    p.add_argument("--out", help="salt: the output folder")
    p.add_argument("--per-kind", type=int, default=16, help=f"salted records per kind of {KINDS}")
    p.add_argument("--videos", type=int, default=16, help="static and mismatched videos each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in", dest="inputs", help="audit: the salted manifest")
    p.add_argument("--curated", help="audit: curate-instructions' curated.jsonl")
    args = p.parse_args(argv)
    if args.cmd == "audit":
        if not (args.inputs and args.curated):
            p.error("audit needs --in SALTED --curated CURATED")
        rows = audit(read_lines(Path(args.inputs)), read_lines(Path(args.curated)))
        print(f"{'kind':<10} {'in':>5} {'kept':>5} {'re-annotated':>13} {'right in':>9} {'right out':>10}")
        for kind, r in {**rows, "all": sum(map(Counter, rows.values()), Counter())}.items():
            print(f"{kind:<10} {r['in']:>5} {r.get('kept', 0):>5} {r.get('reannotated', 0):>13} {r['right_in']:>9} "
                  f"{r.get('right_out', 0):>10}")
        return
    if not args.out:
        p.error("salt needs --out")
    synth_dir, out = Path(args.synth).resolve(), Path(args.out).resolve()
    records = [r for f in SFT2_FAMILIES for r in read_lines(synth_dir / f / "train.jsonl")]
    salted, truth = salt(records, {k: args.per_kind for k in KINDS}, args.seed)
    write_jsonl(out / "sft2_salted.jsonl", salted)
    videos = salt_videos(read_lines(synth_dir / "video" / "train.jsonl"), out, args.videos, args.videos, args.seed)
    write_jsonl(out / "video_salted.jsonl", videos)
    print(f"{out / 'sft2_salted.jsonl'}: {len(salted)} records, salted {dict(Counter(truth.values()))}")
    kinds = Counter(v["salted"] for v in videos if "salted" in v)
    print(f"{out / 'video_salted.jsonl'}: {len(videos)} records, salted {dict(kinds)}")


if __name__ == "__main__":
    main()
