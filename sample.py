"""Generate from and evaluate a SAIL-VL2 checkpoint. The model and the univl-chat prompt follow the
paper (§2) and the official template (facts §1.6); evaluation (scoring rules, batching, the blind
runs, the VLMEvalKit TSV reader) is ours: the paper gives no procedure.

    python sample.py --ckpt out/vit1 --image data_synth/caption/images/eval_00000.png --prompt "Describe the image."
    python sample.py --ckpt out/sft4 --video data_synth/video/videos/eval_00000.mp4 --prompt "Where does it move?"
    python sample.py --ckpt out/longcot --image IMG --prompt "What is the result?" --think
    python sample.py --ckpt out/sft4 --eval data_synth                 # every synthetic family, first 32 each
    python sample.py --ckpt out/sft4 --eval data_synth --think --blank # thinking mode; images all white
    python sample.py --ckpt out/sft4 --eval data_synth/count/eval.jsonl --limit 8 --out count.json
    python sample.py --ckpt out/sft4 --eval MMBench_DEV_EN.tsv         # a VLMEvalKit multiple-choice TSV

Works on our checkpoints and on official SAIL-VL2 folders (the folder's tokenizer when it has one,
else the embedded default). Images are tiled as the checkpoint was trained (tiles + thumbnail, or
AnyRes), videos give one tile per frame; a single answer streams to stdout token by token.
Evaluation is greedy and batched (many prompts per `generate` call, KV cache, left padding; a row
ends at <|im_end|> / <|endoftext|>); reports go to `<ckpt>/eval/<family>[-think][-blank].json` and a
table is printed. Scoring per family: `extract_answer`, `caption_correct`, `split_last_word`.
Command-line errors exit with 2, unusable inputs (not a checkpoint, not an image) with 1, both with
one line on stderr.
"""
import argparse
import base64
import binascii
import csv
import io
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict, namedtuple
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

import data
import model as M


class UsageError(Exception):
    """The command line is wrong: exit 2 (InputError, an input that exists but is unusable: exit 1)."""
    code = 2


class InputError(UsageError):
    code = 1


def default_device() -> str:
    """--device's default: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(ckpt: str, device="cpu"):
    """(model, tokenizer, DataConfig) for a checkpoint folder; the model on `device` (fp32)."""
    if not os.path.isdir(ckpt):
        raise UsageError(f"--ckpt {ckpt}: no such folder")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise InputError(f"--ckpt {ckpt}: not a checkpoint folder (no config.json)")
    try:
        model = M.SAILVL.from_pretrained(ckpt, device=device).eval()
    except Exception as e:      # any reason (bad JSON, missing or corrupt weights): one line, not a traceback
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--ckpt {ckpt}: cannot load the checkpoint: {why}") from None
    has_tok = any(os.path.exists(os.path.join(ckpt, f)) for f in ("tokenizer.json", "vocab.json"))
    tok = data.load_tokenizer(ckpt if has_tok else None)
    if model.cfg.llm_config.vocab_size < tok.n_vocab:
        raise InputError(f"{ckpt}: the tokenizer has {tok.n_vocab} tokens but the model only "
                         f"{model.cfg.llm_config.vocab_size}")
    return model, tok, data.DataConfig.from_model(model.cfg)


def stop_ids(tok) -> set:
    ids = data.special_ids(tok)
    return {ids.im_end, ids.endoftext}


def decode_reply(tok, ids: list, stop: set) -> str:
    if ids and ids[-1] in stop:
        ids = ids[:-1]
    return tok.decode_bytes(ids).decode("utf-8", errors="replace")


class Streamer:
    """Prints the decoded text as tokens arrive (bytes are buffered until they form valid UTF-8)."""

    def __init__(self, tok, stop: set):
        self.tok, self.stop, self.ids, self.shown, self.done = tok, stop, [], "", False

    def __call__(self, next_ids):
        t = int(next_ids[0])
        if self.done or t in self.stop:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode_bytes(self.ids).decode("utf-8", errors="ignore")
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def on_device(pixels, model):
    """Pixels (None, a tensor, or an AnyRes list) on the model's device."""
    device = model.language_model.lm_head.weight.device
    if isinstance(pixels, (list, tuple)):
        return [p.to(device) for p in pixels]
    return None if pixels is None else pixels.to(device)


def answer(model, tok, dcfg, question, images=(), videos=(), think=False, max_new_tokens=256,
           temperature=0.0, top_p=1.0, seed=0, stream=False) -> str:
    """One reply to `question` (a string, or [(role, content)] turns) about the given media."""
    sample = data.prompt_inputs(tok, dcfg, question, images, videos, think=think)
    stop = stop_ids(tok)
    gen = torch.Generator(device=model.language_model.lm_head.weight.device).manual_seed(seed)
    out = model.generate([sample["input_ids"].tolist()], on_device(sample["pixel_values"], model),
                         max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, stop_tokens=stop, generator=gen,
                         on_token=Streamer(tok, stop) if stream else None, n_valid_tokens=tok.n_vocab)[0]
    return decode_reply(tok, out, stop)


