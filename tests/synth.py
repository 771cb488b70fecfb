"""The synthetic miniature dataset the tiny default trains on: a test fixture and a tool, not the paper.

SAIL-VL2's recipe (train_stage.py) runs at the tiny preset on this data when no real data is
given: eleven task families (text, caption, caption QA, OCR, chart, counting with and without a
chain, arithmetic with and without a chain, two-image questions, video motion) of flat shapes,
words, charts and moving shapes in a small regular language, with an eval split of new samples (none
identical to a training sample: shapes drawn at jittered places, text at jittered sizes and places), the RL
prompt splits (§4.2.3, new in the same way), and a byte-level BPE trained on it (`train_bpe`, HF `tokenizer.json`
layout). Same seed and size, same bytes.

    python tests/synth.py --out data_synth              # the default folder, 1024 train samples per family
    python tests/synth.py --out /tmp/s --size 16        # the tests' size
    python tests/synth.py charts --out /tmp/charts      # §3.1's chart data alone (bar / line / pie + QA)
    python tests/synth.py overlap                       # check: held-out / RL samples identical to a train one

The components never import this file: data.ensure_synth runs it in a subprocess when the default
folder is missing. What they read of the data (the family names, its words) is in data.py.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import repo_path

repo_path.add_repo_root()              # the project's files, after transformers has bound HF's `kernels`

import av  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from data import (CHART_KINDS, CHART_LABELS, COLOURS, COLS, DEFAULT_SYNTH_DIR, DEFAULT_SYNTH_SIZE, DIRECTIONS, IMAGE,  # noqa: E402
                  PLACEHOLDER_RE, QWEN_PATTERN, ROWS, SHAPES, SPECIAL_TOKENS, SYNTH_VERSION, VIDEO, VIDEO_RE, WORDS,
                  byte_to_unicode, manifest_records, render_chat, video_prompt)
from curate import template_qa  # noqa: E402
import train_stage  # noqa: E402
from data import InputError, UsageError  # noqa: E402
from sample import BOXED, Parser, wilson_interval  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The BPE trainer (the tokenizer shipped with the data)

def train_bpe(texts, vocab_size: int) -> dict:
    """A byte-level BPE trained on `texts`, as an HF `tokenizer.json` dict that `load_tokenizer`
    reads: ids 0..255 the bytes, 256.. SPECIAL_TOKENS (as in the embedded default, so the special
    ids do not move), then one token per merge up to `vocab_size`. Qwen's pre-tokenizer splits the
    text first, so merges never cross its word boundaries. Greedy: at each step the most frequent
    adjacent pair over the words (ties: the smallest pair) is merged, which is HF's BpeTrainer rule.
    The synthetic data ships one (`make_synth`): its small language then costs ~2.5x fewer tokens
    than bytes, so the tiny model reads and learns ~2.5x more samples per second."""
    import regex                                    # tiktoken's own dependency (always installed)
    pattern = regex.compile(QWEN_PATTERN)
    words = Counter(tuple(piece.encode("utf-8")) for t in texts for piece in pattern.findall(t))
    words = {w: c for w, c in words.items() if len(w) > 1}
    b2u = byte_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})   # so HF keeps their ids too
    spell = {b: b2u[b] for b in range(256)}          # token id -> its byte-level spelling
    merges, next_id = [], 256 + len(SPECIAL_TOKENS)
    seqs = {w: list(w) for w in words}
    while next_id < vocab_size:
        pairs = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        spell[next_id] = spell[a] + spell[b]
        vocab[spell[next_id]] = next_id
        merges.append(f"{spell[a]} {spell[b]}")
        for w, seq in seqs.items():                  # apply the merge to every word
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(next_id)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
        next_id += 1
    return {"version": "1.0", "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "added_tokens": [{"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)],
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}


# ----------------------------------------------------------------------------------------------
# The generator: real PNG / MP4 files and JSONL manifests, generated deterministically
#
# Layout of DIR (`python tests/synth.py --out DIR`, or `data.ensure_synth(DIR)` on first use):
#   DIR/synth.json                         stamp: version, seed, size, samples per family and split
#   DIR/{family}/train.jsonl, eval.jsonl   manifests (eval: its own random draws, none identical to train's)
#   DIR/{family}/images/{split}_{i:05d}[_a|_b].png,  DIR/video/videos/{split}_{i:05d}.mp4
#   DIR/tokenizer.json                     a byte-level BPE trained on the train split (`train_bpe`)
# The language is small and regular ("a red circle at the top left.") so a tiny model visibly learns
# it in minutes; its own BPE makes a sample ~2x shorter than bytes. Every record but caption/text
# carries a short "answer" (RL rewards, evaluation); CoT records (math, count_cot) carry "think": true.

SYNTH_VOCAB = 512                  # the tiny presets' vocab_size: bytes + specials + 242 merges
SYNTH_SYSTEM = "You are UniVL, a helpful assistant."   # the tiny presets' system prompt (model.preset_config)
# RL prompts (§4.2.3) no SFT stage reads: count_cot/rl.jsonl (4 x size scenes) and count_cot/rl_eval.jsonl
# (size // 2 held-out scenes); like eval, each sample is new: not a train or eval sample, not an RL prompt
# drawn before it (draw_new). Version 3 drew each split independently: at the default size 318 of its 4,096
# RL prompts repeated one another and 60 of its 512 held-out ones were RL prompts too.
RL_SPLITS = {"count_cot": {"rl": 4, "rl_eval": 0.5}}
CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Write a short caption.")
JITTER = 0.05                      # a scene object's centre: up to this fraction of a cell off the cell's centre
SHIFT = 0.02                       # printed text's centre: up to this fraction of the image's side off its centre
MAX_DRAWS = 1000                   # draws of one held-out / RL sample before a family is called too small to split


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's embedded font (no system fonts, no download)."""
    return ImageFont.load_default(size=size)


