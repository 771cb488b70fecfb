"""Everything between files on disk and the tensors SAIL-VL2 eats (arXiv 2509.14033).

Sections, in the paper's order:

  1. Tokenizer       Qwen3's byte-level BPE as a tiktoken Encoding; embedded byte-level default; SAIL-VL2's
                     image tokens added to a Qwen folder at the official ids (§2.2 LLM)
  2. Chat template   `univl-chat` (the official conversation template), `<image>`/`<video>` expansion,
                     label masking per training mode (SFT §4.2.1, LongCoT §4.2.2, Think-Fusion §4.2.4)
  3. Images          official dynamic tiling + thumbnail (InternVL rule), AnyRes resizing (§2.1.2)
  4. Video           uniform-segment frame sampling with PyAV (each frame decoded from the keyframe
                     before it), one tile per frame (§6.1)
  5. Records         JSONL manifests (LLaVA/InternVL `conversations`, `messages`, `text`), a sample's
                     tokens and tiles from image headers (no pixels: packing plans), bad-input policy
  6. Curation §3.1   judge-score quality filter (VIR/ITA), chart rendering + QA, caption -> QA
  7. Resampling      dataset-level mixture (§3.2.2 step 1), n-gram linguistic rebalancing (step 2),
                     the deterministic, resumable training stream
  8. Answers         the one grading API: a reply's thinking and answer region, its last \\boxed{},
                     when two answers agree (held to math-verify), word-F1 and ROUGE-L
  9. LongCoT §4.2.2  format normalisation, dedup, redundancy filter, CoT-length balancing
 10. Curation §4.1   post-training data: SAIL-Instruction2 (§4.1.2: latent classes, answer quality,
                     re-annotation, class balancing), SAIL-Video (§4.1.1: alignment, richness, difficulty)
 11. Synthetic data  the embedded default dataset (PNG + MP4 + JSONL) and the stage -> data-mix table
 12. Command line    `python data.py {add-image-tokens,synth,check,rebalance,filter,charts,caption2qa,
                     longcot,curate-instructions,curate-video} --help`

Conventions: `labels` are aligned with `input_ids` (the model shifts them, as HF does) and hold -100
where no loss is taken. Every bad input raises `DataError` naming file and line; datasets skip and
count such samples and stop when too many are bad. Nothing here downloads anything.
"""
import argparse
import base64
import bisect
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import unicodedata
import zlib
from collections import Counter, namedtuple
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import tiktoken
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm


class DataError(Exception):
    """A bad sample: `reason` is a short category used for counting, `where` is 'file:line'."""

    def __init__(self, reason: str, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.reason, self.where, self.message = reason, where, message

    def __reduce__(self):                     # pickled from a loader worker back to the trainer
        return DataError, (self.reason, self.where, self.message)


class TooMuchBadData(RuntimeError):
    """Raised when the fraction of bad samples passes DataConfig.max_bad_fraction."""


@dataclass
class DataConfig:
    """How samples are turned into tensors. Defaults are the official SAIL-VL2-2B values; a model's
    own geometry comes from `DataConfig.from_model(model_cfg)` (one name per concept, as in the
    model config: image_size, patch_size, downsample_ratio, anyres_max_patches)."""
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
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


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
        last_id = vocab[merged]
        ranks[token] = vocab[merged]
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
            pattern = p["pattern"].get("Regex") or re.escape(p["pattern"]["String"])
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


def _added_tokens(folder: Path) -> dict:
    """Added tokens (content -> id) from added_tokens.json and tokenizer_config.json, if present."""
    added = {}
    if (folder / "added_tokens.json").exists():
        added.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
    if (folder / "tokenizer_config.json").exists():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for idx, spec in config.get("added_tokens_decoder", {}).items():
            added[spec["content"]] = int(idx)
    return added


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
    if (folder / "tokenizer.json").exists():
        where = str(folder / "tokenizer.json")
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") \
                or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
                or model.get("ignore_merges"):
            raise ValueError(f"{where}: expected a plain byte-level BPE model (no dropout, byte_fallback, "
                             f"affixes or ignore_merges), got { {k: v for k, v in model.items() if k not in ('vocab', 'merges')} }")
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        pattern = _pattern_of(spec.get("pre_tokenizer"), where)
        normalizer = spec.get("normalizer")
        if normalizer not in (None, {"type": "NFC"}):
            raise ValueError(f"{where}: unsupported normalizer {normalizer}; only NFC (Qwen) or none")
        nfc = normalizer is not None
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        where = str(folder / "merges.txt")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split(" ")) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        pattern, nfc, added = QWEN_PATTERN, True, {}   # Qwen2Tokenizer: NFC, Qwen's split regex
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json, and no vocab.json + merges.txt")
    added.update(_added_tokens(folder))
    ranks = bpe_ranks(vocab, merges, where)
    clash = set(added.values()) & set(ranks.values())
    if clash:
        raise ValueError(f"{folder}: added-token ids {sorted(clash)[:5]} are also BPE token ids")
    cls = NFCEncoding if nfc else tiktoken.Encoding
    return cls(f"hf-{folder.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)


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


# A Qwen3 tokenizer folder has no <img>, </img>, <IMG_CONTEXT>. SAIL-VL2's own folder
# (BytedanceDouyinContent/SAIL-VL2-2B, tokenizer_config.json `added_tokens_decoder`) keeps Qwen3's added
# tokens (<|endoftext|> 151643 ... </think> 151668) and appends its image and grounding tokens right
# after them, inside the 151,936-row embedding. `add_image_tokens` writes that layout into a copy of
# a Qwen folder. HF `tokenizers` renumbers added tokens that leave a gap after the ids before them,
# so the new ids must continue the folder's last id exactly; otherwise the folder is refused.
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


def folder_tokens(folder) -> tuple:
    """(largest id of the folder's BPE vocab and added tokens, {added token: id}), read without building
    the tokenizer."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab, added = spec["model"]["vocab"], {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    else:
        vocab, added = json.loads((folder / "vocab.json").read_text(encoding="utf-8")), {}
    added.update(_added_tokens(folder))
    return max([*vocab.values(), *added.values()]), added


def missing_sail_tokens(folder) -> dict:
    """{token: official id} of SAIL-VL2's added tokens that the tokenizer folder lacks."""
    added = folder_tokens(folder)[1]
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


def add_image_tokens(src, out) -> dict:
    """Copy the tokenizer files of Qwen folder `src` into `out` (created; `src` is never written) with
    SAIL-VL2's missing added tokens at their official ids, in tokenizer.json, tokenizer_config.json and
    added_tokens.json as present (added_tokens.json is created for a vocab.json + merges.txt folder
    that has neither). Returns {token: id} of what was added. Raises ValueError when an official id
    is taken or would leave a gap. Idempotent: the same `src` always gives the same bytes."""
    src, out = Path(src), Path(out)
    if not has_tokenizer(src):
        raise ValueError(f"{src}: no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    last, added = folder_tokens(src)
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
    if new and "tokenizer.json" in files:
        spec = json.loads(files["tokenizer.json"])
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
# Video (our choice; the paper gives no frame protocol and the official code has no video path): one tile per frame, the
# <video> placeholder becomes "Frame1: <image>\nFrame2: <image>\n..." as in InternVL's chat().

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


def think_turn(content: str, where: str):
    """(think_text, rest) of a training assistant turn that opens with <think>...</think>, else
    (None, content); DataError for any other use of the tags (replies are read with split_think)."""
    head = content.lstrip()
    if not head.startswith("<think>"):
        if "<think>" in content or "</think>" in content:
            raise DataError("format", where, "<think> tags must open the assistant turn and be closed once")
        return None, content
    end = head.find("</think>")
    if end < 0:
        raise DataError("format", where, "<think> is never closed by </think>")
    return head[len("<think>"):end], head[end + len("</think>"):]


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
            cut = len(content) - len(answer.lstrip())        # empty think block + its trailing blank lines
            segs += [(content[:cut], False), (content[cut:] + "<|im_end|>", True)]
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


def tokenize_text(tok: tiktoken.Encoding, text: str):
    """Plain-text LM sample: the text then <|endoftext|>, loss on every token."""
    ids = np.asarray(encode(tok, text) + [special_ids(tok).endoftext], dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(ids.copy())


# ----------------------------------------------------------------------------------------------
# 3. Images: any file mode to 8-bit RGB, official dynamic tiling (image_processing_sailvl.py, InternVL's
#    dynamic_preprocess) and AnyRes (§2.1.2)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def to_8bit(x: np.ndarray, mode: str) -> np.ndarray:
    """A single-channel high-bit-depth image as uint8. 16-bit modes (I;16, I;16B, ...) use their full
    range (v / 257), so a 16-bit file reads as its 8-bit twin rather than clipping to white. Modes
    without a fixed depth (I: 32-bit int, F: float) are read at the smallest usual full scale that
    holds their values: [0, 1], [0, 255], [0, 65535]; other ranges are stretched min..max."""
    x = x.astype(np.float64)
    if mode.startswith("I;16") and not mode.endswith("S"):
        scale = 65535.0
    else:
        lo, hi = float(x.min()), float(x.max())
        scale = next((s for s in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0) if lo >= 0 and hi <= s), None)
        if scale is None:
            x, scale = x - lo, max(hi - lo, 1e-12)
    return np.clip(np.rint(x * (255.0 / scale)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB, as the model's ImageNet normalisation expects. Transparency
    (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on white: a transparent
    background is the page, not black. High-bit-depth single-channel modes go through `to_8bit`.
    Always a new image (the caller may close the file behind `img`)."""
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(to_8bit(np.asarray(img), img.mode), "L").convert("RGB")
    if img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def to_array(img: Image.Image) -> np.ndarray:
    """PIL RGB -> normalised float32 (3, H, W), as torchvision ToTensor + Normalize(ImageNet).
    (numpy, not torch: tiny torch ops pay thread-pool wake-ups that dominate data loading.)"""
    x = np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255)
    x = (x - IMAGENET_MEAN.numpy().reshape(1, 1, 3)) / IMAGENET_STD.numpy().reshape(1, 1, 3)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_pixels(images: list) -> torch.Tensor:
    """(N, 3, H, W) float32 from same-size PIL images."""
    return torch.from_numpy(np.stack([to_array(im) for im in images]))


def blank_pixels(pv):
    """White tiles / frames of the same shapes (so the same token counts), every pixel the
    normalised value of white, the synthetic images' background: nothing left to see. The
    blindness measure of evaluation and curate-video's blank-video baseline."""
    if pv is None:
        return None
    if isinstance(pv, (list, tuple)):
        return [blank_pixels(p) for p in pv]
    return ((1.0 - IMAGENET_MEAN) / IMAGENET_STD).to(pv.dtype).expand_as(pv).clone()


def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, image_size: int) -> tuple:
    """(cols, rows) of the official rule: the candidate grid whose aspect ratio is closest to the
    image's; on a tie the later (larger) grid wins if the image area exceeds half the grid's area."""
    # Built as the official code builds it (a set sorted by tile count) so ties between grids with the
    # same tile count resolve in the same order.
    grids = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_tiles <= i * j <= max_tiles}, key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(img: Image.Image, max_tiles: int = 12, min_tiles: int = 1, image_size: int = 448,
               use_thumbnail: bool = True) -> list:
    """The official crops: resize to the chosen grid, tiles row-major, then the thumbnail if >1 tile."""
    img = img.convert("RGB")
    cols, rows = tile_grid(img.width, img.height, min_tiles, max_tiles, image_size)
    resized = img.resize((cols * image_size, rows * image_size), Image.BICUBIC)
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(img.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def anyres_size(width: int, height: int, patch_size: int = 14, downsample_ratio: float = 0.5,
                max_patches: int = 16384, min_patches: int = 16) -> tuple:
    """(W, H) for AnyRes: aspect kept, both sides multiples of patch_size / downsample_ratio (so the
    pixel shuffle divides the patch grid), patch count within [min_patches, max_patches]."""
    f = patch_size * round(1 / downsample_ratio)
    w, h = max(f, round(width / f) * f), max(f, round(height / f) * f)
    if (w // patch_size) * (h // patch_size) > max_patches:
        scale = math.sqrt(width * height / (max_patches * patch_size * patch_size))
        w, h = max(f, math.floor(width / scale / f) * f), max(f, math.floor(height / scale / f) * f)
    elif (w // patch_size) * (h // patch_size) < min_patches:
        scale = math.sqrt(min_patches * patch_size * patch_size / (width * height))
        w, h = math.ceil(width * scale / f) * f, math.ceil(height * scale / f) * f
    return w, h


def open_image(path, where: str = None) -> Image.Image:
    """Decode an image file fully (so truncation shows up here), as 8-bit RGB (`to_rgb`); DataError if
    it can't."""
    where = where or str(path)
    if not os.path.exists(path):
        raise DataError("missing_file", where, f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError("image", where, f"cannot decode image {path}: {e}") from None


def load_image(path_or_image, max_tiles: int = 12, min_tiles: int = 1, image_size: int = 448,
               use_thumbnail: bool = True, anyres: bool = False, patch_size: int = 14, downsample_ratio: float = 0.5,
               max_patches: int = 16384, min_patches: int = 16, where: str = None):
    """(pixel_values, n_tiles) of an image path or PIL image.

    Tiled (official): pixel_values (N, 3, S, S), N = tiles (+ thumbnail when N > 1), float32,
    ImageNet-normalised. AnyRes: (1, 3, H, W) with H, W multiples of patch_size / downsample_ratio, n_tiles = 1.
    """
    img = to_rgb(path_or_image) if isinstance(path_or_image, Image.Image) else open_image(path_or_image, where)
    if anyres:
        size = anyres_size(img.width, img.height, patch_size, downsample_ratio, max_patches, min_patches)
        return to_pixels([img.resize(size, Image.BICUBIC)]), 1
    tiles = tile_image(img, max_tiles, min_tiles, image_size, use_thumbnail)
    return to_pixels(tiles), len(tiles)


# ----------------------------------------------------------------------------------------------
# 4. Video (§6.1; the official code has no video path): uniform segments, one frame per segment, each frame one tile.
# The middle frame of each segment for evaluation, a random frame within it for training
# (InternVL's get_frame_indices). Frames are numbered in presentation order. The packets' timestamps
# (read by demuxing, without decoding) give every frame's number, the frame count when the
# container does not state one, and the keyframes: each wanted frame is decoded from the last
# keyframe before it (a seek), not from the start of the video, so a 16-frame sample of an
# hour-long video decodes 16 short runs, not the hour (`python tests/bench.py video`).

def frame_indices(n_frames: int, num: int, training: bool = False, rng=None) -> list:
    """`num` indices into `n_frames` frames, one per uniform segment (repeats when n_frames < num)."""
    edges = np.linspace(0, n_frames, num + 1)
    out = []
    for k in range(num):
        lo = min(int(edges[k]), n_frames - 1)
        hi = max(lo + 1, min(int(edges[k + 1]), n_frames))
        out.append(int(rng.integers(lo, hi)) if training else (lo + hi - 1) // 2)
    return out


def frame_times(container, stream):
    """(timestamps of every frame in presentation order, those of the keyframes) from the packets,
    without decoding; None when a packet carries no timestamp (only decoding can number frames then)."""
    pts, keys = [], []
    for packet in container.demux(stream):
        if packet.pts is None:
            if packet.size:                  # the empty packet that ends the stream has none either
                return None
            continue
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    return sorted(pts), sorted(keys)


def _seek_frames(container, stream, times, wanted) -> dict:
    """{frame number: PIL} of the `wanted` frames: for each, seek to the last keyframe at or before
    it and decode forward to it (or go on decoding when no keyframe lies between the last frame
    decoded and it). None when a seek misses (a container with an inexact index)."""
    pts, keys = times
    got, frames, last = {}, None, None
    for i in sorted(wanted):
        t = pts[i]
        key = keys[bisect.bisect_right(keys, t) - 1] if keys and keys[0] <= t else pts[0]
        if frames is None or key > last:
            container.seek(key, backward=True, any_frame=False, stream=stream)
            frames = container.decode(stream)
        for frame in frames:
            last = frame.pts
            if last is None or last >= t:
                break
        if last != t:
            return None
        got[i] = frame.to_image()
    return got


def _decode_frames(path, wanted: set):
    """(frames {index: PIL}, total frames decoded) for one pass from the start of the first video
    stream: the way to number frames when the packets carry no timestamps."""
    got, n = {}, 0
    last = max(wanted) if wanted else -1
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if n in wanted:
                got[n] = frame.to_image()
            n += 1
            if n > last and wanted:
                break
    return got, n


def video_frames(path, num_frames: int = 16, training: bool = False, rng=None, where: str = None) -> list:
    """The `num_frames` sampled frames (PIL, time order) of the first video stream of `path`."""
    where = where or str(path)
    if not os.path.exists(path):
        raise DataError("missing_file", where, f"video file not found: {path}")
    rng = rng if rng is not None else np.random.default_rng()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError("video", where, f"{path} has no video stream")
            stream = container.streams.video[0]
            times = frame_times(container, stream)
            n = stream.frames or (len(times[0]) if times else _decode_frames(path, set())[1])   # 0: not stated
            if n <= 0:
                raise DataError("video", where, f"{path}: no decodable frames")
            idx = frame_indices(n, num_frames, training, rng)
            if times and max(idx) >= len(times[0]):
                raise DataError("video", where, f"{path}: the container states {n} frames but holds "
                                f"{len(times[0])} (truncated file?)")
            got = _seek_frames(container, stream, times, set(idx)) if times else None
        decoded = n
        if got is None:
            got, decoded = _decode_frames(path, set(idx))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError("video", where, f"cannot decode video {path}: {e}") from None
    if len(got) < len(set(idx)):
        raise DataError("video", where, f"{path}: the container states {n} frames but only {decoded} decode "
                        "(truncated file?)")
    return [got[i] for i in idx]


def load_video(path, num_frames: int = 16, training: bool = False, rng=None, image_size: int = 448,
               where: str = None) -> torch.Tensor:
    """(num_frames, 3, S, S) float32 frames in time order, each resized to one S x S tile."""
    frames = video_frames(path, num_frames, training, rng, where)
    return to_pixels([f.convert("RGB").resize((image_size, image_size), Image.BICUBIC) for f in frames])


# ----------------------------------------------------------------------------------------------
# 5. Records: JSONL manifests and the bad-input policy
#
# One sample a line (LLaVA / InternVL style); relative media paths start from the manifest's folder,
# or from DataConfig.image_root for datasets whose paths are relative to a dataset folder
# (LLaVA's "coco/train2017/....jpg" beside a manifest kept elsewhere):
#   {"image": "a.png" | [...], "video": "b.mp4" | [...], "conversations": [{"from": "human", "value":
#    "<image>\n..."}, {"from": "gpt", "value": "..."}], "answer": "7", "task": "count"}
#   {"messages": [{"role": "user", "content": "<image>..." | [{"type": "image"}, {"type": "text",
#    "text": "..."}]}, ...], "images": [...], "videos": [...]}
#   {"text": "..."}                                    (label_mode "text": LM pretraining)
# Missing placeholders are prepended to the first user turn ("<image>\n" per image, then
# "<video>\n" per video), as InternVL does; any other count mismatch is bad input.

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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
        elif kind in ("image", "image_url"):
            out.append(IMAGE + "\n")
        elif kind == "video":
            out.append(VIDEO + "\n")
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
            return Record(where, task, text=obj["text"], answer=answer)
        raise DataError("schema", where, "a record needs 'conversations', 'messages' or 'text'")
    if "conversations" in obj:
        raw = [(m.get("from"), m.get("value")) if isinstance(m, dict) else (None, None) for m in obj["conversations"]]
    else:
        raw = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None) for m in obj["messages"]]
    system, turns = None, []
    for i, (role, content) in enumerate(raw):
        if role not in ROLES or content is None:
            raise DataError("schema", where, f"turn {i}: expected a role in {sorted(ROLES)} and a content, got {role!r}")
        text = _content_text(content, where)
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
    """(tiles, visual tokens) that `load_image` gives a width x height image: the official tiling
    (tile_grid, plus the thumbnail when there are several tiles) or AnyRes (anyres_size). The
    size alone decides them, so packing plans need only the image's header."""
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
        pv, n = load_image(m.path, cfg.max_tiles, cfg.min_tiles, cfg.image_size, cfg.use_thumbnail, cfg.anyres,
                           cfg.patch_size, cfg.downsample_ratio, cfg.anyres_max_patches, cfg.anyres_min_patches,
                           where=where)
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
    n_visual_tokens; source ("file:line"); task; answer (str or None). With decode=False no pixel is
    decoded (pixel_values None) and every other key is as decoding gives it: tokens and tiles come
    from the image headers and the video frame count; only a file that fails after its header
    (a truncated image or video) is found by decoding alone.
    """
    mode = cfg.label_mode
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}")
    base = dict(source=rec.where, task=rec.task, answer=rec.answer)
    if mode == "text" or rec.text is not None:       # a text record is an LM sample in any mode but rl
        if rec.text is None or mode == "rl":
            raise DataError("schema", rec.where, f"label_mode {mode!r} needs a "
                            f"{'text' if mode == 'text' else 'conversations/messages'} record")
        ids, labels = tokenize_text(tok, rec.text)
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
    if mode == "rl" and turns[-1][0] == "assistant":
        turns = turns[:-1]
    media = measure_media(rec, turns, cfg)
    tiles, tokens = [n for m in media for n in m.tiles], [n for m in media for n in m.tokens]
    blocks = iter(image_block(k) for k in tokens)
    expanded = []
    for role, content in turns:
        content = VIDEO_RE.sub(lambda m: video_prompt(cfg.num_frames), content)
        expanded.append((role, expand_placeholders(content, [next(blocks) for _ in range(content.count(IMAGE))],
                                                   rec.where)))
    think = {"on": True, "off": False}.get(cfg.think)
    if think is None and rec.think is not None:
        think = rec.think
    elif think is None:     # "auto" and no flag in the record: what the mode implies
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
        if not self.counts:
            return f"no bad samples in {self.seen}"
        return f"bad samples by reason: {dict(sorted(self.counts.items()))} of {self.seen} seen"

    def state_dict(self) -> dict:
        return {"seen": self.seen, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict):
        self.seen, self.counts = state["seen"], Counter(state["counts"])


class JsonlDataset:
    """One JSONL manifest, indexed by line offsets; `load(i)` returns a sample or raises DataError."""

    def __init__(self, path, tok: tiktoken.Encoding, cfg: DataConfig = None, training: bool = False):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        self.tok, self.cfg, self.training = tok, cfg or DataConfig(), training
        self.offsets, self.line_numbers, offset, blank = [], [], 0, 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self.offsets.append(offset), self.line_numbers.append(number)
                else:
                    blank += 1
                offset += len(line)
        self.offsets, self.line_numbers = np.array(self.offsets, np.int64), np.array(self.line_numbers, np.int64)
        if blank:
            print(f"[data] {self.path}: {blank} blank lines ignored", file=sys.stderr)

    def __len__(self):
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.line_numbers[i]}"

    def record(self, i: int) -> Record:
        """The parsed record of sample i (DataError 'json' for a malformed line)."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError("json", self.where(i), f"malformed JSON: {e}") from None
        base = Path(self.cfg.image_root).resolve() if self.cfg.image_root else self.path.parent
        return parse_record(obj, base, self.where(i), self.path.stem)

    def load(self, i: int, rng=None, decode: bool = True) -> dict:
        return build_sample(self.record(i), self.tok, self.cfg, self.training, rng, decode)

    __getitem__ = load

    def text_of(self, i: int) -> str:
        """The record's words (all turns, placeholders removed) for n-gram statistics; '' if bad."""
        try:
            rec = self.record(i)
        except DataError:
            return ""
        if rec.text is not None:
            return rec.text
        return PLACEHOLDER_RE.sub(" ", " ".join(c for _, c in rec.turns))

    def scan(self, bad: BadData = None, progress: bool = True):
        """Load every sample once, in order; yields the good ones and counts the bad ones in `bad`."""
        bad = bad or BadData(self.cfg.max_bad_fraction, self.cfg.bad_check_after)
        for i in tqdm(range(len(self)), desc=f"check {self.path.name}", disable=not progress):
            try:
                sample = self.load(i, np.random.default_rng(i))
            except DataError as e:
                bad.bad(e)
                continue
            bad.good()
            yield sample


# ----------------------------------------------------------------------------------------------
# 6. Curation, §3.1: judge-score quality filter, chart rendering with QA, caption -> QA
#
# The paper scores SAIL-Caption2 with judge models for visual information richness (VIR) and
# image-text alignment (ITA) and drops low scorers. A judge here is any callable
# (PIL image, text) -> {"vir": float, "ita": float} in [0, 1]; plug in a VLM judge for real data.
# The default `heuristic_judge` is honest about what it is: image statistics, calibrated for the
# synthetic domain of section 11 (flat shapes in known colours on white).

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's embedded font (no system fonts, no download)."""
    return ImageFont.load_default(size=size)


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


def manifest_lines(manifest: Path, desc: str, progress: bool):
    """(where, line) for each non-blank line of a JSONL manifest, with a progress bar; where = 'file:line'."""
    lines = manifest.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(tqdm(lines, desc=f"{desc} {manifest.name}", disable=not progress), start=1):
        if line.strip():
            yield f"{manifest}:{number}", line


def rebase_media(obj: dict, rec: Record, out_dir: Path) -> dict:
    """`obj` with its media paths rewritten relative to `out_dir` (where the new manifest goes)."""
    obj = {k: v for k, v in obj.items() if k not in ("image", "images", "video", "videos")}
    rel = lambda paths: [os.path.relpath(p, out_dir.resolve()) for p in paths]  # noqa: E731
    if rec.images:
        obj["image"] = rel(rec.images)
    if rec.videos:
        obj["video"] = rel(rec.videos)
    return obj


def heuristic_judge(img: Image.Image, text: str) -> dict:
    return {"vir": vir_score(img), "ita": ita_score(img, text)}


def quality_filter(manifest, out, judge=heuristic_judge, min_vir: float = 0.05, min_ita: float = 0.5,
                   progress: bool = True) -> Counter:
    """Keep records whose single image scores at least min_vir and min_ita against the assistant text.
    Kept lines gain "scores"; text-only and multi-image records pass unscored. Returns counts per outcome."""
    manifest, out = Path(manifest), Path(out)
    stats, kept = Counter(), []
    for where, line in manifest_lines(manifest, "filter", progress):
        try:
            obj = json.loads(line)
            rec = parse_record(obj, manifest.parent.resolve(), where, manifest.stem)
            if rec.text is not None or len(rec.images) != 1 or rec.videos:
                stats["kept_unscored"] += 1
                kept.append(json.dumps(rebase_media(obj, rec, out.parent) if rec.text is None else obj,
                                       ensure_ascii=False))
                continue
            scores = judge(open_image(rec.images[0], where), " ".join(c for r, c in rec.turns if r == "assistant"))
        except json.JSONDecodeError:
            stats["bad:json"] += 1
            continue
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    return stats


# Charts (§3.1 synthetic chart data): drawn with Pillow, values printed on the chart so every QA
# answer is readable from the pixels.
CHART_KINDS = ("bar", "line", "pie")
CHART_LABELS = ("cat", "dog", "fish", "bird", "frog", "lion", "bear", "duck")


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
    for i in tqdm(range(n), desc="charts", disable=not progress):
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


# Caption -> QA (§3.1 "Caption2-QA"): a generator maps a caption to (question, answer) pairs. The
# template default parses the synthetic caption grammar ("a red circle at the top left and ...");
# captions it cannot parse fall back to a describe-the-image pair. Plug in an LLM for real captions.
CAPTION_CLAUSE = re.compile(r"\ban? ([a-z]+) ([a-z]+) at the ([a-z]+) ([a-z]+)")


def template_qa(caption: str) -> list:
    qa = []
    for colour, shape, row, col in CAPTION_CLAUSE.findall(caption.lower()):
        qa += [(f"What colour is the {shape} at the {row} {col}?", f"{colour}."),
               (f"Where is the {colour} {shape}?", f"at the {row} {col}."),
               (f"What shape is at the {row} {col}?", f"a {shape}.")]
    return qa or [("Describe the image.", caption)]


def caption_to_qa(manifest, out, generator=template_qa, pairs: int = 1, seed: int = 0,
                  progress: bool = True) -> Counter:
    """Rewrite caption records (one user turn, one assistant caption) as QA conversations with
    `pairs` pairs drawn from generator(caption) (0 = all). Other or bad records are counted, not kept."""
    manifest, out = Path(manifest), Path(out)
    rng, stats, kept = random.Random(seed), Counter(), []
    for where, line in manifest_lines(manifest, "caption2qa", progress):
        try:
            obj = json.loads(line)
            rec = parse_record(obj, manifest.parent.resolve(), where, manifest.stem)
        except json.JSONDecodeError:
            stats["bad:json"] += 1
            continue
        except DataError as e:
            stats[f"bad:{e.reason}"] += 1
            continue
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    return stats


# ----------------------------------------------------------------------------------------------
# 7. Resampling, §3.2.2, and the training stream
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
    visit yet is the same on every rank, in every loader worker and after a resume. `next()`
    returns the next usable (k, sample), `next_meta()` the next usable sample's packing metadata
    without decoding pixels (`meta`). A bad sample is reported once with file and line, counted
    once per sample (not per visit) in `bad`, and skipped; the run stops when too large a fraction
    of the distinct samples seen is bad. The packer reads ahead of training (packing.PackLoader),
    so it collects what its reads find and `record`s it when the step that read it is trained;
    a sample whose pixels fail after its header read fine is found by the rank that decodes it
    (`record_decode_failure`). `state_dict()` is the cursor and those counts (JSON), for exact resume.
    """

    def __init__(self, sources: list, tok: tiktoken.Encoding, cfg: DataConfig = None, seed: int = 0,
                 training: bool = True, ngram_rebalance: bool = False, epoch_size: int = None,
                 verbose: bool = True):
        self.cfg = cfg or DataConfig()
        sources = [(s, 1.0) if isinstance(s, (str, Path)) else s for s in sources]
        self.datasets = [JsonlDataset(p, tok, self.cfg, training) for p, _ in sources]
        for ds in self.datasets:
            if not len(ds):
                raise ValueError(f"manifest {ds.path} holds no samples")
        w = np.array([float(wt) for _, wt in sources])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()
        self.offsets = np.cumsum([0] + [len(ds) for ds in self.datasets])
        self.seed, self.training = seed, training
        self.epoch_size = epoch_size or int(self.offsets[-1])
        self.sample_weights = [None] * len(self.datasets)
        if ngram_rebalance:
            self.sample_weights = [self._rebalance(ds, verbose) for ds in self.datasets]
        self.bad = BadData(self.cfg.max_bad_fraction, self.cfg.bad_check_after, show=verbose)
        self.status = np.zeros(len(self), dtype=np.uint8)      # per sample: 0 unseen, 1 good, 2 bad
        self.epoch, self.pos, self.valid_in_epoch = 0, 0, 0    # the cursor: next visit is order(epoch)[pos]
        self._orders = {}                                     # the last epochs' orders (see `order`)

    def __len__(self):
        return int(self.offsets[-1])

    @staticmethod
    def _rebalance(ds: JsonlDataset, verbose: bool) -> np.ndarray:
        texts = [ds.text_of(i) for i in tqdm(range(len(ds)), desc=f"n-grams {ds.path.name}", disable=not verbose)]
        w = ngram_weights(texts)
        if verbose:
            before, after = diversity(texts), diversity(texts, w)
            print(f"[data] n-gram rebalancing {ds.path.name}: distinct-3 {before['distinct']:.3f} -> "
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

    def load(self, k: int, decode: bool = True) -> dict:
        """The sample at stream position k (raises DataError for a bad one); decode=False: without
        pixels (build_sample)."""
        g = self.sample_index(k)
        s = int(np.searchsorted(self.offsets, g, side="right") - 1)
        return self.datasets[s].load(g - int(self.offsets[s]), np.random.default_rng([self.seed, k, 1]), decode)

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
# 8. Answers: what a reply answers, and when two answers agree
#
# The one grading API of the project: the LongCoT filter (section 9), the evaluation (sample.py)
# and the RL rewards (rl.py, §4.2.3 / §4.2.5) read replies and compare answers only with these.
#
# Where the answer is. A reply's answer region is the text after its last `</think>`; a reply
# without think tags is answer region throughout; one that opens `<think>` and never closes it has
# none (it was cut mid-thought). `split_think` gives (thinking, answer region) of a closed block.
#
# Which box. The final answer is the content of the answer region's last `\boxed{...}`: of the
# boxes whose braces balance, the one whose `\boxed{` comes last, so a box nested in another one
# answers (`\boxed{\boxed{1}+1}` answers 1). That is math-verify 0.9.0's rule
# (latex2sympy2_extended's extract_boxed_content searches `\boxed` from the right), and as there
# braces are counted raw (`\{` and `\}` count), `\boxed` must be followed by `{` directly
# (`\boxed {5}` is no answer) and a box that never closes is ignored (`\boxed{1} and \boxed{2`
# answers 1). Our differences: a box whose content is longer than MAX_BOX_CHARS is no answer (this
# bounds all later work on hostile output); several boxes are not joined into one set answer (for
# math-verify `\boxed{1} or \boxed{2}` is {1, 2}; here it is 2); a lone unclosed box and `\boxed 5`
# without braces are no answer (math-verify reads them).
#
# When two answers agree (`answers_match`). An answer maps to a key (a number as an exact
# Fraction, a choice letter, an ordered tuple/interval, a set, a plain list, a whole-number
# percent, or the cleaned text) and two answers agree when their keys are equal. The keys are held
# to never call equal what math-verify 0.9.0 calls different (tests/test_answers.py); math-verify's
# equality is not transitive (5 = 5.0 and 5 = \text{5}, but 5.0 != \text{5}; 5 = 5% but 5.0 != 5%),
# so every key class must be equal pairwise there, which makes this stricter. It handles: `$`,
# `\$`, whitespace, `\text{}` `\textbf{}` `\textrm{}` `\textnormal{}` `\mathrm{}` `\mbox{}`
# `\boxed{}` wrappers around words (around a bare number they stay text: `\text{5}` != `5`),
# `\left` / `\right`, `\!` and `{,}` thousands separators (`1,234` but not `1, 234`), trailing
# zeros, `a/b` and `\frac` `\dfrac` `\tfrac` `\frac13` vs decimals, `%` after a whole number written
# bare (28% = 28; 12.5% only equals 12.5%), `^\circ`, signs and the Unicode minus, one capital
# choice letter with or without parentheses, `(1,2)` vs `[1,2)` vs `\{1,2\}` (sets unordered), and
# a leading `x =` (but `x=1` != `y=1`). It does NOT handle: algebra (`2x` vs `x+x`), radicals and
# pi, decimals vs repeating fractions (1/3 vs 0.333), lowercase choices, units, scientific
# notation, leading zeros (`03` stays text), mixed numbers, matrices, relations, `°`.
# Case matters (`C` != `c`: a lowercase letter may be a variable). The evaluation of free-text
# answers ignores case by comparing `normalize_answer` forms (lower case, no final period).
#
# Graded agreement of free text: `word_f1` (SQuAD's bag-of-words F1) and `rouge_l` (ROUGE-L F1),
# both over lower-cased \w+ words. Everything here is linear in its input: no regex with nested
# quantifiers over unbounded text, no sympy, no signal.alarm.

MAX_BOX_CHARS = 1000        # a \boxed{} whose content is longer is no answer (bounds all later work)
BOXED = "\\boxed{"
_BRACE = re.compile(r"[{}]")


def split_think(text: str):
    """(thinking, answer region) of a reply `...<think>T</think>A` (T from the first `<think>` to
    the last `</think>`), or None when it has no closed think block."""
    start, end = text.find("<think>"), text.rfind("</think>")
    return None if start < 0 or end < start else (text[start + len("<think>"):end], text[end + len("</think>"):])


def answer_region(text: str):
    """The part of a reply that holds its answer (see above): after the last `</think>`, all of a
    reply without think tags, None for a `<think>` never closed."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    return None if "<think>" in text else text


def last_boxed(text: str, max_chars: int = MAX_BOX_CHARS):
    """Content of the last balanced `\\boxed{...}` of `text` (the one opened last), or None. Boxes
    are tried from the right; a box that does not close (within `max_chars`) cannot be inside an
    earlier box that does, so the earlier one must close before it starts: each character is
    scanned at most once, and boxes after the last `}` are never tried."""
    limit = text.rfind("}") + 1                     # a box can only close before this
    pos = text.rfind(BOXED, 0, limit)
    while pos >= 0:
        start, depth = pos + len(BOXED), 1
        for m in _BRACE.finditer(text, start, min(limit, start + max_chars + 1)):
            depth += 1 if m.group() == "{" else -1
            if depth == 0:
                return text[start:m.start()]
        limit = pos
        pos = text.rfind(BOXED, 0, limit)
    return None


def final_answer(text: str):
    """The reply's final answer: the last box of its answer region, or None."""
    region = answer_region(text)
    return None if region is None else last_boxed(region)


def last_number(text: str):
    """The last number (integer or decimal, with its sign and thousands separators) in `text`."""
    end = max(text.rfind(d) for d in "0123456789")
    if end < 0:
        return None
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
_PERCENT = re.compile(r"(0|[1-9]\d*)%")


def _unwrap(s: str) -> str:
    """Drop `\\text{` ... `}`-style wrappers and keep their content, except around content without
    letters (a number): math-verify reads `\\text{5}` as text, equal to `5` but not to `5.0`, so
    it stays `\\text{5}` here. One pass, linear."""
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
            elif len(out) - at == 2 and _NUMERIC_TEXT.fullmatch(out[-1]):
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
    """A cleaned answer as an exact Fraction (`-3`, `2.50`, `1/2`, `\\frac{1}{2}`, `\\frac12`), or None."""
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    m = _RATIO.fullmatch(s) or _FRAC.fullmatch(s)
    if m is None:
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
    if (m := _PERCENT.fullmatch(s)) is not None:
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
    """Two answers agree: equal keys; besides, a whole-number percent equals the same integer
    written bare (28% = 28, but math-verify calls 28% != 28.0, so 28.0 does not match 28%). An
    empty answer agrees with nothing."""
    a, b = answer_key(pred), answer_key(truth)
    if a is None or b is None or (a[0] and b[0] and a[0] != b[0]):
        return False
    if {a[1][0], b[1][0]} == {"pct", "num"}:
        (_, pct, _), (_, num, text) = (a, b) if a[1][0] == "pct" else (b, a)
        return text.isdigit() and text.isascii() and num[1] == pct[1]
    return a[1] == b[1]


def normalize_answer(s: str) -> str:
    """The spelling the evaluation reports and compares a free-text answer in: `clean_answer`,
    lower case, no final period, a whole number without decimals ("4.0" -> "4")."""
    s = clean_answer(s).lower().rstrip(".").strip()
    x = parse_number(s)
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
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))


# ----------------------------------------------------------------------------------------------
# 9. LongCoT data cleaning, §4.2.2: format to "<think>\nT\n</think>\nA" with A holding \boxed{},
# deduplicate by (image, question), drop answers that restate the chain (token overlap), and
# balance CoT lengths by resampling. (The paper's answer distillation by a judge model is not done.)

def format_longcot(obj: dict, where: str) -> dict:
    """The record with its last assistant turn in LongCoT form. Accepts a <think>-tagged assistant
    turn, or {"question", "cot", "answer"} fields. A without a balanced \\boxed{} (`last_boxed`)
    gets "The answer is \\boxed{answer}." when the record has an "answer", else the record is bad
    ('format'); a boxed answer that disagrees with the record's "answer" (`answers_match`) is bad
    ('wrong_answer')."""
    if "conversations" not in obj and "messages" not in obj and {"question", "cot"} <= obj.keys():
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
    for where, line in manifest_lines(manifest, "longcot", progress):
        try:
            obj = format_longcot(json.loads(line), where)
            rec = parse_record(obj, manifest.parent.resolve(), where, manifest.stem)
        except json.JSONDecodeError:
            stats["bad:json"] += 1
            continue
        except DataError as e:
            stats[f"bad:{e.reason}"] += 1
            continue
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for _, line in kept), encoding="utf-8")
    return stats


# ----------------------------------------------------------------------------------------------
# 10. Curation §4.1 (post-training data): SAIL-Instruction2 (§4.1.2) and SAIL-Video (§4.1.1)
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


def read_instructions(manifests, desc: str, bad: Counter, progress: bool):
    """(obj, rec) per record that ends with an assistant turn and whose media files exist; the others
    are counted in `bad` as bad:<reason> (json, schema, not_instruction, missing_file, ...)."""
    for manifest in map(Path, manifests):
        for where, line in manifest_lines(manifest, desc, progress):
            try:
                obj = json.loads(line)
                rec = parse_record(obj, manifest.parent.resolve(), where, manifest.stem)
                if rec.text is not None or rec.turns[-1][0] != "assistant":
                    raise DataError("not_instruction", where, "the record does not end with an assistant turn")
                for path in rec.images + rec.videos:
                    if not os.path.exists(path):
                        raise DataError("missing_file", where, f"media file not found: {path}")
                yield obj, rec
            except json.JSONDecodeError:
                bad["bad:json"] += 1
            except DataError as e:
                bad[f"bad:{e.reason}"] += 1


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


def class_stats(answers: list) -> dict:
    """What a class's answers look like, for the truncation rule. A word is seen whole when another
    word follows it or it ends an answer with final punctuation."""
    ws, ends = [words_of(a) for a in answers], [a.strip().endswith(TERMINAL) for a in answers]
    return {"median_chars": float(np.median([len(a.strip()) for a in answers])), "punct_rate": float(np.mean(ends)),
            "whole": {x for w, end in zip(ws, ends) for x in (w if end else w[:-1])},
            "prefixes": {x[:i] for w in ws for x in w for i in range(1, len(x))}}


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
    if bigrams and sum(g in set(zip(qw, qw[1:])) for g in bigrams) >= 0.8 * len(bigrams):
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
                                  stop_tokens=self.stop, n_valid_tokens=self.tok.n_vocab)
        return [self.tok.decode_bytes(o[:-1]).decode("utf-8", "replace") if o and o[-1] in self.stop else None
                for o in out]


def _r(x):
    return None if x is None else round(float(x), 4)


def write_outputs(out_dir: Path, lines: list, **files):
    """out_dir/curated.jsonl (one JSON line each) and out_dir/NAME.json for each keyword."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curated.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    for name, value in files.items():
        (out_dir / f"{name}.json").write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


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
    raw, z, fate, audit, low = [None] * n, [None] * n, {}, {}, set()     # fate: index -> why dropped
    for i in tqdm(range(n) if scorer else [], desc="score", disable=not progress):
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
    counts["low_score"] = len(low)
    for i in tqdm([i for i in range(n) if (rule[i] or i in low) and i not in fate], desc="re-annotate",
                  disable=not progress or annotator is None):
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
    median = float(np.median([len(a) for a in alive if a])) if any(alive) else 0.0
    limit, rng, keep = math.ceil(cap * median), random.Random(seed), []
    for a in alive:
        if len(a) > limit:
            a = sorted(rng.sample(a, limit))
        elif upsample and a and len(a) < median:
            a = a * (math.ceil(median) // len(a)) + sorted(rng.sample(a, math.ceil(median) % len(a)))
        keep += a
    keep.sort()
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
# 11. Synthetic default data: real PNG / MP4 files and JSONL manifests, generated deterministically
#
# Layout of DIR (`python data.py synth --out DIR`, or `ensure_synth(DIR)` on first use):
#   DIR/synth.json                         stamp: version, seed, size, samples per family and split
#   DIR/{family}/train.jsonl, eval.jsonl   manifests (held-out eval split: different random scenes)
#   DIR/{family}/images/{split}_{i:05d}[_a|_b].png,  DIR/video/videos/{split}_{i:05d}.mp4
#   DIR/tokenizer.json                     a byte-level BPE trained on the train split (`train_bpe`)
# The language is small and regular ("a red circle at the top left.") so a tiny model visibly learns
# it in minutes; its own BPE makes a sample ~2x shorter than bytes. Every record but caption/text
# carries a short "answer" (RL rewards, evaluation); CoT records (math, count_cot) carry "think": true.

SYNTH_VERSION = 3
SYNTH_VOCAB = 512                  # the tiny presets' vocab_size: bytes + specials + 242 merges
SYNTH_SYSTEM = "You are UniVL, a helpful assistant."   # the tiny presets' system prompt (model.preset_config)
DEFAULT_SYNTH_DIR = "data_synth"   # relative to the working directory; git-ignored
DEFAULT_SYNTH_SIZE = 1024          # train samples per family (eval: size // 8; text: 8 x size)
# RL prompts (§4.2.3) no SFT stage reads: count_cot/rl.jsonl (4 x size fresh scenes, so an RL run
# never repeats a prompt) and count_cot/rl_eval.jsonl (size // 2 held-out scenes)
RL_SPLITS = {"count_cot": {"rl": 4, "rl_eval": 0.5}}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
WORDS = ("apple", "bread", "chair", "cloud", "dance", "earth", "flame", "glass", "heart", "jelly", "kite",
         "lemon", "music", "night", "ocean", "piano", "queen", "robot", "sugar", "tiger", "violin", "water", "zebra")
CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Write a short caption.")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def draw_shape(d: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float):
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def scene_image(objects: list, size: int = 112) -> Image.Image:
    """White canvas with (colour, shape, row, col) objects centred in a 3x3 grid of cells."""
    img = Image.new("RGB", (size, size), "white")
    d, cell = ImageDraw.Draw(img), size / 3
    for colour, shape, row, col in objects:
        draw_shape(d, shape, colour, (COLS.index(col) + 0.5) * cell, (ROWS.index(row) + 0.5) * cell, cell * 0.35)
    return img


def scene_caption(objects: list) -> str:
    return " and ".join(f"a {c} {s} at the {r} {col}" for c, s, r, col in objects) + "."


def random_objects(rng: random.Random, n: int, shape: str = None) -> list:
    cells = rng.sample([(r, c) for r in ROWS for c in COLS], n)
    return [(rng.choice(list(COLOURS)), shape or rng.choice(SHAPES), r, c) for r, c in cells]


def text_image(text: str, size: tuple, font_size: int) -> Image.Image:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((size[0] / 2, size[1] / 2), text, fill="black", font=font(font_size), anchor="mm")
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
    scene_image(objects).save(root / f"{stem}.png")
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\n{rng.choice(CAPTION_PROMPTS)}", scene_caption(objects)),
            "task": "caption"}


def gen_caption_qa(rng, stem, root):
    objects = random_objects(rng, rng.randint(1, 2))
    scene_image(objects).save(root / f"{stem}.png")
    q, a = rng.choice(template_qa(scene_caption(objects)))
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\n{q}", a), "answer": a.rstrip(".").removeprefix("a ")
            .removeprefix("at the "), "task": "caption_qa"}


def gen_ocr(rng, stem, root):
    word = rng.choice(WORDS)
    text_image(word, (224, 112), 40).save(root / f"{stem}.png")
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
    scene_image(objects).save(root / f"{stem}.png")
    n, sentence = _count_words(objects, shape)
    return {"image": f"{stem}.png", **_conv(f"{IMAGE}\nHow many {shape}s are there?", sentence), "answer": str(n),
            "task": "count"}


def gen_count_cot(rng, stem, root):
    """Counting with a chain that names every object: 1 to 9 objects (every cell of the grid), so
    the answer space is wide enough that guessing is rarely right (the RL stages train on it)."""
    shape = rng.choice(SHAPES)
    objects = random_objects(rng, rng.randint(1, 9), shape)
    scene_image(objects).save(root / f"{stem}.png")
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
    text_image(f"{a} {op} {b}", (112, 112), 32).save(root / f"{stem}.png")
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
    scene_image([o1]).save(root / f"{stem}_a.png")
    scene_image([o2]).save(root / f"{stem}_b.png")
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


SYNTH_FAMILIES = {"text": gen_text, "caption": gen_caption, "caption_qa": gen_caption_qa, "ocr": gen_ocr,
                  "chart": gen_chart, "count": gen_count, "count_cot": gen_count_cot, "math": gen_math,
                  "math_direct": gen_math_direct, "multi": gen_multi, "video": gen_video}


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
        for where, line in manifest_lines(path, "tokenizer", False):
            rec = parse_record(json.loads(line), path.parent, where, path.stem)
            if rec.text is not None:
                texts.append(rec.text)
                continue
            turns = [(r, PLACEHOLDER_RE.sub("", VIDEO_RE.sub(lambda m: video_prompt(16), c))) for r, c in rec.turns]
            texts.append(render_chat(turns, SYNTH_SYSTEM, think=bool(rec.think)))
    return texts


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
        for family, gen in tqdm(SYNTH_FAMILIES.items(), desc="synth", disable=not progress):
            media = tmp / family / ("videos" if family == "video" else "images")
            media.mkdir(parents=True)
            for split, n in counts[family].items():
                rng = random.Random(f"{seed}/{family}/{split}")
                lines = [gen(rng, f"{media.name}/{split}_{i:05d}", tmp / family) for i in range(n)]
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
    """The synthetic dataset at `out`, generated on first use; a no-op when it is already there.
    Safe when several ranks call it at once (the first rename wins, the others discard their copy)."""
    out = Path(out)
    stamp = out / "synth.json"
    if not stamp.exists():
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and has no synth.json; refusing to write synthetic data there")
        if out.exists():
            out.rmdir()
        try:
            make_synth(out, seed, size, progress)
        except OSError:
            if not stamp.exists():      # not another rank's rename winning the race
                raise
    have = json.loads(stamp.read_text(encoding="utf-8"))
    if (have["version"], have["seed"], have["size"]) != (SYNTH_VERSION, seed, size):
        raise ValueError(f"{out} holds synthetic data v{have['version']} seed {have['seed']} size {have['size']}; "
                         f"asked for v{SYNTH_VERSION} seed {seed} size {size}: delete it or use another folder")
    return out


# ----------------------------------------------------------------------------------------------
# 12. Command line

def _print_counts(title: str, counts: Counter):
    print(f"{title}:")
    for k, v in sorted(counts.items()):
        print(f"  {k:28s} {v}")


def _load_scorer(ckpt, **overrides):
    """A CheckpointScorer for a checkpoint folder, or None (the command line alone imports model.py)."""
    if ckpt is None:
        return None
    import model
    m = model.SAILVL.from_pretrained(ckpt).eval()
    tok = load_tokenizer(ckpt if any(Path(ckpt, f).exists() for f in ("tokenizer.json", "vocab.json")) else None)
    return CheckpointScorer(m, tok, DataConfig.from_model(m.cfg, **overrides))


def add_image_tokens_cli(src: str, out: str):
    """`python data.py add-image-tokens SRC OUT`: one line of what was added, or one error line, exit 2."""
    try:
        new = add_image_tokens(src, out)
    except (ValueError, OSError) as e:
        print(f"data.py add-image-tokens: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{out}: " + (f"added {', '.join(f'{t} {i}' for t, i in new.items())} (SAIL-VL2's ids)" if new
                        else f"{src} already has SAIL-VL2's tokens; copied"))


def main(argv=None):
    p = argparse.ArgumentParser(description="SAIL-VL2 data tools: synthetic data, manifest checks, curation (§3.1, "
                                "§3.2.2, §4.1, §4.2.2). Run `python data.py SUBCOMMAND --help` for each.")
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter                 # every subcommand's help shows its defaults
    s = sub.add_parser("synth", formatter_class=fmt, help="generate the synthetic default dataset (PNG, MP4, JSONL) into a new folder")
    s.add_argument("--out", default=DEFAULT_SYNTH_DIR, help="folder to create (must not exist)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    s.add_argument("--size", type=int, default=DEFAULT_SYNTH_SIZE, help="train samples per task family")
    s = sub.add_parser("add-image-tokens", formatter_class=fmt, help="copy a Qwen tokenizer folder, adding SAIL-VL2's <img>, </img>, "
                       "<IMG_CONTEXT> (and grounding) tokens at the official ids")
    s.add_argument("src", help="a Qwen3 folder (tokenizer.json, or vocab.json + merges.txt); only read")
    s.add_argument("out", help="the folder to write the tokenizer files into (created)")
    s = sub.add_parser("check", formatter_class=fmt, help="load every sample of a manifest and report bad lines by reason; exit 1 when "
                       "training would refuse it (more than max_bad_fraction bad)")
    s.add_argument("manifest", help="a JSONL manifest (conversations / messages / text per line)")
    s.add_argument("--image-root", default="", help="folder the manifest's image/video paths are relative to; "
                   "empty: the manifest's folder")
    s.add_argument("--tokenizer", default=None, help="Qwen tokenizer folder (None: the embedded byte tokenizer)")
    s.add_argument("--preset", default="tiny", help="the model preset whose image geometry to use (model.py)")
    s.add_argument("--ckpt", default=None, help="a checkpoint folder whose geometry to use (instead of --preset)")
    s.add_argument("--max-len", type=int, default=8192, help="longer samples are reported as too_long")
    s.add_argument("--label-mode", default="sft", choices=LABEL_MODES, help="which tokens carry labels")
    s.add_argument("--max-bad-fraction", type=float, default=DataConfig.max_bad_fraction,
                   help="the share of bad samples training accepts (the stage option of the same name)")
    s = sub.add_parser("rebalance", formatter_class=fmt, help="n-gram rebalancing weights (§3.2.2) and the diversity before/after")
    s.add_argument("manifest")
    s.add_argument("--n", type=int, default=3, help="n-gram order")
    s.add_argument("--alpha", type=float, default=0.5, help="weight = mean df(g)^-alpha over the sample's n-grams")
    s.add_argument("--out", default=None, help="write the per-line weights as JSON here")
    s = sub.add_parser("filter", formatter_class=fmt, help="keep samples whose judge scores (VIR, ITA) pass thresholds (§3.1)")
    s.add_argument("manifest")
    s.add_argument("out")
    s.add_argument("--min-vir", type=float, default=0.05, help="visual information richness threshold")
    s.add_argument("--min-ita", type=float, default=0.5, help="image-text alignment threshold")
    s = sub.add_parser("charts", formatter_class=fmt, help="render bar/line/pie charts to PNG with their data and QA pairs")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=224, help="chart side in pixels")
    s = sub.add_parser("caption2qa", formatter_class=fmt, help="turn caption samples into QA conversations (template generator)")
    s.add_argument("manifest")
    s.add_argument("out")
    s.add_argument("--pairs", type=int, default=1, help="QA pairs per caption (0 = all)")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("longcot", formatter_class=fmt, help="clean LongCoT data: format, dedup, redundancy filter, length balance (§4.2.2)")
    s.add_argument("manifest")
    s.add_argument("out")
    s.add_argument("--max-overlap", type=float, default=0.8, help="drop when this share of answer 3-grams is in the CoT")
    s.add_argument("--no-balance", action="store_true", help="skip CoT-length balancing")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("curate-instructions", formatter_class=fmt, help="SAIL-Instruction2 (§4.1.2): latent classes, "
                       "answer quality, re-annotation, class balancing -> DIR/{curated.jsonl,classes.json,report.json}")
    s.add_argument("--classes", type=int, default=8, help="latent classes (k-means on the instructions' TF-IDF)")
    s.add_argument("--annotator", help="checkpoint that re-annotates (greedy) and, without --scorer, scores answers "
                   "(mean log-likelihood); without it rule failures are dropped")
    s.add_argument("--reannotate-frac", type=float, default=0.1, help="lowest-scoring share of each class to "
                   "re-annotate or drop, besides every rule failure (needs a scorer)")
    s.add_argument("--cap", type=float, default=2.0, help="a class keeps at most cap x the median class size")
    s.add_argument("--upsample", action="store_true", help="repeat classes below the median size up to it")
    s.add_argument("--max-new-tokens", type=int, default=256, help="re-annotation length limit")
    s.add_argument("--seed", type=int, default=0, help="k-means and balancing seed: same seed, same bytes")
    v = sub.add_parser("curate-video", formatter_class=fmt, help="SAIL-Video (§4.1.1): alignment, richness and "
                       "difficulty scores and filters -> DIR/{curated.jsonl,report.json}")
    v.add_argument("--min-alignment", type=float, default=0.0, help="drop when the video raises the answer's mean "
                   "log-likelihood over all-white frames by less than this (nats/token)")
    v.add_argument("--min-richness", type=float, default=0.1, help="drop below this richness in [0, 1] (still video: "
                   "0, the synthetic moving shapes: ~0.6)")
    v.add_argument("--max-pass-rate", type=float, default=1.0, help="drop above this greedy pass rate of the scorer "
                   "(1.0 keeps all; 0.5 drops what it already answers)")
    v.add_argument("--num-frames", type=int, default=16, help="frames sampled per video")
    for s, what in ((s, "quality"), (v, "alignment and difficulty (without it neither is computed nor filtered)")):
        s.add_argument("--in", dest="inputs", required=True, help="manifest(s), comma-separated")
        s.add_argument("--out", required=True, help="output folder")
        s.add_argument("--scorer", help=f"checkpoint whose answer log-likelihood scores {what}")
    args = p.parse_args(dashed_options(sys.argv[1:] if argv is None else argv))
    try:
        run_command(args)
    except (FileNotFoundError, DataError, ValueError) as e:       # usage mistakes: one line, exit 2
        p.exit(2, f"data.py {args.cmd}: error: {e}\n")


def dashed_options(argv: list) -> list:
    """--max_len=8 -> --max-len=8: the command-line tools accept the training scripts' underscore
    spelling as well as their own dashed one."""
    return [a.split("=", 1)[0].replace("_", "-") + a[len(a.split("=", 1)[0]):] if a.startswith("--") else a
            for a in argv]


def run_command(args):
    if args.cmd == "add-image-tokens":
        add_image_tokens_cli(args.src, args.out)
    elif args.cmd == "synth":
        out = make_synth(args.out, args.seed, args.size)
        print(f"wrote {out}: {json.loads((out / 'synth.json').read_text())['samples']}")
    elif args.cmd == "check":
        import model                            # the command line only: the geometry a model was built for
        mcfg = model.SAILVLConfig.from_dict(json.loads(Path(args.ckpt, "config.json").read_text())) if args.ckpt \
            else model.preset_config(args.preset)
        cfg = DataConfig.from_model(mcfg, max_len=args.max_len, label_mode=args.label_mode, image_root=args.image_root)
        ds = JsonlDataset(args.manifest, load_tokenizer(args.tokenizer), cfg)
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
    elif args.cmd == "rebalance":
        ds = JsonlDataset(args.manifest, load_tokenizer(None))
        texts = [ds.text_of(i) for i in tqdm(range(len(ds)), desc="read")]
        w = ngram_weights(texts, args.n, args.alpha)
        before, after = diversity(texts, n=args.n), diversity(texts, w, n=args.n)
        print(f"distinct-{args.n}: {before['distinct']:.4f} -> {after['distinct']:.4f}")
        print(f"{args.n}-gram entropy: {before['entropy']:.3f} -> {after['entropy']:.3f} bits")
        print(f"weights: min {w.min():.3f} max {w.max():.3f}")
        if args.out:
            Path(args.out).write_text(json.dumps({str(ds.line_numbers[i]): round(float(x), 6) for i, x in enumerate(w)}))
    elif args.cmd == "filter":
        _print_counts("quality filter", quality_filter(args.manifest, args.out, min_vir=args.min_vir, min_ita=args.min_ita))
    elif args.cmd == "charts":
        print(f"wrote {make_charts(args.out, args.n, args.seed, args.size)}")
    elif args.cmd == "caption2qa":
        _print_counts("caption -> QA", caption_to_qa(args.manifest, args.out, pairs=args.pairs, seed=args.seed))
    elif args.cmd == "longcot":
        _print_counts("LongCoT cleaning", clean_longcot(args.manifest, args.out, args.max_overlap,
                                                         not args.no_balance, args.seed))
    elif args.cmd == "curate-instructions":
        annotator = _load_scorer(args.annotator)
        print(json.dumps(curate_instructions(args.inputs.split(","), args.out, args.classes, _load_scorer(
            args.scorer) or annotator, annotator, args.reannotate_frac, args.cap, args.upsample, args.seed,
            args.max_new_tokens), indent=1, ensure_ascii=False))
    elif args.cmd == "curate-video":
        scorer = _load_scorer(args.scorer, num_frames=args.num_frames)
        print(json.dumps(curate_video(args.inputs.split(","), args.out, scorer, args.min_alignment, args.min_richness,
                                      args.max_pass_rate, args.num_frames), indent=1, ensure_ascii=False))

if __name__ == "__main__":
    main()