# ----------------------------------------------------------------------------------------------
# Answer extraction. Model output is hostile (it can be anything, of any length): every rule below
# reads at most MAX_SCAN characters, uses str.rfind / data.last_boxed (linear, bounded) and
# regexes without nested or adjacent quantifiers, so no input can make it backtrack.

MAX_SCAN = 2000
TOKEN_RE = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
SYNONYMS = {"center": "centre", "upward": "up", "upwards": "up", "downward": "down", "downwards": "down",
            "leftward": "left", "leftwards": "left", "rightward": "right", "rightwards": "right"}
SHAPES, COLOURS, ROWS, COLS = set(data.SHAPES), set(data.COLOURS), set(data.ROWS), set(data.COLS)
CHART_LABELS, OCR_WORDS = set(data.CHART_LABELS), set(data.WORDS)
DIRECTIONS, MULTI = set(data.DIRECTIONS), {"yes", "no", "first", "second"}
SINGULAR = SHAPES | CHART_LABELS


def answer_span(text: str) -> tuple:
    """(span, boxed): the part of a reply that holds the answer. After the last </think>, the
    content of its last \\boxed{} when there is one (boxed True), else that whole part; at most
    MAX_SCAN characters."""
    end = text.rfind("</think>")
    if end >= 0:
        text = text[end + len("</think>"):]
    boxed = data.last_boxed(text)
    return (text if boxed is None else boxed)[:MAX_SCAN], boxed is not None


def words(text: str) -> list:
    """Lower-case words and numbers, plurals of shapes/labels made singular, synonyms mapped."""
    out = [SYNONYMS.get(t, t) for t in TOKEN_RE.findall(text[:MAX_SCAN].lower())]
    return [t[:-1] if t.endswith("s") and t[:-1] in SINGULAR else t for t in out]


def _number(t: str):
    return data.normalize_answer(t) if t[:1].isdigit() else NUMBER_WORDS.get(t)


def _first(tokens: list, vocab: set):
    return next((t for t in tokens if t in vocab), None)


def _caption_qa(tokens: list, gold):
    """The colour, shape or "ROW COL" position: the kind `gold` is, else whichever comes first."""
    kind = None if gold is None else "colour" if gold in COLOURS else "shape" if gold in SHAPES else "position"
    for a, b in zip(tokens, tokens[1:] + [""]):
        if (a in COLOURS and kind in (None, "colour")) or (a in SHAPES and kind in (None, "shape")):
            return a
        if a in ROWS and b in COLS and kind in (None, "position"):
            return f"{a} {b}"
    return None


def extract_answer(family: str, text: str, gold: str = None):
    """The answer a reply gives, in the form a synthetic record's `answer` holds (None: no answer).

    All families read `answer_span` (after the last </think>, inside the last \\boxed{} if any), then:
      count                          the first number (digits, or a number word up to ten)
      math, math_direct, count_cot   the boxed value; without a box, the last number
      chart                          the first number when `gold` is a number, else the first chart label
      ocr                            the first word of the synthetic vocabulary, else the last word
      multi                          the first of yes / no / first / second
      video                          the first direction (left / right / up / down; "upwards" = up)
      caption_qa                     the colour, the shape or the position ("top left"), whichever kind
                                     `gold` is (the question asks for one kind); without `gold` the first
    Any other family: the whole span, normalised (today's rule for real manifests). `gold` only
    chooses the kind of answer asked for; it is never searched for in the reply."""
    span, boxed = answer_span(text)
    tokens = words(span)
    numbers = [n for n in map(_number, tokens) if n is not None]
    g = None if gold is None else data.normalize_answer(gold)
    if family == "count":
        return numbers[0] if numbers else None
    if family in ("math", "math_direct", "count_cot"):
        return data.normalize_answer(span) if boxed else (numbers[-1] if numbers else None)
    if family == "chart":
        pick = numbers if g is not None and _number(g) is not None else [t for t in tokens if t in CHART_LABELS]
        return pick[0] if pick else None
    if family == "ocr":
        alpha = [t for t in tokens if t.isalpha()]
        return _first(alpha, OCR_WORDS) or (alpha[-1] if alpha else None)
    if family in ("multi", "video"):
        return _first(tokens, MULTI if family == "multi" else DIRECTIONS)
    if family == "caption_qa":
        return _caption_qa(tokens, g)
    return data.normalize_answer(span)


def caption_objects(text: str) -> frozenset:
    """{(colour, shape, row, col)} named in a caption: each "COLOUR SHAPE" takes the first "ROW COL"
    after it (any words in between: "a red circle in the top left", "... at the top left")."""
    tokens, objects, current = words(text), set(), None
    for a, b in zip(tokens, tokens[1:]):
        if a in COLOURS and b in SHAPES:
            current = (a, b)
        elif current and a in ROWS and b in COLS:
            objects.add((*current, a, b))
            current = None
    return frozenset(objects)


