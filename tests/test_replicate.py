"""Starting a replication from real HF folders (paper §2, Table 1; the official SAIL-VL2-2B
tokenizer_config.json): SAIL-VL2's image tokens added to a Qwen3 tokenizer at the official ids
(HF `tokenizers` is the oracle), the model shape read from the Qwen3 / AIMv2 config.json files, and
the vit1 stage run end to end through the command line from such folders and a LLaVA-style JSONL.

The folders are built here, shaped like the real ones at tiny width: a Qwen2-style tokenizer.json
(NFC, Qwen's split regex, byte-level BPE) whose base vocabulary fills ids 0..151642 and whose 26
added tokens sit at Qwen3's ids 151643..151668, a hub-style Qwen3 config.json with the real
151,936-row embedding, and bf16 weights in sharded safetensors with a model.safetensors.index.json
(the AIMv2 folder likewise, with its attention-pooling head).
"""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import synth
import model as modeling
import train_stage
import vit

from test_data import qwen_style_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qwen3's added tokens, ids 151643.. in order, and whether each is "special" (Qwen3's tokenizer_config.json)
QWEN3_ADDED = [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                   "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                                   "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                   "<|image_pad|>", "<|video_pad|>")] + \
              [(t, False) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                                    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
                                    "</tool_response>", "<think>", "</think>")]
# written out from the official SAIL-VL2-2B tokenizer_config.json, independently of data.py
SAIL_ADDED = {"<img>": 151669, "</img>": 151670, "<IMG_CONTEXT>": 151671, "<quad>": 151672, "</quad>": 151673,
              "<ref>": 151674, "</ref>": 151675, "<box>": 151676, "</box>": 151677}
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=8)
VIT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=112,
           patch_size=14)


