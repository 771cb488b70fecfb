"""§2.1 SAIL-ViT, the vision encoder of SAIL-VL2 (arXiv 2509.14033): the pixels it reads and the encoder.

Input, first, as in the paper:

  Images   any file mode as 8-bit RGB (`to_rgb`), ImageNet-normalised; the official dynamic tiling of
           image_processing_sailvl.py (InternVL's dynamic_preprocess: the grid closest in aspect, tiles
           row-major, a thumbnail when several) or AnyRes (§2.1.2: one image at its own size, sides
           multiples of patch_size / downsample_ratio); `load_image`
  Video    uniform-segment frame sampling with PyAV, each frame decoded from the keyframe before it,
           one tile per frame (§6.1; the official code has no video path); `load_video`

A file that cannot be read raises `DataError`, the one error for a bad input sample (data.py, which
turns records into samples, raises it too, and its datasets count and skip such samples).

The encoder (checkpoint layout of the official modeling_sailvit.py) is an AIMv2-style ViT: Conv2d patch
embedding (with bias) + RMSNorm, a learned absolute position embedding (no CLS token), pre-norm blocks
(fused qkv, bidirectional attention, SwiGLU MLP `fc2(silu(fc1 x) * fc3 x)`), and a final RMSNorm. The
module and parameter names follow the official SAIL-ViT / apple AIMv2 code (`preprocessor.patchifier.proj`,
`trunk.blocks.N.attn.qkv`, ...), so an official SAIL-VL2 checkpoint loads without renaming; `load_hf_vit`
also reads HF transformers `Aimv2VisionModel` folders.

AnyRes (§2.1.2): an image of any size (multiples of the patch size) is embedded on its own patch
grid; the learned 32×32 position grid is resized (bicubic) to that grid, as the paper describes
("pretrained embeddings are resized to match the input resolution"). Images of different sizes
go through the trunk together as one packed row, separated by `cu_seqlens`, using
`kernels.packed_attention` (non-causal), so no patch attends to another image.

Activation checkpointing (`--ac=block`, a memory option of ours, not the paper's): a block whose
`checkpoint_activations` is set keeps only its input in forward and recomputes its inside in
backward (`maybe_checkpoint`; the LLM's decoder layers in model.py use the same function).
"""
import bisect
import json
import math
import os
from dataclasses import dataclass, fields

import av
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

import kernels


