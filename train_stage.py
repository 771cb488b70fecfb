"""Every training stage of SAIL-VL2 in one flat loop (paper §2.1.1, §3.2, §4.2.1, §4.2.2, §4.2.4, §5).

    torchrun train_stage.py --stage vit1                     # the tiny default, CPU, a few minutes
    torchrun --nproc_per_node 2 train_stage.py --stage sft1  # FSDP2 over 2 processes (gloo on CPU)
    python train_stage.py --help                             # stages, paper values, every option

Reads in the paper's order:
  stages       `STAGES`: the paper's values (section, trainable modules, LR, batch, sequence length,
               data, epochs, schedule) beside a tiny default that runs on 2 CPU cores in minutes.
               lm0 (not in the paper) language-pretrains the tiny LLM, standing in for Qwen3.
               SAIL-ViT progressive alignment vit1 -> vit2 -> vit3 (§2.1.1); basic pre-training
               pretrain1 with AdaLRS (§3.2.1, §3.2.3) and multi-task pretrain2 with n-gram
               rebalancing (§3.2.2); SFT phases sft1..sft4 and the model soup (§4.2.1); LongCoT
               SFT (§4.2.2); Think-Fusion SFT with its dual-target loss (§4.2.4). RL is in rl.py.
  model init   previous stage's output, --init-from DIR, or HF weights (--init-llm, --init-vit)
  FSDP2        `parallelize`: fully_shard each LLM block, the ViT as one unit, then the root (§5.2)
  the loop     AdamW, warm-up + cosine, grad clipping and accumulation, stream packing with a
               global token-mean loss (§5.1), one log line per step, metrics.jsonl, eval
  checkpoints  atomic folders with a weight checksum; --resume continues bit-exactly
  soup         `--stage soup --ckpts A B ...` averages homogeneous checkpoints (§4.2.1)

Overrides: any StageConfig field as `--key=value` (types checked, unknown keys refused), and the
model config as `--model.llm_config.hidden_size=256`. The resolved config is printed at start and
saved in every checkpoint.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from adalrs import AdaLRS, AdaLRSConfig
import data
import model as M
import moe
import packing


# ==============================================================================================
# configuration

@dataclass
class StageConfig:
    stage: str = "vit1"
    preset: str = "tiny"                  # model preset (model.preset_config)
    out_dir: str = "out"                  # the stage writes out/<stage>/ (+ step-NNNNNN/ checkpoints)
    data_dir: str = "data_synth"          # synthetic default data, generated on first use
    manifests: str = ""                   # your own data: "a.jsonl:2,b.jsonl:1" (path:weight), replaces the mix
    eval_manifests: str = ""              # held-out data for eval (default: the mix's eval split)
    init_from: str = ""                   # a SAIL-VL2 folder to start from ("" = previous stage's output)
    init_llm: str = ""                    # an HF Qwen3 / Qwen3-MoE folder for the language model
    init_vit: str = ""                    # an HF AIMv2 / SAIL-ViT folder for the vision encoder
    tokenizer: str = ""                   # a Qwen tokenizer folder ("" = the embedded default)
    trainable: str = "mlp1"               # comma list of vision_model, mlp1, language_model
    reinit: str = ""                      # modules re-initialised at start (pretrain1: the adapter)
    text_only: bool = False               # drop images/videos from the data (lm0: the LLM learns the chat format)
    label_mode: str = ""                  # sft | text | longcot | thinkfusion ("" = the stage's data mix default)
    steps: int = 100                      # optimizer steps
    max_tokens: int = 1024                # tokens per packed micro-batch (paper: 8192 / 16384 / 20480)
    micro_batches: int = 1                # packed micro-batches per rank per step (gradient accumulation)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1             # cosine floor as a fraction of lr
    warmup_steps: int = 5
    schedule: str = "cosine"              # cosine | constant
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    adalrs: bool = False                  # AdaLRS learning-rate search (pretrain1 by default)
    adalrs_cfg: AdaLRSConfig = field(default_factory=AdaLRSConfig)  # --adalrs_cfg.window=...
    ngram_rebalance: bool = False         # force n-gram rebalancing (§3.2.2; on by default in pretrain2's mix)
    eval_every: int = 50
    eval_packs: int = 8
    save_every: int = 50
    keep_checkpoints: int = 2
    max_bad_fraction: float = 0.05        # stop when more of the data than this is bad
    seed: int = 1337
    lm0_steps: int = 150                  # vit1 on the tiny default runs lm0 first when out/lm0 is missing
    paper: str = ""                       # the paper's values for this stage (printed, not used)


def parse_value(text: str, current, name: str):
    """Convert `text` to the type of `current` (bool, int, float, str, list/tuple, None -> str)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected a boolean (true/false), got {text!r}")
    if isinstance(current, (list, tuple)):
        items = [t for t in text.split(",") if t != ""]
        proto = current[0] if current else ""
        return type(current)(parse_value(t, proto, name) for t in items)
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {type(current).__name__}, got {text!r}") from None
    return text