def caption_correct(reply: str, reference: str) -> bool:
    """Keyword scoring of a synthetic caption: right when the reply names exactly the reference's
    objects, each with its colour, shape and position, in any order and wording. Stricter than "every
    reference phrase is present": a reply listing every possible object would pass that."""
    ref = caption_objects(reference)
    return bool(ref) and caption_objects(answer_span(reply)[0]) == ref


def first_word(text: str):
    t = words(text)
    return t[0] if t else None


def word_f1(pred: str, ref: str) -> float:
    p, r = pred[:MAX_SCAN].lower().split(), ref.lower().split()
    if not p or not r:
        return float(p == r)
    rc = Counter(r)
    common = sum(min(c, rc[w]) for w, c in Counter(p).items())
    if not common:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def strip_think(text: str) -> str:
    end = text.rfind("</think>")
    return text[end + len("</think>"):] if end >= 0 else text


def score(rule: str, reply: str, reference: str, gold) -> tuple:
    """(correct, extracted) for one reply. `rule`: a synthetic family name, "text" (LM completion:
    the first word must be the held-back one), or anything else: the record's `answer` against the
    \\boxed{} content or whole reply, without an answer an exact match of the reference reply."""
    if rule == "text":
        got = first_word(reply)
        return got is not None and got == first_word(reference), got
    if rule == "caption":
        named = sorted(caption_objects(answer_span(reply)[0]))
        return caption_correct(reply, reference), " and ".join(" ".join(o) for o in named)
    if gold is None:
        got = data.normalize_answer(strip_think(reply)[:MAX_SCAN])
        return got == data.normalize_answer(strip_think(reference)), got
    got = extract_answer(rule if rule in data.SYNTH_FAMILIES else "", reply, gold)
    return got is not None and got == data.normalize_answer(gold), got


# ----------------------------------------------------------------------------------------------
# Batched greedy evaluation

# max_new_tokens per family (byte-level tiny tokenizer: about 1.2x the longest reference reply;
# a BPE tokenizer needs fewer). Thinking mode leaves room for a chain before the \boxed{} answer:
# 192 for the others (a scene described object by object, then the answer; the longest synthetic
# chain, count_cot's for six objects, is 287 tokens).
DIRECT_NEW_TOKENS = {"text": 16, "caption": 96, "caption_qa": 32, "ocr": 16, "chart": 16, "count": 32,
                     "count_cot": 320, "math": 96, "math_direct": 32, "multi": 32, "video": 32}
THINK_NEW_TOKENS = {"text": 16, "count_cot": 320, "math": 128}
OTHER_NEW_TOKENS = {False: 128, True: 1024}       # families we do not know (real manifests)
MCQ_NEW_TOKENS = {False: 32, True: 1024}          # a VLMEvalKit multiple-choice TSV


def default_new_tokens(family: str, think: bool) -> int:
    if family not in DIRECT_NEW_TOKENS:
        return OTHER_NEW_TOKENS[bool(think)]
    return THINK_NEW_TOKENS.get(family, 192) if think else DIRECT_NEW_TOKENS[family]


# one prompt to answer: token ids, its pixels (None, a tensor, or an AnyRes list), its token budget
Item = namedtuple("Item", "ids pixels max_new")


def concat_pixels(pixels: list):
    """The pixels of several prompts in prompt order: the order their <IMG_CONTEXT> slots are filled."""
    pixels = [p for p in pixels if p is not None and not (isinstance(p, (list, tuple)) and not p)]
    if not pixels:
        return None
    if isinstance(pixels[0], (list, tuple)):
        return [t for p in pixels for t in p]
    return torch.cat(pixels)


def generate_batch(model, tok, items: list) -> list:
    """Greedy replies to `items` in one `generate` call; each row is cut to its own budget, so the
    result does not depend on which other rows share the batch."""
    stop = stop_ids(tok)
    out = model.generate([it.ids for it in items], on_device(concat_pixels([it.pixels for it in items]), model),
                         max_new_tokens=max(it.max_new for it in items), temperature=0.0, stop_tokens=stop,
                         n_valid_tokens=tok.n_vocab)
    replies = []
    for it, ids in zip(items, out):
        ids = ids[:it.max_new]
        cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))   # rows keep decoding after their stop
        replies.append(decode_reply(tok, ids[:cut], stop))
    return replies


def generate_all(model, tok, items: list, batch_size: int = 32) -> list:
    """Replies to every item, batched: items of the same budget together, sorted by prompt length so
    a batch pads little. Returned in the items' order."""
    order = sorted(range(len(items)), key=lambda i: (items[i].max_new, len(items[i].ids)))
    replies = [None] * len(items)
    while order:
        chunk = [i for i in order[:batch_size] if items[i].max_new == items[order[0]].max_new]
        order = order[len(chunk):]
        for i, r in zip(chunk, generate_batch(model, tok, [items[i] for i in chunk])):
            replies[i] = r
    return replies


