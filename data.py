"""Everything between files on disk and the tensors SAIL-VL2 eats (arXiv 2509.14033, §3; §2.2, §4.2 formats).

Sections, in the paper's order:

  1. Tokenizer       Qwen3's byte-level BPE as a tiktoken Encoding; embedded byte-level default; SAIL-VL2's
                     image tokens added to a Qwen folder at the official ids (§2.2 LLM)
  2. Chat template   `univl-chat` (the official conversation template), `<image>`/`<video>` expansion,
                     label masking per training mode (SFT §4.2.1, LongCoT §4.2.2, Think-Fusion §4.2.4),
                     `split_think` (a reply's thinking and answer)
  3. Records         JSONL manifests (LLaVA/InternVL `conversations`, `messages`, `text`), a sample's
                     tokens and tiles from image headers (no pixels: packing plans), bad-input policy,
                     `manifest_records` (the offline tools' one manifest reader)
  4. Resampling      dataset-level mixture (§3.2.2 step 1), n-gram linguistic rebalancing (step 2),
                     the deterministic, resumable training stream
  5. Synthetic data  the names components read of the embedded default dataset (families, its words)
                     and `ensure_synth`, which has tests/synth.py make it on first use
  6. Command line    `python data.py {add-image-tokens,check,rebalance} --help`

Images (8-bit RGB, official dynamic tiling, AnyRes) and video frames are SAIL-ViT's input: vit.py
(§2.1), with `DataError`, imported here. Beside the pipeline, elsewhere: the grading API in
sample.py, the synthetic dataset's generator, its BPE trainer and §3.1's chart data in
tests/synth.py, and the data curation tools (§3.1 quality filter and caption -> QA, §4.1, §4.2.2
LongCoT cleaning) in tests/curate.py.

Conventions: `labels` are aligned with `input_ids` (the model shifts them, as HF does) and hold -100
where no loss is taken. Every bad input raises `DataError` naming file and line; datasets skip and
count such samples and stop when too many are bad. Nothing here downloads anything.
"""
import argparse
import base64
import functools
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter, namedtuple
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tiktoken
import torch
from PIL import Image
from tqdm import tqdm

from vit import DataError, anyres_size, load_image, load_image_anyres, load_video, tile_grid


class TooMuchBadData(RuntimeError):
    """Raised when the fraction of bad samples passes DataConfig.max_bad_fraction."""