def apply_overrides(roots: dict, items: list) -> None:
    """Apply `--a.b.c=value` items to dataclass instances. roots maps a prefix ('' for the main
    config) to a dataclass; dotted keys walk nested dataclass fields. Unknown keys are refused."""
    for item in items:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"expected --key=value, got {item!r}")
        key, value = item[2:].split("=", 1)
        key = key.replace("-", "_")
        head, _, rest = key.partition(".")
        if head in roots and head != "" and rest:
            obj, path = roots[head], rest.split(".")
        else:
            obj, path = roots[""], key.split(".")
        for p in path[:-1]:
            if not dataclasses.is_dataclass(obj) or p not in {f.name for f in fields(obj)}:
                raise ValueError(f"unknown config key --{key}")
            obj = getattr(obj, p)
        last = path[-1]
        if not dataclasses.is_dataclass(obj) or last not in {f.name for f in fields(obj)}:
            known = ", ".join(f.name for f in fields(obj)) if dataclasses.is_dataclass(obj) else ""
            raise ValueError(f"unknown config key --{key}" + (f" (known here: {known})" if known else ""))
        setattr(obj, last, parse_value(value, getattr(obj, last), key))


# ==============================================================================================
# stages: the paper's values (with sections) and a tiny default each

PREVIOUS = {"vit1": "lm0", "vit2": "vit1", "vit3": "vit2", "pretrain1": "vit3", "pretrain2": "pretrain1",
            "sft1": "pretrain2", "sft2": "sft1", "sft3": "sft2", "sft4": "sft3",
            "longcot": ("soup", "sft4"), "thinkfusion": ("rl-verifiable", "longcot")}


def stage_config(name: str) -> StageConfig:
    """The tiny default of stage `name`, with the paper's values recorded in `paper`."""
    S = StageConfig
    stages = {
        "lm0": S(stage="lm0", trainable="language_model", text_only=True, lr=3e-3, steps=150, warmup_steps=10,
                 paper="not a paper stage: language pre-training of the tiny LLM on synthetic text, standing in for "
                       "Qwen3's own pre-training (the real recipe starts from a Qwen3 checkpoint)"),
        "vit1": S(stage="vit1", trainable="mlp1", lr=3e-3, steps=600, warmup_steps=10, eval_every=100,
                  paper="§2.1.1 SAIL-ViT stage I: adapter only; 8M samples (4.9M SAIL-Caption2 + 3.1M OCR); "
                        "LR 2e-4; batch 1920; seq 8192"),
        "vit2": S(stage="vit2", trainable="vision_model,mlp1", lr=1e-3, steps=100,
                  paper="§2.1.1 SAIL-ViT stage II: ViT + adapter; LR 2e-5; batch 512; seq 8192"),
        "vit3": S(stage="vit3", trainable="vision_model,mlp1,language_model", lr=5e-4, steps=100,
                  paper="§2.1.1 SAIL-ViT stage III: all parameters; 36.5M samples; LR 1e-5; batch 512; seq 8192"),
        "pretrain1": S(stage="pretrain1", trainable="mlp1", reinit="mlp1", lr=2e-4, steps=200, adalrs=True,
                       warmup_steps=5, schedule="cosine",
                       paper="§3.2.1 basic multimodal pre-training: adapter only, from random init; 64M samples "
                             "(captions, chart captions, OCR), dataset-level resampling (§3.2.2); batch 2048; "
                             "initial LR 2e-4 with AdaLRS (§3.2.3, ended at 6.75e-4); seq 8192"),
        "pretrain2": S(stage="pretrain2", trainable="vision_model,mlp1,language_model", lr=5e-4, steps=100,
                       paper="§3.2.1 multi-task pre-training: all parameters; 180M samples (half visual "
                             "understanding, half instruction incl. text math); n-gram rebalancing (§3.2.2); "
                             "no AdaLRS; seq 8192; LR not stated in the paper"),
        "sft1": S(stage="sft1", trainable="vision_model,mlp1,language_model", lr=3e-4, steps=80,
                  paper="§4.2.1 SFT phase 1: general instructions (Infinity-MM stage 2); all parameters; "
                        "42B tokens; seq 8192"),
        "sft2": S(stage="sft2", trainable="vision_model,mlp1,language_model", lr=3e-4, steps=80,
                  paper="§4.2.1 SFT phase 2: SAIL-Instruction2 (20M); all parameters; 40B tokens; seq 8192"),
        "sft3": S(stage="sft3", trainable="vision_model,mlp1,language_model", lr=2e-4, steps=60,
                  paper="§4.2.1 SFT phase 3: hard subsets (LLaVA-CoT, MMPR, Condor); all; 16B tokens; seq 8192"),
        "sft4": S(stage="sft4", trainable="vision_model,mlp1,language_model", lr=2e-4, steps=60, max_tokens=2048,
                  paper="§4.2.1 SFT phase 4: image:video 1:1; all parameters; 70B tokens; seq 16384"),
        "soup": S(stage="soup", trainable="",
                  paper="§4.2.1 model soup: average homogeneous checkpoints (same recipe, different seeds / "
                        "data order): +1.7 avg (Table 5); heterogeneous merges collapse (12.86 avg)"),
        "longcot": S(stage="longcot", trainable="vision_model,mlp1,language_model", lr=2e-4, steps=80, max_tokens=2048,
                     paper="§4.2.2 LongCoT SFT: 400K samples, <think>...</think> + \\boxed{}; loss on thinking + "
                           "answer; 1 epoch; AdamW; batch 1024; cosine; peak LR 1e-6; seq 20480"),
        "thinkfusion": S(stage="thinkfusion", trainable="vision_model,mlp1,language_model", lr=1e-4, steps=80, max_tokens=2048,
                         paper="§4.2.4 Think-Fusion SFT: 1M samples = 900K direct + 100K CoT (9:1); dual-target "
                               "loss (CoT: thinking + answer, direct: answer); 1 epoch; batch 1024; cosine; "
                               "peak LR 1e-6; seq 20480"),
    }
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join(stages)} (RL stages are in rl.py)")
    return stages[name]


