"""MoE (paper §2.2) against independent references: HF transformers' Qwen3MoeSparseMoeBlock,
Qwen3MoeForCausalLM and load_balancing_loss_func; a real 2-process gloo group for the cross-rank
average; hand-computed loads and entropies; a constructed skewed router for the calibration.

HF is imported inside the tests that use it, so the spawned gloo workers start fast."""
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import model as modeling
import moe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add spin-wait on a shared 2-core runner
    (measured: the calibration fit takes 9 s with 2 threads under load, 0.4 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_moe():
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    return modeling_qwen3_moe


def hf_config(**kw):
    from transformers import Qwen3MoeConfig
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                max_position_embeddings=256, rope_theta=1e4)
    return Qwen3MoeConfig(**{**base, **kw})


def perturb_norms(m):
    """HF inits norm weights to 1: perturb them so the norm weights are really tested."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))


# --- 1. the sparse block ------------------------------------------------------------------------

@pytest.mark.parametrize("renorm,k,E", [(True, 2, 6), (False, 2, 6), (True, 1, 4), (False, 1, 4), (False, 3, 3)])
def test_block_matches_hf(renorm, k, E):
    torch.manual_seed(0)
    cfg = hf_config(num_experts=E, num_experts_per_tok=k, norm_topk_prob=renorm)
    ref = hf_moe().Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():                      # a bare HF block is not initialised: do it here
        for p in ref.parameters():
            p.normal_(std=0.3)
    ours = moe.SparseMoeBlock(moe.MoEConfig(hidden_size=32, moe_intermediate_size=16, num_experts=E,
                                            num_experts_per_tok=k, norm_topk_prob=renorm))
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        gate, up = ref.experts.gate_up_proj.chunk(2, dim=1)             # (E, 2I, H), gate first
        ours.experts.gate_proj.copy_(gate)
        ours.experts.up_proj.copy_(up)
        ours.experts.down_proj.copy_(ref.experts.down_proj)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        want = ref(x)
        want_logits, want_w, want_ids = ref.gate(x.reshape(-1, 32))
        got, got_logits = ours(x)
        _, got_w, got_ids = ours.route(x.reshape(-1, 32))
    assert (got_logits - want_logits).abs().max() < 1e-6
    assert torch.equal(got_ids, want_ids)
    assert (got_w - want_w).abs().max() < 1e-6
    assert (got - want).abs().max() < 1e-5
    assert want.abs().max() > 1e-2                                      # a non-trivial output


# --- the whole Qwen3-MoE LM, loaded from HF folders --------------------------------------------

def hf_lm(seed=0, **kw):
    torch.manual_seed(seed)
    ref = hf_moe().Qwen3MoeForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():                      # a larger router init so routing is not near-uniform
        for n, p in ref.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
    perturb_norms(ref)
    return ref


LM_CASES = [dict(decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True),
            dict(decoder_sparse_step=1, mlp_only_layers=[0, 4], norm_topk_prob=False, num_experts_per_tok=1),
            dict(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False, tie_word_embeddings=True)]


@pytest.mark.parametrize("kw", LM_CASES)
def test_qwen3_moe_lm_matches_hf(tmp_path, kw):
    ref = hf_lm(**kw)
    ref.save_pretrained(tmp_path, max_shard_size="60KB")               # hub layout: per-expert keys, sharded
    index = json.load(open(tmp_path / "model.safetensors.index.json"))["weight_map"]
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in index)
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    want_moe = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in ref.model.layers]
    assert [layer.is_moe for layer in ours.model.layers] == want_moe
    assert any(want_moe) and not all(want_moe) or kw["mlp_only_layers"] == []
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        out = ref(ids, output_router_logits=True)
        h, router_logits = ours.run(ids)
        got = ours.lm_head(h)
    assert (got - out.logits).abs().max() < 1e-4
    assert len(router_logits) == len(out.router_logits) == sum(want_moe)
    for a, b in zip(router_logits, out.router_logits):
        assert (a - b).abs().max() < 1e-4


def test_qwen3_moe_lm_loads_fused_layout(tmp_path):
    """transformers v5's in-memory layout (experts.gate_up_proj (E, 2I, H)) written as-is."""
    ref = hf_lm(decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(tmp_path / "model.safetensors"))
    ref.config.to_json_file(str(tmp_path / "config.json"))
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def test_a_saved_sailvl_holds_its_experts_as_hf_transformers_reads_them(tmp_path):
    """save_pretrained and the stage outputs (model.write_weights) write an MoE LLM in the hub layout,
    experts one by one: Qwen3MoeForCausalLM loads the folder's LLM tensors with no key missing or
    left over and gives our logits; from_pretrained reads the folder back bit-exact."""
    m = modeling.build_model("tiny-moe", seed=1).eval()
    m.save_pretrained(str(tmp_path / "ck"))
    sd = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert "language_model.model.layers.0.mlp.experts.3.down_proj.weight" in sd
    (tmp_path / "hf").mkdir()
    save_file({k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")},
              str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(m.cfg.llm_config.to_dict()))
    ref, info = hf_moe().Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (m.language_model(ids) - ref.eval()(ids).logits).abs().max() < 1e-4
    back = modeling.SAILVL.from_pretrained(str(tmp_path / "ck"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))


def test_missing_expert_is_a_clear_error(tmp_path):
    ref = hf_lm(decoder_sparse_step=1, mlp_only_layers=[])
    ref.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.2.mlp.experts.4.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.experts.*up_proj"):
        modeling.load_hf_llm(str(tmp_path))


# --- 2. load-balancing loss ---------------------------------------------------------------------

@pytest.mark.parametrize("E,k", [(8, 2), (6, 1), (5, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_matches_hf_function(E, k, masked):
    torch.manual_seed(E + k)
    B, T, L = 3, 7, 4
    logits = tuple(torch.randn(B * T, E) * 2 for _ in range(L))
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, 4:] = 0
        mask[2, 1:] = 0
    want = hf_moe().load_balancing_loss_func(logits, E, k, mask)
    got = moe.load_balancing_loss(list(logits), E, k, mask)
    assert abs(got.item() - want.item()) < 1e-6
    # hand-computed for the first layer alone: E · Σ_e (slots to e / rows) · (mean prob of e)
    z = logits[0]
    keep = torch.ones(B * T, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    p = z[keep].softmax(-1)
    frac = torch.stack([(p.topk(k, -1).indices == e).sum() for e in range(E)]).float() / keep.sum()
    hand = E * (frac * p.mean(0)).sum()
    assert abs(moe.load_balancing_loss([z], E, k, mask).item() - hand.item()) < 1e-6


def test_aux_loss_matches_hf_model_output(tmp_path):
    ref = hf_lm(decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True)
    ref.save_pretrained(tmp_path)
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0                                                     # right padding
    with torch.no_grad():
        for m in (None, mask):
            out = ref(ids, attention_mask=m, output_router_logits=True)
            _, router_logits = ours.run(ids, attention_mask=m)
            got = moe.load_balancing_loss(router_logits, 6, 2, m)
            assert abs(got.item() - out.aux_loss.item()) < 1e-5


def test_sailvl_loss_adds_aux_and_returns_router_logits():
    torch.manual_seed(0)
    model = modeling.build_model("tiny-moe")
    c = model.cfg.llm_config
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, labels=ids)
    assert out.router_logits is not None and len(out.router_logits) == c.num_hidden_layers
    want_aux = hf_moe().load_balancing_loss_func(tuple(r.detach() for r in out.router_logits),
                                                 c.num_experts, c.num_experts_per_tok)
    assert abs(out.aux_loss.item() - want_aux.item()) < 1e-5           # one rank: the share is the loss
    assert model(ids).aux_loss is None          # no labels (a judge's forward): no aux loss, no all-reduce
    out.aux_loss.backward()
    gate = model.language_model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().max() > 0          # the router learns from the aux loss


# cross-rank average, with a real 2-process gloo group on CPU

def _shards(seed=0, E=6, k=2, L=3):
    """Two ranks' router logits (different token counts) and padding masks."""
    g = torch.Generator().manual_seed(seed)
    sizes, data = [(2, 5), (3, 4)], []
    for r, (B, T) in enumerate(sizes):
        logits = [torch.randn(B * T, E, generator=g) * 2 for _ in range(L)]
        mask = torch.ones(B, T)
        mask[-1, T - 1 - r:] = 0
        data.append((logits, mask))
    return data, E, k


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data, E, k = _shards()
        logits, mask = data[rank]
        logits = [z.clone().requires_grad_(True) for z in logits]
        loss = moe.load_balancing_loss(logits, E, k, mask)
        loss.backward()
        load = moe.expert_load([z.detach() for z in logits], k, mask, sync=True)
        torch.save({"loss": loss.detach(), "grads": [z.grad for z in logits], "load": load.load},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_aux_loss_is_averaged_across_ranks(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    data, E, k = _shards()
    # the single-process loss of the concatenated global batch (HF's function as the oracle)
    glob = [torch.cat([data[r][0][l] for r in range(world)]).requires_grad_(True) for l in range(len(data[0][0]))]
    mask = torch.cat([data[r][1].reshape(-1) for r in range(world)])
    want = hf_moe().load_balancing_loss_func(tuple(glob), E, k, mask)
    want.backward()
    assert abs(sum(r["loss"].item() for r in res) - want.item()) < 1e-6  # the ranks' shares sum to it
    # a rank's loss alone differs from the global one: the synchronisation matters in this data
    local0 = moe.load_balancing_loss(data[0][0], E, k, data[0][1]).item()
    assert abs(local0 - want.item()) > 1e-3
    # gradients: each rank's share has exactly the global loss's gradient on its slice (the trainer
    # multiplies by world once, since DDP/FSDP average the ranks' gradients)
    offsets = [0, data[0][0][0].shape[0], mask.numel()]
    for r in range(world):
        for l, g in enumerate(res[r]["grads"]):
            assert (g - glob[l].grad[offsets[r]:offsets[r + 1]]).abs().max() < 1e-7
    # synced expert load: both ranks see the global-batch load
    want_load = moe.expert_load(glob, k, mask).load
    for r in range(world):
        assert (res[r]["load"] - want_load).abs().max() < 1e-6


# --- 3. expert-activation entropy ---------------------------------------------------------------

def test_expert_load_hand_computed():
    # 4 experts, top-2, 4 tokens; top-2 sets {0,1} {0,1} {0,2} {3,1}
    z = torch.tensor([[5., 4, 0, 0], [4, 5, 0, 1], [3, 0, 2, 1], [0, 1, -1, 2]])
    stats = moe.expert_load([z, z[:, [3, 2, 1, 0]]], top_k=2)
    # slots: expert 0: 3, 1: 3, 2: 1, 3: 1 of 8 -> load (3/8, 3/8, 1/8, 1/8); layer 2 reverses experts
    want = torch.tensor([3 / 8, 3 / 8, 1 / 8, 1 / 8])
    assert torch.allclose(stats.load[0], want) and torch.allclose(stats.load[1], want.flip(0))
    h = -(2 * 3 / 8 * math.log(3 / 8) + 2 * 1 / 8 * math.log(1 / 8))
    assert torch.allclose(stats.entropy, torch.tensor([h, h]))
    assert torch.allclose(stats.max_over_mean, torch.tensor([1.5, 1.5]))     # (3/8) / (1/4)
    # a mask drops token 0: slots 0:2, 1:2, 2:1, 3:1 of 6
    masked = moe.expert_load([z], 2, attention_mask=torch.tensor([0, 1, 1, 1]))
    assert torch.allclose(masked.load[0], torch.tensor([2 / 6, 2 / 6, 1 / 6, 1 / 6]))
    assert masked.tokens.item() == 3
    assert moe.load_entropy(torch.tensor([1.0, 0, 0, 0])).item() == 0.0
    summary = stats.summary()                                          # the trainer's per-step floats
    assert abs(summary["mean_entropy"] - h) < 1e-6 and summary["per_layer"] == pytest.approx([h, h])
    assert abs(summary["norm_entropy"] - h / math.log(4)) < 1e-6 and summary["min_entropy"] == pytest.approx(h)
    assert summary["max_over_mean"] == pytest.approx(1.5)


# --- 4. calibration -----------------------------------------------------------------------------

def skewed_router(seed=0, H=32, E=8):
    """Text tokens live in dims 0..23 and route evenly; multimodal tokens add a large shared
    component in dims 24..31 that the gate maps to experts 0 and 1 (a collapsed router)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(8, generator=g)
    v /= v.norm()
    W = torch.randn(E, H, generator=g) * 2 / math.sqrt(24)
    W[:, 24:] = -2.0 * v
    W[:2, 24:] = 2.0 * v

    def tokens(n, multimodal):
        h = torch.cat([torch.randn(n, 24, generator=g), 0.05 * torch.randn(n, 8, generator=g)], 1)
        return h + torch.cat([torch.zeros(24), 3.0 * v]) if multimodal else h
    return W, tokens


def hard_entropy(h, W, k):
    return moe.expert_load([h @ W.T], k).entropy.item()


def test_calibration_raises_multimodal_entropy_keeps_text():
    E, k = 8, 2
    W, tokens = skewed_router()
    mm_fit, mm_eval = tokens(1000, True), tokens(1000, True)
    text_fit, text_eval = tokens(1000, False), tokens(1000, False)
    before = hard_entropy(mm_eval, W, k)
    assert before < 0.5 * math.log(E)                                   # the constructed router is collapsed
    delta = moe.fit_gate_correction(W, mm_fit, text_fit, k, moe.CalibConfig(steps=150))
    W2 = W + delta
    after = hard_entropy(mm_eval, W2, k)
    assert after > 0.97 * math.log(E), (before, after)                  # near log E on held-out tokens
    agree, kl = moe.routing_change(text_eval @ W.T, text_eval @ W2.T, k)
    assert agree > 0.93 and kl < 0.02, (agree, kl)                      # held-out text routing mostly kept
    # without the text trust region the same fit moves text routing much more
    free = W + moe.fit_gate_correction(W, mm_fit, text_fit, k, moe.CalibConfig(steps=150, kl_weight=0.0, rank=32))
    assert moe.routing_change(text_eval @ W.T, text_eval @ free.T, k)[0] < agree


def test_contrast_directions_find_the_multimodal_subspace():
    _, tokens = skewed_router()
    U = moe.contrast_directions(tokens(2000, True), tokens(2000, False), rank=2)
    # the top direction lies (almost) in dims 24..31, where only multimodal tokens carry energy
    u = U[:, 0] / U[:, 0].norm()
    assert u[24:].norm() > 0.99


def tiny_moe_lm(seed=0):
    """A tiny Qwen3-MoE LM whose "image" token ids (64..127) share a large embedding component that
    every router maps to experts 0 and 1, the skew a new modality can bring."""
    torch.manual_seed(seed)
    cfg = modeling.LLMConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=16, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=False)
    lm = modeling.Qwen3LM(cfg)
    lm.init_weights()
    with torch.no_grad():
        lm.model.embed_tokens.weight[:, -4:] = 0.0
        lm.model.embed_tokens.weight[64:, -4:] = 0.03                   # image tokens: a shared direction
        for layer in lm.model.layers:
            g = layer.mlp.gate.weight                                   # (E, H)
            g.normal_(std=0.3)
            g[:, -4:] = -0.5
            g[:2, -4:] = 0.5
    return lm.eval()


def lm_batches(n, image, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(0, 64, (12,), generator=g)
        ids = torch.cat([text[:4], torch.randint(64, 128, (16,), generator=g), text[4:]]) if image else text
        ids = ids[None]
        out.append(dict(input_ids=ids, probe_mask=torch.ones(ids.shape[1], dtype=torch.bool), text_mask=ids[0] < 64,
                        image_mask=ids[0] >= 64))
    return out


def test_calibrate_whole_model_end_to_end(tmp_path):
    lm = tiny_moe_lm()
    mm_fit, mm_eval = lm_batches(24, True, 1), lm_batches(12, True, 2)
    text_fit, text_eval = lm_batches(24, False, 3), lm_batches(12, False, 4)
    blocks = moe.moe_blocks(lm)
    before = [b.gate.weight.detach().clone() for b in blocks]
    deltas = moe.calibrate(lm, mm_fit, text_fit, moe.CalibConfig(steps=100, rank=4), progress=False)
    after = [b.gate.weight.detach().clone() for b in blocks]
    assert sorted(deltas) == [0, 1, 2]
    for b0, b1, d in zip(before, after, deltas.values()):
        assert torch.allclose(b1, b0 + d)                               # folded into the gate weight
    image = moe.compare_routing(lm, mm_eval, before, after, "image_mask")     # the image tokens' load
    text = moe.compare_routing(lm, text_eval, before, after, "text_mask")
    logE = math.log(8)
    assert max(image["entropy_before"]) < 0.55 * logE
    assert min(image["entropy_after"]) > 0.9 * logE, image
    assert min(text["topk_agreement"]) > 0.85 and max(text["router_kl"]) < 0.05, text
    assert text["next_token_kl"] < 1e-4, text
    # a stronger text trust region keeps text routing closer, at some cost in entropy
    lm2 = tiny_moe_lm()
    moe.calibrate(lm2, mm_fit, text_fit, moe.CalibConfig(steps=100, rank=4, kl_weight=30.0), progress=False)
    text2 = moe.compare_routing(lm2, text_eval, before, [b.gate.weight for b in moe.moe_blocks(lm2)], "text_mask")
    assert sum(text2["topk_agreement"]) > sum(text["topk_agreement"])
    # compare_routing restores the calibrated gates; the weights are plain HF-layout tensors
    assert all(torch.equal(b.gate.weight, w) for b, w in zip(blocks, after))


def test_calibrate_cli(tmp_path, capsys):
    from PIL import Image
    model = modeling.build_model("tiny-moe")
    model.save_pretrained(str(tmp_path / "ckpt"))
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    mm, text = [], []
    for i in range(8):
        Image.new("RGB", (112, 112), colours[i % 4]).save(tmp_path / f"im{i}.png")
        mm.append({"image": f"im{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                             {"from": "gpt", "value": f"colour {i % 4}"}]})
        text.append({"text": f"plain text sample number {i} about colours and shapes"})
    (tmp_path / "mm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mm))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    import calibrate                                                    # the command line: tests/calibrate.py
    calibrate.calibrate_cli(["--ckpt", str(tmp_path / "ckpt"), "--data", str(tmp_path / "mm.jsonl"),
                               "--text", str(tmp_path / "text.jsonl"), "--steps", "20", "--out", str(tmp_path / "cal")])
    printed = capsys.readouterr().out
    assert "entropy before" in printed and "next-token KL" in printed
    rep = json.load(open(tmp_path / "cal" / "calibration.json"))
    assert len(rep["multimodal"]["entropy_after"]) == model.cfg.llm_config.num_hidden_layers
    cal = modeling.SAILVL.from_pretrained(str(tmp_path / "cal"))               # loads back, same keys
    assert set(cal.state_dict()) == set(model.state_dict())


# --- 5. presets -----------------------------------------------------------------------------------

def test_presets():
    big = modeling.build_model("30b-a3b", device="meta").language_model
    c = big.cfg
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (48, 2048, 32, 4, 128)
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob, c.rope_theta) == \
        (128, 8, 768, True, 1e6)
    assert c.moe_config() == moe.MoEConfig(2048, 768, 128, 8, True)    # read off the LLM config, HF names
    assert all(layer.is_moe for layer in big.model.layers) and not c.tie_word_embeddings
    total = modeling.count_params(big)
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    active = total - c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * per_expert
    assert 30.4e9 < total < 30.7e9 and 3.2e9 < active < 3.45e9         # Qwen3-30B-A3B: 30.5B total, 3.3B active
    tiny = modeling.build_model("tiny-moe")
    t = tiny.cfg.llm_config
    assert t.num_experts == 8 and all(layer.is_moe for layer in tiny.language_model.model.layers)
    ids = torch.randint(0, 256, (1, 10))
    assert tiny(ids).logits.shape == (1, 10, t.vocab_size)


# --- gaps found by mutation testing ------------------------------------------------------------------

@pytest.mark.parametrize("renorm", [True, False])
def test_router_softmax_is_fp32_for_bf16_logits(renorm):
    """Under bf16 (autocast or bf16 weights) the router's logits are bf16: HF's router softmaxes them in
    fp32, takes the top-k, renormalises in fp32 and casts the weights back. The bf16 block routes with
    exactly HF's weights and ids (a bf16 softmax or renormalisation rounds them differently)."""
    torch.manual_seed(0)
    cfg = hf_config(num_experts=6, num_experts_per_tok=2, norm_topk_prob=renorm)
    ref = hf_moe().Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.3)
    ours = moe.SparseMoeBlock(moe.MoEConfig(hidden_size=32, moe_intermediate_size=16, num_experts=6,
                                            num_experts_per_tok=2, norm_topk_prob=renorm))
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = torch.randn(256, 32).to(torch.bfloat16)
    with torch.no_grad():
        want_logits, want_w, want_ids = ref.gate(x)
        logits, got_w, got_ids = ours.route(x)
        # plain torch: fp32 softmax, top-k, renormalised in fp32, back to bf16
        p = torch.softmax(logits.float(), -1)
        w, ids = p.topk(2, -1)
        w = (w / w.sum(-1, keepdim=True) if renorm else w).to(torch.bfloat16)
    assert got_w.dtype == torch.bfloat16
    assert torch.equal(logits, want_logits) and torch.equal(got_ids, want_ids) and torch.equal(got_ids, ids)
    assert torch.equal(got_w, want_w) and torch.equal(got_w, w)


def test_more_than_ten_experts_load_in_numeric_order(tmp_path):
    """Hub keys experts.0 .. experts.11 are stacked by their number (10 and 11 after 9, not after 1):
    the loaded LM gives HF's logits, and each stacked expert is the file's tensor of that number."""
    ref = hf_lm(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, num_experts=12,
                num_experts_per_tok=3, num_hidden_layers=2)
    ref.save_pretrained(tmp_path)
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    sd = load_file(str(tmp_path / "model.safetensors"))
    for e in range(12):
        assert torch.equal(ours.model.layers[1].mlp.experts.up_proj[e], sd[f"model.layers.1.mlp.experts.{e}.up_proj.weight"])
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def test_a_moe_config_without_norm_topk_prob_is_read_with_hfs_default(tmp_path):
    """HF's Qwen3MoeConfig reads a config.json without norm_topk_prob as False (no renormalisation of
    the top-k weights): so must we, or every MoE layer's outputs change without a word."""
    from transformers import Qwen3MoeForCausalLM
    hf_lm(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["norm_topk_prob"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref = Qwen3MoeForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours = modeling.load_hf_llm(str(tmp_path)).eval()
    assert not ref.config.norm_topk_prob and not ours.cfg.norm_topk_prob
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def test_sailvl_aux_loss_leaves_out_the_padding_its_attention_mask_marks():
    """SAILVL.forward with labels and a padding `attention_mask`: the load-balancing term counts only
    the real tokens, HF's load_balancing_loss_func given the same mask (and differs from the unmasked one)."""
    torch.manual_seed(0)
    model = modeling.build_model("tiny-moe")
    c = model.cfg.llm_config
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0                                                     # right padding
    with torch.no_grad():
        out = model(ids, labels=ids, attention_mask=mask)
    logits = tuple(r.detach() for r in out.router_logits)
    want = hf_moe().load_balancing_loss_func(logits, c.num_experts, c.num_experts_per_tok, mask)
    unmasked = hf_moe().load_balancing_loss_func(logits, c.num_experts, c.num_experts_per_tok)
    assert abs(out.aux_loss.item() - want.item()) < 1e-6
    assert abs(want.item() - unmasked.item()) > 1e-4                    # the mask matters in this data
