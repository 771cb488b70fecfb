"""Every training stage of SAIL-VL2 in one flat loop (paper §2.1.1, §3.2, §4.2.1, §4.2.2, §4.2.4, §5).

    torchrun train_stage.py --stage vit1                     # the tiny default, CPU, a few minutes
    torchrun --nproc_per_node 2 train_stage.py --stage sft1  # FSDP2 over 2 processes (gloo on CPU)
    python train_stage.py --help                             # every stage with the paper's values
    python train_stage.py --stage pretrain1 --help           # that stage's values for every option

Reads in the paper's order:
  recipe       `RECIPE`: the ordered stage table, the only place a stage is defined (trainable
               modules, data mix, label mode, init rule, tiny defaults, the paper's values as
               data). lm0 (not in the paper) language-pretrains the tiny LLM, standing in for
               Qwen3. SAIL-ViT progressive alignment vit1 -> vit2 -> vit3 (§2.1.1), and the
               control vit3-direct (stage III alone) it is measured against; basic
               pre-training pretrain1 with AdaLRS (§3.2.1, §3.2.3) and multi-task pretrain2 with
               n-gram rebalancing (§3.2.2); SFT phases sft1..sft4, a homogeneous twin and the model
               soup (§4.2.1); LongCoT SFT (§4.2.2); RL with verifiable rewards, CoT harvest,
               Think-Fusion SFT (§4.2.4) and RL with mixed rewards; the RL rows run in rl.py.
  model init   the stage's init rule (previous stage / per-module sources), --init-from DIR, or
               HF weights (--init-llm, --init-vit)
  FSDP2        `parallelize`: fully_shard each LLM block, the ViT as one unit, then the root (§5.2)
  the loop     AdamW, warm-up + cosine (x the AdaLRS scale), grad clipping and accumulation,
               stream packing with one global token-mean loss (§5.1), eval, checkpoints
  checkpoints  one writer and one reader: atomic folders, checksums, exact resume
  soup         average homogeneous checkpoints (§4.2.1)

Reading order of one training step, from a manifest line to loss.backward() (file:function):
  1. train_stage.py:train            the loop: LR = schedule x AdaLRS scale, then the next batch
  2. train_stage.py:StageBatches.next  data -> packing for this step:
       data.py:Mixture.next           the next visit of the stage's resampled mixture (§3.2.2)
       data.py:JsonlDataset.load, build_sample   a manifest line -> media, template, tokens, labels
       packing.py:sample_meta, StreamPacker.push / pop   stream packing (§5.1)
       packing.py:balance_packs, collate_pack            this rank's micro-batches as tensors
  3. train_stage.py:train_step       per micro-batch:
       model.py:SAILVL.forward        vit.py:SAILViT -> model.py:pixel_shuffle -> mlp1 -> the
                                      <IMG_CONTEXT> slots -> model.py:Qwen3LM.run (kernels.py:
                                      packed_attention; moe.py:SparseMoeBlock) -> summed CE
       train_stage.py:step_loss       the one loss: global token mean, aux term, world size
       loss.backward(); then clip, AdamW step
  4. train_stage.py:save_checkpoint  every save_every steps, and the stage output at the end

Options: any StageConfig field as `--key=value` or `--key value` (types checked, unknown keys
refused), nested configs as `--packing.max_tokens=2048`, `--adalrs_cfg.window=20`, and the model
as `--model.llm_config.hidden_size=256`. The resolved config is printed at start and saved in
every checkpoint.
"""
import argparse
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import data
import model as M
import moe
import packing
from adalrs import AdaLRS, AdaLRSConfig
from packing import PackingConfig

MODULES = ("vision_model", "mlp1", "language_model")


class UsageError(ValueError):
    """A bad command line: reported as one line on stderr, exit code 2."""


# ==============================================================================================
# configuration

def tiny_packing() -> PackingConfig:
    """The packer of the tiny stages: short packs, a small buffer that turns over quickly."""
    return PackingConfig(max_tokens=1024, buffer_size=64, max_wait=32, max_images_per_pack=64)


@dataclass
class StageConfig:
    stage: str = "vit1"                   # a stage of the recipe table (python train_stage.py --help)
    preset: str = "tiny"                  # model preset (python model.py --preset NAME)
    scale: str = "tiny"                   # tiny | paper: "paper" applies the stage's paper values (printed)
    out_dir: str = "out"                  # stage outputs out/<stage>/, run state (step checkpoints) out/<stage>.run/
    data_dir: str = "data_synth"          # synthetic default data, generated on first use
    manifests: str = ""                   # your own data: "a.jsonl:2,b.jsonl:1" (path:weight), replaces the mix
    eval_manifests: str = ""              # held-out data for eval (default: the mix's eval split)
    init_from: str = ""                   # "" = the stage's init rule; a SAIL-VL2 folder; "random" = fresh weights
    init_llm: str = ""                    # an HF Qwen3 / Qwen3-MoE folder for the language model
    init_vit: str = ""                    # an HF AIMv2 / SAIL-ViT folder for the vision encoder
    tokenizer: str = ""                   # a Qwen tokenizer folder ("" = the embedded default)
    trainable: str = "mlp1"               # comma list of vision_model, mlp1, language_model
    text_only: bool = False               # drop images/videos from the data (lm0: the LLM learns the chat format)
    label_mode: str = "sft"               # sft | longcot | thinkfusion | text (which tokens carry loss)
    steps: int = 100                      # optimizer steps
    lr: float = 1e-3                      # peak learning rate
    min_lr_ratio: float = 0.1             # cosine floor as a fraction of lr
    warmup_steps: int = 5                 # linear warm-up steps
    schedule: str = "cosine"              # cosine | constant (after warm-up)
    weight_decay: float = 0.0             # AdamW weight decay (matrices only)
    beta1: float = 0.9                    # AdamW beta1
    beta2: float = 0.95                   # AdamW beta2
    grad_clip: float = 1.0                # max global gradient norm
    max_bad_steps: int = 3                # stop after this many non-finite losses in a row (each is skipped)
    packing: PackingConfig = field(default_factory=tiny_packing)   # --packing.max_tokens=...
    adalrs: bool = False                  # AdaLRS learning-rate search (pretrain1 by default)
    adalrs_cfg: AdaLRSConfig = field(default_factory=AdaLRSConfig)       # --adalrs_cfg.window=...
    ngram_rebalance: bool = False         # n-gram rebalancing of the mix (§3.2.2; pretrain2 by default)
    eval_every: int = 50                  # held-out loss every N steps (and at step 0 and the end); 0 = never
    eval_packs: int = 8                   # held-out steps per eval
    save_every: int = 50                  # step checkpoint every N steps; 0 = only the stage output
    keep_checkpoints: int = 2             # step checkpoints kept in out/<stage>.run/
    max_bad_fraction: float = 0.05        # stop when more of the distinct samples than this are bad
    seed: int = 1337                      # init, data order and sampling
    fsdp: bool = False                    # shard with FSDP2 even as one process (several always shard)
    auto_steps: int = 0                   # steps of a stand-in stage run automatically first (0 = its default)
    step_scale: float = 1.0               # multiply the stage's steps (a shortened recipe: --stage all --step_scale=0.2)


def field_help(cls) -> dict:
    """{field: its one-line comment} read from the dataclass source: the comments ARE the help."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.*)$", src, re.M)}


def parse_value(text: str, current, name: str):
    """`text` converted to the type of `current` (bool, int, float, str, Optional[int])."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{name}: expected a boolean (true/false), got {text!r}")
    if isinstance(current, (list, tuple)):
        proto = current[0] if current else ""
        return type(current)(parse_value(t, proto, name) for t in text.split(",") if t != "")
    if current is None or isinstance(current, int):
        if current is None and text.lower() in ("none", ""):
            return None
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--{name}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--{name}: expected a number, got {text!r}") from None
    return text


def set_key(roots: dict, key: str, value: str) -> None:
    """Apply one `--a.b.c=value` to the dataclasses in `roots` ('' = the stage config; 'model' =
    the model config); dotted keys walk nested dataclass fields. Unknown keys are refused with
    the nearest known one."""
    key = key.replace("-", "_")
    head, _, rest = key.partition(".")
    obj, path = (roots[head], rest.split(".")) if head in roots and head and rest else (roots[""], key.split("."))
    for i, p in enumerate(path):
        names = [f.name for f in fields(obj)] if dataclasses.is_dataclass(obj) else []
        if p not in names:
            near = difflib.get_close_matches(p, names, n=1)
            where = ".".join(path[:i]) or "the stage config"
            raise UsageError(f"unknown option --{key}" + (f" (did you mean --{'.'.join(path[:i] + near)}?)" if near
                                                          else f" (no field {p!r} in {where})"))
        if i == len(path) - 1:
            setattr(obj, p, parse_value(value, getattr(obj, p), key))
        else:
            obj = getattr(obj, p)