STAGE_NAMES = ["lm0", "vit1", "vit2", "vit3", "pretrain1", "pretrain2", "sft1", "sft2", "sft3", "sft4",
               "soup", "longcot", "thinkfusion"]


def modules_of(spec: str) -> list:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in ("vision_model", "mlp1", "language_model")]
    if bad:
        raise ValueError(f"unknown module(s) {bad}: use vision_model, mlp1, language_model")
    return names


# ==============================================================================================
# distributed set-up and FSDP2 (§5.2)

def setup_distributed():
    """(rank, world_size, device) from torchrun's env; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


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
# model initialisation for a stage

def stage_dir(cfg: StageConfig, name: Optional[str] = None) -> str:
    return os.path.join(cfg.out_dir, name or cfg.stage)


def is_finished_stage(path: str) -> bool:
    return os.path.exists(os.path.join(path, "model.safetensors")) and os.path.exists(os.path.join(path, "meta.json"))


def previous_stage_dir(cfg: StageConfig) -> Optional[str]:
    prev = PREVIOUS.get(cfg.stage)
    for p in (prev if isinstance(prev, tuple) else (prev,)):
        if p and is_finished_stage(stage_dir(cfg, p)):
            return stage_dir(cfg, p)
    return None


def build_stage_model(cfg: StageConfig, model_cfg: M.SAILVLConfig, log) -> M.SAILVL:
    """Random init, then (in order) the previous stage / --init-from, then --init-vit / --init-llm."""
    torch.manual_seed(cfg.seed)
    model = M.SAILVL(model_cfg)
    model.init_weights()
    src = cfg.init_from or previous_stage_dir(cfg)
    if src:
        log(f"init: all weights from {src}")
        loaded = M.SAILVL.from_pretrained(src)
        if asdict(loaded.cfg) != asdict(model_cfg):
            diff = {k: (v, asdict(model_cfg)[k]) for k, v in asdict(loaded.cfg).items() if asdict(model_cfg)[k] != v}
            log(f"init: using the config of {src} (differs from the preset in {sorted(diff)})")
            model = loaded
        else:
            model.load_state_dict(loaded.state_dict())
    if cfg.stage == "pretrain1" and not cfg.init_from and is_finished_stage(stage_dir(cfg, "lm0")):
        # §3.2.1: basic pre-training = SAIL-ViT (from vit3) + the original LLM + a fresh adapter
        lm0 = M.SAILVL.from_pretrained(stage_dir(cfg, "lm0"))
        model.language_model.load_state_dict(lm0.language_model.state_dict())
        log(f"init: language model from {stage_dir(cfg, 'lm0')} (the LLM before SAIL-ViT training, §3.2.1)")
    if cfg.init_vit:
        v = M.vit.load_hf_vit(cfg.init_vit)
        model.vision_model.load_state_dict(v.state_dict())
        log(f"init: vision encoder from {cfg.init_vit}")
    if cfg.init_llm:
        lm = M.load_hf_llm(cfg.init_llm)
        model.language_model.load_state_dict(lm.state_dict())
        log(f"init: language model from {cfg.init_llm}")
    if not (src or cfg.init_vit or cfg.init_llm):
        log(f"init: nothing to start from (no {stage_dir(cfg, str(PREVIOUS.get(cfg.stage, '-')))}, no --init-from): "
            f"random initialisation")
    for name in modules_of(cfg.reinit):
        torch.manual_seed(cfg.seed + 1)
        sub = getattr(model, name)
        for m in sub.modules():
            if hasattr(m, "reset_parameters") and m is not sub:
                m.reset_parameters()
        log(f"init: {name} re-initialised (random), as the paper's stage starts it")
    return model


def freeze(model: M.SAILVL, trainable: list):
    """Only the stage's modules train; frozen ones get no gradient and no optimizer state."""
    for name in ("vision_model", "mlp1", "language_model"):
        getattr(model, name).requires_grad_(name in trainable)


# ==============================================================================================
# data (data.py + packing.py, §3.2.2 and §5.1)

class StageDataset:
    """Map-style view of a stage's weighted mixture of manifests, as the packer wants it.

    Global index g = manifest offset + line index. `order(epoch)` is data.DataStream's plan for that
    epoch (dataset-level resampling, §3.2.2 step 1, and n-gram rebalancing, step 2), so the packer
    visits exactly the mixture the paper describes. Bad samples give None (counted by reason with
    file and line, and the run stops when too many are bad). A small cache holds the samples the
    packer measured until they are collated, so each is decoded once."""

    def __init__(self, sources, tok, dcfg, seed: int, training: bool, ngram_rebalance: bool,
                 img_context_id: int, cache_size: int = 256, verbose: bool = True):
        self.stream = data.DataStream(sources, tok, dcfg, seed=seed, training=training,
                                      ngram_rebalance=ngram_rebalance, verbose=verbose)
        self.datasets = self.stream.datasets
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        self.seed, self.img_context_id, self.cache_size = seed, img_context_id, cache_size
        self.bad = data.BadData(dcfg.max_bad_fraction, dcfg.bad_check_after)
        self.cache = {}

    def __len__(self):
        return int(self.offsets[-1])

    def order(self, epoch: int):
        src, idx = self.stream.plan(epoch)
        return (self.offsets[src] + idx).tolist()

    def _load(self, g: int):
        s = int(np.searchsorted(self.offsets, g, side="right") - 1)
        # per-index generator: random video frames (training) are the same on every rank and on resume
        return self.datasets[s].load(g - int(self.offsets[s]), np.random.default_rng([self.seed, g, 1]))

    def __getitem__(self, g: int):
        if g in self.cache:
            return self.cache.pop(g)
        try:
            return self._load(g)
        except data.DataError:
            return None

    def meta(self, g: int):
        """SampleMeta for the packer (None for a bad sample, which is reported and counted)."""
        try:
            sample = self._load(g)
        except data.DataError as e:
            self.bad.bad(e)
            return None
        self.bad.good()
        if len(self.cache) >= self.cache_size:
            self.cache.pop(next(iter(self.cache)))
        self.cache[g] = sample
        return packing.sample_meta(sample, g, self.img_context_id)


