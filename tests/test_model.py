"""Model core (paper §2, the official modeling_sailvl.py) against independent references: HF transformers' Qwen3ForCausalLM
and Aimv2VisionModel, and the official pixel-shuffle op sequence written out literally."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Qwen3Config, Qwen3ForCausalLM

import model as modeling
import vit

torch.manual_seed(0)


def hf_qwen3(tie: bool, theta: float, kv: int = 2, attention_bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv, head_dim=16, rope_theta=theta,
                      tie_word_embeddings=tie, attention_bias=attention_bias, max_position_embeddings=256)
    m = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():   # HF inits norms to 1: perturb them so the norm weights are really tested
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("tie,theta,kv,bias", [(True, 1e6, 2, False), (False, 1e4, 1, False),
                                               (False, 5e5, 4, True), (True, 100.0, 2, False)])
def test_qwen3_matches_hf(tmp_path, tie, theta, kv, bias):
    ref = hf_qwen3(tie, theta, kv, bias)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")        # sharded, with an index
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert (got - want).abs().max() < 1e-4


def test_a_config_without_the_tie_key_is_read_with_hfs_default(tmp_path):
    """HF reads a Qwen3 config.json without tie_word_embeddings as untied: so must we (tying would
    copy the embedding over the checkpoint's own lm_head without a word)."""
    hf_qwen3(False, 1e6).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    assert not ref.config.tie_word_embeddings and not ours.cfg.tie_word_embeddings
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def test_a_folder_resaved_as_one_file_over_its_old_index_loads_the_one_file(tmp_path):
    """HF's save_pretrained re-saving a sharded folder as one file removes the old shards but keeps
    their index: HF then loads model.safetensors (it looks for that file before the index), so must
    we (reading the index first failed on its missing shards, or loaded stale ones beside it)."""
    hf_qwen3(False, 1e6, seed=0).save_pretrained(tmp_path, max_shard_size="40KB")
    ref = hf_qwen3(False, 1e6, seed=1)
    ref.save_pretrained(tmp_path)                                   # one file now, the old index left
    assert (tmp_path / "model.safetensors.index.json").exists() and (tmp_path / "model.safetensors").exists()
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids).logits)           # HF's own reading: the new weights
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def test_qwen3_packed_equals_separate(tmp_path):
    ref = hf_qwen3(False, 1e6)
    ref.save_pretrained(tmp_path)
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    lens = [5, 1, 11, 7]
    seqs = [torch.randint(0, 97, (n,)) for n in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        packed = ours(torch.cat(seqs)[None], position_ids=pos, cu_seqlens=cu)[0]
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            want = ref(s[None]).logits[0]
            assert (packed[a:b] - want).abs().max() < 1e-4


def test_packed_forward_under_bf16_autocast_with_fp32_weights():
    """A one-process CUDA run trains fp32 weights under bf16 autocast. There the qk-norm gives fp32
    q, k (its fp32 weight times bf16) while v stays bf16: the packed attention takes them in v's
    dtype, as autocast hands SDPA all three, and the packed rows equal the samples run separately."""
    torch.manual_seed(0)
    lm = modeling.build_model("tiny").language_model.eval()
    lens = [5, 1, 11, 7]
    seqs = [torch.randint(0, 97, (n,)) for n in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = lm(torch.cat(seqs)[None], position_ids=pos, cu_seqlens=cu)[0].float()
        for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
            want = lm(s[None])[0].float()
            torch.testing.assert_close(packed[a:b], want, atol=0.05, rtol=0.05)


def test_a_model_held_in_bf16_takes_fp32_pixels_without_autocast():
    """tests/calibrate.py --dtype bfloat16 holds the whole model in bf16 and runs it without autocast:
    the fp32 pixels (vit.to_pixels) meet the bf16 patch projection, whose dtype they take (the conv
    refused the mix), and the logits follow the fp32 model's."""
    torch.manual_seed(0)
    model = modeling.build_model("tiny").eval()
    ids = torch.tensor([[1, 2] + [model.cfg.img_context_token_id] * model.cfg.tokens_per_tile + [3]])
    pixels = torch.rand(1, 3, model.cfg.vision_config.image_size, model.cfg.vision_config.image_size)
    with torch.no_grad():
        want = model(ids, pixels).logits
        got = model.to(torch.bfloat16)(ids, pixels).logits.float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.1)


def hf_aimv2(seed=0, image_size=56, hidden=32, heads=4):
    torch.manual_seed(seed)
    cfg = Aimv2VisionConfig(hidden_size=hidden, intermediate_size=72, num_hidden_layers=2, num_attention_heads=heads,
                            image_size=image_size, patch_size=14, use_head=False, rms_norm_eps=1e-5)
    m = Aimv2VisionModel(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            if "position_embedding" in n:
                p.normal_(std=0.5)
    return m


def test_vit_matches_hf_aimv2(tmp_path):
    ref = hf_aimv2()
    ref.save_pretrained(tmp_path)
    ours = vit.load_hf_vit(str(tmp_path)).eval()
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = ref(x).last_hidden_state
        got = ours(x)
    assert got.shape == want.shape == (3, 16, 32)
    assert (got - want).abs().max() < 1e-4


# --- the official SAIL-VL2 layout, written independently from the official modeling_sailvl.py and key names --------------------

def aimv2_to_official(sd: dict) -> dict:
    """HF Aimv2 names -> official SAIL-ViT names, per HF's modeling_aimv2.py and the official modeling_sailvit.py (written here, not imported)."""
    out = {"preprocessor.patchifier.proj.weight": sd["embeddings.patch_embed.weight"],
           "preprocessor.patchifier.proj.bias": sd["embeddings.patch_embed.bias"],
           "preprocessor.patchifier.norm.weight": sd["embeddings.rms_norm.weight"],
           "preprocessor.pos_embed": sd["embeddings.position_embedding.weight"][None],
           "trunk.post_trunk_norm.weight": sd["rms_norm.weight"]}
    i = 0
    while f"encoder.layers.{i}.rms_norm1.weight" in sd:
        p, q = f"encoder.layers.{i}.", f"trunk.blocks.{i}."
        out[q + "norm_1.weight"] = sd[p + "rms_norm1.weight"]
        out[q + "norm_2.weight"] = sd[p + "rms_norm2.weight"]
        out[q + "attn.qkv.weight"] = torch.cat([sd[p + f"attention.{n}_proj.weight"] for n in "qkv"])
        out[q + "attn.proj.weight"] = sd[p + "attention.out_proj.weight"]
        out[q + "mlp.fc1.weight"] = sd[p + "ffn.gate_proj.weight"]
        out[q + "mlp.fc3.weight"] = sd[p + "ffn.up_proj.weight"]
        out[q + "mlp.fc2.weight"] = sd[p + "ffn.down_proj.weight"]
        i += 1
    return out


def official_pixel_shuffle(x, scale_factor=0.5):
    """The op sequence of the official modeling_sailvl.py (ps_version v2), read from it."""
    n, w, h, c = x.size()
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


def test_pixel_shuffle_matches_official_ops():
    x = torch.randn(2, 8 * 8, 5)
    want = official_pixel_shuffle(x.reshape(2, 8, 8, 5)).reshape(2, 16, 20)
    assert torch.equal(modeling.pixel_shuffle(x, 8, 8), want)
    g = x.reshape(2, 8, 8, 5)   # token (i, j) = [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)]
    assert torch.equal(want[1, 1 * 4 + 2], torch.cat([g[1, 2, 4], g[1, 2, 5], g[1, 3, 4], g[1, 3, 5]]))


IMG_CTX = 90


def write_official_checkpoint(path, vis, llm, mlp1):
    os.makedirs(path, exist_ok=True)
    vc = vis.config
    config = {
        "architectures": ["SAILVLModel"], "model_type": "sailvl", "downsample_ratio": 0.5, "ps_version": "v2",
        "select_layer": -1, "force_image_size": vc.image_size, "template": "univl-chat", "dynamic_image_size": True,
        "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "pad2square": False,
        "use_backbone_lora": 0, "use_llm_lora": 0, "img_context_token_id": IMG_CTX,
        "vision_config": {"model_type": "sailvit", "architectures": ["SAILViTModel"], "hidden_size": vc.hidden_size,
                          "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_hidden_layers,
                          "num_attention_heads": vc.num_attention_heads, "patch_size": 14,
                          "image_size": vc.image_size, "num_channels": 3, "rms_norm_eps": 1e-5, "qkv_bias": False,
                          "use_bias": False, "projection_dropout": 0.0, "attention_dropout": 0.0},
        "llm_config": json.loads(llm.config.to_json_string()),
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    sd = {"vision_model." + k: v for k, v in aimv2_to_official(vis.state_dict()).items()}
    sd.update({"mlp1." + k: v for k, v in mlp1.state_dict().items()})
    sd.update({"language_model." + k: v for k, v in llm.state_dict().items()})   # includes the tied lm_head
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    keys = sorted(sd)                                               # two shards + index, like the hub
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, os.path.join(path, fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)


@pytest.fixture
def official(tmp_path):
    vis = hf_aimv2(1)
    llm = hf_qwen3(True, 1e6, seed=2)
    torch.manual_seed(3)
    mlp1 = nn.Sequential(nn.LayerNorm(4 * 32), nn.Linear(4 * 32, 48), nn.GELU(), nn.Linear(48, 48))
    with torch.no_grad():
        mlp1[0].weight.add_(0.1 * torch.randn(128))
        mlp1[0].bias.add_(0.1 * torch.randn(128))
    write_official_checkpoint(tmp_path / "ckpt", vis, llm, mlp1)
    return str(tmp_path / "ckpt"), vis, llm, mlp1


def reference_forward(vis, llm, mlp1, input_ids, pixel_values):
    with torch.no_grad():
        f = vis(pixel_values).last_hidden_state                   # (N, 16, 32), select_layer -1
        n = f.shape[0]
        f = official_pixel_shuffle(f.reshape(n, 4, 4, -1)).reshape(n, -1, 128)
        v = mlp1(f).reshape(-1, 48)
        emb = llm.get_input_embeddings()(input_ids).clone()
        emb[input_ids == IMG_CTX] = v
        return llm(inputs_embeds=emb).logits


def test_sailvl_matches_hf_composition(official):
    path, vis, llm, mlp1 = official
    ours = modeling.SAILVL.from_pretrained(path).eval()
    pix = torch.randn(3, 3, 56, 56)                               # 3 tiles × 4 tokens
    ids = torch.randint(0, 80, (2, 15))
    ids[0, 2:6] = IMG_CTX
    ids[1, 1:5] = IMG_CTX
    ids[1, 9:13] = IMG_CTX
    want = reference_forward(vis, llm, mlp1, ids, pix)
    with torch.no_grad():
        got = ours(ids, pix).logits
    assert (got - want).abs().max() < 1e-4
    # our own save -> load round trip is exact, and keeps the official key names
    ours.save_pretrained(path + "-ours")
    again = modeling.SAILVL.from_pretrained(path + "-ours").eval()
    with torch.no_grad():
        assert torch.equal(again(ids, pix).logits, got)
    from safetensors import safe_open
    keys = set(safe_open(path + "-ours/model.safetensors", "pt").keys())
    assert "vision_model.trunk.blocks.0.attn.qkv.weight" in keys and "mlp1.3.bias" in keys
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in keys


def test_loss_is_shifted_ce_over_labels(official):
    path, *_ = official
    m = modeling.SAILVL.from_pretrained(path).eval()
    ids = torch.randint(0, 80, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = m(ids, labels=labels, return_logits=True)
    lg = out.logits
    terms = [torch.log_softmax(lg[b, t - 1], -1)[ids[b, t]] for b in range(2) for t in range(4, 9)]
    want = -torch.stack(terms).mean()
    assert out.n_targets.item() == 10 and abs((out.ce_sum / out.n_targets).item() - want.item()) < 1e-5
    assert m(ids).ce_sum is None and m(ids).aux_loss is None               # one return type; no labels, no CE
    assert m(ids, labels=labels).logits is None                             # training: no (T, V) logits kept


def test_image_token_count_mismatch_names_both_counts(official):
    path, *_ = official
    m = modeling.SAILVL.from_pretrained(path)
    ids = torch.full((1, 8), 5)
    ids[0, :3] = IMG_CTX
    with pytest.raises(ValueError, match=r"3 <IMG_CONTEXT> tokens .* 4 visual tokens"):
        m(ids, torch.randn(1, 3, 56, 56))


def test_bad_checkpoints_are_refused_clearly(official, tmp_path):
    path, vis, llm, mlp1 = official
    from safetensors.torch import load_file
    bad = tmp_path / "bad"
    os.makedirs(bad)
    sd = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    sd["mlp1.9.weight"] = sd.pop("mlp1.3.weight")                 # renamed key
    sd["mlp1.1.bias"] = torch.zeros(7)                            # wrong shape
    save_file(sd, bad / "model.safetensors")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError) as e:
        modeling.SAILVL.from_pretrained(str(bad))
    msg = str(e.value)
    assert "mlp1.3.weight" in msg and "mlp1.9.weight" in msg and "mlp1.1.bias" in msg
    cfg["llm_config"].update(use_sliding_window=True, sliding_window=64)
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="sliding-window"):
        modeling.SAILVL.from_pretrained(str(bad))
    # settings the code does not implement are refused, not read and ignored
    base = json.load(open(os.path.join(path, "config.json")))
    for key, value in (("select_layer", -2), ("ps_version", "v1"), ("dynamic_image_size", False)):
        with pytest.raises(ValueError, match=f"unsupported: .*{key}="):
            modeling.SAILVLConfig.from_dict({**base, key: value})


def test_official_vit_loads_with_load_hf_vit(official):
    path, vis, *_ = official
    ours = vit.load_hf_vit(path).eval()                              # SAIL naming under vision_model.
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (ours(x) - vis(x).last_hidden_state).abs().max() < 1e-4


# --- AnyRes (§2.1.2) -------------------------------------------------------------------------------

def test_anyres_native_size_equals_fixed_and_packed_equals_separate():
    torch.manual_seed(0)
    cfg = vit.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=56)
    m = vit.SAILViT(cfg)
    m.init_weights(std=0.2)
    m.eval()
    x = torch.randn(1, 3, 56, 56)
    a, b = torch.randn(3, 28, 84), torch.randn(3, 70, 42)
    with torch.no_grad():
        fixed = m(x)[0]
        packed, grids = m.forward_packed([x[0], a, b])
        assert (packed[0] - fixed).abs().max() < 1e-5
        assert grids == [(4, 4), (2, 6), (5, 3)]
        for img, got in zip([a, b], packed[1:]):
            alone = m.forward_packed([img])[0][0]
            assert (got - alone).abs().max() < 1e-5
            assert (m(img[None])[0] - got).abs().max() < 1e-5
    # interpolated position embedding: the learned grid bicubically resized, checked independently
    pe = m.preprocessor.pos_embed.detach().reshape(4, 4, 32)
    got = m.preprocessor.position_embedding(2, 6).detach().reshape(2, 6, 32)
    want = torch.nn.functional.interpolate(pe.permute(2, 0, 1)[None], size=(2, 6), mode="bicubic",
                                           align_corners=False)[0].permute(1, 2, 0)
    assert (got - want).abs().max() < 1e-6


def shuffle_by_definition(f, h, w):
    """(h*w, C) patch features (row-major) -> (h/2 * w/2, 4C): token (i, j) is the concatenation of
    f(2i,2j), f(2i,2j+1), f(2i+1,2j), f(2i+1,2j+1), written out with loops (the official v2 order,
    see test_pixel_shuffle_matches_official_ops), for any h != w."""
    g = f.reshape(h, w, -1)
    return torch.stack([torch.cat([g[2 * i, 2 * j], g[2 * i, 2 * j + 1], g[2 * i + 1, 2 * j], g[2 * i + 1, 2 * j + 1]])
                        for i in range(h // 2) for j in range(w // 2)])


def test_sailvl_anyres_equals_an_independent_composition():
    """Several AnyRes images of different sizes (h != w) in one sample: each image alone through
    the ViT, shuffled by the definition, through mlp1, its tokens written into ITS placeholders;
    the LLM on those embeddings gives the logits SAILVL gives."""
    torch.manual_seed(0)
    m = modeling.build_model("tiny-anyres").eval()
    with torch.no_grad():                                       # a non-trivial adapter LayerNorm
        m.mlp1[0].weight.add_(0.3 * torch.randn_like(m.mlp1[0].weight))
    ctx, p = m.cfg.img_context_token_id, m.cfg.vision_config.patch_size
    imgs = [torch.randn(3, 112, 112), torch.randn(3, 56, 168), torch.randn(3, 84, 28)]   # 16, 2x6=12, 3x1=3 tokens
    n_tok = [(x.shape[1] // p // 2) * (x.shape[2] // p // 2) for x in imgs]
    assert n_tok == [16, 12, 3]
    ids = torch.tensor([[1, 2] + [ctx] * 16 + [3] + [ctx] * 12 + [4, 5] + [ctx] * 3 + [6]])
    with torch.no_grad():
        got = m(ids, imgs).logits
        emb = m.language_model.model.embed_tokens(ids).clone()
        slots = (ids[0] == ctx).nonzero().flatten().tolist()
        start = 0
        for x, n in zip(imgs, n_tok):
            h, w = x.shape[1] // p, x.shape[2] // p
            f = m.vision_model(x[None])[0]                          # this image alone, (h*w, C)
            v = m.mlp1(shuffle_by_definition(f, h, w))              # (n, H)
            emb[0, slots[start:start + n]] = v
            start += n
        want = m.language_model(inputs_embeds=emb)
    assert (got - want).abs().max() < 1e-5
    with torch.no_grad():                                       # not vacuous: the images' order matters
        other = m(torch.tensor([[1, 2] + [ctx] * 12 + [3] + [ctx] * 16 + [4, 5] + [ctx] * 3 + [6]]),
                  [imgs[1], imgs[0], imgs[2]]).logits
    assert (other[0, -1] - got[0, -1]).abs().max() > 1e-3


# --- generation -------------------------------------------------------------------------------------

def greedy_by_recompute(lm, prompt, n):
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = lm(torch.tensor([ids]))[0, -1].argmax().item()
        ids.append(nxt)
        out.append(nxt)
    return out


def test_kv_cache_generation_equals_full_recompute(tmp_path):
    ref = hf_qwen3(False, 1e4)
    with torch.no_grad():                                          # sharpen logits so argmax is stable
        ref.lm_head.weight.mul_(20)
    ref.save_pretrained(tmp_path)
    lm = modeling.load_hf_llm(str(tmp_path)).eval()
    prompts = [[3, 7, 9, 11, 2], [5], [8, 1, 4]]
    got = lm.generate(prompts, max_new_tokens=12)
    for p, g in zip(prompts, got):
        assert g == greedy_by_recompute(lm, p, 12)
    assert len({tuple(g) for g in got}) > 1                      # not vacuous
    # stop tokens end a row early (and are kept)
    first = got[0]
    stopped = lm.generate([prompts[0]], max_new_tokens=12, stop_tokens=[first[3]])[0]
    assert stopped == first[:first.index(first[3]) + 1]


def sample_next(logits, temperature: float, top_p: float, generator):
    """logits (B, V) -> next ids (B,), as a generation step samples them: one draw per row, the
    policy's logits (temperature, nucleus), inverse-CDF sampling."""
    u = torch.rand(logits.shape[0], 1, generator=generator) if temperature > 0 else None
    return modeling.sample_tokens(modeling.policy_logits(logits, temperature, top_p), temperature, u)[0]


def test_sampling_is_seeded_and_top_p_restricts_support():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    g = torch.Generator().manual_seed(1)
    draws = {sample_next(logits, 1.0, 0.5, g).item() for _ in range(200)}
    assert draws == {0}                                           # p(0) = 0.70 > 0.5: nucleus is {0}
    draws = {sample_next(logits, 1.0, 0.9, g).item() for _ in range(400)}
    assert draws == {0, 1}                                        # 0.70 + 0.26 reaches 0.9
    a = [sample_next(logits, 2.0, 1.0, torch.Generator().manual_seed(5)).item() for _ in range(3)]
    b = [sample_next(logits, 2.0, 1.0, torch.Generator().manual_seed(5)).item() for _ in range(3)]
    assert a == b

@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_sampling_temperature_divides_the_logits(T):
    """Sampled frequencies on a fixed distribution against softmax(logits / T), computed by hand
    (exp and normalise in numpy); 20,000 draws, so each frequency is within ~4 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 20_000
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(n, 4), T, 1.0, g)
    freq = np.bincount(draws.numpy(), minlength=4) / n
    e = np.exp(np.array([2.0, 1.0, 0.0, -1.0]) / T)
    want = e / e.sum()
    assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-3), (freq, want)


def test_sailvl_generate_with_images_matches_recompute():
    m = modeling.build_model("tiny").eval()
    ctx = m.cfg.img_context_token_id
    pix = torch.randn(1, 3, 112, 112)
    prompt = [1, 2] + [ctx] * 16 + [5, 6]
    got = m.generate([prompt], pix, max_new_tokens=6)[0]
    ids = list(prompt)
    for _ in range(6):
        with torch.no_grad():
            ids.append(m(torch.tensor([ids]), pix).logits[0, -1].argmax().item())
    assert got == ids[len(prompt):]


def test_repeated_tile_is_encoded_once_with_the_same_tokens():
    """The blind evaluation feeds one white tile N times: in generation (inference mode) it is encoded
    once and repeated, which must give what encoding every tile gives (and tiles that differ stay
    apart). A forward without gradients outside inference mode (RL's old log-probs) runs every tile,
    as the update's forward does: on a GPU another batch size is other kernels, other bits."""
    torch.manual_seed(0)
    m = modeling.build_model("tiny").eval()
    white = vit.blank_pixels(torch.zeros(5, 3, 112, 112))
    mixed = torch.cat([white[:2], torch.randn(1, 3, 112, 112), white[:2]])
    for pix in (white, mixed):
        full = m.encode_images(pix)                                    # grad mode: every tile through the ViT
        with torch.inference_mode():
            assert torch.allclose(m.encode_images(pix), full, atol=1e-6, rtol=0)
    with torch.inference_mode():
        per_tile = m.encode_images(mixed[2:3])
        assert torch.allclose(m.encode_images(mixed)[32:48], per_tile, atol=1e-6)
    batches = []
    hook = m.vision_model.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    with torch.inference_mode():
        m.encode_images(white)
    with torch.no_grad():
        m.encode_images(white)
    hook.remove()
    assert batches == [1, 5]


def test_presets_build_on_meta_with_paper_sizes():
    sizes = {}
    for name in ("2b", "8b", "30b-a3b"):
        m = modeling.build_model(name, device="meta")
        sizes[name] = modeling.count_params(m.language_model) / 1e9
    assert abs(sizes["2b"] - 1.72) < 0.02            # Qwen3-1.7B (tied)
    assert abs(sizes["8b"] - 8.19) < 0.02            # Qwen3-8B
    assert abs(sizes["30b-a3b"] - 30.5) < 0.1        # Qwen3-30B-A3B


def test_atomic_save_keeps_old_folder_on_failure(tmp_path):
    target = tmp_path / "ck"
    modeling.atomic_write_dir(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("old"))

    def boom(d):
        open(os.path.join(d, "a.txt"), "w").write("new")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError):
        modeling.atomic_write_dir(str(target), boom)
    assert open(target / "a.txt").read() == "old"
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_crash_between_the_renames_loses_nothing_and_folders_are_not_owner_only(tmp_path, monkeypatch):
    """replace_dir moves the old folder aside, then renames the new one in: if that rename fails the
    old one is moved back; if the process died in between, the next reader or writer puts it back.
    A written folder has os.makedirs's permissions (mkdtemp's are 0700: unreadable to others)."""
    target = tmp_path / "ck"
    modeling.atomic_write_dir(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("old"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~umask
    real, calls = os.replace, []

    def second_fails(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(a, b)
    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        modeling.atomic_write_dir(str(target), lambda d: open(os.path.join(d, "a.txt"), "w").write("new"))
    monkeypatch.setattr(os, "replace", real)
    assert open(target / "a.txt").read() == "old" and sorted(os.listdir(tmp_path)) == ["ck"]
    os.replace(target, tmp_path / "ck.old-x1y2")                    # as a crash between the renames leaves it
    assert modeling.is_finished_stage(str(target)) is False and open(target / "a.txt").read() == "old"


def test_tiny_preset_uses_the_default_tokenizers_image_token():
    import data
    tok = data.load_tokenizer(None)
    cfg = modeling.preset_config("tiny")
    assert cfg.img_context_token_id == data.special_ids(tok).img_context
    assert cfg.llm_config.vocab_size >= tok.n_vocab


# --- gaps found by mutation testing ------------------------------------------------------------------

def test_adapter_is_layernorm_linear_exact_gelu_linear_by_hand():
    """mlp1 (the official adapter) is LayerNorm -> Linear -> GELU in its exact erf form (nn.GELU's
    default, as the official code builds it) -> Linear: SAILVL.encode_images on two different tiles
    against the ops written out by hand, with pre-activations spread over ±3, where the tanh
    approximation is ~1e-3 away."""
    import math
    torch.manual_seed(0)
    m = modeling.build_model("tiny").eval()
    ln, fc1, _, fc2 = m.mlp1
    with torch.no_grad():
        ln.weight.add_(0.3 * torch.randn_like(ln.weight))
        ln.bias.add_(0.3 * torch.randn_like(ln.bias))
        fc1.weight.mul_(3.0)
    pix = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        got = m.encode_images(pix)
        f = m.vision_model(pix)                                             # (2, 64, 96): an 8x8 grid
        x = torch.cat([shuffle_by_definition(f[i], 8, 8) for i in range(2)])   # (32, 384)
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
        h = (x * ln.weight + ln.bias) @ fc1.weight.T + fc1.bias
        want = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ fc2.weight.T + fc2.bias
    assert h.abs().max() > 3                                                # where erf and tanh GELU differ
    assert got.shape == want.shape == (32, 128)
    assert (got - want).abs().max() < 1e-5


def test_a_non_square_anyres_grid_with_the_native_patch_count_is_resized():
    """A 2x8 (or 8x2) patch grid has as many patches as the native 4x4 one: its position embedding is
    still the learned grid bicubically resized to 2x8, not the native table read in another shape;
    through the preprocessor the ViT runs."""
    torch.manual_seed(0)
    cfg = vit.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=56)
    m = vit.SAILViT(cfg)
    m.init_weights(std=0.2)
    pe = m.preprocessor.pos_embed.detach().reshape(4, 4, 32).permute(2, 0, 1)[None]     # (1, D, 4, 4)
    for h, w in [(2, 8), (8, 2), (4, 4)]:
        img = torch.randn(1, 3, 14 * h, 14 * w)
        with torch.no_grad():
            got = m.preprocessor(img)[0]
            want_pe = torch.nn.functional.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
            want = m.preprocessor.patchifier(img)[0] + want_pe[0].permute(1, 2, 0).reshape(h * w, 32)
        assert (got - want).abs().max() < 1e-5, (h, w)


def test_decode_mask_by_hand():
    """decode_mask against loops: query i (slot past + i) sees slot s iff s <= past + i and s is a
    real (unpadded) slot, and always its own slot, so a padding query's row is never all-masked
    (SDPA kernels give NaN or 0 for such a row, backend-dependent)."""
    seen = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    for past, t in [(0, 5), (2, 3), (4, 1)]:
        got = modeling.decode_mask(seen, past, t)
        want = torch.tensor([[[(s <= past + i and bool(seen[b, s])) or s == past + i for s in range(7)]
                              for i in range(t)] for b in range(3)])[:, None]
        assert torch.equal(got, want), (past, t)
        assert got.any(-1).all()