# Charts (§3.1's synthetic chart data; `python tests/synth.py charts`, and the chart family): drawn with Pillow, values printed on the chart so every QA
# answer is readable from the pixels.


def render_chart(kind: str, labels: list, values: list, size: int = 224) -> Image.Image:
    """A bar, line or pie chart of positive integer `values`, with value and category labels."""
    if kind not in CHART_KINDS:
        raise ValueError(f"chart kind must be one of {CHART_KINDS}, got {kind!r}")
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    f = font(max(8, size // 16))
    palette = list(COLOURS.values())
    n, top = len(values), max(values)
    left, right, upper, lower = size * 0.08, size * 0.96, size * 0.12, size * 0.84
    if kind == "pie":
        box = (size * 0.04, size * 0.2, size * 0.56, size * 0.72)
        start = -90.0
        for k, v in enumerate(values):
            sweep = 360.0 * v / sum(values)
            d.pieslice(box, start, start + sweep, fill=palette[k % len(palette)], outline="white")
            start += sweep
        for k, (lab, v) in enumerate(zip(labels, values)):
            y = size * 0.2 + k * size * 0.1
            d.rectangle((size * 0.6, y, size * 0.66, y + size * 0.06), fill=palette[k % len(palette)])
            d.text((size * 0.69, y - size * 0.01), f"{lab} {v}", fill="black", font=f)
        return img
    d.line((left, lower, right, lower), fill="black", width=1)
    step = (right - left) / n
    points = []
    for k, (lab, v) in enumerate(zip(labels, values)):
        cx = left + step * (k + 0.5)
        y = lower - (lower - upper) * v / top
        if kind == "bar":
            d.rectangle((cx - step * 0.3, y, cx + step * 0.3, lower), fill=palette[k % len(palette)])
        points.append((cx, y))
        d.text((cx, y - 2), str(v), fill="black", font=f, anchor="md")
        d.text((cx, lower + 3), lab, fill="black", font=f, anchor="ma")
    if kind == "line":
        d.line(points, fill=palette[2], width=2)
        for cx, y in points:
            d.ellipse((cx - 3, y - 3, cx + 3, y + 3), fill=palette[0])
    return img


def chart_values(rng: random.Random, n: int) -> tuple:
    """n distinct labels and values 1..9 with a unique largest and smallest (so QA answers are unique)."""
    labels = rng.sample(CHART_LABELS, n)
    values = rng.sample(range(1, 10), n)
    return labels, values


def chart_qa(kind: str, labels: list, values: list) -> list:
    """(question, answer) pairs answerable from the drawn chart."""
    item = {"bar": "bar", "line": "point", "pie": "slice"}[kind]
    qa = [(f"Which {item} has the largest value?", labels[values.index(max(values))]),
          (f"Which {item} has the smallest value?", labels[values.index(min(values))]),
          (f"How many {item}s are there?", str(len(values)))]
    qa += [(f"What is the value of {lab}?", str(v)) for lab, v in zip(labels, values)]
    return qa


def make_charts(out_dir, n: int, seed: int = 0, size: int = 224, progress: bool = True) -> Path:
    """Write n chart PNGs and charts.jsonl: the chart data and all its QA pairs as one conversation."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng, lines = random.Random(seed), []
    for i in tqdm(range(n), desc="charts", disable=data.no_bar(progress)):
        kind = CHART_KINDS[i % len(CHART_KINDS)]
        labels, values = chart_values(rng, rng.randint(3, 5))
        name = f"images/chart_{i:05d}.png"
        render_chart(kind, labels, values, size).save(out_dir / name)
        conv = []
        for k, (q, a) in enumerate(chart_qa(kind, labels, values)):
            conv += [{"from": "human", "value": (IMAGE + "\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
        lines.append({"image": name, "chart": {"kind": kind, "labels": labels, "values": values},
                      "conversations": conv, "task": "chart"})
    path = out_dir / "charts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def draw_shape(d: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float):
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def scene_image(objects: list, size: int = 112, rng: random.Random = None) -> Image.Image:
    """White canvas with (colour, shape, row, col) objects in a 3x3 grid of cells: centred, or with `rng`
    moved up to JITTER of a cell off its centre and sized 0.33-0.37 of a cell, each object inside its cell
    (so the held-out splits are new pictures, not the training scenes' pixels again)."""
    img = Image.new("RGB", (size, size), "white")
    d, cell = ImageDraw.Draw(img), size / 3
    for colour, shape, row, col in objects:
        dx, dy, r = (rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER), rng.uniform(0.33, 0.37)) if rng \
            else (0.0, 0.0, 0.35)
        draw_shape(d, shape, colour, (COLS.index(col) + 0.5 + dx) * cell, (ROWS.index(row) + 0.5 + dy) * cell, cell * r)
    return img


def scene_caption(objects: list) -> str:
    return " and ".join(f"a {c} {s} at the {r} {col}" for c, s, r, col in objects) + "."


def random_objects(rng: random.Random, n: int, shape: str = None) -> list:
    cells = rng.sample([(r, c) for r in ROWS for c in COLS], n)
    return [(rng.choice(list(COLOURS)), shape or rng.choice(SHAPES), r, c) for r, c in cells]


def text_image(text: str, size: tuple, font_size: int, rng: random.Random = None) -> Image.Image:
    """Black text centred on white; with `rng` the font size moves by up to 2 and the centre by up to
    SHIFT of the image's side, in whole pixels (23 words and 243 expressions: their held-out samples are
    new renderings of what training shows)."""
    (w, h), x, y = size, 0, 0
    if rng:
        font_size += rng.randint(-2, 2)
        x, y = rng.randint(-round(SHIFT * w), round(SHIFT * w)), rng.randint(-round(SHIFT * h), round(SHIFT * h))
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((w // 2 + x, h // 2 + y), text, fill="black", font=font(font_size), anchor="mm")
    return img


def write_video(path, frames: list, fps: int = 8):
    """Frames (PIL, same even size) to an MPEG-4 Part 2 MP4 (single-threaded: byte-deterministic)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.bit_rate = 600_000
        stream.codec_context.thread_count = 1
        for im in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(im)))
        container.mux(stream.encode())


def _count_words(objects: list, shape: str) -> tuple:
    n = len(objects)
    return n, f"There {'is' if n == 1 else 'are'} {n} {shape}{'' if n == 1 else 's'}."


def _conv(question: str, answer: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}


# One generator per task family: (rng, media path stem relative to the family dir, family dir) -> record.
def gen_text(rng, stem, root):
    sentences = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.randrange(5)
        if kind == 0:
            c, s, r, col = random_objects(rng, 1)[0]
            sentences.append(f"a {c} {s} is at the {r} {col}.")
        elif kind == 1:
            n, shape = rng.randint(2, 6), rng.choice(SHAPES)
            sentences.append(f"there are {n} {rng.choice(list(COLOURS))} {shape}s.")
        elif kind == 2:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            sentences.append(f"{a} plus {b} is {a + b}.")
        elif kind == 3:
            sentences.append(f"the word is {rng.choice(WORDS)}.")
        else:
            sentences.append(f"the {rng.choice(list(COLOURS))} {rng.choice(SHAPES)} moves {rng.choice(list(DIRECTIONS))}.")
    return {"text": " ".join(sentences), "task": "text"}


def gen_caption(rng, stem, root):
    objects = random_objects(rng, rng.randint(1, 2))
    scene_image(objects, rng=rng).save(root / f"{stem}.png")
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\n{rng.choice(CAPTION_PROMPTS)}", scene_caption(objects)),
            "task": "caption"}


def gen_caption_qa(rng, stem, root):
    objects = random_objects(rng, rng.randint(1, 2))
    scene_image(objects, rng=rng).save(root / f"{stem}.png")
    q, a = rng.choice(template_qa(scene_caption(objects)))
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\n{q}", a), "answer": a.rstrip(".").removeprefix("a ")
            .removeprefix("at the "), "task": "caption_qa"}


def gen_ocr(rng, stem, root):
    word = rng.choice(WORDS)
    text_image(word, (112, 112), 26, rng).save(root / f"{stem}.png")
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\nWhat word is written in the image?", word),
            "answer": word, "task": "ocr"}


def gen_chart(rng, stem, root):
    kind = rng.choice(CHART_KINDS)
    labels, values = chart_values(rng, rng.randint(3, 5))
    render_chart(kind, labels, values).save(root / f"{stem}.png")
    q, a = rng.choice(chart_qa(kind, labels, values))
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\n{q}", a), "answer": a,
            "chart": {"kind": kind, "labels": labels, "values": values}, "task": "chart"}


def gen_count(rng, stem, root):
    shape = rng.choice(SHAPES)
    objects = random_objects(rng, rng.randint(1, 6), shape)
    scene_image(objects, rng=rng).save(root / f"{stem}.png")
    n, sentence = _count_words(objects, shape)
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\nHow many {shape}s are there?", sentence), "answer": str(n),
            "task": "count"}


def gen_count_cot(rng, stem, root):
    """Counting with a chain that names every object: 1 to 9 objects (every cell of the grid), so
    the answer space is wide enough that guessing is rarely right (the RL stages train on it)."""
    shape = rng.choice(SHAPES)
    objects = random_objects(rng, rng.randint(1, 9), shape)
    scene_image(objects, rng=rng).save(root / f"{stem}.png")
    seen = ", ".join(f"a {c} {s} at the {r} {col}" for c, s, r, col in objects)
    n = len(objects)
    cot = f"<think>\nI see {seen}. That makes {n} {shape}{'' if n == 1 else 's'}.\n</think>\nThe answer is {BOXED}{n}}}."
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\nHow many {shape}s are there?", cot), "answer": str(n),
            "think": True, "task": "count_cot"}


def _arithmetic(rng, stem, root):
    op = rng.choice("+-x")
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if op == "-":
        a, b = max(a, b), min(a, b)
    value = {"+": a + b, "-": a - b, "x": a * b}[op]
    word = {"+": "plus", "-": "minus", "x": "times"}[op]
    text_image(f"{a} {op} {b}", (112, 112), 32, rng).save(root / f"{stem}.png")
    return a, op, b, word, value


def gen_math(rng, stem, root):
    a, op, b, word, value = _arithmetic(rng, stem, root)
    cot = f"<think>\nThe image shows {a} {op} {b}.\n{a} {word} {b} is {value}.\n</think>\nThe answer is {BOXED}{value}}}."
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\nWhat is the result of the expression in the image?", cot),
            "answer": str(value), "think": True, "task": "math"}


def gen_math_direct(rng, stem, root):
    *_, value = _arithmetic(rng, stem, root)
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\nWhat is the result of the expression in the image?",
                                            f"The answer is {BOXED}{value}}}."), "answer": str(value), "task": "math_direct"}


def gen_multi(rng, stem, root):
    (o1,), (o2,) = random_objects(rng, 1), random_objects(rng, 1)
    scene_image([o1], rng=rng).save(root / f"{stem}_a.png")
    scene_image([o2], rng=rng).save(root / f"{stem}_b.png")
    if rng.random() < 0.5:
        q, short = "Do the two images show the same shape?", "yes" if o1[1] == o2[1] else "no"
        a = short + "."
    else:
        first = rng.random() < 0.5
        c, s = (o1 if first else o2)[:2]
        if (o1 if not first else o2)[:2] == (c, s):
            q, short = f"Do both images show a {c} {s}?", "yes"
            a = "yes."
        else:
            q, short = f"Which image shows the {c} {s}?", "first" if first else "second"
            a = f"the {short} image."
    return {"image": [f"{stem}_a.png", f"{stem}_b.png"], **_conv(f"Image-1: {IMAGE}\nImage-2: {IMAGE}\n{q}", a),
            "answer": short, "task": "multi"}


def gen_video(rng, stem, root, n_frames: int = 16, size: int = 112):
    colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    r, frames = size * 0.12, []
    other = rng.uniform(0.3, 0.7) * size                      # position on the still axis
    for t in range(n_frames):
        along = size * (0.15 + 0.7 * t / (n_frames - 1))      # 15% -> 85% of the frame
        cx = (along if dx > 0 else size - along) if dx else other
        cy = (along if dy > 0 else size - along) if dy else other
        img = Image.new("RGB", (size, size), "white")
        draw_shape(ImageDraw.Draw(img), shape, colour, cx, cy, r)
        frames.append(img)
    write_video(root / f"{stem}.mp4", frames)
    answer = f"It moves to the {direction}." if dx else f"It moves {direction}."
    return {"video": f"{stem}.mp4", **_conv(f"{VIDEO}\nWhich way does the {colour} {shape} move?", answer),
            "answer": direction, "task": "video"}


SYNTH_FAMILIES = {f: globals()[f"gen_{f}"] for f in data.SYNTH_FAMILIES}     # family -> its generator


def synth_counts(size: int) -> dict:
    """{family: {split: samples}} for a given --size."""
    n_eval = max(8, size // 8)
    counts = {f: {"train": size * (8 if f == "text" else 1), "eval": n_eval * (8 if f == "text" else 1)}
              for f in SYNTH_FAMILIES}
    for f, splits in RL_SPLITS.items():
        counts[f].update({split: max(8, int(size * k)) for split, k in splits.items()})
    return counts


def synth_texts(root: Path) -> list:
    """The text the model reads from the train split: every conversation rendered with the chat
    template as the tiny presets render it (media placeholders dropped: they become special
    tokens), plus the plain-text records."""
    texts = []
    for path in sorted(Path(root).glob("*/train.jsonl")):
        for _, _, rec in manifest_records(path, "tokenizer", Counter(), progress=False):
            if rec.text is not None:
                texts.append(rec.text)
                continue
            turns = [(r, PLACEHOLDER_RE.sub("", VIDEO_RE.sub(lambda m: video_prompt(16), c))) for r, c in rec.turns]
            texts.append(render_chat(turns, SYNTH_SYSTEM, think=bool(rec.think)))
    return texts


def draw_new(gen, rng, stem, root, seen: set, new: bool) -> dict:
    """gen's next sample, drawn again (its media overwritten) while `new` and it is identical to one in
    `seen`; its key is added to `seen`. Train may repeat itself; a held-out or RL sample repeats no
    sample of train or of an earlier split, nor one of its own split (eval, then rl, then rl_eval)."""
    for _ in range(MAX_DRAWS):
        rec = gen(rng, stem, root)
        key = sample_key(rec, root)
        if not (new and key in seen):
            seen.add(key)
            return rec
    raise RuntimeError(f"{root.name}: no new sample in {MAX_DRAWS} draws; the family is too small for --size")


def make_synth(out, seed: int = 0, size: int = DEFAULT_SYNTH_SIZE, progress: bool = True) -> Path:
    """Generate the synthetic dataset into `out` (which must not exist): files are written to a
    temporary sibling folder, then renamed, so a crash never leaves half a dataset behind."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; synthetic data is written to a new folder only")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts = synth_counts(size)
    try:
        for family, gen in tqdm(SYNTH_FAMILIES.items(), desc="synth", disable=data.no_bar(progress)):
            media = tmp / family / ("videos" if family == "video" else "images")
            media.mkdir(parents=True)
            seen = set()                     # every sample of the family drawn so far (sample_key)
            for split, n in counts[family].items():
                rng = random.Random(f"{seed}/{family}/{split}")
                lines = [draw_new(gen, rng, f"{media.name}/{split}_{i:05d}", tmp / family, seen, split != "train")
                         for i in range(n)]
                (tmp / family / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines),
                                                             encoding="utf-8")
        (tmp / "tokenizer.json").write_text(json.dumps(train_bpe(synth_texts(tmp), SYNTH_VOCAB)), encoding="utf-8")
        stamp = {"version": SYNTH_VERSION, "seed": seed, "size": size, "samples": counts}
        (tmp / "synth.json").write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_synth(out=DEFAULT_SYNTH_DIR, seed: int = 0, size: int = DEFAULT_SYNTH_SIZE, progress: bool = True) -> Path:
    """data.ensure_synth, generating in this process (make_synth) rather than in a subprocess."""
    return data.ensure_synth(out, seed, size, progress, make=make_synth)


def sample_key(rec: dict, root: Path) -> tuple:
    """A sample's identity: its record without the media names, and its media files' bytes as their
    digests (two samples are identical when their keys are, whatever their files are called)."""
    rec = dict(rec)
    media = [rec.pop(k) for k in ("image", "video") if k in rec]
    paths = [p for m in media for p in ([m] if isinstance(m, str) else m)]
    return (json.dumps(rec, sort_keys=True), tuple(hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths))


def sample_keys(manifest: Path) -> list:
    """sample_key of every line of a synthetic manifest."""
    return [sample_key(json.loads(line), manifest.parent) for line in manifest.read_text(encoding="utf-8").splitlines()]


def split_keys(root) -> dict:
    """{family folder: {split: its sample keys}} of a synthetic folder, each manifest read once."""
    return {train.parent: {m.stem: sample_keys(m) for m in sorted(train.parent.glob("*.jsonl"))}
            for train in sorted(Path(root).glob("*/train.jsonl"))}


def split_overlap(root, keys=None) -> dict:
    """{family: {split: (in train, in rl, distinct, samples)}} of a synthetic folder: per split other than
    train, its samples identical to a train sample, to an RL prompt (None without an RL split, or for it),
    and its distinct samples (all 0, 0 and every sample since version 4 of the generator: draw_new).
    `keys`: split_keys(root), when the caller has them."""
    out = {}
    for family, splits in (keys or split_keys(root)).items():
        seen, rl = set(splits["train"]), set(splits["rl"]) if "rl" in splits else None
        for split, ks in splits.items():
            if split != "train":
                in_rl = sum(k in rl for k in ks) if rl is not None and split != "rl" else None
                in_train = sum(k in seen for k in ks)
                out.setdefault(family.name, {})[split] = (in_train, in_rl, len(set(ks)), len(ks))
    return out


def accuracy_seen_and_unseen(root, predictions, keys=None) -> dict:
    """{(family, think): ((correct, n) on held-out samples identical to a train sample, (correct, n) on
    the others)} of one stage's predictions file (tests/recipe.py's predictions/STAGE.jsonl; its blank-image
    rows left out). `keys`: split_keys(root), when the caller has them."""
    in_train = {}
    for family, splits in (keys or split_keys(root)).items():
        seen = set(splits["train"])
        for split, ks in splits.items():
            in_train[(family / f"{split}.jsonl").resolve()] = [k in seen for k in ks]
    out = {}
    for line in Path(predictions).read_text(encoding="utf-8").splitlines():
        p = json.loads(line)
        path, _, number = p["where"].rpartition(":")
        flags = in_train.get(Path(path).resolve())
        if p["blank"] or flags is None:
            continue
        tally = out.setdefault((p["family"], p["think"]), [[0, 0], [0, 0]])[0 if flags[int(number) - 1] else 1]
        tally[0] += bool(p["correct"])
        tally[1] += 1
    return {k: (tuple(a), tuple(b)) for k, (a, b) in sorted(out.items())}


def overlap_main(argv):
    p = Parser(prog="tests/synth.py overlap", description="How many samples of each held-out and RL split are "
                                "identical to a training sample or an RL prompt (record and media bytes), and how "
                                "many are distinct. With --predictions: a stage's accuracy on the held-out samples "
                                "that are training samples too and on the others.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_SYNTH_DIR, help="the synthetic folder to read")
    p.add_argument("--predictions", nargs="+", default=[], metavar="FILE",
                   help="predictions files of a recipe run (OUT/recipe/predictions/STAGE.jsonl)")
    args = p.parse_args(argv)
    if not Path(args.out, "synth.json").is_file():
        raise UsageError(f"--out {args.out}: not a synthetic data folder (no synth.json)")
    keys = split_keys(args.out)                  # every manifest and media file read and hashed once
    if not args.predictions:
        print(f"{'family':12s} {'split':8s} {'in train':>9s} {'in rl':>6s} {'distinct':>9s} {'samples':>8s}")
        for family, splits in split_overlap(args.out, keys).items():
            for split, (same, in_rl, distinct, n) in splits.items():
                print(f"{family:12s} {split:8s} {same:9d} {'-' if in_rl is None else in_rl:>6} {distinct:9d} {n:8d}")
    for f in args.predictions:
        if not Path(f).is_file():
            raise UsageError(f"--predictions {f}: no such file")
        print(f"{f}: accuracy on held-out samples that are training samples too | on the others (95% Wilson)")
        for (family, think), tallies in accuracy_seen_and_unseen(args.out, f, keys).items():
            cells = [f"{c / n:.2f} [{lo:.2f}, {hi:.2f}] of {n:3d}" if n else f"{'-':>22s}"
                     for c, n in tallies for lo, hi in [wilson_interval(c, n)]]
            print(f"  {family + (' (thinking)' if think else ''):22s} {cells[0]} | {cells[1]}")


# ----------------------------------------------------------------------------------------------
# command line

def written(make, out):
    """make(): the folder written; an --out that exists or cannot be written is one error line naming it."""
    try:
        return make()
    except OSError as e:
        if e.errno is None:                     # make_synth's own refusal of an existing folder, which says so
            raise InputError(str(e)) from None
        # below a file, on a read-only disk, ...: one line, no traceback
        raise UsageError(f"--out {out}: cannot write there ({e.strerror}: {e.filename})") from None


def at_least_1(args, names):
    for name in names:
        if getattr(args, name) < 1:             # 0 would write empty manifests, < 0 print negative counts
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")


def charts_main(argv):
    p = Parser(prog="tests/synth.py charts", description="Render bar / line / pie charts to PNG "
                                "with their data and QA pairs (§3.1's synthetic chart data): DIR/images/*.png and "
                                "DIR/charts.jsonl.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,      # no "(default: None)" in --help
                   help="output folder (required)")
    p.add_argument("--n", type=int, default=100, help="charts to render")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--size", type=int, default=224, help="chart side in pixels")
    args = p.parse_args(argv)
    at_least_1(args, ("n", "size"))
    print(f"wrote {written(lambda: make_charts(args.out, args.n, args.seed, args.size), args.out)}")


def synth_main(argv):
    p = Parser(prog="tests/synth.py", description="Build the synthetic miniature dataset (PNG, "
                                "MP4, JSONL manifests and a BPE tokenizer) that the tiny default recipe trains and "
                                "evaluates on, into a new folder. `tests/synth.py charts --help`: §3.1's chart "
                                "data alone; `tests/synth.py overlap --help`: held-out samples that repeat "
                                "training ones.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_SYNTH_DIR, help="folder to create (must not exist)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--size", type=int, default=DEFAULT_SYNTH_SIZE, help="train samples per task family")
    args = p.parse_args(argv)
    at_least_1(args, ("size",))
    out = written(lambda: make_synth(args.out, args.seed, args.size), args.out)
    print(f"wrote {out}: {json.loads((out / 'synth.json').read_text())['samples']}")


def main(argv=None):
    """A mistake is one line on stderr, no traceback (train_stage.one_line_errors)."""
    argv = sys.argv[1:] if argv is None else argv
    tools = {"charts": charts_main, "overlap": overlap_main}
    run, argv = (tools[argv[0]], argv[1:]) if argv[:1] and argv[0] in tools else (synth_main, argv)
    train_stage.one_line_errors(lambda: run(argv), "tests/synth.py")


if __name__ == "__main__":
    main()