class DataError(Exception):
    """A bad input sample (module docstring): `reason` a short category for counting, `where` 'file:line'."""

    def __init__(self, reason: str, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.reason, self.where, self.message = reason, where, message

    def __reduce__(self):                     # pickled from a loader worker back to the trainer
        return DataError, (self.reason, self.where, self.message)


# ----------------------------------------------------------------------------------------------
# input, images: any file mode to 8-bit RGB, official dynamic tiling (image_processing_sailvl.py, InternVL's
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
        cap = max_patches // ((f // patch_size) ** 2) * f * f       # area of max_patches, in f x f blocks
        w, h = (min(w, cap // h // f * f), h) if w >= h else (w, min(h, cap // w // f * f))   # a short side
        # clamped up to f (an aspect of thousands to one) is paid for on the long side
    elif (w // patch_size) * (h // patch_size) < min_patches:
        scale = math.sqrt(min_patches * patch_size * patch_size / (width * height))
        w, h = math.ceil(width * scale / f) * f, math.ceil(height * scale / f) * f
    return w, h


def open_image(path, where: str = None) -> Image.Image:
    """Decode an image file fully (so truncation shows up here), as 8-bit RGB (`to_rgb`); DataError if
    it can't. A PIL image is converted as it is."""
    if isinstance(path, Image.Image):
        return to_rgb(path)
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
               use_thumbnail: bool = True, where: str = None):
    """(pixel_values (N, 3, S, S), N) of an image path or PIL image, tiled as the official
    `load_image`: N = tiles (+ the thumbnail when there are several), float32, ImageNet-normalised."""
    img = open_image(path_or_image, where)
    tiles = tile_image(img, max_tiles, min_tiles, image_size, use_thumbnail)
    return to_pixels(tiles), len(tiles)


def load_image_anyres(path_or_image, patch_size: int = 14, downsample_ratio: float = 0.5,
                      max_patches: int = 16384, min_patches: int = 16, where: str = None):
    """(pixel_values (1, 3, H, W), 1) of an image path or PIL image at its AnyRes size (anyres_size):
    H, W multiples of patch_size / downsample_ratio, float32, ImageNet-normalised."""
    img = open_image(path_or_image, where)
    size = anyres_size(img.width, img.height, patch_size, downsample_ratio, max_patches, min_patches)
    return to_pixels([img.resize(size, Image.BICUBIC)]), 1


# ----------------------------------------------------------------------------------------------
# input, video (§6.1): one frame per uniform segment, each frame one tile; the segment's middle frame
# for evaluation, a random one for training (InternVL's get_frame_indices). The packets' timestamps
# (demuxed, not decoded) number the frames in presentation order and give the keyframes, so each
# wanted frame is decoded from the keyframe before it: a 16-frame sample of an hour-long video
# decodes 16 short runs, not the hour (`python tests/bench.py video`).

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
    """(timestamps of the frames shown, in presentation order; those of the keyframes; whether an
    edit list hides some) from the packets, without decoding; None when a packet carries no
    timestamp (only decoding can number frames then). A packet an MP4 edit list hides (`is_discard`:
    what a cut by stream copy keeps from the keyframe before the cut) is no frame a decoder outputs,
    but its keyframe is where decoding the first shown frames starts."""
    pts, keys, edited = [], [], False
    for packet in container.demux(stream):
        if packet.pts is None:
            if packet.size:                  # the empty packet that ends the stream has none either
                return None
            continue
        hidden = getattr(packet, "is_discard", False)
        edited |= hidden
        if not hidden:
            pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    return sorted(pts), sorted(keys), edited


def one_thread(stream):
    """Decode and convert on the calling thread alone (FFmpeg's own thread pools off; `to_image`
    takes threads=1): a data-loader worker is a fork of a process with threads, where FFmpeg's
    worker threads have been seen to wait forever. Workers, not FFmpeg, decode in parallel."""
    stream.thread_count = 1
    return stream


def _seek_frames(container, stream, times, wanted) -> dict:
    """{frame number: PIL} of the `wanted` frames: for each, seek to the last keyframe at or before
    it and decode forward to it (or go on decoding when no keyframe lies between the last frame
    decoded and it). None when a seek misses (a container with an inexact index)."""
    pts, keys, _ = times
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
        got[i] = frame.to_image(threads=1)
    return got


def _decode_frames(path, wanted: set):
    """(frames {index: PIL}, total frames decoded) for one pass from the start of the first video
    stream: the way to number frames when the packets carry no timestamps."""
    got, n = {}, 0
    last = max(wanted) if wanted else -1
    with av.open(str(path)) as container:
        one_thread(container.streams.video[0])
        for frame in container.decode(video=0):
            if n in wanted:
                got[n] = frame.to_image(threads=1)
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
            stream = one_thread(container.streams.video[0])
            times = frame_times(container, stream)
            # the container's frame count (0: not stated) against its packets; an edit list's counts hidden ones too
            if times and not times[2] and stream.frames > len(times[0]):
                raise DataError("video", where, f"{path}: the container states {stream.frames} frames but holds "
                                f"{len(times[0])} (truncated file?)")
            n = len(times[0]) if times else stream.frames or _decode_frames(path, set())[1]
            if n <= 0:
                raise DataError("video", where, f"{path}: no decodable frames")
            idx = frame_indices(n, num_frames, training, rng)
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
# the encoder: its configuration
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
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# preprocessor: patchify + learned absolute position embedding

class Patchifier(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x):                                    # (N, 3, H, W), fp32 pixels
        x = x.to(self.proj.weight.dtype)                     # a model held in bf16 without autocast
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))   # (N, h*w, D)


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
        x = self.preprocessor(pixel_values)                  # (N, P, D)
        N, P = x.shape[:2]
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
                if module == "attention.q_proj":       # the rows of qkv, in that order (load_state_dict_strict)
                    a = f"encoder.layers.{i}.attention."
                    out[f"trunk.blocks.{i}.attn.qkv.{kind}"] = [sd[f"{a}{n}_proj.{kind}"] for n in "qkv"]
            else:  # unknown names pass through unchanged so strict loading reports them
                out[f"trunk.blocks.{i}.{per_layer[module]}.{kind}" if module in per_layer else k] = v
        else:
            out[top.get(k, k)] = v
    return out


def load_state_dict_strict(module: nn.Module, sd: dict, what: str):
    """Load `sd` into `module`, refusing (with the first offending keys named) any missing,
    unexpected or wrongly shaped tensor: never a silent partial load. A value may be a list of
    tensors, the parameter's consecutive blocks of rows (what torch.cat would make of them, never
    made): a checkpoint's per-expert or q/k/v tensors, each copied into its rows straight from the
    memory-mapped file, where a stacked copy of a 30B MoE's experts would take tens of GB of host memory."""
    with torch.no_grad():
        for k, t in loadable(module, sd, what).items():
            copy_into(t, sd[k])


def copy_into(t: torch.Tensor, value):
    """`value` into the tensor `t`: a tensor, or consecutive row blocks, each copied into its rows
    (never stacked first); copy_ converts the dtype as it copies (no converted copy)."""
    row = 0
    for block in value if isinstance(value, (list, tuple)) else [value]:
        if block.dim() == 0:
            t.copy_(block)
            continue
        t[row:row + block.shape[0]].copy_(block)
        row += block.shape[0]


def loadable(module: nn.Module, sd: dict, what: str) -> dict:
    """{name: tensor} of `module`'s state that `sd` gives, each once, or a ValueError naming the
    first missing, unexpected or wrongly shaped keys (see load_state_dict_strict)."""
    own = module.state_dict(keep_vars=True)        # the tensors themselves (a sharded model's DTensors too)
    # tied parameters (lm_head = embed_tokens) appear under two names: one of them suffices
    same = {}
    for k, t in own.items():
        same.setdefault(id(t), []).append(k)
    aliases = {k for ks in same.values() if any(x in sd for x in ks) for k in ks if k not in sd}
    own = {k: t for k, t in own.items() if k not in aliases}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {stacked_shape(sd[k]) or 'row blocks that do not stack'} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and stacked_shape(sd[k]) != tuple(own[k].shape)]
    problems = [(missing, 5, "missing keys"), (unexpected, 5, "unexpected keys"),
                (shapes, 3, "shape mismatches")]
    if missing or unexpected or shapes:
        raise ValueError("\n".join([f"cannot load {what}:"] + [f"  {len(keys)} {name}, e.g. {keys[:n]}"
                                                              for keys, n, name in problems if keys]))
    return own


