"""rl.py's stage half (§4.2.3-§4.2.5), through the functions the stage calls: rollouts and the
policy they share with the training forward, dynamic sampling, the updates (mini-batches, old
log-probs, any micro-batch split), scoring, the pass@k filter, the held-out evaluation, the CoT
harvest, the model judge, an end-to-end wiring test on a contextual bandit, and the rl-verifiable
stage end to end with an exact resume. (The pure losses and rewards are tested against
hand-computed values and math-verify in test_rl.py; several ranks in test_rl_dist.py.)"""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from collections import Counter
from types import SimpleNamespace
import torch
from safetensors.torch import load_file

import data
import model as modeling
import moe
import rl
import train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth):
    """A tiny checkpoint saved as a finished stage (the synthetic data's tokenizer beside it) and
    a few rl-verifiable prompts."""
    root = tmp_path_factory.mktemp("rl")
    m = modeling.build_model("tiny", seed=0)
    modeling.save_checkpoint(str(root / "out" / "longcot"), m, {"stage": "longcot"}, 0, 1,
                             extra_files=train_stage.tokenizer_files(str(synth)))
    cfg = rl.resolve_algo(rl.RLConfig(out_dir=str(root / "out"), data_dir=str(synth), max_new_tokens=12,
                                      group_size=4, prompts_per_episode=2, pool_size=8), m.cfg)
    tok = data.load_tokenizer(str(synth))
    dcfg = data.DataConfig.from_model(m.cfg, label_mode="rl", think="on", max_len=2048)
    prompts = rl.read_prompts(cfg, tok, dcfg, "train", 8)
    return root, synth, m, tok, cfg, prompts


def replace(cfg, **kw):
    return rl.dataclasses.replace(cfg, **kw)


# ----------------------------------------------------------------------------------------------
# the policy: rollouts and the training forward agree

def recomputed_logps(m, tok, cfg, rolls):
    """The training forward the updates use (packed, `completion_logps`) on the rollouts."""
    m.eval()
    out = []
    for pack, idx in rl.micro_batches(rolls, 10_000, m.cfg.img_context_token_id):
        with torch.no_grad():
            lps, _ = rl.completion_logps(m, pack, cfg, tok.n_vocab, rl.banned_ids(tok))
        out += list(zip(idx, lps))
    return [lp for _, lp in sorted(out, key=lambda x: x[0])]