def answer_jobs(model, tok, jobs: list, make_item, bad, batch_size=32, progress=True) -> list:
    """[(reply, info)] per job, where make_item(job) -> (Item, info). A job whose prompt cannot be built
    (DataError: a bad image, a truncated video) is counted in `bad` and gives (None, the error).
    Prompts are built 4 batches at a time, so only their pixels are held in memory."""
    results = []
    with tqdm(total=len(jobs), desc="eval", disable=not progress) as bar, torch.inference_mode():
        for start in range(0, len(jobs), 4 * batch_size):
            built = []
            for job in jobs[start:start + 4 * batch_size]:
                try:
                    built.append(make_item(job))
                    bad.good()
                except data.DataError as e:
                    bad.bad(e)
                    built.append((None, e))
            replies = iter(generate_all(model, tok, [item for item, _ in built if item is not None], batch_size))
            results += [(None if item is None else next(replies), info) for item, info in built]
            bar.update(len(built))
    return results


def split_last_word(rec) -> tuple:
    """LM completion of a plain-text record (it tests the language model alone): the prompt is the
    text up to its last sentence's final word (no chat template: text is trained without one), the
    reference is that word and what follows it. -> (prompt text, reference)."""
    s = rec.text.rstrip()
    end = len(s)
    while end and not s[end - 1].isalnum():
        end -= 1
    start = end
    while start and s[start - 1].isalnum():
        start -= 1
    prefix = s[:start].rstrip(" ")          # the space belongs to the next word in Qwen's pre-tokenizer
    if start == end or not prefix:
        raise data.DataError("schema", rec.where, "a text record needs at least two words to score")
    return prefix, s[len(prefix):]


def record_item(tok, dcfg, rec, think, blank: bool, max_new_tokens):
    """(Item, (rule, reference, think)) for one eval record."""
    if rec.text is not None:
        budget = max_new_tokens or default_new_tokens("text", False)
        prefix, reference = split_last_word(rec)
        return Item(data.encode(tok, prefix), None, budget), ("text", reference, False)
    if rec.turns[-1][0] != "assistant":
        raise data.DataError("schema", rec.where, "an eval record needs a final assistant turn to score")
    t = bool(rec.think if think is None else think)
    s = data.prompt_inputs(tok, dcfg, rec.turns[:-1], rec.images, rec.videos, think=t, system=rec.system)
    pixels = data.blank_pixels(s["pixel_values"]) if blank else s["pixel_values"]
    budget = max_new_tokens or default_new_tokens(rec.task, t)
    return Item(s["input_ids"].tolist(), pixels, budget), (rec.task, rec.turns[-1][1], t)


def read_records(path, limit=None, bad=None) -> list:
    """The first `limit` records of a manifest (all when None); bad lines are counted in `bad`."""
    ds = data.JsonlDataset(path, None, None)
    recs = []
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        try:
            recs.append(ds.record(i))
        except data.DataError as e:
            if bad is not None:
                bad.bad(e)
    return recs


def evaluate_records(model, tok, dcfg, records: list, think=False, blank=False, batch_size=32,
                     max_new_tokens=None, progress=True, bad=None) -> dict:
    """Score records (family = each record's task). The shape of `evaluate_families`' result."""
    t0 = time.perf_counter()
    bad = bad or data.BadData(max_fraction=1.0)
    preds = []
    make = lambda rec: record_item(tok, dcfg, rec, think, blank, max_new_tokens)            # noqa: E731
    for rec, (reply, info) in zip(records, answer_jobs(model, tok, records, make, bad, batch_size, progress)):
        if reply is None:
            continue
        rule, reference, t = info
        ok, got = score(rule, reply, reference, rec.answer)
        preds.append({"family": rec.task, "where": rec.where, "answer": rec.answer, "reference": reference,
                      "prediction": reply, "extracted": got, "correct": bool(ok), "blank": bool(blank), "think": t,
                      "word_f1": word_f1(strip_think(reply), strip_think(reference))})
    n = Counter(p["family"] for p in preds)
    mean = lambda key: {f: sum(p[key] for p in preds if p["family"] == f) / n[f] for f in n}   # noqa: E731
    return {"accuracy": mean("correct"), "word_f1": mean("word_f1"), "n": dict(n), "predictions": preds,
            "bad": bad.report(), "seconds": time.perf_counter() - t0}


def synth_families(synth_dir, split: str = "eval") -> list:
    """The families of a synthetic-data folder: SYNTH_FAMILIES order, then any other sub-folder."""
    found = {p.parent.name for p in Path(synth_dir).glob(f"*/{split}.jsonl")}
    return [f for f in data.SYNTH_FAMILIES if f in found] + sorted(found - set(data.SYNTH_FAMILIES))