def rows_of(value, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a tensor or of a list of row blocks (joined only where the range spans two)."""
    if not isinstance(value, (list, tuple)):
        return value[start:stop]
    pieces, row = [], 0
    for block in value:
        lo, hi = max(start, row), min(stop, row + block.shape[0])
        if lo < hi:
            pieces.append(block[lo - row:hi - row])
        row += block.shape[0]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def stacked_shape(value) -> tuple:
    """The shape of a tensor, or of a list of row blocks concatenated (None when they do not fit)."""
    if not isinstance(value, (list, tuple)):
        return tuple(value.shape)
    if not value or any(b.dim() == 0 or b.shape[1:] != value[0].shape[1:] for b in value):
        return None
    return (sum(b.shape[0] for b in value), *value[0].shape[1:])


def read_safetensors_folder(path: str) -> dict:
    """All tensors of `model.safetensors`, else of the shards listed in `model.safetensors.index.json`:
    HF's order (a sharded folder re-saved as one file by save_pretrained keeps its old index)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:   # not JSON, or no {"weight_map": {name: file}}
            raise OSError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    out = {}
    for fname in files:
        try:
            out.update(load_file(os.path.join(path, fname)))
        except SafetensorError as e:            # a cut or overwritten file: an OSError, one line at the CLI
            raise OSError(f"{os.path.join(path, fname)}: not a readable safetensors file ({e})") from None
    return out


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
    model = SAILViT(read_vit_config(path))
    load_vit_weights(model, path)
    return model


def vit_tensors(path: str) -> dict:
    """The ViT tensors of such a folder in SAIL-ViT names, memory-mapped (q/k/v of an HF folder fused)."""
    sd = read_safetensors_folder(path)
    if any(k.startswith("vision_model.") for k in sd):       # a whole SAIL-VL2 folder: keep the ViT part
        sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    if any(".layers." in k and "encoder" in k for k in sd):
        sd = hf_aimv2_to_sail(sd)
    return sd


def load_vit_weights(model: SAILViT, path: str):
    """The tensors of such a folder into `model`, each copied straight from the memory-mapped file."""
    load_state_dict_strict(model, vit_tensors(path), f"ViT weights from {path}")