def split_options(argv: list, multi=("ckpts",), flags=("help", "resume")) -> list:
    """[(key, value)] from argv in one option style: `--key=value` or `--key value`. Keys in
    `multi` take every following value; keys in `flags` may stand alone (value None)."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item in ("-h",):
            item = "--help"
        if not item.startswith("--"):
            raise UsageError(f"unexpected argument {item!r} (options look like --key=value)")
        key, eq, value = item[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        if key in multi and not eq:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            value = ",".join(values)
        elif not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            elif key in flags:
                value = None
            else:
                raise UsageError(f"--{key} needs a value: --{key}=VALUE")
        out.append((key, value))
    return out


# ==============================================================================================
# the recipe: one ordered table of stages (paper sections, values as data, tiny defaults)

@dataclass(frozen=True)
class Stage:
    name: str
    section: str                # paper section ("" for a stand-in the miniature needs)
    note: str                   # what the paper does in this stage, in one line
    trainable: tuple = MODULES  # the modules the paper trains
    mix: tuple = ()             # ((synthetic family or "out:<stage>/<file>", weight), ...): the stage's data
    label_mode: str = "sft"     # which tokens carry loss (data.LABEL_MODES)
    init: object = "previous"   # "previous", "random", a stage name, or ((module, stage | "fresh"), ...)
    tiny: tuple = ()            # ((key, value), ...): the CPU default (StageConfig keys; rl.RLConfig's for rl.py rows)
    paper: tuple = ()           # ((key, value), ...): lr, batch (samples), seq, samples, tokens, epochs, ...
    runner: str = "train_stage.py"   # the script that runs it (RL stages: rl.py)
    auto: bool = False          # a stand-in: run automatically when a later stage needs its output
    inputs: tuple = ()          # soup: the stages whose outputs are averaged

    @property
    def paper_values(self) -> dict:
        return dict(self.paper)


VIT3_MIX = (("caption", 0.2), ("caption_qa", 0.2), ("ocr", 0.2), ("count", 0.2), ("chart", 0.2))
VIT3_TINY = (("lr", 1e-3), ("steps", 600), ("eval_every", 100))
SFT_MIX_4 = (("video", 0.5), ("caption_qa", 0.1), ("ocr", 0.1), ("chart", 0.1), ("count", 0.1), ("multi", 0.1))
SFT4_TINY = (("lr", 3e-4), ("steps", 200), ("packing.max_tokens", 2048))
RECIPE = (
    Stage("lm0", "", "not a paper stage: language pre-training of the tiny LLM on synthetic text and text-only "
          "chat, standing in for Qwen3's own pre-training (real runs start from Qwen3: --init-llm)",
          trainable=("language_model",), init="random", auto=True,
          mix=(("text", 0.3), ("caption", 0.1), ("caption_qa", 0.1), ("ocr", 0.05), ("chart", 0.1), ("count", 0.1),
               ("math_direct", 0.1), ("multi", 0.05), ("video", 0.05), ("math", 0.025), ("count_cot", 0.025)),
          tiny=(("text_only", True), ("lr", 3e-3), ("steps", 600), ("warmup_steps", 10), ("eval_every", 100))),
    Stage("vit1", "§2.1.1", "SAIL-ViT stage I: the adapter aligns the ViT to the LLM; 4.9M SAIL-Caption2 + 3.1M OCR",
          trainable=("mlp1",), mix=(("caption", 0.6), ("ocr", 0.4)),
          tiny=(("lr", 3e-3), ("steps", 800), ("warmup_steps", 10), ("eval_every", 200)),
          paper=(("lr", 2e-4), ("batch", 1920), ("seq", 8192), ("samples", 8_000_000))),
    Stage("vit2", "§2.1.1", "SAIL-ViT stage II: ViT + adapter on SAIL-Caption2, Caption2-QA and VQA",
          trainable=("vision_model", "mlp1"), mix=(("caption", 0.4), ("caption_qa", 0.3), ("ocr", 0.3)),
          tiny=(("lr", 1e-3), ("steps", 400), ("eval_every", 100)), paper=(("lr", 2e-5), ("batch", 512), ("seq", 8192))),
    Stage("vit3", "§2.1.1", "SAIL-ViT stage III: all parameters, 36.5M multimodal samples", mix=VIT3_MIX, tiny=VIT3_TINY,
          paper=(("lr", 1e-5), ("batch", 512), ("seq", 8192), ("samples", 36_500_000))),
    Stage("vit3-direct", "§2.1.1", "a control, not a paper stage: stage III straight from lm0 (the ViT and adapter "
          "untrained, as vit1 starts), the baseline progressive alignment is measured against",
          init="lm0", mix=VIT3_MIX, tiny=VIT3_TINY),
    Stage("pretrain1", "§3.2.1, §3.2.3", "basic pre-training: SAIL-ViT + the original LLM + a freshly initialised "
          "adapter, adapter only, AdaLRS from 2e-4 (ended at 6.75e-4); captions, chart captions, OCR",
          trainable=("mlp1",), init=(("vision_model", "vit3"), ("mlp1", "fresh"), ("language_model", "lm0")),
          mix=(("caption", 0.5), ("ocr", 0.25), ("chart", 0.15), ("text", 0.1)),
          tiny=(("lr", 3e-4), ("steps", 400), ("adalrs", True), ("eval_every", 100)),
          paper=(("lr", 2e-4), ("batch", 2048), ("seq", 8192), ("samples", 64_000_000), ("tokens", 128e9))),
    Stage("pretrain2", "§3.2.1, §3.2.2", "multi-task pre-training: all parameters, half visual understanding, half "
          "instructions incl. text math; n-gram rebalancing; no AdaLRS",
          mix=(("caption", 0.2), ("caption_qa", 0.15), ("ocr", 0.15), ("count", 0.15), ("chart", 0.15),
               ("math_direct", 0.1), ("text", 0.1)),
          tiny=(("lr", 1e-3), ("steps", 500), ("ngram_rebalance", True), ("eval_every", 100)),
          paper=(("seq", 8192), ("samples", 180_000_000), ("tokens", 360e9))),
    Stage("sft1", "§4.2.1", "SFT phase 1: general instructions (Infinity-MM stage 2)",
          mix=(("caption_qa", 0.3), ("count", 0.2), ("ocr", 0.2), ("chart", 0.2), ("multi", 0.1)),
          tiny=(("lr", 5e-4), ("steps", 250)), paper=(("seq", 8192), ("tokens", 42e9))),
    Stage("sft2", "§4.2.1", "SFT phase 2: SAIL-Instruction2 (20M)",
          mix=(("caption", 0.1), ("caption_qa", 0.15), ("ocr", 0.15), ("chart", 0.15), ("count", 0.15),
               ("multi", 0.15), ("math_direct", 0.15)),
          tiny=(("lr", 5e-4), ("steps", 250)), paper=(("seq", 8192), ("samples", 20_000_000), ("tokens", 40e9))),
    Stage("sft3", "§4.2.1", "SFT phase 3: hard subsets (LLaVA-CoT, MMPR, Condor)",
          mix=(("chart", 0.25), ("count_cot", 0.25), ("multi", 0.2), ("math", 0.3)),
          tiny=(("lr", 3e-4), ("steps", 200)), paper=(("seq", 8192), ("tokens", 16e9))),
    Stage("sft4", "§4.2.1", "SFT phase 4: image:video 1:1", mix=SFT_MIX_4, tiny=SFT4_TINY,
          paper=(("seq", 16384), ("tokens", 70e9))),
    Stage("sft4-twin", "§4.2.1", "a homogeneous twin of sft4 for the soup: same recipe from sft3, another seed",
          init="sft3", mix=SFT_MIX_4, tiny=SFT4_TINY + (("seed", 7331),), paper=(("seq", 16384), ("tokens", 70e9))),
    Stage("soup", "§4.2.1", "model soup: average homogeneous checkpoints (same recipe, different seeds / data "
          "order): +1.7 avg (Table 5); heterogeneous merges collapse (12.86 avg)",
          trainable=(), inputs=("sft4", "sft4-twin"), mix=SFT_MIX_4, tiny=SFT4_TINY, runner="soup"),
    Stage("longcot", "§4.2.2", "LongCoT SFT: <think>...</think> + \\boxed{}; loss on thinking + answer; 1 epoch",
          mix=(("math", 0.6), ("count_cot", 0.4)), label_mode="longcot",
          tiny=(("lr", 3e-4), ("steps", 250), ("packing.max_tokens", 2048)),
          paper=(("lr", 1e-6), ("batch", 1024), ("seq", 20480), ("samples", 400_000), ("epochs", 1))),
    Stage("rl-verifiable", "§4.2.3", "RL with verifiable rewards (answer + format): DAPO for dense models, GSPO "
          "for MoE; 2048 rollouts / episode, 8 updates of mini-batch 512; clip in [0.20, 0.28]",
          mix=(("math", 0.5), ("count", 0.5)), label_mode="rl", runner="rl.py",
          paper=(("lr", 1e-6), ("seq", 16384), ("samples", 70_000), ("rollouts", 2048), ("mini_batch", 512))),
    Stage("harvest", "§4.2.4", "CoT harvest: rejection-sample correct, well-formed chains from the RL model",
          trainable=(), mix=(("math", 0.5), ("count_cot", 0.5)), label_mode="rl", runner="rl.py",
          tiny=(("harvest_samples", 4),)),
    Stage("thinkfusion", "§4.2.4", "Think-Fusion SFT: 900K direct + 100K harvested CoT (9:1); dual-target loss",
          init="rl-verifiable", label_mode="thinkfusion",
          mix=(("caption_qa", 1.5), ("ocr", 1.5), ("chart", 1.5), ("count", 1.5), ("math_direct", 2.0),
               ("multi", 1.0), ("out:harvest/cot.jsonl", 1.0)),
          tiny=(("lr", 2e-4), ("steps", 200), ("packing.max_tokens", 2048)),
          paper=(("lr", 1e-6), ("batch", 1024), ("seq", 20480), ("samples", 1_000_000), ("epochs", 1))),
    Stage("rl-mixed", "§4.2.5", "RL with mixed rewards (answer + think + format, weighted): hard cases + general",
          mix=(("math", 0.25), ("count", 0.15), ("chart", 0.15), ("ocr", 0.1), ("caption_qa", 0.15), ("multi", 0.1),
               ("video", 0.1)), label_mode="rl", runner="rl.py",
          tiny=(("reward", "mixed"), ("general_share", 0.3), ("episodes", 20)),
          paper=(("lr", 1e-6), ("seq", 16384), ("samples", 100_000))),
)
STAGES = {s.name: s for s in RECIPE}


def stage_row(name: str) -> Stage:
    if name not in STAGES:
        near = difflib.get_close_matches(name, list(STAGES), n=1)
        raise UsageError(f"unknown stage {name!r}" + (f" (did you mean {near[0]}?)" if near else "")
                         + f"; stages: {', '.join(STAGES)}")
    return STAGES[name]


def previous_name(row: Stage) -> Optional[str]:
    i = RECIPE.index(row)
    return RECIPE[i - 1].name if i else None


def next_name(row: Stage) -> Optional[str]:
    i = RECIPE.index(row)
    return RECIPE[i + 1].name if i + 1 < len(RECIPE) else None


def init_rule(row: Stage) -> dict:
    """{module: stage name | "fresh"} of a stage's init rule."""
    if row.init == "random":
        return {m: "fresh" for m in MODULES}
    if isinstance(row.init, tuple):
        return dict(row.init)
    src = previous_name(row) if row.init == "previous" else row.init
    return {m: src for m in MODULES}


def stage_config(name: str, scale: str = "tiny", log=None) -> StageConfig:
    """The stage's config: StageConfig defaults, then the row's tiny defaults, then (scale='paper')
    the paper's values as far as the paper gives them."""
    row = stage_row(name)
    cfg = StageConfig(stage=name, trainable=",".join(row.trainable), label_mode=row.label_mode)
    roots = {"": cfg}
    for key, value in row.tiny if row.runner != "rl.py" else ():    # RL rows: rl.rl_config applies them
        set_key(roots, key, str(value))
    if scale == "paper":
        apply_paper_scale(cfg, row, log or print)
    elif scale != "tiny":
        raise UsageError(f"--scale must be tiny or paper, got {scale!r}")
    cfg.scale = scale
    return cfg


