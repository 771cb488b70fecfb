"""Tests of data.py: tokenizer parity with HF `tokenizers`, univl-chat strings and label masks, the
official tiling rule, video sampling, bad-input accounting, streams, curation and synthetic data.

References are independent of data.py: HF tokenizers for the tokenizer, the facts-file text for the
template and the tiling rule (re-implemented here), PIL crops for pixels, hand-counted label spans.
"""
import hashlib
import json
import pickle
import random
import unicodedata
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import curate
import data
import synth
import vit
from data import DataConfig, DataError

SYS = "你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。"
THINK = ("You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
         "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}.")


# ----------------------------------------------------------------------------------------------
# tokenizer: parity with HF tokenizers on a BPE trained here with Qwen2's pre-tokenizer settings

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")   # copied from Qwen2's tokenizer.json


def mixed_corpus(rng: random.Random, n: int) -> list:
    english = ["The quick brown fox jumps over the lazy dog.", "It's what we'LL DO, isn't it? They've gone.",
               "Numbers like 3.14159 and 1,000,000 or 2024-11-26 appear.", "HELLO World!!! ... ???"]
    cjk = ["你好世界，这是一个测试。", "我们今天去公园散步吧！", "日本語のテキストも少し。", "한국어 문장입니다."]
    emoji = ["😀🎉👍🏽", "family: 👨‍👩‍👧‍👦 flag: 🇯🇵", "❤️‍🔥 ok"]
    code = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }", "if x:\n\tpass\r\n"]
    spaces = ["a   b\t\tc", "\n\n\n", "trailing   ", "   leading", " \n \n  x", "\u00a0nbsp\u3000ideo"]
    nfc = ["café", "cafe\u0301", "Å vs A\u030a", "ﬁ ligature"]
    pools = english + cjk + emoji + code + spaces + nfc
    syllables = ["ka", "ro", "tin", "mel", "sha", "qu", "est", "ing", "tion", "pre", "un", "ly", "ed", "ver"]
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    out = []
    for _ in range(n):
        k = rng.randint(1, 4)
        out.append("".join(rng.choice(pools) + rng.choice(["", " ", "\n", "  "]) for _ in range(k)))
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(rng.randint(2, 8))]
        out.append(" ".join(w.capitalize() if rng.random() < 0.2 else w for w in words) + rng.choice(".!?,:"))
        out.append("".join(rng.choices(hanzi, k=rng.randint(2, 10))) + str(rng.randint(0, 99999)))
    return pools + out


def qwen_style_bpe(corpus: list, vocab_size: int):
    """An HF `tokenizers` byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder, trained on `corpus`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    tk = qwen_style_bpe(mixed_corpus(random.Random(0), 3000), 1500)
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"])
    tk.add_tokens(["<think>", "</think>"])           # Qwen3 marks these special=false
    folder = tmp_path_factory.mktemp("hf_tok")
    tk.save(str(folder / "tokenizer.json"))
    assert len(json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]) > 1000
    return tk, folder


def parity_strings() -> list:
    rng = random.Random(1)
    strings = mixed_corpus(rng, 400)
    chars = "aZ09 \n\t\r'’你好😀é\u0301<>|_-.,!?{}()\\"
    strings += ["".join(rng.choice(chars) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    strings += ["<|im_start|>user\nHi<think>x</think><|im_end|>", "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nq",
                "x<|endoftext|>y", "", " ", "it's IT'S It'Ll"]
    return strings


def test_tokenizer_json_parity_and_roundtrip(hf_tokenizer):
    tk, folder = hf_tokenizer
    tok = data.load_tokenizer(folder)
    for s in parity_strings():
        ids = tk.encode(s).ids
        assert data.encode(tok, s) == ids, s
        assert tok.decode(ids) == unicodedata.normalize("NFC", s) == tk.decode(ids, skip_special_tokens=False)


def test_vocab_merges_folder_parity(hf_tokenizer, tmp_path):
    tk, _ = hf_tokenizer
    tk.model.save(str(tmp_path))                     # vocab.json + merges.txt, the slow-tokenizer form
    added = {t.content: i for i, t in tk.get_added_tokens_decoder().items()}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["added_tokens.json", "merges.txt", "vocab.json"]
    tok = data.load_tokenizer(tmp_path)
    for s in parity_strings():
        assert data.encode(tok, s) == tk.encode(s).ids, s


def test_tokenizer_rejects_ids_out_of_merge_order(tmp_path):
    b2u = data.byte_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({"ab": 257, "abc": 256})            # merge #1 makes a smaller id than merge #0
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab c\n")
    with pytest.raises(ValueError, match="increase with priority"):
        data.load_tokenizer(tmp_path)


def test_default_tokenizer_and_special_ids():
    tok = data.load_tokenizer(None)
    ids = data.special_ids(tok)
    assert [tok.encode_single_token(t) for t in data.SPECIAL_TOKENS] == list(range(256, 256 + len(data.SPECIAL_TOKENS)))
    assert ids.img_context == 263 and ids.eos == ids.im_end == 258 and ids.pad == ids.endoftext == 256
    assert data.encode(tok, "hi<|im_end|>") == [104, 105, 258]
    text = "héllo 你好 😀\n\t<think>x</think>"
    assert tok.decode(data.encode(tok, text)) == text
    assert len(data.encode(tok, "你")) == 3            # one id per UTF-8 byte


def test_tokenizer_pickles(hf_tokenizer):
    tok = data.load_tokenizer(hf_tokenizer[1])
    tok2 = pickle.loads(pickle.dumps(tok))
    assert type(tok2) is type(tok) is data.NFCEncoding
    assert data.encode(tok2, "cafe\u0301 😀") == data.encode(tok, "cafe\u0301 😀")


# ----------------------------------------------------------------------------------------------
# chat template: byte-identical to the official chat_template.jinja's output

def test_template_single_turn_generation_prompt():
    got = data.render_chat([("user", "<image>\nWhat is this?")], add_generation_prompt=True)
    assert got == (f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
                   "<|im_start|>assistant\n")


def test_template_multi_turn_and_thinking():
    turns = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]
    assert data.render_chat(turns, system="S") == ("<|im_start|>system\nS<|im_end|><|im_start|>user\nQ1<|im_end|>"
                                                   "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|>"
                                                   "<|im_start|>assistant\nA2<|im_end|>")
    got = data.render_chat([("user", "Q")], think=True, add_generation_prompt=True)
    assert got == f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\nQ\n{THINK}<|im_end|><|im_start|>assistant\n"


def save_png(path, size=(112, 112), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def write_gray_video(path, levels, fmt="mp4", size=64, pts=None):
    """A video whose frame i is a flat gray of levels[i] (frames encode their index)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.bit_rate = 2_000_000
        if pts is not None:
            s.codec_context.time_base = s.time_base = __import__("fractions").Fraction(1, 1000)
        for i, level in enumerate(levels):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], s.time_base
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def test_template_image_multi_image_video_via_samples(tmp_path):
    tok = data.load_tokenizer(None)
    cfg = DataConfig(image_size=112, max_tiles=4, num_frames=3)          # 16 tokens per tile
    save_png(tmp_path / "a.png")                                          # 1 tile
    save_png(tmp_path / "b.png", size=(224, 112))                         # 2x1 grid + thumbnail = 3 tiles
    write_gray_video(tmp_path / "v.mp4", [10, 60, 110, 160, 210, 250])
    img = lambda n: "<img>" + "<IMG_CONTEXT>" * n + "</img>"              # noqa: E731
    lines = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red."}]},
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"},
                                                         {"from": "gpt", "value": "no."}]},
        {"video": "v.mp4", "messages": [{"role": "user", "content": "<video>\nWhere?"}, {"role": "assistant", "content": "up."}]},
        {"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                                           {"role": "assistant", "content": "A"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "No placeholder"}, {"from": "gpt", "value": "ok"}]},
    ]
    expected_users = [f"{img(16)}\nWhat?", f"Image-1: {img(16)}\nImage-2: {img(48)}\nSame?",
                      f"Frame1: {img(16)}\nFrame2: {img(16)}\nFrame3: {img(16)}\nWhere?", f"{img(16)}\nQ",
                      f"{img(16)}\nNo placeholder"]
    answers = ["red.", "no.", "up.", "A", "ok"]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = data.JsonlDataset(tmp_path / "m.jsonl", tok, cfg)
    for i, (user, answer) in enumerate(zip(expected_users, answers)):
        s = ds[i]
        want = (f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{user}<|im_end|>"
                f"<|im_start|>assistant\n{answer}<|im_end|>")
        assert tok.decode(s["input_ids"].tolist()) == want
        n_ctx = int((s["input_ids"] == 263).sum())
        assert n_ctx == s["n_visual_tokens"] == s["pixel_values"].shape[0] * 16
    assert ds[1]["tiles"] == [1, 3] and ds[1]["image_tokens"] == [16, 48] and ds[1]["n_images"] == 2
    assert ds[2]["pixel_values"].shape == (3, 3, 112, 112) and ds[2]["tiles"] == [1, 1, 1]


# ----------------------------------------------------------------------------------------------
# label masks per mode, hand-counted: with the byte tokenizer every ASCII character is one token

def chat_record(tmp_path, reply, question="Q", **extra):
    line = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}], **extra}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    return tmp_path / "m.jsonl"


