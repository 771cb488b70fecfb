"""Generate from and evaluate a SAIL-VL2 checkpoint; the grading API. The model and the univl-chat
prompt follow the paper (§2) and the official conversation template (`univl-chat` of the HF model
BytedanceDouyinContent/SAIL-VL2-2B); evaluation (scoring rules, batching, the blind runs, the
intervals, the VLMEvalKit TSV reader) is ours: the paper gives no procedure.

    python sample.py --ckpt out/vit1 --image data_synth/caption/images/eval_00000.png --prompt "Describe the image."
    python sample.py --ckpt out/sft4 --video data_synth/video/videos/eval_00000.mp4 --prompt "Where does it move?"
    python sample.py --ckpt out/longcot --image IMG --prompt "What is the result?" --think
    python sample.py --ckpt out/sft4 --eval data_synth                 # every synthetic family, first 128 each
    python sample.py --ckpt out/sft4 --eval data_synth --think --blank # thinking mode; images all white
    python sample.py --ckpt out/sft4 --eval data_synth/count/eval.jsonl --limit 8 --out count.json
    python sample.py --ckpt out/sft4 --eval MMBench_DEV_EN.tsv         # a VLMEvalKit multiple-choice TSV

Works on our checkpoints and on official SAIL-VL2 folders (the folder's tokenizer when it has one,
else the embedded default). Images are tiled as the checkpoint was trained (tiles + thumbnail, or
AnyRes), videos give one tile per frame; a single answer streams to stdout token by token.
Evaluation is greedy and batched (many prompts per `generate` call, KV cache, left padding; a row
ends at <|im_end|> / <|endoftext|>); reports go to `<ckpt>/eval/[<manifest>.]<family>[-think][-blank].json` and a
table is printed, every accuracy with its n and (synthetic families and manifests) its Wilson 95%
interval. Replies are read with the grading API here (the one the RL rewards and the LongCoT filter
use: a reply's answer region, its last \\boxed{}, when two answers agree, word-F1, ROUGE-L); scoring
per family: `extract_answer`, `caption_correct`, `split_last_word`. Effects are paired differences on
the same samples (`paired_difference`). The data curation tools of §3.1 and §4.1 (which score data
with a checkpoint through `load`) are tests/curate.py. Command-line errors exit with 2, unusable
inputs (not a checkpoint, not an image) with 1, both with one line on stderr.
"""
import argparse
import base64
import binascii
import csv
import io
import itertools
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict, namedtuple
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import data
import model as modeling
from data import InputError, UsageError
from vit import blank_pixels


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"       # --device's default: the GPU when there is one


def load(ckpt: str, device="cpu"):
    """(model, tokenizer, DataConfig) for a checkpoint folder; the model on `device`, fp32, except
    where the device computes in bf16 (CUDA, model.COMPUTE_DTYPE): there the LLM's matrices are held
    in bf16 (model.for_generation), as RL's rollouts hold them, read straight into them on the device,
    and generation runs under autocast."""
    if not os.path.isdir(ckpt):
        raise UsageError(f"--ckpt {ckpt}: no such folder")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise InputError(f"--ckpt {ckpt}: not a checkpoint folder (no config.json)")
    try:
        model = modeling.SAILVL.from_pretrained(ckpt, device=device, matrices_dtype=modeling.compute_dtype(device))
    except Exception as e:      # any reason (bad JSON, missing or corrupt weights): one line, not a traceback
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--ckpt {ckpt}: cannot load the checkpoint: {why}") from None
    model = modeling.for_generation(model, device)
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
    return tok.decode_bytes(ids[:-1] if ids and ids[-1] in stop else ids).decode("utf-8", errors="replace")


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
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def answer(model, tok, dcfg, question, images=(), videos=(), think=False, max_new_tokens=256,
           temperature=0.0, top_p=1.0, seed=0, stream=False) -> str:
    """One reply to `question` (a string, or [(role, content)] turns) about the given media."""
    sample = data.prompt_inputs(tok, dcfg, question, images, videos, think=think)
    stop = stop_ids(tok)
    device = modeling.model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    with modeling.autocast(device):
        out = model.generate([sample["input_ids"].tolist()], modeling.on_device(sample["pixel_values"], device),
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_tokens=stop,
                             generator=gen, on_token=Streamer(tok, stop) if stream else None, n_valid_tokens=tok.n_vocab,
                             banned=data.undecodable_ids(tok))[0]
    return decode_reply(tok, out, stop)


# ----------------------------------------------------------------------------------------------
# Grading: what a reply answers, and when two answers agree
#
# The one grading API of the project: the LongCoT filter (rl.py), the evaluation (below) and the RL
# rewards (rl.py, §4.2.3 / §4.2.5) read replies and compare answers only with these. Everything here is
# linear in its input: no regex with nested quantifiers over unbounded text, no sympy, no signal.alarm.
#
# Which box. The final answer is the content of the last `\boxed{...}` in the reply's answer region
# (`answer_region`; `data.split_think`, the chat template's, gives (thinking, answer region) of a closed
# block): of the boxes whose braces balance, the one whose `\boxed{` comes last, so a box nested in
# another one answers (`\boxed{\boxed{1}+1}` answers 1). That is math-verify 0.9.0's rule
# (latex2sympy2_extended's extract_boxed_content searches `\boxed` from the right), and as there braces
# are counted raw (`\{` and `\}` count), `\boxed` must be followed by `{` directly
# (`\boxed {5}` is no answer) and a box that never closes is ignored (`\boxed{1} and \boxed{2` answers 1).
# Our differences: a box whose content is longer than MAX_BOX_CHARS is no answer; several boxes are not
# joined into one set answer (for math-verify `\boxed{1} or \boxed{2}` is {1, 2}; here it is 2); a lone
# unclosed box and `\boxed 5` without braces are no answer (math-verify reads them).
#
# When two answers agree (`answers_match`). An answer maps to a key (a number as an exact Fraction, a
# choice letter, an ordered tuple/interval, a set, a plain list, a whole-number percent, or the cleaned
# text) and two answers agree when their keys are equal. The keys are held to never call equal what
# math-verify 0.9.0 calls different (tests/test_answers.py); math-verify's equality is not transitive
# (5 = 5.0 and 5 = \text{5}, but 5.0 != \text{5}; 5 = 5% but 5.0 != 5%), so every key class must be equal
# pairwise there, which makes this stricter. It handles: `$`, `\$`, whitespace, `\text{}` `\textbf{}`
# `\textrm{}` `\textnormal{}` `\mathrm{}` `\mbox{}` `\boxed{}` wrappers around words (around a bare number
# they stay text: `\text{5}` != `5`), `\left` / `\right`, `\!` and `{,}` thousands separators (`1,234` but
# not `1, 234`), trailing zeros, `a/b` and `\frac` `\dfrac` `\tfrac` `\frac13` vs decimals, `%` after a
# whole number written bare (28% = 28; 12.5% only equals 12.5%), `^\circ`, signs and the Unicode minus,
# one capital choice letter with or without parentheses, `(1,2)` vs `[1,2)` vs `\{1,2\}` (sets unordered),
# and a leading `x =` (but `x=1` != `y=1`). It does NOT handle: algebra (`2x` vs `x+x`), radicals and pi,
# decimals vs repeating fractions (1/3 vs 0.333), lowercase choices, units, scientific notation, leading
# zeros (`03` stays text), mixed numbers, matrices, relations, `°`. Case matters (`C` != `c`: a lowercase
# letter may be a variable). The evaluation of free-text answers ignores case by comparing
# `normalize_answer` forms (lower case, no final period).

