"""Data curation of SAIL-VL2, the tools run before training (paper §3.1, §4.1, §4.2.2).

    python tests/curate.py filter M.jsonl OUT.jsonl                     # §3.1 judge-score quality filter
    python tests/curate.py caption2qa M.jsonl OUT.jsonl --pairs 2        # §3.1 Caption2-QA
    python tests/curate.py clean-longcot LONGCOT.jsonl OUT.jsonl        # §4.2.2 LongCoT data cleaning
    python tests/curate.py curate-instructions --in sft.jsonl --out curated/ --annotator out/sft1   # §4.1.2
    python tests/curate.py curate-video --in video.jsonl --out curated_video/ --scorer out/sft4     # §4.1.1

Tooling beside the components, like the synthetic-data generator (tests/synth.py): it reads and
writes manifests in the format of data.py and scores with checkpoints through sample.py, and the
training stages never import it. `python tests/curate.py TOOL --help` explains each tool.
"""
import json
import math
import os
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import repo_path

repo_path.add_repo_root()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from data import (COLOURS, IMAGE, PLACEHOLDER_RE, WORD_RE, DataConfig, DataError, InputError, Record,  # noqa: E402
                  UsageError, build_sample, manifest_records, ngrams, parse_record, prompt_inputs, rebase_media,
                  special_ids, think_turn)
