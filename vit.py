"""SAIL-ViT, the vision encoder of SAIL-VL2 (paper §2.1; checkpoint layout of the official modeling_sailvit.py).

An AIMv2-style ViT: Conv2d patch embedding (with bias) + RMSNorm, a learned absolute position
embedding (no CLS token), pre-norm blocks (fused qkv, bidirectional attention, SwiGLU MLP
`fc2(silu(fc1 x) * fc3 x)`), and a final RMSNorm. The module and parameter names follow the
official SAIL-ViT / apple AIMv2 code (`preprocessor.patchifier.proj`, `trunk.blocks.N.attn.qkv`,
...), so an official SAIL-VL2 checkpoint loads without renaming; `load_hf_vit` also reads
HF transformers `Aimv2VisionModel` folders.

AnyRes (§2.1.2): an image of any size (multiples of the patch size) is embedded on its own patch
grid; the learned 32×32 position grid is resized (bicubic) to that grid, as the paper describes
("pretrained embeddings are resized to match the input resolution"). Images of different sizes
go through the trunk together as one packed row, separated by `cu_seqlens`, using
`kernels.packed_attention` (non-causal), so no patch attends to another image.

Activation checkpointing (`--ac=block`, a memory option of ours, not the paper's): a block whose
`checkpoint_activations` is set keeps only its input in forward and recomputes its inside in
backward (`maybe_checkpoint`; the LLM's decoder layers in model.py use the same function).
"""
import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels


@dataclass
class ViTConfig:
    hidden_size: int = 1536
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 12
    patch_size: int = 14
    image_size: int = 448          # native tile size; the pos-embed grid is image_size // patch_size
    num_channels: int = 3
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> "ViTConfig":
        presets = {
            # SAIL-ViT-Huge, the encoder of every SAIL-VL2 model (the official modeling_sailvit.py)
            "huge": cls(),
            # SAIL-ViT-Large / AIMv2-Large at 448 px
            "large": cls(hidden_size=1024, intermediate_size=2816, num_attention_heads=8),
            # CPU-sized: 112-px tiles -> 8×8 patches -> 16 visual tokens after the 2×2 shuffle
            "tiny": cls(hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, image_size=112),
        }
        if name not in presets:
            raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """Read our own, the official SAIL-ViT (`use_bias`) or HF AIMv2 (`mlp_bias`) config."""
        if d.get("is_native"):
            raise ValueError("AIMv2 'native' variants (2D sin-cos position embedding) are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported ViT config: hidden_act={d['hidden_act']!r} (SAIL-ViT / AIMv2 use silu)")
        ours = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in ours}
        if "use_bias" in d:                     # official SAIL-ViT / apple naming
            kw.setdefault("proj_bias", bool(d["use_bias"]))
            kw.setdefault("mlp_bias", bool(d["use_bias"]))
        elif d.get("model_type") == "aimv2_vision_model" or "mlp_bias" in d:
            kw.setdefault("proj_bias", bool(d.get("qkv_bias", False)))  # HF ties out_proj bias to qkv_bias
        return cls(**kw)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, then scaled by the weight (as AIMv2 and Qwen3)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------------------------
# preprocessor: patchify + learned absolute position embedding

class Patchifier(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x):                                    # (N, 3, H, W)
        x = self.proj(x).flatten(2).transpose(1, 2)          # (N, h*w, D)
        return self.norm(x)


class Preprocessor(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patchifier = Patchifier(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, cfg.hidden_size))

    def position_embedding(self, h: int, w: int):
        """(1, h*w, D): the learned grid, bicubically resized when (h, w) is not the native grid."""
        G = self.cfg.grid
        if (h, w) == (G, G):
            return self.pos_embed
        grid = self.pos_embed.reshape(1, G, G, -1).permute(0, 3, 1, 2)           # (1, D, G, G)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        return grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def forward(self, x):                                    # (N, 3, H, W), one size
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        h, w = x.shape[-2] // p, x.shape[-1] // p
        return self.patchifier(x) + self.position_embedding(h, w)


# ----------------------------------------------------------------------------------------------
# trunk: pre-norm blocks over a packed row of patches