MAX_BOX_CHARS = 1000        # a \boxed{} whose content is longer is no answer (bounds all later work)
BOXED = "\\boxed{"
_BRACE = re.compile(r"[{}]")


def answer_region(text: str):
    """The part of a reply that holds its answer: after the last `</think>`, all of a reply without
    think tags, None for a `<think>` never closed (the reply was cut mid-thought)."""
    if (end := text.rfind("</think>")) >= 0:
        return text[end + len("</think>"):]
    return None if "<think>" in text else text


def last_boxed(text: str, max_chars: int = MAX_BOX_CHARS):
    """Content of the last balanced `\\boxed{...}` of `text` (the one opened last), or None. Boxes
    are tried from the right; a box that does not close (within `max_chars`) cannot be inside an
    earlier box that does, so the earlier one must close before it starts: each character is
    scanned at most once, and boxes after the last `}` are never tried."""
    limit = text.rfind("}") + 1                     # a box can only close before this
    while (pos := text.rfind(BOXED, 0, limit)) >= 0:
        start, depth = pos + len(BOXED), 1
        for m in _BRACE.finditer(text, start, min(limit, start + max_chars + 1)):
            depth += 1 if m.group() == "{" else -1
            if depth == 0:
                return text[start:m.start()]
        limit = pos
    return None


def final_answer(text: str):
    """The reply's final answer: the last box of its answer region, or None."""
    region = answer_region(text)
    return None if region is None else last_boxed(region)