from sample import BOXED, Parser, answers_match, final_answer, last_boxed, load, normalize_answer  # noqa: E402
from vit import IMAGENET_MEAN, IMAGENET_STD, blank_pixels, load_video, open_image  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Curation §3.1 (pre-training data): judge-score quality filter and caption -> QA (chart
# rendering with QA, §3.1's synthetic chart data, is a generator: tests/synth.py charts)
#
# The paper scores SAIL-Caption2 with judge models for visual information richness (VIR) and
# image-text alignment (ITA) and drops low scorers. A judge here is any callable
# (PIL image, text) -> {"vir": float, "ita": float} in [0, 1]; plug in a VLM judge for real data.
# The default `heuristic_judge` is honest about what it is: image statistics, calibrated for the
# synthetic domain of tests/synth.py (flat shapes in known colours on white).

def vir_score(img: Image.Image) -> float:
    """Visual information richness: mean of the normalised colour-histogram entropy (4 levels per
    channel, 64 bins) and the edge density (share of pixels with a strong luminance gradient)."""
    a = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.int64)
    hist = np.bincount(((a // 64) * np.array([16, 4, 1])).sum(-1).ravel(), minlength=64) / (64 * 64)
    p = hist[hist > 0]
    entropy = float(-(p * np.log(p)).sum() / math.log(64))
    gray = a.mean(-1)
    grad = np.abs(np.diff(gray, axis=0))[:, :-1] + np.abs(np.diff(gray, axis=1))[:-1, :]
    edges = float((grad > 40).mean())
    return 0.5 * entropy + 0.5 * min(1.0, 10 * edges)


def ita_score(img: Image.Image, text: str) -> float:
    """Image-text alignment: the share of colour words in `text` whose colour covers at least 0.2%
    of the image; 0.5 (no evidence either way) when the text names no colour."""
    named = [c for c in dict.fromkeys(re.findall(r"[a-z]+", text.lower())) if c in COLOURS]
    if not named:
        return 0.5
    a = np.asarray(img.convert("RGB").resize((64, 64), Image.NEAREST), dtype=np.int64)
    near = [(((a - np.array(COLOURS[c])) ** 2).sum(-1) < 60 ** 2).mean() for c in named]
    present = [share >= 0.002 for share in near]
    return sum(present) / len(named)


def heuristic_judge(img: Image.Image, text: str) -> dict:
    return {"vir": vir_score(img), "ita": ita_score(img, text)}


def quality_filter(manifest, out, judge=heuristic_judge, min_vir: float = 0.05, min_ita: float = 0.5,
                   progress: bool = True) -> Counter:
    """Keep records whose single image scores at least min_vir and min_ita against the assistant text.
    Kept lines gain "scores"; text-only and multi-image records pass unscored. Returns counts per outcome."""
    manifest, out = Path(manifest), Path(out)
    stats, kept = Counter(), []
    for where, obj, rec in manifest_records(manifest, "filter", stats, progress):
        if rec.text is not None or len(rec.images) != 1 or rec.videos:
            stats["kept_unscored"] += 1
            kept.append(json.dumps(rebase_media(obj, rec, out.parent) if rec.text is None else obj, ensure_ascii=False))
            continue
        try:
            scores = judge(open_image(rec.images[0], where), " ".join(c for r, c in rec.turns if r == "assistant"))
        except DataError as e:
            stats[f"bad:{e.reason}"] += 1
            continue
        if scores["vir"] < min_vir:
            stats["low_vir"] += 1
        elif scores["ita"] < min_ita:
            stats["low_ita"] += 1
        else:
            stats["kept"] += 1
            kept.append(json.dumps({**rebase_media(obj, rec, out.parent),
                                    "scores": {k: round(v, 4) for k, v in scores.items()}}, ensure_ascii=False))
    data.write_atomic(out, "".join(k + "\n" for k in kept))
    return stats


# Caption -> QA (§3.1 "Caption2-QA"): a generator maps a caption to (question, answer) pairs. The
# template default parses the synthetic caption grammar ("a red circle at the top left and ...");
# captions it cannot parse fall back to a describe-the-image pair. Plug in an LLM for real captions.
CAPTION_CLAUSE = re.compile(r"\ban? ([a-z]+) ([a-z]+) at the ([a-z]+) ([a-z]+)")


def template_qa(caption: str) -> list:
    qa, objects = [], CAPTION_CLAUSE.findall(caption.lower())
    twice = {k for k, n in Counter((c, s) for c, s, _, _ in objects).items() if n > 1}
    for colour, shape, row, col in objects:
        qa.append((f"What colour is the {shape} at the {row} {col}?", f"{colour}."))
        if (colour, shape) not in twice:    # "Where is the red circle?" of two red circles has two true answers
            qa.append((f"Where is the {colour} {shape}?", f"at the {row} {col}."))
        qa.append((f"What shape is at the {row} {col}?", f"a {shape}."))
    return qa or [("Describe the image.", caption)]


def caption_to_qa(manifest, out, generator=template_qa, pairs: int = 1, seed: int = 0,
                  progress: bool = True) -> Counter:
    """Rewrite caption records (one user turn, one assistant caption) as QA conversations with
    `pairs` pairs drawn from generator(caption) (0 = all). Other or bad records are counted, not kept."""
    manifest, out = Path(manifest), Path(out)
    rng, stats, kept = random.Random(seed), Counter(), []
    for _, obj, rec in manifest_records(manifest, "caption2qa", stats, progress):
        if rec.text is not None or len(rec.turns) != 2 or rec.turns[1][0] != "assistant":
            stats["not_a_caption"] += 1
            continue
        qa = generator(rec.turns[1][1])
        qa = rng.sample(qa, min(pairs, len(qa))) if pairs else qa
        conv = []
        for k, (q, a) in enumerate(qa):
            conv += [{"from": "human", "value": (IMAGE + "\n" if k == 0 and rec.images else "") + q},
                     {"from": "gpt", "value": a}]
        kept.append(json.dumps({**rebase_media({}, rec, out.parent), "conversations": conv, "task": "caption_qa"},
                               ensure_ascii=False))
        stats["converted"] += 1
    data.write_atomic(out, "".join(k + "\n" for k in kept))
    return stats


# ----------------------------------------------------------------------------------------------
# Curation §4.1 (post-training data): SAIL-Instruction2 (§4.1.2) and SAIL-Video (§4.1.1)
#
# The paper's: the stages (latent classes, quality scoring, re-annotation by a stronger model, class
# balancing; video alignment / richness / difficulty scoring and filtering). It gives no algorithm: the
# rest is ours (TF-IDF, k-means++, every formula and threshold), documented where it is computed.
# Models are duck-typed arguments (CheckpointScorer wraps a checkpoint; the tests pass stubs):
#   scorer(rec) -> float                        answer quality, higher is better (instructions)
#   annotator.generate(recs, max_new_tokens)    -> [a new last answer, or None: no stop token came]
#   scorer.loglik(rec, blank=False) -> float    mean answer log-likelihood, optionally on white frames

HASH_BUCKETS = 4096                           # hashed n-gram features per instruction
TERMINAL = tuple(".!?。！？…)]}\"'`*$")         # what a finished answer may end with
RICH_SIZE, PIXEL_CHANGE, DISTINCT_SHARE, FULL_MOTION = 64, 0.1, 0.01, 0.05   # see video_richness


def words_of(text: str) -> list:
    return re.findall(r"\w+", text.lower())


def instruction_text(rec: Record) -> str:
    """The user turns' words without placeholders: what is clustered."""
    return " ".join(PLACEHOLDER_RE.sub(" ", " ".join(c for r, c in rec.turns if r == "user")).split())


def instruction_check(rec: Record, where: str):
    """Refuse (DataError) a record that does not end with an assistant turn, or whose media are missing."""
    if rec.text is not None or rec.turns[-1][0] != "assistant":
        raise DataError("not_instruction", where, "the record does not end with an assistant turn")
    for path in rec.images + rec.videos:
        if not os.path.exists(path):
            raise DataError("missing_file", where, f"media file not found: {path}")


def read_instructions(manifests, desc: str, bad: Counter, progress: bool):
    """(obj, rec) per record that ends with an assistant turn and whose media files exist; the others
    are counted in `bad` as bad:<reason> (json, schema, not_instruction, missing_file, ...)."""
    for manifest in manifests:
        for _, obj, rec in manifest_records(manifest, desc, bad, progress, check=instruction_check):
            yield obj, rec


def tfidf_embed(texts: list, buckets: int = HASH_BUCKETS) -> tuple:
    """Hashed word 1-2-gram TF-IDF: X (N, buckets) float32, rows L2-normalised, and {bucket: its most
    common n-gram} to name classes by. Binary tf (instructions rarely repeat a phrase), idf =
    log((1 + N) / (1 + df)) + 1, bucket = crc32(n-gram) % buckets (the same in every run)."""
    X, names = np.zeros((len(texts), buckets), np.float32), {}
    for i, t in enumerate(texts):
        for g in sorted(" ".join(g) for n in (1, 2) for g in ngrams(t, n)):     # sorted: ties break alike
            b = zlib.crc32(g.encode()) % buckets
            X[i, b] = 1.0
            names.setdefault(b, Counter())[g] += 1
    X *= (np.log((1 + len(texts)) / (1 + X.sum(0))) + 1).astype(np.float32)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X, {b: c.most_common(1)[0][0] for b, c in names.items()}


def sq_dists(X, C) -> np.ndarray:
    """(N, k) squared Euclidean distances between the rows of X and of C."""
    return np.maximum((X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None], 0)


def kmeans(X: np.ndarray, k: int, seed: int = 0, restarts: int = 4, iters: int = 100) -> tuple:
    """Lloyd's k-means, k-means++ seeding, the lowest inertia of `restarts` runs (ours). X (N, D) ->
    (labels (N,), centres (k', D), inertia); classes numbered in order of their first member, k' <= k."""
    rng, k, best = np.random.default_rng(seed), min(k, len(X)), None
    for _ in range(restarts):
        C = X[[rng.integers(len(X))]]
        for _ in range(1, k):       # k-means++: the next centre drawn with probability ~ squared distance
            d2 = sq_dists(X, C).min(1)
            C = np.vstack([C, X[rng.choice(len(X), p=d2 / d2.sum() if d2.sum() > 0 else None)]])
        labels = None
        for _ in range(iters):
            d2 = sq_dists(X, C)
            if labels is not None and (d2.argmin(1) == labels).all():
                break
            labels = d2.argmin(1)
            for j in range(k):      # an emptied class restarts at the point farthest from its centre
                C[j] = X[labels == j].mean(0) if (labels == j).any() else X[d2.min(1).argmax()]
        d2 = sq_dists(X, C)
        if best is None or d2.min(1).sum() < best[2]:
            best = (d2.argmin(1), C.copy(), float(d2.min(1).sum()))
    labels, C, inertia = best
    uniq, first = np.unique(labels, return_index=True)
    order = uniq[np.argsort(first)]
    return np.argsort(order)[np.searchsorted(uniq, labels)], C[order], inertia


def class_names(X, labels, bucket_names: dict, top: int = 3) -> list:
    """Per class, the n-grams whose mean TF-IDF weight in the class most exceeds their mean over all."""
    lift = [X[labels == j].mean(0) - X.mean(0) for j in range(labels.max() + 1)]
    return [[bucket_names[b] for b in np.argsort(-d, kind="stable")[:top] if d[b] > 0] for d in lift]


MAX_WORD_CHARS = 64         # a longer "word" (a hostile run of letters) is no word a truncation cut:
                            # its prefixes would take memory quadratic in its length


def class_stats(answers: list) -> dict:
    """What a class's answers look like, for the truncation rule. A word is seen whole when another
    word follows it or it ends an answer with final punctuation."""
    ws, ends = [words_of(a) for a in answers], [a.strip().endswith(TERMINAL) for a in answers]
    return {"median_chars": float(np.median([len(a.strip()) for a in answers])), "punct_rate": float(np.mean(ends)),
            "whole": {x for w, end in zip(ws, ends) for x in (w if end else w[:-1])},
            "prefixes": {x[:i] for w in ws for x in w if len(x) <= MAX_WORD_CHARS for i in range(1, len(x))}}


def answer_rule(question: str, answer: str, stats: dict):
    """The first cheap rule the answer fails, or None (ours):
      empty            nothing but whitespace
      repeated         one word n-gram (n = 1, 2, 3) occurs >= 3 times and covers >= half the words
      copies_question  >= 80% of the answer's word bigrams occur in the question (answers of >= 2 words)
      truncated        no final punctuation, shorter than the class median (characters), and either
                       cut mid-word (the last word is never seen whole in the class but begins one of
                       its words) or a cut sentence (>= 3 words, most (>= 50%) of the class ends with
                       punctuation)"""
    a = answer.strip()
    if not a:
        return "empty"
    w = words_of(a)
    for n in (1, 2, 3):
        top = Counter(zip(*(w[i:] for i in range(n)))).most_common(1)
        if top and top[0][1] >= 3 and top[0][1] * n >= 0.5 * len(w):
            return "repeated"
    qw, bigrams = words_of(question), list(zip(w, w[1:]))
    question_bigrams = set(zip(qw, qw[1:]))
    if bigrams and sum(g in question_bigrams for g in bigrams) >= 0.8 * len(bigrams):
        return "copies_question"
    mid_word = w and w[-1] not in stats["whole"] and w[-1] in stats["prefixes"]
    if not a.endswith(TERMINAL) and len(a) < stats["median_chars"] and (
            mid_word or (len(w) >= 3 and stats["punct_rate"] >= 0.5)):
        return "truncated"
    return None


class CheckpointScorer:
    """A loaded checkpoint as scorer and annotator. `model`: SAILVL-like (forward with labels ->
    .ce_sum, .n_targets; generate); `tok`: its tokenizer; `cfg`: its DataConfig."""

    def __init__(self, model, tok, cfg: DataConfig):
        self.model, self.tok, self.cfg = model, tok, replace(cfg, label_mode="sft")
        self.stop = {special_ids(tok).im_end, special_ids(tok).endoftext}

    @torch.no_grad()
    def loglik(self, rec: Record, blank: bool = False) -> float:
        """Mean per-token log-likelihood of the assistant turns given what precedes them and the
        media (blank=True: every tile and frame white)."""
        s = build_sample(rec, self.tok, self.cfg)
        pv = blank_pixels(s["pixel_values"]) if blank else s["pixel_values"]
        out = self.model(s["input_ids"][None], pv, labels=s["labels"][None])
        return float(-out.ce_sum / out.n_targets)

    __call__ = loglik

    @torch.no_grad()
    def generate(self, recs: list, max_new_tokens: int = 256) -> list:
        """Greedy new last answers (None where no stop token came within max_new_tokens)."""
        ps = [prompt_inputs(self.tok, self.cfg, r.turns[:-1], r.images, r.videos, bool(r.think), r.system)
              for r in recs]
        pv = [p["pixel_values"] for p in ps if p["pixel_values"] is not None]
        pv = None if not pv else [t for p in pv for t in p] if self.cfg.anyres else torch.cat(pv)
        out = self.model.generate([p["input_ids"].tolist() for p in ps], pv, max_new_tokens=max_new_tokens,
                                  stop_tokens=self.stop, n_valid_tokens=self.tok.n_vocab,
                                  banned=data.undecodable_ids(self.tok))
        return [self.tok.decode_bytes(o[:-1]).decode("utf-8", "replace") if o and o[-1] in self.stop else None
                for o in out]


def _r(x):
    return None if x is None else round(float(x), 4)


def write_outputs(out_dir: Path, lines: list, **files):
    """out_dir/curated.jsonl (one JSON line each) and out_dir/NAME.json for each keyword, each atomic."""
    data.write_atomic(out_dir / "curated.jsonl", "".join(x + "\n" for x in lines))
    for name, value in files.items():
        data.write_json(out_dir / f"{name}.json", value)


def score_in_classes(items: list, members: list, rule: list, scorer, reannotate_frac: float, progress: bool):
    """curate_instructions' quality step: (raw scores, z-scores within the class, fate {index: why
    dropped}, the lowest-z share of each class). A rule failure is not scored; without a scorer
    nothing is."""
    n = len(items)
    raw, z, fate, low = [None] * n, [None] * n, {}, set()     # fate: index -> why dropped
    for i in tqdm(range(n) if scorer else [], desc="score", disable=data.no_bar(progress)):
        try:
            raw[i] = None if rule[i] else float(scorer(items[i][1]))
        except DataError as e:
            fate[i] = f"bad:{e.reason}"
    for m in members:               # z-score within the class, then its lowest share
        scored = [i for i in m if raw[i] is not None]
        v = np.array([raw[i] for i in scored])
        for i, x in zip(scored, v):
            z[i] = float((x - v.mean()) / v.std()) if v.std() > 1e-12 else 0.0
        low.update(sorted(scored, key=lambda i: (z[i], i))[:int(reannotate_frac * len(scored))])
    return raw, z, fate, low


def balance_classes(alive: list, cap: float, upsample: bool, seed: int) -> tuple:
    """curate_instructions' balancing step: (sorted indices kept, repeats included; the median class
    size; the per-class limit ceil(cap x median)). Seeded down-sampling above the limit; with
    `upsample`, classes below the median repeated up to it."""
    median = float(np.median([len(a) for a in alive if a])) if any(alive) else 0.0
    limit, rng, keep = math.ceil(cap * median), random.Random(seed), []
    for a in alive:
        if len(a) > limit:
            a = sorted(rng.sample(a, limit))
        elif upsample and a and len(a) < median:
            a = a * (math.ceil(median) // len(a)) + sorted(rng.sample(a, math.ceil(median) % len(a)))
        keep += a
    return sorted(keep), median, limit


def curate_instructions(manifests, out_dir, classes: int = 8, scorer=None, annotator=None,
                        reannotate_frac: float = 0.1, cap: float = 2.0, upsample: bool = False, seed: int = 0,
                        max_new_tokens: int = 256, progress: bool = True) -> dict:
    """SAIL-Instruction2 curation (§4.1.2) into out_dir/{curated.jsonl, classes.json, report.json};
    returns the report. Paper: latent classes, quality scores, re-annotation, class balancing. Ours:
    - classes: kmeans (k-means++, 4 restarts) on tfidf_embed(instruction_text), named by class_names.
    - quality: answer_rule's cheap rules always (a failure scores lowest); with a scorer (default with
      an annotator: its mean answer log-likelihood), the z-score of the score within the class.
    - re-annotation of every rule failure plus the floor(reannotate_frac x n) lowest z of each class
      (that share needs a scorer): the annotator's greedy answer replaces the old one only when it
      passes the rules and scores higher (a rule failure scores below any answer); both stay under
      "curation" for audit; a rule failure with no better answer is dropped. Without an annotator
      all these are dropped. (An annotator scoring its own greedy answers favours them: give a
      separate scorer, a judge, to avoid it.)
    - balancing: a class keeps at most ceil(cap x median class size), seeded down-sampling; with
      `upsample`, classes below the median are repeated up to it, else kept as they are."""
    out_dir, dropped, counts = Path(out_dir), Counter(), Counter()
    items = list(read_instructions(manifests, "read", dropped, progress))
    scorer, n = scorer or annotator, len(items)
    questions, answers = [instruction_text(r) for _, r in items], [r.turns[-1][1] for _, r in items]
    X, bucket_names = tfidf_embed(questions)
    labels = kmeans(X, classes, seed)[0] if n else np.zeros(0, np.int64)
    members = [np.flatnonzero(labels == j).tolist() for j in range(int(labels.max()) + 1 if n else 0)]
    cstats = [class_stats([answers[i] for i in m]) for m in members]
    rule = [answer_rule(q, a, cstats[c]) for q, a, c in zip(questions, answers, labels)]
    counts.update(f"rule:{x}" for x in rule if x)
    raw, z, fate, low = score_in_classes(items, members, rule, scorer, reannotate_frac, progress)
    audit, counts["low_score"] = {}, len(low)
    for i in tqdm([i for i in range(n) if (rule[i] or i in low) and i not in fate], desc="re-annotate",
                  disable=data.no_bar(progress and annotator is not None)):
        if annotator is None:
            fate[i] = f"rule:{rule[i]}" if rule[i] else "low_score"
            continue
        try:
            new = annotator.generate([items[i][1]], max_new_tokens)[0]
            new_rule = "unfinished" if new is None else answer_rule(questions[i], new, cstats[labels[i]])
            rec = replace(items[i][1], turns=items[i][1].turns[:-1] + [("assistant", new)])
            new_raw = float(scorer(rec)) if new_rule is None else None
        except DataError as e:
            fate[i] = f"bad:{e.reason}"
            continue
        better = new_rule is None and (rule[i] is not None or new_raw > raw[i])
        audit[i] = {"old_answer": answers[i], "new_answer": new, "old_score": _r(raw[i]), "new_score": _r(new_raw),
                    "old_rule": rule[i], "new_rule": new_rule, "kept": "new" if better else "old"}
        counts[f"reannotated_kept_{audit[i]['kept']}"] += 1
        if rule[i] and not better:
            fate[i] = "reannotation_not_better"
    alive = [[i for i in m if i not in fate] for m in members]
    keep, median, limit = balance_classes(alive, cap, upsample, seed)
    dropped.update(fate.values())
    dropped["balancing"], counts["upsampled"] = sum(map(len, alive)) - len(set(keep)), len(keep) - len(set(keep))
    lines = []
    for i in keep:
        obj, rec, key = items[i][0], items[i][1], "conversations" if "conversations" in items[i][0] else "messages"
        if audit.get(i, {}).get("kept") == "new":       # the new answer goes into the last assistant turn
            turns = [dict(t) for t in obj[key]]
            turns[-1]["value" if key == "conversations" else "content"] = audit[i]["new_answer"]
            obj = {**obj, key: turns}
        lines.append(json.dumps({**rebase_media(obj, rec, out_dir), "curation": {
            "class": int(labels[i]), "score": _r(z[i]), "rule": rule[i], **audit.get(i, {})}}, ensure_ascii=False))
    names, after = class_names(X, labels, bucket_names) if n else [], Counter(int(labels[i]) for i in keep)
    info = [{"class": j, "name": names[j], "size_before": len(m), "size_after": after[j],
             "mean_score": _r(np.mean(v)) if (v := [raw[i] for i in m if raw[i] is not None]) else None,
             "examples": list(dict.fromkeys(questions[i] for i in m))[:3]} for j, m in enumerate(members)]
    report = {"section": "§4.1.2 SAIL-Instruction2", "records": n, "classes": len(members),
              "embedding": f"hashed word 1-2-gram TF-IDF, {HASH_BUCKETS} buckets, L2; k-means++, 4 restarts",
              "scorer": None if scorer is None else getattr(scorer, "__name__", type(scorer).__name__),
              "balancing": {"median": median, "limit": limit, "upsample": upsample},
              "counts": dict(sorted(counts.items())), "dropped": dict(sorted(dropped.items())), "written": len(lines)}
    write_outputs(out_dir, lines, classes=info, report=report)
    return report


def video_richness(path, num_frames: int = 16, where: str = None) -> dict:
    """Richness from pixels (ours), over the num_frames evaluation frames at 64 x 64, RGB in [0, 1]:
    motion   = mean |f[t+1] - f[t]| over pixels and consecutive frames
    distinct = frames kept in time order when, against every frame kept before, more than 1% of the
               pixels change by more than 0.1 (codec noise and slow drift do not count)
    richness = 0.5 min(1, motion / 0.05) + 0.5 (distinct - 1) / (num_frames - 1), in [0, 1]: 0 for a
               still picture repeated; the synthetic moving shapes score ~0.62."""
    f = load_video(path, num_frames, image_size=RICH_SIZE, where=where)
    f = (f * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1).numpy()          # (T, 3, 64, 64)
    motion = float(np.abs(np.diff(f, axis=0)).mean()) if len(f) > 1 else 0.0
    kept = [f[0]]
    for x in f[1:]:
        if all((np.abs(x - y).max(0) > PIXEL_CHANGE).mean() > DISTINCT_SHARE for y in kept):
            kept.append(x)
    richness = 0.5 * min(1.0, motion / FULL_MOTION) + 0.5 * (len(kept) - 1) / max(1, len(f) - 1)
    return {"richness": richness, "motion": motion, "distinct_frames": len(kept)}


def answer_passes(reply, answer: str) -> bool:
    """A reply passes when its final \\boxed{} answer agrees with the answer (`answers_match` of the
    normalize_answer forms), or the answer's words occur in it as a run of whole words (ours)."""
    gold, reply = normalize_answer(answer), reply or ""
    words = " ".join(words_of(gold))
    return bool(gold) and (answers_match(normalize_answer(final_answer(reply) or ""), gold)
                           or bool(words) and f" {words} " in " " + " ".join(words_of(reply)) + " ")


def curate_video(manifests, out_dir, scorer=None, min_alignment: float = 0.0, min_richness: float = 0.1,
                 max_pass_rate: float = 1.0, num_frames: int = 16, max_new_tokens: int = 64,
                 progress: bool = True) -> dict:
    """SAIL-Video curation (§4.1.1) into out_dir/{curated.jsonl, report.json}; returns the report.
    Paper: score video-QA pairs for alignment, richness and difficulty; filter. Ours:
    - alignment = scorer.loglik(rec) - scorer.loglik(rec, blank=True): how much the video raises the
      answer's mean per-token log-likelihood over all-white frames; dropped below min_alignment
      (default 0: the video must not make the answer less likely than blank frames do).
    - richness: video_richness of the record's poorest video; dropped below min_richness (0.1).
    - difficulty: pass_rate = 1 if the scorer's greedy reply passes the record's "answer"
      (answer_passes) else 0; without an "answer", exp(mean answer log-likelihood), the per-token
      probability. Dropped above max_pass_rate (default 1.0 keeps all).
    Without a scorer only richness is computed and filtered (the report says so). Records without a
    video pass unscored. A record is dropped for its first failing check (richness, alignment,
    difficulty); every failing check is counted (fail:...)."""
    out_dir, counts, values, lines = Path(out_dir), Counter(), {}, []
    for obj, rec in read_instructions(manifests, "video", counts, progress):
        if not rec.videos:
            counts["kept_unscored"] += 1
            lines.append(json.dumps(rebase_media(obj, rec, out_dir), ensure_ascii=False))
            continue
        try:
            s = min((video_richness(p, num_frames, rec.where) for p in rec.videos), key=lambda d: d["richness"])
            if scorer is not None:
                ll = scorer.loglik(rec)
                s["alignment"] = ll - scorer.loglik(rec, blank=True)
                s["pass_rate"] = math.exp(ll) if rec.answer is None else \
                    float(answer_passes(scorer.generate([rec], max_new_tokens)[0], rec.answer))
        except DataError as e:
            counts[f"bad:{e.reason}"] += 1
            continue
        for key, x in s.items():
            values.setdefault(key, []).append(x)
        fails = [why for why, failed in (("low_richness", s["richness"] < min_richness),
                                         ("low_alignment", s.get("alignment", math.inf) < min_alignment),
                                         ("too_easy", s.get("pass_rate", -math.inf) > max_pass_rate)) if failed]
        counts.update(f"fail:{why}" for why in fails)
        counts[f"dropped:{fails[0]}" if fails else "kept"] += 1
        if not fails:
            lines.append(json.dumps({**rebase_media(obj, rec, out_dir), "scores": {k: _r(x) for k, x in s.items()}},
                                    ensure_ascii=False))
    quartiles = {k: {"n": len(v), **dict(zip(("min", "q1", "median", "q3", "max"),
                                              np.percentile(v, [0, 25, 50, 75, 100]).round(4).tolist()))}
                 for k, v in values.items()}
    report = {"section": "§4.1.1 SAIL-Video", "counts": dict(sorted(counts.items())), "scores": quartiles,
              "thresholds": {"min_richness": min_richness, "min_alignment": min_alignment,
                             "max_pass_rate": max_pass_rate}, "written": len(lines)}
    if scorer is None:
        report["note"] = "no scorer: alignment and difficulty were not computed and not filtered"
    write_outputs(out_dir, lines, report=report)
    return report


# ----------------------------------------------------------------------------------------------
# LongCoT data cleaning, §4.2.2 (the longcot stage's data, read with the grading API): format to
# "<think>\nT\n</think>\nA" with A holding \boxed{}, deduplicate by (image, question), drop answers
# that restate the chain (token overlap), and balance CoT lengths by resampling. (The paper's answer
# distillation by a judge model is not done.)

def format_longcot(obj: dict, where: str) -> dict:
    """The record with its last assistant turn in LongCoT form. Accepts a <think>-tagged assistant
    turn, or {"question", "cot", "answer"} fields. A without a balanced \\boxed{} (`last_boxed`)
    gets "The answer is \\boxed{answer}." when the record has an "answer", else the record is bad
    ('format'); a boxed answer that disagrees with the record's "answer" (`answers_match`) is bad
    ('wrong_answer')."""
    if isinstance(obj, dict) and "conversations" not in obj and "messages" not in obj and {"question", "cot"} <= obj.keys():
        fields = {k: v for k, v in obj.items() if k not in ("question", "cot")}
        obj = {**fields, "conversations": [{"from": "human", "value": str(obj["question"])},
                                           {"from": "gpt", "value": f"<think>{obj['cot']}</think>"}]}
    rec = parse_record(obj, Path("."), where, "longcot")
    if rec.text is not None or rec.turns[-1][0] != "assistant":
        raise DataError("format", where, "a LongCoT record must end with an assistant turn")
    thought, answer = think_turn(rec.turns[-1][1], where)
    if not (thought or "").strip():
        raise DataError("format", where, "no non-empty <think>…</think> chain")
    if "<think>" in answer or "</think>" in answer:
        raise DataError("format", where, "more than one <think> block")
    answer, boxed = answer.strip(), last_boxed(answer)
    if boxed is None:
        if rec.answer is None:
            raise DataError("format", where, "answer has no \\boxed{} and the record no 'answer' field")
        answer = (answer + " " if answer else "") + f"The answer is {BOXED}{rec.answer}}}."
    elif rec.answer is not None and not answers_match(boxed, rec.answer):
        raise DataError("wrong_answer", where, f"the chain boxes {boxed[:40]!r}, the record's answer is {rec.answer!r}")
    key = "conversations" if "conversations" in obj else "messages"
    turns = [dict(t) for t in obj[key]]
    turns[-1]["value" if key == "conversations" else "content"] = f"<think>\n{thought.strip()}\n</think>\n{answer}"
    return {**obj, key: turns}


def longcot_overlap(thought: str, answer: str, n: int = 3) -> float:
    """Share of the answer's word n-grams that also occur in the chain (1.0 = answer restates it);
    0 for answers too short to have 4 n-grams (a short boxed answer is not redundancy)."""
    a = ngrams(answer, n)
    return len(a & ngrams(thought, n)) / len(a) if len(a) >= 4 else 0.0


def clean_longcot(manifest, out, max_overlap: float = 0.8, balance: bool = True, seed: int = 0,
                  progress: bool = True) -> Counter:
    """Format, deduplicate, redundancy-filter and length-balance a LongCoT manifest into `out`.
    Returns counts per outcome, including the CoT-length histogram (log2 word buckets) before/after."""
    manifest, out = Path(manifest), Path(out)
    stats, seen, kept = Counter(), set(), []         # kept: (bucket, json line)
    for where, obj, rec in manifest_records(manifest, "longcot", stats, progress, prepare=format_longcot):
        question = " ".join(PLACEHOLDER_RE.sub(" ", " ".join(c for r, c in rec.turns if r == "user")).split()).lower()
        key = (tuple(rec.images), tuple(rec.videos), question)
        if key in seen:
            stats["duplicate"] += 1
            continue
        seen.add(key)
        thought, answer = think_turn(rec.turns[-1][1], where)
        if longcot_overlap(thought, answer) > max_overlap:
            stats["redundant"] += 1
            continue
        bucket = int(math.log2(max(1, len(WORD_RE.findall(thought)))))
        stats[f"cot_len_2^{bucket}_before"] += 1
        kept.append((bucket, json.dumps(rebase_media(obj, rec, out.parent), ensure_ascii=False)))
    if balance and kept:
        # CoT-length balancing: buckets above the median bucket size are down-sampled to it.
        sizes = Counter(b for b, _ in kept)
        target = int(np.ceil(np.median(list(sizes.values()))))
        rng = random.Random(seed)
        keep_idx = set()
        for b in sizes:
            members = [i for i, (bb, _) in enumerate(kept) if bb == b]
            keep_idx.update(rng.sample(members, min(target, len(members))))
        stats["length_balanced_away"] = len(kept) - len(keep_idx)
        kept = [k for i, k in enumerate(kept) if i in keep_idx]
    for b, _ in kept:
        stats[f"cot_len_2^{b}_after"] += 1
    stats["kept"] = len(kept)
    data.write_atomic(out, "".join(line + "\n" for _, line in kept))
    return stats


# ----------------------------------------------------------------------------------------------
# command line

def load_scorer(ckpt, option: str, **overrides):
    """A CheckpointScorer for a checkpoint folder (`load`, DataConfig `overrides`), or None for None.
    `load`'s errors name its own option, --ckpt: here they name `option` (--scorer, --annotator)."""
    if ckpt is None:
        return None
    try:
        model, tok, dcfg = load(ckpt)
    except UsageError as e:
        raise type(e)(f"{option} {str(e).removeprefix('--ckpt ')}") from None
    return CheckpointScorer(model, tok, replace(dcfg, **overrides))


def check_options(*checks):
    """Refuse (one line) an option whose value would fail deep inside, or silently mean something else:
    checks are (option, its value, whether it is good, what it must be)."""
    for option, value, good, must in checks:
        if not good:
            raise UsageError(f"{option} must be {must}, got {value}")


def require_usable(manifest, counts: Counter):
    """A manifest with no usable record is an error (exit 1) naming its first bad line, after the
    counts by reason, as training refuses one (data.TooMuchBadData), rather than an empty output."""
    if any(n for k, n in counts.items() if not k.startswith("bad:")):
        return
    lines = Path(manifest).read_bytes().split(b"\n")
    first = next((i for i, line in enumerate(lines, start=1) if line.strip()), None)
    if first is None:
        raise InputError(f"{manifest}: holds no records")
    bad = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()) if n)
    raise InputError(f"{manifest}: no usable record, every line is bad ({bad}); the first: {manifest}:{first}")


def manifest_tool(title: str, run):
    """A manifest -> manifest tool's command line: run(args) -> counts, printed, then require_usable."""
    def cli(a):
        counts = run(a)
        data.print_counts(title, counts)
        require_usable(a.manifest, counts)
    return cli


def caption2qa_cli(a):
    check_options(("--pairs", a.pairs, a.pairs >= 0, "at least 0 (0 = all)"))
    return caption_to_qa(a.manifest, a.out, pairs=a.pairs, seed=a.seed)


def curate_instructions_cli(a):
    check_options(("--classes", a.classes, a.classes >= 1, "at least 1"),
                  ("--reannotate-frac", a.reannotate_frac, 0 <= a.reannotate_frac <= 1, "in [0, 1]"),
                  ("--cap", a.cap, a.cap > 0, "above 0"),
                  ("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 1, "at least 1"))
    annotator = load_scorer(a.annotator, "--annotator")
    report = curate_instructions(a.inputs.split(","), a.out, a.classes, load_scorer(a.scorer, "--scorer") or annotator,
                                 annotator, a.reannotate_frac, a.cap, a.upsample, a.seed, a.max_new_tokens)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    if not report["records"]:                          # every line bad (or none): an error, not an empty set
        why = ", ".join(f"{k} {n}" for k, n in report["dropped"].items() if n) or "no lines"
        raise InputError(f"--in {a.inputs}: no usable record ({why})")


def curate_video_cli(a):
    check_options(("--num-frames", a.num_frames, a.num_frames >= 1, "at least 1"))
    scorer = load_scorer(a.scorer, "--scorer", num_frames=a.num_frames)
    report = curate_video(a.inputs.split(","), a.out, scorer, a.min_alignment, a.min_richness, a.max_pass_rate,
                          a.num_frames)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    require_usable(a.inputs.split(",")[0], Counter(report["counts"]))


def curation_io(what: str) -> tuple:
    """The --in, --out, --scorer options both model-based curation tools take."""
    return (("--in", dict(dest="inputs", required=True, help="manifest(s), comma-separated")),
            ("--out", dict(required=True, help="output folder")),
            ("--scorer", dict(help=f"checkpoint whose answer log-likelihood scores {what}")))


# the tools (`python tests/curate.py TOOL --help`): (name, function of the parsed arguments, help, options)
TOOLS = (
    ("filter", manifest_tool("quality filter", lambda a: quality_filter(a.manifest, a.out, min_vir=a.min_vir,
                                                                         min_ita=a.min_ita)),
     "keep samples whose judge scores (VIR, ITA) pass thresholds (§3.1)", (
         ("manifest", {}), ("out", {}),
         ("--min-vir", dict(type=float, default=0.05, help="visual information richness threshold")),
         ("--min-ita", dict(type=float, default=0.5, help="image-text alignment threshold")))),
    ("caption2qa", manifest_tool("caption -> QA", caption2qa_cli),
     "turn caption samples into QA conversations (template generator, §3.1)", (
         ("manifest", {}), ("out", {}),
         ("--pairs", dict(type=int, default=1, help="QA pairs per caption (0 = all)")),
         ("--seed", dict(type=int, default=0)))),
    ("clean-longcot", manifest_tool("LongCoT cleaning", lambda a: clean_longcot(
        a.manifest, a.out, a.max_overlap, not a.no_balance, a.seed)),
     "clean LongCoT data: format, dedup, redundancy filter, CoT-length balance (§4.2.2)", (
         ("manifest", {}), ("out", {}),
         ("--max-overlap", dict(type=float, default=0.8, help="drop when this share of answer 3-grams is in the CoT")),
         ("--no-balance", dict(action="store_true", help="skip CoT-length balancing")),
         ("--seed", dict(type=int, default=0)))),
    ("curate-instructions", curate_instructions_cli, "SAIL-Instruction2 (§4.1.2): latent classes, answer quality, "
     "re-annotation, class balancing -> DIR/{curated.jsonl,classes.json,report.json}", (
         ("--classes", dict(type=int, default=8, help="latent classes (k-means on the instructions' TF-IDF)")),
         ("--annotator", dict(help="checkpoint that re-annotates (greedy) and, without --scorer, scores answers "
                              "(mean log-likelihood); without it rule failures are dropped")),
         ("--reannotate-frac", dict(type=float, default=0.1, help="lowest-scoring share of each class to "
                                    "re-annotate or drop, besides every rule failure (needs a scorer)")),
         ("--cap", dict(type=float, default=2.0, help="a class keeps at most cap x the median class size")),
         ("--upsample", dict(action="store_true", help="repeat classes below the median size up to it")),
         ("--max-new-tokens", dict(type=int, default=256, help="re-annotation length limit")),
         ("--seed", dict(type=int, default=0, help="k-means and balancing seed: same seed, same bytes")))
     + curation_io("quality")),
    ("curate-video", curate_video_cli, "SAIL-Video (§4.1.1): alignment, richness and difficulty scores and filters "
     "-> DIR/{curated.jsonl,report.json}", (
         ("--min-alignment", dict(type=float, default=0.0, help="drop when the video raises the answer's mean "
                                  "log-likelihood over all-white frames by less than this (nats/token)")),
         ("--min-richness", dict(type=float, default=0.1, help="drop below this richness in [0, 1] (still video: "
                                 "0, the synthetic moving shapes: ~0.6)")),
         ("--max-pass-rate", dict(type=float, default=1.0, help="drop above this greedy pass rate of the scorer "
                                  "(1.0 keeps all; 0.5 drops what it already answers)")),
         ("--num-frames", dict(type=int, default=16, help="frames sampled per video")))
     + curation_io("alignment and difficulty (without it neither is computed nor filtered)")),
)


def tool_cli(argv):
    """`python tests/curate.py TOOL ...`: one of TOOLS; a missing file or a bad value is a usage error (exit 2)."""
    args = data.tool_parser("curate.py", "SAIL-VL2 data curation tools (§3.1, §4.1, §4.2.2)", TOOLS, Parser).parse_args(
        data.dashed_options(argv))
    if hasattr(args, "manifest") and os.path.isdir(args.out):   # the manifest tools write a file: said before the work
        raise UsageError(f"{args.cmd}: OUT {args.out} is a folder: give the output manifest's file name")
    try:
        return args.run(args)
    except UsageError:                      # already says what is wrong, with its own exit code
        raise
    except (OSError, ValueError, DataError) as e:     # OSError: a missing manifest, an OUT that cannot be written
        raise UsageError(f"{args.cmd}: {e}") from None


def main(argv=None):
    try:
        return tool_cli(sys.argv[1:] if argv is None else argv)
    except (UsageError, DataError) as e:
        print(f"curate.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(getattr(e, "code", 1))


if __name__ == "__main__":
    main()