class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.proj_bias)

    def forward(self, x, cu_seqlens):                        # x (T, D): all images' patches
        T, D = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.n_heads, D // self.n_heads).unbind(1)  # (T, H, hd) each
        out = kernels.packed_attention(q, k, v, cu_seqlens, causal=False)             # (T, H, hd)
        return self.proj(out.reshape(T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.fc3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


def maybe_checkpoint(fn, on: bool, *args):
    """fn(*args); with `on` and autograd recording, under torch.utils.checkpoint (non-reentrant):
    forward keeps only the inputs, backward recomputes the rest. Called inside a block's forward,
    so under FSDP2 the block's all-gather hooks stay outside the checkpointed region (as with
    torch.distributed's checkpoint_wrapper applied before fully_shard)."""
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm_1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.norm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.checkpoint_activations = False          # --ac=block (model.set_activation_checkpointing)

    def forward(self, x, cu_seqlens):
        return maybe_checkpoint(self.body, self.checkpoint_activations, x, cu_seqlens)

    def body(self, x, cu_seqlens):                   # x (T, D): all images' patches
        x = x + self.attn(self.norm_1(x), cu_seqlens)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_trunk_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cu_seqlens):
        for block in self.blocks:
            x = block(x, cu_seqlens)
        return self.post_trunk_norm(x)


class SAILViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = Preprocessor(cfg)
        self.trunk = Trunk(cfg)

    def forward(self, pixel_values):
        """pixel_values (N, 3, H, W), all the same size -> (N, patches, D) after the final norm."""
        N = pixel_values.shape[0]
        x = self.preprocessor(pixel_values)                  # (N, P, D)
        P = x.shape[1]
        cu = torch.arange(0, (N + 1) * P, P, dtype=torch.int32, device=x.device)
        return self.trunk(x.reshape(N * P, -1), cu).reshape(N, P, -1)

    def forward_packed(self, images):
        """AnyRes: a list of images (3, H_i, W_i) or (1, 3, H_i, W_i) of different sizes, run as
        one packed row. Returns a list of (h_i*w_i, D) patch features and the list of (h_i, w_i)."""
        p = self.cfg.patch_size
        feats, grids = [], []
        for img in images:
            img = img if img.dim() == 4 else img.unsqueeze(0)
            feats.append(self.preprocessor(img)[0])          # (h*w, D)
            grids.append((img.shape[-2] // p, img.shape[-1] // p))
        lens = [f.shape[0] for f in feats]
        cu = torch.tensor([0] + lens, device=feats[0].device).cumsum(0).to(torch.int32)
        out = self.trunk(torch.cat(feats, 0), cu)            # (sum h*w, D)
        return list(out.split(lens, 0)), grids

    def init_weights(self, std: float = 0.02):
        for name, prm in self.named_parameters():
            if name.endswith("norm.weight") or ".norm_" in name or "post_trunk_norm" in name:
                nn.init.ones_(prm)
            elif name.endswith(".bias"):
                nn.init.zeros_(prm)
            else:
                nn.init.normal_(prm, std=std)


# ----------------------------------------------------------------------------------------------
# loading: our / official SAIL naming, apple naming, HF Aimv2VisionModel naming

def hf_aimv2_to_sail(sd: dict) -> dict:
    """Rename an HF `Aimv2VisionModel` state dict to SAIL-ViT names (HF's modeling_aimv2.py vs the official modeling_sailvit.py); q/k/v are fused
    into `qkv` in that order, the attention-pooling head (unused by SAIL-VL2) is dropped."""
    sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    top = {"embeddings.patch_embed.weight": "preprocessor.patchifier.proj.weight",
           "embeddings.patch_embed.bias": "preprocessor.patchifier.proj.bias",
           "embeddings.rms_norm.weight": "preprocessor.patchifier.norm.weight",
           "rms_norm.weight": "trunk.post_trunk_norm.weight"}
    per_layer = {"rms_norm1": "norm_1", "rms_norm2": "norm_2", "attention.out_proj": "attn.proj",
                 "ffn.gate_proj": "mlp.fc1", "ffn.up_proj": "mlp.fc3", "ffn.down_proj": "mlp.fc2"}
    out = {}
    for k, v in sd.items():
        if k.startswith("head."):
            continue
        if k == "embeddings.position_embedding.weight":
            out["preprocessor.pos_embed"] = v.unsqueeze(0)   # (P, D) -> (1, P, D)
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
                if module == "attention.q_proj":
                    a = f"encoder.layers.{i}.attention."
                    out[f"trunk.blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                        [sd[f"{a}{n}_proj.{kind}"] for n in "qkv"], 0)
            else:  # unknown names pass through unchanged so strict loading reports them
                out[f"trunk.blocks.{i}.{per_layer[module]}.{kind}" if module in per_layer else k] = v
        else:
            out[top.get(k, k)] = v
    return out


def load_state_dict_strict(module: nn.Module, sd: dict, what: str):
    """Load `sd` into `module`, refusing (with the first offending keys named) any missing,
    unexpected or wrongly shaped tensor: never a silent partial load."""
    own = module.state_dict()
    # tied parameters (lm_head = embed_tokens) appear under two names: one of them suffices
    ptr = {}
    for k, t in own.items():
        ptr.setdefault(t.data_ptr(), []).append(k)
    aliases = {k for ks in ptr.values() if any(x in sd for x in ks) for k in ks if k not in sd}
    own = {k: t for k, t in own.items() if k not in aliases}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        msg = [f"cannot load {what}:"]
        if missing:
            msg.append(f"  {len(missing)} missing keys, e.g. {missing[:5]}")
        if unexpected:
            msg.append(f"  {len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        if shapes:
            msg.append(f"  {len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        raise ValueError("\n".join(msg))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(t.dtype))


def read_safetensors_folder(path: str) -> dict:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    sd = {}
    for fname in files:
        sd.update(load_file(os.path.join(path, fname)))
    return sd


def read_vit_config(path: str) -> ViTConfig:
    """The ViTConfig of a folder's config.json: HF `Aimv2VisionModel` / apple AIMv2 / SAIL-ViT, or the
    `vision_config` of an `Aimv2Model` or SAIL-VL2 folder, so AIMv2-Large or SAIL-ViT-Huge need no
    shape options."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    return ViTConfig.from_dict(raw.get("vision_config", raw))


def load_hf_vit(path: str) -> SAILViT:
    """A folder saved by HF `Aimv2VisionModel`, or with apple/SAIL naming (`preprocessor.patchifier…`,
    `trunk.blocks.N…`, optionally under a `vision_model.` prefix as in SAIL-VL2 checkpoints)."""
    cfg = read_vit_config(path)
    sd = read_safetensors_folder(path)
    if any(k.startswith("vision_model.") for k in sd):       # a whole SAIL-VL2 folder: keep the ViT part
        sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    if any(".layers." in k and "encoder" in k for k in sd):
        sd = hf_aimv2_to_sail(sd)
    model = SAILViT(cfg)
    load_state_dict_strict(model, sd, f"ViT weights from {path}")
    return model
