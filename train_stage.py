"""Every training stage of SAIL-VL2 in one flat loop (paper §2.1.1, §3.2, §4.2.1, §4.2.2, §4.2.4, §5).

    torchrun train_stage.py --stage vit1                     # the tiny default, CPU, a few minutes
    torchrun --nproc_per_node 2 train_stage.py --stage sft1  # FSDP2 over 2 processes (gloo on CPU)
    python train_stage.py --help                             # every stage with the paper's values
    python train_stage.py --stage pretrain1 --help           # that stage's values for every option
    python train_stage.py --stage all                        # the whole recipe: runs tests/recipe.py
    python train_stage.py calibrate ...                      # MoE calibration: runs tests/calibrate.py

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
  FSDP2        model.py:parallelize: fully_shard each LLM and ViT block, then the root (§5.2);
               --ac=block recomputes each block in backward
  the loop     AdamW, warm-up + cosine (x the AdaLRS scale), grad clipping and accumulation,
               stream packing with one global token-mean loss (§5.1), eval, checkpoints; the
               step line: loss, LR, tokens/s (per device), MFU on GPUs, peak memory, data wait
  soup         average homogeneous checkpoints (§4.2.1)

Elsewhere: the checkpoint writer and reader (save_checkpoint, load_checkpoint; sharded, atomic,
exact resume) are model.py's; `--stage all` and `calibrate` run tooling in tests/.

Reading order of one training step, from a manifest line to loss.backward() (file:function):
  1. train_stage.py:train            the loop: LR = schedule x AdaLRS scale, then the next batch
  2. train_stage.py:StageBatches.next  data -> packing for this step (packing.py:PackLoader):
       packing.py:PackPlanner         on every rank, the global plan from metadata:
         data.py:Mixture.next_meta    the next visit of the stage's resampled mixture (§3.2.2),
                                      measured from its line, image headers and tokens (no pixels)
         packing.py:StreamPacker.push / pop, balance_packs   stream packing (§5.1), the rank split
       packing.py:PackDecoder         in loader workers, this rank's packs only:
         data.py:Mixture.load, build_sample   a manifest line -> media, template, tokens, labels
         packing.py:collate_pack      this rank's micro-batches as tensors
  3. train_stage.py:train_step       per micro-batch:
       model.py:SAILVL.forward        vit.py:SAILViT -> model.py:pixel_shuffle -> mlp1 -> the
                                      <IMG_CONTEXT> slots -> model.py:Qwen3LM.run (kernels.py:
                                      packed_attention; moe.py:SparseMoeBlock) -> summed CE
                                      (model.py:chunked_cross_entropy, no (T, V) logits)
       train_stage.py:step_loss       the one loss: global token mean, aux term, world size
       loss.backward(); then clip, AdamW step
  4. model.py:save_checkpoint        every save_every steps, and the stage output at the end

Options: any StageConfig field as `--key=value` or `--key value` (types checked, unknown keys
refused), nested configs as `--packing.max_tokens=2048`, `--adalrs_cfg.window=20`, and the model
as `--model.llm_config.hidden_size=256`. The main options are printed at start; all of them are
saved in <run>/config.json and in every checkpoint.
"""
import contextlib
import copy
import dataclasses
import datetime
import difflib
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist

import data
import kernels
import model as modeling
import moe
import packing
from adalrs import AdaLRS, AdaLRSConfig
from data import InputError, UsageError
from packing import PackingConfig

MODULES = modeling.MODULES


# ==============================================================================================
# configuration

def tiny_packing() -> PackingConfig:
    """The packer of the tiny stages: short packs, a small buffer that turns over quickly."""
    return PackingConfig(max_tokens=1024, buffer_size=64, max_wait=32, max_images_per_pack=64)


@dataclass
class StageConfig:
    stage: str = "vit1"                   # a stage of the recipe table (python train_stage.py --help)
    preset: str = "tiny"                  # model preset of random weights (python model.py); 2b with --init-llm
    scale: str = "tiny"                   # tiny | paper: "paper" applies the stage's paper values (printed)
    out_dir: str = "out"                  # stage outputs out/<stage>/, run state (step checkpoints) out/<stage>.run/
    data_dir: str = "data_synth"          # synthetic default data, generated on first use
    manifests: str = ""                   # your own data: "a.jsonl:2,b.jsonl:1" (path:weight), replaces the mix
    eval_manifests: str = ""              # held-out data for eval (default: the mix's eval split)
    init_from: str = ""                   # "" = the stage's init rule; a SAIL-VL2 folder; "random" = fresh weights
    init_modules: str = ""                # "mlp1:vit3,...": these modules from another stage's output (or "fresh")
    init_llm: str = ""                    # an HF Qwen3 / Qwen3-MoE folder: the LLM's weights, shape and tokenizer
    init_vit: str = ""                    # an HF AIMv2 / SAIL-ViT folder: the vision encoder's weights and shape
    tokenizer: str = ""                   # a Qwen tokenizer folder ("" = the one the LLM's weights come with)
    image_root: str = ""                  # folder relative image/video paths start from ("" = the manifest's)
    model_options: tuple = ()             # recorded: the --preset / --model.* given, applied to loaded configs
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
    num_workers: int = 0                  # data loader processes decoding this rank's samples (0: in the trainer)
    prefetch_factor: int = 2              # packs each loader process keeps decoded ahead
    adalrs: bool = False                  # AdaLRS learning-rate search (pretrain1 by default)
    adalrs_cfg: AdaLRSConfig = field(default_factory=AdaLRSConfig)       # --adalrs_cfg.window=...
    ngram_rebalance: bool = False         # n-gram rebalancing of the mix (§3.2.2; pretrain2 by default)
    eval_every: int = 50                  # held-out loss every N steps (and at step 0 and the end); 0 = never
    eval_packs: int = 8                   # held-out steps per eval
    save_every: int = 50                  # step checkpoint every N steps; 0 = only the stage output
    keep_checkpoints: int = 2             # step checkpoints kept in out/<stage>.run/ (0 = all)
    max_bad_fraction: float = 0.05        # stop when more of the distinct samples than this are bad
    seed: int = 1337                      # init, data order and sampling
    fsdp: bool = False                    # shard with FSDP2 even as one process (several always shard)
    ac: str = "none"                      # activation checkpointing: none | block (LLM / ViT blocks recomputed)
    auto_steps: int = 0                   # steps of a stand-in stage run automatically first (0 = its default)
    step_scale: float = 1.0               # multiply the stage's steps (a shortened recipe: --stage all --step_scale=0.2)