def test_compile_option_reaches_the_rollout_engine(setup, monkeypatch):
    """--compile=auto|true|false is the engine's compile argument (auto: compiled on CUDA only); graphs
    (CUDA graphs) is a usage error without a GPU."""
    _, _, m, tok, cfg, prompts = setup
    seen = []
    monkeypatch.setattr(modeling, "pick_compiled", lambda compile, device: seen.append(compile) or False)
    for value in ("auto", "true", "false"):
        rl.rollouts(m, tok, prompts[:1], replace(rl.rl_config([f"--compile={value}"])[0], max_new_tokens=2), None)
    assert seen == ["auto", True, False]
    if not torch.cuda.is_available():
        with pytest.raises(train_stage.UsageError, match="needs a GPU"):
            rl.rl_config(["--compile=graphs"])


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_rollout_logprobs_equal_the_training_forward(setup, temperature, top_p):
    """Rollouts are grouped prompt by prompt, never emit image tokens, and record the log-prob of
    each token under the policy the loss uses: temperature, top-p and the tokenizer's size (an
    embedding table padded beyond it: the next test)."""
    _, _, m, tok, cfg, prompts = setup
    cfg = replace(cfg, temperature=temperature, top_p=top_p)
    rolls = rl.rollouts(m, tok, prompts[:3], cfg, torch.Generator().manual_seed(0))
    assert len(rolls) == 12 and [r.prompt for r in rolls[::4]] == prompts[:3]
    assert all(r.prompt is rolls[4 * (i // 4)].prompt for i, r in enumerate(rolls))
    assert all(len(r.rollout_logp) == len(r.completion) and r.truncated == (len(r.completion) == 12) for r in rolls)
    ids = data.special_ids(tok)
    assert not any(t in rl.banned_ids(tok) or t >= tok.n_vocab for r in rolls for t in r.completion)
    for r, lp in zip(rolls, recomputed_logps(m, tok, cfg, rolls)):
        torch.testing.assert_close(lp, torch.tensor(r.rollout_logp), atol=1e-4, rtol=0)
    assert ids.img_context in rl.banned_ids(tok)


def test_rollout_calls_are_sized_to_the_free_memory(setup, monkeypatch):
    """On a GPU each generate call takes as many whole prompts as fit in 80% of the free memory
    (at most batch_rows rows): per row of the tiny LLM 2 x 4 layers x 2 KV heads x 32 dims x 4
    bytes (fp32 here; bf16 under CUDA's autocast) per slot, prompt + max_new_tokens slots, G + 1
    copies per prompt (its prefill, then its G rows), and 32 bytes per vocabulary entry per row
    for sampling. One prompt that does not fit is a clear error; on the CPU batch_rows alone counts."""
    _, _, m, tok, cfg, prompts = setup
    calls = []
    engine = modeling.generate_from_embeds
    monkeypatch.setattr(modeling, "generate_from_embeds", lambda lm, embeds, *a, **k: calls.append(len(embeds))
                        or engine(lm, embeds, *a, **k))
    cfg = replace(cfg, max_new_tokens=2, batch_rows=128)           # 32 prompts of G = 4 per call by rows
    longest = max(len(p.ids) for p in prompts[:7])
    per_prompt = (2 * 4 * 2 * 32 * 4) * (longest + 2) * (4 + 1) + 32 * 512 * 4
    for free, want in [(None, [7]), (int(per_prompt * 4 / 0.8) - 16, [3, 3, 1]), (int(per_prompt / 0.8) + 16, [1] * 7)]:
        monkeypatch.setattr(rl, "free_memory", lambda device: free)
        calls.clear()
        assert len(rl.rollouts(m, tok, prompts[:7], cfg, torch.Generator().manual_seed(0))) == 28
        assert calls == want, (free, calls)
    monkeypatch.setattr(rl, "free_memory", lambda device: int(per_prompt / 0.8) - 16)
    with pytest.raises(RuntimeError, match="one prompt's 4 rows need .* lower --max_new_tokens or --group_size"):
        rl.rollouts(m, tok, prompts[:7], cfg, torch.Generator().manual_seed(0))


def test_a_calls_draws_do_not_depend_on_how_far_the_calls_before_it_ran(setup, monkeypatch):
    """rollouts with call_seed (the held-out evaluation's): one prompt per call, the first call made to
    use up 1,000 more random numbers (as a call whose rows run longer does) -> the second call's rows
    are the same tokens; from one shared generator they are not."""
    _, _, m, tok, cfg, prompts = setup
    cfg = replace(cfg, batch_rows=4, temperature=1.0, max_new_tokens=6)
    engine, extra = modeling.generate_from_embeds, [0]

    def longer_first_call(lm, embeds, max_new, temperature, top_p, stop, generator, *a, **k):
        torch.rand(extra.pop() if extra else 0, generator=generator)
        return engine(lm, embeds, max_new, temperature, top_p, stop, generator, *a, **k)
    monkeypatch.setattr(modeling, "generate_from_embeds", longer_first_call)

    def second_calls_rows(burn, **kw):
        extra[:] = [burn]
        return [r.completion for r in rl.rollouts(m, tok, prompts[:2], cfg, **kw)[4:]]
    assert second_calls_rows(0, generator=None, call_seed=7) == second_calls_rows(1000, generator=None, call_seed=7)
    shared = [second_calls_rows(burn, generator=torch.Generator().manual_seed(7)) for burn in (0, 1000)]
    assert shared[0] != shared[1]


def test_free_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    """free_memory on a CUDA device: the device's free bytes plus the allocator's reserved but
    unallocated ones (after an update they stay cached, and the device counts them as taken); the
    CPU has no figure. (The torch.cuda calls stubbed: no GPU here.)"""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 12 << 30)
    assert rl.free_memory(torch.device("cuda", 0)) == 28 << 30
    assert rl.free_memory(torch.device("cpu")) is None


def test_the_update_forward_never_makes_the_packs_vocabulary_logits(setup, monkeypatch):
    """completion_logps, the forward of the old log-probs and of every update, makes the logits a
    chunk of positions at a time, for the completion tokens only, and again in backward: no tensor
    of (more than a chunk's rows) x V is made or kept for backward. Its log-probs, entropies and
    the log-probs' gradients are those of the pack's full logits."""
    from torch.utils._python_dispatch import TorchDispatchMode
    _, _, m, tok, cfg, prompts = setup
    mcfg = copy.deepcopy(m.cfg)
    mcfg.llm_config.vocab_size = V = 520                 # padded beyond the tokenizer, and no other width
    torch.manual_seed(0)
    m = modeling.SAILVL(mcfg)
    m.init_weights()
    chunk = 64
    monkeypatch.setattr(modeling, "CE_CHUNK", chunk)
    rolls = rl.rollouts(m, tok, prompts[:2], cfg, torch.Generator().manual_seed(0))
    (pack, idx), = rl.micro_batches(rolls, 10_000, m.cfg.img_context_token_id)
    T = pack["input_ids"].shape[1]
    assert T > 4 * chunk and sum(len(r.completion) for r in rolls) > chunk

    H = mcfg.llm_config.hidden_size

    class Rows(TorchDispatchMode):      # the most rows of any (rows, V) tensor an op makes (not the lm_head's
        most = 0                        # weight gradient, (H, V) before its transpose)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == V and t.shape[0] != H:
                    Rows.most = max(Rows.most, t.shape[0])
            return out
    saved = []
    with Rows(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        lps, ents = rl.completion_logps(m, pack, cfg, tok.n_vocab, rl.banned_ids(tok))
        sum((lp * (i + 1)).sum() for i, lp in enumerate(lps)).backward()     # (the loss's; entropy: a stat)
    assert 0 < Rows.most <= chunk and not [s for s in saved if s[-1:] == (V,)]   # recomputed in backward
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with torch.no_grad():                           # the reference: the pack's full logits, then the policy
        logits = m(pack["input_ids"], pack["pixel_values"], position_ids=pack["position_ids"],
                   cu_seqlens=pack["cu_seqlens"]).logits[0, :-1]
    keep = pack["labels"][0, 1:] != -100
    want_lp, want_ent = rl.policy_logprobs(logits[keep], pack["labels"][0, 1:][keep], cfg, tok.n_vocab,
                                          rl.banned_ids(tok))
    torch.testing.assert_close(torch.cat(lps).detach(), want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(ents).detach(), want_ent, atol=1e-5, rtol=0)
    logits = m(pack["input_ids"], pack["pixel_values"], position_ids=pack["position_ids"],
               cu_seqlens=pack["cu_seqlens"]).logits[0, :-1]
    full_lp, _ = rl.policy_logprobs(logits[keep], pack["labels"][0, 1:][keep], cfg, tok.n_vocab, rl.banned_ids(tok))
    weights = torch.cat([torch.full((len(lp),), i + 1.0) for i, lp in enumerate(lps)])
    (full_lp * weights).sum().backward()
    for g, p in zip(got, m.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_rollouts_updates_and_evaluation_make_every_tensor_on_the_models_device(setup, monkeypatch, on_the_cpu):
    """Dynamic sampling (rollouts, rewards), the updates and the held-out evaluation, run inside
    `torch.device("meta")`: a tensor they made without the model's device would be a meta tensor and
    raise on meeting the model's, as a CPU tensor meeting a CUDA model's does (conftest.on_the_cpu).
    The data side stays on the CPU: decoded prompts, packed micro-batches, per-group reward numbers."""
    _, _, m, tok, cfg, prompts = setup
    m = copy.deepcopy(m)                                         # the update changes the weights
    cfg = replace(cfg, mini_batches=2, epochs=2)
    for name in ("micro_batches", "kept_groups", "set_advantages"):
        monkeypatch.setattr(rl, name, on_the_cpu(getattr(rl, name)))
    pool = rl.PromptPool(rl.prompt_mixture(cfg, tok, data.DataConfig.from_model(m.cfg, label_mode="rl", max_len=2048),
                                           "train"), range(8), 0)
    pool.take = on_the_cpu(pool.take)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    opt.step = on_the_cpu(opt.step)           # torch.optim's own step counters (conftest.on_the_cpu)
    before = [p.detach().clone() for p in m.parameters()]
    with torch.device("meta"):
        rl.sample_groups(m, tok, pool, cfg, torch.Generator().manual_seed(0))
        rolls = on_the_cpu(scored)(rl.rollouts(m, tok, prompts[:2], cfg, torch.Generator().manual_seed(0)),
                                   [0.0, 1.0] * 4)
        stats = rl.update_episode(m, opt, list(m.parameters()), rolls, cfg, tok, rolls[0])
        records = rl.evaluate_prompts(m, tok, prompts[:2], cfg)
        rl.pass_at_k_filter(m, tok, prompts[:2], cfg, 2, torch.Generator().manual_seed(0))
    assert stats["updates"] == 4 and len(records) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_rollouts_and_updates_run_under_the_trainers_cuda_precision(setup, monkeypatch):
    """On CUDA rollouts and updates run under bf16 autocast (model.autocast); here under the CPU's: the
    projections' bf16 outputs go into the cache in its dtype, the first update's ratio is still
    exactly 1 (the same forward for the old log-probs and the update), and the rollouts' log-probs
    are the training forward's up to bf16 rounding."""
    _, _, m, tok, cfg, prompts = setup
    m = copy.deepcopy(m)
    monkeypatch.setitem(modeling.COMPUTE_DTYPE, "cpu", torch.bfloat16)
    rolls = scored(rl.rollouts(m, tok, prompts[:2], cfg, torch.Generator().manual_seed(0)), [0.0, 1.0] * 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    st = rl.update_episode(m, opt, list(m.parameters()), rolls, replace(cfg, mini_batches=2, epochs=2), tok, rolls[0])
    assert st["updates"] == 4 and st["ratio_max_dev"] == 0.0 and 0 < st["ratio_max_dev_later"]
    assert 0 < st["dlogp"] < 0.05                                  # bf16 rounding, not another policy


def test_under_autocast_rollouts_run_on_a_copy_with_the_llms_matrices_in_bf16(setup, monkeypatch):
    """Under bf16 autocast (CUDA's; here the CPU's) the rollouts run on generation_policy's copy: the
    LLM's Linear weights and MoE experts held in bf16 (autocast would cast each of them in every
    decode step), the lm_head untied from the fp32 embedding, the rest fp32. Its rollouts are the
    fp32 model's under autocast, tokens and log-probs, dense and MoE; refreshed after an update it
    holds the new weights. Making it never allocates more fp32 than the copy keeps (the matrices are
    cast before they are allocated)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    _, _, m, tok, cfg, prompts = setup
    monkeypatch.setitem(modeling.COMPUTE_DTYPE, "cpu", torch.bfloat16)
    rollouts = lambda policy: [(r.completion, r.rollout_logp) for r in rl.rollouts(  # noqa: E731
        policy, tok, prompts[:2], cfg, torch.Generator().manual_seed(0))]

    class Fp32Bytes(TorchDispatchMode):           # bytes of the fp32 tensors that allocations make
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("empty") and out.dtype == torch.float32 and not out.is_meta:
                Fp32Bytes.total += out.nbytes
            return out
    for model in (copy.deepcopy(m), modeling.build_model("tiny-moe", seed=1)):
        Fp32Bytes.total = 0
        with Fp32Bytes():
            policy = rl.generation_policy(model)
        lm = policy.language_model
        assert Fp32Bytes.total == sum(p.nbytes for p in policy.parameters() if p.dtype == torch.float32)
        matrices = {f"language_model.{name}.{p}" for name, mod in lm.named_modules()
                    if isinstance(mod, (torch.nn.Linear, moe.Experts)) for p, _ in mod.named_parameters()}
        assert {n for n, p in policy.named_parameters() if p.dtype == torch.bfloat16} == matrices
        assert any(isinstance(mod, moe.Experts) for mod in lm.modules()) == (model.cfg.llm_config.num_experts > 0)
        assert lm.lm_head.weight is not lm.model.embed_tokens.weight and policy is not model
        assert rollouts(policy) == rollouts(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        assert rl.generation_policy(model, policy) is policy
        assert all(torch.equal(policy.state_dict()[k], v.to(policy.state_dict()[k].dtype))
                   for k, v in model.state_dict().items())


@pytest.mark.parametrize("lean,place", [(False, "copy"), (True, "copy"), (True, "model")])
def test_sharded_updates_run_under_fsdp2s_bf16_mixed_precision(setup, monkeypatch, on_the_cpu, sharded_in_bf16, lean,
                                                               place):
    """Under torchrun on GPUs the policy is sharded with FSDP2's bf16 mixed precision (place_model on
    CUDA) and its unsharded replica generates (generation_policy); here the same on CPU in a process
    group of one, inside `torch.device("meta")` (no tensor made off the model's device): the first
    update's ratio is exactly 1 and the rollout log-probs are the training forward's up to bf16;
    in both update memories (lean: units gathered and gradients reduced per micro-batch), and
    generating on the sharded model itself (--generate_on=model), its first gathers made inside the
    caller's inference mode (FSDP2 keeps their buffers: the update must still write them)."""
    root, _, m, tok, cfg, prompts = setup
    monkeypatch.setitem(modeling.COMPUTE_DTYPE, "cpu", torch.bfloat16)
    monkeypatch.setattr(rl, "micro_batches", on_the_cpu(rl.micro_batches))
    cfg = replace(cfg, init_from=str(root / "out" / "longcot"), mini_batches=2, epochs=2)
    model, _ = train_stage.place_model(cfg, m.cfg, 0, 1, torch.device("cpu"), lambda *a: None)
    params = [p for p in model.parameters() if p.requires_grad]
    seen = set()                                                  # the weights the sharded forward computes with
    model.language_model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: seen.add(mod.weight.dtype))
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step = on_the_cpu(opt.step)           # torch.optim's own step counters (conftest.on_the_cpu)
    with torch.device("meta"):
        policy = rl.generation_policy(model, place=place)
        assert (policy is model) == (place == "model")
        with torch.inference_mode():
            rolls = on_the_cpu(scored)(rl.rollouts(policy, tok, prompts[:2], cfg, torch.Generator().manual_seed(0)),
                                       [0.0, 1.0] * 4)
        st = rl.update_episode(model.train(), opt, params, rolls, replace(cfg, max_tokens=60), tok, rolls[0], lean=lean)
    assert st["updates"] == 4 and st["ratio_max_dev"] == 0.0 and 0 < st["dlogp"] < 0.05 and seen == {torch.bfloat16}


def meta_model(preset):
    """A preset's model on the meta device (no memory), its LLM trainable as RL trains it."""
    with torch.device("meta"):
        m = modeling.SAILVL(modeling.preset_config(preset))
    modeling.freeze(m, ["language_model"])
    return m


def test_auto_update_memory_goes_lean_where_full_would_crowd_the_gpu(monkeypatch):
    """full_update_bytes by hand for the 8b preset as RL trains it (the LLM): the generation copy
    (the LLM's matrices in bf16, the rest fp32), the gathered model in bf16 and the LLM's fp32
    gradient; auto goes lean on an 80 GB GPU for 8b (about 20 + 18 + 33 GB), not for 2b; on a 24 GB
    one for 2b too; never on the CPU; an explicit value wins."""
    m = meta_model("8b")
    lm = m.language_model
    matrices = sum(p.numel() for mod in lm.modules() if isinstance(mod, (torch.nn.Linear, moe.Experts))
                   for p in mod.parameters(recurse=False))
    n, n_llm = modeling.count_params(m), modeling.count_params(lm)
    assert not m.cfg.llm_config.tie_word_embeddings                     # else a bf16 lm_head copy besides
    copy_bytes = 2 * matrices + 4 * (n - matrices)
    assert rl.full_update_bytes(m, torch.bfloat16, False) == copy_bytes
    assert rl.full_update_bytes(m, torch.bfloat16, True) == copy_bytes + 2 * n + 4 * n_llm
    assert [round(b / 1e9) for b in (copy_bytes, 2 * n, 4 * n_llm)] == [21, 18, 33]
    assert rl.full_update_bytes(m, None, False) == 0                    # one CPU process: no copy is made

    gpu = SimpleNamespace(total_memory=80e9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    monkeypatch.setattr(rl.dist, "is_initialized", lambda: True)

    def lean(model, mode="auto", device="cuda"):                      # the model as if on `device`
        monkeypatch.setattr(modeling, "model_device", lambda _: torch.device(device))
        return rl.lean_updates(SimpleNamespace(update_memory=mode), model)
    assert lean(m) and not lean(meta_model("2b"))
    gpu.total_memory = 24e9
    assert lean(meta_model("2b")) and not lean(m, device="cpu")
    assert not lean(m, "full") and lean(meta_model("2b"), "lean", "cpu")


def test_auto_generates_past_the_copy_where_it_would_crowd_the_gpu(monkeypatch):
    """copy_bytes and training_state_bytes by hand; where a copy would crowd the GPU auto generates on
    a copy holding the rank's share of the experts, for 30b-a3b on 8 H200s (14 GB, against a 64 GB
    full copy, beside 61 GB of shards, gradient and Adam per rank), or on the model itself where the
    experts do not split evenly (6 ranks) or that does not fit either (8 H100s); on a copy for 8b on
    8 H100s (21 + 17 GB); never past the copy on the CPU; an explicit value wins. Without a copy,
    full holds only the gathered model and the gradient beyond lean; with the experts' share, that
    share."""
    big, m8 = meta_model("30b-a3b"), meta_model("8b")
    lm = big.language_model
    matrices = sum(p.numel() for mod in lm.modules() if isinstance(mod, (torch.nn.Linear, moe.Experts))
                   for p in mod.parameters(recurse=False))
    experts = sum(p.numel() for mod in lm.modules() if isinstance(mod, moe.Experts) for p in mod.parameters())
    n, n_llm = modeling.count_params(big), modeling.count_params(lm)
    assert rl.copy_bytes(big, torch.bfloat16) == 2 * matrices + 4 * (n - matrices)
    assert rl.copy_bytes(big, torch.bfloat16, 8) == 2 * (matrices - experts * 7 // 8) + 4 * (n - matrices)
    assert rl.training_state_bytes(big, 8) == (4 * n + 12 * n_llm) // 8
    assert [round(b / 1e9) for b in (rl.copy_bytes(big, torch.bfloat16), rl.copy_bytes(big, torch.bfloat16, 8),
                                     rl.training_state_bytes(big, 8))] == [64, 14, 61]
    assert rl.full_update_bytes(big, torch.bfloat16, True, "model") == 2 * n + 4 * n_llm

    gpu, world = SimpleNamespace(total_memory=141e9), [8]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    monkeypatch.setattr(rl, "rank_and_world", lambda: (0, world[0]))
    assert rl.full_update_bytes(big, torch.bfloat16, True, "experts") == rl.copy_bytes(big, torch.bfloat16, 8) \
        + 2 * n + 4 * n_llm

    def place(model, mode="auto", device="cuda"):                    # the model as if on `device`
        monkeypatch.setattr(modeling, "model_device", lambda _: torch.device(device))
        return rl.generation_place(SimpleNamespace(generate_on=mode), model)
    assert place(big) == "experts" and place(big, device="cpu") == "copy" and place(big, "copy") == "copy"
    world[0] = 6                                                        # 128 experts do not split over 6
    assert place(big) == "model"
    world[0], gpu.total_memory = 8, 80e9
    assert place(big) == "model" and place(m8) == "copy" and place(m8, "model", "cpu") == "model"


def test_generation_on_the_sharded_model_is_said_and_refuses_compile(setup, sharded_in_bf16):
    """train_rl's choice of where to generate, as it resolves it: on the sharded model the log says
    so and lean says nothing of a copy; --compile=true or graphs there is a usage error (its units
    gather their weights in each forward: eager), also when auto chose it; on a copy it is not."""
    root, _, m, tok, cfg, prompts = setup
    cfg = replace(cfg, init_from=str(root / "out" / "longcot"), update_memory="lean")
    model, _ = train_stage.place_model(cfg, m.cfg, 0, 1, torch.device("cpu"), lambda *a: None)
    lines = []
    place, policy, lean = rl.generation_and_update_memory(replace(cfg, generate_on="model"), model, lines.append)
    assert place == "model" and policy is model and lean
    assert lines == ["generation: on the sharded model (each unit gathered per decode step; eager)",
                     "update memory: lean (sharded units gathered per micro-batch)"]
    for compile in ("true", "graphs"):
        with pytest.raises(train_stage.UsageError, match="runs eagerly"):
            rl.generation_and_update_memory(replace(cfg, generate_on="model", compile=compile), model, print)
    lines = []
    place, policy, lean = rl.generation_and_update_memory(replace(cfg, compile="true"), model, lines.append)
    assert place == "copy" and policy is not model and lean and lines[0].startswith("update memory: lean (the generation copy")
    with pytest.raises(train_stage.UsageError, match="split evenly over them"):     # one process, a dense model
        rl.generation_and_update_memory(replace(cfg, generate_on="experts"), model, print)


@pytest.mark.parametrize("cast", [False, True])
def test_the_generation_copy_under_fsdp_holds_the_models_fp32_weights(setup, monkeypatch, sharded_in_bf16, cast):
    """Under FSDP (a process group of one here, with its bf16 mixed precision) generation_policy fills
    its copy tensor by tensor: the model's full fp32 weights (with autocast, the LLM's matrices
    rounded to bf16 once), also when the units were left gathered after a forward (holding bf16
    copies), and after an update the new ones."""
    root, _, m, tok, cfg, prompts = setup
    if cast:
        monkeypatch.setitem(modeling.COMPUTE_DTYPE, "cpu", torch.bfloat16)
    cfg = replace(cfg, init_from=str(root / "out" / "longcot"))
    model, _ = train_stage.place_model(cfg, m.cfg, 0, 1, torch.device("cpu"), lambda *a: None)

    def assert_holds_the_weights(policy):
        full = modeling.full_state_dict(model)
        for name, t in policy.state_dict().items():
            assert torch.equal(t, full[name].to(t.dtype)), name
        assert {t.dtype for t in policy.state_dict().values()} == ({torch.float32, torch.bfloat16} if cast else
                                                                   {torch.float32})
    policy = rl.generation_policy(model)
    assert_holds_the_weights(policy)
    with torch.no_grad():
        for p in model.parameters():                   # an update: the fp32 shards move
            p.add_(0.01 * torch.randn_like(p))
        r = prompts[0]
        model(torch.tensor([r.ids]), r.pixels.to(torch.bfloat16))    # the units stay gathered, in bf16
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    assert rl.generation_policy(model, policy) is policy
    assert_holds_the_weights(policy)


def test_policy_masks_padded_vocabulary_and_image_tokens(setup):
    """With a model whose vocabulary is larger than the tokenizer's, the policy puts no mass on
    the extra rows; the image tokens get none either; top-p removes the tail."""
    _, _, m, tok, cfg, _ = setup
    logits = torch.randn(5, tok.n_vocab + 64)
    lp = torch.log_softmax(modeling.policy_logits(logits, 0.7, 0.9, tok.n_vocab, rl.banned_ids(tok)), -1)
    assert torch.isinf(lp[:, tok.n_vocab:]).all() and torch.isinf(lp[:, list(rl.banned_ids(tok))]).all()
    kept = lp.exp()
    assert torch.allclose(kept.sum(-1), torch.ones(5), atol=1e-5)
    ref = torch.softmax(logits[:, :tok.n_vocab] / 0.7, -1)           # the nucleus, by hand
    for i in range(5):
        p = ref[i].clone()
        p[list(rl.banned_ids(tok))] = 0
        p /= p.sum()
        order = p.argsort(descending=True)
        need = int((p[order].cumsum(0) < 0.9).sum()) + 1
        assert set(torch.nonzero(kept[i] > 0)[:, 0].tolist()) == set(order[:need].tolist())


# ----------------------------------------------------------------------------------------------
# updates

def scored(rolls, rewards, group_size=4):
    for r, x in zip(rolls, rewards):
        r.reward = r.answer_r = x
    for r, a in zip(rolls, rl.group_advantages(torch.tensor(rewards), group_size).tolist()):
        r.advantage = a
    return rolls


class Recorder(torch.optim.Optimizer):
    """Records the gradients of each step (applies nothing)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() if p.grad is not None else None for g in self.param_groups
                          for p in g["params"]])


def filler_of(prompts):
    return rl.Rollout(prompts[0], [0], "", False, [0.0])


@pytest.mark.parametrize("agg", ["", "seq-mean-token-sum-norm"])       # DAPO's token-mean; Dr.GRPO's
def test_first_update_has_ratio_exactly_one_and_splits_do_not_change_the_gradient(setup, agg):
    _, _, m, tok, cfg, prompts = setup
    cfg = replace(cfg, agg=agg)
    rolls = scored(rl.rollouts(m, tok, prompts[:4], cfg, torch.Generator().manual_seed(1)),
                   [float(i % 3 == 0) for i in range(16)])
    for i, r in enumerate(rolls):                        # completions of different lengths: packs of different widths
        n = 3 + (5 * i) % 17
        r.completion, r.rollout_logp = r.completion[:n], r.rollout_logp[:n]
    params = list(m.parameters())
    grads = []
    for max_tokens in (4096, 300, 120):                  # one pack, a few, many: the same mini-batch gradient
        opt = Recorder(params)
        st = rl.update_episode(m, opt, params, rolls, replace(cfg, max_tokens=max_tokens), tok, filler_of(prompts))
        assert st["ratio_max_dev"] == 0.0 and st["dlogp"] < 1e-4          # old log-probs = the policy: r = 1
        grads.append(opt.seen[0])
    assert len(rl.micro_batches(rolls, 120, m.cfg.img_context_token_id)) >= 3
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(a is not None and a.abs().max() > 0 for a in grads[0])    # not vacuous


def test_a_mini_batch_with_no_rollout_is_no_update(setup):
    """One kept group and --mini_batches=4 (dynamic sampling trains on what it kept): the three empty
    mini-batches are no updates, so the episode gives mini_batches=1's weights and stats (an AdamW
    step on zero gradients would still move the weights by its moments), not a quarter of them."""
    _, _, m0, tok, cfg, prompts = setup
    rolls = scored(rl.rollouts(m0, tok, prompts[:1], cfg, torch.Generator().manual_seed(3)), [0.0, 1.0, 1.0, 0.0])
    out = []
    for mb in (1, 4):
        m = copy.deepcopy(m0).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        st = rl.update_episode(m, opt, list(m.parameters()), rolls, replace(cfg, mini_batches=mb, epochs=2), tok,
                               filler_of(prompts))
        out.append((st, m.state_dict()))
    (one, w1), (four, w4) = out
    assert one["updates"] == four["updates"] == 2 and one["loss"] != 0
    assert all(one[k] == pytest.approx(four[k]) for k in ("loss", "entropy", "clip_frac_high", "approx_kl"))
    assert all(torch.equal(w1[k], w4[k]) for k in w1)


def test_mini_batches_are_separate_updates_against_the_rollout_policy(setup):
    """Two mini-batches x two epochs: four optimizer steps; the first mini-batch's gradient is the
    gradient of its own rollouts alone (the batch is really split); after the first step the ratio
    moves away from 1 (old log-probs come from before the episode, not recomputed per update)."""
    _, _, m0, tok, cfg, prompts = setup
    m = modeling.build_model("tiny", seed=0)
    rolls = scored(rl.rollouts(m, tok, prompts[:4], cfg, torch.Generator().manual_seed(2)),
                   [float(i % 3 == 0) for i in range(16)])
    cfg2 = replace(cfg, mini_batches=2, epochs=2)
    params = list(m.parameters())
    rec = Recorder(params)
    rl.update_episode(m, rec, params, rolls, cfg2, tok, filler_of(prompts))
    assert len(rec.seen) == 4
    alone = Recorder(params)
    rl.update_episode(m, alone, params, rolls[:8], replace(cfg, mini_batches=1, epochs=1), tok, filler_of(prompts))
    for a, b in zip(rec.seen[0], alone.seen[0]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    opt = torch.optim.AdamW(params, lr=1e-2)
    st = rl.update_episode(m, opt, params, rolls, cfg2, tok, filler_of(prompts))
    assert st["updates"] == 4 and st["ratio_max_dev"] == 0.0 and st["ratio_max_dev_later"] > 1e-3


class SGDRecorder(Recorder):
    """Records the gradients of each step, then takes a plain SGD step."""

    def step(self, closure=None):
        super().step()
        with torch.no_grad():
            for p in (p for g in self.param_groups for p in g["params"] if p.grad is not None):
                p -= self.lr * p.grad


def reference_episode(m0, rolls, cfg, tok, lr):
    """The episode's updates written out: per mini-batch of whole groups (every epoch), policy_loss
    over all its rollouts at once, each completion's log-probs from a pack of its own, the old ones
    from the weights before the episode, the mini-batch's own normaliser; plain SGD. -> gradients."""
    m = copy.deepcopy(m0).train()
    params = list(m.parameters())
    img, banned = m.cfg.img_context_token_id, rl.banned_ids(tok)

    def logps(rows):
        return [rl.completion_logps(m, rl.micro_batches([r], 10 ** 6, img)[0][0], cfg, tok.n_vocab, banned)[0][0]
                for r in rows]
    with torch.no_grad():
        old = logps(rolls)
    grads = []
    for _ in range(cfg.epochs):
        for mb in rl.split_mini_batches(rolls, cfg):
            rows = [rolls[i] for i in mb]
            logp, mask = rl.padded(logps(rows), "cpu")
            old_lp, _ = rl.padded([old[i] for i in mb], "cpu")
            loss, _ = rl.policy_loss(logp, old_lp, torch.tensor([r.advantage for r in rows]), mask, cfg.algo,
                                     cfg.clip_low, cfg.clip_high, cfg.agg, clip_c=cfg.clip_c, norm_len=cfg.max_new_tokens)
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
            with torch.no_grad():
                for p, g in zip(params, grads[-1]):
                    if g is not None:
                        p -= lr * g
    return grads


@pytest.mark.parametrize("algo,agg,clips", [("dapo", "", (0.02, 0.03, 3.0)),
                                            ("gspo", "", (0.002, 0.003, 0.0)),
                                            ("dapo", "seq-mean-token-sum-norm", (0.05, 0.05, 0.0))])
def test_an_episodes_updates_equal_the_loss_written_out_per_mini_batch(setup, algo, agg, clips):
    """update_episode against reference_episode, update by update: 2 mini-batches x 2 epochs of
    groups with different advantages and completions of different lengths, packed across rows,
    with the run's algorithm, clip range, dual clip and aggregation (tight clips, so that they bind
    once the policy moves): the same gradients."""
    _, _, m0, tok, cfg, prompts = setup
    lo, hi, c = clips
    cfg = rl.resolve_algo(replace(cfg, algo=algo, agg=agg, clip_low=lo, clip_high=hi, clip_c=c, mini_batches=2,
                                  epochs=2, grad_clip=1e9, max_tokens=300), m0.cfg)
    rolls = scored(rl.rollouts(m0, tok, prompts[:4], cfg, torch.Generator().manual_seed(5)),
                   [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1])   # four groups, four different advantage sets
    for i, r in enumerate(rolls):
        n = 3 + (5 * i) % 10
        r.completion, r.rollout_logp = r.completion[:n], r.rollout_logp[:n]
    lr = 3.0 if algo == "gspo" else 0.5
    want = reference_episode(m0, rolls, cfg, tok, lr)
    m = copy.deepcopy(m0).train()
    params = list(m.parameters())
    opt = SGDRecorder(params)
    opt.lr = lr
    st = rl.update_episode(m, opt, params, rolls, cfg, tok, filler_of(prompts))
    assert st["updates"] == len(opt.seen) == len(want) == 4
    assert st["clip_frac_low"] + st["clip_frac_high"] > 0 and st["ratio_max_dev_later"] > 1e-3   # not vacuous
    for u, (got, ref) in enumerate(zip(opt.seen, want)):
        for a, b in zip(got, ref):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-6, msg=lambda s: f"update {u}: {s}")


# ----------------------------------------------------------------------------------------------
# dynamic sampling, scoring, filter

def test_dynamic_sampling_keeps_groups_on_accuracy_and_stops_at_its_cap(setup, monkeypatch):
    """A group is kept when its answers are neither all right nor all wrong: a group whose shaped
    reward varies (format) but whose accuracy does not is dropped, as DAPO filters on accuracy.
    When nothing qualifies, sampling stops after max_sampling_rounds and training goes on."""
    _, _, m, tok, cfg, prompts = setup
    calls = []

    def score(rolls, cfg, judge=None):
        calls.append(len(rolls))
        for i, r in enumerate(rolls):
            spread = len(calls) == 1 and i < cfg.group_size       # accuracy varies in the very first group only
            r.answer_r = float(spread and i % 2 == 0)
            r.format_r = float(i % 2)                             # the shaped reward varies in every group
            r.reward = 0.8 * r.answer_r + 0.2 * r.format_r
    monkeypatch.setattr(rl, "score_rollouts", score)
    pool = rl.PromptPool(rl.prompt_mixture(cfg, tok, data.DataConfig.from_model(m.cfg, label_mode="rl", max_len=2048),
                                           "train"), range(8), 0)
    kept, st = rl.sample_groups(m, tok, pool, replace(cfg, prompts_per_episode=2, max_sampling_rounds=3),
                                torch.Generator().manual_seed(0))
    assert st["kept"] == len(kept) // cfg.group_size == 1 and kept[0].prompt is kept[-1].prompt
    assert len(calls) == 3 and st["groups"] == 2 + 1 + 1          # round 2 and 3 draw only what is missing
    assert sum(r.advantage for r in kept) == pytest.approx(0, abs=1e-5) and max(r.advantage for r in kept) > 0


def test_the_prompt_pool_counts_each_sample_once_and_stops_on_a_pool_of_bad_ones(tmp_path):
    """Over several passes a bad line is skipped each time but counted once, and good ones too
    (the bad fraction is over distinct samples: a healthy pool with a few bad lines runs on); a
    pool with no usable prompt stops with the bad-data report instead of looping."""
    good = {"conversations": [{"from": "human", "value": "What is 2 + 2?"}], "answer": "4"}
    lines = [json.dumps(good)] * 18 + ["{not json", json.dumps({"conversations": good["conversations"]})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    tok = data.load_tokenizer(None)
    dcfg = data.DataConfig(label_mode="rl", max_bad_fraction=0.15, bad_check_after=20)
    mixture = data.Mixture([str(tmp_path / "p.jsonl")], tok, dcfg, seed=0, verbose=False)
    pool = rl.PromptPool(mixture, range(20), 0)
    assert len(pool.take(18 * 3)) == 54 and pool.pos > 20 * 2                  # three passes' worth
    assert mixture.bad.seen == 20 and sum(mixture.bad.counts.values()) == 2
    (tmp_path / "bad.jsonl").write_text("{not json\n" * 4)
    bad = data.Mixture([str(tmp_path / "bad.jsonl")], tok, replace(dcfg, max_bad_fraction=1.0), seed=0, verbose=False)
    with pytest.raises(data.TooMuchBadData, match="no usable prompt"):
        rl.PromptPool(bad, range(4), 0).take(1)


def test_read_prompts_skips_and_counts_a_prompt_whose_pixels_fail_after_good_headers(tmp_path, capsys):
    """read_prompts reads each prompt's line and image headers, then decodes it once in its mode: an
    image cut after its header passes the first and fails the second; that prompt is skipped and
    counted bad, and a manifest of only such prompts stops with the bad-data report."""
    from PIL import Image
    Image.new("RGB", (112, 112), (200, 30, 30)).save(tmp_path / "ok.png")
    Image.new("RGB", (112, 112), (1, 2, 3)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    line = lambda img, q: json.dumps({"image": img, "answer": "red",                          # noqa: E731
                                      "conversations": [{"from": "human", "value": f"<image>\n{q}"}]})
    (tmp_path / "p.jsonl").write_text("\n".join([line("ok.png", f"q{i}") for i in range(6)] + [line("cut.png", "c")]) + "\n")
    (tmp_path / "cut.jsonl").write_text("\n".join(line("cut.png", f"c{i}") for i in range(6)) + "\n")
    cfg, tok = rl.rl_config([])[0], data.load_tokenizer(None)
    dcfg = data.DataConfig.from_model(modeling.build_model("tiny").cfg, label_mode="rl", think="on", max_bad_fraction=0.5)
    got = rl.read_prompts(replace(cfg, manifests=str(tmp_path / "p.jsonl")), tok, dcfg, "train", 10)
    assert sorted(p.where.rsplit(":", 1)[1] for p in got) == [str(i) for i in range(1, 7)]
    reported = [ln for ln in capsys.readouterr().err.splitlines() if "skipping bad sample" in ln]
    assert len(reported) == 1 and "p.jsonl:7" in reported[0]                # reported with file and line
    with pytest.raises(data.TooMuchBadData, match=r"6 of 6 samples are bad.*'image': 6"):
        rl.read_prompts(replace(cfg, manifests=str(tmp_path / "cut.jsonl")), tok, dcfg, "train", 10)


def test_mixed_rewards_keep_groups_whose_think_or_format_vary(setup, monkeypatch):
    """rl-mixed (§4.2.5): a group whose answers are all wrong but whose format varies has a
    learning signal in the stage's reward and is kept; the verifiable stage drops the same group, and
    so does rl-mixed with --dynamic_sampling_on=answer (the ablation)."""
    _, _, m, tok, cfg, prompts = setup

    def score(rolls, cfg, judge=None):
        for i, r in enumerate(rolls):
            r.answer_r, r.format_r, r.think_r = 0.0, float(i % 2), 1.0
            r.reward = rl.mixed_reward(r.answer_r, r.think_r, r.format_r)
    monkeypatch.setattr(rl, "score_rollouts", score)
    pool = lambda: rl.PromptPool(rl.prompt_mixture(cfg, tok, data.DataConfig.from_model(    # noqa: E731
        m.cfg, label_mode="rl", max_len=2048), "train"), range(8), 0)
    kept, st = rl.sample_groups(m, tok, pool(), replace(cfg, prompts_per_episode=2, reward="mixed"),
                                torch.Generator().manual_seed(0))
    assert st["kept"] == 2 and max(r.advantage for r in kept) > 0
    kept, st = rl.sample_groups(m, tok, pool(), replace(cfg, prompts_per_episode=2, reward="mixed", max_sampling_rounds=1,
                                                        dynamic_sampling_on="answer"), torch.Generator().manual_seed(0))
    assert st["kept"] == 0 and not kept                # the ablation: DAPO's rule, on the answer
    kept, st = rl.sample_groups(m, tok, pool(), replace(cfg, prompts_per_episode=2, max_sampling_rounds=1),
                                torch.Generator().manual_seed(0))
    assert st["kept"] == 0 and not kept

    def malformed(rolls, cfg, judge=None):            # answers vary, but no reply is well-formed: reward 0 for all
        for i, r in enumerate(rolls):
            r.answer_r, r.format_r = float(i % 2), 0.0
            r.reward = rl.verifiable_reward(r.answer_r, r.format_r, cfg.reward_weights)
    monkeypatch.setattr(rl, "score_rollouts", malformed)
    kept, st = rl.sample_groups(m, tok, pool(), replace(cfg, prompts_per_episode=2, max_sampling_rounds=1),
                                torch.Generator().manual_seed(0))
    assert st["kept"] == 0 and not kept                # its advantages would all be 0: no slot, no tokens


def rollout(text, answer, family="count_cot"):
    return rl.Rollout(rl.Prompt([], None, answer, family, "x:1"), [], text, False, [])


def test_scores_of_the_two_reward_kinds(setup):
    _, _, _, _, cfg, _ = setup
    boxed, plain = "<think>\nthree\n</think>\nThe answer is \\boxed{3}.", "The answer is \\boxed{3}."
    rolls = [rollout(boxed, "3"), rollout(plain, "3"), rollout(boxed, "4")]
    rl.score_rollouts(rolls, cfg)
    assert [r.answer_r for r in rolls] == [1.0, 1.0, 0.0] and [r.format_r for r in rolls] == [1.0, 0.0, 1.0]
    # verifiable: the answer counts only in a well-formed reply, and a wrong one still earns the format
    assert [r.reward for r in rolls] == pytest.approx([1.0, 0.0, 0.1 / 0.9])
    # the ablation --format_gate=false: summed, a right answer without its think chain earns 0.8 / 0.9
    rl.score_rollouts(rolls, replace(cfg, format_gate=False))
    assert [r.reward for r in rolls] == pytest.approx([1.0, 0.8 / 0.9, 0.1 / 0.9])
    # mixed: a checkable answer by the rules (1/2 == 0.5, which ROUGE-L would call wrong), an
    # uncheckable one by the reference judge
    mixed = replace(cfg, reward="mixed")
    rolls = [rollout("<think>\nhalf\n</think>\n\\boxed{0.5}", "1/2", "caption_qa"),
             rollout("<think>\nlook\n</think>\n\\boxed{a red circle at the top}", "a red circle at the top left",
                     "caption_qa")]
    rl.score_rollouts(rolls, mixed)
    assert [r.answer_r for r in rolls] == [1.0, 1.0]
    assert rolls[0].reward == pytest.approx(0.8 * 1 + 0.1 * 1 + 0.1 * 1)


def test_the_judge_is_told_the_question(setup):
    """--judge grades a reasoning against its question (§4.2.5): the prompt's words, read from
    its record, not where the record came from."""
    _, _, _, _, cfg, prompts = setup
    assert all(p.question and "<image>" not in p.question and ":" in p.where for p in prompts)
    seen = []
    r = rollout("<think>\nlook\n</think>\n\\boxed{a circle}", "a circle", "caption_qa")
    r.prompt.question = "What is shown?"
    rl.score_rollouts([r], replace(cfg, reward="mixed"), lambda q, t, a, ref: seen.append((q, t, a)) or 0.5)
    assert seen == [("What is shown?", "\nlook\n", "a circle")] and r.think_r == 0.5


def direct(text, answer, family):
    r = rollout(text, answer, family)
    r.prompt.think = False
    return r


def test_direct_mode_replies_are_graded_by_their_family_rule_and_must_not_think(setup):
    """rl-mixed asks a share of its prompts in direct mode (§4.2.4's Think-Fusion model answers in
    both): the answer by the evaluation's family rule (no box needed), the format "no think tags",
    no think term; weights 0.8 / 0.1 / 0.1 renormalised to answer 8/9, format 1/9, the answer
    counting only in a well-formed reply (a right answer after a stray </think> earns 0)."""
    _, _, _, _, cfg, _ = setup
    rolls = [direct("the second image.", "second", "multi"),
             direct("the second image. Image-1 shows a square.</think>\nno", "second", "multi"),  # runs on, answers no
             direct("the first image.</think>\nsecond", "second", "multi"),   # the answer after a stray </think>
             direct("at the middle left.", "middle left", "caption_qa"),
             direct("at the top left.", "middle left", "caption_qa"),
             direct("There are 7 circles.", "6", "count"),
             direct("", "6", "count")]
    rl.score_rollouts(rolls, replace(cfg, reward="mixed"))
    assert [r.answer_r for r in rolls] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r.format_r for r in rolls] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert [r.think_r for r in rolls] == [0.0] * 7
    assert [r.reward for r in rolls] == pytest.approx([1.0, 0.0, 0.0, 1.0, 1 / 9, 1 / 9, 0.0])


def test_a_share_of_the_prompts_is_asked_in_direct_mode(setup):
    """--direct_share: the same prompts, each asked with or without the think prompt, the choice a
    pure function of (seed, stream position): a held-out prompt keeps its mode before and after,
    and the pool hands out the same prompts in the same modes again."""
    _, synth, m, tok, cfg, _ = setup
    dcfg = data.DataConfig.from_model(m.cfg, label_mode="rl", think="on", max_len=2048)
    base = replace(cfg, stage="rl-mixed", reward="mixed")
    think_only = rl.read_prompts(base, tok, dcfg, "eval", 64)
    both = rl.read_prompts(replace(base, direct_share=0.5), tok, dcfg, "eval", 64)
    assert [p.where for p in both] == [p.where for p in think_only]          # the same prompts
    n_direct = sum(not p.think for p in both)
    assert 16 <= n_direct <= 48, n_direct
    for a, b in zip(think_only, both):
        assert a.think and (data.THINK_PROMPT in tok.decode(b.ids)) == b.think
        assert b.think == (a.ids == b.ids)
    decoded, load_media = [], data.load_media     # each prompt's media decoded once, in its own mode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_media", lambda media, *a: decoded.append(media) or load_media(media, *a))
        again = rl.read_prompts(replace(base, direct_share=0.5), tok, dcfg, "eval", 64)
    assert [(p.where, p.think, p.ids) for p in again] == [(p.where, p.think, p.ids) for p in both]
    assert len(decoded) == len(again)
    mix = replace(base, direct_share=0.5)
    pool = lambda: rl.PromptPool(rl.prompt_mixture(mix, tok, dcfg, "train"), list(range(40)), 0,   # noqa: E731
                                 rl.direct_mixture(mix, tok, dcfg, "train"), 0.5)
    a, b = pool().take(20), pool().take(20)
    assert [(p.where, p.think) for p in a] == [(p.where, p.think) for p in b] and len({p.think for p in a}) == 2


def test_pass_at_k_filter_drops_the_solved_and_the_hopeless_reasoning_prompts(setup, monkeypatch):
    """Solved by all k: dropped; by none: dropped only for the stage's own reasoning families
    (rl-verifiable trains count_cot: a hopeless count_cot prompt goes, a hopeless count one stays)."""
    _, _, _, tok, cfg, _ = setup
    ps = [rl.Prompt([], None, "3", fam, f"p{i}") for i, fam in enumerate(["count_cot", "count_cot", "count_cot",
                                                                          "count"])]
    solved = {"p0": 4, "p1": 0, "p2": 2, "p3": 0}

    def fake(policy, tok_, prompts, cfg_, gen, group_size=None, **k):
        return [rollout("\\boxed{3}" if j < solved[p.where] else "\\boxed{9}", "3") for p in prompts
                for j in range(group_size)]
    monkeypatch.setattr(rl, "rollouts", fake)
    kept, counts = rl.pass_at_k_filter(None, tok, ps, cfg, 4, None)
    assert kept == [2, 3] and counts == {"always": 1, "never_reasoning": 1, "kept": 2}
    assert rl.reasoning_families(cfg) == ("count_cot",)
    assert rl.reasoning_families(replace(cfg, stage="rl-mixed")) == ("math",)


def test_the_pool_filter_decodes_a_chunk_at_a_time_and_keeps_what_one_pass_keeps(setup, monkeypatch):
    """filtered_positions decodes and filters FILTER_CHUNK prompts at a time (a 70k pool's pixels at
    once are terabytes): with chunks of 3 it keeps the positions and counts one chunk of all gives,
    and never holds more than 3 prompts; rl-mixed's general prompts are added from all chunks."""
    _, _, _, tok, cfg, _ = setup
    cfg = replace(cfg, stage="rl-mixed", reward="mixed", filter_k=2, general_share=0.3, pool_size=10)
    dcfg = data.DataConfig.from_model(modeling.build_model("tiny").cfg, label_mode="rl", think="on", max_len=2048)
    held = []

    def fake(policy, tok_, prompts, cfg_, gen, group_size=None, **k):      # solved: 0, 1 or 2 of 2 by line
        held.append(len(prompts))
        return [rollout("\\boxed{%s}" % (p.answer if j < int(p.where.rsplit(":", 1)[1]) % 3 else "nope"), p.answer or "")
                for p in prompts for j in range(group_size)]
    monkeypatch.setattr(rl, "rollouts", fake)
    runs = []
    for chunk in (1000, 3):
        monkeypatch.setattr(rl, "FILTER_CHUNK", chunk)
        held.clear()
        mixture, direct = rl.prompt_mixture(cfg, tok, dcfg, "train"), rl.direct_mixture(cfg, tok, dcfg, "train")
        runs.append((rl.filtered_positions(None, tok, mixture, direct, cfg, None, lambda *a: None), max(held)))
    (one, held_one), (chunked, held_chunked) = runs
    assert chunked == one and held_one == 10 and held_chunked == 3
    assert one[1]["kept"] > 0 and one[1]["always"] > 0 and one[1]["general_added"] > 0, one[1]


def test_evaluation_metrics_by_hand():
    """pass@1 = mean sample accuracy, maj@k = the most common answer's accuracy, pass@k = any
    right; the paired difference of identical records is 0 with a zero-width interval."""
    g = rollout("\\boxed{3}", "3")
    g.answer_r = 1.0
    samples = [rollout(t, "3") for t in ("\\boxed{3}", "\\boxed{5}", "\\boxed{5}", "\\boxed{3.0}", "\\boxed{5}")]
    for s in samples:
        s.answer_r = float(rl.reward_answer(s.text, "3"))
    rec = rl.per_prompt(g, samples)
    assert rec["maj_acc"] == 0.0                         # 5 x3 beats 3 x2 ("3" and "3.0" are one answer)
    samples[1].text = samples[1].text.replace("5", "3")
    samples[1].answer_r = 1.0
    assert rl.per_prompt(g, samples)["maj_acc"] == 1.0   # now 3 x3
    s = rl.summarize([rec, rl.per_prompt(g, samples)])
    assert s["pass@1"]["mean"] == pytest.approx((2 / 5 + 3 / 5) / 2) and s["pass@k"]["mean"] == 1.0
    assert s["maj@k"]["mean"] == 0.5 and s["maj@k"]["se"] == pytest.approx(0.5)
    rec2 = dict(rl.per_prompt(g, samples), where="x:2")
    d = rl.paired([rec, dict(rec, where="x:2")], [rec, rec2])
    assert d["maj@k"]["difference"] == 0.5 and d["pass@1"]["difference"] == pytest.approx(0.1)
    assert d["greedy_acc"]["difference"] == 0.0 and d["greedy_acc"]["interval"] == [0.0, 0.0]
    # a prompt asked in direct mode votes on what its family's rule reads (no box): 7 x2 beats 6 x1
    replies = ("There are 7 circles.", "7", "I count 6 circles.")
    votes = [direct(t, "7", "count") for t in replies] + [direct("the first image.", "second", "multi")] * 2
    for v in votes:
        v.answer_r = rl.answer_score(v, None)
    assert [v.answer_r for v in votes] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert rl.per_prompt(votes[0], votes[:3])["maj_acc"] == 1.0
    assert rl.per_prompt(votes[3], votes[3:])["maj_acc"] == 0.0 and rl.answer_key_of(votes[3]) is not None
    # one answer written three ways is one vote: 3 x3 ("3", "3.0", "x = 3.00") beats 5 x2
    spelled = [rollout(f"\\boxed{{{t}}}", "3") for t in ("5", "5", "3", "3.0", "x = 3.00")]
    for v in spelled:
        v.answer_r = float(rl.reward_answer(v.text, "3"))
    assert [v.answer_r for v in spelled] == [0.0, 0.0, 1.0, 1.0, 1.0] and rl.per_prompt(g, spelled)["maj_acc"] == 1.0


def test_harvest_keeps_only_correct_well_formed_chains_once(setup, monkeypatch, tmp_path):
    root, synth, m, tok, cfg, prompts = setup
    modeling.save_checkpoint(str(tmp_path / "rl-verifiable"), m, {"stage": "rl-verifiable"}, 0, 1,
                             extra_files=train_stage.tokenizer_files(str(synth)))

    def fake(model, tok_, ps, cfg_, gen, group_size=None, **k):   # per prompt: right, right again, wrong, unformatted
        out, _ = [], sampled.append((cfg_.temperature, cfg_.top_p))
        for p in ps:
            good = f"<think>\nI count them.\n</think>\nThe answer is \\boxed{{{p.answer}}}."
            for text in (good, good, "<think>\nhm\n</think>\n\\boxed{999}", f"\\boxed{{{p.answer}}}")[:group_size]:
                out.append(rl.Rollout(p, [], text, False, []))
        return out
    monkeypatch.setattr(rl, "rollouts", fake)
    sampled = []
    hcfg = rl.RLConfig(stage="harvest", out_dir=str(tmp_path), data_dir=str(synth), pool_size=6, harvest_samples=4,
                       temperature=0.8, top_p=0.9)
    out = rl.harvest(hcfg)
    assert sampled == [(0.8, 0.9)]                              # the sampling options given
    meta = modeling.verify_checkpoint(out)                      # the one writer, a data output
    lines = [json.loads(x) for x in open(os.path.join(out, "cot.jsonl"))]
    assert meta["kept"] == len(lines) == 6 and meta["counts"]["duplicate"] == 6
    assert meta["counts"]["rejected"] == 12 and meta["samples"] == 24
    assert not train_stage.changed_options(meta["config"], dataclasses.asdict(hcfg)) and meta["seconds"] >= 0   # (the recipe checks)
    ds = data.JsonlDataset(os.path.join(out, "cot.jsonl"), tok,
                           data.DataConfig.from_model(m.cfg, label_mode="thinkfusion", max_len=2048))
    assert all(ds[i]["labels"].ne(-100).sum() > 0 for i in range(len(ds)))   # loads as Think-Fusion data


def test_rl_and_harvest_read_prompts_under_the_runs_image_root(setup, tmp_path, monkeypatch):
    """--image_root and --max_bad_fraction reach the prompts' data config in harvest / `rl.py filter`
    (inference_model) and in the RL stage (train_rl): a manifest whose image paths are relative to
    the image root loads its pixels."""
    from PIL import Image
    root, synth, m, tok, cfg, prompts = setup
    (tmp_path / "images").mkdir()
    (tmp_path / "m").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "images" / "red.png")
    line = {"image": "red.png", "answer": "red", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]}
    (tmp_path / "m" / "p.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "answer": "crimson"}) + "\n")
    run_cfg = replace(cfg, stage="harvest", init_from=str(root / "out" / "longcot"), manifests=str(tmp_path / "m" / "p.jsonl"),
                      image_root=str(tmp_path / "images"), max_bad_fraction=0.25, out_dir=str(tmp_path / "out"))
    _, tok_, dcfg = rl.inference_model(run_cfg, torch.device("cpu"), lambda *a: None)
    assert (dcfg.image_root, dcfg.max_bad_fraction) == (str(tmp_path / "images"), 0.25)
    got = rl.read_prompts(run_cfg, tok_, dcfg, "train", 2)
    assert len(got) == 2 and all(p.pixels is not None for p in got)
    seen = []

    def stop(cfg_, tok__, dcfg_, *a):
        seen.append(dcfg_)
        raise KeyboardInterrupt
    monkeypatch.setattr(rl, "read_prompts", stop)
    with pytest.raises(KeyboardInterrupt):
        rl.train_rl(replace(run_cfg, stage="rl-verifiable"), None)
    assert seen == [dcfg]


def test_the_harvests_model_holds_its_llms_matrices_in_bf16_where_autocast_computes_in_it(setup, monkeypatch):
    """inference_model (harvest, `rl.py filter`) where the device computes in bf16 (CUDA; here the
    CPU made to): the LLM's matrices held in bf16 (read straight into them: never the fp32 model on
    every rank's host first), the dtypes of RL's generation copy, and the same rollouts as the fp32
    model under autocast."""
    root, _, m, tok, cfg, prompts = setup
    run_cfg = replace(cfg, stage="harvest", init_from=str(root / "out" / "longcot"), max_new_tokens=16)
    fp32, _, _ = rl.inference_model(run_cfg, torch.device("cpu"), lambda *a: None)
    monkeypatch.setitem(modeling.COMPUTE_DTYPE, "cpu", torch.bfloat16)
    read, from_pretrained = [], modeling.SAILVL.from_pretrained.__func__      # the head's dtype as read
    monkeypatch.setattr(modeling.SAILVL, "from_pretrained", classmethod(lambda cls, *a, **k: (
        out := from_pretrained(cls, *a, **k), read.append(out.language_model.lm_head.weight.dtype))[0]))
    held, _, _ = rl.inference_model(run_cfg, torch.device("cpu"), lambda *a: None)
    assert read == [torch.bfloat16]       # read straight into bf16 matrices: never the fp32 model first
    dtypes = lambda model: {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}   # noqa: E731
    assert dtypes(held) == dtypes(rl.generation_copy(fp32, torch.bfloat16, "meta")) != dtypes(fp32)
    assert torch.bfloat16 in dtypes(held).values()
    rollouts = lambda model: [r.completion for r in rl.rollouts(model, tok, prompts[:2], run_cfg,   # noqa: E731
                                                                torch.Generator().manual_seed(0))]
    assert rollouts(held) == rollouts(fp32)


def test_model_judge_is_the_probability_of_yes(setup):
    """P(yes) / (P(yes) + P(no)) at the prompt's last position: equal to the full forward's, read from
    the last position's hidden state alone (never the prompt's (T, V) logits)."""
    root, synth, m, tok, cfg, prompts = setup
    judge = rl.ModelJudge(str(root / "out" / "longcot"))
    p = judge("How many?", "I see 3.", "3", "3")
    ids = data.prompt_inputs(judge.tok, judge.dcfg, rl.ModelJudge.PROMPT.format(q="How many?", t="I see 3.", a="3",
                                                                              r="3"))["input_ids"][None]
    with torch.no_grad():
        want = torch.softmax(judge.model(ids).logits[0, -1][[judge.yes, judge.no]], -1)[0].item()
    assert p == pytest.approx(want, abs=1e-6) and 0.0 < p < 1.0

    class Leaning(torch.nn.Module):            # an lm_head that prefers "yes" by 2 nats
        def forward(self, h):
            seen.append(tuple(h.shape))
            logits = torch.zeros(*h.shape[:-1], tok.n_vocab)
            logits[..., judge.yes] = 2.0
            return logits
    seen = []
    judge.model.language_model.lm_head = Leaning()
    assert judge("q", "t", "a", "r") == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-6)
    assert seen == [(judge.model.cfg.llm_config.hidden_size,)]


# ----------------------------------------------------------------------------------------------
# end to end: a contextual bandit through sample_groups -> rewards -> advantages -> update_episode

def bandit(mode: str, episodes: int = 30, seed: int = 0, synth_dir=None):
    """Two text prompts, each rewarded for its own set of first tokens (even ids / odd ids).
    mode: "normal", "flip" (the other set is rewarded: the policy must learn to avoid its own) or
    "shuffle" (each group's advantages permuted among its rollouts: the control). -> hit rate of the last 10."""
    torch.manual_seed(seed)
    m = modeling.build_model("tiny", seed=seed)
    tok = data.load_tokenizer(str(synth_dir))
    prompts = [rl.Prompt(data.encode(tok, q), None, a, "bandit", q) for q, a in (("even:", 0), ("odd:", 1))]

    class Pool:
        def take(self, n):
            return [prompts[i % 2] for i in range(n)]

    def score(rolls, cfg, judge=None):
        for r in rolls:
            hit = float(r.completion[0] % 2 == r.prompt.answer)
            r.answer_r = r.reward = 1 - hit if mode == "flip" else hit
    cfg = rl.resolve_algo(rl.RLConfig(group_size=32, prompts_per_episode=2, max_new_tokens=1, lr=1e-2, warmup_steps=0,
                                      schedule="constant", max_sampling_rounds=1,
                                      advantage_control="shuffle" if mode == "shuffle" else ""), m.cfg)
    m.requires_grad_(False)
    params = list(m.language_model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen, hits = torch.Generator().manual_seed(seed), []
    real = rl.score_rollouts
    rl.score_rollouts = score
    try:
        for _ in range(episodes):
            kept, st = rl.sample_groups(m.eval(), tok, Pool(), cfg, gen)
            if st["kept"]:
                rl.update_episode(m.train(), opt, params, kept, cfg, tok, rl.Rollout(prompts[0], [0], "", False, [0.0]))
            hits.append(st["reward"] if mode != "flip" else 1 - st["reward"])
    finally:
        rl.score_rollouts = real
    return sum(hits[-10:]) / 10


def test_the_control_permutes_advantages_within_each_group():
    adv = torch.arange(12.0)
    got = rl.shuffle_within_groups(adv, 4, torch.Generator().manual_seed(0))
    assert not torch.equal(got, adv)                                         # permuted
    for g in range(3):                                                       # ... each group among its own rollouts
        assert sorted(got[4 * g:4 * g + 4].tolist()) == adv[4 * g:4 * g + 4].tolist()


def control_rollouts(rewards, answers=None, fmts=None):
    from types import SimpleNamespace
    n = len(rewards)
    return [SimpleNamespace(reward=r, answer_r=a, format_r=f) for r, a, f in
            zip(rewards, answers or [0.0] * n, fmts or [1.0] * n)]


def test_the_sign_control_flips_whole_groups_at_random():
    """--advantage_control=sign: each group's advantages permuted among its rollouts and multiplied
    by one random sign, both signs drawn (so an update is as likely as its negation)."""
    cfg = rl.RLConfig(group_size=4, advantage_control="sign")
    rolls = control_rollouts([1.0, 0.0, 0.0, 0.0] * 64)                          # 64 skewed groups of 4
    want = sorted(rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4).tolist())
    got = rl.control_advantages(rolls, cfg, torch.Generator().manual_seed(0)).view(64, 4)
    signs = []
    for g in got:
        s = 1.0 if g.max() > 1 else -1.0                                         # the +1.5, or -1.5 when flipped
        assert sorted((g * s).tolist()) == pytest.approx(want)
        signs.append(s)
    assert 20 <= signs.count(-1.0) <= 44                                          # about half flipped
    cfg.advantage_control = "shuffle"
    same = rl.control_advantages(rolls, cfg, torch.Generator().manual_seed(0)).view(64, 4)
    assert all(g.max() > 1 for g in same)                                         # shuffle alone never flips


def test_the_answer_control_deals_answers_and_keeps_each_format():
    """--advantage_control=answer: the answer scores permuted within each group, each rollout keeping
    its own format score: a malformed rollout stays at reward 0 whatever answer it is dealt."""
    cfg = rl.RLConfig(group_size=4, advantage_control="answer")
    answers, fmts = [1.0, 0.0, 0.0, 0.0] * 64, [1.0, 1.0, 1.0, 0.0] * 64         # the 4th malformed
    rolls = control_rollouts([rl.verifiable_reward(a, f, cfg.reward_weights) for a, f in zip(answers, fmts)],
                             answers, fmts)
    got = rl.control_advantages(rolls, cfg, torch.Generator().manual_seed(0)).view(64, 4)
    right_at = Counter()
    for g in got:
        assert g[3] < g[:3].min()                                                 # always the lowest: format kept
        right_at[int(g.argmax()) if g.max() > g[:3].min() + 1e-6 else "malformed"] += 1
    assert set(right_at) == {0, 1, 2, "malformed"} and min(right_at.values()) >= 8   # the right answer dealt at random
    ungated = rl.control_advantages(rolls, replace(cfg, format_gate=False), torch.Generator().manual_seed(0)).view(64, 4)
    assert sum(bool(g[3] > g[:3].min()) for g in ungated) >= 8     # summed: dealt the right answer, malformed is not lowest


def test_the_loop_learns_a_contextual_bandit(synth):
    """The whole loop is wired right: it reaches the rewarded tokens (>= 0.9), learns to avoid
    them when the other set is rewarded (<= 0.1), and stays at chance when each group's advantages
    are permuted among its rollouts (no information about which rollout was good: the policy only drifts)."""
    assert bandit("normal", synth_dir=synth) >= 0.9
    assert bandit("flip", synth_dir=synth) <= 0.1
    assert 0.25 <= bandit("shuffle", synth_dir=synth) <= 0.75


# ----------------------------------------------------------------------------------------------
# the stage end to end (a subprocess, as a user runs it), with a stub reward so that updates happen

DRIVER = """
import sys
sys.path.insert(0, {root!r})
import rl

def parity(rolls, cfg, judge=None):
    # a reward the random tiny model can earn: the first token's parity, per prompt line parity
    for r in rolls:
        want = int(r.prompt.where.rsplit(":", 1)[1]) % 2
        r.answer_r = r.reward = float(bool(r.completion) and r.completion[0] % 2 == want)
        r.format_r = 0.0

rl.score_rollouts = parity
rl.train_stage.run_command(lambda: rl.main(sys.argv[1:]))     # as rl.py ends: no abort at exit
"""


def run(args, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def parity(rolls, cfg, judge=None):
    """DRIVER's reward, for runs in this process."""
    for r in rolls:
        want = int(r.prompt.where.rsplit(":", 1)[1]) % 2
        r.answer_r = r.reward = float(bool(r.completion) and r.completion[0] % 2 == want)
        r.format_r = 0.0


def stage_args(synth, out):
    return ["--stage", "rl-verifiable", f"--data_dir={synth}", "--episodes=4", "--group_size=4",
            "--prompts_per_episode=2", "--max_new_tokens=6", "--eval_prompts=6", "--eval_samples=2", "--save_every=2",
            "--keep_checkpoints=5", "--temperature=1.3", "--mini_batches=2", "--warmup_steps=4", "--lr=1e-3",
            "--clip_schedule=true", f"--out_dir={out}"]


def test_rl_stage_end_to_end_and_resume_is_bit_identical(setup, tmp_path, monkeypatch, capsys):
    """rl-verifiable through its CLI: updates happen (LR warm-up counted in updates, the clip-high
    schedule follows the episode), the held-out prompts come from the held-out split, and a run
    resumed from its episode-2 checkpoint ends with the same weights (so the resume restores the
    pool cursor, the rollout generator and the optimizer), the same metrics.jsonl (the records a
    killed run wrote after its checkpoint replaced, not repeated) and the same count of prompts seen
    (the bad-data counts travel with the checkpoint). A resume runs with the AdamW options it is
    given and says so, and refuses a checkpoint past --episodes or a change of its prompts."""
    root, synth, m, tok, cfg, prompts = setup
    (tmp_path / "driver.py").write_text(DRIVER.format(root=ROOT))
    for d in ("a", "b", "c"):
        os.makedirs(tmp_path / d)
        os.symlink(root / "out" / "longcot", tmp_path / d / "longcot")
    ref = run([str(tmp_path / "driver.py"), *stage_args(synth, tmp_path / "a")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "episode 0004/0004 | reward" in ref.stdout
    recs = [json.loads(x) for x in open(tmp_path / "a" / "rl-verifiable.run" / "metrics.jsonl")]
    eps = [r for r in recs if "updates" in r]
    assert [r["updates"] for r in eps] == [2, 2, 2, 2]
    assert [round(r["lr"] / 1e-3, 3) for r in eps[:2]] == [0.5, 1.0]        # warm-up: 4 updates = 2 episodes
    assert [round(r["clip_high"], 4) for r in eps] == [0.2, 0.2267, 0.2533, 0.28]
    evals = [json.loads(x) for x in open(tmp_path / "a" / "rl-verifiable" / train_stage.RL_HELDOUT)]
    assert [e["side"] for e in evals] == ["before"] * 6 + ["after"] * 6
    assert all("rl_eval.jsonl:" in e["where"] for e in evals)          # held-out prompts, not training ones
    meta = modeling.verify_checkpoint(f"{tmp_path}/a/rl-verifiable")
    assert set(meta["rl_eval"]) == {"before", "after", "paired"}
    w0 = load_file(str(root / "out" / "longcot" / "model.safetensors"))
    wa = load_file(f"{tmp_path}/a/rl-verifiable/model.safetensors")
    assert any(not torch.equal(w0[k], wa[k]) for k in wa)                    # the weights moved
    for d in ("b", "c"):
        os.makedirs(tmp_path / d / "rl-verifiable.run")
        os.symlink(tmp_path / "a" / "rl-verifiable.run" / "step-000002", tmp_path / d / "rl-verifiable.run" / "step-000002")
    earlier = modeling.verify_checkpoint(f"{tmp_path}/a/rl-verifiable.run/step-000002")["seconds"]
    assert 0 < earlier < meta["seconds"]                       # the stage's time, kept in its checkpoints
    b_step = tmp_path / "b" / "rl-verifiable.run" / "step-000002"           # as if the cut run had taken 1,000 s more
    os.unlink(b_step)
    shutil.copytree(tmp_path / "a" / "rl-verifiable.run" / "step-000002", b_step)
    data.write_json(str(b_step / "meta.json"), {**json.load(open(b_step / "meta.json")), "seconds": earlier + 1000})
    shutil.copy(tmp_path / "a" / "rl-verifiable.run" / "metrics.jsonl", tmp_path / "b" / "rl-verifiable.run")  # episodes 1-4
    t0 = time.time()
    res = run([str(tmp_path / "driver.py"), *stage_args(synth, tmp_path / "b"), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: continuing from" in res.stdout
    assert "init: no starting weights read" in res.stdout and "init: all weights from" not in res.stdout
    took = modeling.verify_checkpoint(f"{tmp_path}/b/rl-verifiable")["seconds"]   # both runs': up to the checkpoint, then this one
    assert earlier + 1000 < took < earlier + 1000 + time.time() - t0 and f"after {took:.0f} s" in res.stdout
    wb = load_file(f"{tmp_path}/b/rl-verifiable/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    again = [json.loads(x) for x in open(tmp_path / "b" / "rl-verifiable.run" / "metrics.jsonl")]
    assert [r["episode"] for r in again] == [r["episode"] for r in recs] == [1, 2, 3, 4, 4]     # 4 twice: the eval
    assert [r.get("reward") for r in again] == [r.get("reward") for r in recs]
    bad_a, bad_b = (modeling.verify_checkpoint(f"{tmp_path}/{d}/rl-verifiable")["bad_data"] for d in "ab")
    assert bad_a == bad_b and bad_a["seen"] >= 4 * 2 and bad_a["counts"] == {}
    # in this process: the options given, not the loaded state's; a checkpoint past --episodes refused
    groups, clips, update = [], [], rl.update_episode

    def noting(model, opt, params, rolls, cfg, *a, **k):
        groups.append([(g["weight_decay"], tuple(g["betas"])) for g in opt.param_groups])
        clips.append(round(cfg.clip_high, 4))                              # what the loss is given
        if len(groups) > 8:
            raise RuntimeError("the run went on past its last episode")
        return update(model, opt, params, rolls, cfg, *a, **k)
    monkeypatch.setattr(rl, "update_episode", noting)
    monkeypatch.setattr(rl, "score_rollouts", parity)                          # the driver's reward
    rl.main([*stage_args(synth, tmp_path / "c"), "--resume", "--weight_decay=0.5", "--beta1=0.5"])
    assert groups and all(g == [(0.5, (0.5, 0.95)), (0.0, (0.5, 0.95))] for g in groups)
    assert clips == [0.2533, 0.28]                                         # episodes 3 and 4 of the schedule
    assert "options changed since" in capsys.readouterr().out
    for wrong in ("--episodes=1", "--seed=5", "--eval_prompts=4"):
        with pytest.raises(SystemExit) as e:
            rl.main([*stage_args(synth, tmp_path / "c"), "--resume", wrong])
        assert e.value.code == 2, wrong
    assert "other prompts or held-out evaluation (eval_prompts 6 -> 4)" in capsys.readouterr().err


def test_a_rank_the_saving_run_did_not_have_draws_its_own_rollouts():
    """Resumed on more processes than saved it, a new rank's rollout generator is not rank 0's."""
    saved = {"generator": torch.Generator().manual_seed(7).get_state()}
    streams = []
    for rank in (0, 1, 2):
        gen = torch.Generator()
        rl.restore_generator(gen, saved, rank, saved_world=1, seed=1337, episode=4)
        streams.append(torch.rand(4, generator=gen))
    assert torch.equal(streams[0], torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(streams[1], streams[0]) and not torch.equal(streams[2], streams[1])


def test_a_generator_of_another_device_type_is_seeded_not_given_a_state_it_cannot_take():
    """A CPU run's checkpoint resumed on a GPU: a CUDA generator's state (16 bytes: seed, offset) is
    not a CPU one's (5,056: Mersenne Twister), and set_state refused it. It is seeded from (seed,
    rank, episode) instead. (A stand-in for the CUDA generator: no GPU here.)"""
    class CudaLike:
        def __init__(self):
            self.seeded = None

        def get_state(self):
            return torch.zeros(16, dtype=torch.uint8)

        def set_state(self, state):
            raise RuntimeError("RNG state is wrong size")

        def manual_seed(self, seed):
            self.seeded = seed
    gen = CudaLike()
    rl.restore_generator(gen, {"generator": torch.Generator().manual_seed(7).get_state()}, 0, saved_world=1,
                         seed=1337, episode=4)
    assert gen.seeded == int(np.random.default_rng([1337, 0, 4]).integers(2 ** 62))      # (seed, rank, episode)


def test_the_rl_mixed_stage_asks_and_evaluates_in_both_modes(setup, tmp_path):
    """The recipe's rl-mixed row through rl.py's CLI: its tiny settings ask half the prompts in
    direct mode, and the held-out evaluation reports each mode's greedy accuracy, before and after."""
    root, synth, m, tok, cfg, prompts = setup
    res = run(["rl.py", "--stage", "rl-mixed", f"--data_dir={synth}", f"--init_from={root}/out/longcot",
               f"--out_dir={tmp_path}", "--episodes=1", "--group_size=2", "--prompts_per_episode=2", "--max_new_tokens=6",
               "--eval_prompts=12", "--eval_samples=2", "--pool_size=8"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.load(open(tmp_path / "rl-mixed.run" / "config.json"))["config"]["direct_share"] == 0.5   # the row's
    held = [json.loads(x) for x in open(tmp_path / "rl-mixed" / train_stage.RL_HELDOUT)]
    modes = {(p["side"], p["think"]) for p in held}
    assert modes == {("before", True), ("before", False), ("after", True), ("after", False)}
    rl_eval = modeling.verify_checkpoint(str(tmp_path / "rl-mixed"))["rl_eval"]
    n = {mode: rl_eval["before"][f"{mode}_greedy_acc"]["n"] for mode in ("thinking", "direct")}
    assert n["thinking"] + n["direct"] == 12 and n["direct"] == sum(not p["think"] for p in held) // 2
    assert {"thinking_greedy_acc", "direct_greedy_acc"} <= set(rl_eval["paired"])


def test_rl_help_shows_the_stage_values_and_whole_comments():
    """`rl.py --stage rl-mixed --help`: each option with its value for that stage (the recipe row's
    tiny values), its help the whole comment in the config, continuation lines included."""
    res = run(["rl.py", "--stage", "rl-mixed", "--help"], timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--direct_share=0.5 " in res.stdout and "--lr=0.0001 " in res.stdout and "--reward=mixed" in res.stdout
    assert "1e-3 breaks the format" in res.stdout                     # the --lr comment's second line


def test_rl_usage_errors_are_one_line(capsys):
    res = run(["rl.py", "--stage", "vit1"], timeout=60)                  # the real command line, once
    assert res.returncode == 2 and "not an RL stage" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    for args, says in ((["--stage", "rl-verifiable", "--reward_weights=0.5,0.5,0.5"], "sum"),
                       (["--stage="], "unknown stage ''"),                # empty: not the default stage
                       (["--stage=rl-verifable"], "(did you mean rl-verifiable?); stages: rl-verifiable, harvest, rl-mixed\n"),
                       (["--stage", "rl-verifiable", "--steps=5"], "--episodes"),
                       (["--stage", "rl-mixed", "--direct_share=1.5"], "--direct_share must be in [0, 1]"),
                       (["--stage", "rl-verifiable", "--kl_coef=0.1"], "unknown option --kl_coef"),
                       (["--stage", "rl-verifiable", "--compile=maybe"], "--compile must be auto, true, false or graphs"),
                       (["--stage", "rl-verifiable", "--update_memory=low"], "--update_memory must be auto, full or lean"),
                       (["--stage", "harvest", "--update_memory=lean"], "--update_memory does not apply to the harvest"),
                       (["--stage", "rl-verifiable", "--generate_on=shards"], "--generate_on must be auto, copy, experts or model"),
                       (["--stage", "rl-mixed", "--dynamic_sampling_on=format"], "--dynamic_sampling_on must be auto, answer or reward"),
                       (["--stage", "harvest", "--generate_on=model"], "--generate_on does not apply to the harvest"),
                       (["--stage", "rl-verifiable", "--agg=token-sum"], "--agg must be token-mean"),
                       (["--stage", "rl-verifiable", "--clip_c=0.5"], "--clip_c, the dual-clip constant, must be > 1"),
                       (["--stage", "rl-verifiable", "--max_sampling_rounds=0"], "--max_sampling_rounds must be >= 1"),
                       (["--stage", "rl-verifiable", "--lr=-1"], "--lr must be a positive number"),
                       (["--stage", "rl-verifiable", "--save_every=-1"], "--save_every must be >= 0 (resumable checkpoint every N episodes; 0 = only"),
                       (["--stage", "rl-verifiable", "--eval_every=-1"], "--eval_every must be >= 0 (held-out evaluation every N episodes (always at the start"),
                       (["--stage", "rl-verifiable", "--init-from=/no/such"], "--init-from: /no/such is not a folder"),
                       (["--stage", "rl-verifiable", "--top_p=0"], "--top_p in (0, 1]"),
                       (["--stage", "rl-verifiable", "--temperature=nan"], "--temperature must be above 0"),
                       (["--stage", "rl-verifiable", "--num_workers=2"], "--num_workers does not apply to an RL stage"),
                       (["--stage", "rl-verifiable", "--judge=/no/such"], "--judge /no/such: no such folder"),
                       (["--stage", "rl-verifiable", "--resume=/no/such"], "--resume /no/such: no such folder"),
                       (["--stage", "harvest", "--episodes=9"], "--episodes does not apply to the harvest"),
                       (["filter", "--ckpt=x", "--out=y", "--k=abc"], "--k must be a whole number >= 1")):
        with pytest.raises(SystemExit) as e:                              # the rest through its main, in this process
            rl.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, (args, err)
    rl.main(["filter", "--help"])                                         # the tool's usage, not an error
    assert "python rl.py filter --ckpt DIR --out FILE.jsonl [--k=4]" in capsys.readouterr().out
    for args, says in ((["--general_share=0.3"], "give --filter_k"), (["--reward_weights=0,1,0"], "must not both be 0"),
                       (["--eval_prompts=0"], "--eval_prompts must be >= 1")):
        with pytest.raises(train_stage.UsageError, match=says):
            rl.rl_config(["--stage", "rl-mixed", *args])


def test_held_out_prompts_of_a_mixed_stage_are_distinct(setup):
    """rl-mixed reads its held-out prompts from several families' eval splits, a mixture drawn with
    replacement: a prompt drawn twice would count twice and break the before / after pairing
    (the recipe's rl-mixed stopped on it)."""
    _, synth, m, tok, cfg, _ = setup
    cfg = replace(cfg, stage="rl-mixed", reward="mixed")
    dcfg = data.DataConfig.from_model(m.cfg, label_mode="rl", max_len=2048)
    prompts = rl.read_prompts(cfg, tok, dcfg, "eval", 600)     # math (weight 0.25) alone needs > its 128
    wheres = [p.where for p in prompts]
    assert len(wheres) == 600 and len(set(wheres)) == 600, (len(wheres), len(set(wheres)))
    assert len({p.family for p in prompts}) >= 4                        # several families of the mix


# ----------------------------------------------------------------------------------------------
# mutation-review additions (round 2): the config's bounds, the algorithm per model, resume refusals

def test_step_scale_shortens_the_episodes_but_keeps_at_least_one():
    """--step_scale multiplies the row's episodes (rl-verifiable's tiny row: 50), rounded, at least 1
    (as train_stage shortens every stage): 0.1 -> 5; 0.01 -> round(0.5) = 0 -> 1."""
    assert rl.rl_config(["--step_scale=0.1"])[0].episodes == 5
    assert rl.rl_config(["--step_scale=0.01"])[0].episodes == 1
    assert rl.rl_config(["--episodes=7", "--step_scale=0.001"])[0].episodes == 1
    for episodes in ("0", "-3"):                      # refused as given, not scaled up to 1 first
        with pytest.raises(train_stage.UsageError, match=f"--episodes must be >= 1, got {episodes}"):
            rl.rl_config([f"--episodes={episodes}"])


def test_rl_config_refuses_a_general_share_of_one_a_dual_clip_of_one_and_an_answer_control_of_mixed_rewards():
    """The bounds rl_config states: --general_share in [0, 1) (1 would be all general prompts: its
    count share / (1 - share) divides by 0), --clip_c > 1 (or 0: off), the answer control only with
    verifiable rewards (it permutes answer scores inside the verifiable reward), --init_modules not
    with --init_from (as train_stage refuses it: --init_from would silently win). Their neighbours
    inside the bounds are accepted."""
    for args, says in ((["--stage", "rl-mixed", "--filter_k=2", "--general_share=1"], r"--general_share must be in \[0, 1\)"),
                       (["--clip_c=1"], "--clip_c, the dual-clip constant, must be > 1"),
                       (["--stage", "rl-mixed", "--advantage_control=answer"], "needs --reward=verifiable"),
                       (["--init_modules=mlp1:sft4", "--init_from=x"], "give one of them")):
        with pytest.raises(train_stage.UsageError, match=says):
            rl.rl_config(args)
    assert rl.rl_config(["--stage", "rl-mixed", "--filter_k=2", "--general_share=0.99"])[0].general_share == 0.99
    assert rl.rl_config(["--clip_c=1.5"])[0].clip_c == 1.5
    assert rl.rl_config(["--advantage_control=answer"])[0].advantage_control == "answer"
    assert rl.rl_config(["--init_modules=mlp1:sft4"])[0].init_modules == "mlp1:sft4"


def test_the_algorithm_follows_the_model_and_explicit_clips_are_kept():
    """§4.2.3: DAPO (clips 0.2 / 0.28) for a dense model, GSPO (3e-4 / 4e-4) for an MoE one, unless
    --algo says otherwise; a clip given on the command line is kept, 0 included (-1 is "the
    algorithm's default"); --clip_c=0 is no dual-clip (None)."""
    dense, sparse = (SimpleNamespace(llm_config=SimpleNamespace(num_experts=n)) for n in (0, 4))
    got = rl.resolve_algo(rl.RLConfig(), dense)
    assert (got.algo, got.clip_low, got.clip_high, got.clip_c) == ("dapo", 0.2, 0.28, None)
    got = rl.resolve_algo(rl.RLConfig(), sparse)
    assert (got.algo, got.clip_low, got.clip_high) == ("gspo", 3e-4, 4e-4)
    got = rl.resolve_algo(rl.RLConfig(algo="dapo"), sparse)
    assert (got.algo, got.clip_low, got.clip_high) == ("dapo", 0.2, 0.28)
    got = rl.resolve_algo(rl.RLConfig(clip_low=0.0, clip_high=0.0, clip_c=3.0), dense)
    assert (got.clip_low, got.clip_high, got.clip_c) == (0.0, 0.0, 3.0)


def test_the_clip_high_schedule_is_dapos_alone():
    """--clip_schedule grows DAPO's clip_high linearly from 0.20 to 0.28 over the episodes (by hand,
    5 episodes: 0.20, 0.22, 0.24, 0.26, 0.28); GSPO's sequence-ratio clips (4e-4) are a different
    scale and stay fixed; without the flag DAPO's clip_high stays at its value."""
    dense, sparse = (SimpleNamespace(llm_config=SimpleNamespace(num_experts=n)) for n in (0, 4))
    dapo = rl.resolve_algo(rl.RLConfig(clip_schedule=True, episodes=5), dense)
    assert [rl.clip_high_at(dapo, e) for e in range(5)] == pytest.approx([0.20, 0.22, 0.24, 0.26, 0.28])
    gspo = rl.resolve_algo(rl.RLConfig(clip_schedule=True, episodes=5), sparse)
    assert [rl.clip_high_at(gspo, e) for e in range(5)] == [4e-4] * 5
    fixed = rl.resolve_algo(rl.RLConfig(episodes=5, clip_high=0.3), dense)
    assert [rl.clip_high_at(fixed, e) for e in range(5)] == [0.3] * 5


# each option that defines the saved run's prompt pool or its held-out evaluation, with another value
POOL_AND_EVAL_OPTIONS = {"seed": 5, "data_dir": "/other/synth", "manifests": "m.jsonl", "eval_manifests": "e.jsonl",
                         "image_root": "/other/images", "pool_size": 7, "filter_k": 4, "general_share": 0.3,
                         "direct_share": 0.5, "eval_prompts": 9, "eval_samples": 3, "max_tokens": 2048,
                         "max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "reward": "mixed",
                         "reward_weights": (0.7, 0.2, 0.1), "format_gate": False, "judge": "/a/judge"}


def test_resume_refuses_each_change_of_the_pool_or_the_held_out_evaluation(monkeypatch):
    """resume_rl refuses a checkpoint saved with another value of any option that defines its
    prompt pool (positions, cursor, direct-mode share, the prompts' length limit) or its saved "before"
    evaluation (its sampling and scoring too), naming the option; another LR is only logged, and a checkpoint at exactly --episodes is accepted (the run
    evaluates and finishes), its rollout generator restored. (load_checkpoint stubbed: the metadata
    is what this test is about.)"""
    cfg = rl.RLConfig(episodes=4)
    gen0 = torch.Generator().manual_seed(3)
    rank_state = {"rng": modeling.rng_state(), "generator": gen0.get_state()}
    assert set(POOL_AND_EVAL_OPTIONS) == set(rl.FIXED_ON_RESUME)
    for key, value in POOL_AND_EVAL_OPTIONS.items():
        meta = {"episode": 2, "world_size": 1, "config": rl.asdict(replace(cfg, **{key: value}))}
        monkeypatch.setattr(modeling, "load_checkpoint", lambda *a, meta=meta: (meta, rank_state))
        with pytest.raises(train_stage.UsageError, match=f"other prompts or held-out evaluation \\({key} "):
            rl.resume_rl("ckpt", cfg, None, None, torch.Generator(), 0, 1, lambda *a: None)
    meta = {"episode": 4, "world_size": 1, "config": rl.asdict(replace(cfg, lr=1e-5))}
    monkeypatch.setattr(modeling, "load_checkpoint", lambda *a: (meta, rank_state))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    logged, gen = [], torch.Generator()
    assert rl.resume_rl("ckpt", cfg, None, opt, gen, 0, 1, logged.append)["episode"] == 4
    assert any("options changed" in line and "lr" in line for line in logged)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(train_stage.UsageError, match="past this run's 3 episodes"):
        rl.resume_rl("ckpt", replace(cfg, episodes=3), None, opt, gen, 0, 1, logged.append)


def test_harvest_dedups_chains_that_differ_only_in_whitespace_and_counts_the_prompts_solved(setup, monkeypatch,
                                                                                             tmp_path):
    """Per prompt (6 prompts x 4 samples): a right chain, the same chain re-spaced (a duplicate:
    chains are compared with their whitespace runs collapsed), a second right chain worded
    differently (kept), an unformatted right answer (rejected). By hand: 12 kept, 6 duplicates,
    6 rejected, and 6 prompts with a kept chain (not 12: prompts, not chains). Each line carries
    "think": true, so a reader in any label mode asks it in thinking mode."""
    root, synth, m, tok, cfg, prompts = setup
    modeling.save_checkpoint(str(tmp_path / "rl-verifiable"), m, {"stage": "rl-verifiable"}, 0, 1,
                             extra_files=train_stage.tokenizer_files(str(synth)))

    def fake(model, tok_, ps, cfg_, gen, group_size=None, **k):
        a = "<think>\nI count them.\n</think>\nThe answer is \\boxed{%s}."
        texts = (a, "<think>\nI  count\tthem.\n</think>\n\nThe answer is  \\boxed{%s}. ",
                 "<think>\nOne by one, left to right.\n</think>\n\\boxed{%s}", "\\boxed{%s}")
        return [rl.Rollout(p, [], t % p.answer, False, []) for p in ps for t in texts[:group_size]]
    monkeypatch.setattr(rl, "rollouts", fake)
    out = rl.harvest(rl.RLConfig(stage="harvest", out_dir=str(tmp_path), data_dir=str(synth), pool_size=6,
                                 harvest_samples=4))
    meta = modeling.verify_checkpoint(out)
    lines = [json.loads(x) for x in open(os.path.join(out, "cot.jsonl"))]
    assert meta["kept"] == len(lines) == 12 and meta["counts"]["duplicate"] == 6 and meta["counts"]["rejected"] == 6
    assert meta["prompts"] == 6 and meta["prompts_with_a_kept_chain"] == 6
    assert sum("One by one" in ln["conversations"][-1]["value"] for ln in lines) == 6
    assert all(ln.get("think") is True for ln in lines)          # marked thinking-mode records, whatever reads them


def test_the_prompt_pool_deals_each_pass_in_its_own_seeded_order(tmp_path):
    """PromptPool.take: every pass over the positions is a permutation of them (no repeat within a
    pass), drawn from numpy's default_rng([seed, pass]), so a second pass is not the first one
    again (each pass's order written out by hand from that formula), and the cursor counts prompts."""
    import numpy as np
    lines = [{"conversations": [{"from": "human", "value": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(6)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    mixture = data.Mixture([str(tmp_path / "p.jsonl")], data.load_tokenizer(None), data.DataConfig(label_mode="rl"),
                           seed=0, verbose=False)
    positions = [5, 3, 1, 0, 2, 4]
    where = {k: mixture.load(k)["source"] for k in positions}
    pool = rl.PromptPool(mixture, positions, 11)
    got = [p.where for p in pool.take(18)]
    want = [where[positions[j]] for e in range(3) for j in np.random.default_rng([11, e]).permutation(6)]
    assert got == want and pool.pos == 18
    assert got[:6] != got[6:12] and sorted(got[:6]) == sorted(got[6:12]) == sorted(where.values())


def test_dynamic_sampling_statistics_are_the_means_over_every_rollout_drawn(setup, monkeypatch):
    """sample_groups' episode statistics are means over every rollout sampled (kept or not), each
    from its own field: reward, acc (answer_r), fmt (format_r), think (think_r), len (completion
    tokens), trunc (truncated); kept / groups count groups. Written out by hand over the rollouts the
    stub scorer saw: 2 prompts x 4 rollouts, each field a different pattern."""
    _, _, m, tok, cfg, prompts = setup
    seen = []

    def score(rolls, cfg, judge=None):
        for i, r in enumerate(rolls):
            r.answer_r, r.format_r, r.think_r = float(i % 4 == 0), float(i % 4 != 3), 0.25 * (i % 2)
            r.reward = 0.5 * r.answer_r + 0.3 * r.format_r + 0.2 * r.think_r
        seen.extend(rolls)
    monkeypatch.setattr(rl, "score_rollouts", score)
    pool = rl.PromptPool(rl.prompt_mixture(cfg, tok, data.DataConfig.from_model(m.cfg, label_mode="rl", max_len=2048),
                                           "train"), range(8), 0)
    kept, st = rl.sample_groups(m, tok, pool, replace(cfg, prompts_per_episode=2, max_sampling_rounds=1),
                                torch.Generator().manual_seed(0))
    n = len(seen)
    assert n == 8
    want = {"reward": sum(r.reward for r in seen) / n, "acc": 2 / 8, "fmt": 6 / 8, "think": 4 * 0.25 / 8,
            "len": sum(len(r.completion) for r in seen) / n, "trunc": sum(r.truncated for r in seen) / n}
    assert {k: st[k] for k in want} == pytest.approx(want)
    assert st["kept"] == 2 and st["groups"] == 2 and len(kept) == 8


def test_majority_vote_ignores_replies_without_a_readable_answer():
    """maj@k counts the answers given: replies with no readable answer (no box, no number) cast no
    vote, however many. By hand: 3 unreadable + 2 x "3" (right) -> majority "3" -> maj_acc 1.0;
    all 5 unreadable -> no majority -> 0.0."""
    g = rollout("\\boxed{3}", "3")
    samples = [rollout(t, "3") for t in ("I am not sure.", "no idea", "hmm", "\\boxed{3}", "\\boxed{3}")]
    for s in samples:
        s.answer_r = float(rl.reward_answer(s.text, "3"))
    assert [s.answer_r for s in samples] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert rl.per_prompt(g, samples)["maj_acc"] == 1.0
    assert rl.per_prompt(g, samples[:3])["maj_acc"] == 0.0


def test_pass_at_k_filter_keeps_the_partly_solved_and_the_ungraded_prompts(monkeypatch):
    """The filter drops only the two ends: solved by all k (always) and, for the stage's reasoning
    family, by none. One right of 4 and 3 right of 4 are kept (count_cot), and a prompt with no
    ground truth, which cannot be graded, counts as solved by none: kept in a family the stage does
    not reason on (count), dropped in one it does (count_cot)."""
    cfg = rl.RLConfig()                                       # rl-verifiable: it reasons on count_cot
    assert rl.reasoning_families(cfg) == ("count_cot",)
    ps = [rl.Prompt([], None, a, fam, f"p{i}") for i, (a, fam) in
          enumerate([("3", "count_cot"), ("3", "count_cot"), (None, "count"), (None, "count_cot")])]
    solved = {"p0": 1, "p1": 3, "p2": 0, "p3": 0}

    def fake(policy, tok_, prompts, cfg_, gen, group_size=None, **k):
        return [rollout("\\boxed{3}" if j < solved[p.where] else "\\boxed{9}", p.answer) for p in prompts
                for j in range(group_size)]
    monkeypatch.setattr(rl, "rollouts", fake)
    kept, counts = rl.pass_at_k_filter(None, None, ps, cfg, 4, None)
    assert kept == [0, 1, 2] and counts == {"always": 0, "never_reasoning": 1, "kept": 3}


def test_the_pool_filter_adds_general_prompts_to_make_their_share_of_the_pool(monkeypatch):
    """rl-mixed's --general_share s: beside the K hard prompts the pass@k filter keeps, n general
    prompts (families whose think reward is not the arithmetic check, and not already kept) so that
    n / (K + n) = s: n = s K / (1 - s), in pool order. By hand, 8 positions, families count,
    caption_qa alternating (position 6: ocr), hard = positions 0 and 1: general candidates 3, 5, 6;
    s = 0.5 -> n = 2 -> pool [0, 1, 3, 5]; s = 0.75 -> n = 6, of which there are 3 -> [0, 1, 3, 5, 6];
    s = 0.6 -> n = 3.
    (Prompt decoding and the filter's sampling stubbed: the selection is what this test is about.)"""
    families = ["count", "caption_qa", "count", "caption_qa", "count", "caption_qa", "ocr", "count"]

    class Pool(list):
        bad = None
    monkeypatch.setattr(rl, "load_prompt", lambda mixture, k, *a: rl.Prompt([], None, "1", families[k], f"x:{k}"))
    monkeypatch.setattr(rl, "pass_at_k_filter", lambda policy, tok, prompts, cfg, k, gen: (
        [i for i, p in enumerate(prompts) if p.where in ("x:0", "x:1")], {"always": 1, "never_reasoning": 0, "kept": 2}))
    # 0.6: n = 0.6 * 2 / 0.4 = 3 (in floats 2.9999999999999996: rounded, not truncated to 2)
    for share, want in ((0.5, [0, 1, 3, 5]), (0.75, [0, 1, 3, 5, 6]), (0.6, [0, 1, 3, 5, 6])):
        cfg = rl.RLConfig(stage="rl-mixed", reward="mixed", filter_k=2, general_share=share)
        positions, counts = rl.filtered_positions(None, None, Pool(range(8)), None, cfg, None, lambda *a: None)
        assert positions == want and counts["general_added"] == len(want) - 2 and counts["kept"] == 2


def test_given_manifests_are_read_as_given_even_beside_an_rl_split(tmp_path):
    """prompt_sources swaps a synthetic family's train / eval manifest for its RL split (rl.jsonl /
    rl_eval.jsonl beside it) only in the stage's own mix: a manifest given with --manifests or
    --eval_manifests is read as given, even when an rl.jsonl / rl_eval.jsonl lies in its folder."""
    line = json.dumps({"conversations": [{"from": "human", "value": "What is 2 + 2?"}], "answer": "4"}) + "\n"
    for name in ("p.jsonl", "e.jsonl", "rl.jsonl", "rl_eval.jsonl"):
        (tmp_path / name).write_text(line)
    cfg = rl.RLConfig(manifests=f"{tmp_path / 'p.jsonl'}:2", eval_manifests=str(tmp_path / "e.jsonl"))
    assert rl.prompt_sources(cfg, "train") == [(str(tmp_path / "p.jsonl"), 2.0)]
    assert rl.prompt_sources(cfg, "eval") == [(str(tmp_path / "e.jsonl"), 1.0)]


def test_majority_vote_reads_the_answer_after_the_thinking_only():
    """maj@k votes on the answer the rollout gives, read as the answer reward reads it: the last box
    after `</think>`; a box inside the thinking is a step, not an answer. By hand: two replies box
    5 in their thinking and answer nothing, one answers 3 (right): one vote, for 3 -> maj_acc 1.0
    (counting the thinking's boxes, 5 would win 2 to 1 -> 0.0)."""
    g = rollout("<think>\nt\n</think>\n\\boxed{3}", "3")
    samples = [rollout(t, "3") for t in ("<think>\nmaybe \\boxed{5}\n</think>\nI give up.",
                                         "<think>\nso \\boxed{5}?\n</think>\nno idea",
                                         "<think>\nthree\n</think>\n\\boxed{3}")]
    for s in samples:
        s.answer_r = float(rl.reward_answer(s.text, "3"))
    assert [s.answer_r for s in samples] == [0.0, 0.0, 1.0]
    assert rl.per_prompt(g, samples)["maj_acc"] == 1.0


def test_the_evaluation_summarizes_each_greedy_score_from_its_own_field():
    """summarize: greedy_acc, greedy_fmt, greedy_think and reward are each the mean of their own
    score over the prompts. By hand, 2 prompts: greedy (answer, format, think) = (1, 1, 0) and
    (0, 1, 0.5) -> acc 0.5, fmt 1.0, think 0.25; sample rewards [0.2, 0.4] and [1.0, 0.6] ->
    reward (0.3 + 0.8) / 2 = 0.55."""
    recs = []
    for (a, f, t), rewards in (((1.0, 1.0, 0.0), (0.2, 0.4)), ((0.0, 1.0, 0.5), (1.0, 0.6))):
        g = rollout("\\boxed{3}", "3")
        g.answer_r, g.format_r, g.think_r = a, f, t
        samples = [rollout("\\boxed{3}", "3") for _ in rewards]
        for s, x in zip(samples, rewards):
            s.reward = x
        recs.append(rl.per_prompt(g, samples))
    s = rl.summarize(recs)
    got = {m: s[m]["mean"] for m in ("greedy_acc", "greedy_fmt", "greedy_think", "reward")}
    assert got == pytest.approx({"greedy_acc": 0.5, "greedy_fmt": 1.0, "greedy_think": 0.25, "reward": 0.55})
    # 95% intervals: Wilson's for 0/1 scores (1 of 2: [0.0945, 0.9055]; 2 of 2: [0.3424, 1], not the [1, 1]
    # of mean ± 1.96 SE); mean ± 1.96 SE otherwise (reward: SE sqrt(0.125 / 2) = 0.25 -> [0.0600, 1.0400])
    assert s["greedy_acc"]["interval"] == pytest.approx([0.094531, 0.905469], abs=1e-6)
    assert s["greedy_fmt"]["interval"] == pytest.approx([0.342380, 1.0], abs=1e-6)
    assert s["reward"]["interval"] == pytest.approx([0.060009, 1.039991], abs=1e-6)
    line = rl.eval_line(3, s)        # the log prints each as the larger side of its interval, rounded up
    assert " greedy 0.500 ±0.406 |" in line and " fmt 1.000 ±0.658" in line
    assert " reward 0.550 ±0.490 |" in line and "2 prompts x 2, ± 95% |" in line


def test_model_judge_scores_the_token_yes_not_no(setup):
    """The judge's score is P("yes") / (P("yes") + P("no")), the two tokens read from the tokenizer
    here, not from the judge: an lm_head that puts 2 nats more on "yes" gives sigmoid(2) = 0.881,
    one that puts them on "no" gives sigmoid(-2) = 0.119."""
    root, synth, m, tok, cfg, prompts = setup
    judge = rl.ModelJudge(str(root / "out" / "longcot"))
    yes, no = data.encode(judge.tok, "yes")[0], data.encode(judge.tok, "no")[0]
    assert yes != no

    class Leaning(torch.nn.Module):
        def __init__(self, token):
            super().__init__()
            self.token = token

        def forward(self, h):
            logits = torch.zeros(*h.shape[:-1], judge.tok.n_vocab)
            logits[..., self.token] = 2.0
            return logits
    for token, want in ((yes, torch.sigmoid(torch.tensor(2.0)).item()), (no, torch.sigmoid(torch.tensor(-2.0)).item())):
        judge.model.language_model.lm_head = Leaning(token)
        assert judge("q", "t", "a", "r") == pytest.approx(want, abs=1e-6)