def expected_labels(tok, text, trained_spans):
    """-100 everywhere but the character spans (start, end) of `text` (all ASCII or special tokens)."""
    ids = data.encode(tok, text)
    labels = [-100] * len(ids)
    # map char positions to token positions: specials are one token per tag
    pos, k = [], 0
    while k < len(text):
        tag = next((t for t in data.SPECIAL_TOKENS if text.startswith(t, k)), None)
        pos.append(k)
        k += len(tag) if tag else 1
    for start, end in trained_spans:
        for t, p in enumerate(pos):
            if start <= p < end:
                labels[t] = ids[t]
    return ids, labels


def check_mode(tmp_path, mode, answer, trained_text, think=False, question="Q", **extra):
    tok = data.load_tokenizer(None)
    s = data.JsonlDataset(chat_record(tmp_path, answer, question, **extra), tok, DataConfig(label_mode=mode, system="S"))[0]
    user = f"{question}\n{THINK}" if think else question
    text = f"<|im_start|>system\nS<|im_end|><|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n{answer}<|im_end|>"
    start = text.index(trained_text, len(text) - len(answer) - len("<|im_end|>"))
    ids, labels = expected_labels(tok, text, [(start, start + len(trained_text))])
    assert s["input_ids"].tolist() == ids
    assert s["labels"].tolist() == labels


def test_labels_sft(tmp_path):
    check_mode(tmp_path, "sft", "a red circle.", "a red circle.<|im_end|>")


def test_labels_longcot(tmp_path):
    answer = "<think>\n2 plus 2 is 4.\n</think>\nThe answer is \\boxed{4}."
    check_mode(tmp_path, "longcot", answer, answer + "<|im_end|>", think=True)
    with pytest.raises(DataError, match="non-empty <think>") as e:
        data.JsonlDataset(chat_record(tmp_path, "4"), data.load_tokenizer(None), DataConfig(label_mode="longcot"))[0]
    assert e.value.reason == "format" and e.value.where.endswith("m.jsonl:1")
    for stray in ("<think>a</think>b</think>", "<think>a</think>b<think>c</think>", "<think>a<think>b</think>c"):
        with pytest.raises(DataError, match="closed once"):                # a second block or stray tag
            data.think_turn(stray, "m.jsonl:2")


def test_labels_thinkfusion(tmp_path):
    cot = "<think>\nI count 3.\n</think>\nThe answer is \\boxed{3}."
    check_mode(tmp_path, "thinkfusion", cot, cot + "<|im_end|>", think=True)
    direct = "<think>\n\n</think>\n\nThe answer is \\boxed{3}."
    check_mode(tmp_path, "thinkfusion", direct, "The answer is \\boxed{3}.<|im_end|>")
    check_mode(tmp_path, "thinkfusion", "3", "3<|im_end|>")


def test_thinkfusion_trains_the_answers_first_word_after_a_space(synth, tmp_path):
    """An empty think block, then a space: a BPE tokenizer joins that space to the answer's first
    word (" The" is one token), and that token is the answer's, so it is trained."""
    tok = data.load_tokenizer(str(synth))
    s = data.JsonlDataset(chat_record(tmp_path, "<think></think> The answer is seven"), tok,
                          DataConfig(label_mode="thinkfusion", system="S"))[0]
    trained = [t for t, lab in zip(s["input_ids"].tolist(), s["labels"].tolist()) if lab != -100]
    assert tok.decode(trained) == " The answer is seven<|im_end|>"