def evaluate_families(model, tok, dcfg, synth_dir, families=None, split="eval", limit=32, think=False, blank=False,
                      batch_size=32, max_new_tokens=None, progress=True) -> dict:
    """Accuracy per synthetic family on the first `limit` records of `synth_dir/<family>/<split>.jsonl`
    (the same held-out samples every call), greedy, `batch_size` prompts per generate call.
    think: False = direct, True = THINK_PROMPT appended, None = each record's own flag. blank: every
    image and frame white (the blindness measure). max_new_tokens None: DIRECT/THINK_NEW_TOKENS.
    -> {"accuracy": {family: a}, "word_f1": {...}, "n": {...}, "predictions": [...], "bad": str, "seconds": s}"""
    families = families or synth_families(synth_dir, split)
    bad = data.BadData(max_fraction=1.0)
    records = [r for f in families for r in read_records(Path(synth_dir) / f / f"{split}.jsonl", limit, bad)]
    for r in records:          # the family is the folder, whatever a record's "task" says
        r.task = Path(r.where.rsplit(":", 1)[0]).parent.name
    return evaluate_records(model, tok, dcfg, records, think, blank, batch_size, max_new_tokens, progress, bad)


def chance_key(rec):
    """What "always the same answer" is compared on: the answer, the caption's objects, the held-back word."""
    if rec.text is not None:
        return first_word(rec.text.rstrip().rstrip(".").rsplit(" ", 1)[-1])
    if rec.answer is not None:
        return data.normalize_answer(rec.answer)
    ref = rec.turns[-1][1]
    return caption_objects(ref) if rec.task == "caption" else data.normalize_answer(ref)


def chance(synth_dir, families=None, split="eval", limit=32) -> dict:
    """{family: share of the most common answer}: what always giving that answer scores. For caption
    the "answer" is the set of objects (colour, shape, position), so the share is near 0."""
    out = {}
    for f in families or synth_families(synth_dir, split):
        keys = Counter(chance_key(r) for r in read_records(Path(synth_dir) / f / f"{split}.jsonl", limit))
        out[f] = max(keys.values()) / sum(keys.values()) if keys else 0.0
    return out


# ----------------------------------------------------------------------------------------------
# the recipe's report (python train_stage.py --stage all): a table and a picture of every stage

VISUAL = ("count", "chart", "ocr", "multi", "video", "caption_qa", "caption")


