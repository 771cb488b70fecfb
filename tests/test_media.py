"""Image tiling, AnyRes sizes, image modes, video frame sampling and ViT weight loading (vit.py).

From a hand mutation round: each test guards one behaviour that a small change of vit.py altered
without any other test noticing (tests/test_data.py holds the rest of the media tests).
Expectations are computed by hand (InternVL's dynamic_preprocess / get_frame_indices rules, the AnyRes
size arithmetic written out) or by PIL / plain PyAV directly, never by calling the function under test
twice.
"""
import collections
import json
import os

import av
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import vit
from test_data import CountingContainer, write_gop_video
from vit import DataError

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def norm(im: Image.Image) -> torch.Tensor:
    """ImageNet normalisation by hand: (3, H, W) float32."""
    return torch.from_numpy(((np.asarray(im.convert("RGB")) / 255.0 - MEAN) / STD).transpose(2, 0, 1)).float()


def write_gray_video(path, levels, fmt="mp4", codec="mpeg4", size=64):
    """Frame i is a flat gray of levels[i], so a frame's gray level names its index."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=8)
        s.width = s.height = size
        s.pix_fmt, s.bit_rate = "yuv420p", 2_000_000
        for level in levels:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")))
        c.mux(s.encode())
    return path


def gray_ids(frames) -> list:
    """Frame indices of PIL frames from write_gray_video(levels=[8 * i ...]): centre gray level / 8."""
    return [int(round(np.asarray(f.convert("L"))[16:48, 16:48].mean() / 8)) for f in frames]


# ----------------------------------------------------------------------------------------------
# tiling and AnyRes sizes

def test_tile_grid_tie_needs_more_than_half_the_grid_area():
    """896x1008 (aspect 8/9): 1x1, 2x2 and 3x3 tie (|8/9 - 1| = 1/9, no other grid of <= 12 tiles is
    as close: 3/4 is 5/36 away). InternVL's rule moves to a later tied grid only when the image area
    is strictly greater than half of it: 2x2 (903168 > 401408) yes, 3x3 (903168 = 0.5 * 448^2 * 9) no,
    so 2x2 and 4 + 1 thumbnail tiles."""
    assert 896 * 1008 == 0.5 * 448 * 448 * 9
    assert vit.tile_grid(896, 1008, 1, 12, 448) == (2, 2)
    assert vit.tile_grid(1008, 896, 1, 12, 448) == (2, 2)
    assert vit.load_image(Image.new("RGB", (896, 1008)), max_tiles=12, image_size=448)[1] == 5


def test_anyres_size_rounds_each_side_to_the_nearest_multiple_of_28():
    """Sides go to the nearest multiple of 28 (14 / 0.5), not down: 1000 / 28 = 35.7 -> 36 * 28 = 1008,
    700 / 28 = 25 -> 700, 713 / 28 = 25.5- -> 700 (72 x 50 = 3600 patches, within the bounds)."""
    assert vit.anyres_size(1000, 700) == (1008, 700)
    assert vit.anyres_size(1000, 713) == (1008, 700)


def test_anyres_size_keeps_a_size_of_exactly_max_patches():
    """1800 x 1785 rounds to 1792 x 1792 = 128 x 128 = 16384 patches: exactly max_patches is within
    [min_patches, max_patches], so it is not shrunk (a >= test would make it 1792 x 1764)."""
    assert vit.anyres_size(1800, 1785, max_patches=16384) == (1792, 1792)


def test_anyres_size_scales_a_small_image_up_to_at_least_min_patches():
    """30 x 60 first rounds to 28 x 56 (2 x 4 = 8 patches < 16); scaled by sqrt(16 * 196 / 1800) = 1.32
    the sides are 1.41 and 2.83 blocks of 28, taken up (ceil): 56 x 84, 24 patches. Rounding instead
    would give 28 x 84 = 12 patches, under min_patches. 50 x 40: 2.24 and 1.79 blocks -> 84 x 56."""
    W, H = vit.anyres_size(30, 60, min_patches=16)
    assert (W, H) == (56, 84) and (W // 14) * (H // 14) >= 16
    assert vit.anyres_size(50, 40, min_patches=16) == (84, 56)


def test_load_image_anyres_pixels_are_width_by_height():
    """A 300 x 200 image with max_patches=256: rounded 308 x 196 has 308 patches, so it is scaled by
    sqrt(60000 / 50176) = 1.0935 and floored to 9 x 6 blocks of 28: W=252, H=168 (216 patches). The
    pixels are PIL's bicubic resize to (252, 168), a (1, 3, 168, 252) tensor, not its transpose."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    pv, n = vit.load_image_anyres(img, max_patches=256)
    assert n == 1 and pv.shape == (1, 3, 168, 252)
    torch.testing.assert_close(pv[0], norm(img.resize((252, 168), Image.BICUBIC)), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# image files and modes

def test_open_image_of_a_missing_file_is_missing_file(tmp_path):
    """open_image itself (not only data.py's header read) reports a missing file as `missing_file`
    with the caller's `where`, not as an undecodable image."""
    with pytest.raises(DataError) as e:
        vit.open_image(tmp_path / "nope.png", where="m.jsonl:3")
    assert e.value.reason == "missing_file" and e.value.where == "m.jsonl:3"
    assert "image file not found" in str(e.value)


def test_a_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    """An image over twice Pillow's MAX_IMAGE_PIXELS (Pillow raises DecompressionBombError, not an
    OSError) is a bad sample: DataError('image') naming the file, not an exception that stops training."""
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)              # 400 pixels > 2 * 10
    with pytest.raises(DataError) as e:
        vit.open_image(tmp_path / "bomb.png")
    assert e.value.reason == "image" and str(tmp_path / "bomb.png") in str(e.value)