def apply_paper_scale(cfg: StageConfig, row: Stage, log) -> None:
    """The paper's values for a real run: LR, sequence length (pack length) and steps (samples /
    batch, or tokens / (batch x seq)); values the paper does not state are kept and named."""
    p, changed = row.paper_values, []

    def change(key, value):
        changed.append(f"{key} {getattr_path(cfg, key)} -> {value}")
        set_key({"": cfg}, key, str(value))
    if "lr" in p:
        change("lr", p["lr"])
    if "seq" in p:
        change("packing.max_tokens", p["seq"])
    batch = p.get("batch")
    if batch and "samples" in p:
        change("steps", max(1, int(p["samples"] * p.get("epochs", 1) // batch)))
    elif batch and "tokens" in p and "seq" in p:
        change("steps", max(1, int(p["tokens"] // (batch * p["seq"]))))
    if cfg.preset.startswith("tiny"):
        changed.append(f"preset {cfg.preset} -> 2b")
        cfg.preset = "2b"
    missing = [k for k in ("lr", "batch", "seq") if k not in p]
    log(f"--scale=paper ({row.name}, {row.section or 'not a paper stage'}): " + ("; ".join(changed) or "nothing")
        + (f"; the paper does not state {', '.join(missing)}: kept {cfg.lr:g} / packs of {cfg.packing.max_tokens}"
           if missing else "") + "; the global batch is micro_batches x ranks x packs of max_tokens")


def getattr_path(obj, dotted: str):
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def modules_of(spec: str) -> list:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in MODULES]
    if bad:
        raise UsageError(f"unknown module(s) {bad}: use {', '.join(MODULES)}")
    return names


def stage_dir(cfg: StageConfig, name: Optional[str] = None) -> str:
    """Where a stage's output lives: out/<stage>/."""
    return os.path.join(cfg.out_dir, name or cfg.stage)


def run_dir(cfg: StageConfig) -> str:
    """Where a running stage keeps its step checkpoints and live metrics: out/<stage>.run/."""
    return stage_dir(cfg) + ".run"


def stage_sources(cfg: StageConfig, split: str) -> list:
    """[(manifest, weight)]: --manifests / --eval_manifests, else the stage's synthetic mix."""
    spec = cfg.manifests if split == "train" else cfg.eval_manifests
    if spec:
        out = []
        for item in spec.split(","):
            path, _, w = item.rpartition(":") if re.search(r":[0-9.]+$", item) else (item, "", "")
            out.append((path, float(w) if w else 1.0))
        return out
    sources = []
    for name, weight in stage_row(cfg.stage).mix:
        if name.startswith("out:"):                     # a manifest an earlier step of the recipe writes
            if split != "train":
                continue
            path = os.path.join(cfg.out_dir, name[4:])
            if not os.path.exists(path):
                producer = stage_row(name[4:].split("/")[0])
                raise UsageError(f"{cfg.stage} reads {path}, which the {producer.name} stage writes: run "
                                 f"`{command_for(producer, cfg)}` first, or pass --manifests=...")
            sources.append((path, weight))
        else:
            sources.append((os.path.join(cfg.data_dir, name, f"{split}.jsonl"), weight))
    return sources


def command_for(row: Stage, cfg: StageConfig) -> str:
    """The command that runs `row` with the user's output folder and seed (for hints)."""
    tool = "train_stage.py" if row.runner == "soup" else row.runner
    extra = [f"--out_dir={cfg.out_dir}"] if cfg.out_dir != StageConfig.out_dir else []
    extra += [f"--data_dir={cfg.data_dir}"] if cfg.data_dir != StageConfig.data_dir else []
    extra += [f"--preset={cfg.preset}"] if cfg.preset != StageConfig.preset else []
    return " ".join([f"torchrun {tool} --stage {row.name}", *extra])


# ==============================================================================================
# distributed set-up and FSDP2 (§5.2)

def setup_distributed(group: bool = False):
    """(rank, world_size, device) from torchrun's env; NCCL on CUDA, gloo on CPU. A process group
    exists when world > 1 or `group` (FSDP2 on one process): it is what "sharded" means below."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if (world > 1 or group) and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def shutdown_distributed():
    """Every rank waits for the others, then tears the process group down. Without the barrier a
    rank that finished first closes its gloo connections while the other still uses them, and
    gloo's background thread aborts that process (SIGABRT, seen in ~1 of 3 two-process runs)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallelize(model: M.SAILVL, device, mixed_precision: bool):
    """FSDP2: each LLM decoder block is a unit, the ViT is one unit (small next to the LLM, as
    torchtitan does), the root holds the rest (embeddings, tied lm_head, adapter)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.vision_model, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def print0(rank, *a, **k):
    if rank == 0:
        print(*a, **k, flush=True)


def all_reduce_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ==============================================================================================
# model initialisation for a stage: its init rule, then --init-from / --init-vit / --init-llm

def init_sources(cfg: StageConfig) -> dict:
    """{module: a checkpoint folder | "fresh"}: --init-from overrides the stage's init rule."""
    if cfg.init_from == "random":
        return {m: "fresh" for m in MODULES}
    if cfg.init_from:
        return {m: cfg.init_from for m in MODULES}
    return {m: src if src == "fresh" else stage_dir(cfg, src) for m, src in init_rule(stage_row(cfg.stage)).items()}


def missing_sources(cfg: StageConfig) -> list:
    """Stages whose output this stage starts from but which are not there (their names)."""
    if cfg.init_from:
        return []
    rule = init_rule(stage_row(cfg.stage))
    return sorted({s for m, s in rule.items() if s != "fresh" and not (m == "language_model" and cfg.init_llm)
                   and not (m == "vision_model" and cfg.init_vit) and not is_finished_stage(stage_dir(cfg, s))})


def tokenizer_dir(cfg: StageConfig) -> Optional[str]:
    """The folder whose tokenizer the stage uses: --tokenizer, else the checkpoint the stage starts
    from (a model keeps the tokenizer it was trained with), else the synthetic data's own BPE
    (data.make_synth), else None: the embedded byte-level default."""
    def has(folder):
        return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json"))
    if cfg.tokenizer:
        return cfg.tokenizer
    for src in init_sources(cfg).values():
        if src != "fresh" and has(src):
            return src
    if not cfg.manifests and has(cfg.data_dir):
        return cfg.data_dir
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json")


def tokenizer_files(folder: Optional[str]) -> dict:
    """{name: path} of the tokenizer files in `folder`, to copy into every checkpoint."""
    return {n: os.path.join(folder, n) for n in TOKENIZER_FILES if folder and os.path.exists(os.path.join(folder, n))}


def reinit_module(module, seed: int):
    """A module freshly initialised as its constructor does (nn defaults), seeded."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


def match_tokenizer(cfg: StageConfig, model_cfg: M.SAILVLConfig, tok, log) -> M.SAILVLConfig:
    """A model built from scratch takes its <IMG_CONTEXT> id from the tokenizer it will read (e.g.
    a 2b-shaped model with random weights on the synthetic data's BPE). A loaded model keeps its
    own config (SAILVL.embed refuses a mismatch with the token counts)."""
    ids = data.special_ids(tok)
    if ids.img_context == model_cfg.img_context_token_id or any(s != "fresh" for s in init_sources(cfg).values()):
        return model_cfg
    if tok.n_vocab > model_cfg.llm_config.vocab_size:
        raise UsageError(f"the tokenizer has {tok.n_vocab} tokens, the model's vocabulary only "
                         f"{model_cfg.llm_config.vocab_size}: pass a matching --tokenizer")
    log(f"init: <IMG_CONTEXT> is token {ids.img_context} in this tokenizer (the preset says "
        f"{model_cfg.img_context_token_id}): the fresh model uses the tokenizer's")
    return dataclasses.replace(model_cfg, img_context_token_id=ids.img_context)


def build_stage_model(cfg: StageConfig, model_cfg: M.SAILVLConfig, log) -> M.SAILVL:
    """Random init, then every module from its source (a whole checkpoint when all modules share
    one, which also brings its config), then --init-vit / --init-llm."""
    torch.manual_seed(cfg.seed)
    model = M.SAILVL(model_cfg)
    model.init_weights()
    sources = init_sources(cfg)
    folders = sorted({s for s in sources.values() if s != "fresh"})
    loaded = {f: M.SAILVL.from_pretrained(f) for f in folders}
    if folders and asdict(loaded[folders[0]].cfg) != asdict(model_cfg):
        diff = sorted(k for k, v in asdict(loaded[folders[0]].cfg).items() if asdict(model_cfg)[k] != v)
        log(f"init: using the config of {folders[0]} (differs from the preset in {diff})")
        model = M.SAILVL(loaded[folders[0]].cfg)
        model.init_weights()
    if not folders:
        log("init: random weights (the stage starts from scratch)")
    elif len(folders) == 1 and all(s == folders[0] for s in sources.values()):
        model.load_state_dict(loaded[folders[0]].state_dict())
        log(f"init: all weights from {folders[0]}")
    else:
        for name, src in sources.items():
            if src == "fresh":
                reinit_module(getattr(model, name), cfg.seed + 1)
                log(f"init: {name} freshly initialised (random), as the stage starts it")
            else:
                getattr(model, name).load_state_dict(getattr(loaded[src], name).state_dict())
                log(f"init: {name} from {src}")
    if cfg.init_vit:
        model.vision_model.load_state_dict(M.vit.load_hf_vit(cfg.init_vit).state_dict())
        log(f"init: vision encoder from {cfg.init_vit}")
    if cfg.init_llm:
        model.language_model.load_state_dict(M.load_hf_llm(cfg.init_llm).state_dict())
        log(f"init: language model from {cfg.init_llm}")
    return model


def freeze(model: M.SAILVL, trainable: list):
    """Only the stage's modules train; frozen ones get no gradient and no optimizer state."""
    for name in MODULES:
        getattr(model, name).requires_grad_(name in trainable)


# ==============================================================================================
# data -> packing, once per step (§3.2.2, §5.1)

class StageBatches:
    """This rank's packed micro-batches, one optimizer step at a time.

    Every rank reads the same global stream (data.Mixture.next), pushes each sample's metadata
    into the same packer, pops world x micro_batches packs, splits them with balance_packs and
    collates only its own, so the split is exact with no communication. Samples measured for
    packing are kept until collated (a bounded cache; an evicted one is decoded again: loading is
    deterministic per stream position)."""

    def __init__(self, mixture: data.Mixture, pcfg: packing.PackingConfig, rank: int, world: int,
                 img_context_id: int, hidden_size: int, cache_size: int = 256):
        self.mixture, self.pcfg, self.rank, self.world = mixture, pcfg, rank, world
        self.packer = packing.StreamPacker(pcfg)
        self.img_context_id, self.hidden_size, self.cache_size = img_context_id, hidden_size, cache_size
        self.cache = {}
        self.steps = 0

    def next(self) -> list:
        plans = []
        while len(plans) < self.world * self.pcfg.micro_batches:
            while not self.packer.full:
                k, sample = self.mixture.next()
                if self.packer.push(packing.sample_meta(sample, k, self.img_context_id)):
                    self.cache[k] = sample
                    if len(self.cache) > self.cache_size:
                        self.cache.pop(next(iter(self.cache)))
            plans.append(self.packer.pop())
        groups = (packing.balance_packs(plans, self.world, self.hidden_size, self.pcfg.visual_packing)
                  if self.world > 1 else [list(range(len(plans)))])
        self.steps += 1
        return [packing.collate_pack([self.cache.pop(m.index, None) or self.mixture.load(m.index) for m in plans[j]],
                                     plans[j]) for j in groups[self.rank]]

    def state_dict(self) -> dict:
        return {"data": self.mixture.state_dict(), "packer": self.packer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict):
        self.mixture.load_state_dict(state["data"])
        self.packer.load_state_dict(state["packer"])
        self.steps, self.cache = state["steps"], {}


EVAL_SEED = 1338     # the held-out stream's order, fixed: every model (a stage, its seed twin, the soup) is
                     # scored on the same held-out samples in the same packs, whatever its training seed


def build_batches(cfg: StageConfig, model_cfg: M.SAILVLConfig, tok, split: str, rank: int, world: int,
                  verbose: bool = True) -> StageBatches:
    """The stage's mixture (train or held-out split) read through the packer."""
    dcfg = data.DataConfig.from_model(model_cfg, max_len=cfg.packing.max_tokens, label_mode=cfg.label_mode,
                                      max_bad_fraction=cfg.max_bad_fraction, drop_media=cfg.text_only)
    train = split == "train"
    mixture = data.Mixture(stage_sources(cfg, split), tok, dcfg, seed=cfg.seed if train else EVAL_SEED,
                           training=train, ngram_rebalance=cfg.ngram_rebalance and train, verbose=verbose and rank == 0)
    return StageBatches(mixture, cfg.packing, rank, world, model_cfg.img_context_token_id,
                        model_cfg.llm_config.hidden_size)


def to_device(pack: dict, device) -> dict:
    out = dict(pack)
    for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
        out[k] = pack[k].to(device)
    pv = pack.get("pixel_values")
    if isinstance(pv, torch.Tensor):
        out["pixel_values"] = pv.to(device)
    elif isinstance(pv, list):
        out["pixel_values"] = [p.to(device) for p in pv]
    return out


def forward_pack(model, pack) -> M.Output:
    return model(pack["input_ids"], pack.get("pixel_values"), labels=pack["labels"],
                 position_ids=pack["position_ids"], cu_seqlens=pack["cu_seqlens"])


# ==============================================================================================
# schedule

def lr_multiplier(step: int, cfg: StageConfig) -> float:
    """Linear warm-up, then cosine down to min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ==============================================================================================
# the one loss, and one optimizer step

def global_targets(packs: list, device) -> int:
    """Target tokens of the whole step (every micro-batch of every rank): labels[:, 1:] != -100,
    because logits[i] are scored against labels[i+1]."""
    n = sum(int((p["labels"][:, 1:] != -100).sum()) for p in packs)
    return int(all_reduce_sum([n], device)[0])


def step_loss(out: M.Output, n_global: int, n_micro: int, world: int, aux_coef: float):
    """The loss one micro-batch backprops; the only place a loss is made.

    The step's loss is the global token mean of the CE (every target of every micro-batch and
    rank counts once, however the samples were packed, accumulated or sharded; a per-micro-batch
    mean would weight tokens by 1/targets-in-their-pack, the bug of verl #3332, TRL #5619) plus
    aux_coef x the mean over micro-batches of the MoE load-balancing loss of the global batch.
    A micro-batch contributes its share: ce_sum / N and aux_share / n_micro (moe.py returns each
    rank's share of the global aux). The one world-size convention: FSDP / DDP AVERAGE gradients
    over ranks, so every share is multiplied by `world` once, here."""
    loss = out.ce_sum * (world / max(n_global, 1))
    if out.aux_loss is not None:
        loss = loss + out.aux_loss * (aux_coef * world / n_micro)
    return loss


def train_step(model, opt, packs, params, grad_clip: float, world: int, device, autocast) -> dict:
    """Forward/backward over this rank's micro-batches with the one loss, then clip and step.
    A non-finite loss or gradient norm skips the update (gradients dropped, `skipped` set)."""
    n_global = global_targets(packs, device)
    llm = (model.module if hasattr(model, "module") else model).cfg.llm_config
    ce_sum, useful, aux, loads = 0.0, 0, 0.0, []
    for pack in packs:
        with autocast():
            out = forward_pack(model, pack)
        step_loss(out, n_global, len(packs), world, llm.router_aux_loss_coef).backward()
        ce_sum += float(out.ce_sum.detach())
        useful += int(pack["input_ids"].numel())
        if out.router_logits is not None:                                # MoE: load summary for the log
            aux += float(out.aux_loss.detach()) / len(packs)
            loads.append(moe.expert_load(out.router_logits, llm.num_experts_per_tok).summary())
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    ce_tot, useful_tot = all_reduce_sum([ce_sum, useful], device)
    loss = ce_tot / max(n_global, 1)
    skipped = not (math.isfinite(loss) and math.isfinite(gnorm))
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    res = {"loss": loss, "grad_norm": gnorm, "tokens": useful_tot, "skipped": skipped}
    if loads:
        res.update(moe_entropy=sum(x["mean_entropy"] for x in loads) / len(loads),
                   moe_max_load=sum(x["max_over_mean"] for x in loads) / len(loads), moe_aux=aux)
    return res


@torch.no_grad()
def evaluate(model, batches_factory, n_packs: int, device, autocast) -> float:
    """Global token-mean loss over the first `n_packs` steps of the held-out stream (the same
    samples and packs for every model given the same factory)."""
    was_training = model.training
    model.eval()
    batches = batches_factory()
    ce, n = 0.0, 0.0
    for _ in range(n_packs):
        for pack in batches.next():
            pack = to_device(pack, device)
            with autocast():
                out = forward_pack(model, pack)
            ce += float(out.ce_sum)
            n += float(out.n_targets)
    ce, n = all_reduce_sum([ce, n], device)
    model.train(was_training)
    return ce / max(n, 1)


# ==============================================================================================
# checkpoints: one writer, one reader; atomic folders, checksums, exact resume
#
# A checkpoint folder (a step checkpoint out/<stage>.run/step-NNNNNN/, a stage output out/<stage>/,
# the soup): config.json + model.safetensors (model.write_weights), meta.json (stage, step,
# config, data/packing position, AdaLRS state, sha256 of every file), and for a resumable step
# checkpoint rank{r}.pt per rank (this rank's optimizer shard, RNG states, AdaLRS rollback copy;
# plain tensors and numbers, loaded with torch.load(weights_only=True)).

class CheckpointError(RuntimeError):
    pass


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def full_state_dict(model) -> dict:
    """Consolidated fp32 weights on CPU (rank 0 only under FSDP; {} on other ranks)."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def set_full_state_dict(model, sd: dict):
    """Full weights into the model; under FSDP only rank 0 holds them and they are broadcast."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        M.load_state_dict_strict(model, sd, "checkpoint")


def rng_state() -> dict:
    """Every RNG this process draws from, as tensors and numbers (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
          "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    version, mt, gauss = st["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def local_optimizer_state(opt) -> dict:
    """The optimizer state with every DTensor replaced by this rank's local shard."""
    sd = opt.state_dict()
    state = {idx: {k: (v.to_local() if hasattr(v, "to_local") else v).detach().cpu().clone()
                   if torch.is_tensor(v) else v for k, v in s.items()} for idx, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_local_optimizer_state(opt, saved: dict):
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for idx, s in saved["state"].items():
        p = params[int(idx)]
        ent = {}
        for k, v in s.items():
            if torch.is_tensor(v) and hasattr(p, "device_mesh") and v.dim() > 0:
                from torch.distributed.tensor import DTensor
                v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
            elif torch.is_tensor(v) and v.dim() > 0:
                v = v.to(p.device)
            ent[k] = v
        state[int(idx)] = ent
    opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def save_checkpoint(path: str, model, meta: dict, rank: int, world: int, rank_state: dict = None,
                    extra_files: dict = None, model_cfg: M.SAILVLConfig = None):
    """The one checkpoint writer (step checkpoints, stage outputs, the soup): every rank writes
    its `rank_state` (None: not resumable) into a staging folder beside `path`, rank 0 writes the
    weights, `extra_files` ({name: source path}, e.g. metrics.jsonl) and meta.json with the
    sha256 of every file, then renames the folder to `path`. A crash at any point leaves the
    previous `path` (or none), never half of one. A full disk or an unwritable folder is one
    clear CheckpointError and the previous checkpoint stays. `model` None: a data output (the CoT
    harvest), the same folder without weights."""
    sd = full_state_dict(model) if model is not None else None   # a collective under FSDP
    model_cfg = model_cfg or (model.cfg if model is not None else None)
    staging = os.path.abspath(path) + ".staging"
    try:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        barrier()
        if rank_state is not None:
            torch.save(rank_state, os.path.join(staging, f"rank{rank}.pt"))
        barrier()
        if rank == 0:
            if sd is not None:
                M.write_weights(staging, sd, model_cfg)
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, os.path.join(staging, name))
            files = {name: file_sha256(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
            meta = dict(meta, world_size=world, resumable=rank_state is not None, files=files,
                        kind="model" if sd is not None else "data")
            with open(os.path.join(staging, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            M.replace_dir(staging, path)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e} (the previous checkpoint, "
                              f"if any, is kept)") from None
    barrier()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def verify_checkpoint(path: str, resumable: bool = False) -> dict:
    """meta.json of a complete, uncorrupted checkpoint, else CheckpointError saying why."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is unreadable ({e})") from None
    for name, want in meta.get("files", {}).items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if file_sha256(p) != want:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match the sha256 recorded in "
                                  f"meta.json (truncated or modified after saving)")
    if "model.safetensors" not in meta.get("files", {}) and meta.get("kind") != "data":
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json lists no model.safetensors")
    if resumable and not meta.get("resumable"):
        raise CheckpointError(f"{path} is a stage output, not a resumable step checkpoint (no optimizer state)")
    return meta


def is_finished_stage(path: str) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def load_checkpoint(path: str, model, opt, rank: int, world: int) -> tuple:
    """The one reader of a resumable checkpoint: weights into the (possibly sharded) model, this
    rank's optimizer shard; returns (meta, rank_state)."""
    meta = verify_checkpoint(path, resumable=True)
    if meta["world_size"] != world:
        raise CheckpointError(f"{path} was saved by {meta['world_size']} processes, this run has {world}")
    sd = M.SAILVL.from_pretrained(path).state_dict() if rank == 0 else {}   # ties restored by the loader
    set_full_state_dict(model, sd)
    rank_state = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
    load_local_optimizer_state(opt, rank_state["optimizer"])
    return meta, rank_state


def step_checkpoints(folder: str) -> list:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, d) for d in os.listdir(folder) if re.fullmatch(r"step-\d+", d))


def find_resume_checkpoint(folder: str, log) -> Optional[str]:
    """The newest step checkpoint of the run that verifies; corrupt ones are reported and skipped."""
    for path in reversed(step_checkpoints(folder)):
        try:
            verify_checkpoint(path, resumable=True)
            return path
        except CheckpointError as e:
            log(f"resume: refusing {path}: {e}")
    return None


def prune_checkpoints(folder: str, keep: int):
    for path in step_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


# ==============================================================================================
# the training loop

def place_model(cfg: StageConfig, model_cfg: M.SAILVLConfig, rank: int, world: int, device, log) -> tuple:
    """(model, its config) on the device, frozen but for the stage's modules; sharded with FSDP2
    when world > 1 or --fsdp (torchtitan's recipe: build on the meta device, shard, allocate only this rank's
    shards, then load the full weights that rank 0 alone builds from the stage's sources)."""
    trainable = modules_of(cfg.trainable)
    if not dist.is_initialized():
        model = build_stage_model(cfg, model_cfg, log)
        freeze(model, trainable)
        model.to(device)
    else:
        full = build_stage_model(cfg, model_cfg, log) if rank == 0 else None
        box = [full.cfg if full is not None else None]
        dist.broadcast_object_list(box, src=0)
        with torch.device("meta"):
            model = M.SAILVL(box[0])
        freeze(model, trainable)
        parallelize(model, device, mixed_precision=device.type == "cuda")
        model.to_empty(device=device)
        set_full_state_dict(model, full.state_dict() if full is not None else {})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {M.count_params(model) / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable ({', '.join(trainable)})")
    return model, model.cfg


def open_metrics(path: str, keep_up_to: int):
    """metrics.jsonl for appending, keeping the records of the steps a resumed run keeps."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kept = []
    if keep_up_to and os.path.exists(path):
        with open(path) as f:
            kept = [ln for ln in f if json.loads(ln).get("step", 0) <= keep_up_to]
    with open(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def train(cfg: StageConfig, model_cfg: M.SAILVLConfig, resume: Optional[str] = None) -> str:
    """Run one stage; returns its output folder out/<stage>/."""
    rank, world, device = setup_distributed(cfg.fsdp)
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if not cfg.manifests:
        if rank == 0:
            data.ensure_synth(cfg.data_dir)
        barrier()
    tok_dir = tokenizer_dir(cfg)
    tok, tok_files = data.load_tokenizer(tok_dir), tokenizer_files(tok_dir)   # the files travel with every checkpoint
    model_cfg = match_tokenizer(cfg, model_cfg, tok, log)

    model, model_cfg = place_model(cfg, model_cfg, rank, world, device, log)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not dist.is_initialized() else \
        (lambda: torch.autocast("cpu", enabled=False))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=not cuda or None)
    search = AdaLRS(model, opt, total_steps=cfg.steps, cfg=cfg.adalrs_cfg, log=log, base_lr=cfg.lr) \
        if cfg.adalrs else None
    batches = build_batches(cfg, model_cfg, tok, "train", rank, world)
    eval_batches = lambda: build_batches(cfg, model_cfg, tok, "eval", rank, world, verbose=False)  # noqa: E731

    # -- resume: weights, optimizer shard, data position, AdaLRS, RNG ------------------------
    step = 0
    if resume:
        meta, rank_state = load_checkpoint(resume, model, opt, rank, world)
        batches.load_state_dict(meta["loader"])
        if search is not None:
            search.load_state_dict(meta["adalrs"], snapshot=rank_state.get("adalrs_snapshot"))
        set_rng_state(rank_state["rng"])
        step = meta["step"]
        log(f"resume: continuing from {resume} at step {step}")
    start = step
    first_loss = meta.get("first_loss") if resume else None      # the stage's, not this segment's

    log("config: " + json.dumps(asdict(cfg)))
    log("model config: " + json.dumps(model_cfg.to_dict()))
    rdir = run_dir(cfg)
    metrics_path = os.path.join(rdir, "metrics.jsonl")
    metrics = open_metrics(metrics_path, step if resume else 0) if rank == 0 else None
    model.train()
    t_last = time.time()
    last_loss = eval_loss = None
    bad_in_a_row = 0
    while True:
        last_step = step == cfg.steps
        # -- eval at step 0, every eval_every steps and at the end (not again right after a resume)
        if cfg.eval_every and (step % cfg.eval_every == 0 or last_step) and (step > start or not resume):
            eval_loss = evaluate(model, eval_batches, cfg.eval_packs, device, autocast)
            log(f"eval {step:05d} | held-out loss {eval_loss:.4f}")
            if metrics:
                metrics.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                metrics.flush()
        # -- the stage output at the end; a resumable step checkpoint every save_every steps --
        if last_step:
            if metrics:
                metrics.close()
            bad = batches.mixture.bad
            log(f"data: {bad.report()}")
            meta = {"stage": cfg.stage, "step": step, "config": asdict(cfg), "first_loss": first_loss,
                    "final_loss": last_loss, "eval_loss": eval_loss, "adalrs": search.state_dict() if search else None,
                    "bad_data": {"seen": bad.seen, "counts": dict(bad.counts)}}
            save_checkpoint(stage_dir(cfg), model, meta, rank, world, model_cfg=model_cfg,
                            extra_files={"metrics.jsonl": metrics_path, **tok_files})
            return stage_dir(cfg)
        if cfg.save_every and step % cfg.save_every == 0 and step > start:
            meta = {"stage": cfg.stage, "step": step, "config": asdict(cfg), "loader": batches.state_dict(),
                    "adalrs": search.state_dict() if search else None, "first_loss": first_loss}
            rank_state = {"optimizer": local_optimizer_state(opt), "rng": rng_state(),
                          "adalrs_snapshot": search.snapshot_state_dict() if search else None}
            save_checkpoint(os.path.join(rdir, f"step-{step:06d}"), model, meta, rank, world, rank_state,
                            extra_files=tok_files, model_cfg=model_cfg)
            if rank == 0:
                prune_checkpoints(rdir, cfg.keep_checkpoints)
        # -- one optimizer step over this rank's micro-batches (global token mean, §5.1) --------
        lr = cfg.lr * lr_multiplier(step, cfg) * (search.lr_scale if search else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        packs = [to_device(p, device) for p in batches.next()]
        res = train_step(model, opt, packs, params, cfg.grad_clip, world, device, autocast)
        step += 1
        if res["skipped"]:
            bad_in_a_row += 1
            log(f"step {step:05d}/{cfg.steps:05d} | non-finite loss {res['loss']} or grad norm {res['grad_norm']}: "
                f"update skipped ({bad_in_a_row} in a row, the run stops at {cfg.max_bad_steps})")
            if bad_in_a_row >= cfg.max_bad_steps:
                raise FloatingPointError(f"{cfg.stage}: {bad_in_a_row} non-finite losses in a row at step {step}; "
                                         f"lower --lr or check the data (the last checkpoint is in {rdir})")
            continue
        bad_in_a_row = 0
        if search is not None:
            search.observe(res["loss"])
        first_loss = res["loss"] if first_loss is None else first_loss
        last_loss = res["loss"]
        # -- one log line per step ----------------------------------------------------------------
        dt, t_last = time.time() - t_last, time.time()
        capacity = cfg.packing.max_tokens * len(packs) * world
        rec = {"step": step, "loss": res["loss"], "lr": lr, "grad_norm": res["grad_norm"],
               "tok_per_s": res["tokens"] / max(dt, 1e-9), "pad_frac": 1 - res["tokens"] / capacity}
        line = (f"step {step:05d}/{cfg.steps:05d} | loss {res['loss']:.4f} | lr {lr:.2e} | gnorm "
                f"{res['grad_norm']:.3f} | tok/s {rec['tok_per_s']:,.0f} | pad {100 * rec['pad_frac']:.1f}%")
        if "moe_entropy" in res:
            rec.update({k: res[k] for k in ("moe_entropy", "moe_max_load", "moe_aux")})
            line += f" | moe_ent {res['moe_entropy']:.3f} max/mean {res['moe_max_load']:.2f}"
        log(line)
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()


# ==============================================================================================
# model soup (§4.2.1): average homogeneous checkpoints

def soup(cfg: StageConfig, ckpts: list) -> str:
    """Average the weights of checkpoints with the same architecture (refuses mismatched configs),
    evaluate every input and the soup on the same held-out samples and packs, write out/soup/."""
    if len(ckpts) < 2:
        raise UsageError("soup: give at least two checkpoints: --ckpts A B [C ...]")
    rank, world, device = setup_distributed()
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    for c in ckpts:
        if not is_finished_stage(c) and not os.path.exists(os.path.join(c, "config.json")):
            raise UsageError(f"soup: {c} is not a checkpoint folder")
    models = [M.SAILVL.from_pretrained(c) for c in ckpts]
    ref = models[0].cfg.to_dict()
    for c, m in zip(ckpts[1:], models[1:]):
        if m.cfg.to_dict() != ref:
            diff = sorted(k for k in set(ref) | set(m.cfg.to_dict()) if ref.get(k) != m.cfg.to_dict().get(k))
            raise UsageError(f"soup: {c} has a different architecture from {ckpts[0]} (config differs in {diff}); "
                             f"the paper's soup averages homogeneous checkpoints only (§4.2.1)")
    sds = [m.state_dict() for m in models]
    avg = {k: (sum(sd[k].double() for sd in sds) / len(sds)).to(sds[0][k].dtype) if sds[0][k].is_floating_point()
           else sds[0][k] for k in sds[0]}
    souped = M.SAILVL(models[0].cfg)
    souped.load_state_dict(avg)
    tok_dir = cfg.tokenizer or next((c for c in ckpts if tokenizer_files(c)), None)
    tok = data.load_tokenizer(tok_dir)
    if not cfg.eval_manifests:
        data.ensure_synth(cfg.data_dir)
    factory = lambda: build_batches(cfg, souped.cfg, tok, "eval", rank, world, verbose=False)  # noqa: E731
    nocast = lambda: torch.autocast("cpu", enabled=False)                 # noqa: E731
    results = {}
    for name, m in list(zip(ckpts, models)) + [("soup", souped)]:
        results[name] = evaluate(m.to(device), factory, cfg.eval_packs, device, nocast)
        log(f"soup eval | {name}: held-out loss {results[name]:.4f}")
    meta = {"stage": cfg.stage, "inputs": ckpts, "eval_loss": results, "config": asdict(cfg)}
    save_checkpoint(stage_dir(cfg), souped, meta, rank, world, extra_files=tokenizer_files(tok_dir))
    return stage_dir(cfg)


# ==============================================================================================
# MoE expert-activation calibration (§2.2) on a checkpoint: the algorithm is moe.calibrate

def calibration_batches(manifest: str, model: M.SAILVL, tok, max_samples: int) -> list:
    """Samples of a manifest as model inputs with two token masks, `probe_mask` (every token) and
    `text_mask` (not <IMG_CONTEXT>), built with the data geometry the model was trained with."""
    dcfg = data.DataConfig.from_model(model.cfg)
    ds = data.JsonlDataset(manifest, tok, dcfg)
    bad = data.BadData(dcfg.max_bad_fraction, dcfg.bad_check_after)
    device = next(model.parameters()).device
    batches = []
    for i in moe.tqdm_or_list(range(min(len(ds), max_samples)), True, f"load {os.path.basename(manifest)}"):
        try:
            s = ds.load(i)
        except data.DataError as e:
            bad.bad(e)
            continue
        bad.good()
        ids = s["input_ids"].to(device)[None]                            # (1, T)
        pv = s["pixel_values"]
        pv = None if pv is None else [p.to(device) for p in pv] if isinstance(pv, list) else pv.to(device)
        batches.append(dict(input_ids=ids, pixel_values=pv, probe_mask=torch.ones_like(ids[0], dtype=torch.bool),
                            text_mask=ids[0] != model.cfg.img_context_token_id))
    bad.check()
    if not batches:
        raise UsageError(f"{manifest}: no usable sample ({bad.report()})")
    return batches


def print_routing_report(title: str, rep: dict):
    mean = lambda xs: sum(xs) / len(xs)                                  # noqa: E731
    print(f"\n{title}  ({rep['tokens']} tokens; log E = {rep['log_E']:.3f})")
    print(f"  {'layer':>5} {'entropy before':>15} {'after':>8} {'max/mean before':>16} {'after':>8} "
          f"{'top-k agree':>12} {'router KL':>10}")
    rows = [(str(i), rep["entropy_before"][i], rep["entropy_after"][i], rep["max_load_before"][i],
             rep["max_load_after"][i], rep["topk_agreement"][i], rep["router_kl"][i])
            for i in range(len(rep["entropy_before"]))]
    rows.append(("mean", *(mean(rep[k]) for k in ("entropy_before", "entropy_after", "max_load_before",
                                                   "max_load_after", "topk_agreement", "router_kl"))))
    for name, eb, ea, mb, ma, ag, kl in rows:
        print(f"  {name:>5} {eb:>15.3f} {ea:>8.3f} {mb:>16.2f} {ma:>8.2f} {ag:>12.3f} {kl:>10.4f}")
    print(f"  next-token KL {rep['next_token_kl']:.5f}")


def calibrate_cli(argv):
    ap = argparse.ArgumentParser(
        prog="train_stage.py calibrate", description="Expert-activation-entropy calibration of a MoE checkpoint "
        "(§2.2, moe.calibrate): probe the router inputs of each MoE layer on --data (multimodal) and --text "
        "(text-only), fold a low-rank correction into each gate that raises the expert-load entropy of --data "
        "while keeping text routing; prints entropy, max/mean load, top-k agreement and KL before/after on "
        "held-out samples and writes the calibrated checkpoint.")
    ap.add_argument("--ckpt", required=True, help="SAIL-VL2 checkpoint folder (ours or official) with MoE layers")
    ap.add_argument("--data", required=True, nargs="+", help="JSONL manifest(s) of probe samples (multimodal)")
    ap.add_argument("--text", nargs="+", help="JSONL manifest(s) of text-only samples whose routing is kept "
                                             "(default: the text tokens of --data)")
    ap.add_argument("--out", help="output folder (default: CKPT-calibrated)")
    ap.add_argument("--max-samples", type=int, default=64, help="samples read from each manifest")
    ap.add_argument("--holdout", type=float, default=0.25, help="share of each manifest kept out of the fit")
    for name in ("rank", "steps", "lr", "kl_weight", "temperature", "max_tokens"):
        default = getattr(moe.CalibConfig, name)
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=f"CalibConfig.{name}")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 <= args.holdout < 1:
        ap.error("--holdout must be in [0, 1)")
    torch.manual_seed(args.seed)
    sailvl = M.SAILVL.from_pretrained(args.ckpt, dtype=getattr(torch, args.dtype), device=args.device).eval()
    has_tok = any(os.path.exists(os.path.join(args.ckpt, f)) for f in ("tokenizer.json", "vocab.json"))
    tok = data.load_tokenizer(args.ckpt if has_tok else None)

    def split(manifests):                        # the last `holdout` of each manifest measures the effect
        fit, held = [], []
        for m in manifests:
            b = calibration_batches(m, sailvl, tok, args.max_samples)
            cut = max(1, round(len(b) * (1 - args.holdout))) if len(b) > 1 else len(b)
            fit, held = fit + b[:cut], held + (b[cut:] or b)
        return fit, held
    probe_fit, probe_eval = split(args.data)
    anchor_fit, anchor_eval = split(args.text) if args.text else (probe_fit, probe_eval)
    ccfg = moe.CalibConfig(**{k: getattr(args, k) for k in ("rank", "steps", "lr", "kl_weight", "temperature",
                                                            "max_tokens")})
    blocks = moe.moe_blocks(sailvl)
    before = [b.gate.weight.detach().clone() for b in blocks]
    moe.calibrate(sailvl, probe_fit, anchor_fit, ccfg)
    after = [b.gate.weight.detach().clone() for b in blocks]
    rep_mm = moe.compare_routing(sailvl, probe_eval, before, after, "probe_mask")
    rep_text = moe.compare_routing(sailvl, anchor_eval, before, after, "text_mask")
    print_routing_report(f"--data held-out ({len(probe_eval)} samples), all tokens", rep_mm)
    print_routing_report(f"{'--text' if args.text else '--data text tokens'} held-out ({len(anchor_eval)} samples)",
                         rep_text)
    out = args.out or args.ckpt.rstrip("/") + "-calibrated"
    report = os.path.join(os.path.dirname(os.path.abspath(out)), ".calibration.json")
    with open(report, "w") as f:
        json.dump({"config": vars(args), "multimodal": rep_mm, "text": rep_text}, f, indent=2)
    extra = {"calibration.json": report, **tokenizer_files(args.ckpt)}
    save_checkpoint(out, sailvl, {"stage": "calibrate", "source": args.ckpt}, 0, 1, extra_files=extra)
    os.remove(report)
    print(f"\ncalibrated checkpoint written to {out} (gate weights changed in place; HF-compatible)")
    return rep_mm, rep_text


# ==============================================================================================
# benchmarks: python train_stage.py bench {step,packing,adalrs}

def bench_step(args):
    """Tokens/s of one training step (forward + backward + AdamW) of a preset's LLM, ours vs
    HF transformers' Qwen3ForCausalLM with the same weights and inputs, measured in one run."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("train_stage.py bench step compares against HF transformers: "
                         "pip install -r tests/requirements.txt")
    import tempfile
    torch.manual_seed(0)
    ours = M.build_model(args.preset).language_model.train()
    with tempfile.TemporaryDirectory() as d:
        M.save_hf_llm(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    ids = torch.randint(0, min(256, ours.cfg.vocab_size), (args.batch, args.seq))

    def step_fn(m, is_hf):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            logits = m(ids).logits if is_hf else m(ids)
            ce, n = M.shifted_cross_entropy(logits, ids)
            (ce / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(ce.detach() / n)
        return step

    runs = {"ours": step_fn(ours, False), "hf": step_fn(hf, True)}
    first = {k: f() for k, f in runs.items()}                           # warm-up; same weights, same loss
    best = {k: min(timed(f) for _ in range(args.repeats)) for k, f in runs.items()}
    tok = args.batch * args.seq
    print(f"train step (fwd+bwd+AdamW), {args.preset} LLM ({M.count_params(ours) / 1e6:.2f}M params), batch "
          f"{args.batch}x{args.seq}, fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"  first-step loss: ours {first['ours']:.5f} | HF {first['hf']:.5f}")
    print(f"  ours {tok / best['ours']:10,.0f} tok/s | HF Qwen3 {tok / best['hf']:10,.0f} tok/s | "
          f"ratio ours / HF {best['hf'] / best['ours']:.2f}x")


def timed(fn) -> float:
    """Seconds of fn(), the GPU's queued work included."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_packing(args):
    """Real samples of every synthetic train manifest (tiny preset geometry): packing fill and
    rank balance as `packing.py bench` measures them, then useful tokens/s of one tiny SAILVL
    forward + backward over the same samples, pad-to-longest batches vs stream packs."""
    mcfg = M.preset_config("tiny")
    dcfg = data.DataConfig.from_model(mcfg)
    root = data.ensure_synth(args.synth_dir, progress=False)
    tok = data.load_tokenizer(root)                                     # the synthetic data's own BPE
    rng = random.Random(args.seed)
    samples = []
    for path in sorted(root.glob("*/train.jsonl")):
        ds = data.JsonlDataset(path, tok, dcfg)
        for i in rng.sample(range(len(ds)), min(args.per_family, len(ds))):
            samples.append({**ds[i], "family": path.parent.name, "weight": len(ds)})
    # a stream drawn from the loaded samples, each family in proportion to its manifest size
    metas = [packing.sample_meta(s, i) for i, s in enumerate(samples)]
    per_family = {f: sum(1 for s in samples if s["family"] == f) for f in {s["family"] for s in samples}}
    picks = rng.choices(range(len(metas)), weights=[s["weight"] / per_family[s["family"]] for s in samples],
                        k=args.samples)
    stream = [metas[j]._replace(index=k) for k, j in enumerate(picks)]
    pcfg = packing.PackingConfig(max_tokens=args.max_tokens, micro_batches=4)
    print(f"synthetic manifests, tiny preset: {len(samples)} samples loaded, a stream of {len(stream)}; "
          f"packs of {args.max_tokens} tokens")
    packing.print_fill_and_balance({"synthetic": (stream, None)}, pcfg, 16, 8, 100, mcfg.llm_config.hidden_size)

    torch.set_num_threads(args.threads)       # 1 by default: waiting OpenMP threads make timings noisy
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = M.build_model("tiny").train().to(device)
    order = list(range(len(samples)))
    random.Random(0).shuffle(order)
    padded = [packing.collate_padded([samples[i] for i in order[k:k + args.batch_size]])
              for k in range(0, len(order), args.batch_size)]
    plans = packing.plan_packs([metas[i] for i in order], packing.PackingConfig(max_tokens=args.max_tokens,
                                                                                 max_images_per_pack=10 ** 6))
    packed = [packing.collate_pack([samples[m.index] for m in p], p) for p in plans]
    to_dev = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    padded, packed = [to_dev(b) for b in padded], [to_dev(b) for b in packed]
    useful = sum(s["input_ids"].numel() for s in samples)

    def run(batches, is_packed):
        for b in batches:
            out = net(b["input_ids"], pixel_values=b["pixel_values"], labels=b["labels"],
                      position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"] if is_packed else None)
            out.ce_sum.backward()              # summed CE: the global token mean only rescales it
            net.zero_grad(set_to_none=True)

    run(padded[:1], False), run(packed[:1], True)                       # warm-up
    t_pad, t_pack = [], []
    for _ in range(args.repeats):                                        # alternate: same machine load
        t_pad.append(timed(lambda: run(padded, False)))
        t_pack.append(timed(lambda: run(packed, True)))
    med_pad, med_pack = sorted(t_pad)[args.repeats // 2], sorted(t_pack)[args.repeats // 2]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n[3] tiny SAILVL forward+backward, fp32 {where}, {len(samples)} "
          f"samples, {useful} useful tokens, median of {args.repeats}")
    for name, batches, t in ((f"pad-to-longest, {args.batch_size} samples", padded, med_pad),
                             (f"stream packs, {args.max_tokens} tokens", packed, med_pack)):
        computed = sum(b["input_ids"].numel() for b in batches)
        print(f"  {name:<28} computed {computed:>7} | useful {useful / computed:6.1%} | {t:6.2f} s | "
              f"{useful / t:8,.0f} useful tok/s")
    print(f"packed / padded useful tokens/s: {med_pad / med_pack:.2f}x")


def final_eval_loss(folder: str) -> float:
    with open(os.path.join(folder, "meta.json")) as f:
        return float(json.load(f)["eval_loss"])


def bench_adalrs(args):
    """pretrain1 (tiny) with a fixed LR vs with AdaLRS from the same start and the same data, for
    several seeds, through `run_stage` (the stage table the CLI uses); held-out loss at the end."""
    import tempfile
    init = args.init_from or stage_dir(StageConfig(out_dir=args.out_dir), "vit3")
    if not is_finished_stage(init):
        raise UsageError(f"bench adalrs starts pretrain1 from {init}, which is missing: run the recipe up to vit3 "
                         f"first, or pass --init-from=DIR")
    lm0 = stage_dir(StageConfig(out_dir=args.out_dir), "lm0")
    diffs = []
    with tempfile.TemporaryDirectory(prefix="adalrs_bench_") as tmp:
        for seed in range(args.seeds):
            res = {}
            for name, on in (("fixed", "false"), ("adalrs", "true")):
                out = os.path.join(tmp, f"{name}{seed}")
                os.makedirs(out)
                for src, dst in ((init, "vit3"), (lm0, "lm0")):         # pretrain1's sources, per its init rule
                    shutil.copytree(src, os.path.join(out, dst))
                res[name] = final_eval_loss(run_stage("pretrain1", [f"--out_dir={out}", f"--adalrs={on}",
                                                                    f"--data_dir={args.data_dir}", f"--lr={args.lr}",
                                                                    f"--seed={1337 + seed}"]))
            diffs.append(res["fixed"] - res["adalrs"])
            print(f"seed {seed}: held-out loss fixed LR {args.lr:g} {res['fixed']:.4f} | AdaLRS {res['adalrs']:.4f} "
                  f"| fixed - AdaLRS = {diffs[-1]:+.4f}")
    print(f"mean over {args.seeds} seeds: fixed - AdaLRS = {sum(diffs) / len(diffs):+.4f} "
          f"(paper §3.2.1, full scale: > +0.06)")


def bench(argv):
    ap = argparse.ArgumentParser(prog="train_stage.py bench", description="Benchmarks measured in one run: "
                                 "`step` (our Qwen3 vs HF's training step), `packing` (real synthetic samples: "
                                 "fill, balance, packed vs padded tokens/s), `adalrs` (pretrain1 fixed LR vs AdaLRS).")
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step", help=bench_step.__doc__.split("\n")[0])
    s.add_argument("--preset", default="tiny")
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--seq", type=int, default=512)
    s.add_argument("--repeats", type=int, default=5, help="timed steps per model (best one reported)")
    s = sub.add_parser("packing", help=bench_packing.__doc__.split("\n")[0])
    s.add_argument("--synth-dir", default=data.DEFAULT_SYNTH_DIR)
    s.add_argument("--per-family", type=int, default=8, help="synthetic samples loaded per manifest")
    s.add_argument("--samples", type=int, default=20000, help="length of the simulated stream")
    s.add_argument("--max-tokens", type=int, default=2048, help="pack length for the tiny model")
    s.add_argument("--batch-size", type=int, default=8, help="pad-to-longest batch for the tiny model")
    s.add_argument("--repeats", type=int, default=3, help="timed passes per batching (median reported)")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads for the tokens/s part")
    s.add_argument("--device", default="cpu", help="cpu | cuda (the tokens/s part)")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("adalrs", help=bench_adalrs.__doc__.split("\n")[0])
    s.add_argument("--out-dir", default="out", help="where the recipe's vit3 and lm0 outputs are")
    s.add_argument("--init-from", default="", help="the vit3 output to start from (default OUT_DIR/vit3)")
    s.add_argument("--lr", type=float, default=stage_config("pretrain1").lr, help="the start / fixed LR")
    s.add_argument("--seeds", type=int, default=2)
    s.add_argument("--data-dir", default=data.DEFAULT_SYNTH_DIR, help="the synthetic data the recipe ran on")
    args = ap.parse_args(argv)
    return {"step": bench_step, "packing": bench_packing, "adalrs": bench_adalrs}[args.what](args)


# ==============================================================================================
# command line

def help_text(cfg: StageConfig, model_cfg: M.SAILVLConfig, stage_given: bool) -> str:
    lines = [__doc__.split("\n\n")[0], "", "the recipe (tiny default | the paper's values, as data):"]
    for row in RECIPE:
        c = stage_config(row.name)
        how = f"runs with {row.runner}" if row.runner != "train_stage.py" else \
            f"trains {c.trainable or '-'}; {c.steps} steps, lr {c.lr:g}, packs of {c.packing.max_tokens}"
        lines.append(f"  {row.name:13s} {row.section or 'stand-in':15s} {how}")
        paper = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                          for k, v in row.paper)
        lines.append(f"  {'':13s} {'':15s} {row.note}" + (f" [paper: {paper}]" if paper else ""))
    title = f"options, with the values of stage {cfg.stage}" if stage_given else "options (defaults; add --stage NAME"\
        " for a stage's values)"
    lines += ["", title + ":",
              "  --resume [DIR]            continue from DIR, or from the newest good out/<stage>.run/step-* checkpoint",
              "  --ckpts A B ...           soup: the checkpoints to average (default: the stage's inputs)"]

    def walk(obj, prefix):
        doc = field_help(type(obj))
        for f in fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, prefix + f.name + ".")
            else:
                lines.append(f"  --{prefix + f.name}={v!r:<18} {doc.get(f.name, '')}")
    walk(cfg, "")
    lines += ["  --model.<field>=...       the model config, e.g. --model.llm_config.num_hidden_layers=8 "
              "(python model.py --preset NAME prints every field)",
              "", "other commands: python train_stage.py bench {step,packing,adalrs} --help | "
              "python train_stage.py calibrate --help"]
    return "\n".join(lines)


def parse_args(argv):
    """(cfg, model_cfg, options) from the command line (one option style; see split_options)."""
    opts = split_options(argv)
    given = dict(opts)
    cfg = stage_config(given.get("stage") or "vit1", given.get("scale") or "tiny",
                       log=lambda *a: print0(int(os.environ.get("RANK", "0")), *a))
    preset = given.get("preset") or cfg.preset
    try:
        model_cfg = M.preset_config(preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for key, value in opts:
        if key not in ("stage", "scale", "resume", "ckpts", "help"):
            set_key({"": cfg, "model": model_cfg}, key, value)
    modules_of(cfg.trainable)
    cfg.steps = max(1, round(cfg.steps * cfg.step_scale))
    if cfg.schedule not in ("cosine", "constant"):
        raise UsageError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
    if cfg.label_mode not in data.LABEL_MODES:
        raise UsageError(f"--label_mode must be one of {', '.join(data.LABEL_MODES)}, got {cfg.label_mode!r}")
    for key in ("init_from", "init_llm", "init_vit", "tokenizer"):
        path = getattr(cfg, key)
        if path and path != "random" and not os.path.isdir(path):
            raise UsageError(f"--{key.replace('_', '-')}: {path} is not a folder")
    return cfg, model_cfg, given


def run_stage(stage: str, overrides: list = (), resume: Optional[str] = None) -> str:
    """Programmatic entry (tests, benchmarks, the recipe): run `stage` with `--key=value` overrides."""
    cfg, model_cfg, _ = parse_args(["--stage", stage, *overrides])
    return train(cfg, model_cfg, resume)


def ensure_sources(cfg: StageConfig, model_cfg: M.SAILVLConfig, log):
    """Run the stand-in stages this stage starts from when their output is missing; refuse, with
    what to run, when a paper stage's output is missing."""
    for name in missing_sources(cfg):
        row = STAGES[name]
        if not row.auto:
            raise UsageError(f"{cfg.stage} starts from {stage_dir(cfg, name)}, which is missing or incomplete: run "
                             f"`{command_for(row, cfg)}` first, or pass --init-from=DIR (--init-from=random "
                             f"starts from random weights)")
        sub = stage_config(name)
        for key in ("out_dir", "data_dir", "seed", "preset", "tokenizer"):
            setattr(sub, key, getattr(cfg, key))
        sub.steps = cfg.auto_steps or sub.steps
        log(f"{stage_dir(cfg, name)} is missing: running the stand-in stage {name} first ({row.note})")
        ensure_sources(sub, model_cfg, log)
        train(sub, dataclasses.replace(model_cfg), None)
        log(f"{name} done: {stage_dir(cfg, name)}; now {cfg.stage}")


def try_it(cfg: StageConfig, out: str) -> Optional[str]:
    """A sample.py command on a held-out sample of the stage's own data, with the reference reply:
    the stage's first visual family with short answers (ocr, count, ...), else its first visual one."""
    short = ("ocr", "count", "multi", "chart", "video", "caption_qa")
    mix = sorted((name for name, _ in stage_row(cfg.stage).mix), key=lambda n: short.index(n) if n in short else 99)
    for name in mix:
        path = os.path.join(cfg.data_dir, name, "eval.jsonl")
        if name.startswith("out:") or not os.path.exists(path):
            continue
        rec = data.JsonlDataset(path, data.load_tokenizer(None)).record(0)
        if rec.text is not None or not (rec.images or rec.videos):
            continue
        media = " ".join(f"--image {shlex_quote(p)}" for p in rec.images) + \
            " ".join(f"--video {shlex_quote(p)}" for p in rec.videos)
        question = data.PLACEHOLDER_RE.sub("", rec.turns[0][1]).strip()
        return f"python sample.py --ckpt {out} {media} --prompt {shlex_quote(question)}   # reference: {rec.turns[-1][1]}"
    return None


def shlex_quote(s: str) -> str:
    import shlex
    return shlex.quote(os.path.relpath(s) if os.path.isabs(s) and s.startswith(os.getcwd()) else s)


def writable_dir(path: str):
    """Make `path` (a folder) or say in one line why it cannot be: before hours of training, not
    at the first save."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {path}: {e.strerror or e} (choose another --out_dir)")


def run_cli(argv: list):
    cfg, model_cfg, opts = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    if "help" in opts:
        log(help_text(cfg, model_cfg, "stage" in opts))
        return
    row = stage_row(cfg.stage)
    if row.runner == "rl.py":
        raise UsageError(f"{row.name} runs in rl.py: `{command_for(row, cfg)}`")
    log(f"stage {cfg.stage} ({row.section or 'not a paper stage'}): {row.note}")
    writable_dir(cfg.out_dir)
    if row.runner == "soup":
        inputs = opts["ckpts"].split(",") if opts.get("ckpts") else [stage_dir(cfg, s) for s in row.inputs]
        for path, name in zip(inputs, row.inputs if not opts.get("ckpts") else inputs):
            if not is_finished_stage(path) and not os.path.exists(os.path.join(path, "config.json")):
                hint = f"run `{command_for(STAGES[name], cfg)}` first, or " if name in STAGES else ""
                raise UsageError(f"soup: {path} is missing: {hint}pass --ckpts A B")
        out = soup(cfg, inputs)
    else:
        resume = opts.get("resume", "") or None
        if "resume" in opts and resume is None:
            resume = find_resume_checkpoint(run_dir(cfg), log)
            if resume is None:
                log(f"resume: no usable checkpoint under {run_dir(cfg)}; starting from the beginning")
        elif resume:
            verify_checkpoint(resume, resumable=True)
        if not resume:
            ensure_sources(cfg, model_cfg, log)
        out = train(cfg, model_cfg, resume)
    log(f"done: {cfg.stage} checkpoint in {out}/ (config.json, model.safetensors, meta.json"
        f"{', metrics.jsonl' if row.runner != 'soup' else ''})")
    nxt = next_name(row)
    if nxt:
        log(f"next: {command_for(STAGES[nxt], cfg)}")
    hint = try_it(cfg, out)
    if hint:
        log(f"try it: {hint}")


# ==============================================================================================
# the whole recipe in one command: python train_stage.py --stage all

# --stage all only (the rest goes to every stage): processes per stage, held-out samples per family
# (sample.EVAL_LIMIT: the whole synthetic eval split), the families evaluated ("" = all), the last
# stage to run ("" = the whole recipe), and how many runs of the recipe (run k > 1: every stage's
# seed + 1000 (k - 1), outputs in <out_dir>/seed<k>/; the synthetic data and held-out samples stay)
RECIPE_OPTIONS = {"nproc": "1", "eval_limit": "128", "eval_families": "", "until": "", "seeds": "1"}
SEED_STEP = 1000
EVAL_BATCH = 64                  # prompts per generate call in the recipe's evaluation
# Thinking mode is measured (from LongCoT on) where LongCoT trains (math, count_cot) and on their
# direct twins (math_direct, count): every thinking effect the recipe claims lies there.
THINK_FAMILIES = ("count", "count_cot", "math", "math_direct")
MODE_WORDS = {"real": "real images", "blank": "blank images", "think": "thinking mode"}
RL_HELDOUT = "heldout_predictions.jsonl"


def recipe_effects() -> list:
    """The effects the recipe claims, each a paired difference A - B on the same held-out samples:
    [(name, (stage A, mode), (stage B, mode), families)], modes as evaluate_stage's (real, blank,
    think). An RL stage may add its own held-out before / after: RL_HELDOUT in its output folder,
    one {"side": "before" | "after", "family", "where", "correct"} per line (recipe_effect_results)."""
    import sample
    mix = lambda stage: tuple(f for f, _ in STAGES[stage].mix if f in data.SYNTH_FAMILIES)    # noqa: E731
    return [("progressive alignment (stages I-III vs III alone)", ("vit3", "real"), ("vit3-direct", "real"), mix("vit3")),
            ("SFT", ("sft4", "real"), ("vit1", "real"), sample.VISUAL),
            ("soup vs its first input", ("soup", "real"), ("sft4", "real"), mix("sft4")),
            ("soup vs its second input", ("soup", "real"), ("sft4-twin", "real"), mix("sft4")),
            ("LongCoT: thinking vs direct", ("longcot", "think"), ("longcot", "real"), THINK_FAMILIES),
            ("Think-Fusion direct vs LongCoT thinking", ("thinkfusion", "real"), ("longcot", "think"), THINK_FAMILIES),
            ("RL verifiable: after vs before", ("rl-verifiable", "think"), ("longcot", "think"), THINK_FAMILIES),
            ("RL mixed: after vs before", ("rl-mixed", "real"), ("thinkfusion", "real"), mix("rl-mixed")),
            ("RL mixed: after vs before, thinking", ("rl-mixed", "think"), ("thinkfusion", "think"), THINK_FAMILIES),
            ("vit1 sees (OCR)", ("vit1", "real"), ("vit1", "blank"), ("ocr",)),
            ("sft4 sees", ("sft4", "real"), ("sft4", "blank"), sample.VISUAL)] + [
            (f"sft4 sees ({f})", ("sft4", "real"), ("sft4", "blank"), (f,)) for f in sample.VISUAL]


def mode_of(p: dict) -> str:
    return "think" if p["think"] else "blank" if p["blank"] else "real"


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def recipe_effect_results(rdir: str, cfg: StageConfig) -> list:
    """The effects whose two sides this run has measured (predictions/<stage>.jsonl), each
    {"name", "a", "b", "families", **sample.paired_difference}; an RL stage's own held-out before /
    after (RL_HELDOUT) as one more. Sides scored on different samples stop the recipe."""
    import sample
    preds = {}

    def side(stage, mode, fams):
        if stage not in preds:
            path = os.path.join(rdir, "predictions", f"{stage}.jsonl")
            preds[stage] = read_jsonl(path) if os.path.exists(path) else []
        return [p for p in preds[stage] if mode_of(p) == mode and p["family"] in fams]

    specs = [(name, f"{sa} ({MODE_WORDS[ma]})", side(sa, ma, fams), f"{sb} ({MODE_WORDS[mb]})", side(sb, mb, fams))
             for name, (sa, ma), (sb, mb), fams in recipe_effects()]
    for row in RECIPE:
        path = os.path.join(stage_dir(cfg, row.name), RL_HELDOUT)
        if row.runner == "rl.py" and os.path.exists(path):
            held = read_jsonl(path)
            specs.append((f"{row.name}: its own held-out, after vs before", f"{row.name} (after)",
                          [p for p in held if p["side"] == "after"], f"{row.name} (before)",
                          [p for p in held if p["side"] == "before"]))
    out = []
    for name, a_label, a, b_label, b in specs:
        if not a or not b:
            continue
        try:
            diff = sample.paired_difference(a, b)
        except ValueError as e:
            raise UsageError(f"effect {name!r}: {e}; were the stages evaluated with different --eval_limit or "
                             f"--eval_families? Remove {rdir} or pass the earlier values") from None
        fams = list(dict.fromkeys(p["family"] for p in a))          # in evaluation order
        out.append({"name": name, "a": a_label, "b": b_label, "families": fams, **diff})
    return out


def machine() -> str:
    import platform
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def stage_command(row: Stage, nproc: int, passthrough: list, seed_offset: int = 0) -> list:
    """The command that runs one row of the recipe as its own process (resuming if it was cut);
    with a seed offset, the seed the row would run with (--seed, else its tiny default, else
    StageConfig's) + the offset."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_stage.py" if row.runner == "soup"
                          else row.runner)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    given = dict(split_options(passthrough)).get("seed")
    base = int(given) if given else dict(row.tiny).get("seed", StageConfig.seed)
    seed = [f"--seed={base + seed_offset}"] if seed_offset else []
    return launch + [script, "--stage", row.name, *passthrough, *seed] + ([] if row.runner == "soup" else ["--resume"])


def evaluate_stage(folder: str, cfg: StageConfig, think: bool, limit: int, families=None) -> tuple:
    """({mode: {family: cell}}, predictions) of a stage output on the first `limit` held-out samples
    of each synthetic family; a cell is sample.accuracy_cell (n, correct, accuracy, Wilson 95%
    interval). Modes: real images; blank images (every family with images: all but text); thinking
    mode from LongCoT on (THINK_FAMILIES). Every mode reads the same samples of a family."""
    import sample
    model, tok, dcfg = sample.load(folder)
    fams = families or sample.synth_families(cfg.data_dir)
    modes = {"real": (fams, False, False), "blank": ([f for f in fams if f != "text"], False, True)}
    if think:
        modes["think"] = ([f for f in fams if f in THINK_FAMILIES], True, False)
    evals, preds = {}, []
    for mode, (fs, t, blank) in modes.items():
        if not fs:
            continue
        res = sample.evaluate_families(model, tok, dcfg, cfg.data_dir, fs, limit=limit, think=t, blank=blank,
                                       batch_size=EVAL_BATCH, progress=False)
        right = Counter(p["family"] for p in res["predictions"] if p["correct"])
        evals[mode] = {f: sample.accuracy_cell(right[f], n) for f, n in res["n"].items()}
        preds += [{k: p[k] for k in ("family", "where", "answer", "prediction", "correct", "blank", "think")}
                  for p in res["predictions"]]
    return evals, preds


def stage_losses(folder: str) -> tuple:
    """(train losses per step, held-out loss at the start) from a stage's metrics.jsonl."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return [], None
    recs = read_jsonl(path)
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    return [r["loss"] for r in recs if "loss" in r], evals[0] if evals else None


def write_json_atomic(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def recipe_stage(row: Stage, cfg: StageConfig, own: dict, passthrough: list, seed_offset: int, rdir: str) -> dict:
    """Run one row (unless its output verifies), evaluate it, write its predictions; its report entry."""
    out, t0 = stage_dir(cfg, row.name), time.time()
    if not is_finished_stage(out):
        res = subprocess.run(stage_command(row, int(own["nproc"]), passthrough, seed_offset))
        if res.returncode:
            raise UsageError(f"the recipe stopped at {row.name} (exit {res.returncode}); fix it and run the "
                             f"same command again: finished stages are skipped")
    seconds = time.time() - t0
    meta = verify_checkpoint(out)
    families = [f for f in own["eval_families"].split(",") if f] or None
    think = [r.name for r in RECIPE].index(row.name) >= [r.name for r in RECIPE].index("longcot")
    evals, preds = evaluate_stage(out, cfg, think, int(own["eval_limit"]), families) \
        if row.runner != "rl.py" or row.trainable else ({}, [])
    losses, start = stage_losses(out)
    entry = {"seconds": round(seconds, 1), "first_loss": meta.get("first_loss"), "final_loss": meta.get("final_loss"),
             "eval_loss_start": start, "eval_loss": meta.get("eval_loss"), "eval": evals}
    for key in ("reward", "kept"):
        if key in meta:
            entry[key] = meta[key]
    if isinstance(entry["eval_loss"], dict):                  # the soup: its own held-out loss
        entry["eval_loss"] = entry["eval_loss"].get("soup")
    with open(os.path.join(rdir, "predictions", f"{row.name}.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in preds)
    print_stage_line(row.name, entry, meta)
    return entry


def print_stage_line(name: str, entry: dict, meta: dict):
    """recipe | stage  seconds | what it did | mean visual accuracy (blank) | per family ± interval."""
    import sample
    if "reward" in entry:
        what = f"held-out reward {entry['reward']['before']:.3f} -> {entry['reward']['after']:.3f}"
    elif "kept" in entry:
        what = f"{meta['kept']} chains kept of {meta['samples']} samples"
    else:
        fmt = lambda x: "—" if x is None else f"{x:.3f}"                                # noqa: E731
        what = f"held-out loss {fmt(entry['eval_loss_start'])} -> {fmt(entry['eval_loss'])}"
    real, blank = entry["eval"].get("real", {}), entry["eval"].get("blank", {})
    visual = [f for f in real if f in sample.VISUAL]
    mean = lambda cells: sum(cells[f]["accuracy"] for f in visual if f in cells) / max(1, len(visual))   # noqa: E731
    accs = f" | visual accuracy {mean(real):.3f} (blank {mean(blank):.3f}) | " + " ".join(
        f"{f} {sample.plus_minus(c['accuracy'], c['interval'])}" for f, c in real.items()) if real else ""
    print(f"recipe | {name:13s} {entry['seconds']:6.0f} s | {what}{accs}", flush=True)


def write_report(rdir: str, report: dict, cfg: StageConfig):
    import sample
    write_json_atomic(os.path.join(rdir, "report.json"), report)
    with open(os.path.join(rdir, "report.md"), "w") as f:
        f.write(sample.report_markdown(report))
    sample.report_picture(report, {n: stage_losses(stage_dir(cfg, n))[0] for n in report["stages"]},
                          os.path.join(rdir, "report.png"))


def run_recipe_once(cfg: StageConfig, own: dict, passthrough: list, seed_offset: int) -> dict:
    """Every stage of the recipe in order into cfg.out_dir, each from the previous one, each
    evaluated, with <out_dir>/recipe/report.{json,md,png} and every prediction in
    <out_dir>/recipe/predictions/<stage>.jsonl. A finished stage (its output verifies and the
    report has it) is skipped, so an interrupted run continues where it stopped."""
    import sample
    rdir = os.path.join(cfg.out_dir, "recipe")
    writable_dir(os.path.join(rdir, "predictions"))
    path = os.path.join(rdir, "report.json")
    report = json.load(open(path)) if os.path.exists(path) else {"stages": {}}
    data.ensure_synth(cfg.data_dir)
    families = [f for f in own["eval_families"].split(",") if f] or None
    report.update(machine=machine(), eval_limit=int(own["eval_limit"]), seed_offset=seed_offset,
                  interval="Wilson 95%", effect_interval=f"paired bootstrap 95%, {sample.BOOTSTRAP_RESAMPLES} resamples",
                  chance={f: round(c, 4) for f, c in sample.chance(cfg.data_dir, families, limit=int(own["eval_limit"])).items()})
    for row in RECIPE:
        if row.name in report["stages"] and is_finished_stage(stage_dir(cfg, row.name)):
            print(f"recipe | {row.name:13s} done before ({report['stages'][row.name]['seconds']:.0f} s): skipped", flush=True)
        else:
            report["stages"][row.name] = recipe_stage(row, cfg, own, passthrough, seed_offset, rdir)
            report["total_seconds"] = round(sum(st["seconds"] for st in report["stages"].values()), 1)
        report["effects"] = recipe_effect_results(rdir, cfg)
        write_report(rdir, report, cfg)
        if row.name == own["until"]:
            break
    for e in report["effects"]:
        print(f"effect | {e['name']}: {e['a']} vs {e['b']} | {', '.join(e['families'])} | n {e['n']} | "
              f"{e['difference']:+.3f} [{e['interval'][0]:+.3f}, {e['interval'][1]:+.3f}] | "
              f"{'shown' if e['excludes_0'] else 'within noise'}", flush=True)
    print(f"recipe done in {report.get('total_seconds', 0) / 60:.1f} min: {rdir}/report.md, report.png, report.json")
    return report


def run_recipe(argv: list):
    """python train_stage.py --stage all [--seeds=N]: the recipe (run_recipe_once), N times with
    different seeds; the first run's report then also holds every run's effects ("seeds")."""
    opts = dict(split_options(argv))
    own = {**RECIPE_OPTIONS, **{k: opts.pop(k) or v for k, v in RECIPE_OPTIONS.items() if k in opts}}
    opts.pop("stage", None)
    passthrough = [f"--{k}={v}" for k, v in opts.items() if k not in ("resume", "help")]
    cfg, _, _ = parse_args(["--stage", "vit1", *passthrough])         # usage errors now, not in stage 7
    if own["until"]:
        stage_row(own["until"])
    if not own["seeds"].isdigit() or int(own["seeds"]) < 1:
        raise UsageError(f"--seeds must be a whole number >= 1, got {own['seeds']!r}")
    runs = []
    for k in range(1, int(own["seeds"]) + 1):
        out_dir = cfg.out_dir if k == 1 else os.path.join(cfg.out_dir, f"seed{k}")
        run_cfg = dataclasses.replace(cfg, out_dir=out_dir)
        args = [a for a in passthrough if not a.startswith("--out_dir=")] + [f"--out_dir={out_dir}"]
        report = run_recipe_once(run_cfg, own, args, SEED_STEP * (k - 1))
        runs.append({"run": k, "seed_offset": SEED_STEP * (k - 1), "out_dir": out_dir, "effects": report["effects"]})
    if len(runs) > 1:
        first = json.load(open(os.path.join(cfg.out_dir, "recipe", "report.json")))
        first["seeds"] = runs
        write_report(os.path.join(cfg.out_dir, "recipe"), first, cfg)
        print(f"{len(runs)} runs: every run's effects in {cfg.out_dir}/recipe/report.md (\"Effects in every run\")")


def fail(message: str, code: int, prog: str = "train_stage.py"):
    """One clear line on stderr (rank 0), also handed to torchrun's error summary, then exit."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:                                   # torchrun's "Root Cause" then shows this line, not "<N/A>"
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                    "timestamp": str(int(time.time()))}}}, f)
    raise SystemExit(code)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:
            return bench(argv[1:])
        if argv[:1] == ["calibrate"]:
            return calibrate_cli(argv[1:])
        if dict(split_options(argv)).get("stage") == "all":
            return run_recipe(argv)
        run_cli(argv)
    except UsageError as e:
        fail(str(e), 2)
    except (data.TooMuchBadData, data.DataError, CheckpointError, FloatingPointError) as e:
        fail(str(e), 1)
    shutdown_distributed()


if __name__ == "__main__":
    main()