def stage_sources(cfg: StageConfig, split: str) -> list:
    """[(manifest, weight)]: --manifests / --eval_manifests, else the stage's synthetic mix."""
    spec = cfg.manifests if split == "train" else cfg.eval_manifests
    if spec:
        out = []
        for item in spec.split(","):
            path, _, w = item.partition(":")
            out.append((path, float(w) if w else 1.0))
        return out
    mix_stage = cfg.stage if cfg.stage in data.STAGE_DATA else "sft4"
    return data.stage_sources(mix_stage, cfg.data_dir, split)


def label_mode(cfg: StageConfig) -> str:
    return cfg.label_mode or data.STAGE_DATA.get(cfg.stage, data.STAGE_DATA["sft1"]).label_mode


def build_loader(cfg: StageConfig, model_cfg: M.SAILVLConfig, tok, split: str, rank: int, world: int,
                 seed: int, verbose: bool = True):
    dcfg = data.DataConfig(image_size=model_cfg.vision_config.image_size,
                           patch_size=model_cfg.vision_config.patch_size, max_tiles=model_cfg.max_dynamic_patch,
                           min_tiles=model_cfg.min_dynamic_patch, use_thumbnail=model_cfg.use_thumbnail,
                           anyres=model_cfg.anyres, anyres_max_patches=4 * model_cfg.anyres_max_tokens,
                           max_len=cfg.max_tokens, label_mode=label_mode(cfg), system=model_cfg.system_prompt,
                           max_bad_fraction=cfg.max_bad_fraction, drop_media=cfg.text_only)
    ngram = cfg.ngram_rebalance or (not cfg.manifests and data.STAGE_DATA.get(cfg.stage, data.STAGE_DATA["sft1"])
                                    .ngram_rebalance)
    dataset = StageDataset(stage_sources(cfg, split), tok, dcfg, seed, training=split == "train",
                           ngram_rebalance=ngram and split == "train", img_context_id=model_cfg.img_context_token_id,
                           verbose=verbose and rank == 0)
    pcfg = packing.PackingConfig(max_tokens=cfg.max_tokens, micro_batches=cfg.micro_batches,
                                 hidden_size=model_cfg.llm_config.hidden_size, seed=seed,
                                 buffer_size=64, max_wait=32, max_images_per_pack=64)
    loader = packing.PackedLoader(dataset, pcfg, rank=rank, world_size=world,
                                  img_context_id=model_cfg.img_context_token_id,
                                  meta_fn=dataset.meta, order_fn=dataset.order)
    return dataset, loader


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


def forward_pack(model, pack):
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
# checkpoints: atomic folders, weight checksum, exact resume