def test_to_8bit_signed_16bit_modes_have_no_fixed_full_range():
    """Only unsigned 16-bit modes read as v / 257; a signed one (I;16S, I;16BS) is read like I: values
    within [0, 255] as they are, negative ones stretched min..max (-100, 0, 300 -> 0, 63.75 -> 64, 255)."""
    for mode in ("I;16S", "I;16BS"):
        assert vit.to_8bit(np.array([[0, 100, 200]], np.int16), mode).tolist() == [[0, 100, 200]]
        assert vit.to_8bit(np.array([[-100, 0, 300]], np.int16), mode).tolist() == [[0, 64, 255]]
    assert vit.to_8bit(np.array([[0, 100, 200]], np.uint16), "I;16").tolist() == [[0, 0, 1]]   # 200 / 257


# ----------------------------------------------------------------------------------------------
# video

def test_a_stream_without_timestamps_is_numbered_by_decoding(tmp_path):
    """A raw H.264 stream's packets carry no timestamps: frame_times gives None and the frames are
    numbered by decoding from the start (every wanted frame, the last one included). 32 frames, 16
    segments of 2: InternVL's middle frame (lo + hi - 1) // 2 = 2k."""
    try:
        av.codec.Codec("libx264", "w")
    except Exception:
        pytest.skip("PyAV without libx264")
    path = write_gray_video(tmp_path / "v.h264", [8 * i for i in range(32)], fmt="h264", codec="libx264")
    with av.open(str(path)) as c:
        assert any(p.pts is None and p.size for p in c.demux(video=0))      # the premise: no timestamps
        with av.open(str(path)) as c2:
            assert vit.frame_times(c2, c2.streams.video[0]) is None
    assert gray_ids(vit.video_frames(path, num_frames=16)) == [2 * k for k in range(16)]
    assert gray_ids(vit.video_frames(path, num_frames=32)) == list(range(32))        # up to the last frame


class LateSeekContainer(CountingContainer):
    """A PyAV container with an inexact index: every seek lands on the keyframe after the one asked for."""

    def __init__(self, container):
        super().__init__(container, collections.Counter())

    def seek(self, offset, backward=True, any_frame=False, stream=None):
        return self.c.seek(offset + 1, backward=False, any_frame=False, stream=stream)