@dataclass
class DataConfig:
    """How samples are turned into tensors. Defaults are the official SAIL-VL2-2B values; a model's
    own geometry comes from `DataConfig.from_model(model_cfg)` (field names as in the model config)."""
    image_size: int = 448          # tile side = vision_config.image_size (official 448; the tiny preset 112)
    patch_size: int = 14           # ViT patch side
    downsample_ratio: float = 0.5  # pixel shuffle: 1/ratio x 1/ratio patches become one visual token
    min_tiles: int = 1
    max_tiles: int = 12            # config.json max_dynamic_patch (the processor file says 10)
    use_thumbnail: bool = True
    anyres: bool = False           # AnyRes variant (§2.1.2): one variable-size image instead of tiles
    anyres_max_patches: int = 16384  # ViT patches per image: 1792x1792 at patch 14, the paper's maximum
    anyres_min_patches: int = 16
    num_frames: int = 16           # frames sampled per video (unverified for SAIL-VL2: InternVL-style)
    max_len: int = 8192            # longer samples are bad input (reason 'too_long')
    label_mode: str = "sft"        # sft | longcot | thinkfusion | rl | text (see LABEL_MODES)
    think: str = "auto"            # auto | on | off: append THINK_PROMPT to user turns
    system: str = ""               # empty -> DEFAULT_SYSTEM
    max_bad_fraction: float = 0.05
    bad_check_after: int = 100     # judge the bad fraction only after this many samples
    drop_media: bool = False       # text-only view: placeholders and media removed (lm0 learns the chat format)
    image_root: str = ""           # folder relative image/video paths start from ("" = each manifest's folder)

    def __post_init__(self):
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"DataConfig.label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.think not in ("auto", "on", "off"):
            raise ValueError(f"DataConfig.think must be auto, on or off, got {self.think!r}")
        if self.image_size % (self.patch_size * self.merge):
            raise ValueError(f"DataConfig.image_size {self.image_size} must be a multiple of patch_size / "
                             f"downsample_ratio = {self.patch_size * self.merge}")

    @classmethod
    def from_model(cls, m, **overrides) -> "DataConfig":
        """The data geometry a model was built for (`m`: a model.SAILVLConfig; read by attribute, so
        data.py needs no import of model.py), then `overrides` (max_len, label_mode, ...)."""
        geometry = dict(image_size=m.vision_config.image_size, patch_size=m.vision_config.patch_size,
                        downsample_ratio=m.downsample_ratio, min_tiles=m.min_dynamic_patch,
                        max_tiles=m.max_dynamic_patch, use_thumbnail=m.use_thumbnail, anyres=m.anyres,
                        anyres_max_patches=m.anyres_max_patches, system=m.system_prompt,
                        max_len=m.llm_config.max_position_embeddings)
        return cls(**{**geometry, **overrides})

    @property
    def merge(self) -> int:
        """Patches merged per side by the pixel shuffle: 1 / downsample_ratio (2 for SAIL-VL2)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per tile after pixel shuffle: (448/14)^2/4 = 256; (112/14)^2/4 = 16."""
        return (self.image_size // self.patch_size // self.merge) ** 2


# ----------------------------------------------------------------------------------------------
# 1. Tokenizer: Qwen3's byte-level BPE in tiktoken
#
# HF `tokenizers` BPE repeatedly merges the adjacent pair with the best *merge priority* (its index
# in merges.txt); tiktoken repeatedly merges the adjacent pair whose *concatenated bytes* have the
# lowest rank, and uses that rank as the token id. The two agree when (a) each merged token is made
# by exactly one merge and (b) merged tokens' ids increase with merge priority: then rank(a+b) ==
# id(a+b) orders pairs exactly as priority(a, b) does. Qwen's vocab (ids 256+i for merge i) and any
# vocab trained by HF's BpeTrainer satisfy both; `bpe_ranks` checks them and refuses otherwise.

# Qwen2/Qwen3 pre-tokenizer (tokenizer.json: Split(Regex, Isolated) then ByteLevel(use_regex=false)).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's pattern, used when a tokenizer.json relies on ByteLevel(use_regex=true) instead.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# The SAIL-VL2 added tokens; in the embedded default they take ids 256.. in this order
# (model.TINY_IMG_CONTEXT_ID relies on <IMG_CONTEXT> being 263).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<img>", "</img>",
                  "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


class NFCEncoding(tiktoken.Encoding):
    """A tiktoken Encoding that applies Unicode NFC first, as Qwen's tokenizer.json normalizer does."""

    def encode(self, text, **kwargs):
        return super().encode(unicodedata.normalize("NFC", text), **kwargs)

    def encode_ordinary(self, text):
        return super().encode_ordinary(unicodedata.normalize("NFC", text))


def byte_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map used to spell byte-level vocab entries."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = map(chr, range(256, 512))                # the other bytes, in order, from U+0100 on
    return {b: chr(b) if b in printable else next(extra) for b in range(256)}


def bpe_ranks(vocab: dict, merges: list, where: str) -> dict:
    """tiktoken mergeable ranks (token bytes -> id) from an HF byte-level vocab and merge list."""
    b2u = byte_to_unicode()
    u2b = {u: b for b, u in b2u.items()}
    ranks = {}
    for b in range(256):
        if b2u[b] not in vocab:
            raise ValueError(f"{where}: byte-level vocab lacks the single byte {b} ({b2u[b]!r}); "
                             "tiktoken needs all 256")
        ranks[bytes([b])] = vocab[b2u[b]]
    last_id = -1
    for i, (left, right) in enumerate(merges):
        merged = left + right
        if merged not in vocab:
            raise ValueError(f"{where}: merge #{i} ({left!r}, {right!r}) makes {merged!r}, which is not in the vocab")
        try:
            token = bytes(u2b[c] for c in merged)
        except KeyError as e:
            raise ValueError(f"{where}: vocab entry {merged!r} is not byte-level (character {e})") from None
        if token in ranks:
            raise ValueError(f"{where}: merge #{i} makes {merged!r} a second time; tiktoken ranks tokens, not "
                             "merges, so it cannot reproduce this BPE")
        if vocab[merged] <= last_id:
            raise ValueError(f"{where}: merge #{i} makes id {vocab[merged]} after a merge made id {last_id}; "
                             "tiktoken uses ids as merge ranks, so merged-token ids must increase with priority")
        ranks[token] = last_id = vocab[merged]
    return ranks


def _pattern_of(pre_tokenizer, where: str) -> str:
    """The split regex of an HF pre-tokenizer spec (Qwen's Split+ByteLevel, or GPT-2's ByteLevel)."""
    if pre_tokenizer is None:
        raise ValueError(f"{where}: no pre_tokenizer; expected Qwen's Split + ByteLevel")
    parts = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    pattern = None
    for p in parts:
        if p["type"] == "Split":
            if p.get("behavior") != "Isolated" or p.get("invert"):
                raise ValueError(f"{where}: Split pre-tokenizer must be Isolated and not inverted, got {p}")
            if "Regex" not in p["pattern"]:      # a String split: tiktoken encodes only a pattern's matches,
                raise ValueError(f"{where}: Split on a String is not supported (only Qwen's Regex): the text "
                                 f"between its matches would be dropped")          # HF keeps them as pieces
            pattern = p["pattern"]["Regex"]
        elif p["type"] == "ByteLevel":
            if p.get("add_prefix_space"):
                raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported")
            if p.get("use_regex", True):
                pattern = GPT2_PATTERN if pattern is None else None
        else:
            raise ValueError(f"{where}: unsupported pre-tokenizer {p['type']!r}")
        if pattern is None:
            raise ValueError(f"{where}: pre-tokenizer splits twice; only one split regex is supported")
    return pattern


def folder_tokens(folder) -> tuple:
    """(tokenizer.json as a dict or None, BPE vocab, {added token: id}) of a tokenizer folder, read without
    building the tokenizer; added tokens from tokenizer.json, added_tokens.json, tokenizer_config.json."""
    folder, spec, added = Path(folder), None, {}
    if (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab, added = spec["model"]["vocab"], {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    else:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    if (folder / "added_tokens.json").exists():
        added.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
    if (folder / "tokenizer_config.json").exists():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for idx, entry in config.get("added_tokens_decoder", {}).items():
            added[entry["content"]] = int(idx)
    return spec, vocab, added


def load_tokenizer(path=None) -> tiktoken.Encoding:
    """A Qwen2/Qwen3 tokenizer folder as a tiktoken Encoding that encodes and decodes as HF does.

    Reads `tokenizer.json`, or `vocab.json` + `merges.txt`, plus added tokens (all of them become
    tiktoken special tokens, matched before pre-tokenization as HF does; encode with
    `allowed_special="all"`, see `encode`). `None` gives the embedded default: the 256 bytes as ids
    0..255 and SPECIAL_TOKENS from 256 on. Never downloads.
    """
    if path is None:
        return tiktoken.Encoding("sailvl-bytes", pat_str=QWEN_PATTERN,
                                 mergeable_ranks={bytes([b]): b for b in range(256)},
                                 special_tokens={t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})
    folder = Path(path)
    if not has_tokenizer(folder):
        raise FileNotFoundError(f"{folder}: no tokenizer.json, and no vocab.json + merges.txt")
    spec, vocab, added = folder_tokens(folder)
    if spec is not None:
        where = str(folder / "tokenizer.json")
        model = spec["model"]
        if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") \
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
                or model.get("ignore_merges"):
            raise ValueError(f"{where}: expected a plain byte-level BPE model (no dropout, byte_fallback, "
                             f"affixes or ignore_merges), got { {k: v for k, v in model.items() if k not in ('vocab', 'merges')} }")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        pattern = _pattern_of(spec.get("pre_tokenizer"), where)
        normalizer = spec.get("normalizer")
        if normalizer not in (None, {"type": "NFC"}):
            raise ValueError(f"{where}: unsupported normalizer {normalizer}; only NFC (Qwen) or none")
        nfc = normalizer is not None
    else:
        where = str(folder / "merges.txt")
        merges = [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        pattern, nfc = QWEN_PATTERN, True   # Qwen2Tokenizer: NFC, Qwen's split regex
    ranks = bpe_ranks(vocab, merges, where)
    clash = set(added.values()) & set(ranks.values())
    if clash:
        raise ValueError(f"{folder}: added-token ids {sorted(clash)[:5]} are also BPE token ids")
    cls = NFCEncoding if nfc else tiktoken.Encoding
    return cls(f"hf-{folder.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)


def encode(tok: tiktoken.Encoding, text: str) -> list:
    """Token ids of `text` with added tokens recognised anywhere, as HF's tokenizer does."""
    return tok.encode(text, allowed_special="all")


Tokens = namedtuple("Tokens", "img_context img_start img_end im_start im_end think_start think_end eos pad endoftext")


def special_ids(tok: tiktoken.Encoding) -> Tokens:
    """Ids of the tokens the rest of the project needs; eos is <|im_end|>, pad is <|endoftext|>
    (the official SAIL-VL2-2B tokenizer_config.json)."""
    def get(t):
        try:
            return tok.encode_single_token(t)
        except KeyError:
            raise ValueError(f"tokenizer {tok.name} has no {t} token, which SAIL-VL2 needs (`python data.py "
                             "add-image-tokens DIR OUT` adds SAIL-VL2's tokens to a Qwen tokenizer folder)") from None
    im_end, endoftext = get("<|im_end|>"), get("<|endoftext|>")
    return Tokens(img_context=get("<IMG_CONTEXT>"), img_start=get("<img>"), img_end=get("</img>"),
                  im_start=get("<|im_start|>"), im_end=im_end, think_start=get("<think>"),
                  think_end=get("</think>"), eos=im_end, pad=endoftext, endoftext=endoftext)


@functools.lru_cache(maxsize=8)
def undecodable_ids(tok: tiktoken.Encoding) -> tuple:
    """Ids below the tokenizer's size that it cannot decode: vocab entries that no merge makes (bpe_ranks
    keeps what tiktoken can rank; Qwen3's vocab has none, a cut-down test vocab many). Never generated:
    a sampled one would stop the decoding of its reply. Once per tokenizer: RL asks per micro-batch."""
    known = set(tok._mergeable_ranks.values()) | set(tok._special_tokens.values())
    return tuple(i for i in range(tok.n_vocab) if i not in known)


# A Qwen3 tokenizer folder has no <img>, </img>, <IMG_CONTEXT>. SAIL-VL2's own folder
# (BytedanceDouyinContent/SAIL-VL2-2B, tokenizer_config.json `added_tokens_decoder`) keeps Qwen3's added
# tokens (<|endoftext|> 151643 ... </think> 151668) and appends its image and grounding tokens right after
# them, inside the 151,936-row embedding; `add_image_tokens` writes that layout into a copy of a Qwen folder.
# HF `tokenizers` renumbers added tokens after a gap, so the new ids must continue the folder's last id.
OFFICIAL_TOKEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                      "<think>": 151667, "</think>": 151668, "<img>": 151669, "</img>": 151670,
                      "<IMG_CONTEXT>": 151671, "<quad>": 151672, "</quad>": 151673, "<ref>": 151674,
                      "</ref>": 151675, "<box>": 151676, "</box>": 151677}
NOT_SPECIAL = ("<think>", "</think>")              # "special": false in the official file, as in Qwen3's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json")


def has_tokenizer(folder) -> bool:
    """Whether `folder` holds a tokenizer `load_tokenizer` reads (tokenizer.json, or vocab.json + merges.txt)."""
    f = Path(folder)
    return (f / "tokenizer.json").is_file() or ((f / "vocab.json").is_file() and (f / "merges.txt").is_file())


def missing_sail_tokens(folder) -> dict:
    """{token: official id} of SAIL-VL2's added tokens that the tokenizer folder lacks."""
    added = folder_tokens(folder)[2]
    return {t: i for t, i in OFFICIAL_TOKEN_IDS.items() if t not in added}


def _added_entry(token: str, idx: int) -> dict:
    return {"id": idx, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": token not in NOT_SPECIAL}


def write_atomic(path, text: str):
    """Write a text file by rename, so a reader (another rank, a crash) sees the old file or the new,
    never half of one. The project's one file writer (folders: model.atomic_write_dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")   # unique across hosts too
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)       # the rename itself, durable too (the folder's entries)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json(path, obj):
    """`obj` as indented JSON through write_atomic (reports, configs)."""
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def add_image_tokens(src, out) -> dict:
    """Copy the tokenizer files of Qwen folder `src` into `out` (created; `src` is never written) with
    SAIL-VL2's missing added tokens at their official ids, in tokenizer.json, tokenizer_config.json and
    added_tokens.json as present (added_tokens.json is created for a vocab.json + merges.txt folder
    that has neither). Returns {token: id} of what was added. Raises ValueError when an official id
    is taken or would leave a gap. Idempotent: the same `src` always gives the same bytes."""
    src, out = Path(src), Path(out)
    if not has_tokenizer(src):
        raise ValueError(f"{src}: no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    spec, vocab, added = folder_tokens(src)
    last = max([*vocab.values(), *added.values()])
    new = {t: i for t, i in sorted(OFFICIAL_TOKEN_IDS.items(), key=lambda kv: kv[1]) if t not in added}
    taken = {i: t for t, i in added.items()}
    for t, i in new.items():
        if i in taken or i <= last:
            raise ValueError(f"{src}: SAIL-VL2 puts {t} at id {i}, which this tokenizer already uses"
                             f"{f' for {taken[i]}' if i in taken else ''}")
    if new and list(new.values()) != list(range(last + 1, last + 1 + len(new))):
        raise ValueError(f"{src}: its last token id is {last}, but SAIL-VL2's ids for {', '.join(new)} are "
                         f"{', '.join(map(str, new.values()))}: they must follow on without a gap (HF tokenizers "
                         "renumbers added tokens after a gap); SAIL-VL2 continues Qwen3's layout (last id 151668)")
    files = {n: (src / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES if (src / n).is_file()}
    if new and spec is not None:                    # tokenizer.json, as folder_tokens read it
        spec["added_tokens"] = spec.get("added_tokens", []) + [_added_entry(t, i) for t, i in new.items()]
        files["tokenizer.json"] = json.dumps(spec, ensure_ascii=False, indent=2)
    if new and "tokenizer_config.json" in files:
        config = json.loads(files["tokenizer_config.json"])
        decoder = config.setdefault("added_tokens_decoder", {})
        decoder.update({str(i): {k: v for k, v in _added_entry(t, i).items() if k != "id"} for t, i in new.items()})
        files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2)
    if new and ("added_tokens.json" in files or not {"tokenizer.json", "tokenizer_config.json"} & set(files)):
        tokens = json.loads(files.get("added_tokens.json", "{}"))
        files["added_tokens.json"] = json.dumps({**tokens, **new}, ensure_ascii=False, indent=2)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_atomic(out / name, text)
    return new


# ----------------------------------------------------------------------------------------------
# 2. Chat template `univl-chat` (the official conversation.py / chat_template.jinja) and label masking
#
# MPT separator style: "<|im_start|>system\n{SYS}<|im_end|>" then, per turn,
# "<|im_start|>{role}\n{content}<|im_end|>" -- no newline after <|im_end|>. The system turn is always
# present. Each <image> becomes <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>.
# Video (our choice; the paper gives no frame protocol and the official code has no video path): one tile
# per frame, the <video> placeholder becomes "Frame1: <image>\nFrame2: <image>\n..." as in InternVL's chat().

DEFAULT_SYSTEM = "你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。"
THINK_PROMPT = ("You FIRST think about the reasoning process as an internal monologue and then provide the "
                "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
                "answer MUST BE put in \\boxed{}.")
IMAGE, VIDEO = "<image>", "<video>"
PLACEHOLDER_RE = re.compile(r"<image>|<video>\n?")
VIDEO_RE = re.compile(r"<video>\n?")       # the newline is swallowed: the frame lines end with one

# Which tokens carry loss, per mode (every mode trains every assistant turn plus its <|im_end|>):
#   sft          the whole assistant content
#   longcot      the whole content, which must open with a non-empty <think>...</think> (T then A)
#   thinkfusion  CoT turns (non-empty think): T and A; direct turns (no or empty think block): A only
#   rl           prompt only (the trailing assistant turn is dropped, generation prompt added); no loss
#   text         plain-text LM pretraining: {"text": ...} records, loss on every token. A text record
#                is such an LM sample in every mode but rl (pre-training mixes add text this way).
LABEL_MODES = ("sft", "longcot", "thinkfusion", "rl", "text")


def image_block(n_tokens: int) -> str:
    """The text that stands for one image (or tile set) of `n_tokens` visual tokens."""
    return "<img>" + "<IMG_CONTEXT>" * n_tokens + "</img>"


def video_prompt(n_frames: int) -> str:
    """What a <video> placeholder becomes before image expansion: one <image> line per frame."""
    return "".join(f"Frame{i}: {IMAGE}\n" for i in range(1, n_frames + 1))


def expand_placeholders(text: str, blocks: list, where: str = "<text>") -> str:
    """Replace each <image> of `text`, in order, by the next string of `blocks` (see image_block)."""
    if text.count(IMAGE) != len(blocks):
        raise DataError("placeholder_mismatch", where, f"{text.count(IMAGE)} <image> placeholders for {len(blocks)} images")
    it = iter(blocks)
    return re.sub(re.escape(IMAGE), lambda m: next(it), text)


def split_think(text: str):
    """(thinking, answer region) of a reply `...<think>T</think>A` (T from the first `<think>` to
    the last `</think>`), or None when it has no closed think block."""
    start, end = text.find("<think>"), text.rfind("</think>")
    return None if start < 0 or end < start else (text[start + len("<think>"):end], text[end + len("</think>"):])


def think_turn(content: str, where: str):
    """(think_text, rest) of a training assistant turn that opens with <think>...</think>, else
    (None, content); DataError for any other use of the tags (replies are read with split_think)."""
    head, thought, rest = content.lstrip(), None, content
    if head.startswith("<think>"):
        if "</think>" not in head:
            raise DataError("format", where, "<think> is never closed by </think>")
        thought, rest = head[len("<think>"):].split("</think>", 1)
    if "<think>" in (thought or "") or "<think>" in rest or "</think>" in rest:
        raise DataError("format", where, "<think> tags must open the assistant turn and be closed once")
    return thought, rest


def chat_segments(turns: list, system: str = DEFAULT_SYSTEM, mode: str = "sft", think: bool = False,
                  add_generation_prompt: bool = False, where: str = "<chat>") -> list:
    """The univl-chat text as (string, trained) pieces. `turns`: [(role, content)], role user|assistant."""
    if mode not in LABEL_MODES or mode == "text":
        raise ValueError(f"chat mode must be one of {LABEL_MODES[:-1]}, got {mode!r}")
    segs = [(f"<|im_start|>system\n{system}<|im_end|>", False)]
    for role, content in turns:
        if role == "user":
            text = f"{content}\n{THINK_PROMPT}" if think else content
            segs.append((f"<|im_start|>user\n{text}<|im_end|>", False))
            continue
        segs.append(("<|im_start|>assistant\n", False))
        if mode in ("sft", "rl"):       # rl: earlier assistant turns are context, never trained
            segs.append((content + "<|im_end|>", mode == "sft"))
            continue
        thought, answer = think_turn(content, where)
        if mode == "longcot" and not (thought or "").strip():
            raise DataError("format", where, "longcot needs every assistant turn to open with a non-empty <think>…</think>")
        if mode == "thinkfusion" and thought is not None and not thought.strip():
            end = content.index("</think>") + len("</think>")   # untrained: the empty block and its line
            cut = len(content) - len(content[end:].lstrip("\r\n"))   # breaks; a space stays with the first word
            segs += [(content[:cut], False), (content[cut:] + "<|im_end|>", True)]   # (BPE makes " The" one token)
        else:
            segs.append((content + "<|im_end|>", True))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def render_chat(turns: list, system: str = DEFAULT_SYSTEM, think: bool = False,
                add_generation_prompt: bool = False) -> str:
    """The univl-chat string (no token expansion of <image>; see expand_placeholders)."""
    return "".join(s for s, _ in chat_segments(turns, system, "sft", think, add_generation_prompt))


def tokenize_segments(tok: tiktoken.Encoding, segs: list):
    """(input_ids, labels) of the concatenated pieces, tokenized as one string (exactly as HF would),
    each token labelled by the piece its first character falls in."""
    if isinstance(tok, NFCEncoding):
        segs = [(unicodedata.normalize("NFC", s), t) for s, t in segs]
    ids = encode(tok, "".join(s for s, _ in segs))
    _, offsets = tok.decode_with_offsets(ids)
    starts = np.cumsum([0] + [len(s) for s, _ in segs[:-1]])
    piece = np.searchsorted(starts, np.asarray(offsets, dtype=np.int64), side="right") - 1
    trained = np.array([t for _, t in segs], dtype=bool)[piece]
    ids = np.asarray(ids, dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(np.where(trained, ids, -100))


# ----------------------------------------------------------------------------------------------
# 3. Records: JSONL manifests and the bad-input policy
#
# One sample a line (LLaVA / InternVL style); relative media paths start from the manifest's folder,
# or from DataConfig.image_root for datasets whose paths are relative to a dataset folder
# (LLaVA's "coco/train2017/....jpg" beside a manifest kept elsewhere):
#   {"image": "a.png" | [...], "video": "b.mp4" | [...], "conversations": [{"from": "human", "value":
#    "<image>\n..."}, {"from": "gpt", "value": "..."}], "answer": "7", "task": "count"}
#   {"messages": [{"role": "user", "content": "<image>..." | [{"type": "image"}, {"type": "text",
#    "text": "..."}]}, ...], "images": [...], "videos": [...]}
#   {"text": "..."}                                    (label_mode "text": LM pretraining)
# Missing placeholders are prepended to the first user turn, which then opens with "<video>\n" per
# video, then "<image>\n" per image; any other count mismatch is bad input.

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_PARTS = {"image": IMAGE, "image_url": IMAGE, "video": VIDEO}     # a typed content part's placeholder


@dataclass
class Record:
    """A parsed manifest line, before any media is decoded."""
    where: str                     # "manifest.jsonl:LINE"
    task: str                      # the record's "task", else the manifest's stem
    turns: list = None             # [(role, content)], role user|assistant
    system: str = None             # the record's own system prompt, if any
    images: list = None            # absolute paths
    videos: list = None
    answer: str = None             # ground truth for verifiable rewards / evaluation
    think: bool = None             # explicit thinking-mode flag of the record
    text: str = None               # plain-text record


def _content_text(content, where: str) -> str:
    """A message content (string or list of typed parts) as one string with <image>/<video> marks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError("schema", where, f"message content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif isinstance(kind, str) and kind in MEDIA_PARTS:
            out.append(MEDIA_PARTS[kind] + "\n")
        else:
            raise DataError("schema", where, f"unknown content part {part!r}")
    return "".join(out)


def _paths(value, base: Path, key: str, where: str) -> list:
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError("schema", where, f"'{key}' must be a path or a list of paths")
    return [str(base / v) for v in value]


def parse_record(obj, base: Path, where: str, task: str) -> Record:
    """Validate one JSON object from a manifest into a Record (DataError with the reason if bad)."""
    if not isinstance(obj, dict):
        raise DataError("schema", where, f"expected a JSON object, got {type(obj).__name__}")
    task = str(obj.get("task", task))
    answer = None if obj.get("answer") is None else str(obj["answer"])
    if "conversations" not in obj and "messages" not in obj:
        if isinstance(obj.get("text"), str):
            if "<IMG_CONTEXT>" in obj["text"]:
                raise DataError("placeholder_mismatch", where, "the text holds <IMG_CONTEXT>, the image slot token")
            return Record(where, task, text=obj["text"], answer=answer)
        raise DataError("schema", where, "a record needs 'conversations', 'messages' or 'text'")
    key, role_key, content_key = ("conversations", "from", "value") if "conversations" in obj else \
        ("messages", "role", "content")
    if not isinstance(obj[key], list):
        raise DataError("schema", where, f"'{key}' must be a list of turns, got {type(obj[key]).__name__}")
    raw = [(m.get(role_key), m.get(content_key)) if isinstance(m, dict) else (None, None) for m in obj[key]]
    system, turns = None, []
    for i, (role, content) in enumerate(raw):
        if not isinstance(role, str) or role not in ROLES or content is None:
            raise DataError("schema", where, f"turn {i}: expected a role in {sorted(ROLES)} and a content, got {role!r}")
        text = _content_text(content, where)
        if "<IMG_CONTEXT>" in text:        # an image slot only the expansion of <image> may place
            raise DataError("placeholder_mismatch", where, f"turn {i}: the text holds <IMG_CONTEXT>, the image slot token")
        if ROLES[role] == "system":
            if i:
                raise DataError("schema", where, "a system turn may only come first")
            system = text
        else:
            turns.append((ROLES[role], text))
    if not any(r == "user" for r, _ in turns):
        raise DataError("schema", where, "no user turn")
    images = _paths(obj.get("image", obj.get("images")), base, "image", where)
    videos = _paths(obj.get("video", obj.get("videos")), base, "video", where)
    think = obj.get("think")
    return Record(where, task, turns, system, images, videos, answer, None if think is None else bool(think))


def place_media(rec: Record) -> list:
    """The record's turns with placeholders made explicit, checking counts against the media lists."""
    turns = list(rec.turns)
    for mark, media in ((IMAGE, rec.images), (VIDEO, rec.videos)):
        count = sum(c.count(mark) for _, c in turns)
        if count == 0 and media:
            first = next(i for i, (r, _) in enumerate(turns) if r == "user")
            turns[first] = ("user", (mark + "\n") * len(media) + turns[first][1])
        elif count != len(media):
            raise DataError("placeholder_mismatch", rec.where, f"{count} {mark} placeholders but {len(media)} "
                            f"{'images' if mark == IMAGE else 'videos'} given")
    return turns


Media = namedtuple("Media", "kind path tiles tokens")   # one image or video; tiles and tokens per <img> block


def image_geometry(width: int, height: int, cfg: DataConfig) -> tuple:
    """(tiles, visual tokens) that `load_image` gives a width x height image (the official tiling:
    tile_grid, plus the thumbnail when there are several tiles), or `load_image_anyres` (AnyRes:
    anyres_size). The size alone decides them, so packing plans need only the image's header."""
    if cfg.anyres:
        w, h = anyres_size(width, height, cfg.patch_size, cfg.downsample_ratio, cfg.anyres_max_patches,
                           cfg.anyres_min_patches)
        grid = cfg.patch_size * cfg.merge
        return 1, (w // grid) * (h // grid)
    cols, rows = tile_grid(width, height, cfg.min_tiles, cfg.max_tiles, cfg.image_size)
    n = cols * rows + (1 if cfg.use_thumbnail and cols * rows > 1 else 0)
    return n, n * cfg.tokens_per_tile


def image_size_of(path_or_image, where: str) -> tuple:
    """(width, height) from the file's header (Pillow reads no pixels before `load()`); DataError
    for a missing or unreadable file. A file truncated after its header passes here and fails in
    `open_image` when decoded."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image.size
    if not os.path.exists(path_or_image):
        raise DataError("missing_file", where, f"image file not found: {path_or_image}")
    try:
        with Image.open(path_or_image) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError("image", where, f"cannot decode image {path_or_image}: {e}") from None


def measure_media(rec: Record, turns: list, cfg: DataConfig) -> list:
    """The record's media in placeholder order (the order the model fills <IMG_CONTEXT> slots in),
    measured without decoding: an image's tiles and tokens from its header size, a video's from
    DataConfig.num_frames (one block of one tile per frame)."""
    images, videos = iter(rec.images), iter(rec.videos)
    out = []
    for m in PLACEHOLDER_RE.finditer("\0".join(c for _, c in turns)):
        if m.group(0) == IMAGE:
            path = next(images)
            n, tokens = image_geometry(*image_size_of(path, rec.where), cfg)
            out.append(Media("image", path, [n], [tokens]))
        else:
            path = next(videos)
            if not os.path.exists(path):
                raise DataError("missing_file", rec.where, f"video file not found: {path}")
            out.append(Media("video", path, [1] * cfg.num_frames, [cfg.tokens_per_tile] * cfg.num_frames))
    return out


def load_media(media: list, cfg: DataConfig, where: str, training: bool = False, rng=None) -> list:
    """Decode measured media: a pixel tensor per image ((N, 3, S, S), AnyRes (1, 3, H, W)) and per
    video ((F, 3, S, S); AnyRes one (1, 3, S, S) per frame). The pixels must give what the header
    promised (the packing plan relies on it)."""
    pixels = []
    for m in media:
        if m.kind == "video":
            frames = load_video(m.path, cfg.num_frames, training, rng, cfg.image_size, where=where)
            pixels.extend(frames.split(1) if cfg.anyres else [frames])
            continue
        if cfg.anyres:
            pv, n = load_image_anyres(m.path, cfg.patch_size, cfg.downsample_ratio, cfg.anyres_max_patches,
                                      cfg.anyres_min_patches, where=where)
        else:
            pv, n = load_image(m.path, cfg.max_tiles, cfg.min_tiles, cfg.image_size, cfg.use_thumbnail, where=where)
        grid = cfg.patch_size * cfg.merge
        tokens = (pv.shape[-2] // grid) * (pv.shape[-1] // grid) if cfg.anyres else n * cfg.tokens_per_tile
        if ([n], [tokens]) != (m.tiles, m.tokens):
            raise DataError("image", where, f"{m.path}: its header gives {m.tiles[0]} tiles ({m.tokens[0]} tokens), "
                            f"its pixels {n} ({tokens})")
        pixels.append(pv)
    return pixels


def build_sample(rec: Record, tok: tiktoken.Encoding, cfg: DataConfig, training: bool = False, rng=None,
                 decode: bool = True) -> dict:
    """Measure (and decode) media, render the template and tokenize one record into a training sample.

    Keys: input_ids (L,) long; labels (L,) long, -100 = no loss; pixel_values (N, 3, S, S) float32 or
    None (AnyRes: a list of (1, 3, H, W), one per image or video frame); tiles: tiles per <img> block;
    image_tokens: <IMG_CONTEXT> count per block; n_images: images + videos of the record;
    n_visual_tokens; source ("file:line"); task; answer (str or None); label_mode "rl": question (the
    last user turn's text). With decode=False no pixel is decoded (pixel_values None) and every other
    key is as decoding gives it: tokens and tiles come from the image headers and the video frame
    count; only a file that fails after its header (a truncated image or video) is found by decoding.
    """
    mode = cfg.label_mode
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}")
    base = dict(source=rec.where, task=rec.task, answer=rec.answer)
    if mode == "text" or rec.text is not None:       # a text record is an LM sample in any mode but rl
        if rec.text is None or mode == "rl":
            raise DataError("schema", rec.where, f"label_mode {mode!r} needs a "
                            f"{'text' if mode == 'text' else 'conversations/messages'} record")
        ids = np.asarray(encode(tok, rec.text) + [special_ids(tok).endoftext], dtype=np.int64)
        ids, labels = torch.from_numpy(ids), torch.from_numpy(ids.copy())    # loss on every token
        if len(ids) > cfg.max_len:
            raise DataError("too_long", rec.where, f"{len(ids)} tokens > max_len {cfg.max_len}")
        return dict(input_ids=ids, labels=labels, pixel_values=None, tiles=[], image_tokens=[], n_images=0,
                    n_visual_tokens=0, **base)
    if mode == "rl" and rec.answer is None:
        raise DataError("schema", rec.where, "label_mode 'rl' needs an 'answer' field")
    if cfg.drop_media:
        rec = replace(rec, images=[], videos=[],
                      turns=[(r, PLACEHOLDER_RE.sub("", c).strip()) for r, c in rec.turns])
    turns = place_media(rec)
    if mode != "rl" and not any(r == "assistant" for r, _ in turns):
        raise DataError("schema", rec.where, f"label_mode {mode!r} trains on assistant turns: the record has none")
    if mode == "rl":                   # the question in words, for a judge of the reply (rl.py)
        turns = turns[:-1] if turns[-1][0] == "assistant" else turns
        base["question"] = PLACEHOLDER_RE.sub("", turns[-1][1]).strip()
    media = measure_media(rec, turns, cfg)
    tiles, tokens = [n for m in media for n in m.tiles], [n for m in media for n in m.tokens]
    blocks = iter(image_block(k) for k in tokens)
    expanded = []
    for role, content in turns:
        content = VIDEO_RE.sub(lambda m: video_prompt(cfg.num_frames), content)
        expanded.append((role, expand_placeholders(content, [next(blocks) for _ in range(content.count(IMAGE))],
                                                   rec.where)))
    think = {"on": True, "off": False}.get(cfg.think, rec.think)
    if think is None:     # "auto" and no flag in the record: what the mode implies
        think = mode in ("longcot", "rl") or (mode == "thinkfusion" and any(
            (think_turn(c, rec.where)[0] or "").strip() for r, c in turns if r == "assistant"))
    system = rec.system if rec.system is not None else (cfg.system or DEFAULT_SYSTEM)
    segs = chat_segments(expanded, system, mode, think, add_generation_prompt=(mode == "rl"), where=rec.where)
    ids, labels = tokenize_segments(tok, segs)
    if len(ids) > cfg.max_len:
        raise DataError("too_long", rec.where, f"{len(ids)} tokens > max_len {cfg.max_len}")
    pixels = load_media(media, cfg, rec.where, training, rng) if decode else []
    if not pixels:
        pixel_values = None
    elif cfg.anyres:
        pixel_values = pixels
    else:       # concatenated in numpy: see to_array on tiny torch ops
        pixel_values = pixels[0] if len(pixels) == 1 else torch.from_numpy(np.concatenate([p.numpy() for p in pixels]))
    return dict(input_ids=ids, labels=labels, pixel_values=pixel_values, tiles=tiles, image_tokens=tokens,
                n_images=len(rec.images) + len(rec.videos), n_visual_tokens=sum(tokens), **base)


def prompt_inputs(tok: tiktoken.Encoding, cfg: DataConfig, question, images=(), videos=(), think: bool = False,
                  system: str = None) -> dict:
    """A build_sample dict for generation: the univl-chat prompt up to "<|im_start|>assistant\n".
    `question`: a string, or [(role, content)] turns ending with a user turn; `images`: paths or PIL
    images; `videos`: paths. Missing placeholders are prepended as for training data."""
    turns = [("user", question)] if isinstance(question, str) else list(question)
    rec = Record("<prompt>", "prompt", turns=turns, system=system, images=list(images), videos=[str(v) for v in videos],
                 answer="", think=think)
    return {**build_sample(rec, tok, replace(cfg, label_mode="rl", think="auto")), "answer": None}


def no_bar(show: bool):
    """tqdm's `disable` for a progress bar: off when not asked for, and where stderr is no terminal
    (a log file, whose lines the bar's carriage returns would glue together)."""
    return None if show else True


class BadData:
    """Counts bad samples by reason, reports the first `show_first` (one line each, with file and
    line), and stops when too large a fraction is bad. Callers count each sample once."""

    def __init__(self, max_fraction: float = 0.05, check_after: int = 100, show_first: int = 20,
                 show: bool = True):
        self.max_fraction, self.check_after, self.show_first = max_fraction, check_after, show_first
        self.show = show
        self.seen, self.counts = 0, Counter()

    def good(self):
        self.seen += 1

    def bad(self, err: DataError, seen_before: bool = False):
        """Count a bad sample (`seen_before`: one already counted good, whose pixels failed to decode)."""
        self.seen += not seen_before
        self.counts[err.reason] += 1
        n = sum(self.counts.values())
        if self.show and n <= self.show_first:
            more = " (further bad samples are only counted)" if n == self.show_first else ""
            print(f"[data] skipping bad sample ({err.reason}): {err}{more}", file=sys.stderr)
        if self.seen >= self.check_after:
            self.check()

    def check(self):
        """Raise TooMuchBadData when the bad fraction so far passes the limit."""
        total = sum(self.counts.values())
        if self.seen and total > self.max_fraction * self.seen:
            raise TooMuchBadData(f"{total} of {self.seen} samples are bad ({total / self.seen:.1%} > "
                                 f"max_bad_fraction {self.max_fraction:.1%}): {self.report()}; fix the data "
                                 "(`python data.py check MANIFEST` lists every bad line) or raise max_bad_fraction")

    def report(self) -> str:
        if not self.seen:
            return "no samples seen"
        if not self.counts:
            return f"no bad samples in {self.seen}"
        return f"bad samples by reason: {dict(sorted(self.counts.items()))} of {self.seen} seen"

    def state_dict(self) -> dict:
        return {"seen": self.seen, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict):
        self.seen, self.counts = state["seen"], Counter(state["counts"])


def json_line(line: bytes, where: str):
    """One manifest line's JSON value, or DataError 'json' naming `where`: malformed, not UTF-8, an
    integer of more than 4,300 digits (Python's limit), nested past Python's recursion limit."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as e:         # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError("json", where, f"malformed JSON: {type(e).__name__}: {e}") from None


class JsonlDataset:
    """One JSONL manifest, indexed by line offsets; `load(i)` returns a sample or raises DataError."""

    def __init__(self, path, tok: tiktoken.Encoding, cfg: DataConfig = None, training: bool = False):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        self.tok, self.cfg, self.training = tok, cfg or DataConfig(), training
        self.offsets, self.line_numbers, offset, number = [], [], 0, 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self.offsets.append(offset), self.line_numbers.append(number)
                offset += len(line)
        if number > len(self.offsets):
            print(f"[data] {self.path}: {number - len(self.offsets)} blank lines ignored", file=sys.stderr)
        self.offsets, self.line_numbers = np.array(self.offsets, np.int64), np.array(self.line_numbers, np.int64)

    def __len__(self):
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.line_numbers[i]}"

    def record(self, i: int) -> Record:
        """The parsed record of sample i (DataError 'json' for a malformed line)."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        obj = json_line(line, self.where(i))
        base = Path(self.cfg.image_root).resolve() if self.cfg.image_root else self.path.parent
        return parse_record(obj, base, self.where(i), self.path.stem)

    def load(self, i: int, rng=None, decode: bool = True) -> dict:
        return build_sample(self.record(i), self.tok, self.cfg, self.training, rng, decode)

    __getitem__ = load

    def text_of(self, i: int, bad: "BadData" = None) -> str:
        """The record's words (all turns, placeholders removed) for n-gram statistics; '' if bad
        (counted and reported in `bad` when given)."""
        try:
            rec = self.record(i)
        except DataError as e:
            if bad is not None:
                bad.bad(e)
            return ""
        if bad is not None:
            bad.good()
        return PLACEHOLDER_RE.sub(" ", " ".join(c for _, c in rec.turns)) if rec.text is None else rec.text

    def scan(self, bad: BadData = None, progress: bool = True):
        """Load every sample once, in order; yields the good ones and counts the bad ones in `bad`."""
        bad = bad or BadData(self.cfg.max_bad_fraction, self.cfg.bad_check_after)
        for i in tqdm(range(len(self)), desc=f"check {self.path.name}", disable=no_bar(progress)):
            try:
                sample = self.load(i, np.random.default_rng(i))
            except DataError as e:
                bad.bad(e)
                continue
            bad.good()
            yield sample


def manifest_records(manifest, desc: str, counts: Counter, progress: bool = True, prepare=None, check=None):
    """(where = 'file:line', obj, rec) for each usable line of a JSONL manifest, with a progress bar; a
    malformed line or a bad record is counted in `counts` as bad:json / bad:<reason>, never silently
    dropped. `prepare(obj, where)` rewrites an object before it is parsed; `check(rec, where)` may
    refuse a parsed record by raising DataError. The offline data tools' one reader (tests/curate.py);
    the first bad lines are shown with file and line, as training shows them."""
    manifest = Path(manifest)
    shown = BadData(max_fraction=1.0)                    # only reports: a tool reads every line
    lines = manifest.read_bytes().split(b"\n")      # as JsonlDataset reads it: lines end at \n only (JSON
    if lines[0].startswith(b"\xef\xbb\xbf"):          # strings may hold U+2028 or U+0085 raw), a BOM ignored
        lines[0] = lines[0][3:]
    for number, line in enumerate(tqdm(lines, desc=f"{desc} {manifest.name}", disable=no_bar(progress)), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            obj = json_line(line, where)
            obj = prepare(obj, where) if prepare else obj
            rec = parse_record(obj, manifest.parent.resolve(), where, manifest.stem)
            if check:
                check(rec, where)
        except DataError as e:
            counts[f"bad:{e.reason}"] += 1
            shown.bad(e)
        else:
            yield where, obj, rec


def rebase_media(obj: dict, rec: Record, out_dir: Path) -> dict:
    """`obj` with its media paths rewritten relative to `out_dir` (where the new manifest goes)."""
    obj = {k: v for k, v in obj.items() if k not in ("image", "images", "video", "videos")}
    for key, paths in (("image", rec.images), ("video", rec.videos)):
        if paths:
            obj[key] = [os.path.relpath(p, out_dir.resolve()) for p in paths]
    return obj


# ----------------------------------------------------------------------------------------------
# 4. Resampling, §3.2.2, and the training stream
#
# Step 1 (basic pre-training): dataset-level rebalancing -- each manifest gets a sampling weight.
# Step 2 (multi-task pre-training): n-gram-level rebalancing of caption / synthetic-VQA text. The
# paper gives no formula; our design: let df(g) be the number of samples of a manifest containing
# word n-gram g. A sample's weight is the mean of df(g)^-alpha over its distinct n-grams, so samples
# assembled from phrases many other samples repeat are drawn less, and samples carrying rare
# phrasing more; alpha = 0.5 softens the correction, weights are clipped to [0.1, 10] x the mean.
# (The sample's *most* frequent n-gram would be a poorer key: a phrase shared by every sample, such
# as "at the", makes all weights equal.) `diversity` measures the effect: distinct-n and the
# entropy of the n-gram distribution over an equal-size weighted draw, before and after.

WORD_RE = re.compile(r"\w+|[^\w\s]")


def ngrams(text: str, n: int) -> set:
    words = WORD_RE.findall(text.lower())
    return set(zip(*(words[i:] for i in range(n))))


def ngram_weights(texts: list, n: int = 3, alpha: float = 0.5, clip: tuple = (0.1, 10.0)) -> np.ndarray:
    """Per-sample sampling weights (mean 1) that favour samples with rare n-grams (see above)."""
    grams = [ngrams(t, n) for t in texts]
    df = Counter(g for gs in grams for g in gs)
    w = np.array([np.mean([df[g] ** -alpha for g in gs]) if gs else np.nan for gs in grams])
    mean = np.nanmean(w) if np.isfinite(w).any() else 1.0
    w = np.where(np.isnan(w), mean, w) / mean          # samples without n-grams: neutral weight
    w = np.clip(w, *clip)
    return w / w.mean()


def diversity(texts: list, weights=None, n: int = 3, seed: int = 0) -> dict:
    """distinct-n (distinct / total n-grams) and n-gram entropy (bits) of len(texts) samples drawn
    with replacement in proportion to `weights` (uniform when None)."""
    rng = np.random.default_rng(seed)
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = Counter()
    for i in rng.choice(len(texts), size=len(texts), p=p):
        words = WORD_RE.findall(texts[i].lower())
        counts.update(zip(*(words[k:] for k in range(n))))
    total = sum(counts.values())
    if not total:
        return {"distinct": 0.0, "entropy": 0.0}
    q = np.array(list(counts.values()), dtype=np.float64) / total
    return {"distinct": len(counts) / total, "entropy": float(-(q * np.log2(q)).sum())}


class Mixture:
    """A stage's weighted mixture of manifests, read as one endless, deterministic stream (§3.2.2).

    Global index g = manifest offset + line. `order(epoch)` is a pure function of (seed, epoch):
    epoch e draws epoch_size (default: all samples) manifest choices in proportion to `weights`
    (dataset-level resampling, step 1), then per manifest either successive permutations (each
    sample once per pass) or, with n-gram rebalancing (step 2), draws in proportion to
    `ngram_weights`. The stream visits position k = (epoch, pos) of those orders in turn; `load(k)`
    decodes that visit with its own generator, so training-time video frame jitter differs per
    visit yet is the same on every rank, in every loader worker and after a resume. A bad sample
    is reported once with file and line, counted once per sample (not per visit) in `bad`, and
    skipped; the run stops when too large a fraction of the distinct samples seen is bad. The
    packer reads ahead of training (packing.PackLoader), so it `record`s what its reads found when
    their step is trained. `state_dict()` is the cursor and those counts (JSON), for exact resume.
    """

    def __init__(self, sources: list, tok: tiktoken.Encoding, cfg: DataConfig = None, seed: int = 0,
                 training: bool = True, ngram_rebalance: bool = False, epoch_size: int = None,
                 verbose: bool = True):
        self.cfg = cfg or DataConfig()
        sources = [(s, 1.0) if isinstance(s, (str, Path)) else s for s in sources]
        self.datasets = [JsonlDataset(p, tok, self.cfg, training) for p, _ in sources]
        for ds in self.datasets:
            if not len(ds):
                raise TooMuchBadData(f"manifest {ds.path} holds no samples")
        w = np.array([float(wt) for _, wt in sources])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()
        self.offsets = np.cumsum([0] + [len(ds) for ds in self.datasets])
        self.seed, self.training = seed, training
        self.epoch_size = epoch_size or int(self.offsets[-1])
        self.sample_weights = [self._rebalance(ds, verbose) if ngram_rebalance else None
                               for ds in self.datasets]
        self.bad = BadData(self.cfg.max_bad_fraction, self.cfg.bad_check_after, show=verbose)
        self.status = np.zeros(len(self), dtype=np.uint8)      # per sample: 0 unseen, 1 good, 2 bad
        self.epoch, self.pos, self.valid_in_epoch = 0, 0, 0    # the cursor: next visit is order(epoch)[pos]
        self._orders = {}                                     # the last epochs' orders (see `order`)

    def __len__(self):
        return int(self.offsets[-1])

    @staticmethod
    def _rebalance(ds: JsonlDataset, verbose: bool) -> np.ndarray:
        texts = [ds.text_of(i) for i in tqdm(range(len(ds)), desc=f"n-grams {ds.path.parent.name}/{ds.path.name}", disable=no_bar(verbose))]
        w = ngram_weights(texts)
        if verbose:
            before, after = diversity(texts), diversity(texts, w)
            print(f"[data] n-gram rebalancing {ds.path.parent.name}/{ds.path.name}: distinct-3 {before['distinct']:.3f} -> "
                  f"{after['distinct']:.3f}, 3-gram entropy {before['entropy']:.2f} -> {after['entropy']:.2f} bits")
        return w / w.sum()

    def order(self, epoch: int) -> np.ndarray:
        """Global sample indices of one epoch, in visiting order: a pure function of (seed, epoch)."""
        if epoch in self._orders:
            return self._orders[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        src = rng.choice(len(self.datasets), size=self.epoch_size, p=self.weights)
        idx = np.zeros(self.epoch_size, dtype=np.int64)
        for s, ds in enumerate(self.datasets):
            at = np.flatnonzero(src == s)
            if not len(at):
                continue
            if self.sample_weights[s] is None:
                perms = [rng.permutation(len(ds)) for _ in range(-(-len(at) // len(ds)))]
                idx[at] = np.concatenate(perms)[:len(at)]
            else:
                idx[at] = rng.choice(len(ds), size=len(at), p=self.sample_weights[s])
        if len(self._orders) >= 3:        # packs near an epoch's start still hold the previous epoch's samples
            self._orders.pop(min(self._orders))
        self._orders[epoch] = self.offsets[src] + idx
        return self._orders[epoch]

    def sample_index(self, k: int) -> int:
        """The global sample index g that stream position k visits."""
        epoch, pos = divmod(int(k), self.epoch_size)
        return int(self.order(epoch)[pos])

    def locate(self, k: int) -> tuple:
        """(its dataset, its index there) of the sample at stream position k."""
        g = self.sample_index(k)
        s = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return self.datasets[s], g - int(self.offsets[s])

    def load(self, k: int, decode: bool = True) -> dict:
        """The sample at stream position k (raises DataError for a bad one); decode=False: without
        pixels (build_sample)."""
        ds, i = self.locate(k)
        return ds.load(i, np.random.default_rng([self.seed, k, 1]), decode)

    def where(self, k: int) -> str:
        """'file:line' of the sample at stream position k."""
        ds, i = self.locate(k)
        return ds.where(i)

    def meta(self, k: int) -> tuple:
        """(k, tokens, visual tokens, tiles) of the sample at stream position k, what packing needs
        (packing.SampleMeta), read from its line, image headers and the tokenizer: equal to what
        decoding it gives (packing.sample_meta of `load(k)`)."""
        s = self.load(k, decode=False)
        return k, len(s["input_ids"]), s["n_visual_tokens"], sum(s["tiles"])

    def next(self, measure: bool = False, found: list = None) -> tuple:
        """(k, sample) of the next usable visit (measure: (k, meta(k))); advances the cursor past bad
        samples. What the visits find is counted at once, or, given a list `found`, appended to it
        for `record`: (g, None) good, (g, DataError) bad, (None, None) the end of an epoch."""
        while True:
            if self.pos >= self.epoch_size:
                self._found(found, None, None)               # every sample was seen: judge even a small set
                if self.valid_in_epoch == 0:
                    if found:                                # counted (and reported) before the verdict
                        self.record(found)
                        found.clear()
                    raise TooMuchBadData(f"epoch {self.epoch} of the data had no usable sample in its "
                                         f"{self.epoch_size} visits: {self.bad.report()}")
                self.epoch, self.pos, self.valid_in_epoch = self.epoch + 1, 0, 0
            k = self.epoch * self.epoch_size + self.pos
            self.pos += 1
            g = self.sample_index(k)
            try:
                got = self.meta(k) if measure else self.load(k)
            except DataError as e:
                self._found(found, g, e)
                continue
            self._found(found, g, None)
            self.valid_in_epoch += 1
            return k, got

    def next_meta(self, found: list) -> tuple:
        """The next usable sample's `meta`, what it found appended to `found` (packing.PackLoader)."""
        return self.next(measure=True, found=found)[1]

    def _found(self, found, g, err):
        if found is None:
            self.record([(g, err)])
        else:
            found.append((g, err))

    def record(self, found: list):
        """Count what visits found (see `next`): each distinct sample once, as good or bad."""
        for g, err in found:
            if g is None:
                self.bad.check()
            elif self.status[g] == 0 and err is None:
                self.status[g] = 1
                self.bad.good()
            elif self.status[g] == 0:
                self.status[g] = 2
                self.bad.bad(err)

    def record_decode_failure(self, k: int, err: DataError):
        """A sample planned from its header whose pixels then failed (truncated): counted bad, once
        (it was counted good when its metadata was read), and reported; later visits are planned
        again and dropped again by the rank that decodes them, so plans never depend on decoding."""
        g = self.sample_index(k)
        if self.status[g] != 2:
            self.bad.bad(err, seen_before=self.status[g] == 1)
            self.status[g] = 2

    def cursor(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "valid_in_epoch": self.valid_in_epoch}

    def seek(self, cursor: dict):
        self.epoch, self.pos, self.valid_in_epoch = cursor["epoch"], cursor["pos"], cursor["valid_in_epoch"]

    def state_dict(self, cursor: dict = None) -> dict:
        """The cursor (or the given one: the packer's position, behind this read-ahead cursor) and the counts."""
        return {**(cursor or self.cursor()), "seed": self.seed, "n_samples": len(self), "bad": self.bad.state_dict(),
                "good_bits": _pack_bits(self.status == 1), "bad_bits": _pack_bits(self.status == 2)}

    def load_state_dict(self, state: dict):
        if (state["seed"], state["n_samples"]) != (self.seed, len(self)):
            raise ValueError(f"data state was saved with seed {state['seed']} over {state['n_samples']} samples, "
                             f"this mixture has seed {self.seed} over {len(self)}: exact resume is impossible")
        self.seek(state)
        self.bad.load_state_dict(state["bad"])
        good, bad = _unpack_bits(state["good_bits"], len(self)), _unpack_bits(state["bad_bits"], len(self))
        self.status = np.where(good, 1, np.where(bad, 2, 0)).astype(np.uint8)


def _pack_bits(flags: np.ndarray) -> str:
    """A bool array as base64 text (one bit per sample: 8 MB of JSON for 64M samples)."""
    return base64.b64encode(np.packbits(flags).tobytes()).decode()


def _unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


# ----------------------------------------------------------------------------------------------
# 5. The synthetic default data: its language, and the folder made on first use
#
# tests/synth.py writes the miniature the tiny presets train on by default (PNG + MP4 + JSONL and a
# BPE; `python tests/synth.py --out DIR`). What the components read of it lives here: the family
# names (the stage mixes, the evaluation) and the words of its small, regular language (the
# evaluation's answer extraction, the heuristic judge, the chart and caption -> QA tools).

SYNTH_FAMILIES = ("text", "caption", "caption_qa", "ocr", "chart", "count", "count_cot", "math", "math_direct",
                  "multi", "video")
SYNTH_VERSION = 4                  # the generator's version, in DIR/synth.json: another version is refused
DEFAULT_SYNTH_DIR = "data_synth"   # relative to the working directory; git-ignored
DEFAULT_SYNTH_SIZE = 1024          # train samples per family (eval: size // 8; text: 8 x size)
SYNTH_SCRIPT = Path(__file__).resolve().parent / "tests" / "synth.py"
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
WORDS = ("apple", "bread", "chair", "cloud", "dance", "earth", "flame", "glass", "heart", "jelly", "kite",
         "lemon", "music", "night", "ocean", "piano", "queen", "robot", "sugar", "tiger", "violin", "water", "zebra")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CHART_KINDS = ("bar", "line", "pie")
CHART_LABELS = ("cat", "dog", "fish", "bird", "frog", "lion", "bear", "duck")


def run_synth(out, seed: int, size: int, progress: bool = True):
    """`python tests/synth.py --out OUT --seed SEED --size SIZE` in a subprocess (a component imports
    nothing from tests/); RuntimeError with the script's last words when it fails."""
    if not SYNTH_SCRIPT.is_file():
        raise RuntimeError(f"{SYNTH_SCRIPT} is missing: the synthetic data cannot be made here; "
                           f"give a data folder made by `python tests/synth.py --out DIR`")
    cmd = [sys.executable, str(SYNTH_SCRIPT), "--out", str(out), "--seed", str(seed), "--size", str(size)]
    done = subprocess.run(cmd, capture_output=not progress, text=True)
    if done.returncode:
        last = (done.stderr or "").strip().splitlines()[-1:] or ["see its output above"]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {last[0]}")


def ensure_synth(out=DEFAULT_SYNTH_DIR, seed: int = 0, size: int = DEFAULT_SYNTH_SIZE, progress: bool = True,
                 make=run_synth) -> Path:
    """The synthetic dataset at `out`, generated on first use by `make(out, seed, size, progress)`
    (tests/synth.py in a subprocess; tests pass synth.make_synth); a no-op when it is already there.
    Safe when several ranks call it at once (the first rename wins, the others discard their copy)."""
    out = Path(out)
    stamp = out / "synth.json"
    if not stamp.exists():
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and has no synth.json; refusing to write synthetic data there")
        if out.exists():
            out.rmdir()
        try:
            make(out, seed, size, progress)
        except (OSError, RuntimeError):
            if not stamp.exists():      # not another rank's rename winning the race
                raise
    have = json.loads(stamp.read_text(encoding="utf-8"))
    if (have["version"], have["seed"], have["size"]) != (SYNTH_VERSION, seed, size):
        raise ValueError(f"{out} holds synthetic data v{have['version']} seed {have['seed']} size {have['size']}; "
                         f"asked for v{SYNTH_VERSION} seed {seed} size {size}: delete it or use another folder")
    return out


# ----------------------------------------------------------------------------------------------
# 6. Command line: one row per tool in COMMANDS

def add_image_tokens_cli(src: str, out: str):
    """`python data.py add-image-tokens SRC OUT`: one line of what was added, or one error line, exit 2."""
    try:
        new = add_image_tokens(src, out)
    except (ValueError, OSError) as e:
        print(f"data.py add-image-tokens: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{out}: " + (f"added {', '.join(f'{t} {i}' for t, i in new.items())} (SAIL-VL2's ids)" if new
                        else f"{src} already has SAIL-VL2's tokens; copied"))


def check_cli(args):
    """`python data.py check MANIFEST`: bad lines by reason, token counts; exit 1 when training would refuse it."""
    import model                            # the command line only: the geometry a model was built for
    if args.ckpt and not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        raise FileNotFoundError(f"--ckpt {args.ckpt}: not a checkpoint folder (no config.json)")
    mcfg = model.read_config(args.ckpt) if args.ckpt else model.preset_config(args.preset)
    cfg = DataConfig.from_model(mcfg, max_len=args.max_len, label_mode=args.label_mode, image_root=args.image_root)
    # the tokenizer training reads: --ckpt's own (it travels with the weights), else the embedded default
    tok = args.tokenizer or (args.ckpt if args.ckpt and has_tokenizer(args.ckpt) else None)
    if tok and (missing := missing_sail_tokens(tok)):     # <IMG_CONTEXT> would count as ~13 text tokens a slot
        raise ValueError(f"--tokenizer {tok} lacks SAIL-VL2's {', '.join(missing)} (a Qwen3 folder; training adds "
                         f"them in a copy): check with the copy `python data.py add-image-tokens {tok} OUT` writes")
    ds = JsonlDataset(args.manifest, load_tokenizer(tok), cfg)
    if not len(ds):
        print(f"training would refuse {args.manifest}: it holds no samples", file=sys.stderr)
        raise SystemExit(1)
    bad = BadData(max_fraction=1.0, show_first=len(ds))
    lengths = [len(s["input_ids"]) for s in ds.scan(bad)]
    print(bad.report())
    if lengths:
        print(f"{len(lengths)} good samples ({cfg.image_size}-px tiles, {cfg.tokens_per_tile} tokens each), "
              f"tokens per sample: min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
    n_bad = sum(bad.counts.values())
    if n_bad > args.max_bad_fraction * max(bad.seen, 1):
        print(f"training would refuse {args.manifest}: {n_bad} of {bad.seen} samples are bad "
              f"({n_bad / max(bad.seen, 1):.1%} > max_bad_fraction {args.max_bad_fraction:.1%})", file=sys.stderr)
        raise SystemExit(1)


def rebalance_cli(args):
    """`python data.py rebalance MANIFEST`: the diversity before / after n-gram rebalancing."""
    ds = JsonlDataset(args.manifest, load_tokenizer(None))
    if not len(ds):
        raise ValueError(f"manifest {args.manifest} holds no samples")
    bad = BadData(max_fraction=1.0, show_first=len(ds))          # each bad line named, as training and check do
    texts = [ds.text_of(i, bad) for i in tqdm(range(len(ds)), desc="read", disable=no_bar(True))]
    print(bad.report() + ("; bad lines weigh as empty texts" if bad.counts else ""))
    w = ngram_weights(texts, args.n, args.alpha)
    before, after = diversity(texts, n=args.n), diversity(texts, w, n=args.n)
    print(f"distinct-{args.n}: {before['distinct']:.4f} -> {after['distinct']:.4f}")
    print(f"{args.n}-gram entropy: {before['entropy']:.3f} -> {after['entropy']:.3f} bits")
    print(f"weights: min {w.min():.3f} max {w.max():.3f}")
    if args.out:
        write_atomic(args.out, json.dumps({str(ds.line_numbers[i]): round(float(x), 6) for i, x in enumerate(w)}))


def print_counts(title: str, counts: Counter):
    print(f"{title}:")
    for k, v in sorted(counts.items()):
        print(f"  {k:28s} {v}")


# (name, function of the parsed arguments, help, options: (flag or positional name, add_argument keywords))
COMMANDS = (
    ("add-image-tokens", lambda a: add_image_tokens_cli(a.src, a.out), "copy a Qwen tokenizer folder, adding "
     "SAIL-VL2's <img>, </img>, <IMG_CONTEXT> (and grounding) tokens at the official ids", (
         ("src", dict(help="a Qwen3 folder (tokenizer.json, or vocab.json + merges.txt); only read")),
         ("out", dict(help="the folder to write the tokenizer files into (created)")))),
    ("check", check_cli, "load every sample of a manifest and report bad lines by reason; exit 1 when training "
     "would refuse it (more than max_bad_fraction bad)", (
         ("manifest", dict(help="a JSONL manifest (conversations / messages / text per line)")),
         ("--image-root", dict(default="", help="folder the manifest's image/video paths are relative to; "
                               "empty: the manifest's folder")),
         ("--tokenizer", dict(default=None, help="Qwen tokenizer folder (None: --ckpt's own, else the embedded byte "
                              "tokenizer, which a random start on your --manifests reads)")),
         ("--preset", dict(default="tiny", help="the model preset whose image geometry to use (model.py)")),
         ("--ckpt", dict(default=None, help="a checkpoint folder whose geometry to use (instead of --preset)")),
         ("--max-len", dict(type=int, default=8192, help="longer samples are reported as too_long")),
         ("--label-mode", dict(default="sft", choices=LABEL_MODES, help="which tokens carry labels")),
         ("--max-bad-fraction", dict(type=float, default=DataConfig.max_bad_fraction,
                                     help="the share of bad samples training accepts (the stage option of the same name)")))),
    ("rebalance", rebalance_cli, "n-gram rebalancing weights (§3.2.2) and the diversity before/after", (
         ("manifest", {}),
         ("--n", dict(type=int, default=3, help="n-gram order")),
         ("--alpha", dict(type=float, default=0.5, help="weight = mean df(g)^-alpha over the sample's n-grams")),
         ("--out", dict(default=None, help="write the per-line weights as JSON here")))),
)


class UsageError(ValueError):
    """A bad command line, for every script: one line on stderr, exit code 2 (InputError: an input
    that exists but is unusable, exit code 1)."""
    code = 2


class InputError(UsageError):
    code = 1


def tool_parser(prog: str, description: str, commands, parser=argparse.ArgumentParser):
    """A parser with one subcommand per row of `commands` (name, function, help, options); the chosen
    row's function is `args.run`. Every subcommand's help shows its defaults."""
    p = parser(prog=prog, description=description)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, run, what, options in commands:
        s = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, help=what)
        s.set_defaults(run=run)
        for flag, keywords in options:
            s.add_argument(flag, **keywords)
    return p


def main(argv=None):
    p = tool_parser("data.py", "SAIL-VL2 data tools: the tokenizer, manifest checks, n-gram rebalancing "
                    "(§3.2.2). Run `python data.py SUBCOMMAND --help` for each.", COMMANDS)
    args = p.parse_args(dashed_options(sys.argv[1:] if argv is None else argv))
    try:
        args.run(args)
    except (FileNotFoundError, DataError, ValueError) as e:       # usage mistakes: one line, exit 2
        p.exit(2, f"data.py {args.cmd}: error: {e}\n")


def dashed_options(argv: list) -> list:
    """--max_len=8 -> --max-len=8: the command-line tools accept the training scripts' underscore
    spelling as well as their own dashed one."""
    return [re.sub(r"^--[^=]*", lambda m: m[0].replace("_", "-"), a) for a in argv]


if __name__ == "__main__":
    main()