def field_help(cls) -> dict:
    """{field: its comment} read from the dataclass source (with the comment lines that continue it
    under it): the comments ARE the help."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, last = {}, None
    for line in src.splitlines():
        field, more = re.match(r"^\s+(\w+): [^#\n]*#\s*(.*)$", line), re.match(r"^\s+#\s*(.*)$", line)
        if field:
            last = field.group(1)
            out[last] = field.group(2).strip()
        elif more and last:
            out[last] += " " + more.group(1).strip()
        else:
            last = None
    return out


def parse_value(text: str, current, name: str, optional: bool = False):
    """`text` converted to the type of `current` (bool, int, float, str); "none" is None where the
    field is Optional (`optional`, or its value is None now)."""
    if (optional or current is None) and text.lower() in ("none", ""):
        return None
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{name}: expected a boolean (true/false), got {text!r}")
    if isinstance(current, (list, tuple)):
        proto = current[0] if current else ""
        return type(current)(parse_value(t, proto, name) for t in text.split(",") if t != "")
    if current is None or isinstance(current, (int, float)):     # None (an unset Optional) parses as an int
        kind, what = (float, "a number") if isinstance(current, float) else (int, "an integer")
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"--{name}: expected {what}, got {text!r}") from None
    return text


def set_key(roots: dict, key: str, value: str) -> None:
    """Apply one `--a.b.c=value` to the dataclasses in `roots` ('' = the stage config; 'model' =
    the model config); dotted keys walk nested dataclass fields. Unknown keys are refused with
    the nearest known one."""
    key = key.replace("-", "_")
    head, _, rest = key.partition(".")
    rooted = head in roots and head and rest
    obj, path = (roots[head], rest.split(".")) if rooted else (roots[""], key.split("."))
    prefix = [head] if rooted else []                # kept in the suggestion: --model.llm_config.…
    for i, p in enumerate(path):
        names = [f.name for f in fields(obj)] if dataclasses.is_dataclass(obj) else []
        if p not in names:
            near = difflib.get_close_matches(p, names, n=1)
            where = ".".join(prefix + path[:i]) or "the stage config"
            raise UsageError(f"unknown option --{key}" + (f" (did you mean --{'.'.join(prefix + path[:i] + near)}?)"
                                                          if near else f" (no field {p!r} in {where})"))
        if i == len(path) - 1:
            kind = str(next(f.type for f in fields(obj) if f.name == p))
            optional = "Optional" in kind or "None" in kind
            setattr(obj, p, parse_value(value, getattr(obj, p), key, optional))
            if i and hasattr(obj, "__post_init__"):      # a nested config checks its fields as when built
                try:
                    obj.__post_init__()
                except ValueError as e:
                    raise UsageError(f"--{key}: {e}") from None
        else:
            obj = getattr(obj, p)


def split_options(argv: list, multi=("ckpts",), flags=("help", "resume")) -> list:
    """[(key, value)] from argv in one option style: `--key=value` or `--key value`. Keys in
    `multi` take every following value; keys in `flags` may stand alone (value None)."""
    out, i = [], 0
    while i < len(argv):
        item = "--help" if argv[i] == "-h" else argv[i]
        if not item.startswith("--"):
            raise UsageError(f"unexpected argument {item!r} (options look like --key=value)")
        key, eq, value = item[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        if key in multi and not eq:
            values = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i:]))
            value, i = ",".join(values), i + len(values)
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
    control: bool = False       # a comparison trained beside the paper's path (a next: line skips it)

    @property
    def paper_values(self) -> dict:
        return dict(self.paper)


# The paper trains every module in its RL stages (Table 4); the miniature's RL freezes the ViT and the
# adapter: the rewards judge the reasoning, and a frozen ViT keeps the blank-image measure meaningful.
RL_TRAINS_THE_LLM = ("trainable", "language_model")
VIT3_MIX = (("caption", 0.2), ("caption_qa", 0.2), ("ocr", 0.2), ("count", 0.2), ("chart", 0.2))
VIT3_TINY = (("lr", 1e-3), ("steps", 400), ("eval_every", 100))
SFT_MIX_4 = (("video", 0.5), ("caption_qa", 0.1), ("ocr", 0.1), ("chart", 0.1), ("count", 0.1), ("multi", 0.1))
SFT4_TINY = (("lr", 3e-4), ("steps", 150), ("packing.max_tokens", 2048))
RECIPE = (
    Stage("lm0", "", "not a paper stage: language pre-training of the tiny LLM on synthetic text and text-only "
          "chat, standing in for Qwen3's own pre-training (real runs start from Qwen3: --init-llm)",
          trainable=("language_model",), init="random", auto=True,
          mix=(("text", 0.3), ("caption", 0.1), ("caption_qa", 0.1), ("ocr", 0.05), ("chart", 0.1), ("count", 0.1),
               ("math_direct", 0.1), ("multi", 0.05), ("video", 0.05), ("math", 0.025), ("count_cot", 0.025)),
          tiny=(("text_only", True), ("lr", 3e-3), ("steps", 500), ("warmup_steps", 10), ("eval_every", 100))),
    Stage("vit1", "§2.1.1", "SAIL-ViT stage I: the adapter aligns the ViT to the LLM; 4.9M SAIL-Caption2 + 3.1M OCR",
          trainable=("mlp1",), mix=(("caption", 0.6), ("ocr", 0.4)),
          # 1,200 tiny steps: after 600 the adapter read held-out renderings above chance in 2 runs of 3
          tiny=(("lr", 3e-3), ("steps", 1200), ("warmup_steps", 10), ("eval_every", 200)),
          paper=(("lr", 2e-4), ("batch", 1920), ("seq", 8192), ("samples", 8_000_000))),
    Stage("vit2", "§2.1.1", "SAIL-ViT stage II: ViT + adapter on SAIL-Caption2, Caption2-QA and VQA",
          trainable=("vision_model", "mlp1"), mix=(("caption", 0.4), ("caption_qa", 0.3), ("ocr", 0.3)),
          tiny=(("lr", 1e-3), ("steps", 200), ("eval_every", 100)), paper=(("lr", 2e-5), ("batch", 512), ("seq", 8192))),
    Stage("vit3", "§2.1.1", "SAIL-ViT stage III: all parameters, 36.5M multimodal samples", mix=VIT3_MIX, tiny=VIT3_TINY,
          paper=(("lr", 1e-5), ("batch", 512), ("seq", 8192), ("samples", 36_500_000))),
    Stage("vit3-direct", "§2.1.1", "a control, not a paper stage: stage III straight from lm0 (the ViT and adapter "
          "untrained, as vit1 starts), the baseline progressive alignment is measured against",
          init="lm0", mix=VIT3_MIX, tiny=VIT3_TINY, control=True),
    Stage("pretrain1", "§3.2.1, §3.2.3", "basic pre-training: SAIL-ViT + the original LLM + a freshly initialised "
          "adapter, adapter only, AdaLRS from 2e-4 (ended at 6.75e-4); captions, chart captions, OCR",
          trainable=("mlp1",), init=(("vision_model", "vit3"), ("mlp1", "fresh"), ("language_model", "lm0")),
          mix=(("caption", 0.5), ("ocr", 0.25), ("chart", 0.15), ("text", 0.1)),
          tiny=(("lr", 3e-4), ("steps", 300), ("adalrs", True), ("eval_every", 100)),
          paper=(("lr", 2e-4), ("batch", 2048), ("seq", 8192), ("samples", 64_000_000), ("tokens", 128e9))),
    Stage("pretrain2", "§3.2.1, §3.2.2", "multi-task pre-training: all parameters, half visual understanding, half "
          "instructions incl. text math; n-gram rebalancing; no AdaLRS",
          mix=(("caption", 0.2), ("caption_qa", 0.15), ("ocr", 0.15), ("count", 0.15), ("chart", 0.15),
               ("math_direct", 0.1), ("text", 0.1)),
          tiny=(("lr", 1e-3), ("steps", 500), ("ngram_rebalance", True), ("eval_every", 100)),
          paper=(("seq", 8192), ("samples", 180_000_000), ("tokens", 360e9))),
    Stage("sft1", "§4.2.1", "SFT phase 1: general instructions (Infinity-MM stage 2)",
          mix=(("caption_qa", 0.3), ("count", 0.2), ("ocr", 0.2), ("chart", 0.2), ("multi", 0.1)),
          tiny=(("lr", 2e-4), ("steps", 250)), paper=(("seq", 8192), ("tokens", 42e9))),
    Stage("sft2", "§4.2.1", "SFT phase 2: SAIL-Instruction2 (20M)",
          mix=(("caption", 0.1), ("caption_qa", 0.15), ("ocr", 0.15), ("chart", 0.15), ("count", 0.15),
               ("multi", 0.15), ("math_direct", 0.15)),
          tiny=(("lr", 5e-4), ("steps", 250)), paper=(("seq", 8192), ("samples", 20_000_000), ("tokens", 40e9))),
    Stage("sft3", "§4.2.1", "SFT phase 3: hard subsets (LLaVA-CoT, MMPR, Condor)",
          mix=(("chart", 0.25), ("count_cot", 0.25), ("multi", 0.2), ("math", 0.3)),
          tiny=(("lr", 3e-4), ("steps", 150)), paper=(("seq", 8192), ("tokens", 16e9))),
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
          "for MoE; 2048 rollouts / episode, 8 updates of mini-batch 512; clip in [0.20, 0.28]. The miniature "
          "trains on counting in thinking mode (1-9 objects; fresh scenes every episode), the skill the tiny "
          "model has; its math is guessing, and RL on guesses only learns the frequent answers. At LR 1e-4: "
          "at 3e-4 sampled answers gained as much but the greedy answer fell on new prompts",
          mix=(("count_cot", 1.0),), label_mode="rl", runner="rl.py",
          tiny=(("episodes", 50), ("mini_batches", 3), ("lr", 1e-4), ("batch_rows", 512), RL_TRAINS_THE_LLM),
          paper=(("lr", 1e-6), ("seq", 16384), ("samples", 70_000), ("rollouts", 2048), ("mini_batch", 512))),
    Stage("harvest", "§4.2.4", "CoT harvest: rejection-sample correct, well-formed chains from the RL model",
          trainable=(), mix=(("math", 0.5), ("count_cot", 0.5)), label_mode="rl", runner="rl.py",
          tiny=(("harvest_samples", 4), ("batch_rows", 512))),
    Stage("thinkfusion", "§4.2.4", "Think-Fusion SFT: 900K direct + 100K harvested CoT (9:1); dual-target loss",
          init="rl-verifiable", label_mode="thinkfusion",
          mix=(("caption_qa", 1.5), ("ocr", 1.5), ("chart", 1.5), ("count", 1.5), ("math_direct", 2.0),
               ("multi", 1.0), ("out:harvest/cot.jsonl", 1.0)),
          tiny=(("lr", 2e-4), ("steps", 150), ("packing.max_tokens", 2048)),
          paper=(("lr", 1e-6), ("batch", 1024), ("seq", 20480), ("samples", 1_000_000), ("epochs", 1))),
    Stage("rl-mixed", "§4.2.5", "RL with mixed rewards (answer + think + format, weighted): hard cases + general. "
          "The miniature asks half its prompts in direct mode (the Think-Fusion model answers in both; thinking-mode "
          "rollouts alone taught direct replies to run on into a chain), at LR 1e-4 (at 3e-4 direct answers drifted); "
          "it trains on the whole mix: the hard-case filter (--filter_k=K, with --general_share) costs K samples "
          "per prompt of the pool",
          mix=(("math", 0.25), ("count", 0.15), ("chart", 0.15), ("ocr", 0.1), ("caption_qa", 0.15), ("multi", 0.1),
               ("video", 0.1)), label_mode="rl", runner="rl.py",
          tiny=(("reward", "mixed"), ("direct_share", 0.5), ("episodes", 20), ("lr", 1e-4), RL_TRAINS_THE_LLM),
          paper=(("lr", 1e-6), ("seq", 16384), ("samples", 100_000))),
)
STAGES = {s.name: s for s in RECIPE}


def stage_row(name: str, offered: tuple = (*STAGES, "all")) -> Stage:
    """The recipe row of a stage name; an unknown name is a usage error listing the names the
    command takes (`offered`: train_stage.py's stages and `all`, the recipe; rl.py's RL stages)."""
    if name not in STAGES:
        near = difflib.get_close_matches(name, offered, n=1)
        raise UsageError(f"unknown stage {name!r}" + (f" (did you mean {near[0]}?)" if near else "")
                         + f"; stages: {', '.join(offered)}")
    return STAGES[name]


def previous_name(row: Stage) -> Optional[str]:
    i = RECIPE.index(row)
    return RECIPE[i - 1].name if i else None


def next_name(row: Stage) -> Optional[str]:
    """The paper's next stage (the recipe's next row, a control skipped)."""
    later = [r for r in RECIPE[RECIPE.index(row) + 1:] if not r.control]
    return later[0].name if later else None


def init_rule(row: Stage) -> dict:
    """{module: stage name | "fresh"} of a stage's init rule."""
    if row.init == "random":
        return {m: "fresh" for m in MODULES}
    if isinstance(row.init, tuple):
        return dict(row.init)
    src = previous_name(row) if row.init == "previous" else row.init
    return {m: src for m in MODULES}


def stage_config(name: str, scale: str = "tiny", log=None, given=()) -> StageConfig:
    """The stage's config: StageConfig defaults, then the row's tiny defaults, then (scale='paper')
    the paper's values as far as the paper gives them, but for the options `given` on the command
    line, which win."""
    row = stage_row(name)
    cfg = StageConfig(stage=name, trainable=",".join(row.trainable), label_mode=row.label_mode)
    for key, value in row.tiny if row.runner != "rl.py" else ():    # RL rows: rl.rl_config applies them
        set_key({"": cfg}, key, str(value))
    if scale == "paper":
        apply_paper_scale(cfg, row, log or print, given)
    elif scale != "tiny":
        raise UsageError(f"--scale must be tiny or paper, got {scale!r}")
    cfg.scale = scale
    return cfg


def apply_paper_scale(cfg: StageConfig, row: Stage, log, given=()) -> None:
    """The paper's values for a real run: LR, sequence length (pack length) and steps (samples /
    batch, or tokens / (batch x seq)); values the paper does not state are kept and named, and so
    are those given on the command line (`given`), which win."""
    p, changed = row.paper_values, []

    def change(key, value):
        if key in given:
            changed.append(f"{key} {value} not applied (--{key} given)")
            return
        note = " (for the modules no checkpoint gives: a starting checkpoint keeps its shapes)" * (key == "preset")
        changed.append(f"{key} {getattr_path(cfg, key)} -> {value}{note}")
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
        change("preset", "2b")
    change("ac", "block")        # 2b at 8k packs: ~63-93 GB a rank without it (python tests/bench.py memory), over 80 GB
    missing = [k for k in ("lr", "seq") if k not in p]
    if not any(c.startswith("steps ") for c in changed):     # no batch, or a batch without samples or tokens
        missing.append("batch" if not batch else "samples or tokens")
    option = {"lr": "lr", "seq": "packing.max_tokens"}                   # (batch, samples or tokens: the steps)
    value = {"lr": f"lr {cfg.lr:g}", "seq": f"packs of {cfg.packing.max_tokens}"}
    kept = [value.get(k, f"{cfg.steps} steps") for k in missing if option.get(k, "steps") not in given]
    as_given = [f"--{option.get(k, 'steps')}" for k in missing if option.get(k, "steps") in given]
    log(f"--scale=paper ({row.name}, {row.section or 'not a paper stage'}): " + ("; ".join(changed) or "nothing")
        + (f"; the paper does not state {', '.join(missing)}: " + ", ".join(
            ["kept " + ", ".join(kept)] * bool(kept) + [", ".join(as_given) + " as given"] * bool(as_given))
           if missing else "")
        + "; the global batch is micro_batches x ranks x packs of max_tokens"
        + (f" (the paper's: {batch:,} samples; --packing.micro_batches sets it)" if batch else ""))


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


def manifest_and_weight(item: str, split: str = "train") -> tuple:
    """"path.jsonl:2" -> ("path.jsonl", 2.0); a missing file or a bad weight is a usage error."""
    option = "--manifests" if split == "train" else "--eval_manifests"
    path, weight = item, 1.0
    if not os.path.exists(item) and ":" in item:
        path, _, w = item.rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            raise UsageError(f"{option}: bad weight {w!r} in {item!r} (write path.jsonl:2 for weight 2)") from None
        if not weight > 0:
            raise UsageError(f"{option}: the weight in {item!r} must be > 0")
    if not os.path.isfile(path):
        raise UsageError(f"{option}: manifest not found: {path}")
    return path, weight


def stage_sources(cfg: StageConfig, split: str) -> list:
    """[(manifest, weight)]: --manifests / --eval_manifests, else the stage's synthetic mix."""
    spec = cfg.manifests if split == "train" else cfg.eval_manifests
    if spec:
        return [manifest_and_weight(item, split) for item in spec.split(",")]
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
            path = os.path.join(cfg.data_dir, name, f"{split}.jsonl")
            if split == "eval" and not os.path.exists(path):
                raise UsageError(f"held-out data: {path} is missing (without --eval_manifests, the held-out loss is "
                                 f"measured on the stage's synthetic families in --data_dir): pass "
                                 f"--eval_manifests=FILE, or --eval_every=0")
            sources.append((path, weight))
    return sources