def test_a_seek_that_misses_falls_back_to_decoding_from_the_start(tmp_path, monkeypatch):
    """When seeking lands past a wanted frame, _seek_frames reports the miss and video_frames decodes
    from the start instead: the frames are still those a plain decode from frame 0 gives. 60 frames,
    4 segments of 15: middles (15k + 15k + 14) // 2 = 7, 22, 37, 52."""
    path = write_gop_video(tmp_path / "gop.mp4", 60)
    real_open = av.open
    with real_open(str(path)) as c:
        plain = [f.to_image() for f in c.decode(video=0)]
    assert len(plain) == 60
    monkeypatch.setattr(vit.av, "open", lambda *a, **k: LateSeekContainer(real_open(*a, **k)))
    got = vit.load_video(path, num_frames=4, image_size=32)
    want = torch.stack([norm(plain[i].resize((32, 32), Image.BICUBIC)) for i in (7, 22, 37, 52)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_videos_decode_on_the_calling_thread_alone(tmp_path, monkeypatch):
    """Seeking and decoding from the start both turn FFmpeg's own decoder threads off: a data-loader
    worker is a fork of a process with threads, where FFmpeg's thread pools have hung the suite."""
    path = write_gop_video(tmp_path / "gop.mp4", 60)
    real_open, opened, streams = av.open, [], []

    def open_(*a, **k):                                        # its stream as vit sets it, before it is closed
        opened.append(real_open(*a, **k))
        streams.append(opened[-1].streams.video[0])
        return opened[-1]
    monkeypatch.setattr(vit.av, "open", open_)
    vit.load_video(path, num_frames=4, image_size=32)                                   # seeks
    monkeypatch.setattr(vit, "_seek_frames", lambda *a: None)                       # a miss: decode from the start
    vit.load_video(path, num_frames=4, image_size=32)
    assert len(streams) == 3 and all(s.thread_count == 1 for s in streams)


def test_a_video_stream_without_frames_is_a_data_error(tmp_path):
    """An AVI whose video stream holds no frame: DataError('video', 'no decodable frames'), not an
    IndexError from sampling frames out of nothing."""
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 1                               # the premise: a stream, no frames
    with pytest.raises(DataError) as e:
        vit.load_video(path, num_frames=4, image_size=32)
    assert e.value.reason == "video" and "no decodable frames" in str(e.value)


def test_training_frames_without_an_rng_differ_between_calls(tmp_path):
    """training=True without an rng draws from fresh entropy: 8 calls on 32 frames / 4 segments of 8
    do not all pick the same frames (chance 8^-28 if they were independent draws), each frame within
    its segment [8k, 8k + 8)."""
    path = write_gray_video(tmp_path / "v.mp4", [8 * i for i in range(32)])
    draws = [tuple(gray_ids(vit.video_frames(path, num_frames=4, training=True))) for _ in range(8)]
    assert all(8 * k <= i < 8 * k + 8 for d in draws for k, i in enumerate(d))
    assert len(set(draws)) > 1


# ----------------------------------------------------------------------------------------------
# loading HF AIMv2 weights

def tiny_aimv2(use_head: bool):
    from transformers import Aimv2VisionConfig, Aimv2VisionModel
    torch.manual_seed(0)
    cfg = Aimv2VisionConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                            image_size=56, patch_size=14, use_head=use_head, rms_norm_eps=1e-5)
    return Aimv2VisionModel(cfg).eval()


def test_hf_aimv2_with_its_attention_pooling_head_loads(tmp_path):
    """An HF Aimv2VisionModel saved with use_head=True (head.* tensors, unused by SAIL-VL2) loads with
    load_hf_vit, and its features equal HF's last_hidden_state."""
    ref = tiny_aimv2(use_head=True)
    ref.save_pretrained(tmp_path)
    from safetensors import safe_open
    assert any(k.startswith("head.") for k in safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    ours = vit.load_hf_vit(str(tmp_path)).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (ours(x) - ref(x).last_hidden_state).abs().max() < 1e-4


def test_an_unknown_tensor_in_an_hf_layer_is_refused(tmp_path):
    """A per-layer tensor with a name the renaming does not know passes through unchanged, so strict
    loading refuses the folder and names it, rather than dropping it silently."""
    from safetensors.torch import load_file, save_file
    tiny_aimv2(use_head=False).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["encoder.layers.1.attention.extra_proj.weight"] = torch.zeros(32, 32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys.*encoder\.layers\.1\.attention\.extra_proj\.weight"):
        vit.load_hf_vit(str(tmp_path))


def test_load_state_dict_strict_refuses_an_unexpected_key_alone():
    """A checkpoint with every tensor of the module plus one it lacks is refused, the extra key named
    (no missing key or shape mismatch needed to trigger the refusal); the module is left unchanged."""
    m = nn.Linear(3, 2)
    before = m.weight.detach().clone()
    sd = {"weight": torch.ones(2, 3), "bias": torch.ones(2), "scale": torch.ones(1)}
    with pytest.raises(ValueError, match=r"1 unexpected keys, e\.g\. \['scale'\]"):
        vit.load_state_dict_strict(m, sd, "a linear layer")
    assert torch.equal(m.weight, before)


def test_load_state_dict_strict_copies_row_blocks_into_their_rows():
    """A list value is the parameter's consecutive row blocks (a checkpoint's experts one by one,
    HF's q, k and v), each copied into its own rows in order, in the parameter's dtype; blocks that
    do not add up to the parameter, or do not stack, are refused before anything is copied."""
    m = nn.Linear(3, 4)
    w = torch.arange(12.0).reshape(4, 3)
    vit.load_state_dict_strict(m, {"weight": [w[:1].bfloat16(), w[1:3], w[3:]], "bias": torch.ones(4)}, "blocks")
    assert torch.equal(m.weight, w) and m.weight.dtype == torch.float32
    before = m.weight.detach().clone()
    for blocks, shown in (([w[:1], w[1:3]], r"\(3, 3\)"), ([w[:2], w[2:, :2]], "row blocks that do not stack")):
        with pytest.raises(ValueError, match=rf"1 shape mismatches.*weight: checkpoint {shown} vs model \(4, 3\)"):
            vit.load_state_dict_strict(m, {"weight": blocks, "bias": torch.zeros(4)}, "blocks")
        assert torch.equal(m.weight, before) and torch.equal(m.bias, torch.ones(4))