def last_number(text: str):
    """The last number (integer or decimal, with its sign and thousands separators) in `text`."""
    end = max(text.rfind(d) for d in "0123456789")          # -1 (no digit): an empty window, None
    found = re.findall(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?", text[max(0, end - MAX_BOX_CHARS):end + 1])
    return found[-1] if found else None


_WRAPPER_TOKEN = re.compile(r"\\(?:boxed|textbf|textrm|textnormal|text|mathrm|mbox)[ ]{0,8}\{|\\[\\{}]|[{}]")
_SPACING = re.compile(r"\\[,;: ]|~|\\q?quad(?![a-zA-Z])")
_THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = r"[+-]?(?:(?:0|[1-9]\d*)(?:\.\d+)?|\.\d+)"       # no leading zeros, digits after a point
_NUMBER = re.compile(_DECIMAL)
_RATIO = re.compile(f"({_DECIMAL})/({_DECIMAL})")
_FRAC = re.compile(f"([+-]?)\\\\frac(?:\\{{({_DECIMAL})\\}}\\{{({_DECIMAL})\\}}|(\\d)(\\d))")
_CHOICE = re.compile(r"\(([A-Z])\)|([A-Z])")
_ASSIGN = re.compile(r"([A-Za-z])=([^=]+)")
_BRACKET = re.compile(r"\\\{|\\\}|[()\[\]{},]")
_NUMERIC_TEXT = re.compile(r"[^A-Za-z\\]*")          # wrapper content without words or commands
_STRUCTURED_TEXT = re.compile(r"[=+,.;:]")            # words with an equation, a sum or a list: text for math-verify
_PERCENT = re.compile(r"(0|[1-9]\d*)%")
# No answer is a number spelled in more characters: model output may hold any run of digits, and
# Python refuses to convert an integer of more than 4,300 digits to or from text (a ValueError).
MAX_NUMBER_CHARS = 256


def _unwrap(s: str) -> str:
    """Drop `\\text{` ... `}`-style wrappers and keep their content, except around content without
    letters (a number): math-verify reads `\\text{5}` as text, equal to `5` but not to `5.0`, so
    it stays `\\text{5}` here; and around words with an equation, a sum or a list (`\\text{x=5}`,
    `\\text{A, B}`, `\\text{red.}`), which math-verify keeps as text too. One pass, linear."""
    out, stack, last = [], [], 0            # stack: (wrapper token or None, index into out)
    for m in _WRAPPER_TOKEN.finditer(s):
        out.append(s[last:m.start()])
        tok, last = m.group(), m.end()
        if tok == "{" or (len(tok) > 2 and tok[-1] == "{"):
            stack.append((None if tok == "{" else tok, len(out)))
            out.append("{" if tok == "{" else "")
        elif tok == "}":
            wrapper, at = stack.pop() if stack else (None, None)
            if wrapper is None or wrapper.startswith("\\boxed"):
                out.append("}" if wrapper is None else "")
            elif len(out) - at == 2 and (_NUMERIC_TEXT.fullmatch(out[-1]) or _STRUCTURED_TEXT.search(out[-1])):
                out[at] = wrapper.replace(" ", "")
                out.append("}")
        else:
            out.append(tok)
    out.append(s[last:])
    return "".join(out)


def _squeeze_spaces(s: str) -> str:
    """Remove whitespace, except one space between two letters/digits (`\\pi r`, `1 000` stay apart)."""
    def repl(m):
        a, b = m.start() - 1, m.end()
        return " " if a >= 0 and b < len(s) and s[a].isalnum() and s[b].isalnum() else ""
    return re.sub(r"\s+", repl, s).strip()


def clean_answer(s: str) -> str:
    """The answer with the notation above normalised away (the text that `_key` reads)."""
    s = str(s).replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\!\s*", "", s).replace("{,}", ",")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])|\\displaystyle", "", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = _unwrap(s)
    s = re.sub(r"(\d)\^(?:\\circ|\{\\circ\})", r"\1", s).replace("\\%", "%").strip()
    if _THOUSANDS.fullmatch(s):                       # before whitespace goes: `32, 349` is a list
        s = s.replace(",", "")
    return _squeeze_spaces(s)


def parse_number(s: str):
    """A cleaned answer as an exact Fraction (`-3`, `2.50`, `1/2`, `\\frac{1}{2}`, `\\frac12`), or None
    (also for one longer than MAX_NUMBER_CHARS)."""
    if len(s) > MAX_NUMBER_CHARS:
        return None
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    if (m := _RATIO.fullmatch(s) or _FRAC.fullmatch(s)) is None:
        return None
    sign, num, den = (("", m[1], m[2]) if m.re is _RATIO else (m[1], m[2] or m[4], m[3] or m[5]))
    if Fraction(den) == 0:
        return None
    return Fraction(num) / Fraction(den) * (-1 if sign == "-" else 1)


def _split_top(s: str):
    """(items, enclosed): `s` split at top-level commas, and whether its first bracket closes last."""
    items, depth, last, enclosed = [], 0, 0, False
    for m in _BRACKET.finditer(s):
        tok = m.group()
        if tok == ",":
            if depth == 0:
                items.append(s[last:m.start()])
                last = m.end()
        elif tok in ("(", "[", "{", "\\{"):
            if depth == 0 and m.start() == 0:
                enclosed = True
            depth += 1
        else:
            depth -= 1
            if depth == 0 and m.end() < len(s):
                enclosed = False
            if depth < 0:
                return [s], False
    items.append(s[last:])
    return items, enclosed and depth == 0


def _key(s: str, depth: int = 0):
    """Comparison key of a cleaned answer (see above); None for an empty one."""
    if not s:
        return None
    if len(s) <= MAX_NUMBER_CHARS and (m := _PERCENT.fullmatch(s)) is not None:
        return ("pct", int(m[1]))                      # equal to the same bare integer, see answers_match
    if (m := _CHOICE.fullmatch(s)) is not None:
        return ("choice", m[1] or m[2])
    if (x := parse_number(s)) is not None:
        return ("num", x)
    if depth < 4:
        items, enclosed = _split_top(s)
        if enclosed:
            inner, _ = _split_top(s[2:-2] if s.startswith("\\{") and s.endswith("\\}") else s[1:-1])
            keys = [_key(e, depth + 1) for e in inner]
            if None not in keys:
                if s.startswith("\\{") and s.endswith("\\}"):
                    return ("set", tuple(sorted(keys, key=repr)))
                if len(keys) == 1 and s[0] == "(" and s[-1] == ")":
                    return keys[0]                     # redundant parentheses: (5) = 5
                if len(keys) > 1 and s[0] in "([" and s[-1] in ")]":
                    return ("seq", s[0], s[-1], tuple(keys))
        elif len(items) > 1:
            keys = [_key(e, depth + 1) for e in items]
            if None not in keys:
                return ("list", tuple(keys))
    return ("str", s)


def answer_key(answer: str):
    """(variable or None, key, cleaned text) of an answer: `x = 5` gives ("x", key of 5, "5")."""
    s = clean_answer(answer)
    m = _ASSIGN.fullmatch(s)
    var, s = (m[1], m[2]) if m else (None, s)
    key = _key(s)
    return None if key is None else (var, key, s)


def answers_match(pred: str, truth: str) -> bool:
    """Two answers agree: equal keys, or a whole-number percent and the same integer written bare
    (28% = 28, but 28% != 28.0 as for math-verify). An empty answer agrees with nothing."""
    a, b = answer_key(pred), answer_key(truth)
    if a is None or b is None or (a[0] and b[0] and a[0] != b[0]):
        return False
    if {a[1][0], b[1][0]} == {"pct", "num"}:
        (_, pct, _), (_, num, text) = (a, b) if a[1][0] == "pct" else (b, a)
        return text.isdigit() and text.isascii() and num[1] == pct[1]
    return a[1] == b[1]


def normalize_answer(s: str, whole_numbers: bool = True) -> str:
    """The spelling the evaluation reports a free-text answer in: `clean_answer`, lower case, no
    final period, a whole number without decimals ("4.0" -> "4"; not with whole_numbers=False, the
    form answers are compared in: `answers_match` equates 4.0 and 4 itself, and 28.0 is not 28%)."""
    s = clean_answer(s).lower().rstrip(".").strip()
    x = parse_number(s) if whole_numbers else None
    return str(x.numerator) if x is not None and x.denominator == 1 else s


MAX_LCS_WORDS = 256         # ROUGE-L's LCS is O(n m): both sides are cut to their first 256 words


def answer_words(s: str, limit: int = None) -> list:
    """Lower-cased \\w+ words (what word_f1 and rouge_l compare); with `limit`, the first `limit`."""
    if limit is None:
        return re.findall(r"\w+", s.lower())
    return [m.group().lower() for m in itertools.islice(re.finditer(r"\w+", s), limit)]


def word_f1(pred: str, ref: str) -> float:
    """SQuAD's bag-of-words F1 over answer_words; when either side has no words, 1.0 if both have
    none, else 0.0 (as SQuAD's compute_f1)."""
    p, r = answer_words(pred), answer_words(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    return 0.0 if common == 0 else 2 * common / (len(p) + len(r))


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (beta = 1) over answer_words: LCS of the two word sequences, P = LCS / |pred|,
    R = LCS / |ref|; 0.0 when either side is empty."""
    p, r = answer_words(pred, MAX_LCS_WORDS), answer_words(ref, MAX_LCS_WORDS)
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)                                     # one DP row of the LCS table
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return 2 * prev[-1] / (len(p) + len(r))                       # prev[-1]: the LCS length


# ----------------------------------------------------------------------------------------------
# Answer extraction per family, with the grading API above. Model output is hostile (anything, of any
# length): every rule below reads at most MAX_SCAN characters, uses the API's linear, bounded readers
# and regexes without nested or adjacent quantifiers, so no input can make it backtrack.

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
    """(span, boxed): the content of the answer region's last \\boxed{} (boxed True), else the whole
    region ("" when the reply has none); at most MAX_SCAN characters."""
    region = answer_region(text) or ""
    boxed = last_boxed(region)
    return (region if boxed is None else boxed)[:MAX_SCAN], boxed is not None


def words(text: str) -> list:
    """Lower-case words and numbers, plurals of shapes/labels made singular, synonyms mapped."""
    out = [SYNONYMS.get(t, t) for t in TOKEN_RE.findall(text[:MAX_SCAN].lower())]
    return [t[:-1] if t.endswith("s") and t[:-1] in SINGULAR else t for t in out]


def _number(t: str):
    """A word's number ("7", "2.5", or a number word up to ten), None for other words."""
    return normalize_answer(t) if t[:1].isdigit() else NUMBER_WORDS.get(t)


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
      math, math_direct, count_cot   the boxed value, else the `last_number` of the whole answer region
      chart                          the first number when `gold` is a number, else the first chart label
      ocr                            the first word of the synthetic vocabulary, else the last word
      multi                          the first of yes / no / first / second
      video                          the first direction (left / right / up / down; "upwards" = up)
      caption_qa                     the colour, shape or position ("top left"): the kind `gold` is (the
                                     question asks for one kind), else the first
    Any other family: the whole span, normalised (today's rule for real manifests). `gold` only
    chooses the kind of answer asked for; it is never searched for in the reply."""
    span, boxed = answer_span(text)
    tokens = words(span)
    numbers = [n for n in map(_number, tokens) if n is not None]
    g = None if gold is None else normalize_answer(gold)
    if family == "count":
        return numbers[0] if numbers else None
    if family in ("math", "math_direct", "count_cot"):
        last = span if boxed else last_number(answer_region(text) or "")    # its tail, not the span's first MAX_SCAN
        return None if last is None else normalize_answer(last)
    if family == "chart":
        pick = numbers if g is not None and _number(g) is not None else [t for t in tokens if t in CHART_LABELS]
        return pick[0] if pick else None
    if family == "ocr":
        alpha = [t for t in tokens if t.isalpha()]
        return next((t for t in alpha if t in OCR_WORDS), alpha[-1] if alpha else None)
    if family in ("multi", "video"):
        vocab = MULTI if family == "multi" else DIRECTIONS
        return next((t for t in tokens if t in vocab), None)
    if family == "caption_qa":
        return _caption_qa(tokens, g)
    return normalize_answer(span)


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
    """The first lower-case word or number, as written (no plural or synonym folded: the text
    family's held-back word must be the word itself, "circles" not "circle")."""
    return next(iter(TOKEN_RE.findall(text[:MAX_SCAN].lower())), None)


def score(rule: str, reply: str, reference: str, gold) -> tuple:
    """(correct, extracted) for one reply. `rule`: a synthetic family name, "text" (LM completion:
    the first word must be the held-back one), or anything else: the record's `answer` against the
    \\boxed{} content or whole answer region, without an answer the reference reply's answer
    region. Answers agree by answers_match of their case-folded forms (normalize_answer)."""
    if rule == "text":
        got = first_word(reply)
        return got is not None and got == first_word(reference), got
    if rule == "caption":
        named = sorted(caption_objects(answer_span(reply)[0]))
        return caption_correct(reply, reference), " and ".join(" ".join(o) for o in named)
    if gold is None:
        got = (answer_region(reply) or "")[:MAX_SCAN]
        same = answers_match(normalize_answer(got, False), normalize_answer(answer_region(reference) or "", False))
        return same, normalize_answer(got)
    if rule not in data.SYNTH_FAMILIES:                      # a real manifest: the reply's own spelling
        got = answer_span(reply)[0]
        return answers_match(normalize_answer(got, False), normalize_answer(gold, False)), normalize_answer(got)
    got = extract_answer(rule, reply, gold)
    return got is not None and answers_match(got, normalize_answer(gold)), got


def reply_word_f1(reply: str, reference: str) -> float:
    """word-F1 (word_f1) of the two answer regions: the captions' graded score."""
    return word_f1((answer_region(reply) or "")[:MAX_SCAN], answer_region(reference) or "")


# ----------------------------------------------------------------------------------------------
# Batched greedy evaluation

# max_new_tokens per family (byte-level tiny tokenizer: about 1.2x the longest reference reply;
# a BPE tokenizer needs fewer). Thinking mode leaves room for a chain before the \boxed{} answer:
# 192 for the others (a scene described object by object, then the answer); count_cot's chains,
# up to nine objects, reach ~400 tokens with the embedded tokenizer, hence its 512.
DIRECT_NEW_TOKENS = {"text": 16, "caption": 96, "caption_qa": 32, "ocr": 16, "chart": 16, "count": 32,
                     "count_cot": 512, "math": 96, "math_direct": 32, "multi": 32, "video": 32}
THINK_NEW_TOKENS = {"text": 16, "count_cot": 512, "math": 128}
OTHER_NEW_TOKENS = {False: 128, True: 1024}       # families we do not know (real manifests)
MCQ_NEW_TOKENS = {False: 32, True: 1024}          # a VLMEvalKit multiple-choice TSV


def default_new_tokens(family: str, think: bool) -> int:
    if family not in DIRECT_NEW_TOKENS:
        return OTHER_NEW_TOKENS[bool(think)]
    return THINK_NEW_TOKENS.get(family, 192) if think else DIRECT_NEW_TOKENS[family]


# held-out samples per family read by default (sample.py --eval, the recipe): the whole synthetic
# eval split of every family but text (1,024; its first 128). At n = 128 an accuracy near 0.5 has a
# Wilson 95% interval of ±0.09 (±0.17 at n = 32).
EVAL_LIMIT = 128

PROMPT_BUCKET = 16               # generate_all sorts prompts by length in steps of this many tokens


@dataclass(frozen=True)
class EvalMode:
    """How held-out prompts are answered (always greedily)."""
    think: Optional[bool] = False           # False direct, True THINK_PROMPT appended, None each record's own
    blank: bool = False                     # every image and video frame white (the blindness measure)
    batch_size: int = 32                    # prompts per generate call
    max_new_tokens: Optional[int] = None    # None: DIRECT_NEW_TOKENS / THINK_NEW_TOKENS per family
    progress: bool = True                   # a tqdm bar

# one prompt to answer: token ids, its pixels (None, a tensor, or an AnyRes list), its token budget,
# and the length of the reply it expects (the reference's tokens; 0 unknown): only batching reads it
Item = namedtuple("Item", "ids pixels max_new expect", defaults=(0,))


def concat_pixels(pixels: list):
    """The pixels of several prompts in prompt order: the order their <IMG_CONTEXT> slots are filled."""
    pixels = [p for p in pixels if p is not None and not (isinstance(p, (list, tuple)) and not p)]
    if not pixels:
        return None
    if isinstance(pixels[0], (list, tuple)):
        return [t for p in pixels for t in p]
    return torch.cat(pixels)


def generate_batch(model, tok, items: list) -> list:
    """Greedy replies to `items` in one `generate` call; each row is cut to its own budget and its first
    stop (rows decode on after theirs), so the result does not depend on which rows share the batch
    (in fp32; in bf16 on a GPU other batch shapes round differently, and a near-tie can flip)."""
    stop, device = stop_ids(tok), modeling.model_device(model)
    with modeling.autocast(device):
        out = model.generate([it.ids for it in items], modeling.on_device(concat_pixels([it.pixels for it in items]), device),
                             max_new_tokens=max(it.max_new for it in items), temperature=0.0, stop_tokens=stop,
                             n_valid_tokens=tok.n_vocab, banned=data.undecodable_ids(tok))
    return [decode_reply(tok, list(itertools.takewhile(lambda t: t not in stop, ids[:it.max_new])), stop)
            for it, ids in zip(items, out)]


def generate_all(model, tok, items: list, batch_size: int = 32) -> list:
    """Replies to every item, batched: items of the same budget together, sorted by prompt length in
    PROMPT_BUCKET-token steps (a batch's prefill pads every prompt to its longest: prompt tokens are
    most of the cost of short answers), within a step by the reply length they expect (a batch
    decodes until its longest reply ends). Returned in the items' order."""
    key = lambda i: (items[i].max_new, len(items[i].ids) // PROMPT_BUCKET, items[i].expect, len(items[i].ids))  # noqa: E731
    order = sorted(range(len(items)), key=key)
    replies = {}
    while order:
        chunk = [i for i in order[:batch_size] if items[i].max_new == items[order[0]].max_new]
        order = order[len(chunk):]
        replies.update(zip(chunk, generate_batch(model, tok, [items[i] for i in chunk])))
    return [replies[i] for i in range(len(items))]


def answer_jobs(model, tok, jobs: list, make_item, bad, batch_size=32, progress=True) -> list:
    """[(reply, info)] per job, where make_item(job) -> (Item, info). A job whose prompt cannot be built
    (DataError: a bad image, a truncated video) is counted in `bad` and gives (None, the error).
    Prompts are built 4 batches at a time, so only their pixels are held in memory."""
    results = []
    with tqdm(total=len(jobs), desc="eval", disable=data.no_bar(progress)) as bar, torch.inference_mode():
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
    text before its last word and that word's spaces (Qwen's pre-tokenizer puts a space in the next
    word; no chat template: text is trained without one), the reference the rest. -> (prompt, reference)."""
    s = rec.text.rstrip()
    runs = list(re.finditer(r"[^\W_]+", s))              # words: runs of letters and digits (str.isalnum)
    prefix = s[:runs[-1].start()].rstrip(" ") if runs else ""
    if not prefix:
        raise data.DataError("schema", rec.where, "a text record needs at least two words to score")
    return prefix, s[len(prefix):]


def record_item(tok, dcfg, rec, think, blank: bool, max_new_tokens):
    """(Item, (rule, reference, think)) for one eval record."""
    if rec.text is not None:
        budget = max_new_tokens or default_new_tokens("text", False)
        prefix, reference = split_last_word(rec)
        return Item(data.encode(tok, prefix), None, budget, len(data.encode(tok, reference))), ("text", reference, False)
    if rec.turns[-1][0] != "assistant":
        raise data.DataError("schema", rec.where, "an eval record needs a final assistant turn to score")
    t = bool(rec.think if think is None else think)
    try:
        s = data.prompt_inputs(tok, dcfg, rec.turns[:-1], rec.images, rec.videos, think=t, system=rec.system)
    except data.DataError as e:         # prompt_inputs names no record: name the manifest's file and line
        if e.where != rec.where:
            raise data.DataError(e.reason, rec.where, e.message) from None
        raise
    pixels = blank_pixels(s["pixel_values"]) if blank else s["pixel_values"]
    budget = max_new_tokens or default_new_tokens(rec.task, t)
    expect = len(data.encode(tok, rec.turns[-1][1]))
    return Item(s["input_ids"].tolist(), pixels, budget, expect), (rec.task, rec.turns[-1][1], t)


def read_records(path, limit, bad: data.BadData, image_root: str = "") -> list:
    """The first `limit` records of a manifest (all when None), media paths relative to `image_root`
    (empty: the manifest's folder); bad lines are counted in `bad`, which shows the first ones with
    file and line."""
    ds = data.JsonlDataset(path, None, data.DataConfig(image_root=image_root))
    recs = []
    for i in range(len(ds))[:limit]:
        try:
            recs.append(ds.record(i))
        except data.DataError as e:
            bad.bad(e)
    return recs


def evaluate_records(model, tok, dcfg, records: list, mode: EvalMode = EvalMode(), bad=None, prompts=None) -> dict:
    """Score records (family = each record's task). The shape of `evaluate_families`' result.
    `prompts`: a dict the caller keeps across calls with one tokenizer and data config (the recipe
    scores every stage on the same records): each record's prompt is built (its media decoded) once."""
    t0 = time.perf_counter()
    bad = bad or data.BadData(max_fraction=1.0)
    preds = []

    def make(rec):
        if prompts is None:
            return record_item(tok, dcfg, rec, mode.think, mode.blank, mode.max_new_tokens)
        key = (rec.where, mode.think, mode.blank, mode.max_new_tokens)
        if key not in prompts:
            try:
                prompts[key] = record_item(tok, dcfg, rec, mode.think, mode.blank, mode.max_new_tokens)
            except data.DataError as e:                       # a bad record stays bad, counted every call
                prompts[key] = e
        if isinstance(prompts[key], data.DataError):
            raise prompts[key]
        return prompts[key]
    for rec, (reply, info) in zip(records, answer_jobs(model, tok, records, make, bad, mode.batch_size, mode.progress)):
        if reply is None:
            continue
        rule, reference, t = info
        ok, got = score(rule, reply, reference, rec.answer)
        preds.append({"family": rec.task, "where": rec.where, "answer": rec.answer, "reference": reference,
                      "prediction": reply, "extracted": got, "correct": bool(ok), "blank": bool(mode.blank), "think": t,
                      "word_f1": reply_word_f1(reply, reference)})
    n = Counter(p["family"] for p in preds)
    mean = lambda key: {f: sum(p[key] for p in preds if p["family"] == f) / n[f] for f in n}   # noqa: E731
    right = {f: sum(p["correct"] for p in preds if p["family"] == f) for f in n}
    return {"accuracy": mean("correct"), "word_f1": mean("word_f1"), "n": dict(n),
            "interval": {f: list(wilson_interval(right[f], n[f])) for f in n}, "predictions": preds,
            "bad": bad.report(), "seconds": time.perf_counter() - t0}


def synth_families(synth_dir, split: str = "eval") -> list:
    """The families of a synthetic-data folder: SYNTH_FAMILIES order, then any other sub-folder."""
    found = {p.parent.name for p in Path(synth_dir).glob(f"*/{split}.jsonl")}
    return [f for f in data.SYNTH_FAMILIES if f in found] + sorted(found - set(data.SYNTH_FAMILIES))


def evaluate_families(model, tok, dcfg, synth_dir, families=None, split="eval", limit=EVAL_LIMIT,
                      mode: EvalMode = EvalMode(), prompts=None) -> dict:
    """Accuracy per synthetic family on the first `limit` records of `synth_dir/<family>/<split>.jsonl`
    (the same held-out samples every call), answered as `mode` says (EvalMode).
    -> {"accuracy": {family: a}, "word_f1": {...}, "n": {...}, "interval": {family: [lo, hi]} (Wilson
    95%), "predictions": [...], "bad": str, "seconds": s}. `prompts`: see evaluate_records."""
    families = families or synth_families(synth_dir, split)
    bad = data.BadData(max_fraction=1.0)
    records = [r for f in families for r in read_records(Path(synth_dir) / f / f"{split}.jsonl", limit, bad)]
    for r in records:          # the family is the folder, whatever a record's "task" says
        r.task = Path(r.where.rsplit(":", 1)[0]).parent.name
    return evaluate_records(model, tok, dcfg, records, mode, bad, prompts)


def chance_key(rec):
    """What "always the same answer" is compared on: the answer, the caption's objects, the held-back word."""
    if rec.text is not None:
        return first_word(rec.text.rstrip().rstrip(".").rsplit(" ", 1)[-1])
    if rec.answer is not None:
        return normalize_answer(rec.answer)
    ref = rec.turns[-1][1]
    return caption_objects(ref) if rec.task == "caption" else normalize_answer(ref)


def chance(synth_dir, families=None, split="eval", limit=EVAL_LIMIT, show_bad: bool = True) -> dict:
    """{family: share of the most common answer}: what always giving that answer scores. For caption
    the "answer" is the set of objects (colour, shape, position), so the share is near 0. Bad lines
    are shown (file and line; `show_bad=False` where the evaluation of the same lines showed them)
    and left out, as `evaluate_families` leaves them out."""
    out, bad = {}, data.BadData(max_fraction=1.0, show=show_bad)
    for f in families or synth_families(synth_dir, split):
        keys = Counter(chance_key(r) for r in read_records(Path(synth_dir) / f / f"{split}.jsonl", limit, bad))
        out[f] = max(keys.values()) / sum(keys.values()) if keys else 0.0
    return out


# ----------------------------------------------------------------------------------------------
# How sure a number is: a Wilson interval for every accuracy, a paired difference for every effect

Z95 = 1.959963984540054          # the standard normal's 97.5% quantile
BOOTSTRAP_RESAMPLES = 10_000


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple:
    """Wilson's score interval (1927) of the proportion correct / n, 95% by default:
    (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). Unlike p ± z sqrt(p(1-p)/n) it stays in
    [0, 1] and keeps a width at 0 or n correct; away from 1/2 it is asymmetric. (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    centre, half = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0 (n) correct the centre equals the half width: the end is exactly 0 (1), not its rounding
    lo = 0.0 if correct == 0 else max(0.0, (centre - half) / (1 + z2 / n))
    hi = 1.0 if correct == n else min(1.0, (centre + half) / (1 + z2 / n))
    return lo, hi


def accuracy_cell(correct: int, n: int) -> dict:
    """One report cell: n, correct, accuracy and its Wilson 95% interval."""
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": round(correct / max(1, n), 4),
            "interval": [round(lo, 4), round(hi, 4)]}


def plus_minus(accuracy: float, interval, digits: int = 2) -> str:
    """"0.72 ±0.08". The Wilson interval is asymmetric: ± is its larger side, rounded up, so the
    printed range always contains the interval (report.json keeps both ends)."""
    shown, scale = round(accuracy, digits), 10 ** digits   # the centre printed: the ± is measured from it
    half = max(shown - interval[0], interval[1] - shown)
    return f"{shown:.{digits}f} ±{math.ceil(round(half * scale, 6)) / scale:.{digits}f}"


def paired_difference(a: list, b: list, seed: int = 0) -> dict:
    """accuracy(a) - accuracy(b) for two prediction lists scored on the same samples (dicts with "family",
    "where" (a sample is the pair) and "correct": a bool, or a score in [0, 1] such as the share right of
    k), with a 95% paired bootstrap percentile interval: BOOTSTRAP_RESAMPLES resamples within each family
    (the design fixes each family's n), a sample's two sides drawn together. Also McNemar's discordant
    counts (a_only: better in a). ValueError unless both lists hold the same samples, each once."""
    ka = {(p["family"], p["where"]): float(p["correct"]) for p in a}
    kb = {(p["family"], p["where"]): float(p["correct"]) for p in b}
    if ka.keys() != kb.keys() or len(ka) != len(a) or len(kb) != len(b) or not ka:
        raise ValueError(f"the two sides are not scored on the same samples ({len(a)} and {len(b)} predictions, "
                         f"{len(ka.keys() ^ kb.keys())} samples on one side only)")
    per_family = defaultdict(list)                     # family -> per-sample differences a - b
    for key, x in ka.items():
        per_family[key[0]].append(x - kb[key])
    rng, sums = np.random.default_rng(seed), np.zeros(BOOTSTRAP_RESAMPLES)
    for f in sorted(per_family):
        d = np.array(per_family[f])
        if set(d.tolist()) <= {-1.0, 0.0, 1.0}:        # binary: the counts of +1 / -1 / 0 are multinomial
            p = [(d == 1).mean(), (d == -1).mean(), (d == 0).mean()]
            draws = rng.multinomial(len(d), p, size=BOOTSTRAP_RESAMPLES)
            sums += draws[:, 0] - draws[:, 1]
        else:
            sums += d[rng.integers(0, len(d), (BOOTSTRAP_RESAMPLES, len(d)))].sum(1)
    n = len(ka)
    lo, hi = (float(x) for x in np.percentile(sums / n, [2.5, 97.5]))
    diffs = [x for d in per_family.values() for x in d]
    return {"n": n, "accuracy_a": round(sum(ka.values()) / n, 4), "accuracy_b": round(sum(kb.values()) / n, 4),
            "difference": round(sum(diffs) / n, 4), "interval": [round(lo, 4), round(hi, 4)],
            "excludes_0": lo > 0 or hi < 0, "a_only": sum(x > 0 for x in diffs), "b_only": sum(x < 0 for x in diffs)}


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
    if missing := {"question", "answer", "image"} - set(columns):
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
    norm = normalize_answer(span)
    same = [k for k, v in options.items() if normalize_answer(v) == norm]
    if len(same) == 1:
        return same[0]
    if said := [m.group(1) for m in ANSWER_RE.finditer(span) if m.group(1) in options]:
        return said[-1]
    if (m := LEADING_RE.match(span)) and m.group(1) in options:
        return m.group(1)
    alone = {m.group(1) for m in LETTER_RE.finditer(span) if m.group(1) in options}
    return alone.pop() if len(alone) == 1 else ""


def group_accuracy(preds: list, column: str) -> dict:
    """{value of `column`: {"accuracy", "n"}} over the scored rows."""
    acc = defaultdict(Counter)
    for p in preds:
        acc[str(p.get(column))].update(n=1, correct=p["correct"])
    return {k: {"accuracy": c["correct"] / c["n"], "n": c["n"]} for k, c in sorted(acc.items())}


def evaluate_tsv(model, tok, dcfg, path, limit=None, mode: EvalMode = EvalMode(batch_size=16)) -> dict:
    """Accuracy of a VLMEvalKit multiple-choice TSV, overall, per `category` and per `l2-category`.
    Rows whose image does not decode are reported with their TSV line and left out of the accuracy.
    The report keeps the original rows and columns for `write_predictions_tsv`."""
    t0 = time.perf_counter()
    columns, rows = read_tsv(path)
    # every row's images, before the limit: a kept row may name one stored in a row past it
    images = {row.get("index"): row["image"] for _, row in rows if len(row["image"]) > 64}
    rows = rows[:limit]                                     # all when None
    bad, preds = data.BadData(max_fraction=1.0), []

    def make_item(job):
        line, row = job     # MMBench stores an image once: a short cell is the index of the row holding it
        cell = images.get(row["image"], row["image"]) if len(row["image"]) <= 64 else row["image"]
        s = data.prompt_inputs(tok, dcfg, mcq_prompt(row), [decode_image(cell, f"{path}:{line}")], think=mode.think)
        pixels = blank_pixels(s["pixel_values"]) if mode.blank else s["pixel_values"]
        return Item(s["input_ids"].tolist(), pixels, mode.max_new_tokens or MCQ_NEW_TOKENS[bool(mode.think)]), None

    for (line, row), (reply, err) in zip(rows, answer_jobs(model, tok, rows, make_item, bad, mode.batch_size, mode.progress)):
        p = {"line": line, **{c: row.get(c) for c in ("index", "category", "l2-category") if c in columns},
             "answer": row["answer"].strip().upper(), "prediction": reply or "", "correct": False}
        p["extracted"] = "" if reply is None else extract_choice(reply, mcq_options(row))
        p.update(correct=reply is not None and p["extracted"] == p["answer"], **({"bad": str(err)} if err else {}))
        preds.append(p)
    good = [p for p in preds if "bad" not in p]
    return {"tsv": str(path), "think": bool(mode.think), "blank": bool(mode.blank), "n": len(good), "bad": bad.report(),
            "accuracy": sum(p["correct"] for p in good) / max(1, len(good)),
            **{c: group_accuracy(good, c) for c in ("category", "l2-category") if c in columns},
            "seconds": time.perf_counter() - t0, "predictions": preds, "columns": columns, "rows": [r for _, r in rows]}


def write_predictions_tsv(path, report: dict):
    """The TSV's own columns plus `prediction` and `extracted`, one line per row (bad rows empty),
    written atomically as the report beside it."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, delimiter="\t")
    w.writerow(report["columns"] + ["prediction", "extracted"])
    for row, p in zip(report["rows"], report["predictions"]):
        w.writerow([row.get(c, "") for c in report["columns"]] + [p["prediction"], p["extracted"]])
    data.write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# command line

class Parser(argparse.ArgumentParser):
    def error(self, message):               # one line, not argparse's usage block
        raise UsageError(message)


def report_name(name: str, think, blank) -> str:
    return f"{name}{'-think' if think else ''}{'-blank' if blank else ''}"


def refuse_if_nothing_scored(path, n: int, bad_report: str):
    """An evaluation that scored no sample (an empty file, every line bad, not a manifest at all) writes
    no report: one line naming the file and what the bad-data count found (InputError, exit 1)."""
    if n == 0:
        raise InputError(f"--eval {path}: no usable sample to score ({bad_report})")


def run_eval(args, model, tok, dcfg):
    """--eval: a synthetic-data folder (every family), a JSONL manifest, or a VLMEvalKit TSV."""
    path, mode = args.eval, EvalMode(think=args.think, blank=args.blank, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens)
    out_dir = os.path.join(args.ckpt, "eval")
    if path.endswith(".tsv"):
        rep = evaluate_tsv(model, tok, dcfg, path, args.limit, mode)
        refuse_if_nothing_scored(path, rep["n"], rep["bad"])
        print(f"{Path(path).name}: accuracy {rep['accuracy']:.3f} over {rep['n']} rows ({rep['bad']}), "
              f"{rep['seconds']:.1f} s")
        for col in ("category", "l2-category"):
            for k, v in rep.get(col, {}).items():
                print(f"  {col} {k:32s} n={v['n']:5d}  accuracy {v['accuracy']:.3f}")
        out = args.out or os.path.join(out_dir, report_name(Path(path).stem, args.think, args.blank) + ".json")
        tsv_out = os.path.splitext(out)[0] + "_predictions.tsv"
        data.write_json(out, {"ckpt": args.ckpt, **{k: v for k, v in rep.items() if k not in ("rows", "columns")}})
        write_predictions_tsv(tsv_out, rep)
        print(f"report: {out}\npredictions: {tsv_out}")
        return rep
    if os.path.isdir(path):
        if not synth_families(path):
            raise InputError(f"--eval {path}: a folder must hold <family>/eval.jsonl manifests (synthetic data)")
        limit = EVAL_LIMIT if args.limit is None else args.limit
        rep = evaluate_families(model, tok, dcfg, path, limit=limit, mode=mode)
        base = chance(path, list(rep["n"]), limit=limit, show_bad=False)     # (the evaluation showed them)
    else:
        bad = data.BadData(max_fraction=1.0)
        rep, base = evaluate_records(model, tok, dcfg, read_records(path, args.limit, bad, args.image_root), mode, bad), {}
    refuse_if_nothing_scored(path, len(rep["predictions"]), rep["bad"])
    print(f"{'family':14s} {'n':>4s}  {'accuracy':>10s}  {'Wilson 95%':>14s}  {'word-F1':>7s}  {'chance':>6s}")
    for f, n in rep["n"].items():
        c, (lo, hi) = f"{base[f]:6.3f}" if f in base else "     -", rep["interval"][f]
        print(f"{f:14s} {n:4d}  {plus_minus(rep['accuracy'][f], (lo, hi)):>10s}  [{lo:.3f}, {hi:.3f}]  "
              f"{rep['word_f1'][f]:7.3f}  {c}")
    print(f"{rep['bad']}; {rep['seconds']:.1f} s; ± is the larger side of the Wilson 95% interval")
    settings = {"ckpt": args.ckpt, "eval": path, "think": args.think, "blank": args.blank}
    if args.out:
        data.write_json(args.out, {**settings, **rep, "chance": base})
        print(f"report: {args.out}")
        return rep
    # a manifest's reports carry its name: eval/ocr.json stays the synthetic family's
    source = "" if os.path.isdir(path) else Path(path).stem + "."
    written = []
    for f in rep["n"]:
        written.append(os.path.join(out_dir, report_name(source + f, args.think, args.blank) + ".json"))
        data.write_json(written[-1], {**settings, "family": f, "n": rep["n"][f], "accuracy": rep["accuracy"][f],
                                      "interval": rep["interval"][f], "word_f1": rep["word_f1"][f], "chance": base.get(f),
                                      "bad": rep["bad"], "predictions": [p for p in rep["predictions"] if p["family"] == f]})
    print(f"reports: {', '.join(written)}")
    return rep


def cli(argv):
    ap = Parser(prog="sample.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--ckpt", required=True, help="a checkpoint folder (ours or an official SAIL-VL2 one)")
    ap.add_argument("--image", nargs="+", action="extend", default=[],
                    help="image file(s); each gets an <image> placeholder (repeat the option to add more)")
    ap.add_argument("--video", nargs="+", action="extend", default=[],
                    help="video file(s), sampled to 16 frames (repeat the option to add more)")
    ap.add_argument("--prompt", default="Describe the image.", help="the question (default: %(default)s)")
    ap.add_argument("--think", action="store_true", help="thinking mode: ask for <think>...</think> + \\boxed{}")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default 256; eval: per family (DIRECT_NEW_TOKENS / THINK_NEW_TOKENS)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (eval is always greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off; not in eval)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (not in eval)")
    ap.add_argument("--eval", default=None, help="score a synthetic-data folder, a JSONL manifest or a VLMEvalKit TSV")
    ap.add_argument("--blank", action="store_true", help="eval: every image and video frame white (blindness)")
    ap.add_argument("--limit", type=int, default=None, help="eval: first N records (default: EVAL_LIMIT = 128 per family of a "
                                                            "synthetic folder, all of a manifest or TSV)")
    ap.add_argument("--batch-size", type=int, default=32, help="eval: prompts per generate call")
    ap.add_argument("--out", default=None, help="eval: one combined JSON report here instead of <ckpt>/eval/")
    ap.add_argument("--image-root", default="", help="eval of a manifest: the folder its image and video paths are "
                    "relative to (the training option --image_root; default: the manifest's folder)")
    ap.add_argument("--device", default=default_device(), help="cuda | cpu (default: cuda when present)")
    args = ap.parse_args(data.dashed_options(sys.argv[1:] if argv is None else argv))
    for flag, paths in (("--image", args.image), ("--video", args.video), ("--eval", [args.eval] if args.eval else [])):
        for p in paths:
            if not os.path.exists(p):
                raise UsageError(f"{flag} {p}: no such file or folder")
    if pictures := [v for v in args.video if Path(v).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp")]:
        raise UsageError(f"--video {pictures[0]}: a picture (one frame, read as a still video): give it as --image")
    if any(v is not None and v < 1 for v in (args.limit, args.batch_size, args.max_new_tokens)):
        raise UsageError("--limit, --batch-size and --max-new-tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:                                 # NaN fails too
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1] (1 = off)")
    given = lambda *keys: ", ".join(f"--{k.replace('_', '-')}" for k in keys if getattr(args, k) != ap.get_default(k))  # noqa: E731
    if args.eval and (ignored := given("image", "video", "prompt", "temperature", "top_p", "seed")):
        raise UsageError(f"--eval answers each record's own question and media, greedily: {ignored} do not apply")
    if args.image_root and (not os.path.isdir(args.image_root) or args.eval and (os.path.isdir(args.eval)
                                                                              or args.eval.endswith(".tsv"))):
        raise UsageError(f"--image-root {args.image_root}: a folder, for --eval of a manifest (.jsonl) only")
    if not args.eval and (ignored := given("blank", "limit", "batch_size", "out", "image_root")):
        raise UsageError(f"{ignored}: only with --eval")
    try:
        device = modeling.parse_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    if device.index is not None:               # what CUDA makes on "cuda" (streams, graphs)
        torch.cuda.set_device(device)          # goes to the current device (plain "cuda" is the current one)
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