def command_for(row: Stage, cfg: StageConfig, from_output: bool = False) -> str:
    """The command that runs `row` with the user's folders and data (for hints), on as many processes
    as this one, at its --scale and --step_scale (for train_stage.py's stages). A stage to run first
    also gets the model options (--preset, --init-llm, --init-vit, --tokenizer); the next stage
    (`from_output`) starts from this stage's output, which carries the model config and tokenizer, so
    it gets none (a preset there could not apply, and --init-llm would replace the trained language
    model), but where its rule takes a module from a stand-in again (pretrain1's LLM: lm0, or Qwen3)
    it gets the folder this run gave for it."""
    tool = "train_stage.py" if row.runner == "soup" else row.runner
    keys = ("out_dir", "data_dir", "manifests", "eval_manifests", "image_root") + (() if from_output else ("preset",))
    if row.runner == "train_stage.py":                   # how the run is sized carries over (rl.py, the soup: no)
        keys += ("scale", "step_scale")
    extra = [f"--{k}={getattr(cfg, k)}" for k in keys if getattr(cfg, k, None) not in (None, getattr(StageConfig, k))]
    again = {m for m, src in init_rule(row).items() if src != "fresh" and STAGES[src].auto}   # (from a stand-in)
    for key, module in (("init_llm", "language_model"), ("init_vit", "vision_model"), ("tokenizer", "language_model")):
        if getattr(cfg, key, "") and (not from_output or module in again):
            extra.append(f"--{key.replace('_', '-')}={getattr(cfg, key)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = f"torchrun --nproc_per_node {world}" if world > 1 else "torchrun"
    return " ".join([f"{launch} {tool} --stage {row.name}", *extra])


# ==============================================================================================
# distributed set-up and FSDP2 (§5.2)

# How long a rank waits in a collective before the run is aborted. NCCL's default is 10 minutes
# (gloo's 30): ranks legitimately wait longer when rank 0 alone makes a large model's random draws
# (stage_start) before the others receive their first shard, or when one RL rank generates longer
# rollouts than the others between two collectives.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def setup_distributed(group: bool = False):
    """(rank, world_size, device) from torchrun's env; NCCL on CUDA, gloo on CPU. A process group
    exists when world > 1 or `group` (FSDP2 on one process): it is what "sharded" means below."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or group) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        else:                                # --fsdp=true with `python`, not torchrun: a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


def shutdown_distributed():
    """Every rank waits for the others, then tears the process group down: no rank closes its
    connections while another still uses them. The command then ends with exit_process."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int = 0):
    """A command's last step once main() has returned: leave without the interpreter's finalization.
    gloo's worker threads (and autograd's device threads) may still drop the last reference to a
    tensor Python owns; that needs the GIL, and CPython ends a thread that asks for it while the
    interpreter shuts down with pthread_exit, whose unwind through a C++ destructor aborts the
    process ("terminate called without an active exception", SIGABRT) after the run finished and
    wrote its files, so torchrun reports a failed run (pytorch/pytorch#190489). Every file a run
    writes is closed by then; what it printed is flushed here. Not part of main(): tests call
    main() in their own process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_command(main):
    """A command line's entry: main(), then exit_process with its status, a SystemExit's (fail's
    one-line errors) included, so that an error's status is not lost to the same abort either."""
    try:
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            exit_process(e.code or 0)
        print(e.code, file=sys.stderr)
        exit_process(1)
    exit_process(0)


def print0(rank, *a, **k):
    if rank == 0:
        print(*a, **k, flush=True)


# ==============================================================================================
# model initialisation for a stage: its init rule (--init_modules changes it), then --init-from / --init-vit / --init-llm

def module_overrides(spec: str) -> dict:
    """--init_modules "mlp1:vit3,vision_model:vit2" -> {module: stage name | "fresh"}."""
    pairs = [[part.strip() for part in item.split(":", 1)] for item in spec.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise UsageError(f"--init_modules: write module:stage pairs (mlp1:vit3,vision_model:fresh), got {spec!r}")
    if any(not m for m, _ in pairs):
        raise UsageError(f"--init_modules: a pair without its module in {spec!r}")
    modules_of(",".join(m for m, _ in pairs))
    if len(dict(pairs)) < len(pairs):
        raise UsageError(f"--init_modules: a module named twice in {spec!r}")
    for _, src in pairs:
        if src != "fresh":
            stage_row(src, (*STAGES, "fresh"))
    return dict(pairs)


def check_init_options(cfg: StageConfig):
    """--init_modules with --init_from (which replaces the rule it changes) and bad pairs, refused;
    so is a folder option (--init-from, --init-llm, --init-vit, --tokenizer, --image_root) that names no folder,
    and a --tokenizer folder without one."""
    if cfg.init_modules and cfg.init_from:
        raise UsageError("--init_modules changes the stage's init rule, which --init_from replaces: give one of them")
    module_overrides(cfg.init_modules)
    for key in ("init_from", "init_llm", "init_vit", "tokenizer", "image_root"):
        path = getattr(cfg, key)
        if path and path != "random" and not os.path.isdir(path):
            raise UsageError(f"--{key.replace('_', '-')}: {path} is not a folder")
    if cfg.tokenizer and not data.has_tokenizer(cfg.tokenizer):
        raise UsageError(f"--tokenizer: {cfg.tokenizer} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt)")


def module_sources(cfg: StageConfig) -> dict:
    """{module: stage name | "fresh"} of the stage's init rule, with --init_modules' changes. A stand-in
    stage (lm0, standing in for Qwen3's own pre-training) gives way to --init-llm: the modules it would
    supply start fresh (it trains neither ViT nor adapter) and it is not run."""
    rule = {**init_rule(stage_row(cfg.stage)), **module_overrides(cfg.init_modules)}
    return {m: "fresh" if src != "fresh" and cfg.init_llm and STAGES[src].auto else src for m, src in rule.items()}


def init_sources(cfg: StageConfig) -> dict:
    """{module: a checkpoint folder | "fresh"}: --init-from overrides the stage's init rule."""
    if cfg.init_from == "random":
        return {m: "fresh" for m in MODULES}
    if cfg.init_from:
        return {m: cfg.init_from for m in MODULES}
    return {m: src if src == "fresh" else stage_dir(cfg, src) for m, src in module_sources(cfg).items()}


def missing_sources(cfg: StageConfig) -> list:
    """Stages whose output this stage starts from but which are not there (their names)."""
    if cfg.init_from:
        return []
    return sorted({s for m, s in module_sources(cfg).items() if s != "fresh"
                   and not (m == "language_model" and cfg.init_llm) and not (m == "vision_model" and cfg.init_vit)
                   and not modeling.is_finished_stage(stage_dir(cfg, s))})


def tokenizer_source(cfg: StageConfig) -> Optional[str]:
    """The folder whose tokenizer the stage reads (None: the embedded byte-level default). Token ids
    belong to the language model's embedding, so the tokenizer travels with its weights:
      1. --tokenizer DIR, when given (checked against the weights' own in match_tokenizer);
      2. --init-llm's folder (an error when it has none: never a silent fallback);
      3. the checkpoint the language model starts from (--init-from, or the stage's init rule); one
         without tokenizer files was trained on the embedded default (every stage copies its tokenizer);
      4. a random start: the synthetic data's BPE when training on it, else the embedded default."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.init_llm:
        if not data.has_tokenizer(cfg.init_llm):
            raise UsageError(f"--init-llm {cfg.init_llm} has no tokenizer (tokenizer.json, or vocab.json + merges.txt): "
                             "pass the one its weights were trained with as --tokenizer=DIR")
        return cfg.init_llm
    src = init_sources(cfg)["language_model"]
    if src != "fresh":
        return src if data.has_tokenizer(src) else None
    return cfg.data_dir if not cfg.manifests and data.has_tokenizer(cfg.data_dir) else None


def tokenizer_dir(cfg: StageConfig, log=None) -> Optional[str]:
    """`tokenizer_source`, ready to read: a folder without SAIL-VL2's image tokens (a Qwen3 folder) is
    copied once, with them added at the official ids (data.add_image_tokens), to
    out/tokenizers/NAME-HASH/, and that copy is used and saved with every checkpoint."""
    src = tokenizer_source(cfg)
    added = data.missing_sail_tokens(src) if src is not None else {}
    if not added:
        return src
    out = os.path.join(cfg.out_dir, "tokenizers", f"{os.path.basename(os.path.abspath(src))}-{tokenizer_digest(src)[:10]}")
    if not os.path.isdir(out) or data.missing_sail_tokens(out):
        try:
            data.add_image_tokens(src, out)                   # the same bytes on every rank: no race
        except ValueError as e:
            raise UsageError(str(e)) from None
    (log or (lambda *a: print0(int(os.environ.get("RANK", "0")), *a)))(
        f"tokenizer: {src} lacks SAIL-VL2's image tokens: added {', '.join(f'{t} {i}' for t, i in added.items())} "
        f"(the official ids) in {out} (what `python data.py add-image-tokens` does)")
    return out


def tokenizer_digest(folder: Optional[str]) -> str:
    """sha256 of the tokenizer files in `folder` (none: the embedded default's, of nothing)."""
    digest = hashlib.sha256()
    for path in tokenizer_files(folder).values():
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def tokenizer_files(folder: Optional[str]) -> dict:
    """{name: path} of the tokenizer files in `folder`, to copy into every checkpoint."""
    return {n: os.path.join(folder, n) for n in data.TOKENIZER_FILES
            if folder and os.path.exists(os.path.join(folder, n))}


def same_tokens(tok, ref) -> bool:
    """Whether `tok` encodes as `ref` does: the same BPE, split regex and every added token of `ref`
    at the same id (`tok` may add more, e.g. SAIL-VL2's image tokens)."""
    return (tok._pat_str == ref._pat_str and tok._mergeable_ranks == ref._mergeable_ranks
            and all(tok._special_tokens.get(t) == i for t, i in ref._special_tokens.items()))


def match_tokenizer(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, tok, log) -> modeling.SAILVLConfig:
    """The stage's model config (stage_model_config) checked against its tokenizer; a mismatch is one
    UsageError, never a log line: SAIL-VL2's tokens must be there, every id inside the embedding,
    --tokenizer must encode as the tokenizer the language model's weights came with, and a model
    started from a checkpoint keeps the <IMG_CONTEXT> id it was trained with. A model whose config
    is not a checkpoint's (random weights, or HF folders) takes <IMG_CONTEXT>'s id from the tokenizer."""
    model_cfg = stage_model_config(cfg, model_cfg)
    try:
        ids = data.special_ids(tok)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rows = model_cfg.llm_config.vocab_size
    if tok.n_vocab > rows:
        raise UsageError(f"the tokenizer ({tok.name}) has ids up to {tok.n_vocab - 1}, but the language model's "
                         f"embedding has {rows} rows: pass the tokenizer its weights were trained with (--tokenizer)")
    own = cfg.init_llm or init_sources(cfg)["language_model"]
    if cfg.tokenizer and own != "fresh" and data.has_tokenizer(own) \
            and not same_tokens(tok, data.load_tokenizer(own)):
        raise UsageError(f"--tokenizer {cfg.tokenizer} does not encode as the tokenizer of {own}, which the language "
                         "model's weights come with: drop --tokenizer, or pass a tokenizer that encodes the same")
    if ids.img_context == model_cfg.img_context_token_id:
        return model_cfg
    trained = sorted({s for s in init_sources(cfg).values() if s != "fresh"})
    if trained:
        raise UsageError(f"the tokenizer's <IMG_CONTEXT> is token {ids.img_context}, but {trained[0]} was trained with "
                         f"{model_cfg.img_context_token_id}: use that checkpoint's tokenizer (drop --tokenizer and "
                         "--model.img_context_token_id)")
    if any(o.startswith("img_context_token_id=") for o in cfg.model_options):
        raise UsageError(f"--model.img_context_token_id={model_cfg.img_context_token_id}, but <IMG_CONTEXT> is token "
                         f"{ids.img_context} in the stage's tokenizer: drop the option (the id is the tokenizer's)")
    log(f"init: <IMG_CONTEXT> is token {ids.img_context} in this tokenizer (the preset says "
        f"{model_cfg.img_context_token_id}): the model, not loaded from a checkpoint, uses the tokenizer's id")
    return dataclasses.replace(model_cfg, img_context_token_id=ids.img_context)


# The model config of a stage, and every --preset / --model.* option either applied or refused

def apply_model_options(base: modeling.SAILVLConfig, options: tuple, source: str, keep: tuple = ()) -> modeling.SAILVLConfig:
    """`base` (a loaded config) with the user's options applied in order: "preset=NAME" (the preset's
    settings where they differ, but for the configs in `keep`, which folders supply) or "KEY=VALUE" (a
    --model.KEY). An option that would change the shape of a weight loaded from `source` is refused:
    it cannot load. Any other (AnyRes, tiling, RoPE θ, the system prompt ...) is a valid fine-tuning
    switch on the same weights, and applies."""
    if not options:
        return base
    cfg, shapes = copy.deepcopy(base), modeling.param_shapes(base)
    for option in options:
        key, _, value = option.partition("=")
        trial = copy.deepcopy(cfg)
        if key == "preset":                  # <IMG_CONTEXT>'s id is the tokenizer's, not a preset setting
            for name, v in modeling.config_leaves(modeling.preset_config(value)):
                if getattr_path(trial, name) != v and not name.startswith(keep + ("img_context_token_id",)):
                    head, _, leaf = name.rpartition(".")
                    setattr(getattr_path(trial, head) if head else trial, leaf, copy.deepcopy(v))
        else:
            set_key({"": trial}, key, value)
        new = modeling.param_shapes(trial)
        diff = next((k for k in {**shapes, **new} if new.get(k) != shapes.get(k)), None)
        if diff:
            flag = f"--preset={value}" if key == "preset" else f"--model.{option}"
            shape = lambda sd: sd.get(diff, "no such weight")     # noqa: E731   (an MoE preset drops the MLPs)
            raise UsageError(f"{flag} changes the shape of weights loaded from {source} ({diff}: {shape(shapes)} -> "
                             f"{shape(new)}), so it cannot apply; shapes come from what the stage loads (presets and "
                             "shape options shape random weights: --init-from=random)")
        cfg = trial
    return cfg


def stage_model_config(cfg: StageConfig, model_cfg: modeling.SAILVLConfig) -> modeling.SAILVLConfig:
    """The config of the model a stage builds. From random weights: `model_cfg` (the preset and the
    --model.* options). From a checkpoint: its config.json (the shapes of its weights and the settings
    it was trained with). --init-llm / --init-vit replace llm_config / vision_config by their folders'
    config.json (Qwen3 / AIMv2: no shape options needed); the adapter follows both. The --preset /
    --model.* options given (cfg.model_options) then apply on top, or are refused with the reason."""
    sources = init_sources(cfg)
    folders = sorted({s for s in sources.values() if s != "fresh" and os.path.isfile(os.path.join(s, "config.json"))})
    if cfg.init_from and cfg.init_from != "random" and not folders:
        raise UsageError(f"--init-from {cfg.init_from} has no config.json: a SAIL-VL2 checkpoint folder (config.json "
                         "+ safetensors) is expected; HF Qwen3 / AIMv2 folders go in --init-llm / --init-vit")
    if not folders and not cfg.init_llm and not cfg.init_vit:
        return model_cfg
    try:
        base = modeling.read_config(folders[0]) if folders \
            else model_cfg
        if cfg.init_llm:
            base = dataclasses.replace(base, llm_config=modeling.read_llm_config(cfg.init_llm))
        if cfg.init_vit:
            base = dataclasses.replace(base, vision_config=modeling.vit.read_vit_config(cfg.init_vit))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the model config: {e}") from None
    source = " + ".join(folders[:1] + [f"--init-llm {cfg.init_llm}"] * bool(cfg.init_llm)
                        + [f"--init-vit {cfg.init_vit}"] * bool(cfg.init_vit))
    keep = ("llm_config.",) * bool(cfg.init_llm) + ("vision_config.",) * bool(cfg.init_vit)
    return apply_model_options(base, cfg.model_options, source, keep)


def whole_checkpoint(cfg: StageConfig, model_cfg: modeling.SAILVLConfig) -> Optional[str]:
    """The checkpoint folder that gives every weight of the stage's model (every module, no
    --init-llm / --init-vit on top: RL, the SFT phases, --init-from), else None. Its config with the
    --model.* options applied (stage_model_config) has the same shapes, so its files load as they are."""
    stage_model_config(cfg, model_cfg)                   # (its checks first: a folder without config.json)
    sources = set(init_sources(cfg).values())
    if len(sources) != 1 or sources == {"fresh"} or cfg.init_llm or cfg.init_vit:
        return None
    return sources.pop()


@contextlib.contextmanager
def loading_weights():
    """A checkpoint whose tensors do not fit the stage's model (missing, unexpected or misshaped, a
    head that would be lost: load_state_dict_strict, checkpoint_tensors) is one line, not a traceback."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None


def config_origin(folder: str, model_cfg: modeling.SAILVLConfig) -> str:
    """How the model config of a stage loaded whole from `folder` came about, for its init line."""
    return "with its model config" if modeling.read_config(folder) == model_cfg else \
        "with its model config and the --preset / --model.* options given (same shapes)"


@loading_weights()
def build_stage_model(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, log, device="cpu",
                      matrices_dtype=None) -> modeling.SAILVL:
    """The model of `stage_model_config`, made on `device`, its LLM's matrices in `matrices_dtype` when
    given (hold_matrices_in): the checkpoint's own model when one checkpoint gives every module in that
    config (SAILVL.from_pretrained), else each module from its source's files or from the model's own
    initialisation (stage_start). Its tensors are filled one at a time, straight from the memory-mapped
    files or made alone (model.remade): no second model on the host beside it."""
    own = whole_checkpoint(cfg, model_cfg)
    model_cfg = stage_model_config(cfg, model_cfg)
    if own:                                                # the checkpoint's model itself: no random one beside
        model = modeling.SAILVL.from_pretrained(own, device=device, matrices_dtype=matrices_dtype, cfg=model_cfg)
        log(f"init: all weights from {own}, {config_origin(own, model_cfg)}")
        return model
    start = start_tensors(*stage_start(cfg, model_cfg, log))
    model = modeling.empty_model(model_cfg, device, matrices_dtype=matrices_dtype)
    lm = model.language_model
    if lm.lm_head.weight is not lm.model.embed_tokens.weight:        # a tied head held apart: its own copy
        start.setdefault("language_model.lm_head.weight", start["language_model.model.embed_tokens.weight"])
    modeling.fill_weights(model, start, "the stage's starting weights")
    return model


def stage_start(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, log) -> tuple:
    """(the model on the meta device, each tensor no file gives to be made when it is needed, alone
    (model.remade); {module: its tensors, named within it, memory-mapped from its source's files}) for a
    stage that does not start from one checkpoint's whole model. A module comes from its source (a
    stage's output; --init-vit's AIMv2 / SAIL-ViT folder, --init-llm's Qwen3 folder over it), else
    from the model's own initialisation, as a whole random build gives it, and re-initialised
    (reinit_module, seed + 1) when the stage's rule starts it fresh beside modules from checkpoints
    (model.initialised: nothing is made there, only the draws). Each
    module's tensors are checked against it here (one line naming the module and its source)."""
    sources = init_sources(cfg)
    folders = sorted({s for s in sources.values() if s != "fresh"})
    whole = len(folders) == 1 and all(s == folders[0] for s in sources.values())
    over = {m: path for m, path in (("vision_model", cfg.init_vit), ("language_model", cfg.init_llm)) if path}
    reinit = [m for m, src in sources.items() if src == "fresh"] if folders and not whole else []
    model = modeling.initialised(model_cfg, cfg.seed, cfg.seed + 1, reinit)
    tensors = {}

    def read(name: str, sd: dict, what: str):
        modeling.vit.loadable(getattr(model, name), sd, what)                # (shapes on the meta device)
        tensors[name] = sd
    for name, src in sources.items():
        if src != "fresh" and name not in over:
            read(name, modeling.checkpoint_tensors(src, model, name), f"{name} from {src}")
    if cfg.init_vit:
        read("vision_model", modeling.vit.vit_tensors(cfg.init_vit), f"ViT weights from {cfg.init_vit}")
    if cfg.init_llm:
        read("language_model", modeling.llm_tensors(cfg.init_llm, model_cfg.llm_config), f"Qwen3 weights from {cfg.init_llm}")
    log_start(cfg, model_cfg, sources, folders, whole, over, log)
    return model, tensors


def log_start(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, sources: dict, folders: list, whole: bool,
              over: dict, log):
    """The init lines: where each module of the stage's model comes from (`over`: the modules
    --init-vit / --init-llm give, in place of their source by the stage's rule)."""
    if not folders:
        fresh = [m for m in MODULES if m not in over]
        log("init: random weights (the stage starts from scratch)" if len(fresh) == len(MODULES) else
            f"init: {', '.join(fresh)} from random weights")
    elif whole and not over:
        log(f"init: all weights from {folders[0]}, {config_origin(folders[0], model_cfg)}")
    else:
        for name, src in sources.items():
            if name not in over:
                log(f"init: {name} freshly initialised (random), as the stage starts it" if src == "fresh" else
                    f"init: {name} from {src}")
    if cfg.init_vit:
        v = model_cfg.vision_config
        log(f"init: vision encoder from {cfg.init_vit} ({v.num_hidden_layers} layers, hidden {v.hidden_size}, "
            f"{v.image_size}-px tiles, from its config.json)")
    if cfg.init_llm:
        c = model_cfg.llm_config
        log(f"init: language model from {cfg.init_llm} ({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"vocab {c.vocab_size}{f', {c.num_experts} experts' if c.num_experts else ''}, from its config.json)")


def start_tensors(model: modeling.SAILVL, tensors: dict) -> dict:
    """stage_start's answer as one {name: tensor} of the whole model: the files' tensors, and the
    other modules' own, on the meta device, still to be made (a tied head once, as the embedding)."""
    out, seen = {}, set()
    for name in MODULES:
        for k, v in (tensors[name] if name in tensors else getattr(model, name).state_dict(keep_vars=True)).items():
            if id(v) not in seen:
                out[f"{name}.{k}"] = v
                seen.add(id(v))
    return out


# ==============================================================================================
# data -> packing, once per step (§3.2.2, §5.1)

class StageBatches:
    """This rank's packed micro-batches, one optimizer step at a time: packing.PackLoader over the
    stage's mixture (every rank plans the same global stream from metadata; each decodes only its
    own packs' samples, in loader workers). What a step's planning read and what failed to decode
    on any rank go into the mixture's bad-sample ledger on every rank alike, when that step is
    trained, so counts, reports and the saved position never depend on what was read ahead."""

    def __init__(self, mixture: data.Mixture, pcfg: packing.PackingConfig, rank: int, world: int,
                 hidden_size: int, num_workers: int = 0, prefetch_factor: int = 2):
        self.mixture = mixture
        self.loader = packing.PackLoader(mixture, pcfg, rank, world, hidden_size, num_workers, prefetch_factor,
                                         bad_errors=(data.DataError,))

    def next(self) -> list:
        packs = self.loader.next()
        self.mixture.record(self.loader.found)
        for k, err in (d for theirs in modeling.all_gather(self.loader.dropped) for d in theirs):   # every rank's, on every rank
            self.mixture.record_decode_failure(k, err)
        return packs

    def overlong(self) -> dict:
        """The packer's over-long samples (> --packing.max_tokens) up to the last trained step: cut
        (text), skipped (with images: --packing.overlong=truncate) or packed alone (own_pack)."""
        stats = self.loader.position["packer"]["stats"]
        return {"truncated": stats["truncated"], "skipped": stats["skipped_overlong"], "own_pack": stats["own_pack"]}

    def state_dict(self) -> dict:
        pos = self.loader.state_dict()
        return {"data": self.mixture.state_dict(pos["cursor"]), "packer": pos["packer"], "steps": pos["steps"]}

    def load_state_dict(self, state: dict):
        self.mixture.load_state_dict(state["data"])
        self.loader.load_state_dict(dict(cursor=self.mixture.cursor(), packer=state["packer"], steps=state["steps"]))


EVAL_SEED = 1338     # the held-out stream's order, fixed: every model (a stage, its seed twin, the soup) is
                     # scored on the same held-out samples in the same packs, whatever its training seed


def build_batches(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, tok, split: str, rank: int, world: int,
                  verbose: bool = True) -> StageBatches:
    """The stage's mixture (train or held-out split) read through the packer. A sample longer than a
    pack but within the model's context is the packer's to handle (--packing.overlong); only one
    beyond the context is bad data."""
    dcfg = data.DataConfig.from_model(model_cfg, label_mode=cfg.label_mode,
                                      max_bad_fraction=cfg.max_bad_fraction, drop_media=cfg.text_only,
                                      image_root=cfg.image_root)
    train = split == "train"
    mixture = data.Mixture(stage_sources(cfg, split), tok, dcfg, seed=cfg.seed if train else EVAL_SEED,
                           training=train, ngram_rebalance=cfg.ngram_rebalance and train, verbose=verbose and rank == 0)
    return StageBatches(mixture, cfg.packing, rank, world, model_cfg.llm_config.hidden_size, cfg.num_workers,
                        cfg.prefetch_factor)


def to_device(pack: dict, device) -> dict:
    """The pack on `device`, its cu_seqlens checked first (on the host: packed_attention checks only
    CPU ones, as reading a CUDA tensor's values in every layer would wait for the GPU each time)."""
    kernels.check_cu_seqlens(pack["cu_seqlens"], pack["input_ids"].shape[1])
    moved = {k: pack[k].to(device) for k in ("input_ids", "labels", "position_ids", "cu_seqlens")}
    return {**pack, **moved, "pixel_values": modeling.on_device(pack.get("pixel_values"), device)}


def forward_pack(model, pack) -> modeling.Output:
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
    return int(modeling.all_reduce([n], device)[0])


def step_loss(out: modeling.Output, n_global: int, n_micro: int, world: int, aux_coef: float):
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
        del out                          # nothing of this micro-batch (router logits) lives into the next one
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    ce_tot, useful_tot = modeling.all_reduce([ce_sum, useful], device)
    loss = ce_tot / max(n_global, 1)
    skipped = not (math.isfinite(loss) and math.isfinite(gnorm))
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    res = {"loss": loss, "grad_norm": gnorm, "tokens": useful_tot, "skipped": skipped}
    if loads:
        res.update(moe_entropy=sum(x["mean_entropy"] for x in loads) / len(loads),     # this rank's packs
                   moe_max_load=sum(x["max_over_mean"] for x in loads) / len(loads),
                   moe_aux=modeling.all_reduce([aux], device)[0])     # the ranks' shares add up to the loss
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
    ce, n = modeling.all_reduce([ce, n], device)
    model.train(was_training)
    return ce / max(n, 1)


# ==============================================================================================
# what a step line reports besides the loss: tokens/s per device, MFU, peak memory, data wait

def peak_memory_gib(device) -> float:
    """CUDA: the most memory tensors held at once on this device (max allocated); CPU: the
    process's peak resident set (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def step_report(step: int, cfg: StageConfig, res: dict, lr: float, seconds: dict, world: int, device) -> tuple:
    """(metrics.jsonl record, log line) of one step. `seconds`: "step" (the whole step), "data"
    (waiting for this rank's packs) and, on a GPU of known peak, "ideal" (the step's model FLOPs on
    all ranks / one device's peak FLOP/s: MFU = ideal / (step x world))."""
    dt = max(seconds["step"], 1e-9)
    capacity = cfg.packing.max_tokens * cfg.packing.micro_batches * world
    rec = {"step": step, "loss": res["loss"], "lr": lr, "grad_norm": res["grad_norm"],
           "tok_per_s": res["tokens"] / dt, "pad_frac": 1 - res["tokens"] / capacity,
           "tok_per_s_per_device": res["tokens"] / dt / world, "peak_mem_gib": peak_memory_gib(device),
           "data_wait_frac": seconds["data"] / dt}
    line = (f"step {step:05d}/{cfg.steps:05d} | loss {res['loss']:.4f} | lr {lr:.2e} | gnorm "
            f"{res['grad_norm']:.3f} | tok/s {rec['tok_per_s']:,.0f} | pad {100 * rec['pad_frac']:.1f}% | "
            f"tok/s/dev {rec['tok_per_s_per_device']:,.0f}")
    if "ideal" in seconds:
        rec["mfu"] = seconds["ideal"] / (dt * world)
        line += f" | mfu {100 * rec['mfu']:.1f}%"
    line += f" | mem {rec['peak_mem_gib']:.2f} GiB | data {100 * rec['data_wait_frac']:.0f}%"
    if "moe_entropy" in res:
        rec.update({k: res[k] for k in ("moe_entropy", "moe_max_load", "moe_aux")})
        line += f" | moe_ent {res['moe_entropy']:.3f} max/mean {res['moe_max_load']:.2f}"
    return rec, line


# ==============================================================================================
# the training loop

def place_model(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, rank: int, world: int, device, log,
                resume: Optional[str] = None) -> tuple:
    """(model, its config) on the device, frozen but for the stage's modules; sharded with FSDP2
    when world > 1 or --fsdp (torchtitan's recipe: build on the meta device, shard, allocate only this rank's
    shards, then fill them a tensor at a time from rank 0: from one checkpoint, its whole model read
    from its files (model.load_sharded_weights); from several sources or random weights, each module
    from its files, the tensors no file gives made one at a time on rank 0's host, as a whole build
    makes them (stage_start, model.remade, model.scatter_weights)). A run that resumes reads no starting
    weights: its step checkpoint gives every one (resume_from, resume_rl), so they are left unset here."""
    trainable = modules_of(cfg.trainable)
    if resume:
        log(f"init: no starting weights read: the step checkpoint {resume} gives them all")
    if not dist.is_initialized():
        model = modeling.empty_model(stage_model_config(cfg, model_cfg), device) if resume else \
            build_stage_model(cfg, model_cfg, log, device)           # made on the device, a tensor at a time
        modeling.freeze(model, trainable)
        modeling.set_activation_checkpointing(model, cfg.ac == "block")
    else:
        folder = None if resume else whole_checkpoint(cfg, model_cfg)   # read a tensor at a time into the shards
        box = [stage_model_config(cfg, model_cfg) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)             # rank 0's reading of the sources' configs
        with torch.device("meta"):
            model = modeling.SAILVL(box[0])
        modeling.freeze(model, trainable)
        modeling.set_activation_checkpointing(model, cfg.ac == "block")
        modeling.parallelize(model, device, mixed_precision=device.type == "cuda")
        model.to_empty(device=device)
        if folder is not None:
            with loading_weights():
                modeling.load_sharded_weights(model, folder, rank, device)
            log(f"init: all weights from {folder}, {config_origin(folder, model.cfg)}")
        elif not resume:                                   # rank 0 makes the tensors no file gives, one at a time
            with loading_weights():
                modeling.scatter_weights(model, lambda: start_tensors(*stage_start(cfg, box[0], log)), rank, device,
                                         "the stage's sources", "the stage's starting weights")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {modeling.count_params(model) / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable ({', '.join(trainable)})")
    return model, model.cfg


def changed_options(saved: dict, now: dict, prefix: str = "") -> list:
    """["key old -> new"] for the options (nested ones as a.b) whose values differ."""
    out = []
    for key, value in now.items():
        old = saved.get(key, value)
        if isinstance(value, dict) and isinstance(old, dict):
            out += changed_options(old, value, f"{prefix}{key}.")
        elif old != value and not (isinstance(old, list) and tuple(old) == tuple(value or ())):
            out.append(f"{prefix}{key} {old!r} -> {value!r}")
    return out


def resume_from(path: str, cfg: StageConfig, model, opt, batches: StageBatches, search: Optional[AdaLRS],
                rank: int, world: int, log) -> tuple:
    """Weights, optimizer state, data position, AdaLRS and the RNGs from a step checkpoint;
    returns (its step, its progress: the stage's first loss, the non-finite steps in a row). Options changed since the checkpoint's run are
    logged (the run goes on with them); one that breaks the saved state is refused."""
    meta, rank_state = modeling.load_checkpoint(path, model, opt, rank, world)
    if meta["step"] > cfg.steps:
        raise UsageError(f"{path} is at step {meta['step']}, past this run's {cfg.steps} steps: resume with "
                         f"--steps of at least {meta['step']} (or --step_scale to match), or start the stage afresh")
    set_optimizer_options(opt, cfg)                     # the loaded state carries the saving run's options
    if changed := changed_options(meta.get("config", {}), asdict(cfg)):
        log(f"resume: options changed since {path} was saved, continuing with the new values: {', '.join(changed)}")
    if (search is None) != (meta.get("adalrs") is None):
        was = "with" if meta.get("adalrs") is not None else "without"
        raise UsageError(f"{path} was saved {was} AdaLRS: resume with --adalrs={str(was == 'with').lower()} "
                         f"(its LR scale is part of the run's state)")
    try:
        batches.load_state_dict(meta["loader"])
        if search is not None:
            search.load_state_dict(meta["adalrs"], snapshot=rank_state.get("adalrs_snapshot"))
    except ValueError as e:
        raise UsageError(f"cannot resume from {path}: {e}") from None
    modeling.set_rng_state(rank_state["rng"])
    log(f"resume: continuing from {path} at step {meta['step']}")
    return meta["step"], {"first_loss": meta.get("first_loss"), "bad_in_a_row": meta.get("bad_in_a_row", 0),
                          "seconds": meta.get("seconds", 0.0)}


def build_optimizer(cfg: StageConfig, params: list, cuda: bool):
    """AdamW; weight decay on matrices only."""
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}],
                            lr=cfg.lr, fused=False, foreach=not cuda or None)
    set_optimizer_options(opt, cfg)
    return opt


def set_optimizer_options(opt, cfg: StageConfig):
    """The run's AdamW options on build_optimizer's two groups: the matrices decayed, the rest not."""
    for group, decay in zip(opt.param_groups, (cfg.weight_decay, 0.0)):
        group.update(weight_decay=decay, betas=(cfg.beta1, cfg.beta2))


def clear_earlier_run(cfg: StageConfig, log):
    """A fresh start removes the step checkpoints an earlier run left in its run folder: kept, they
    would outrank this run's (pruned as soon as written) and a later --resume would pick them. A
    finished output of the stage is replaced when this run ends: said now (a 3-step trial replaces
    a 200-step stage)."""
    if modeling.is_finished_stage(out := stage_dir(cfg)):
        step = modeling.verify_checkpoint(out).get("step")
        log(f"note: {out} holds an earlier {cfg.stage} output (step {step}); this run replaces it when it ends")
    rdir = run_dir(cfg)
    if old := modeling.step_checkpoints(rdir):
        log(f"a fresh start: removing {len(old)} step checkpoint(s) of an earlier run in {rdir} "
            f"(newest {os.path.basename(old[-1])}; --resume continues such a run)")
        for path in old:
            shutil.rmtree(path)


def open_metrics(path: str, keep_up_to: int, key: str = "step"):
    """metrics.jsonl for appending, keeping the records of the steps (RL: `key` "episode") a resumed
    run keeps (rewritten atomically; a last line a crash cut short is dropped)."""
    kept = []
    if keep_up_to and os.path.exists(path):
        with open(path) as f:
            for ln in f:
                try:
                    if json.loads(ln).get(key, 0) <= keep_up_to:
                        kept.append(ln)
                except json.JSONDecodeError:
                    pass
    data.write_atomic(path, "".join(kept))
    return open(path, "a")


# the start-up line names these; <out>/<stage>.run/config.json holds every option
SUMMARY_KEYS = ("init_from", "trainable", "steps", "lr", "schedule", "packing.max_tokens", "adalrs", "seed", "ac")


def log_config(cfg, model_cfg, rdir: str, rank: int, log, keys=SUMMARY_KEYS):
    """One short line of the settings a reader checks first, and every option (the stage's and the
    model's) written to <run dir>/config.json."""
    path = os.path.join(rdir, "config.json")
    if rank == 0:
        os.makedirs(rdir, exist_ok=True)
        data.write_json(path, {"config": asdict(cfg), "model": model_cfg.to_dict()})
    leaves = dict(modeling.config_leaves(cfg))
    log(f"config: {cfg.stage} | " + " | ".join(f"{k} {leaves[k] or '-'}" for k in keys if k in leaves)
        + f" | every option: {path}")


def start_stage(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, rank: int, log) -> tuple:
    """Seed every RNG, generate the synthetic data on first use (rank 0; unless --manifests) and read
    the stage's tokenizer; returns (tokenizer, its files, the model config checked against it)."""
    modeling.seed_all(cfg.seed)
    if not cfg.manifests:
        if rank == 0:
            data.ensure_synth(cfg.data_dir)
        modeling.barrier()
    tok_dir = tokenizer_dir(cfg, log)
    tok, tok_files = data.load_tokenizer(tok_dir), tokenizer_files(tok_dir)   # the files travel with every checkpoint
    return tok, tok_files, match_tokenizer(cfg, model_cfg, tok, log)


def write_metrics(metrics, rec: dict):
    """One record of metrics.jsonl (rank 0 holds the file; other ranks pass None)."""
    if metrics:
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()


def save_step_checkpoint(cfg: StageConfig, step: int, model, opt, batches: StageBatches, search: Optional[AdaLRS],
                         progress: dict, rank: int, world: int, tok_files: dict, model_cfg: modeling.SAILVLConfig):
    """A resumable step checkpoint out/<stage>.run/step-NNNNNN/ (weights, optimizer, data position,
    AdaLRS, every RNG, `progress`: the first loss, the non-finite steps in a row, the stage's seconds), then only the
    newest --keep_checkpoints kept."""
    rdir = run_dir(cfg)
    meta = {"stage": cfg.stage, "step": step, "config": asdict(cfg), "loader": batches.state_dict(),
            "adalrs": search.state_dict() if search else None, **progress}
    rank_state = {"rng": modeling.rng_state(), "adalrs_snapshot": search.snapshot_state_dict() if search else None}
    modeling.save_checkpoint(os.path.join(rdir, f"step-{step:06d}"), model, meta, rank, world, rank_state,
                             extra_files=tok_files, model_cfg=model_cfg, opt=opt)
    if rank == 0:
        modeling.prune_checkpoints(rdir, cfg.keep_checkpoints, step)


def save_stage_output(cfg: StageConfig, step: int, model, batches: StageBatches, search: Optional[AdaLRS],
                      losses: dict, rank: int, world: int, files: dict, model_cfg: modeling.SAILVLConfig, log) -> str:
    """The stage output out/<stage>/: the weights, meta.json (`losses`: first, final and held-out;
    AdaLRS; the bad-data counts) and `files` (metrics.jsonl, the tokenizer); returns its folder."""
    bad, overlong = batches.mixture.bad, batches.overlong()
    log(f"data: {bad.report()}; over-long samples: " + ", ".join(f"{k} {n}" for k, n in overlong.items()))
    meta = {"stage": cfg.stage, "step": step, "config": asdict(cfg), **losses,
            "adalrs": search.state_dict() if search else None,
            "bad_data": {"seen": bad.seen, "counts": dict(bad.counts), "overlong": overlong}}
    modeling.save_checkpoint(stage_dir(cfg), model, meta, rank, world, model_cfg=model_cfg, extra_files=files)
    return stage_dir(cfg)


def skipped_step(cfg: StageConfig, res: dict, step: int, bad_in_a_row: int, log):
    """Report an update skipped for a non-finite loss or gradient; stop the run at --max_bad_steps in a row."""
    log(f"step {step:05d}/{cfg.steps:05d} | non-finite loss {res['loss']} or grad norm {res['grad_norm']}: "
        f"update skipped ({bad_in_a_row} in a row, the run stops at {cfg.max_bad_steps})")
    if bad_in_a_row >= cfg.max_bad_steps:
        raise FloatingPointError(f"{cfg.stage}: {bad_in_a_row} non-finite losses in a row at step {step}; "
                                 f"lower --lr or check the data (the last checkpoint is in {run_dir(cfg)})")


def check_held_out_data(cfg: StageConfig, log):
    """Your own data (--manifests) without --eval_manifests is evaluated on the stage's synthetic
    families: said here, and where --data_dir lacks them refused now, not at step 0's evaluation. A
    held-out file that is also a training file is said too: its loss is not a held-out one."""
    if cfg.eval_every and cfg.manifests and not cfg.eval_manifests:
        splits = stage_sources(cfg, "eval")
        log(f"note: the held-out loss is measured on the stage's synthetic families ({len(splits)} eval splits "
            f"in {cfg.data_dir}), not on --manifests' data: --eval_manifests=FILE measures your own")
    if cfg.eval_every and cfg.manifests and cfg.eval_manifests:
        trained = {os.path.realpath(p) for p, _ in stage_sources(cfg, "train")}
        if both := [p for p, _ in stage_sources(cfg, "eval") if os.path.realpath(p) in trained]:
            log(f"note: {', '.join(both)} is in --manifests and --eval_manifests: its held-out loss is measured "
                "on training samples (and a bad line in it is reported by both readers)")


def train(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, resume: Optional[str] = None) -> str:
    """Run one stage; returns its output folder out/<stage>/."""
    rank, world, device = setup_distributed(cfg.fsdp)
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    resume = modeling.all_gather(resume)[0]      # rank 0's choice: nodes may list the run folder differently
    tok, tok_files, model_cfg = start_stage(cfg, model_cfg, rank, log)
    started = time.time()                        # the stage's time: not the synthetic data's one-off generation
    check_held_out_data(cfg, log)

    model, model_cfg = place_model(cfg, model_cfg, rank, world, device, log, resume)
    cuda = device.type == "cuda"
    autocast = (lambda: modeling.autocast(device)) if not dist.is_initialized() else \
        (lambda: torch.autocast("cpu", enabled=False))            # FSDP2's mixed precision casts instead
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params, cuda)
    search = AdaLRS(model, opt, total_steps=cfg.steps, cfg=cfg.adalrs_cfg, log=log, base_lr=cfg.lr) \
        if cfg.adalrs else None
    batches = build_batches(cfg, model_cfg, tok, "train", rank, world)
    reads = itertools.count()    # the held-out stream's bad samples are reported (file:line) at its first read
    eval_batches = lambda: build_batches(cfg, model_cfg, tok, "eval", rank, world, verbose=next(reads) == 0)  # noqa: E731

    step, progress = resume_from(resume, cfg, model, opt, batches, search, rank, world, log) if resume else (0, {})
    first_loss, bad_in_a_row, start = progress.get("first_loss"), progress.get("bad_in_a_row", 0), step
    started -= progress.get("seconds", 0.0)      # the stage's time: the runs before the resume, up to its checkpoint

    rdir = run_dir(cfg)
    if rank == 0 and not resume:
        clear_earlier_run(cfg, log)
    log_config(cfg, model_cfg, rdir, rank, log)
    if cfg.steps < cfg.warmup_steps:             # (a short trial run: its LR is not the one asked for)
        log(f"note: --steps {cfg.steps} is under --warmup_steps {cfg.warmup_steps}: the LR rises to "
            f"{cfg.steps}/{cfg.warmup_steps} of --lr {cfg.lr:g} and never reaches it")
    metrics_path = os.path.join(rdir, "metrics.jsonl")
    metrics = open_metrics(metrics_path, step if resume else 0) if rank == 0 else None
    model.train()
    peak, trainable = modeling.peak_flops(device), modules_of(cfg.trainable)
    weights = modeling.matmul_weights(model) if peak else None
    last_loss = eval_loss = None
    while True:
        last_step = step == cfg.steps
        # -- eval at step 0, every eval_every steps and at the end (not again right after a resume)
        if cfg.eval_every and (step % cfg.eval_every == 0 or last_step) and (step > start or not resume):
            eval_loss = evaluate(model, eval_batches, cfg.eval_packs, device, autocast)
            log(f"eval {step:05d} | held-out loss {eval_loss:.4f}")
            write_metrics(metrics, {"step": step, "eval_loss": eval_loss})
        # -- the stage output at the end; a resumable step checkpoint every save_every steps --
        if last_step:
            if metrics:
                metrics.close()
            losses = {"first_loss": first_loss, "final_loss": last_loss, "eval_loss": eval_loss,
                      "seconds": round(time.time() - started, 1)}
            return save_stage_output(cfg, step, model, batches, search, losses, rank, world,
                                     {"metrics.jsonl": metrics_path, **tok_files}, model_cfg, log)
        if cfg.save_every and step % cfg.save_every == 0 and step > start:
            progress = {"first_loss": first_loss, "bad_in_a_row": bad_in_a_row, "seconds": round(time.time() - started, 1)}
            save_step_checkpoint(cfg, step, model, opt, batches, search, progress, rank, world, tok_files, model_cfg)
        # -- one optimizer step over this rank's micro-batches (global token mean, §5.1) --------
        lr = cfg.lr * lr_multiplier(step, cfg) * (search.lr_scale if search else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        host_packs = batches.next()
        packs = [to_device(p, device) for p in host_packs]
        seconds = {"data": time.time() - t0}
        res = train_step(model, opt, packs, params, cfg.grad_clip, world, device, autocast)
        if device.type == "cuda":            # the optimizer's kernels, launched after train_step's last
            torch.cuda.synchronize(device)   # float(), are this step's time (not the next step's data wait)
        seconds["step"] = time.time() - t0
        step += 1
        if search is not None:      # every step's loss, a skipped one's too (in a trial: a rejection)
            search.observe(res["loss"])
        if res["skipped"]:
            bad_in_a_row += 1
            skipped_step(cfg, res, step, bad_in_a_row, log)
            continue
        bad_in_a_row = 0
        first_loss = res["loss"] if first_loss is None else first_loss
        last_loss = res["loss"]
        # -- one log line per step ----------------------------------------------------------------
        if peak:
            seconds["ideal"] = modeling.all_reduce([modeling.training_flops(model_cfg, weights, host_packs, trainable)],
                                              device)[0] / peak
        rec, line = step_report(step, cfg, res, lr, seconds, world, device)
        log(line)
        write_metrics(metrics, rec)


# ==============================================================================================
# model soup (§4.2.1): average homogeneous checkpoints

def soup(cfg: StageConfig, ckpts: list) -> str:
    """Average the weights of checkpoints with the same architecture (refuses mismatched configs),
    evaluate every input and the soup on the same held-out samples and packs, write out/soup/.
    Memory: the mean, in fp32, on rank 0's host alone (mean_weights); for its evaluation each model
    in turn on the device, its LLM's matrices in the device's compute dtype (evaluation_model)."""
    if len(ckpts) < 2:
        raise UsageError("soup: give at least two checkpoints: --ckpts A B [C ...]")
    started = time.time()
    rank, world, device = setup_distributed()
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    configs = []
    for c in ckpts:
        if not os.path.isfile(os.path.join(c, "config.json")):
            raise UsageError(f"soup: {c} is not a checkpoint folder")
        try:
            configs.append(modeling.read_config(c).to_dict())
        except ValueError as e:                       # not a SAIL-VL2 config, or not JSON
            raise InputError(f"soup: {c}: {e}") from None
    for c, other in zip(ckpts[1:], configs[1:]):
        if other != configs[0]:
            diff = sorted(k for k in set(configs[0]) | set(other) if configs[0].get(k) != other.get(k))
            raise UsageError(f"soup: {c} has a different architecture from {ckpts[0]} (config differs in {diff}); "
                             f"the paper's soup averages homogeneous checkpoints only (§4.2.1)")
    model_cfg = modeling.SAILVLConfig.from_dict(configs[0])
    say_how_the_inputs_were_trained(cfg, ckpts, log)
    with loading_weights():                             # (the other ranks are stopped by torchrun)
        souped = mean_weights(ckpts, model_cfg) if rank == 0 else None
    tok_dir = cfg.tokenizer or next((c for c in ckpts if tokenizer_files(c)), None)
    tok = data.load_tokenizer(tok_dir)
    if not cfg.eval_manifests:
        data.ensure_synth(cfg.data_dir)
    factory = lambda: build_batches(cfg, model_cfg, tok, "eval", rank, world, verbose=False)  # noqa: E731
    cast = lambda: modeling.autocast(device)            # noqa: E731   (bf16 on CUDA, as a stage evaluates)
    results = {}
    for name in [*ckpts, "soup"]:
        model = evaluation_model(name, souped, model_cfg, device, rank, world)
        results[name] = evaluate(model, factory, cfg.eval_packs, device, cast)
        del model                                       # one model on the device at a time
        log(f"soup eval | {name}: held-out loss {results[name]:.4f}")
    meta = {"stage": cfg.stage, "inputs": ckpts, "eval_loss": results, "config": asdict(cfg),
            "seconds": round(time.time() - started, 1)}
    modeling.save_checkpoint(stage_dir(cfg), souped, meta, rank, world, extra_files=tokenizer_files(tok_dir),
                             model_cfg=model_cfg)
    return stage_dir(cfg)


# the options in which homogeneous checkpoints (§4.2.1: the same recipe) may differ: the seed, the
# stage's name (sft4 and its twin) and how the run was kept, placed and evaluated
SOUP_MAY_DIFFER = ("stage", "seed", "out_dir", "data_dir", "image_root", "tokenizer", "eval_manifests", "eval_every",
                   "eval_packs", "save_every", "keep_checkpoints", "num_workers", "prefetch_factor", "fsdp", "ac",
                   "max_bad_steps", "max_bad_fraction")


def say_how_the_inputs_were_trained(cfg: StageConfig, ckpts: list, log):
    """Log each input's stage and step (meta.json) and, where the inputs' recipes differ (their
    options but SOUP_MAY_DIFFER, their stage's data mix and start), a note naming how: the paper's
    homogeneous soups gain, its heterogeneous merge collapsed (Table 5). A note, not a refusal; so is
    one where the inputs were evaluated on --eval_manifests the soup is not given."""
    recipes, origins, held_out = [], [], set()
    for c in ckpts:
        if not os.path.exists(os.path.join(c, "meta.json")):       # an export (HF layout): its recipe is unknown
            origins.append(f"{c} (no meta.json)")
            continue
        meta = modeling.verify_checkpoint(c)
        origins.append(f"{c} ({meta.get('stage', '?')}, step {meta.get('step', '?')})")
        held_out.add(meta.get("config", {}).get("eval_manifests") or "")
        recipe = {k: v for k, v in meta.get("config", {}).items() if k not in SOUP_MAY_DIFFER}
        if (row := STAGES.get(meta.get("stage"))) is not None:
            start = set(init_rule(row).values())
            recipe.update(data_mix=",".join(f"{name}:{w:g}" for name, w in row.mix),
                          start=start.pop() if len(start) == 1 else init_rule(row))
        recipes.append((c, recipe))
    log(f"soup: averaging {', '.join(origins)}")
    if not cfg.eval_manifests and (theirs := sorted(h for h in held_out if h)):
        log(f"note: the soup's held-out loss is measured on the synthetic families' eval splits in {cfg.data_dir}; its "
            f"inputs were evaluated on {' and '.join(theirs)}: --eval_manifests={theirs[0]} measures that")
    differs = [f"{c}: {', '.join(d)}" for c, r in recipes[1:] if (d := changed_options(recipes[0][1], r))]
    if differs:
        log(f"note: the inputs were trained differently from {recipes[0][0]} ({'; '.join(differs)}); the paper "
            "averages homogeneous checkpoints (the same recipe, another seed or data order): its heterogeneous "
            "merge collapsed (§4.2.1, Table 5)")


MEAN_CHUNK = 1 << 24     # elements averaged at once: 128 MiB of float64 per input, whatever the tensor


def mean_weights(folders: list, model_cfg: modeling.SAILVLConfig) -> modeling.SAILVL:
    """The element-wise mean of the checkpoints' weights, an fp32 model on the host: summed in
    float64 (exact for any number of inputs) a slice of rows at a time, straight from their
    memory-mapped files. The one model held is the mean; loading every input first held N + 1.
    Rank 0 averages while the other ranks wait: it uses every core of the machine (torchrun gives
    each process one thread), or a 30b-a3b soup would take minutes per input."""
    model = modeling.empty_model(model_cfg)
    sds = [modeling.checkpoint_tensors(f, model) for f in folders]
    for f, sd in zip(folders, sds):                      # every input: the model's tensors, no others
        own = modeling.vit.loadable(model, sd, f"the soup's input {f}")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))
    try:
        mean_into(own, sds)
    finally:
        torch.set_num_threads(threads)
    return model


def mean_into(own: dict, sds: list):
    """Each tensor of `own` set to the mean of the inputs' `sds` (see mean_weights)."""
    with torch.no_grad():
        for k, t in own.items():
            if t.dim() == 0 or not t.is_floating_point():
                t.copy_(sum(sd[k].double() for sd in sds) / len(sds) if t.is_floating_point() else sds[0][k])
                continue
            step = max(1, MEAN_CHUNK // max(1, t[0].numel()))
            for r in range(0, t.shape[0], step):          # (step, ...) rows of every input, summed in float64
                t[r:r + step].copy_(sum(modeling.vit.rows_of(sd[k], r, r + step).double() for sd in sds) / len(sds))


def evaluation_model(source: str, souped, model_cfg: modeling.SAILVLConfig, device, rank: int, world: int):
    """A model to evaluate on `device`, its LLM's matrices in the device's compute dtype (bf16 on
    CUDA: the products autocast makes, and half the memory; 30b-a3b in fp32 does not fit an H100):
    a soup input read from its folder, or ("soup") rank 0's mean, sent to every rank."""
    low = modeling.compute_dtype(device)
    if source != "soup":
        return modeling.SAILVL.from_pretrained(source, device=device, matrices_dtype=low)
    if rank == 0 and low is None and torch.device(device).type == "cpu":
        model = souped                                  # the soup as it is evaluated: no second copy
    else:
        model = modeling.empty_model(model_cfg, device, matrices_dtype=low)
        if rank == 0:
            modeling.vit.load_state_dict_strict(model, souped.state_dict(), "the soup")
    if world > 1:                                       # a tied head and embedding: one tensor, sent once
        for t in {t.data_ptr(): t for t in model.state_dict().values()}.values():
            dist.broadcast(t, 0)
    return model


# ==============================================================================================
# command line

def help_text(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, stage_given: bool) -> str:
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
              option_line("--resume [DIR]", "continue from DIR, or from the newest good out/<stage>.run/step-* checkpoint"),
              option_line("--ckpts A B ...", "soup: the checkpoints to average (default: the stage's inputs)")]
    lines += config_help(cfg)
    lines += [option_line("--model.<field>=...", "the model config, e.g. --model.llm_config.num_hidden_layers=8 "
                          "(python model.py --preset NAME prints every field)"),
              "", "--stage all (the whole recipe, with its report) also takes:"]
    lines += [option_line(f"--{k}={v}", RECIPE_HELP[k]) for k, v in RECIPE_OPTIONS.items()]
    lines += ["", "Options are --key=value (or --key value); dashes and underscores are the same.",
              "other commands: python tests/calibrate.py --help (also: python train_stage.py calibrate ...)"]
    return "\n".join(lines)


def option_line(option: str, text: str, width: int = 34) -> str:
    """One aligned help row; an option longer than the column gets its text on the next line."""
    return f"  {option:<{width}} {text}" if len(option) < width else f"  {option}\n  {'':<{width}} {text}"


def config_help(cfg, prefix: str = "") -> list:
    """A help row for every leaf of a config dataclass: --name=default  the field's comment."""
    rows, doc = [], field_help(type(cfg))
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            rows += config_help(v, prefix + f.name + ".")
        else:
            shown = ",".join(map(str, v)) if isinstance(v, tuple) and v else repr(v)
            rows.append(option_line(f"--{prefix + f.name}={shown}", doc.get(f.name, "")))
    return rows


# options of training, which the soup (an average of finished checkpoints) does not read
TRAINING_ONLY = ("steps", "step_scale", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "beta1",
                 "beta2", "grad_clip", "max_bad_steps", "adalrs", "adalrs_cfg", "ngram_rebalance", "save_every",
                 "keep_checkpoints", "eval_every", "init_from", "init_modules", "init_llm", "init_vit", "trainable",
                 "resume", "ac", "auto_steps", "text_only", "label_mode")


def check_run_options(cfg: StageConfig):
    """AdamW's options and the LR schedule's floor, refused here (one line) rather than by torch; the
    checkpoint and evaluation periods, whose 0 means never (all, for --keep_checkpoints) and whose
    negative values acted as their absolute value (every -1 steps: every step) or as 0."""
    for key in ("save_every", "eval_every", "keep_checkpoints"):
        if getattr(cfg, key) < 0:
            means = field_help(type(cfg)).get(key) or field_help(StageConfig)[key]     # (RLConfig's own, else ours)
            raise UsageError(f"--{key} must be >= 0 ({means}), got {getattr(cfg, key)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and cfg.weight_decay >= 0 and 0 <= cfg.min_lr_ratio <= 1):
        raise UsageError(f"--beta1 and --beta2 must be in [0, 1), --weight_decay >= 0 and --min_lr_ratio in [0, 1], "
                         f"got {cfg.beta1}, {cfg.beta2}, {cfg.weight_decay} and {cfg.min_lr_ratio}")


def preset_beside_llm(path: str) -> str:
    """The preset of a stage whose LLM --init-llm gives (the ViT's shape, the tiling, the system
    prompt): for a Qwen3 folder, a real LLM, 2b (the paper's 448-px tiles; shapes from the folders);
    for a SAIL-VL2 folder (a stage output: lm0's), the preset whose ViT it has, as a stage from it
    would (not a 0.7B random SAIL-ViT-Huge beside a tiny LLM)."""
    try:
        saved = modeling.read_config(path).to_dict()
    except (OSError, ValueError, KeyError, TypeError):    # a Qwen3 folder (or none: refused later, clearly)
        return "2b"
    beside = lambda c: {k: v for k, v in c.items() if k != "llm_config"}     # noqa: E731   (ViT, tiling, prompt)
    same = [n for n in modeling.PRESETS if beside(modeling.preset_config(n).to_dict()) == beside(saved)]
    return (same or [n for n in modeling.PRESETS if modeling.preset_config(n).to_dict()["vision_config"]
                     == saved["vision_config"]] or ["2b"])[0]


def parse_args(argv):
    """(cfg, model_cfg, options) from the command line (one option style; see split_options)."""
    opts = split_options(argv)
    given = dict(opts)
    cfg = stage_config(given.get("stage", StageConfig.stage), given.get("scale", "tiny"),
                       log=lambda *a: print0(int(os.environ.get("RANK", "0")), *a), given=set(given))
    if "model_options" in given:
        raise UsageError("--model_options is recorded from the --preset and --model.KEY=VALUE options: give those")
    model_keys = [(k, v) for k, v in opts if k.startswith("model.")]
    for key, value in opts:
        if key not in ("stage", "scale", "resume", "ckpts", "help") and not key.startswith("model."):
            set_key({"": cfg}, key, value)
    if cfg.init_llm and "preset" not in given:
        cfg.preset = preset_beside_llm(cfg.init_llm)
    try:
        model_cfg = modeling.preset_config(cfg.preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for key, value in model_keys:
        set_key({"": cfg, "model": model_cfg}, key, value)
    cfg.model_options = tuple([f"preset={cfg.preset}"] * ("preset" in given) + [f"{k[6:]}={v}" for k, v in model_keys])
    modules_of(cfg.trainable)
    check_init_options(cfg)
    check_run_options(cfg)
    row = stage_row(cfg.stage)
    if "ckpts" in given and row.runner != "soup":
        raise UsageError("--ckpts names the checkpoints the soup averages: it applies to --stage soup only")
    if row.runner == "soup" and (unused := [k for k in given if k.split(".")[0] in TRAINING_ONLY]):
        raise UsageError(f"--{unused[0]} does not apply to the soup: it averages finished checkpoints and "
                         "evaluates them (its options: --ckpts, the held-out data's and --out_dir)")
    if cfg.steps < 1 or cfg.step_scale <= 0:
        raise UsageError(f"--steps must be at least 1 and --step_scale above 0, got {cfg.steps} and {cfg.step_scale:g}")
    cfg.steps = max(1, round(cfg.steps * cfg.step_scale))
    if not cfg.grad_clip > 0 or cfg.eval_packs < 1:
        raise UsageError(f"--grad_clip must be above 0 and --eval_packs at least 1, got {cfg.grad_clip:g} and "
                         f"{cfg.eval_packs}")
    if cfg.schedule not in ("cosine", "constant"):
        raise UsageError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
    if cfg.label_mode not in data.LABEL_MODES:
        raise UsageError(f"--label_mode must be one of {', '.join(data.LABEL_MODES)}, got {cfg.label_mode!r}")
    if cfg.ac not in ("none", "block"):
        raise UsageError(f"--ac must be none or block, got {cfg.ac!r}")
    if cfg.num_workers < 0 or cfg.prefetch_factor < 1:
        raise UsageError(f"--num_workers must be >= 0 and --prefetch_factor >= 1, got {cfg.num_workers} and "
                         f"{cfg.prefetch_factor}")
    if "help" not in given:
        model_cfg = stage_model_config(cfg, model_cfg)   # what loads: every model option applies or is refused, now
    return cfg, model_cfg, given


def resume_checkpoint(opts: dict, cfg: StageConfig, log) -> Optional[str]:
    """The checkpoint a run continues from (train_stage.py and rl.py): --resume=DIR, checked; bare
    --resume, the newest good one under out/<stage>.run/ (None if there is none); no --resume, None."""
    resume = opts.get("resume") or None
    if "resume" in opts and resume is None:
        resume = modeling.find_resume_checkpoint(run_dir(cfg), log)
        if resume is None and not in_recipe():          # (the recipe resumes every stage it runs)
            log(f"resume: no usable checkpoint under {run_dir(cfg)}; starting from the beginning")
    elif resume:
        if not os.path.isdir(resume):
            raise UsageError(f"--resume {resume}: no such folder (a step checkpoint out/<stage>.run/step-N)")
        modeling.verify_checkpoint(resume, resumable=True)
    return resume


def output_files(out: str) -> list:
    """What a stage output holds, for its done line (the tokenizer's files as one)."""
    files = sorted(modeling.verify_checkpoint(out).get("files", {}))
    tokenizer = [f for f in files if f in data.TOKENIZER_FILES]
    first = {"config.json": 0, "model.safetensors": 1, "meta.json": 2}              # then the others, by name
    names = sorted([f for f in files if f not in tokenizer and "/" not in f] + ["meta.json"],
                   key=lambda f: (first.get(f, 3), f))
    return names + ["the tokenizer"] * bool(tokenizer)


def took(out: str) -> str:
    """" after N s": a stage output's time, every attempt's (meta.json "seconds"), if it records it.
    Read on rank 0 alone (the one that logs): another node may see meta.json late on a shared file system."""
    if int(os.environ.get("RANK", "0")) != 0:
        return ""
    seconds = modeling.verify_checkpoint(out).get("seconds")
    return "" if seconds is None else f" after {seconds:.0f} s"


def log_done(log, what: str, out: str):
    """A stage's done line: what its output holds and how long it took. On rank 0 only: it reads the
    output's meta.json, which a node other than rank 0's may see late on a shared file system."""
    if int(os.environ.get("RANK", "0")) == 0:
        log(f"done: {what} in {out}/ ({', '.join(output_files(out))}){took(out)}")


def run_stage(stage: str, overrides: list = (), resume: Optional[str] = None) -> str:
    """Programmatic entry (tests, benchmarks, the recipe): run `stage` with `--key=value` overrides,
    from the step checkpoint `resume` if given."""
    cfg, model_cfg, given = parse_args(["--stage", stage, *overrides])
    if "resume" in given:                    # else a fresh start, which removes the run's checkpoints
        raise UsageError("run_stage: pass resume=STEP_CHECKPOINT, not a --resume override")
    return train(cfg, model_cfg, resume)


def refuse_missing_sources(cfg: StageConfig):
    """A paper stage's output this stage starts from is missing: what to run (a stand-in is run instead,
    unless another source was trained with another tokenizer: refuse_stand_in)."""
    for name in missing_sources(cfg):
        if not STAGES[name].auto:
            raise UsageError(f"{cfg.stage} starts from {stage_dir(cfg, name)}, which is missing or incomplete: run "
                             f"`{command_for(STAGES[name], cfg)}` first, or pass --init-from=DIR (--init-from=random "
                             f"starts from random weights)")
        refuse_stand_in(cfg, name)


def refuse_stand_in(cfg: StageConfig, name: str):
    """The stand-in `name` (lm0: Qwen3's own pre-training in miniature) is run only beside sources
    trained with its tokenizer: beside one trained with a real LLM's (--init-llm, e.g. vit3 before
    pretrain1, which names Qwen3 again) it would pair that source's modules with a small LLM trained on
    synthetic text, whose token ids are another tokenizer's, without a word."""
    own = tokenizer_digest(tokenizer_source(stand_in_config(cfg, name)))
    for src in sorted({s for s in init_sources(cfg).values() if s != "fresh" and modeling.is_finished_stage(s)}):
        if tokenizer_digest(src) != own:
            raise UsageError(f"{cfg.stage} would run the stand-in {name} (a small LLM trained on synthetic text) beside "
                             f"{src}, trained with another tokenizer (a real LLM's, from --init-llm?): pass "
                             f"--init-llm=DIR, that LLM's folder, as its first stage had")


def stand_in_config(cfg: StageConfig, name: str) -> StageConfig:
    """The config a stand-in stage runs with before `cfg`'s stage: its own, in this run's folders."""
    sub = stage_config(name)
    for key in ("out_dir", "data_dir", "seed", "preset", "tokenizer", "fsdp", "ac", "num_workers"):
        setattr(sub, key, getattr(cfg, key))
    sub.steps = cfg.auto_steps or max(1, round(sub.steps * cfg.step_scale))
    return sub


def ensure_sources(cfg: StageConfig, model_cfg: modeling.SAILVLConfig, log):
    """Run the stand-in stages this stage starts from when their output is missing; refuse, with
    what to run, when a paper stage's output is missing."""
    refuse_missing_sources(cfg)
    for name in missing_sources(cfg):
        row, sub = STAGES[name], stand_in_config(cfg, name)
        log(f"{stage_dir(cfg, name)} is missing: running the stand-in stage {name} first ({sub.steps} steps; "
            f"--auto_steps=N changes that); skip it with --init-llm=QWEN3_DIR, the real weights {name} stands in "
            f"for, or --init-from=DIR ({row.note})")
        ensure_sources(sub, model_cfg, log)
        train(sub, dataclasses.replace(model_cfg), None)
        log(f"{name} done: {stage_dir(cfg, name)}{took(stage_dir(cfg, name))}; now {cfg.stage}")


def try_it(cfg: StageConfig, out: str) -> Optional[str]:
    """A sample.py command on a held-out sample of the stage's own data, with the reference reply on
    one line (of a thinking-mode sample, asked with --think, its answer): the stage's first visual
    family with short answers (ocr, count, ...), else its first visual one; none for a text-only
    stage (lm0: it never saw the media its data's questions are about) or one trained on --manifests
    (a synthetic sample would say nothing of what it learnt)."""
    if cfg.text_only or cfg.manifests:
        return None
    short = ("ocr", "count", "multi", "chart", "video", "caption_qa")
    mix = sorted((name for name, _ in stage_row(cfg.stage).mix), key=lambda n: short.index(n) if n in short else 99)
    for name in mix:
        path = os.path.join(cfg.data_dir, name, "eval.jsonl")
        if name.startswith("out:") or not os.path.exists(path):
            continue
        rec = data.JsonlDataset(path, data.load_tokenizer(None)).record(0)
        if rec.text is not None or not (rec.images or rec.videos):
            continue
        media = [f"--image {shlex_quote(p)}" for p in rec.images] + [f"--video {shlex_quote(p)}" for p in rec.videos]
        question = data.PLACEHOLDER_RE.sub("", rec.turns[0][1]).strip()
        reference = rec.answer or rec.turns[-1][1].rsplit("</think>", 1)[-1]     # a thinking reply: its answer
        return " ".join(["python sample.py --ckpt", out, *media, "--prompt", shlex_quote(question),
                         *["--think"] * bool(rec.think), f"  # reference: {' '.join(reference.split())}"])
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
    log(f"stage {cfg.stage}" + f" ({row.section})" * bool(row.section) + f": {row.note}")   # (a stand-in's note says so)
    if row.runner == "soup":
        inputs = opts["ckpts"].split(",") if opts.get("ckpts") else [stage_dir(cfg, s) for s in row.inputs]
        for path, name in zip(inputs, row.inputs if not opts.get("ckpts") else inputs):
            if not modeling.is_finished_stage(path) and not os.path.exists(os.path.join(path, "config.json")):
                hint = f"run `{command_for(STAGES[name], cfg)}` first, or " if name in STAGES else ""
                raise UsageError(f"soup: {path} is missing: {hint}pass --ckpts A B")
        writable_dir(cfg.out_dir)                        # (after the refusals: a refused command makes no folder)
        out = soup(cfg, inputs)
    else:
        resume = resume_checkpoint(opts, cfg, log)
        if not resume:
            refuse_missing_sources(cfg)
        writable_dir(cfg.out_dir)
        if not resume:
            ensure_sources(cfg, model_cfg, log)
        out = train(cfg, model_cfg, resume)
    log_done(log, f"{cfg.stage} checkpoint", out)
    if (nxt := next_name(row)) and not in_recipe():
        log(f"next: {command_for(STAGES[nxt], cfg, from_output=True)}")
    if hint := try_it(cfg, out):
        log(f"try it: {hint}")


# ==============================================================================================
# the whole recipe in one command: python train_stage.py --stage all, which runs tests/recipe.py (the
# runner, its evaluation and report); `python train_stage.py calibrate` runs tests/calibrate.py

# --stage all only (the rest goes to every stage; RECIPE_HELP says what each does). eval_limit 128 is
# sample.EVAL_LIMIT, the whole synthetic eval split; runs k > 1 keep the synthetic data and held-out samples
RECIPE_OPTIONS = {"nproc": "1", "eval_limit": "128", "eval_families": "", "until": "", "seeds": "1", "compare": "",
                  "as": "", "against": ""}
RECIPE_HELP = {"nproc": "processes per stage (torchrun --nproc_per_node)",
               "eval_limit": "held-out samples per family in each stage's evaluation",
               "eval_families": "comma list of families to evaluate (\"\" = all)",
               "until": "the last stage to run (\"\" = the whole recipe)",
               "seeds": "runs of the recipe; run k > 1 adds 1000 (k - 1) to every seed, outputs in <out_dir>/seed<k>/",
               "compare": "a stage output made outside the recipe (another seed, another setting): evaluated as the "
                          "recipe evaluates --as=STAGE, then compared with <out_dir>'s own STAGE and put in its place in "
                          "the recipe's effects; trains nothing",
               "as": "the stage that --compare stands in for",
               "against": "another output of --as's stage to compare --compare with, in place of <out_dir>'s own "
                          "(two settings beside a run: each evaluated, one paired difference per mode)"}
RL_HELDOUT = "heldout_predictions.jsonl"   # an RL stage's held-out before / after (rl.py): one more effect


def run_tool(script: str, argv: list):
    """Replace this process by `python tests/<script> ARGV` (the same process id, so a signal or
    torchrun reaches it): the tooling lives beside the components, which never import it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests",
                                                           script), *argv])


def fail(message: str, code: int, prog: str = "train_stage.py"):
    """One clear line on stderr (rank 0), also handed to torchrun's error summary, then exit."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's "Root Cause" shows it, not "<N/A>"
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                    "timestamp": str(int(time.time()))}}}, f)
    raise SystemExit(code)