def write_qwen_tokenizer(folder, added=QWEN3_ADDED):
    """A byte-level BPE trained by HF `tokenizers` with Qwen2's pre-tokenizer, its vocabulary padded
    with unreachable entries to Qwen's 151,643 base ids, then `added` at 151643.. (as Qwen3's)."""
    rng = random.Random(0)
    words = ["what", "colour", "is", "the", "image", "shape", "red", "green", "blue", "circle", "square", "a", "an",
             "photo", "of", "describe", "sky", "there", "how", "many"]
    corpus = [" ".join(rng.choices(words, k=8)) + rng.choice(".?!") for _ in range(400)] + [data.DEFAULT_SYSTEM] * 20
    spec = json.loads(qwen_style_bpe(corpus, 600).to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), 151643)})     # never made by a merge
    entry = lambda i, t, special: {"id": i, "content": t, "single_word": False, "lstrip": False,  # noqa: E731
                                   "rstrip": False, "normalized": False, "special": special}
    spec["added_tokens"] = [entry(151643 + i, t, sp) for i, (t, sp) in enumerate(added)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {"add_bos_token": False, "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"}
                                                               for e in spec["added_tokens"]},
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
              "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def save_bf16_sharded(hf_model, folder, hub_config: dict):
    """bf16 weights in several safetensors shards with an index, and the hub's config.json form."""
    hf_model.to(torch.bfloat16)
    size = sum(p.numel() * 2 for p in hf_model.state_dict().values())
    hf_model.save_pretrained(folder, max_shard_size=size // 3)
    (folder / "config.json").write_text(json.dumps(hub_config, indent=2))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(qwen3 folder, aimv2 folder, the HF models in fp32 from the bf16 weights)."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, Qwen3Config, Qwen3ForCausalLM
    base = tmp_path_factory.mktemp("hf")
    qwen, aim = base / "Qwen3-tiny", base / "aimv2-tiny-patch14-112"
    torch.manual_seed(0)
    hub = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "initializer_range": 0.02,
           "max_position_embeddings": 40960, "max_window_layers": 2, "model_type": "qwen3", "rms_norm_eps": 1e-06,
           "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, **LLM}
    save_bf16_sharded(Qwen3ForCausalLM(Qwen3Config(**hub)), qwen, hub)
    write_qwen_tokenizer(qwen)
    vcfg = {"model_type": "aimv2_vision_model", "architectures": ["Aimv2VisionModel"], "hidden_act": "silu",
            "num_channels": 3, "rms_norm_eps": 1e-05, "qkv_bias": False, "mlp_bias": False, "use_head": True,
            "is_native": False, "torch_dtype": "bfloat16", **VIT}
    save_bf16_sharded(Aimv2VisionModel(Aimv2VisionConfig(**vcfg)), aim, vcfg)
    return qwen, aim


def llava_manifest(tmp_path):
    """A LLaVA-style JSONL kept apart from its images, whose paths are relative to the dataset folder."""
    root, ann = tmp_path / "llava_data", tmp_path / "annotations"
    (root / "coco" / "train2017").mkdir(parents=True), ann.mkdir()
    lines = []
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 60, 220))] * 2):
        img = np.full((112, 112, 3), colour, np.uint8)
        img[20 + 10 * i:60 + 10 * i, 30:80] = 255 - np.array(colour, np.uint8)
        Image.fromarray(img).save(root / "coco" / "train2017" / f"{i:012d}.jpg", quality=95)
        lines.append({"id": str(i), "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (ann / "llava.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return ann / "llava.jsonl", root


def cli(args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def stderr_lines(text):
    return [ln for ln in text.strip().splitlines() if ln.strip()]


# ----------------------------------------------------------------------------------------------
# the tokenizer: SAIL-VL2's image tokens at the official ids, read identically by HF and by us

def test_add_image_tokens_gives_the_official_ids_read_identically_by_hf_and_by_us(folders, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    qwen, _ = folders
    before = {f.name: f.read_bytes() for f in qwen.iterdir() if f.name.startswith("tokenizer")}
    with pytest.raises(ValueError, match="has no <IMG_CONTEXT> token"):
        data.special_ids(data.load_tokenizer(qwen))                   # a Qwen3 folder lacks them
    res = cli(["data.py", "add-image-tokens", str(qwen), str(tmp_path / "tok")])
    assert res.returncode == 0, res.stderr
    assert "added <img> 151669, </img> 151670, <IMG_CONTEXT> 151671" in res.stdout
    assert {f.name: f.read_bytes() for f in qwen.iterdir() if f.name.startswith("tokenizer")} == before   # src untouched
    written = {t["content"]: t["id"] for t in json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["added_tokens"]}
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {t: written[t] for t in SAIL_ADDED} == SAIL_ADDED == {t: int(i) for i, e in config.items()
                                                                 for t in [e["content"]] if t in SAIL_ADDED}
    hf, ours = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")), data.load_tokenizer(tmp_path / "tok")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))       # transformers reads tokenizer_config.json too
    for t, i in {**SAIL_ADDED, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668}.items():
        assert hf.token_to_id(t) == ours.encode_single_token(t) == auto.convert_tokens_to_ids(t) == i, t
    ids = data.special_ids(ours)
    assert (ids.img_context, ids.img_start, ids.img_end, ids.eos, ids.pad) == (151671, 151669, 151670, 151645, 151643)
    block = data.image_block(4)
    texts = [data.render_chat([("user", f"{block}\nWhat colour is the image?"), ("assistant", "red")],
                              data.DEFAULT_SYSTEM),
             "<ref>a red circle</ref><box>(1,2),(3,4)</box><quad>x</quad> café cafe\u0301 你好 😀",
             "how many shapes?<|im_end|><think>\nthree\n</think>\\boxed{3}<|endoftext|>"]
    for text in texts:
        want = hf.encode(text).ids
        assert data.encode(ours, text) == want == auto(text)["input_ids"], text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=False)
    assert data.encode(ours, block).count(151671) == 4
    again = cli(["data.py", "add-image-tokens", str(tmp_path / "tok"), str(tmp_path / "tok2")])
    assert again.returncode == 0 and "already has SAIL-VL2's tokens" in again.stdout
    assert (tmp_path / "tok2" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()


def test_add_image_tokens_refuses_a_layout_the_official_ids_do_not_continue(tmp_path):
    """A Qwen2.5-style folder ends at 151664: SAIL-VL2's ids from 151667 would leave a gap, which HF
    tokenizers closes by renumbering: refused in one line, exit 2."""
    qwen25 = write_qwen_tokenizer(tmp_path / "qwen25", QWEN3_ADDED[:22])
    res = cli(["data.py", "add-image-tokens", str(qwen25), str(tmp_path / "out")])
    assert res.returncode == 2 and len(stderr_lines(res.stderr)) == 1, res.stderr
    assert "last token id is 151664" in res.stderr and "without a gap" in res.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# the model shape from the folders' config.json

def test_model_shape_comes_from_the_qwen3_and_aimv2_config_json(folders):
    from transformers import Aimv2VisionConfig, Qwen3Config
    qwen, aim = folders
    hq, ha = Qwen3Config.from_pretrained(qwen), Aimv2VisionConfig.from_pretrained(aim)
    llm, v = modeling.read_llm_config(str(qwen)), vit.read_vit_config(str(aim))
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(llm, k) == getattr(hq, k), k
    assert llm.rope_theta == hq.rope_parameters["rope_theta"] == 1e6
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "qkv_bias", "mlp_bias"):
        assert getattr(v, k) == getattr(ha, k), k
    cfg, mcfg, _ = train_stage.parse_args(["--stage", "vit1", f"--init-llm={qwen}", f"--init-vit={aim}", "--out_dir=/no/out"])
    assert mcfg.llm_config == llm and mcfg.vision_config == v and cfg.preset == "2b"      # no --model.* needed
    assert train_stage.missing_sources(cfg) == [] and set(train_stage.init_sources(cfg).values()) == {"fresh"}   # lm0 is not needed
    assert mcfg.max_dynamic_patch == 12 and mcfg.system_prompt == ""                     # the paper's settings
    with pytest.raises(train_stage.UsageError, match=r"--model.llm_config.num_hidden_layers=4 changes the shape of weights "
                                           rf"loaded from --init-llm {qwen}"):
        train_stage.parse_args(["--stage", "vit1", f"--init-llm={qwen}", "--model.llm_config.num_hidden_layers=4"])
    _, roped, _ = train_stage.parse_args(["--stage", "vit1", f"--init-llm={qwen}", "--model.llm_config.rope_theta=5e5"])
    assert roped.llm_config.rope_theta == 5e5 and roped.llm_config.hidden_size == 32   # not a shape: applies


def test_a_preset_without_the_tokenizers_img_context_takes_the_tokenizers(folders, tmp_path):
    """--preset=tiny (<IMG_CONTEXT> 263) with Qwen3's weights: the model is not a trained checkpoint,
    so it takes the id of the tokenizer that comes with the LLM (151671), and says so."""
    qwen, _ = folders
    cfg, mcfg, _ = train_stage.parse_args(["--stage", "vit1", f"--init-llm={qwen}", "--preset=tiny", f"--out_dir={tmp_path}",
                                 "--manifests=x.jsonl", "--init-from=random"])   # before: the byte-level default
    logs = []
    tok = data.load_tokenizer(train_stage.tokenizer_dir(cfg, logs.append))
    out = train_stage.match_tokenizer(cfg, mcfg, tok, logs.append)
    assert out.img_context_token_id == 151671 and out.llm_config.vocab_size == 151936
    assert out.vision_config == modeling.preset_config("tiny").vision_config                   # the preset shapes the ViT
    assert any("lacks SAIL-VL2's image tokens" in ln for ln in logs) and any("uses the tokenizer's" in ln for ln in logs)


# ----------------------------------------------------------------------------------------------
# the stage from the folders, end to end through the command line

def test_vit1_from_qwen3_and_aimv2_folders_and_a_llava_jsonl(folders, tmp_path, capsys):
    from tokenizers import Tokenizer
    qwen, aim = folders
    manifest, root = llava_manifest(tmp_path)
    out = tmp_path / "out"
    train_stage.main(["--stage", "vit1", f"--init-llm={qwen}", f"--init-vit={aim}", f"--manifests={manifest}",
            f"--image_root={root}", f"--out_dir={out}", "--steps=2", "--eval_every=0", "--auto_steps=1",
            "--save_every=0", "--packing.max_tokens=256"])
    log = capsys.readouterr().out
    assert "stand-in" not in log and not (out / "lm0").exists()                     # Qwen3 is what lm0 stands in for
    assert "init: mlp1 from random weights" in log
    assert log.count("lacks SAIL-VL2's image tokens: added <img> 151669") == 1
    assert f"next: torchrun train_stage.py --stage vit2 --out_dir={out} --manifests={manifest} --image_root={root}\n" \
        in log                                               # no preset, no --init-llm; the data carried over
    ck = out / "vit1"
    modeling.verify_checkpoint(str(ck))
    cfg = modeling.SAILVLConfig.from_dict(json.loads((ck / "config.json").read_text()))
    assert cfg.llm_config == modeling.read_llm_config(str(qwen)) and cfg.vision_config == vit.read_vit_config(str(aim))
    assert cfg.img_context_token_id == 151671
    sd = load_file(str(ck / "model.safetensors"))
    assert sd["mlp1.1.weight"].shape == (LLM["hidden_size"], 4 * VIT["hidden_size"])     # the adapter follows both
    hf_llm = {k: v for f in sorted(qwen.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert torch.equal(sd["language_model.model.embed_tokens.weight"], hf_llm["model.embed_tokens.weight"].float())
    assert torch.equal(sd["language_model.model.layers.1.mlp.down_proj.weight"],
                       hf_llm["model.layers.1.mlp.down_proj.weight"].float())              # vit1 trains mlp1 only
    losses = [r["loss"] for r in map(json.loads, open(ck / "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # the tokens it trained on are HF's tokens of the same text, with SAIL-VL2's image tokens
    hf, tok = Tokenizer.from_file(str(ck / "tokenizer.json")), data.load_tokenizer(ck)
    sample = data.JsonlDataset(manifest, tok, data.DataConfig.from_model(cfg, image_root=str(root))).load(0)
    ids = sample["input_ids"].tolist()
    assert ids == hf.encode(tok.decode(ids)).ids and ids.count(151671) == 16 and ids.count(151669) == 1
    assert hf.decode(ids, skip_special_tokens=False).startswith(f"<|im_start|>system\n{data.DEFAULT_SYSTEM}<|im_end|>")


def test_vit1_from_the_folders_on_two_processes_starts_where_one_process_does(folders, tmp_path):
    """The replication's first stage under torchrun on 2 processes (FSDP2, gloo): rank 0 makes only the
    adapter and scatters the Qwen3 and AIMv2 tensors from their bf16 shards (AIMv2's q/k/v fused on
    the way); at an LR too small to move a weight (1e-30: one step changes none but those at 0, by
    1e-30) its output is the one-process run's: the same adapter drawn, the same files read."""
    qwen, aim = folders
    manifest, root = llava_manifest(tmp_path)
    args = ["train_stage.py", "--stage", "vit1", f"--init-llm={qwen}", f"--init-vit={aim}", f"--manifests={manifest}",
            f"--image_root={root}", "--steps=1", "--lr=1e-30", "--eval_every=0", "--save_every=0",
            "--packing.max_tokens=256"]
    one = cli([*args, f"--out_dir={tmp_path}/one"], timeout=240)
    two = cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, f"--out_dir={tmp_path}/two"],
              timeout=240)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = (load_file(str(tmp_path / d / "vit1" / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-20)] == []
    assert a["mlp1.1.weight"].abs().max() > 1e-3                        # (a drawn adapter, not zeros)
    assert two.stdout.count("init: mlp1 from random weights") == 1


@pytest.mark.parametrize("case", ["no_tokenizer", "other_tokenizer", "ids_beyond_embedding"])
def test_a_model_tokenizer_mismatch_is_one_error_line(folders, tmp_path, capsys, case):
    qwen, aim = folders
    manifest, root = llava_manifest(tmp_path)
    args = [f"--manifests={manifest}", f"--image_root={root}", f"--out_dir={tmp_path}/out", "--steps=1",
            "--eval_every=0"]
    if case == "no_tokenizer":                          # weights only: never the byte-level default instead
        shutil.copytree(qwen, tmp_path / "weights", ignore=shutil.ignore_patterns("tokenizer*"))
        args += [f"--init-llm={tmp_path}/weights", "--init-from=random"]
        match = "has no tokenizer"
    elif case == "other_tokenizer":                     # a BPE the Qwen3 weights were not trained with
        (tmp_path / "bpe").mkdir()
        (tmp_path / "bpe" / "tokenizer.json").write_text(json.dumps(synth.train_bpe(["what colour is it"] * 9, 300)))
        args += [f"--init-llm={qwen}", f"--tokenizer={tmp_path}/bpe", "--init-from=random"]
        match = "does not encode as the tokenizer of"
    else:                                               # Qwen's ids on a 512-row tiny checkpoint
        data.add_image_tokens(qwen, tmp_path / "qtok")
        modeling.build_model("tiny").save_pretrained(str(tmp_path / "tiny"))
        args += [f"--init-from={tmp_path}/tiny", f"--tokenizer={tmp_path}/qtok"]
        match = "has ids up to 151677, but the language model's embedding has 512 rows"
    with pytest.raises(SystemExit) as e:
        train_stage.main(["--stage", "vit1", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(stderr_lines(err)) == 1 and match in err, err