def report_markdown(report: dict) -> str:
    """The per-stage table: accuracy per family, blank-image accuracy in parentheses, thinking mode
    after a slash where measured; time and held-out loss."""
    stages = report["stages"]
    fams = sorted({f for st in stages.values() for f in st.get("accuracy", {})})
    head = ["stage", "s", "held-out loss"] + fams
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, st in stages.items():
        loss = lambda k: "—" if st.get(k) is None else f"{st[k]:.3f}"                      # noqa: E731
        cells = [name, f"{st.get('seconds', 0):.0f}", f"{loss('eval_loss_start')} → {loss('eval_loss')}"
                 if st.get("eval_loss") is not None else "—"]
        for f in fams:
            a, b, t = st.get("accuracy", {}).get(f), st.get("accuracy_blank", {}).get(f), st.get("accuracy_think", {}).get(f)
            cells.append("" if a is None else f"{a:.2f}" + (f" ({b:.2f})" if b is not None else "")
                         + (f" / {t:.2f}" if t is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    chance = report.get("chance", {})
    lines.append("| chance | | | " + " | ".join(f"{chance.get(f, 0):.2f}" for f in fams) + " |")
    rewards = {n: st["reward"] for n, st in stages.items() if "reward" in st}
    out = [f"Machine: {report.get('machine', '?')}; total {report.get('total_seconds', 0) / 60:.1f} min.", "",
           f"Accuracy on the held-out synthetic split (greedy, first {report.get('eval_limit', 32)} per family): real images "
           "(blank images) / thinking mode.", ""] + lines
    if rewards:
        out += ["", "RL held-out reward, before → after: " + "; ".join(
            f"{n} {r['before']:.3f} → {r['after']:.3f}" for n, r in rewards.items())]
    return "\n".join(out) + "\n"


def report_picture(report: dict, losses: dict, path: str, width: int = 1200):
    """report.png with Pillow: the training loss of every stage on one axis (stages in order,
    each its own colour), and per visual family the accuracy of every stage with images (colour)
    beside the same model with blank images (grey)."""
    from PIL import ImageDraw
    fams = [f for f in VISUAL if any(f in st.get("accuracy", {}) for st in report["stages"].values())]
    cols = 4
    rows = -(-len(fams) // cols)
    top, cell_h = 300, 210
    img = Image.new("RGB", (width, top + rows * cell_h + 20), "white")
    d = ImageDraw.Draw(img)
    font = data.font(12)
    names = list(report["stages"])
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    colour = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    # 1. loss curves, one after the other on a shared x axis (x = steps of the whole recipe)
    x0, y0, x1, y1 = 60, 30, width - 20, top - 40
    series = [(n, losses.get(n, [])) for n in names if losses.get(n)]
    total = sum(len(v) for _, v in series) or 1
    hi = max((max(v) for _, v in series), default=1.0)
    d.text((x0, 8), "training loss, every stage of the recipe in order (x: steps)", fill="black", font=font)
    d.line((x0, y1, x1, y1), fill="black")
    d.line((x0, y0, x0, y1), fill="black")
    d.text((8, y0), f"{hi:.1f}", fill="black", font=font)
    d.text((8, y1 - 12), "0", fill="black", font=font)
    start = 0
    for name, v in series:
        k = max(1, len(v) // 50)                                         # a running mean of ~2% of a stage
        smooth = [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))]
        pts = [(x0 + (x1 - x0) * (start + i) / total, y1 - (y1 - y0) * min(1.0, y / hi)) for i, y in enumerate(smooth)]
        if len(pts) > 1:
            d.line(pts, fill=colour[name], width=2)
        d.text((pts[0][0] + 2, y1 + 4), name, fill=colour[name], font=font)
        start += len(v)
    # 2. per family: accuracy per stage, real (colour) and blank (grey) side by side
    for j, fam in enumerate(fams):
        cx, cy = 60 + (j % cols) * ((width - 60) // cols), top + (j // cols) * cell_h
        w, h = (width - 60) // cols - 30, cell_h - 60
        d.text((cx, cy), fam, fill="black", font=font)
        d.line((cx, cy + 20 + h, cx + w, cy + 20 + h), fill="black")
        chance = report.get("chance", {}).get(fam)
        if chance is not None:
            yc = cy + 20 + h - h * chance
            d.line((cx, yc, cx + w, yc), fill=(200, 200, 200))
        bw = w / max(1, len(names)) / 2.2
        for i, n in enumerate(names):
            st = report["stages"][n]
            for k, (key, fill) in enumerate((("accuracy", colour[n]), ("accuracy_blank", (170, 170, 170)))):
                a = st.get(key, {}).get(fam)
                if a is None:
                    continue
                bx = cx + i * w / len(names) + k * bw
                d.rectangle((bx, cy + 20 + h - h * a, bx + bw - 1, cy + 20 + h), fill=fill)
    d.text((60, top - 18), "held-out accuracy per family, every stage left to right (its loss-curve colour: with "
           "images; grey: the same model with blank images; line: chance; top: 1.0)", fill="black", font=font)
    img.save(path)


# ----------------------------------------------------------------------------------------------
# VLMEvalKit multiple-choice TSV (MMBench layout): index, question, hint, A..D, answer, category,
# [l2-category], image (base64 PNG/JPEG, or for MMBench the index of a row holding the image).

MISSING = {"", "nan", "none", "null"}         # how pandas-written TSVs spell an empty cell
ANSWER_RE = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*(?::\s*)?\(?([A-Z])(?![A-Za-z])")
LEADING_RE = re.compile(r"\(?([A-Z])[).:](?:\s|$)")
LETTER_RE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def present(value) -> bool:
    return value is not None and value.strip().lower() not in MISSING


def read_tsv(path) -> tuple:
    """(columns, [(line number, row dict)]) of a VLMEvalKit TSV (stdlib csv; base64 cells are large)."""
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = [(reader.line_num, {k: v or "" for k, v in row.items()}) for row in reader]
            columns = reader.fieldnames or []
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the TSV: {e}") from None
    missing = {"question", "answer", "image"} - set(columns)
    if missing:
        raise InputError(f"{path}: not a VLMEvalKit multiple-choice TSV (no column {', '.join(sorted(missing))})")
    return columns, rows


def mcq_options(row: dict) -> dict:
    """{letter: text} of the options present (A-D or fewer; VLMEvalKit allows up to Z)."""
    return {c: row[c].strip() for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if present(row.get(c))}


def mcq_prompt(row: dict) -> str:
    """VLMEvalKit's ImageMCQDataset.build_prompt layout (its message text is stripped, as here)."""
    hint = f"Hint: {row['hint'].strip()}\n" if present(row.get("hint")) else ""
    options = "".join(f"{k}. {v}\n" for k, v in mcq_options(row).items())
    text = f"{hint}Question: {row['question'].strip()}\n"
    if options:
        text += f"Options:\n{options}Please select the correct answer from the options above."
    return text.strip()


def decode_image(cell: str, where: str) -> Image.Image:
    """A base64 PNG/JPEG cell, decoded in memory (DataError 'image' when it is not one)."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(cell, validate=False))) as im:
            im.load()
            return im.convert("RGB")
    except (binascii.Error, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise data.DataError("image", where, f"cannot decode the base64 image: {e}") from None


def extract_choice(reply: str, options: dict) -> str:
    """The option letter a reply picks, '' when none. In order: the reply is a letter alone ("B",
    "(B)", "B."); it equals exactly one option's text; "the answer is B" / "Answer: (B)" (the last
    such); it opens with "B." / "(B)" / "B:"; exactly one option letter stands alone in it (as
    VLMEvalKit's can_infer_option: "A or B" is no answer). Bounded like extract_answer."""
    span = answer_span(reply)[0].strip()
    core = span.strip(" \t\n.:()[]*'\"")
    if len(core) == 1 and core.upper() in options:
        return core.upper()
    norm = data.normalize_answer(span)
    same = [k for k, v in options.items() if data.normalize_answer(v) == norm]
    if len(same) == 1:
        return same[0]
    said = [m.group(1) for m in ANSWER_RE.finditer(span) if m.group(1) in options]
    if said:
        return said[-1]
    m = LEADING_RE.match(span)
    if m and m.group(1) in options:
        return m.group(1)
    alone = {m.group(1) for m in LETTER_RE.finditer(span) if m.group(1) in options}
    return alone.pop() if len(alone) == 1 else ""


def group_accuracy(preds: list, column: str) -> dict:
    """{value of `column`: {"accuracy", "n"}} over the scored rows."""
    acc = defaultdict(Counter)
    for p in preds:
        acc[str(p.get(column))].update(n=1, correct=p["correct"])
    return {k: {"accuracy": c["correct"] / c["n"], "n": c["n"]} for k, c in sorted(acc.items())}


def evaluate_tsv(model, tok, dcfg, path, limit=None, think=False, blank=False, batch_size=16,
                 max_new_tokens=None, progress=True) -> dict:
    """Accuracy of a VLMEvalKit multiple-choice TSV, overall, per `category` and per `l2-category`.
    Rows whose image does not decode are reported with their TSV line and left out of the accuracy.
    The report keeps the original rows and columns for `write_predictions_tsv`."""
    t0 = time.perf_counter()
    columns, rows = read_tsv(path)
    rows = rows[:limit] if limit is not None else rows
    images = {row.get("index"): row["image"] for _, row in rows if len(row["image"]) > 64}
    bad, preds = data.BadData(max_fraction=1.0), []

    def make_item(job):
        line, row = job     # MMBench stores an image once: a short cell is the index of the row holding it
        cell = images.get(row["image"], row["image"]) if len(row["image"]) <= 64 else row["image"]
        s = data.prompt_inputs(tok, dcfg, mcq_prompt(row), [decode_image(cell, f"{path}:{line}")], think=think)
        pixels = data.blank_pixels(s["pixel_values"]) if blank else s["pixel_values"]
        return Item(s["input_ids"].tolist(), pixels, max_new_tokens or MCQ_NEW_TOKENS[bool(think)]), None

    for (line, row), (reply, err) in zip(rows, answer_jobs(model, tok, rows, make_item, bad, batch_size, progress)):
        p = {"line": line, **{c: row.get(c) for c in ("index", "category", "l2-category") if c in columns},
             "answer": row["answer"].strip().upper(), "prediction": reply or "", "correct": False}
        p["extracted"] = "" if reply is None else extract_choice(reply, mcq_options(row))
        p.update(correct=reply is not None and p["extracted"] == p["answer"], **({"bad": str(err)} if err else {}))
        preds.append(p)
    good = [p for p in preds if "bad" not in p]
    return {"tsv": str(path), "think": bool(think), "blank": bool(blank), "n": len(good), "bad": bad.report(),
            "accuracy": sum(p["correct"] for p in good) / max(1, len(good)),
            **{c: group_accuracy(good, c) for c in ("category", "l2-category") if c in columns},
            "seconds": time.perf_counter() - t0, "predictions": preds, "columns": columns, "rows": [r for _, r in rows]}


def write_predictions_tsv(path, report: dict):
    """The TSV's own columns plus `prediction` and `extracted`, one line per row (bad rows empty)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(report["columns"] + ["prediction", "extracted"])
        for row, p in zip(report["rows"], report["predictions"]):
            w.writerow([row.get(c, "") for c in report["columns"]] + [p["prediction"], p["extracted"]])


# ----------------------------------------------------------------------------------------------
# command line

class Parser(argparse.ArgumentParser):
    def error(self, message):               # one line, not argparse's usage block
        raise UsageError(message)


def report_name(name: str, think, blank) -> str:
    return f"{name}{'-think' if think else ''}{'-blank' if blank else ''}"


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def run_eval(args, model, tok, dcfg):
    """--eval: a synthetic-data folder (every family), a JSONL manifest, or a VLMEvalKit TSV."""
    path, mode = args.eval, dict(think=args.think, blank=args.blank, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens)
    out_dir = os.path.join(args.ckpt, "eval")
    if path.endswith(".tsv"):
        rep = evaluate_tsv(model, tok, dcfg, path, args.limit, **mode)
        print(f"{Path(path).name}: accuracy {rep['accuracy']:.3f} over {rep['n']} rows ({rep['bad']}), "
              f"{rep['seconds']:.1f} s")
        for col in ("category", "l2-category"):
            for k, v in rep.get(col, {}).items():
                print(f"  {col} {k:32s} n={v['n']:5d}  accuracy {v['accuracy']:.3f}")
        out = args.out or os.path.join(out_dir, report_name(Path(path).stem, args.think, args.blank) + ".json")
        tsv_out = os.path.splitext(out)[0] + "_predictions.tsv"
        write_json(out, {"ckpt": args.ckpt, **{k: v for k, v in rep.items() if k not in ("rows", "columns")}})
        write_predictions_tsv(tsv_out, rep)
        print(f"report: {out}\npredictions: {tsv_out}")
        return rep
    if os.path.isdir(path):
        if not synth_families(path):
            raise InputError(f"--eval {path}: a folder must hold <family>/eval.jsonl manifests (synthetic data)")
        limit = 32 if args.limit is None else args.limit
        rep = evaluate_families(model, tok, dcfg, path, limit=limit, **mode)
        base = chance(path, list(rep["n"]), limit=limit)
    else:
        bad = data.BadData(max_fraction=1.0)
        rep, base = evaluate_records(model, tok, dcfg, read_records(path, args.limit, bad), bad=bad, **mode), {}
    print(f"{'family':14s} {'n':>4s}  {'accuracy':>8s}  {'word-F1':>7s}  {'chance':>6s}")
    for f, n in rep["n"].items():
        c = f"{base[f]:6.3f}" if f in base else "     -"
        print(f"{f:14s} {n:4d}  {rep['accuracy'][f]:8.3f}  {rep['word_f1'][f]:7.3f}  {c}")
    print(f"{rep['bad']}; {rep['seconds']:.1f} s")
    settings = {"ckpt": args.ckpt, "eval": path, "think": args.think, "blank": args.blank}
    if args.out:
        write_json(args.out, {**settings, **rep, "chance": base})
        print(f"report: {args.out}")
        return rep
    for f in rep["n"]:
        out = os.path.join(out_dir, report_name(f, args.think, args.blank) + ".json")
        write_json(out, {**settings, "family": f, "n": rep["n"][f], "accuracy": rep["accuracy"][f],
                         "word_f1": rep["word_f1"][f], "chance": base.get(f), "bad": rep["bad"],
                         "predictions": [p for p in rep["predictions"] if p["family"] == f]})
    print(f"reports: {out_dir}/<family>{report_name('', args.think, args.blank)}.json")
    return rep


def cli(argv):
    ap = Parser(prog="sample.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--ckpt", required=True, help="a checkpoint folder (ours or an official SAIL-VL2 one)")
    ap.add_argument("--image", nargs="*", default=[], help="image file(s); each gets an <image> placeholder")
    ap.add_argument("--video", nargs="*", default=[], help="video file(s), sampled to 16 frames")
    ap.add_argument("--prompt", default="Describe the image.")
    ap.add_argument("--think", action="store_true", help="thinking mode: ask for <think>...</think> + \\boxed{}")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default 256; eval: per family (DIRECT_NEW_TOKENS / THINK_NEW_TOKENS)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", default=None, help="score a synthetic-data folder, a JSONL manifest or a VLMEvalKit TSV")
    ap.add_argument("--blank", action="store_true", help="eval: every image and video frame white (blindness)")
    ap.add_argument("--limit", type=int, default=None, help="eval: first N records (default: 32 per family of a "
                                                            "synthetic folder, all of a manifest or TSV)")
    ap.add_argument("--batch-size", type=int, default=32, help="eval: prompts per generate call")
    ap.add_argument("--out", default=None, help="eval: one combined JSON report here instead of <ckpt>/eval/")
    ap.add_argument("--device", default=default_device(), help="cuda | cpu (default: cuda when present)")
    args = ap.parse_args(argv)
    for flag, paths in (("--image", args.image), ("--video", args.video), ("--eval", [args.eval] if args.eval else [])):
        for p in paths:
            if not os.path.exists(p):
                raise UsageError(f"{flag} {p}: no such file or folder")
    if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        raise UsageError("--limit and --batch-size must be at least 1")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or (args.device != "cpu" and not torch.cuda.is_available()):
        raise UsageError(f"--device {args.device}: expected cpu or cuda[:N] (CUDA available: {torch.cuda.is_available()})")
    model, tok, dcfg = load(args.ckpt, args.device)
    if args.eval:
        return run_eval(args, model, tok, dcfg)
    try:
        answer(model, tok, dcfg, args.prompt, args.image, args.video, think=args.think,
               max_new_tokens=args.max_new_tokens or 256, temperature=args.temperature, top_p=args.top_p,
               seed=args.seed, stream=True)
    except data.DataError as e:
        raise InputError(e.message) from None
    print()


def main(argv=None):
    try:
        return cli(sys.argv[1:] if argv is None else argv)
    except (UsageError, data.DataError) as e:
        print(f"sample.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(getattr(e, "code", 1))


if __name__ == "__main__":
    main()