RECIPE_CHILD = "SAILVL_RECIPE_CHILD"     # set in a stage the recipe runs: the recipe says how to go on, not the stage


def in_recipe() -> bool:
    """A stage the recipe runs (RECIPE_CHILD): it says neither what comes next nor how to go on."""
    return bool(os.environ.get(RECIPE_CHILD))


def interrupt_hint(opts: dict, default_stage: str) -> str:
    """How a command Ctrl-C stopped goes on (`opts`: its options): a training stage resumes from its
    step checkpoint, in its own --out_dir; the soup, the harvest and `rl.py filter`, which keep none,
    start over."""
    stage = opts.get("stage", default_stage)
    row = STAGES.get(stage)
    if row is None or not row.trainable:
        return "run the same command again: it starts over"
    return (f"the same command with --resume goes on from the newest step checkpoint in "
            f"{run_dir(StageConfig(stage=stage, out_dir=opts.get('out_dir') or StageConfig.out_dir))}/")


def one_line_errors(run, prog: str = "train_stage.py", on_interrupt: str = ""):
    """run(); a usage error exits 2, bad data, a bad checkpoint or a non-finite loss 1, each as one line
    (fail); Ctrl-C 130, with `on_interrupt`: how the command goes on (silently in a stage the recipe
    runs, which says it: RECIPE_CHILD)."""
    try:
        return run()
    except UsageError as e:
        fail(str(e), e.code, prog)           # 2; an InputError (an input that exists but is unusable) 1
    except (data.TooMuchBadData, data.DataError, modeling.CheckpointError, FloatingPointError, OSError) as e:
        fail(str(e), 1, prog)                # OSError: a missing or unreadable file named by an option
    except KeyboardInterrupt:                # Ctrl-C: how to go on, not a traceback (128 + SIGINT)
        if in_recipe():
            raise SystemExit(130) from None
        fail("interrupted" + (f"; {on_interrupt}" if on_interrupt else ""), 130, prog)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        run_tool("calibrate.py", argv[1:])
    opts = one_line_errors(lambda: dict(split_options(argv)))
    if opts.get("stage") == "all":
        run_tool("recipe.py", argv)
    one_line_errors(lambda: run_cli(argv), on_interrupt=interrupt_hint(opts, StageConfig.stage))
    shutdown_distributed()


if __name__ == "__main__":
    run_command(main)