def test_labels_multi_turn_sft(tmp_path):
    tok = data.load_tokenizer(None)
    line = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                              {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    s = data.JsonlDataset(tmp_path / "m.jsonl", tok, DataConfig())[0]
    text = ("<|im_start|>system\nS<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
            "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\nA2<|im_end|>")
    a1, a2 = text.index("A1<|im_end|>"), text.index("A2<|im_end|>")
    ids, labels = expected_labels(tok, text, [(a1, a1 + 12), (a2, a2 + 12)])
    assert s["input_ids"].tolist() == ids and s["labels"].tolist() == labels


def test_labels_rl_and_text(tmp_path):
    tok = data.load_tokenizer(None)
    s = data.JsonlDataset(chat_record(tmp_path, "There are 3.", answer="3"), tok, DataConfig(label_mode="rl", system="S"))[0]
    assert tok.decode(s["input_ids"].tolist()) == (f"<|im_start|>system\nS<|im_end|><|im_start|>user\nQ\n{THINK}"
                                                   "<|im_end|><|im_start|>assistant\n")
    assert (s["labels"] == -100).all() and s["answer"] == "3"
    with pytest.raises(DataError, match="answer"):
        data.JsonlDataset(chat_record(tmp_path, "x"), tok, DataConfig(label_mode="rl"))[0]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a red circle."}) + "\n")
    for mode in ("text", "sft"):                        # a text record is an LM sample in any mode but rl
        t = data.JsonlDataset(tmp_path / "t.jsonl", tok, DataConfig(label_mode=mode))[0]
        assert t["input_ids"].tolist() == list(b"a red circle.") + [256] and torch.equal(t["labels"], t["input_ids"])


def test_labels_with_bpe_tokenizer_cover_exactly_the_answer(hf_tokenizer, tmp_path):
    """With a real BPE the trained tokens decode to exactly the assistant content + <|im_end|>."""
    tok = data.load_tokenizer(hf_tokenizer[1])
    for answer in ["The quick brown fox.", "你好世界，这是一个测试。", "x = 1\n\ny = 2", "<think>\nok\n</think>\nyes"]:
        s = data.JsonlDataset(chat_record(tmp_path, answer), tok, DataConfig())[0]
        trained = s["labels"][s["labels"] != -100].tolist()
        assert tok.decode(trained) == answer + "<|im_end|>"
        assert s["input_ids"].tolist() == hf_tokenizer[0].encode(tok.decode(s["input_ids"].tolist())).ids


# ----------------------------------------------------------------------------------------------
# tiling: the official rule, written again here from the facts text (§1.5)

def official_grid(w, h, lo, hi, size):
    # "Candidate grids: all (i,j) with min_num <= i*j <= max_num, sorted by i*j. Pick the one whose aspect
    #  ratio is closest to the image. On a tie, prefer the later, larger grid if area > 0.5*448^2*i*j."
    cands = sorted({(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if lo <= i * j <= hi}, key=lambda g: g[0] * g[1])
    best, best_d = None, None
    for i, j in cands:
        d = abs(w / h - i / j)
        if best is None or d < best_d:
            best, best_d = (i, j), d
        elif d == best_d and w * h > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def test_tile_grid_matches_official_rule():
    rng = random.Random(0)
    sizes = [(448, 448), (896, 896), (1344, 1344), (449, 448), (896, 448), (1792, 448), (448, 1344), (100, 100),
             (1000, 10), (10, 1000), (2000, 1500), (640, 480), (1920, 1080), (3000, 3000), (300, 301)]
    sizes += [(rng.randint(16, 4000), rng.randint(16, 4000)) for _ in range(400)]
    for (w, h) in sizes:
        for lo, hi in [(1, 12), (1, 6), (2, 9), (1, 1)]:
            cols, rows = official_grid(w, h, lo, hi, 448)
            assert vit.tile_grid(w, h, lo, hi, 448) == (cols, rows), (w, h, lo, hi)
            tiles = cols * rows + (1 if cols * rows > 1 else 0)
            if (w, h) in sizes[:15] and hi == 12 and w * h <= 1_000_000:
                img = Image.new("RGB", (w, h))
                assert vit.load_image(img, max_tiles=hi, min_tiles=lo, image_size=448)[1] == tiles
    assert vit.tile_grid(448, 448, 1, 12, 448) == (1, 1)       # tie: area not > half of 2x2's area
    assert vit.tile_grid(896, 896, 1, 12, 448) == (2, 2)       # tie broken towards the larger grid


def test_tile_pixels_equal_direct_crop_resize_normalise():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (150, 310, 3), dtype=np.uint8))      # W=310, H=150
    pv, n = vit.load_image(img, max_tiles=6, image_size=112)
    cols, rows = official_grid(310, 150, 1, 6, 112)
    assert n == cols * rows + 1 and pv.shape == (n, 3, 112, 112) and pv.dtype == torch.float32
    big = img.resize((112 * cols, 112 * rows), Image.BICUBIC)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    norm = lambda im: torch.from_numpy(((np.asarray(im) / 255.0 - mean) / std).transpose(2, 0, 1)).float()  # noqa: E731
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        torch.testing.assert_close(pv[k], norm(big.crop((c * 112, r * 112, (c + 1) * 112, (r + 1) * 112))),
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(pv[-1], norm(img.resize((112, 112), Image.BICUBIC)), atol=1e-5, rtol=0)


def test_tiles_are_row_major_on_a_3x2_grid():
    """A grid with several rows AND columns, so row-major and column-major orders differ: tile k
    is row k // cols, column k % cols of the resized image (the official crop loop)."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (224, 336, 3), dtype=np.uint8))      # W=336, H=224: 3 x 2
    pv, n = vit.load_image(img, max_tiles=6, image_size=112, use_thumbnail=False)
    cols, rows = official_grid(336, 224, 1, 6, 112)
    assert (cols, rows) == (3, 2) and n == 6
    crops = vit.to_pixels([img.resize((336, 224), Image.BICUBIC).crop((c * 112, r * 112, (c + 1) * 112, (r + 1) * 112))
                            for r in range(rows) for c in range(cols)])
    torch.testing.assert_close(pv, crops, atol=1e-6, rtol=0)
    column_major = crops.reshape(rows, cols, 3, 112, 112).transpose(0, 1).reshape(6, 3, 112, 112)
    assert (pv - column_major).abs().max() > 0.1                    # the test can tell the two orders apart


def test_anyres_sizes_and_sample(tmp_path):
    for w, h in [(1000, 700), (5000, 300), (50, 40), (1792, 1792), (3000, 3000), (1_000_000, 10), (10, 1_000_000)]:
        W, H = vit.anyres_size(w, h, 14, 0.5, max_patches=16384, min_patches=16)
        assert W % 28 == 0 and H % 28 == 0 and 16 <= (W // 14) * (H // 14) <= 16384
        if 28 * 4 < min(w, h) and max(w, h) <= 1792:
            assert abs((W / H) / (w / h) - 1) < 0.1
    assert vit.anyres_size(1792, 1792) == (1792, 1792)
    save_png(tmp_path / "a.png", size=(300, 200))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}) + "\n")
    s = data.JsonlDataset(tmp_path / "m.jsonl", data.load_tokenizer(None),
                          DataConfig(anyres=True, anyres_max_patches=256))[0]
    (pv,) = s["pixel_values"]
    assert pv.shape[0] == 1 and (pv.shape[2] // 14) * (pv.shape[3] // 14) <= 256
    assert s["image_tokens"] == [(pv.shape[2] // 28) * (pv.shape[3] // 28)] == [int((s["input_ids"] == 263).sum())]


# ----------------------------------------------------------------------------------------------
# image file modes: high bit depth scaled to 8 bits, transparency composited on white

def photo_like(w: int = 96, h: int = 64) -> np.ndarray:
    """A synthetic photo (uint8 RGB, no download): colour gradients, a soft-edged disc, a dark bar and
    mild noise, so every grey level and edge matters when a mode conversion goes wrong."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r, g, b = 255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin(x / 7) * np.cos(y / 5)
    disc = np.clip(12 - np.hypot(x - 0.6 * w, y - 0.45 * h), 0, 1)              # soft edge over 1 px
    rgb = np.stack([r, g, b], -1) * (1 - disc[..., None]) + np.array([250, 240, 20]) * disc[..., None]
    rgb[h // 5:h // 5 + 6, 5:w // 2] = (20, 30, 60)                               # a dark bar
    rgb += np.random.default_rng(0).normal(0, 4, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def png_16bit_rgba(path, rgba16: np.ndarray):
    """A 16-bit-per-channel RGBA PNG written by hand (Pillow cannot write one): colour type 6, depth 16."""
    import struct
    import zlib
    h, w, _ = rgba16.shape
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + rgba16[i].astype(">u2").tobytes() for i in range(h))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_high_bit_depth_images_keep_their_content(tmp_path):
    """16-bit and 32-bit greyscale files read as their 8-bit twin (before: I;16 clipped to ~100% white)."""
    grey = np.asarray(Image.fromarray(photo_like()).convert("L"))                 # the 8-bit reference
    g16 = grey.astype(np.uint16) * 257 + np.random.default_rng(1).integers(0, 128, grey.shape).astype(np.uint16)
    files = {"i16.png": Image.fromarray(g16),                                     # mode I;16 (16-bit PNG)
             "i16b.tif": Image.frombytes("I;16B", g16.shape[::-1], g16.astype(">u2").tobytes()),
             "i32.tif": Image.fromarray(g16.astype(np.int32)),                    # mode I, 16-bit data
             "f01.tif": Image.fromarray((grey / 255.0).astype(np.float32)),       # mode F in [0, 1]
             "f255.tif": Image.fromarray(grey.astype(np.float32))}                # mode F in [0, 255]
    reference = vit.load_image(Image.fromarray(grey).convert("RGB"), max_tiles=1, image_size=112)[0]
    for name, img in files.items():
        img.save(tmp_path / name)
        with Image.open(tmp_path / name) as check:
            assert check.mode == img.mode, name                                   # the file really is in that mode
        rgb = np.asarray(vit.open_image(tmp_path / name)).astype(int)
        assert rgb.shape == (*grey.shape, 3) and np.abs(rgb - grey[..., None]).max() <= 1, name
        pv, _ = vit.load_image(tmp_path / name, max_tiles=1, image_size=112)      # the loader training uses
        assert (pv - reference).abs().max() < 0.05, name                          # <= 1 grey level after resize
    assert np.asarray(vit.to_8bit(np.array([[-5.0, 0.0, 5.0]]), "F")).tolist() == [[0, 128, 255]]  # min..max


def test_transparent_images_are_composited_on_white(tmp_path):
    """RGBA, LA, P + transparency and 16-bit RGBA files: what is transparent is the white page, partial
    alpha blends with white (before: a transparent background came out black)."""
    rgb = photo_like().astype(np.float64)
    h, w, _ = rgb.shape
    y, x = np.mgrid[0:h, 0:w]
    alpha = np.clip(255 * (20 - np.hypot(x - w / 2, y - h / 2)) / 4, 0, 255).round()   # opaque centre, soft rim
    on_white = lambda c, a: np.rint(c * a[..., None] / 255 + 255 * (1 - a[..., None] / 255))  # noqa: E731
    premult = np.where(alpha[..., None] > 0, rgb, 0).astype(np.uint8)             # transparent pixels stored black
    grey = np.asarray(Image.fromarray(premult).convert("L")).astype(np.float64)
    Image.fromarray(np.dstack([premult, alpha.astype(np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey, alpha]).astype(np.uint8), "LA").save(tmp_path / "la.png")
    png_16bit_rgba(tmp_path / "rgba16.png", np.dstack([premult, alpha]).astype(np.uint16) * 257)
    pal = Image.fromarray(premult).quantize(63)
    idx = np.where(alpha == 0, 63, np.asarray(pal))                               # index 63: transparent black
    p_img = Image.fromarray(idx.astype(np.uint8), "P")
    p_img.putpalette(pal.getpalette()[:63 * 3] + [0, 0, 0])
    p_img.save(tmp_path / "p.png", transparency=63)
    p_expected = np.where(alpha[..., None] == 0, 255, np.asarray(p_img.convert("RGB")))
    expected = {"rgba.png": on_white(premult, alpha), "rgba16.png": on_white(premult, alpha),
                "la.png": on_white(grey[..., None], alpha), "p.png": p_expected}
    for name, want in expected.items():
        got = np.asarray(vit.open_image(tmp_path / name)).astype(int)
        assert np.abs(got - want).max() <= 1, name
        assert got[0, 0].tolist() == [255, 255, 255] and abs(got[h // 2, w // 2] - want[h // 2, w // 2]).max() <= 1
    assert Image.open(tmp_path / "rgba16.png").mode == "RGBA" and Image.open(tmp_path / "p.png").mode == "P"


def test_image_root_resolves_relative_paths_from_a_dataset_folder(tmp_path, capsys):
    """LLaVA-style manifests name images relative to the dataset folder, not to the manifest."""
    root, meta = tmp_path / "dataset", tmp_path / "annotations"
    (root / "coco" / "train2017").mkdir(parents=True), meta.mkdir()
    save_png(root / "coco" / "train2017" / "000001.jpg.png", colour=(10, 200, 30))
    (meta / "llava.jsonl").write_text(json.dumps({"image": "coco/train2017/000001.jpg.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "green"}]}) + "\n")
    tok = data.load_tokenizer(None)
    with pytest.raises(DataError, match="image file not found") as e:
        data.JsonlDataset(meta / "llava.jsonl", tok, DataConfig(**TINY)).load(0)   # default: beside the manifest
    assert str(meta / "coco") in str(e.value)
    s = data.JsonlDataset(meta / "llava.jsonl", tok, DataConfig(**TINY, image_root=str(root))).load(0)
    assert s["n_images"] == 1 and abs(float(s["pixel_values"][0, 1].mean()) - (200 / 255 - 0.456) / 0.224) < 1e-3
    data.main(["check", str(meta / "llava.jsonl"), "--image-root", str(root)])
    assert "no bad samples in 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# video

LEVELS = [8 * i for i in range(32)]          # frame i is gray 8*i


def frame_ids(frames):
    """Recover each frame's index from its gray level (undo normalisation, centre pixels)."""
    g = (frames[:, :, 16:48, 16:48] * vit.IMAGENET_STD + vit.IMAGENET_MEAN).mean(dim=(1, 2, 3)) * 255
    return [int(round(v / 8)) for v in g.tolist()]


def test_video_frames_in_order(tmp_path):
    path = write_gray_video(tmp_path / "v.mp4", LEVELS)
    frames = vit.load_video(path, num_frames=16, image_size=64)
    assert frames.shape == (16, 3, 64, 64)
    assert frame_ids(frames) == [2 * k for k in range(16)]         # 32 frames, 16 segments of 2: middle = first
    train = vit.load_video(path, num_frames=16, training=True, rng=np.random.default_rng(0), image_size=64)
    assert all(2 * k <= i <= 2 * k + 1 for k, i in enumerate(frame_ids(train)))
    again = vit.load_video(path, num_frames=16, training=True, rng=np.random.default_rng(0), image_size=64)
    assert torch.equal(train, again)
    short = vit.load_video(path, num_frames=48, image_size=64)      # more frames asked than exist: repeats
    ids = frame_ids(short)
    assert len(ids) == 48 and ids == sorted(ids) and set(ids) == set(range(32))


def test_video_without_frame_count_and_vfr(tmp_path):
    mkv = write_gray_video(tmp_path / "v.mkv", LEVELS, fmt="matroska")
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0                        # the container does not say: must count
    assert frame_ids(vit.load_video(mkv, num_frames=16, image_size=64)) == [2 * k for k in range(16)]
    pts = np.cumsum([0] + [random.Random(0).choice([40, 90, 250]) for _ in range(31)]).tolist()
    vfr = write_gray_video(tmp_path / "vfr.mp4", LEVELS, pts=pts)
    assert frame_ids(vit.load_video(vfr, num_frames=16, image_size=64)) == [2 * k for k in range(16)]


def test_video_truncated_or_missing(tmp_path):
    path = write_gray_video(tmp_path / "v.mp4", LEVELS)
    raw = path.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 100, 20):
        bad = tmp_path / f"cut{cut}.mp4"
        bad.write_bytes(raw[:cut])
        with pytest.raises(DataError) as e:
            vit.load_video(bad, num_frames=16, image_size=64)
        assert e.value.reason == "video" and str(bad) in str(e.value)
    with pytest.raises(DataError) as e:
        vit.load_video(tmp_path / "nope.mp4")
    assert e.value.reason == "missing_file"


def write_gop_video(path, n_frames, gop=10, b_frames=2, size=64):
    """A video with a keyframe every `gop` frames (no scene-cut keyframes) and B-frames (decode order
    differs from presentation order); frame i shows a bar at row 2i mod size on gray 3i mod 256."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=25, options={"sc_threshold": "1000000000"})
        s.width = s.height = size
        s.pix_fmt, s.bit_rate = "yuv420p", 2_000_000
        s.codec_context.gop_size, s.codec_context.max_b_frames = gop, b_frames
        for i in range(n_frames):
            a = np.full((size, size, 3), (3 * i) % 256, np.uint8)
            a[(2 * i) % (size - 4):(2 * i) % (size - 4) + 4, :, 0] = 255
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode())
    return path


def cut_by_stream_copy(src, dst, first: int, rate: int = 25):
    """What `ffmpeg -ss T -i src -c copy dst` writes: every packet kept, timestamps shifted so frame
    `first` is at 0; the MP4 muxer's edit list then hides the frames before it (from the keyframe
    before the cut), which a decoder does not output (the demuxer marks their packets discard)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mp4") as o:
        si = i.streams.video[0]
        so = o.add_stream_from_template(si)
        shift = first * int(1 / (si.time_base * rate))
        for pkt in i.demux(si):
            if pkt.dts is not None:
                pkt.pts, pkt.dts, pkt.stream = pkt.pts - shift, pkt.dts - shift, so
                o.mux(pkt)
    return dst


def frames_from_the_start(path, idx, size):
    """The reference: decode from frame 0 with plain PyAV, frame i = the i-th frame decoded."""
    got = {}
    with av.open(str(path)) as c:
        for n, f in enumerate(c.decode(video=0)):
            if n in set(idx):
                got[n] = f.to_image()
    return vit.to_pixels([got[i].resize((size, size), Image.BICUBIC) for i in idx])


class CountingContainer:
    """A PyAV container that counts the seeks made and the frames decoded through it."""

    def __init__(self, container, counts):
        self.c, self.counts = container, counts

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.c.close()

    def __getattr__(self, name):
        return getattr(self.c, name)

    def seek(self, *a, **k):
        self.counts["seeks"] += 1
        return self.c.seek(*a, **k)

    def decode(self, *a, **k):
        for frame in self.c.decode(*a, **k):
            self.counts["frames"] += 1
            yield frame


@pytest.mark.parametrize("which", ["synthetic", "long", "cut"])
def test_video_frames_by_seeking_equal_decoding_from_the_start(which, synth_dir, tmp_path, monkeypatch):
    """load_video seeks to the keyframe before each wanted frame; the frames must equal those of a
    decode from frame 0, on the synthetic MP4s (16 frames, keyframes 0 and 12), on a 300-frame
    video with a keyframe every 10 frames and B-frames, and on that video cut at frame 15 by stream
    copy (an edit list hides frames 10-14: 285 frames are shown, the container states 300), for
    evaluation and training frame choices; on the long video far fewer frames are decoded than a
    decode from the start needs."""
    paths = ([synth_dir / "video" / "videos" / f"train_{i:05d}.mp4" for i in range(3)] if which == "synthetic"
             else [write_gop_video(tmp_path / "long.mp4", 300)] if which == "long"
             else [cut_by_stream_copy(write_gop_video(tmp_path / "long.mp4", 300), tmp_path / "cut.mp4", 15)])
    real_open = av.open
    counts = Counter()
    monkeypatch.setattr(vit.av, "open", lambda *a, **k: CountingContainer(real_open(*a, **k), counts))
    monkeypatch.setattr(vit, "_decode_frames", None)               # the decode-from-start fallback is not used
    for path in paths:
        with real_open(str(path)) as c:
            n = sum(1 for _ in c.decode(video=0))                          # the frames shown
            assert n == (285 if which == "cut" else c.streams.video[0].frames)
        for num, seed in [(8, None), (8, 0), (8, 1), (16, 2), (3, 3)]:
            rng = np.random.default_rng(seed) if seed is not None else None
            idx = vit.frame_indices(n, num, rng is not None, np.random.default_rng(seed))
            counts.clear()
            got = vit.load_video(path, num, training=rng is not None, rng=rng, image_size=32)
            if which == "long":                          # at most one GOP decoded per wanted frame
                assert counts["seeks"] >= 2 and counts["frames"] <= num * 10 < max(idx) + 1, counts
            assert torch.equal(got, frames_from_the_start(path, idx, 32))


# ----------------------------------------------------------------------------------------------
# bad input: exact counts on a salted manifest, in a scan and in a stream

def salted_manifest(tmp_path):
    save_png(tmp_path / "ok.png")
    (tmp_path / "trunc.png").write_bytes((save_png(tmp_path / "full.png", colour=(1, 2, 3))).read_bytes()[:60])
    good = lambda q: {"image": "ok.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"},  # noqa: E731
                                                            {"from": "gpt", "value": "red."}]}
    lines = [json.dumps(good(f"q{i}")) for i in range(12)]
    bad = {
        "json": ['{"image": "ok.png", "conversations": [', "not json at all", "[" * 100_000,    # (nested too deep)
                 '{"image": "ok.png", "answer": ' + "1" * 5000 + "}"],    # past Python's 4,300-digit int limit
        "missing_file": [json.dumps({**good("m"), "image": "missing.png"})],
        "image": [json.dumps({**good("t"), "image": "trunc.png"})],
        "placeholder_mismatch": [json.dumps({**good("p"), "conversations": [
            {"from": "human", "value": "<image><image>\nq"}, {"from": "gpt", "value": "x"}]})] * 2
        + [json.dumps(good("What does <IMG_CONTEXT> mean?"))],         # a literal image slot token in the text
        "too_long": [json.dumps({**good("L" * 400)})],
        "schema": [json.dumps({"conversations": [{"from": "gpt", "value": "no user"}]}), json.dumps([1, 2]),
                   json.dumps({"conversations": None}), json.dumps({"messages": 5}),
                   json.dumps({"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]}),
                   json.dumps({"messages": [{"role": "user", "content": [{"type": {"image": 1}}]}]}),
                   json.dumps({"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nno reply"}]})],
    }
    for reason, bad_lines in bad.items():
        for b in bad_lines:
            lines.insert(random.Random(len(lines)).randrange(len(lines) + 1), b)
    lines.insert(3, "")                                               # blank line: ignored (and reported)
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.jsonl", {k: len(v) for k, v in bad.items()}


def test_bad_input_counts_exact(tmp_path):
    path, expected = salted_manifest(tmp_path)
    tok, cfg = data.load_tokenizer(None), DataConfig(image_size=112, max_len=300)
    ds = data.JsonlDataset(path, tok, cfg)
    bad = data.BadData(max_fraction=1.0)
    good = list(ds.scan(bad, progress=False))
    assert len(good) == 12 and dict(bad.counts) == expected and bad.seen == len(ds) == 12 + sum(expected.values())
    # the stream, one epoch of a single manifest: every line once, same counts
    stream = data.Mixture([path], tok, DataConfig(image_size=112, max_len=300, max_bad_fraction=1.0), seed=3,
                          verbose=False)
    got = [stream.next()[1] for _ in range(12 + 1)]                  # the 13th: past the epoch's last bad lines
    assert stream.epoch == 1 and dict(stream.bad.counts) == expected
    assert sorted(s["source"] for s in got[:12]) == sorted(s["source"] for s in good)
    # every error names file and line
    errors = {}
    for i in range(len(ds)):
        try:
            ds.load(i)
        except DataError as e:
            errors[i] = e
    assert Counter(e.reason for e in errors.values()) == expected
    for i, e in errors.items():
        assert e.where == f"{path.resolve()}:{ds.line_numbers[i]}" and str(e).startswith(e.where + ": ")
    assert all(e.message.startswith("malformed JSON") for e in errors.values() if e.reason == "json")


def test_too_much_bad_data_stops(tmp_path):
    path, expected = salted_manifest(tmp_path)
    cfg = DataConfig(image_size=112, max_len=300, max_bad_fraction=0.2, bad_check_after=10)
    stream = data.Mixture([path], data.load_tokenizer(None), cfg, verbose=False)
    with pytest.raises(data.TooMuchBadData, match="max_bad_fraction"):
        for _ in range(100):
            stream.next()


def test_each_bad_sample_is_reported_and_counted_once_over_many_passes(tmp_path, capsys):
    path, expected = salted_manifest(tmp_path)
    n = 12 + sum(expected.values())
    cfg = DataConfig(image_size=112, max_len=300, max_bad_fraction=1.0, bad_check_after=1000)
    stream = data.Mixture([path], data.load_tokenizer(None), cfg, seed=1)
    for _ in range(12 * 3):                                      # three passes over the manifest
        stream.next()
    assert stream.epoch == 2 and stream.bad.seen == n                # distinct samples, not visits
    assert dict(stream.bad.counts) == expected
    reported = [ln for ln in capsys.readouterr().err.splitlines() if "skipping bad sample" in ln]
    assert len(reported) == sum(expected.values()) == len(set(reported))   # once each, not once per pass
    # the counts survive a resume: a second pass after a restore reports nothing new
    state = json.loads(json.dumps(stream.state_dict()))
    again = data.Mixture([path], data.load_tokenizer(None), cfg, seed=1)
    again.load_state_dict(state)
    for _ in range(12):
        again.next()
    assert not [ln for ln in capsys.readouterr().err.splitlines() if "skipping bad sample" in ln]
    assert again.bad.seen == n and dict(again.bad.counts) == expected


# ----------------------------------------------------------------------------------------------
# mixture stream: weights, determinism, exact resume, ranks

@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return synth.make_synth(tmp_path_factory.mktemp("synth") / "d", seed=0, size=16, progress=False)


TINY = dict(image_size=112, max_tiles=4, num_frames=4)


def synth_sources(synth_dir, mix, split="train"):
    return [(str(synth_dir / family / f"{split}.jsonl"), w) for family, w in mix]


SFT4_MIX = (("video", 0.5), ("caption_qa", 0.1), ("ocr", 0.1), ("chart", 0.1), ("count", 0.1), ("multi", 0.1))


def test_stream_resume_is_exact(synth_dir):
    tok, cfg = data.load_tokenizer(None), DataConfig(**TINY)
    sources = synth_sources(synth_dir, SFT4_MIX)
    a = data.Mixture(sources, tok, cfg, seed=5, verbose=False)
    first = [a.next() for _ in range(6)]
    state = json.loads(json.dumps(a.state_dict()))
    rest = [a.next() for _ in range(6)]
    b = data.Mixture(sources, tok, cfg, seed=5, verbose=False)
    b.load_state_dict(state)
    again = [b.next() for _ in range(6)]
    for (kx, x), (ky, y) in zip(rest, again):
        assert kx == ky and x["source"] == y["source"] and torch.equal(x["input_ids"], y["input_ids"])
        assert (x["pixel_values"] is None) == (y["pixel_values"] is None)
        if x["pixel_values"] is not None:
            assert torch.equal(x["pixel_values"], y["pixel_values"])     # video frames too (training rng)
    assert [k for k, _ in first + rest] == list(range(12))
    with pytest.raises(ValueError, match="exact resume"):
        data.Mixture(sources, tok, cfg, seed=6, verbose=False).load_state_dict(state)


def test_stream_mixture_weights(synth_dir):
    tok = data.load_tokenizer(None)
    sources = [(str(synth_dir / "caption" / "train.jsonl"), 3.0), (str(synth_dir / "ocr" / "train.jsonl"), 1.0)]
    stream = data.Mixture(sources, tok, DataConfig(**TINY), seed=0, epoch_size=4000, verbose=False)
    order = stream.order(0)
    n_caption = len(stream.datasets[0])
    assert abs((order < n_caption).mean() - 0.75) < 0.03
    for part in (order[order < n_caption][:n_caption], order[order >= n_caption][:16]):
        assert np.bincount(part).max() == 1                                 # permutation: no repeats
    assert np.array_equal(stream.order(1), data.Mixture(sources, tok, DataConfig(**TINY), seed=0,
                                                        epoch_size=4000, verbose=False).order(1))


def test_training_video_jitter_varies_the_frames_and_evaluation_does_not(synth_dir):
    """Training samples frames at random within each segment, per visit of the stream; evaluation
    takes every segment's middle frame. Reference: the frames decoded directly with PyAV."""
    tok = data.load_tokenizer(None)
    path = str(synth_dir / "video" / "train.jsonl")
    cfg = DataConfig(image_size=112, num_frames=4)
    with av.open(str(synth_dir / "video" / data.JsonlDataset(path, tok, cfg).record(0).videos[0])) as c:
        decoded = [vit.to_array(f.to_image().resize((112, 112), Image.BICUBIC)) for f in c.decode(video=0)]
    n = len(synth_dir.joinpath("video/train.jsonl").read_text().splitlines())

    def frames_used(training, visits):
        stream = data.Mixture([path], tok, cfg, seed=0, training=training, verbose=False)
        out = []
        for k in visits:                               # the same sample (index 0) at several visits
            assert stream.sample_index(k) == stream.order(k // n)[k % n]
            pv = stream.load(k)["pixel_values"]
            out.append(tuple(int(np.argmin([np.abs(f - pv[j].numpy()).mean() for f in decoded]))
                             for j in range(pv.shape[0])))
        return out
    visits = [k for e in range(6) for k in range(e * n, (e + 1) * n)
              if data.Mixture([path], tok, cfg, seed=0, verbose=False).sample_index(k) == 0]
    assert len(visits) == 6
    train = frames_used(True, visits)
    assert len(set(train)) > 1                                   # the chosen frames vary across visits
    edges = np.linspace(0, len(decoded), 5)
    for chosen in train:                                         # ... within their segments
        assert all(int(edges[j]) <= f < max(int(edges[j]) + 1, int(edges[j + 1])) for j, f in enumerate(chosen))
    evals = frames_used(False, visits)
    assert len(set(evals)) == 1                                  # evaluation: always the middle frames
    assert evals[0] == tuple((int(edges[j]) + max(int(edges[j]) + 1, int(edges[j + 1])) - 1) // 2 for j in range(4))


@pytest.mark.parametrize("anyres", [False, True])
def test_pack_metadata_from_headers_equals_decoding(anyres, synth_dir, tmp_path, monkeypatch):
    """Mixture.meta reads a sample's line, its image headers and the tokenizer, decoding no pixel,
    and must give what packing.sample_meta of the decoded sample gives (tokens, visual tokens,
    tiles): for every synthetic family (multi-image, video, charts' 2x2 grid,
    text), tiled and AnyRes, and for images of other shapes and modes."""
    import packing
    for i, (size, mode) in enumerate([((300, 200), "RGB"), ((40, 500), "L"), ((1200, 300), "RGBA"), ((97, 61), "P")]):
        Image.new(mode, size).save(tmp_path / f"i{i}.png")
    two = [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]
    (tmp_path / "shapes.jsonl").write_text("".join(json.dumps({"image": [f"i{i}.png", f"i{3 - i}.png"],
                                                               "conversations": two}) + "\n" for i in range(4)))
    manifests = [synth_dir / f / "train.jsonl" for f in data.SYNTH_FAMILIES] + [tmp_path / "shapes.jsonl"]
    cfg = DataConfig(image_size=112, max_tiles=6, num_frames=4, anyres=anyres, anyres_max_patches=256, max_len=10 ** 5)
    tok, seen = data.load_tokenizer(synth_dir), set()
    for manifest in manifests:
        stream = data.Mixture([str(manifest)], tok, cfg, seed=0, verbose=False)
        decoded = [packing.sample_meta(stream.load(k), k) for k in range(4)]
        with monkeypatch.context() as m:                     # the metadata path decodes no pixel
            m.setattr(vit, "open_image", None)
            m.setattr(vit, "video_frames", None)
            metas = [stream.meta(k) for k in range(4)]
            found = []
            assert [stream.next_meta(found) for _ in range(4)] == metas and found == [(stream.sample_index(k), None)
                                                                                      for k in range(4)]
        assert metas == [tuple(d) for d in decoded], manifest
        seen |= {d.n_images for d in decoded}
    assert {0, 1, 2, 4} <= seen                         # text, one image, several, a video's frames


def test_pixels_that_disagree_with_their_header_are_bad_input(tmp_path, monkeypatch):
    """The packing plan trusts the header; a file whose pixels give other tiles is refused, not trained."""
    save_png(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}) + "\n")
    ds = data.JsonlDataset(tmp_path / "m.jsonl", data.load_tokenizer(None), DataConfig(image_size=112, max_tiles=4))
    assert ds.load(0)["tiles"] == [1]
    monkeypatch.setattr(data, "image_size_of", lambda path, where: (224, 112))      # a header that lies
    assert ds.load(0, decode=False)["tiles"] == [3]
    with pytest.raises(DataError, match="header gives 3 tiles") as e:
        ds.load(0)
    assert e.value.reason == "image"


# ----------------------------------------------------------------------------------------------
# n-gram rebalancing

def test_ngram_weights_hand_computed():
    w = data.ngram_weights(["a b c", "a b c", "x y z"], n=3, alpha=0.5)
    raw = np.array([2 ** -0.5, 2 ** -0.5, 1.0])
    np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-12)


def test_ngram_rebalancing_raises_diversity():
    rng = random.Random(0)
    common = ["a red circle at the top left." for _ in range(80)]
    rare = [f"the {rng.choice(['tiny', 'big', 'odd'])} {w} sits near the {v} corner today."
            for w, v in zip(["fox", "owl", "cat", "bee", "elk", "ant", "cod", "yak", "emu", "gnu"] * 2,
                            ["north", "south", "east", "west"] * 5)]
    texts = common + rare
    w = data.ngram_weights(texts)
    assert w[80:].min() > w[:80].max()
    before, after = data.diversity(texts), data.diversity(texts, w)
    assert after["entropy"] > before["entropy"] + 0.5 and after["distinct"] > before["distinct"]


def test_ngram_rebalancing_changes_what_the_stream_samples_in_the_stated_direction(tmp_path, capsys):
    """A manifest of 80 copies of one caption phrasing and 20 rare phrasings: with rebalancing the
    stream draws the rare samples far more often than their 20% share, without it at that share."""
    rng = random.Random(0)
    lines = [json.dumps({"text": "a red circle at the top left."}) for _ in range(80)]
    lines += [json.dumps({"text": f"the {rng.choice(['tiny', 'big', 'odd'])} {w} sits near the {v} corner."})
              for w, v in zip(["fox", "owl", "cat", "bee", "elk", "ant", "cod", "yak", "emu", "gnu"] * 2,
                              ["north", "south", "east", "west"] * 5)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    tok, cfg = data.load_tokenizer(None), DataConfig(label_mode="text")

    def rare_share(ngram):
        stream = data.Mixture([str(tmp_path / "m.jsonl")], tok, cfg, seed=0, ngram_rebalance=ngram,
                              epoch_size=5000)
        return float((stream.order(0) >= 80).mean())
    plain, rebalanced = rare_share(False), rare_share(True)
    assert "distinct-3" in capsys.readouterr().out                  # the effect is reported
    assert abs(plain - 0.2) < 0.02
    w = data.ngram_weights([json.loads(x)["text"] for x in lines])
    assert rebalanced == pytest.approx(w[80:].sum() / w.sum(), abs=0.02) and rebalanced > 0.5


# ----------------------------------------------------------------------------------------------
# synthetic data

def file_digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_synth_deterministic(synth_dir, tmp_path):
    again = synth.make_synth(tmp_path / "again", seed=0, size=16, progress=False)
    da, db = file_digests(synth_dir), file_digests(again)
    assert da == db and len(da) > 150
    other = synth.make_synth(tmp_path / "other", seed=1, size=16, progress=False)
    assert (other / "caption" / "train.jsonl").read_bytes() != (synth_dir / "caption" / "train.jsonl").read_bytes()
    assert data.ensure_synth(synth_dir, seed=0, size=16) == synth_dir      # present: no-op
    with pytest.raises(ValueError, match="seed 0 size 16"):
        data.ensure_synth(synth_dir, seed=2, size=16)
    made = data.ensure_synth(tmp_path / "fresh", seed=0, size=16, progress=False)
    assert file_digests(made) == da


def test_synth_every_sample_loads(synth_dir):
    tok = data.load_tokenizer(None)
    stamp = json.loads((synth_dir / "synth.json").read_text())
    assert set(stamp["samples"]) == set(data.SYNTH_FAMILIES)
    for family, splits in stamp["samples"].items():
        for split, n in splits.items():
            mode = "text" if family == "text" else "sft"
            ds = data.JsonlDataset(synth_dir / family / f"{split}.jsonl", tok, DataConfig(**TINY, label_mode=mode))
            bad = data.BadData(max_fraction=0.0)
            samples = list(ds.scan(bad, progress=False))
            assert len(samples) == n == len(ds) and not bad.counts, (family, split)
            if family not in ("caption", "text"):
                assert all(s["answer"] for s in samples)


# ----------------------------------------------------------------------------------------------
# curation (§3.1, §4.2.2)

def test_heuristic_judge_and_quality_filter(tmp_path):
    scene = synth.scene_image([("red", "circle", "top", "left"), ("blue", "square", "bottom", "right")])
    assert curate.ita_score(scene, "a red circle and a blue square") == 1.0
    assert curate.ita_score(scene, "a green circle") == 0.0
    assert curate.ita_score(scene, "a red circle and a yellow one") == 0.5
    blank = Image.new("RGB", (112, 112), "white")
    assert curate.vir_score(blank) < 0.05 < curate.vir_score(scene)
    scene.save(tmp_path / "s.png")
    blank.save(tmp_path / "b.png")
    conv = lambda img, cap: {"image": img, "conversations": [{"from": "human", "value": "<image>\nDescribe."},  # noqa: E731
                                                              {"from": "gpt", "value": cap}]}
    lines = [conv("s.png", "a red circle and a blue square."), conv("b.png", "a red circle."),
             conv("s.png", "a green triangle."), conv("missing.png", "x"), {"text": "plain"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "{broken\n")
    stats = curate.quality_filter(tmp_path / "m.jsonl", tmp_path / "out" / "f.jsonl", progress=False)
    assert stats == {"kept": 1, "low_vir": 1, "low_ita": 1, "bad:missing_file": 1, "kept_unscored": 1, "bad:json": 1}
    kept = [json.loads(x) for x in (tmp_path / "out" / "f.jsonl").read_text().splitlines()]
    assert kept[0]["image"] == ["../s.png"] and kept[0]["scores"]["ita"] == 1.0
    assert len(data.JsonlDataset(tmp_path / "out" / "f.jsonl", data.load_tokenizer(None), DataConfig(**TINY))[0]["tiles"]) == 1


def test_charts(tmp_path):
    labels, values = ["cat", "dog", "fish"], [3, 9, 1]
    qa = dict(synth.chart_qa("bar", labels, values))
    assert qa["Which bar has the largest value?"] == "dog" and qa["Which bar has the smallest value?"] == "fish"
    assert qa["What is the value of cat?"] == "3" and qa["How many bars are there?"] == "3"
    for kind in data.CHART_KINDS:
        img = synth.render_chart(kind, labels, values, size=160)
        assert img.size == (160, 160) and len(img.getcolors(maxcolors=1 << 16)) > 3
    path = synth.make_charts(tmp_path / "c", n=6, progress=False)
    ds = data.JsonlDataset(path, data.load_tokenizer(None), DataConfig(**TINY))
    assert len(ds) == 6 and {json.loads(open(path).readlines()[i])["chart"]["kind"] for i in range(3)} == set(data.CHART_KINDS)
    assert ds[0]["input_ids"].numel() > 0


def test_caption_to_qa(tmp_path, synth_dir):
    qa = curate.template_qa("a red circle at the top left and a blue square at the bottom right.")
    assert ("What colour is the circle at the top left?", "red.") in qa and len(qa) == 6
    assert ("Where is the blue square?", "at the bottom right.") in qa
    assert curate.template_qa("A sunny beach.") == [("Describe the image.", "A sunny beach.")]
    out = tmp_path / "qa" / "caption_qa.jsonl"
    stats = curate.caption_to_qa(synth_dir / "caption" / "train.jsonl", out, pairs=2, progress=False)
    assert stats == {"converted": 16}
    ds = data.JsonlDataset(out, data.load_tokenizer(None), DataConfig(**TINY))
    assert len(list(ds.scan(progress=False))) == 16
    assert len(ds.record(0).turns) == 4


def test_clean_longcot(tmp_path):
    save_png(tmp_path / "a.png")
    conv = lambda q, a, **kw: {"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"},  # noqa: E731
                                                                    {"from": "gpt", "value": a}], **kw}
    chain = ("first I add two and two which gives four and then I check it twice by counting on my fingers "
             "one two three four and it is right")
    lines = [
        conv("q1", f"<think>{chain}</think>The answer is \\boxed{{4}}."),                       # kept
        conv("q1", "<think>other chain</think>\\boxed{4}"),                                        # duplicate of q1
        conv("q2", "just 4"),                                                                        # format: no think
        conv("q3", f"<think>{chain}</think>{chain} so \\boxed{{4}}"),                               # redundant
        conv("q4", "<think>two plus two</think>It is four.", answer="4"),                          # boxed added
        conv("q5", "<think>two plus two</think>It is four."),                                     # format: no box
        {"image": "a.png", "question": "<image>\nq6", "cot": "count them", "answer": "3"},        # field form
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    stats = curate.clean_longcot(tmp_path / "m.jsonl", tmp_path / "out.jsonl", balance=False, progress=False)
    assert stats["kept"] == 3 and stats["duplicate"] == 1 and stats["redundant"] == 1 and stats["bad:format"] == 2
    kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept[0]["conversations"][1]["value"] == f"<think>\n{chain}\n</think>\nThe answer is \\boxed{{4}}."
    assert kept[1]["conversations"][1]["value"] == "<think>\ntwo plus two\n</think>\nIt is four. The answer is \\boxed{4}."
    assert kept[2]["conversations"][1]["value"] == "<think>\ncount them\n</think>\nThe answer is \\boxed{3}."
    ds = data.JsonlDataset(tmp_path / "out.jsonl", data.load_tokenizer(None), DataConfig(**TINY, label_mode="longcot"))
    assert len(list(ds.scan(progress=False))) == 3
    # length balancing: 6 chains of ~2 words, 2 of ~8 -> buckets {1: 6, 3: 2}, median 4: the big bucket -> 4
    lines = [conv(f"s{i}", "<think>a b</think>\\boxed{1}") for i in range(6)]
    lines += [conv(f"l{i}", "<think>a b c d e f g h</think>\\boxed{1}") for i in range(2)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    stats = curate.clean_longcot(tmp_path / "b.jsonl", tmp_path / "b_out.jsonl", progress=False)
    assert stats["cot_len_2^1_before"] == 6 and stats["cot_len_2^1_after"] == 4 and stats["cot_len_2^3_after"] == 2
    assert stats["kept"] == 6 and stats["length_balanced_away"] == 2


def test_cli_help_and_check(tmp_path, capsys):
    for main, cmd in [(data.main, "add-image-tokens"), (data.main, "check"), (curate.main, "filter"),
                      (curate.main, "caption2qa"), (data.main, "rebalance"), (curate.main, "curate-instructions"),
                      (curate.main, "curate-video"), (curate.main, "clean-longcot"), (synth.main, "charts"),
                      (synth.main, "")]:
        with pytest.raises(SystemExit) as e:
            main(([cmd] if cmd else []) + ["--help"])
        assert e.value.code == 0
        assert f"{cmd} [-h]" in capsys.readouterr().out                # that command's own help, not another's
    path, expected = salted_manifest(tmp_path)
    with pytest.raises(SystemExit) as refused:                            # 16 of 28 bad: training would refuse it
        data.main(["check", str(path), "--preset", "tiny", "--max-len", "300"])
    assert refused.value.code == 1
    data.main(["check", str(path), "--preset=tiny", "--max_len=300", "--max-bad-fraction=0.6"])   # both spellings
    out = capsys.readouterr()
    assert f"bad samples by reason: {dict(sorted(expected.items()))}" in out.out and "m.jsonl:" in out.err
    assert "112-px tiles, 16 tokens each" in out.out                  # the tiny preset's geometry, not 448 px


def test_check_counts_tokens_with_the_checkpoints_tokenizer_and_refuses_what_training_refuses(synth_dir, tmp_path,
                                                                                                   capsys):
    """`data.py check --ckpt DIR` counts with DIR's tokenizer (it travels with the weights; training
    from DIR reads it), not the embedded byte one (2x the tokens of the synthetic BPE); an empty
    manifest, which training refuses, exits 1; `rebalance` names each bad line as check does and
    refuses an empty manifest in one line."""
    import model
    import shutil
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps(model.preset_config("tiny").to_dict()))
    shutil.copy(synth_dir / "tokenizer.json", tmp_path / "ck")
    manifest = str(synth_dir / "text" / "train.jsonl")

    def checked(*argv):
        data.main(["check", manifest, *argv])
        return capsys.readouterr().out.splitlines()[-1]
    own, given, embedded = checked("--ckpt", str(tmp_path / "ck")), checked("--tokenizer", str(synth_dir)), checked()
    assert own == given != embedded and "tokens per sample" in own
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(tmp_path / "empty.jsonl")])
    assert e.value.code == 1 and "training would refuse" in capsys.readouterr().err
    path, expected = salted_manifest(tmp_path)
    data.main(["rebalance", str(path)])
    out = capsys.readouterr()
    import ast
    counts = ast.literal_eval(out.out.split("bad samples by reason: ")[1].split(" of ")[0])   # what a parse refuses
    assert counts["json"] == expected["json"] and "bad lines weigh as empty texts" in out.out
    assert out.err.count(f"[data] skipping bad sample (") == out.err.count(f": {path}:") == sum(counts.values())


def test_cli_usage_errors_are_one_line_with_exit_2(tmp_path, capsys):
    from test_replicate import write_qwen_tokenizer
    qwen = write_qwen_tokenizer(tmp_path / "qwen")                     # Qwen3's added tokens, not SAIL-VL2's
    (tmp_path / "m.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    for argv, match in ((["check", str(tmp_path / "nosuch.jsonl")], "manifest not found"),
                        (["check", "--ckpt", str(tmp_path / "nosuch"), str(tmp_path / "m.jsonl")],
                         f"--ckpt {tmp_path / 'nosuch'}: not a checkpoint folder (no config.json)"),
                        (["rebalance", str(tmp_path / "empty.jsonl")], "holds no samples"),
                        (["check", "--tokenizer", str(qwen), str(tmp_path / "m.jsonl")],
                         f"--tokenizer {qwen} lacks SAIL-VL2's <img>, </img>, <IMG_CONTEXT>"),
                        (["check", "--preset", "nosuch", str(tmp_path / "m.jsonl")], "unknown model preset 'nosuch'")):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and match in err, err


def test_prompt_inputs(tmp_path):
    tok, cfg = data.load_tokenizer(None), DataConfig(**TINY)
    save_png(tmp_path / "a.png")
    s = data.prompt_inputs(tok, cfg, "What?", images=[tmp_path / "a.png"], think=True, system="S")
    block = "<img>" + "<IMG_CONTEXT>" * 16 + "</img>"
    assert tok.decode(s["input_ids"].tolist()) == (f"<|im_start|>system\nS<|im_end|><|im_start|>user\n{block}\nWhat?\n"
                                                   f"{THINK}<|im_end|><|im_start|>assistant\n")
    assert s["pixel_values"].shape == (1, 3, 112, 112) and s["answer"] is None
    pil = data.prompt_inputs(tok, cfg, [("user", "<image>\nA"), ("assistant", "B"), ("user", "C")],
                             images=[Image.open(tmp_path / "a.png")])
    assert tok.decode(pil["input_ids"].tolist()).endswith(
        f"user\n{block}\nA<|im_end|><|im_start|>assistant\nB<|im_end|><|im_start|>user\nC<|im_end|><|im_start|>assistant\n")
    assert (pil["labels"] == -100).all()


def test_the_offline_tools_count_and_show_each_bad_line_with_file_and_line(tmp_path, capsys):
    """manifest_records (tests/curate.py's reader) on the salted manifest: every malformed line (an
    integer past 4,300 digits included) and every bad record counted, each shown with file and line."""
    path, expected = salted_manifest(tmp_path)
    counts = Counter()
    assert len(list(data.manifest_records(path, "t", counts, progress=False))) >= 12
    # (a record without a reply is a prompt to the offline tools; training refuses it: schema)
    assert counts["bad:json"] == expected["json"] and counts["bad:schema"] == expected["schema"] - 1
    shown = capsys.readouterr().err
    for number, line in enumerate(path.read_text().split("\n"), start=1):
        try:
            json.loads(line)
        except (ValueError, RecursionError):
            if line:
                assert f"(json): {path}:{number}: malformed JSON" in shown, number


def test_the_offline_tools_read_manifests_as_training_does(tmp_path):
    """manifest_records (tests/curate.py's reader) splits lines at \\n only, as JsonlDataset does:
    a BOM, CRLF endings and U+2028 / U+0085 inside JSON strings are no bad lines, an undecodable
    line is one, and every line keeps its number."""
    rec = lambda text: json.dumps({"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "x"}]},
                                  ensure_ascii=False).encode()              # noqa: E731
    body = b"\xef\xbb\xbf" + rec("a\u2028b") + b"\r\n" + rec("c\x85d") + b"\r\n" + b"\xff\xfe{}\r\n" + rec("e") + b"\n"
    (tmp_path / "m.jsonl").write_bytes(body)
    counts = Counter()
    got = [where for where, _, _ in data.manifest_records(tmp_path / "m.jsonl", "t", counts, progress=False)]
    assert [w.rsplit(":", 1)[1] for w in got] == ["1", "2", "4"] and counts == Counter({"bad:json": 1})
    ds = data.JsonlDataset(tmp_path / "m.jsonl", data.load_tokenizer(None))
    assert [ds.where(i).rsplit(":", 1)[1] for i in range(len(ds))] == ["1", "2", "3", "4"]


def test_a_split_on_a_string_is_refused():
    """tiktoken encodes only a split pattern's matches: an HF Split on a String (whose text between
    matches HF keeps) would drop text, so such a tokenizer folder is refused."""
    with pytest.raises(ValueError, match="String is not supported"):
        data._pattern_of({"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated"}, "tok")


# ----------------------------------------------------------------------------------------------
# gaps found by mutation testing: media order, max_len and bad-fraction boundaries, early stop,
# decode failures, per-epoch orders, n-gram weight clipping, the text-only view

def test_a_video_and_an_image_without_placeholders_open_the_turn_video_first_in_pixel_order(tmp_path):
    """Missing placeholders: "<video>\\n" per video, then "<image>\\n" per image; the <IMG_CONTEXT>
    blocks (1 tile per frame, 3 tiles for a 2x1 image) and the pixel tiles follow placeholder order,
    also when a written <video> comes before a written <image>."""
    tok = data.load_tokenizer(None)
    cfg = DataConfig(image_size=112, max_tiles=4, num_frames=3)          # 16 tokens per tile
    save_png(tmp_path / "b.png", size=(224, 112))                         # 2x1 grid + thumbnail = 3 tiles
    write_gray_video(tmp_path / "v.mp4", [10, 60, 110, 160, 210, 250])
    img = lambda n: "<img>" + "<IMG_CONTEXT>" * n + "</img>"              # noqa: E731
    frames = f"Frame1: {img(16)}\nFrame2: {img(16)}\nFrame3: {img(16)}\n"
    lines = [{"image": "b.png", "video": "v.mp4", "conversations": [{"from": "human", "value": "Q"},
                                                                    {"from": "gpt", "value": "A"}]},
             {"image": "b.png", "video": "v.mp4", "conversations": [{"from": "human", "value": "Clip: <video>\nPic: <image>\nQ"},
                                                                    {"from": "gpt", "value": "A"}]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = data.JsonlDataset(tmp_path / "m.jsonl", tok, cfg)
    tiles = vit.load_image(str(tmp_path / "b.png"), max_tiles=4, image_size=112)[0]
    for i, user in enumerate([f"{frames}{img(48)}\nQ", f"Clip: {frames}Pic: {img(48)}\nQ"]):
        s = ds[i]
        assert tok.decode(s["input_ids"].tolist()) == (f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{user}"
                                                       "<|im_end|><|im_start|>assistant\nA<|im_end|>")
        assert s["tiles"] == [1, 1, 1, 3] and s["image_tokens"] == [16, 16, 16, 48] and s["n_images"] == 2
        assert s["pixel_values"].shape == (6, 3, 112, 112) and torch.equal(s["pixel_values"][3:], tiles)
        gray = s["pixel_values"][:3]                                       # the frames: flat gray, not red
        assert (gray.amax(dim=(2, 3)) - gray.amin(dim=(2, 3))).abs().max() < 0.2 and not torch.equal(gray, tiles[:3])


def test_max_len_keeps_a_sample_of_exactly_max_len_tokens(tmp_path):
    """'longer samples are bad input': n tokens load at max_len n and are too_long at n - 1 (chat and text)."""
    tok = data.load_tokenizer(None)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a red circle."}) + "\n")
    for path, mode in ((chat_record(tmp_path, "a red circle."), "sft"), (tmp_path / "t.jsonl", "text")):
        n = len(data.JsonlDataset(path, tok, DataConfig(label_mode=mode))[0]["input_ids"])
        assert len(data.JsonlDataset(path, tok, DataConfig(label_mode=mode, max_len=n))[0]["input_ids"]) == n
        with pytest.raises(DataError) as e:
            data.JsonlDataset(path, tok, DataConfig(label_mode=mode, max_len=n - 1))[0]
        assert e.value.reason == "too_long"


def text_manifest(path, n_good, n_bad):
    """n_good one-line text records and n_bad malformed lines, interleaved."""
    lines = [json.dumps({"text": f"sample {i}."}) for i in range(n_good)] + ["not json"] * n_bad
    random.Random(0).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_bad_fraction_equal_to_max_bad_fraction_is_accepted(tmp_path):
    """max_bad_fraction is the share training accepts: 1 bad of 4 trains at 0.25, stops at 0.24."""
    path = text_manifest(tmp_path / "m.jsonl", 3, 1)
    tok = data.load_tokenizer(None)
    stream = data.Mixture([path], tok, DataConfig(max_bad_fraction=0.25, bad_check_after=4), verbose=False)
    for _ in range(3 * 4):                                 # four epochs, each judged at its end
        stream.next()
    assert stream.bad.seen == 4 and dict(stream.bad.counts) == {"json": 1}
    stream = data.Mixture([path], tok, DataConfig(max_bad_fraction=0.24, bad_check_after=4), verbose=False)
    with pytest.raises(data.TooMuchBadData, match="1 of 4"):
        for _ in range(3 * 4):
            stream.next()
    bad = data.BadData(max_fraction=0.25, check_after=1, show=False)     # the counter itself, by hand
    for _ in range(3):
        bad.good()
    bad.bad(DataError("json", "m:1", "x"))                                 # 1 of 4: 0.25, accepted
    with pytest.raises(data.TooMuchBadData):
        bad.bad(DataError("json", "m:2", "x"))                             # 2 of 5: 0.4


def test_too_much_bad_data_stops_once_bad_check_after_samples_were_seen_not_at_the_epochs_end(tmp_path):
    """Half of a 200-line manifest is bad: with bad_check_after 10 the stream stops after about 10
    samples, long before the epoch's end (where the verdict would come without the early check)."""
    path = text_manifest(tmp_path / "m.jsonl", 100, 100)
    stream = data.Mixture([path], data.load_tokenizer(None), DataConfig(max_bad_fraction=0.2, bad_check_after=10),
                          verbose=False)
    with pytest.raises(data.TooMuchBadData, match="max_bad_fraction"):
        for _ in range(200):
            stream.next()
    assert stream.epoch == 0 and 10 <= stream.bad.seen <= 30 and stream.pos < 50


def test_a_sample_whose_pixels_fail_after_its_header_is_counted_bad_once(tmp_path):
    """The trainer's path: the plan reads the header (counted good), decoding then fails and the
    trainer calls record_decode_failure: the sample turns bad without being seen twice, and later
    visits that fail again change nothing."""
    save_png(tmp_path / "full.png", colour=(1, 2, 3))
    (tmp_path / "trunc.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "trunc.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}) + "\n")
    stream = data.Mixture([tmp_path / "m.jsonl"], data.load_tokenizer(None),
                          DataConfig(image_size=112, max_bad_fraction=1.0), verbose=False)
    for visit in range(3):                                   # one visit per epoch of this one-line manifest
        found = []
        k = stream.next_meta(found)[0]
        stream.record(found)
        with pytest.raises(DataError) as e:
            stream.load(k)
        stream.record_decode_failure(k, e.value)
        assert stream.bad.seen == 1 and dict(stream.bad.counts) == {"image": 1}, visit


def test_each_epoch_visits_the_samples_in_a_new_order(tmp_path):
    """order(epoch): a permutation of the manifest per epoch, reshuffled each epoch, the same in a second mixture."""
    path = text_manifest(tmp_path / "m.jsonl", 30, 0)
    tok = data.load_tokenizer(None)
    a, b = (data.Mixture([path], tok, seed=2, verbose=False) for _ in range(2))
    orders = [a.order(e) for e in range(3)]
    assert all(sorted(o.tolist()) == list(range(30)) for o in orders)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert all(np.array_equal(o, b.order(e)) for e, o in enumerate(orders))


def test_ngram_weights_are_clipped_to_ten_times_the_mean_and_renormalised():
    """99 copies of one phrase and one rare phrase, alpha = 1: raw weights 1/99 and 1, over their mean
    2/100: 100/198 and 50; 50 is clipped to 10, and over the new mean 0.6: 250/297 and 50/3."""
    w = data.ngram_weights(["a b c"] * 99 + ["x y z"], n=3, alpha=1.0)
    np.testing.assert_allclose(w[:99], 250 / 297, rtol=1e-12)
    np.testing.assert_allclose(w[99], 50 / 3, rtol=1e-12)


def test_samples_without_ngrams_get_the_neutral_weight():
    """A text with no 3-gram (one word; a bad line's '') weighs the mean weight, 1; the others as hand-computed."""
    w = data.ngram_weights(["a b c", "a b c", "x y z", "hi", ""], n=3, alpha=0.5)
    raw = np.array([2 ** -0.5, 2 ** -0.5, 1.0])
    np.testing.assert_allclose(w, np.r_[raw / raw.mean(), 1.0, 1.0], rtol=1e-12)


def test_drop_media_gives_the_text_only_view_of_a_media_record(tmp_path):
    """DataConfig.drop_media (a text-only stage): placeholders and media removed, the turn stripped."""
    tok = data.load_tokenizer(None)
    save_png(tmp_path / "a.png")
    write_gray_video(tmp_path / "v.mp4", [10, 60, 110])
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red."}]},
        {"image": ["a.png"], "video": "v.mp4", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]))
    ds = data.JsonlDataset(tmp_path / "m.jsonl", tok, DataConfig(image_size=112, num_frames=3, drop_media=True))
    for i, (q, a) in enumerate([("What colour?", "red."), ("Q", "A")]):
        s = ds[i]
        assert tok.decode(s["input_ids"].tolist()) == (f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n{q}"
                                                       f"<|im_end|><|im_start|>assistant\n{a}<|im_end|>")
        assert s["pixel_values"] is None and s["tiles"] == [] and s["n_images"] == s["n_visual_tokens"] == 0


def test_progress_bars_stay_out_of_log_files():
    """A bar asked for draws on a terminal only: in a log file its carriage returns glued the log's
    own lines (`grep '^eval' log` found none of rl.py's evaluation lines)."""
    import io
    from tqdm import tqdm
    log = io.StringIO()                                  # no terminal
    for show in (True, False):
        list(tqdm(range(3), desc="rollouts", file=log, disable=data.no_bar(show)))
    assert log.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    list(tqdm(range(3), desc="rollouts", file=term, disable=data.no_bar(True)))
    assert "rollouts" in term.getvalue()