def full_state_dict(model, world: int) -> dict:
    """Consolidated fp32 weights on CPU (rank 0 only under FSDP; {} on other ranks)."""
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def local_optimizer_state(opt) -> dict:
    """The optimizer state with every DTensor replaced by this rank's local shard (plain tensors
    only, so it loads with torch.load(weights_only=True))."""
    sd = opt.state_dict()
    state = {}
    for idx, s in sd["state"].items():
        state[idx] = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().cpu().clone()
                      if torch.is_tensor(v) else v for k, v in s.items()}
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


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state().tolist(), "python": repr(random.getstate()),
          "numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict):
    import ast
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    random.setstate(ast.literal_eval(st["python"]))
    np_state = st["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def save_checkpoint(path: str, model, model_cfg, opt, meta: dict, rank: int, world: int, extra_rank_files=None):
    """Write `path` atomically: config.json + model.safetensors (consolidated, rank 0), meta.json
    (step, config, data position, RNG, AdaLRS, sha256 of the weights), optim_rank{r}.pt per rank
    (plain tensors, loaded with weights_only=True) and any extra per-rank files (AdaLRS snapshot)."""
    from safetensors.torch import save_file
    sd = full_state_dict(model, world)
    mine = {f"optim_rank{rank}.pt": local_optimizer_state(opt), **(extra_rank_files or {})}
    parent = os.path.dirname(os.path.abspath(path))
    staging = os.path.join(parent, "." + os.path.basename(path) + f".rank{rank}")  # per-rank files, moved in below
    os.makedirs(staging, exist_ok=True)
    for name, obj in mine.items():
        torch.save(obj, os.path.join(staging, name + ".tmp"))
        os.replace(os.path.join(staging, name + ".tmp"), os.path.join(staging, name))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if model_cfg.llm_config.tie_word_embeddings:
            sd.pop("language_model.lm_head.weight", None)

        def write(tmp):
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(model_cfg.to_dict(), f, indent=2)
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt"})
            for r in range(world):
                rdir = os.path.join(parent, "." + os.path.basename(path) + f".rank{r}")
                for name in os.listdir(rdir):
                    os.replace(os.path.join(rdir, name), os.path.join(tmp, name))
            full_meta = dict(meta, world_size=world, weights_sha256=file_sha256(os.path.join(tmp, "model.safetensors")))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(full_meta, f, indent=1)
        M.atomic_write_dir(path, write)
        for r in range(world):
            os.rmdir(os.path.join(parent, "." + os.path.basename(path) + f".rank{r}"))
    if dist.is_initialized():
        dist.barrier()


class CheckpointError(RuntimeError):
    pass


def verify_checkpoint(path: str) -> dict:
    """Return meta.json of a complete, uncorrupted checkpoint, else raise CheckpointError saying why."""
    meta_path = os.path.join(path, "meta.json")
    weights = os.path.join(path, "model.safetensors")
    for p in (meta_path, weights, os.path.join(path, "config.json")):
        if not os.path.exists(p):
            raise CheckpointError(f"checkpoint {path} is incomplete: {os.path.basename(p)} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is unreadable ({e})") from None
    want = meta.get("weights_sha256")
    if want and file_sha256(weights) != want:
        raise CheckpointError(f"checkpoint {path} is corrupted: model.safetensors does not match the sha256 "
                              f"recorded in meta.json (truncated or modified after saving)")
    for r in range(meta.get("world_size", 1)):
        if meta.get("has_optimizer") and not os.path.exists(os.path.join(path, f"optim_rank{r}.pt")):
            raise CheckpointError(f"checkpoint {path} is incomplete: optim_rank{r}.pt is missing")
    return meta


def step_checkpoints(run_dir: str) -> list:
    if not os.path.isdir(run_dir):
        return []
    return sorted(os.path.join(run_dir, d) for d in os.listdir(run_dir) if d.startswith("step-"))


def find_resume_checkpoint(run_dir: str, log) -> Optional[str]:
    """The newest checkpoint of the run that verifies; corrupt ones are reported and skipped."""
    for path in reversed(step_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log(f"resume: refusing {path}: {e}")
    return None


def prune_checkpoints(run_dir: str, keep: int):
    for path in step_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        import shutil
        shutil.rmtree(path, ignore_errors=True)


# ==============================================================================================
# evaluation on the held-out split

@torch.no_grad()
def evaluate(model, loader_factory, n_packs: int, device, autocast) -> float:
    """Global token-mean loss over the first `n_packs` steps of the held-out stream."""
    was_training = model.training
    model.eval()
    ce, n = 0.0, 0.0
    for i, packs in enumerate(loader_factory()):
        if i >= n_packs:
            break
        for pack in packs:
            pack = to_device(pack, device)
            with autocast():
                out = forward_pack(model, pack)
            ce += float(out.ce_sum)
            n += float(out.n_targets)
    ce, n = all_reduce_sum([ce, n], device)
    model.train(was_training)
    return ce / max(n, 1)


# ==============================================================================================
# one optimizer step (shared by the loop, the tests and the benchmark)

def train_step(model, opt, packs, params, grad_clip: float, world: int, device, autocast) -> dict:
    """Forward/backward over this rank's packed micro-batches, then clip and step. The loss is the
    global token mean of the whole step (all micro-batches, all ranks; packing.micro_batch_loss),
    so it does not depend on how samples were packed, accumulated or sharded (§5.1)."""
    n_global = packing.global_loss_tokens(packs)
    cfg = model.cfg.llm_config
    ce_sum, useful, aux_sum, ent = 0.0, 0, 0.0, []
    for pack in packs:
        with autocast():
            out = forward_pack(model, pack)
        loss = packing.micro_batch_loss(out.ce_sum, n_global, world)
        if out.aux_loss is not None:                                     # MoE load balancing (§2.2)
            loss = loss + cfg.router_aux_loss_coef * out.aux_loss / len(packs)
            aux_sum += float(out.aux_loss.detach())
            ent.append(moe.expert_load_entropy(out.router_logits, cfg.num_experts_per_tok))
        loss.backward()
        ce_sum += float(out.ce_sum.detach())
        useful += int(pack["input_ids"].numel())
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ce_tot, useful_tot = all_reduce_sum([ce_sum, useful], device)
    res = {"loss": ce_tot / max(n_global, 1), "grad_norm": gnorm, "tokens": useful_tot}
    if ent:
        res.update(moe_entropy=sum(e["mean_entropy"] for e in ent) / len(ent),
                   moe_max_load=sum(e["max_over_mean"] for e in ent) / len(ent), moe_aux=aux_sum / len(packs))
    return res


# ==============================================================================================
# the training loop

def train(cfg: StageConfig, model_cfg: M.SAILVLConfig, resume: Optional[str] = None) -> str:
    rank, world, device = setup_distributed()
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    run_dir = stage_dir(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    tok = data.load_tokenizer(cfg.tokenizer or None)
    if not cfg.manifests:
        if rank == 0:
            data.ensure_synth(cfg.data_dir)
        if dist.is_initialized():
            dist.barrier()

    cuda = device.type == "cuda"
    trainable = modules_of(cfg.trainable)
    if world == 1:
        model = build_stage_model(cfg, model_cfg, log)
        model_cfg = model.cfg
        freeze(model, trainable)
        model.to(device)
    else:
        # FSDP2 (torchtitan's recipe): build on the meta device, shard, allocate only this rank's
        # shards, then load the full weights that rank 0 alone builds (init / previous stage / HF)
        full = build_stage_model(cfg, model_cfg, log) if rank == 0 else None
        box = [full.cfg if full is not None else None]
        dist.broadcast_object_list(box, src=0)
        model_cfg = box[0]
        with torch.device("meta"):
            model = M.SAILVL(model_cfg)
        freeze(model, trainable)
        parallelize(model, device, mixed_precision=cuda)
        model.to_empty(device=device)
        set_full_state_dict(model, full.state_dict() if full is not None else {}, world)
        del full
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {M.count_params(model) / 1e6:.2f}M params, {n_train / 1e6:.2f}M trainable ({', '.join(trainable)})")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and world == 1 else \
        (lambda: torch.autocast("cpu", enabled=False))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=not cuda or None)
    search = AdaLRS(model, opt, total_steps=cfg.steps, cfg=cfg.adalrs_cfg, log=log) if cfg.adalrs else None

    dataset, loader = build_loader(cfg, model_cfg, tok, "train", rank, world, cfg.seed)
    eval_factory = lambda: build_loader(cfg, model_cfg, tok, "eval", rank, world, cfg.seed + 1)[1]  # noqa: E731

    step = 0
    if resume:
        meta = verify_checkpoint(resume)
        if meta.get("world_size", 1) != world:
            raise CheckpointError(f"{resume} was saved by {meta['world_size']} processes, this run has {world}")
        from safetensors.torch import load_file
        sd = load_file(os.path.join(resume, "model.safetensors")) if rank == 0 or world == 1 else {}
        set_full_state_dict(model, sd, world)
        load_local_optimizer_state(opt, torch.load(os.path.join(resume, f"optim_rank{rank}.pt"),
                                                   weights_only=True))
        loader.load_state_dict(meta["loader"])
        if search is not None and meta.get("adalrs"):
            snap = os.path.join(resume, f"adalrs_rank{rank}.pt")           # the rollback copy of a running trial
            search.load_state_dict(meta["adalrs"], snapshot=torch.load(snap, weights_only=True)
                                   if meta["adalrs"].get("has_snapshot") else None)
        set_rng_state(meta["rng"][str(rank)] if str(rank) in meta["rng"] else meta["rng"]["0"])
        step = meta["step"]
        log(f"resume: continuing from {resume} at step {step}")

    log("config: " + json.dumps(asdict(cfg)))
    log("model config: " + json.dumps(model_cfg.to_dict()))
    os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics_path):   # keep the log of the steps that the run keeps
        with open(metrics_path) as f:
            kept = [ln for ln in f if resume and json.loads(ln).get("step", 0) <= step]
        write_lines_atomic(metrics_path, kept)
    metrics = open(metrics_path, "a") if rank == 0 else None
    if cfg.eval_every and step == 0:                                     # where the held-out loss starts
        log(f"eval {step:05d} | held-out loss {evaluate(model, eval_factory, cfg.eval_packs, device, autocast):.4f}")
    model.train()
    batches = iter(loader)
    t_last = time.time()
    first_loss = last_loss = None
    while step < cfg.steps:
        # -- one optimizer step over this rank's micro-batches (global token mean, §5.1) --------
        mult = lr_multiplier(step, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * mult * (search.lr_scale if search else 1.0)
        try:
            packs = next(batches)
        except StopIteration:
            batches = iter(loader)
            packs = next(batches)
        packs = [to_device(p, device) for p in packs]
        res = train_step(model, opt, packs, params, cfg.grad_clip, world, device, autocast)
        step_loss, gnorm, useful_tot = res["loss"], res["grad_norm"], res["tokens"]
        step += 1
        if search is not None:
            search.observe(step_loss)
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss
        # -- one log line per step ----------------------------------------------------------------
        dt = time.time() - t_last
        t_last = time.time()
        capacity = cfg.max_tokens * len(packs) * world
        rec = {"step": step, "loss": step_loss, "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
               "tok_per_s": useful_tot / max(dt, 1e-9), "pad_frac": 1 - useful_tot / capacity}
        line = (f"step {step:05d}/{cfg.steps:05d} | loss {step_loss:.4f} | lr {rec['lr']:.2e} | gnorm {gnorm:.3f} "
                f"| tok/s {rec['tok_per_s']:,.0f} | pad {100 * rec['pad_frac']:.1f}%")
        if "moe_entropy" in res:
            rec.update({k: res[k] for k in ("moe_entropy", "moe_max_load", "moe_aux")})
            line += f" | moe_ent {res['moe_entropy']:.3f} max/mean {res['moe_max_load']:.2f}"
        log(line)
        # -- eval and checkpoints -------------------------------------------------------------------
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            rec["eval_loss"] = evaluate(model, eval_factory, cfg.eval_packs, device, autocast)
            log(f"eval {step:05d} | held-out loss {rec['eval_loss']:.4f}")
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            meta = {"stage": cfg.stage, "step": step, "config": asdict(cfg), "loader": loader.state_dict(),
                    "adalrs": search.state_dict() if search else None, "has_optimizer": True,
                    "rng": gather_rng(rank, world)}
            extra = {f"adalrs_rank{rank}.pt": search.snapshot_state_dict()} if search else {}
            save_checkpoint(os.path.join(run_dir, f"step-{step:06d}"), model, model_cfg, opt, meta, rank, world,
                            extra_rank_files={k: v for k, v in extra.items() if v is not None})
            if rank == 0:
                prune_checkpoints(run_dir, cfg.keep_checkpoints)
    # -- the stage's output: out/<stage>/ (what the next stage starts from) ----------------------
    meta = {"stage": cfg.stage, "step": step, "config": asdict(cfg), "first_loss": first_loss,
            "final_loss": last_loss, "has_optimizer": False, "rng": gather_rng(rank, world)}
    save_final(run_dir, model, model_cfg, meta, rank, world)
    if metrics:
        metrics.close()
    return run_dir


def gather_rng(rank: int, world: int) -> dict:
    st = rng_state()
    if world > 1:
        out = [None] * world
        dist.all_gather_object(out, st)
        return {str(r): s for r, s in enumerate(out)}
    return {str(rank): st}


def set_full_state_dict(model, sd: dict, world: int):
    """Full (consolidated) weights into the model; under FSDP only rank 0 holds them and they are
    broadcast shard by shard."""
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        M.load_state_dict_strict(model, sd, "checkpoint")


def save_final(run_dir: str, model, model_cfg, meta: dict, rank: int, world: int):
    """The stage's result in out/<stage>/: config.json, model.safetensors and meta.json written
    into the folder beside its step-* checkpoints and metrics (each file atomically)."""
    from safetensors.torch import save_file
    sd = full_state_dict(model, world)
    if rank == 0:
        if model_cfg.llm_config.tie_word_embeddings:
            sd.pop("language_model.lm_head.weight", None)
        os.makedirs(run_dir, exist_ok=True)
        tmp = os.path.join(run_dir, "model.safetensors.tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(run_dir, "model.safetensors"))
        write_json_atomic(os.path.join(run_dir, "config.json"), model_cfg.to_dict())
        meta = dict(meta, world_size=world, weights_sha256=file_sha256(os.path.join(run_dir, "model.safetensors")))
        write_json_atomic(os.path.join(run_dir, "meta.json"), meta)
    if dist.is_initialized():
        dist.barrier()


def write_lines_atomic(path: str, lines: list):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ==============================================================================================
# model soup (§4.2.1): average homogeneous checkpoints

def soup(cfg: StageConfig, ckpts: list) -> str:
    """Average the weights of checkpoints with the same architecture (refuses mismatched configs),
    evaluate every input and the soup on the held-out split, write out/soup/."""
    if len(ckpts) < 2:
        raise SystemExit("soup: give at least two checkpoints: --ckpts A B [C ...]")
    rank, world, device = setup_distributed()
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    models = [M.SAILVL.from_pretrained(c) for c in ckpts]
    ref = models[0].cfg.to_dict()
    for c, m in zip(ckpts[1:], models[1:]):
        if m.cfg.to_dict() != ref:
            diff = sorted(k for k in set(ref) | set(m.cfg.to_dict()) if ref.get(k) != m.cfg.to_dict().get(k))
            raise SystemExit(f"soup: {c} has a different architecture from {ckpts[0]} (config differs in {diff}); "
                             f"the paper's soup averages homogeneous checkpoints only (§4.2.1)")
    sds = [m.state_dict() for m in models]
    avg = {k: (sum(sd[k].double() for sd in sds) / len(sds)).to(sds[0][k].dtype) if sds[0][k].is_floating_point()
           else sds[0][k] for k in sds[0]}
    souped = M.SAILVL(models[0].cfg)
    souped.load_state_dict(avg)
    tok = data.load_tokenizer(cfg.tokenizer or None)
    if not cfg.eval_manifests:
        data.ensure_synth(cfg.data_dir)
    eval_cfg = dataclasses.replace(cfg, stage="sft4") if not cfg.eval_manifests else cfg
    factory = lambda: build_loader(eval_cfg, souped.cfg, tok, "eval", rank, world, cfg.seed + 1)[1]  # noqa: E731
    nocast = lambda: torch.autocast("cpu", enabled=False)                 # noqa: E731
    results = {}
    for name, m in list(zip(ckpts, models)) + [("soup", souped)]:
        results[name] = evaluate(m.to(device), factory, cfg.eval_packs, device, nocast)
        log(f"soup eval | {name}: held-out loss {results[name]:.4f}")
    out = stage_dir(cfg)
    if rank == 0:
        souped.save_pretrained(out)
        write_json_atomic(os.path.join(out, "meta.json"),
                          {"stage": "soup", "inputs": ckpts, "eval_loss": results, "config": asdict(cfg),
                           "weights_sha256": file_sha256(os.path.join(out, "model.safetensors"))})
    return out


# ==============================================================================================
# benchmark: one training step of our Qwen3 vs HF transformers' Qwen3 of the same size

def bench(argv):
    """Tokens/s of one training step (forward + backward + AdamW) of the tiny preset's LLM, ours vs
    HF transformers' Qwen3ForCausalLM with the same weights and inputs, measured in one run."""
    ap = argparse.ArgumentParser(prog="train_stage.py bench", description=bench.__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (best one reported)")
    args = ap.parse_args(argv)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("train_stage.py bench compares against HF transformers: pip install -r tests/requirements.txt")
    import tempfile
    torch.manual_seed(0)
    ours = M.build_model(args.preset).language_model.train()
    with tempfile.TemporaryDirectory() as d:
        M.save_hf_llm(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    ids = torch.randint(0, min(256, ours.cfg.vocab_size), (args.batch, args.seq))
    labels = ids.clone()

    def step_fn(m, is_hf):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            logits = m(ids).logits if is_hf else m(ids)
            ce, n = M.shifted_cross_entropy(logits, labels)
            (ce / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(ce.detach() / n)
        return step

    runs = {"ours": step_fn(ours, False), "hf": step_fn(hf, True)}
    first = {k: f() for k, f in runs.items()}                           # warm-up; same weights, same loss
    best = {k: float("inf") for k in runs}
    for _ in range(args.steps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    tok = args.batch * args.seq
    print(f"train step (fwd+bwd+AdamW), {args.preset} LLM ({M.count_params(ours) / 1e6:.2f}M params), batch "
          f"{args.batch}x{args.seq}, fp32, {torch.get_num_threads()} threads, best of {args.steps}")
    print(f"  first-step loss: ours {first['ours']:.5f} | HF {first['hf']:.5f}")
    print(f"  ours        {tok / best['ours']:10,.0f} tok/s")
    print(f"  HF Qwen3    {tok / best['hf']:10,.0f} tok/s")
    print(f"  ratio ours / HF {best['hf'] / best['ours']:.2f}x")


# ==============================================================================================
# command line

NEXT = {"lm0": "vit1", "vit1": "vit2", "vit2": "vit3", "vit3": "pretrain1", "pretrain1": "pretrain2",
        "pretrain2": "sft1", "sft1": "sft2", "sft2": "sft3", "sft3": "sft4", "sft4": "soup",
        "soup": "longcot", "longcot": "rl-verifiable", "thinkfusion": "rl-mixed"}


def help_text() -> str:
    lines = [__doc__.strip(), "", "stages (tiny default | the paper's values):"]
    for name in STAGE_NAMES:
        c = stage_config(name)
        lines.append(f"  {name:12s} trains {c.trainable or '-'}; {c.steps} steps, lr {c.lr:g}, {c.max_tokens} tokens/pack")
        lines.append(f"  {'':12s} paper: {c.paper}")
    lines += ["", "named options:",
              "  --stage NAME          the stage to run (default vit1)",
              "  --resume [DIR]        continue from DIR, or from the newest good out/<stage>/step-* checkpoint",
              "  --ckpts A B ...       soup: the checkpoints to average",
              "  --init-from DIR       start from this SAIL-VL2 folder instead of the previous stage",
              "  --init-llm DIR        HF Qwen3 / Qwen3-MoE folder for the language model",
              "  --init-vit DIR        HF AIMv2 / SAIL-ViT folder for the vision encoder",
              "", "--key=value overrides (StageConfig; the model as --model.<field>=...):"]
    defaults = StageConfig()
    for f in fields(StageConfig):
        if f.name != "paper":
            lines.append(f"  --{f.name}={getattr(defaults, f.name)!r}")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--stage", default="vit1")
    ap.add_argument("--resume", nargs="?", const="auto", default=None)
    ap.add_argument("--ckpts", nargs="+", default=[])
    ap.add_argument("--init-from", dest="init_from", default=None)
    ap.add_argument("--init-llm", dest="init_llm", default=None)
    ap.add_argument("--init-vit", dest="init_vit", default=None)
    ap.add_argument("-h", "--help", action="store_true")
    args, rest = ap.parse_known_args(argv)
    if args.help:
        print(help_text())
        raise SystemExit(0)
    cfg = stage_config(args.stage)
    for k in ("init_from", "init_llm", "init_vit"):
        if getattr(args, k):
            setattr(cfg, k, getattr(args, k))
    preset = next((r.split("=", 1)[1] for r in rest if r.startswith("--preset=")), cfg.preset)
    model_cfg = M.preset_config(preset)
    apply_overrides({"": cfg, "model": model_cfg}, rest)
    return args, cfg, model_cfg


def run_stage(stage: str, overrides: list = (), resume: Optional[str] = None) -> str:
    """Programmatic entry (tests, benchmarks): run `stage` with `--key=value` overrides."""
    _, cfg, model_cfg = parse_args(["--stage", stage, *overrides])
    return train(cfg, model_cfg, resume)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    args, cfg, model_cfg = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    log = lambda *a: print0(rank, *a)                                    # noqa: E731
    log(f"stage {cfg.stage}: {cfg.paper}")
    if cfg.stage == "soup":
        out = soup(cfg, args.ckpts)
    else:
        resume = None
        if args.resume == "auto":
            resume = find_resume_checkpoint(stage_dir(cfg), log)
            if resume is None:
                log(f"resume: no usable checkpoint under {stage_dir(cfg)}; starting from the beginning")
        elif args.resume:
            resume = args.resume
            try:
                verify_checkpoint(resume)
            except CheckpointError as e:
                raise SystemExit(f"resume: {e}") from None
        needs_lm0 = (cfg.stage == "vit1" and not resume and not (cfg.init_from or cfg.init_llm)
                     and previous_stage_dir(cfg) is None)
        if needs_lm0:
            log(f"no language-pretrained LLM found ({stage_dir(cfg, 'lm0')} is missing): running the short "
                f"lm0 stage first, which pre-trains the tiny LLM on the synthetic text (Qwen3's role in the paper)")
            lm0 = stage_config("lm0")
            for k in ("out_dir", "data_dir", "seed", "preset", "tokenizer", "max_tokens"):
                setattr(lm0, k, getattr(cfg, k))
            lm0.steps = cfg.lm0_steps
            train(lm0, M.preset_config(cfg.preset))
            log(f"lm0 done: {stage_dir(cfg, 'lm0')}; now {cfg.stage}")
        out = train(cfg, model_cfg, resume)
    if dist.is_initialized():
        dist.destroy_process_group()
    nxt = NEXT.get(cfg.stage)
    log(f"done: {cfg.stage} checkpoint in {out}/ (config.json, model.safetensors, meta.json, metrics.jsonl)")
    if nxt:
        tool = "rl.py" if nxt.startswith("rl-") else "train_stage.py"
        extra = (f" --ckpts {out} <a twin: --stage sft4 --seed=2 --out_dir=out-seed2 --init-from "
                 f"{stage_dir(cfg, 'sft3')}>/sft4" if nxt == "soup" else "")
        img = os.path.join(cfg.data_dir, "caption", "images", "eval_00000.png")
        log(f"next: torchrun {tool} --stage {nxt}{extra}")
        log(f"try it: python sample.py --ckpt {out} --image {img} --prompt 'Write a short caption.'")


if __name__ == "__main__":
    main()
