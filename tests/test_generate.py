"""The rollout engine (model.generate_from_embeds) against independent references: a plain decode
loop (the engine as it was before: left padding, one token per step for every row, but a full
forward over the whole sequence each step instead of a KV cache), HF transformers'
Qwen3ForCausalLM on the same weights, and a full recompute of the sampled rows' log-probs."""
import math
import weakref

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kernels
import model as modeling
from model import KVCache


def tiny_lm(seed=0, vocab=96, layers=2, sharpen=20.0, experts=0):
    """A small Qwen3 LM with perturbed norms; `sharpen` scales lm_head so that argmaxes are far
    from ties (greedy comparisons across implementations must not hinge on rounding). `experts` > 0:
    every second layer a Qwen3-MoE block of that many experts (top-2)."""
    torch.manual_seed(seed)
    cfg = modeling.LLMConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None, num_experts=experts, num_experts_per_tok=2,
                      moe_intermediate_size=32, decoder_sparse_step=2)
    lm = modeling.Qwen3LM(cfg)
    lm.init_weights()
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
        lm.lm_head.weight.mul_(sharpen)
    return lm.eval()


def reference_generate(lm, prompts, max_new_tokens, stop_tokens=(), n_valid=None, banned=()):
    """The decode loop as it was before the engine, greedy, kept as a plain reference: prompts
    left-padded into one batch, positions restarting after the padding, one token per step for
    every row until all rows stopped, padded vocabulary rows and banned ids never chosen, each row
    cut after its first stop token. A full forward each step stands in for the KV cache."""
    L = max(len(p) for p in prompts)
    seqs = [[0] * (L - len(p)) + list(p) for p in prompts]
    real = [[0] * (L - len(p)) + [1] * len(p) for p in prompts]
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        ids, mask = torch.tensor(seqs), torch.tensor(real)
        with torch.no_grad():
            logits = lm(ids, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), attention_mask=mask)[:, -1]
        if n_valid is not None:
            logits[:, n_valid:] = float("-inf")
        if banned:
            logits[:, list(banned)] = float("-inf")
        for i, t in enumerate(logits.argmax(-1).tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop_tokens
            seqs[i].append(t)
            real[i].append(1)
        if all(done):
            break
    return out


def engine(lm, prompts, max_new_tokens, **kw):
    """generate_from_embeds on token-id prompts (their embeddings), under inference mode as RL runs it."""
    with torch.inference_mode():
        embeds = [lm.model.embed_tokens(torch.tensor(p, device=lm.lm_head.weight.device)) for p in prompts]
        return modeling.generate_from_embeds(lm, embeds, max_new_tokens, **kw)


PROMPTS = [[3, 7, 9, 11, 2, 5, 8], [5], [8, 1, 4], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]


# --- the policy -----------------------------------------------------------------------------------

def policy_by_hand(logits, T, top_p, n_valid, banned):
    """numpy: mask padded rows and banned ids, divide by T (1 when greedy), keep the smallest set of
    most likely tokens whose probability reaches top_p."""
    x = np.array(logits, dtype=np.float64)
    x[n_valid:] = -np.inf
    x[list(banned)] = -np.inf
    x = x / (T if T > 0 else 1.0)
    p = np.exp(x - x.max())
    p /= p.sum()
    keep, acc = set(), 0.0
    for i in np.argsort(-x, kind="stable"):
        if acc >= top_p:
            break
        keep.add(int(i))
        acc += p[i]
    return np.array([v if i in keep else -np.inf for i, v in enumerate(x)])


@pytest.mark.parametrize("T,top_p", [(0.7, 0.9), (1.0, 1.0), (0.0, 0.5), (2.0, 0.3)])
def test_policy_logits_by_hand(T, top_p):
    logits = [2.0, 1.5, 0.3, -1.0, 4.0, 0.9, 3.0, 2.5]                  # ids 6, 7: padded rows
    got = modeling.policy_logits(torch.tensor([logits]), T, top_p, n_valid=6, banned=(4,))[0].double().numpy()
    want = policy_by_hand(logits, T, top_p, 6, (4,))
    assert np.array_equal(np.isinf(got), np.isinf(want))
    assert np.allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-6)
    assert np.isinf(want).sum() >= 3                                      # padded + banned at least


@pytest.mark.parametrize("probs,top_p,kept", [([0.25] * 4, 0.5, 2), ([0.25] * 4, 0.25, 1),
                                               ([0.5, 0.25, 0.125, 0.125], 0.75, 2), ([0.5, 0.5, 0.0, 0.0], 0.5, 1)])
def test_top_p_stops_at_the_token_whose_mass_reaches_it(probs, top_p, kept):
    """A nucleus whose mass lands exactly on top_p ends there (the smallest set reaching it), as HF's
    TopPLogitsWarper and the reference above keep it, not one token later (ties: HF keeps as many)."""
    from transformers.generation.logits_process import TopPLogitsWarper
    logits = torch.tensor([probs]).log()
    got = torch.isfinite(modeling.policy_logits(logits, 1.0, top_p)[0])
    hf = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone())[0])
    by_hand = np.isfinite(policy_by_hand(logits[0].tolist(), 1.0, top_p, len(probs), ()))
    assert int(got.sum()) == int(hf.sum()) == kept and np.array_equal(got.numpy(), by_hand)   # HF breaks ties otherwise


# --- greedy: the reference loop, HF, and one prompt at a time --------------------------------------

def test_greedy_equals_reference_loop_and_hf(tmp_path):
    from transformers import Qwen3ForCausalLM
    lm = tiny_lm()
    modeling.save_hf_llm(lm, str(tmp_path))
    hf = Qwen3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    got = engine(lm, PROMPTS, 12)
    assert got == reference_generate(lm, PROMPTS, 12)
    for p, g in zip(PROMPTS, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert g == want[0, len(p):].tolist()
        assert g == engine(lm, [p], 12)[0]                               # batched = one prompt at a time
    assert len({tuple(g) for g in got}) == len(PROMPTS)                  # not vacuous


def test_greedy_stop_tokens_vocab_limit_and_banned_ids():
    lm = tiny_lm(seed=1)
    free = reference_generate(lm, PROMPTS, 16)
    stop = {free[0][4], free[2][6]}
    banned = tuple(sorted({free[1][0], free[3][1]} - stop))
    n_valid = 80
    want = reference_generate(lm, PROMPTS, 16, stop, n_valid, banned)
    got = engine(lm, PROMPTS, 16, stop_tokens=stop, n_valid_tokens=n_valid, banned=banned)
    assert got == want
    assert any(len(g) < 16 and g[-1] in stop for g in got)               # a row ended at its stop token
    assert all(t < n_valid and t not in banned for g in got for t in g)
    assert got != engine(lm, PROMPTS, 16)                                # the limits changed something


# --- sampling: log-probs of the policy, shared prefill, compaction ---------------------------------

def test_sampling_never_draws_a_token_of_probability_zero():
    """Inverse-CDF sampling at the extreme draws (u = 0 and the largest float below 1) with banned
    tokens at both ends of the vocabulary; and its frequencies against the softmax, by hand."""
    policy = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.0, 2.0, float("-inf")]])
    for u in (0.0, 1.0 - 2.0 ** -24, 0.5):
        ids, lp = modeling.sample_tokens(policy, 1.0, torch.tensor([[u]]))
        assert ids.item() in (1, 3, 4) and math.isfinite(lp.item())
    n = 20_000
    ids, _ = modeling.sample_tokens(policy.expand(n, 6), 1.0, torch.rand(n, 1, generator=torch.Generator().manual_seed(0)))
    freq = np.bincount(ids.numpy(), minlength=6) / n
    want = np.exp([0, 1.0, 0, 0.0, 2.0, 0]) * [0, 1, 0, 1, 1, 0]
    want /= want.sum()
    assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-3), (freq, want)


def recompute_logps(lm, prompt, completion, policy):
    """log_softmax(policy_logits) of one forward over prompt + completion, at the completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = lm(ids)[0, len(prompt) - 1:-1]                          # (n, V): predicts the completion
    logp = torch.log_softmax(modeling.policy_logits(logits, *policy), -1)
    return logp.gather(1, torch.tensor(completion)[:, None])[:, 0]


def test_rollout_logprobs_equal_full_recompute():
    lm = tiny_lm(seed=2, sharpen=4.0)
    G, T, top_p, n_valid, banned = 3, 0.7, 0.9, 88, (5, 17)
    lps = []
    rows = engine(lm, PROMPTS, 10, temperature=T, top_p=top_p, stop_tokens=(7,), n_valid_tokens=n_valid,
                  banned=banned, generator=torch.Generator().manual_seed(0), logprobs=lps, repeats=G)
    assert len(rows) == len(PROMPTS) * G and [len(r) for r in rows] == [len(lp) for lp in lps]
    diffs = []
    for i, (row, lp) in enumerate(zip(rows, lps)):
        want = recompute_logps(lm, PROMPTS[i // G], row, (T, top_p, n_valid, banned))   # prompt-major rows
        diffs.append(float((torch.tensor(lp) - want).abs().max()))
    assert max(diffs) < 1e-4, diffs
    assert all(t < n_valid and t not in banned for r in rows for t in r)
    assert len({tuple(r) for r in rows[:G]}) > 1                         # a prompt's rows differ
    assert min(math.exp(x) for lp in lps for x in lp) < 0.5              # sampled, not argmaxed


def test_each_prompt_is_prefilled_once_and_only_its_last_logits_are_made():
    lm = tiny_lm(seed=3, sharpen=1.0)
    shapes, heads = [], []
    h1 = lm.model.layers[0].register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape[:2])))
    h2 = lm.lm_head.register_forward_hook(lambda m, a, o: heads.append(tuple(a[0].shape)))
    kw = dict(temperature=1.0, stop_tokens=(3, 4, 5, 6))
    shared = engine(lm, PROMPTS, 8, repeats=4, generator=torch.Generator().manual_seed(1), **kw)
    h1.remove()
    h2.remove()
    assert shapes[0] == (len(PROMPTS), 11)                               # one prefill row per prompt
    assert all(t == 1 for _, t in shapes[1:])                            # then one token per step
    assert heads[0] == (len(PROMPTS), 64)                                # logits of the last position only
    repeated = engine(lm, [p for p in PROMPTS for _ in range(4)], 8, generator=torch.Generator().manual_seed(1), **kw)
    assert shared == repeated                                           # the same rows, the same draws


def test_finished_rows_leave_the_batch_without_changing_any_row(monkeypatch):
    lm = tiny_lm(seed=4, sharpen=1.0)
    stop = tuple(range(0, 96, 12))                                       # 1/12 of the tokens end a row
    kw = dict(temperature=1.0, stop_tokens=stop, repeats=8)
    batch = []
    hook = lm.model.layers[0].register_forward_hook(lambda m, a, o: batch.append(a[0].shape[0]))
    lps = []
    got = engine(lm, PROMPTS, 40, generator=torch.Generator().manual_seed(2), logprobs=lps, **kw)
    hook.remove()
    monkeypatch.setattr(modeling, "SYNC_EVERY", 10 ** 9)                        # never look: every row runs to the end
    lps_all = []
    want = engine(lm, PROMPTS, 40, generator=torch.Generator().manual_seed(2), logprobs=lps_all, **kw)
    assert got == want
    assert max(abs(a - b) for x, y in zip(lps, lps_all) for a, b in zip(x, y)) < 1e-5
    lengths = sorted(len(r) for r in got)
    assert lengths[0] < 8 and lengths[-1] > 24                            # rows of very different lengths
    assert batch[1] == 32 and batch[-1] < 16                              # the decode batch shrank
    assert sum(batch[1:]) < 0.6 * 32 * 39, batch                          # most of the rows' compute saved


def test_on_token_sees_every_step_of_every_row():
    lm = tiny_lm(seed=5, sharpen=1.0)
    seen = []
    got = engine(lm, PROMPTS, 30, temperature=1.0, stop_tokens=tuple(range(0, 96, 5)), repeats=2,
                 generator=torch.Generator().manual_seed(3), on_token=lambda ids: seen.append(ids.tolist()))
    for i, row in enumerate(got):
        assert [s[i] for s in seen[:len(row)]] == row
    assert any(s[i] == -1 for s in seen for i in range(len(got)))        # rows that left show -1


def test_sampling_is_seeded_and_generators_are_per_call():
    lm = tiny_lm(seed=6, sharpen=1.0)
    run = lambda g: engine(lm, PROMPTS, 8, temperature=1.0, generator=g)  # noqa: E731
    a, b = run(torch.Generator().manual_seed(7)), run(torch.Generator().manual_seed(7))
    assert a == b and a != run(torch.Generator().manual_seed(8))


# --- the compiled step ------------------------------------------------------------------------------

def test_compiled_step_gives_the_same_tokens_as_eager():
    lm = tiny_lm(seed=7, layers=1, sharpen=4.0)
    kw = dict(temperature=1.0, stop_tokens=tuple(range(0, 96, 6)), repeats=4)
    out = {}
    for compile in (False, True):
        lps = []
        out[compile] = (engine(lm, PROMPTS[:2], 24, generator=torch.Generator().manual_seed(4), logprobs=lps,
                               compile=compile, **kw), lps)
    assert out[True][0] == out[False][0]
    assert max(abs(a - b) for x, y in zip(out[True][1], out[False][1]) for a, b in zip(x, y)) < 1e-4
    assert len({len(r) for r in out[True][0]}) > 2                       # rows left the batch at different steps


def nan_filled_caches(monkeypatch):
    """From now on each new KV cache's buffers hold NaN, which any read of an unwritten slot spreads."""
    init = modeling.KVCache.__init__

    def nan_filled(self, *a):
        init(self, *a)
        for t in self.k + self.v:
            t.fill_(float("nan"))
    monkeypatch.setattr(modeling.KVCache, "__init__", nan_filled)


def test_no_unwritten_cache_slot_is_read(monkeypatch):
    """The cache's buffers are not zeroed: attention must read only slots written before (prompts,
    their left padding, generated tokens), through the prefill, G rows per prompt and rows leaving
    the batch, eager and compiled. Here fresh buffers hold NaN, which any read would spread. (The
    compiled test's model and call: its graphs serve both.)"""
    lm = tiny_lm(seed=7, layers=1, sharpen=4.0)
    kw = dict(temperature=1.0, stop_tokens=tuple(range(0, 96, 6)), repeats=4)
    run = lambda compile, lps: engine(lm, PROMPTS[:2], 24, generator=torch.Generator().manual_seed(4),  # noqa: E731
                                      logprobs=lps, compile=compile, **kw)
    want = run(False, [])
    nan_filled_caches(monkeypatch)
    for compile in (False, True):
        lps = []
        assert run(compile, lps) == want
        assert all(math.isfinite(x) for row in lps for x in row)
    assert len({len(r) for r in want}) > 2                              # rows left the batch at different steps


def test_a_compiled_moe_step_is_one_graph_with_the_experts_as_one_op(monkeypatch):
    """The experts' shapes follow the routing (tokens per expert): traced by Dynamo they recompiled
    the step for each new routing until its recompile limit (a compiled MoE rollout spent ~50 s
    compiling, then ran eagerly). kernels.moe_grouped_mlp is one opaque op in the compiled step: no
    graph break, the limit never hit, eager's tokens. What Dynamo captures is the point here, so its
    graphs run as captured (backend "eager": no inductor code generation, which the test above checks)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: compile_(fn, backend="eager"))
    monkeypatch.setattr(modeling, "COMPILED", {fn: modeling.Compiled(fn) for fn in modeling.COMPILED})
    lm = tiny_lm(seed=7, layers=2, sharpen=4.0, experts=8)                # a dense and an MoE layer
    kw = dict(temperature=1.0, stop_tokens=tuple(range(0, 96, 6)), repeats=4)
    run = lambda compile: engine(lm, PROMPTS[:2], 24, generator=torch.Generator().manual_seed(4),  # noqa: E731
                                 compile=compile, **kw)
    torch._dynamo.reset()                   # the limit counts per function: the tests above compiled these too
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        got = run(True)
    assert not counters["graph_break"], list(counters["graph_break"])[:1]
    # the prefill; the decode step at its first cache length, then dynamic in it, then at one row
    assert counters["stats"]["unique_graphs"] <= 4
    assert got == run(False)
    assert len({len(r) for r in got}) > 2                                # rows left the batch at different steps


def test_a_compiled_moe_step_under_autocast_gives_the_eager_tokens(monkeypatch):
    """A compiled graph runs with autocast off (AOTAutograd traces autocast's casts into it), so the
    experts' opaque op met an fp32 activation and the bf16 experts generation holds under CUDA's
    autocast (hold_matrices_in), and failed. Here the same on CPU under bf16 autocast, through
    AOTAutograd ("aot_eager": its runtime wrapper, no inductor code generation): eager's tokens."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: compile_(fn, backend="aot_eager"))
    monkeypatch.setattr(modeling, "COMPILED", {fn: modeling.Compiled(fn) for fn in modeling.COMPILED})
    lm = tiny_lm(seed=7, layers=2, sharpen=4.0, experts=8)
    modeling.hold_matrices_in(lm, torch.bfloat16)
    kw = dict(temperature=1.0, stop_tokens=tuple(range(0, 96, 6)), repeats=2)
    run = lambda compile: engine(lm, PROMPTS[:2], 8, generator=torch.Generator().manual_seed(4),  # noqa: E731
                                 compile=compile, **kw)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert run(True) == run(False)


def traced_capture(fn):
    """What CUDA graph capture does to the decode step, on the CPU: a warm-up run, then fn traced
    into its aten ops by make_fx on fake tensors (nothing runs, as nothing runs in a capture), which
    bakes in every Python value and shape of the capture and every tensor it touches by reference (a
    graph: by address), and fails on a host sync (.item(), .tolist()), which a capture refuses; each
    replay reruns those ops on the same tensors and writes the same output tensors."""
    out = [t.clone() for t in fn()]
    ops = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)()

    def replay():
        for o, t in zip(out, ops()):
            o.copy_(t)
    return replay, out


def test_graphed_steps_give_the_eager_tokens(monkeypatch):
    """compile="graphs": the decode step replayed from captures (CUDA graphs on a GPU; here the
    traced stand-in above, the eager step inside) gives eager's tokens and log-probs, through G rows
    per prompt, rows leaving the batch and the cache's read length crossing its GRAPH_SLOTS steps;
    a new capture only for a new batch size or read length, after the old graph is let go (a graph
    holds its memory pool while it or its outputs live). The cache is NaN-filled as it comes."""
    monkeypatch.setattr(modeling, "COMPILED", {fn: fn for fn in modeling.COMPILED})   # the eager step
    monkeypatch.setattr(modeling, "GRAPH_SLOTS", 8)
    captures, outputs = [], []

    def capture(fn):
        assert all(o() is None for o in outputs), "a new capture while the old graph's outputs live"
        replay, out = traced_capture(fn)
        captures.append(1)
        outputs.extend(weakref.ref(t) for t in out)
        return replay, out
    monkeypatch.setattr(modeling, "cuda_graph", capture)
    lm = tiny_lm(seed=7, layers=1, sharpen=4.0)
    kw = dict(temperature=1.0, stop_tokens=tuple(range(0, 96, 12)), repeats=4)
    run = lambda compile, lps: engine(lm, PROMPTS, 40, generator=torch.Generator().manual_seed(4),  # noqa: E731
                                      logprobs=lps, compile=compile, **kw)
    want_lps, got_lps = [], []
    want = run(False, want_lps)
    nan_filled_caches(monkeypatch)
    assert run("graphs", got_lps) == want
    assert max(abs(a - b) for x, y in zip(got_lps, want_lps) for a, b in zip(x, y)) < 1e-5
    lengths = {len(r) for r in want}
    assert len(lengths) > 2                                              # rows left the batch at different steps
    # read lengths 16, 24, .., 48, then the whole cache (51 slots), and one per smaller batch
    assert 6 < len(captures) <= 6 + len(lengths)


def test_moe_layers_run_graphed_only_on_the_triton_path(monkeypatch):
    """The MoE experts' torch path (the CPU's) sizes each expert's product from the routing on the
    host: its step cannot be captured (the stand-in fails on that sync, as a capture would), so
    graphed() leaves it uncaptured, with a warning. The Triton path (CUDA's) aligns the routing on
    the device with launch sizes from the shapes alone: that alignment traces without a sync."""
    lm = tiny_lm(seed=7, layers=2, experts=4)
    with torch.inference_mode():
        cache, logits, lens = modeling.prefill(lm, [lm.model.embed_tokens(torch.tensor([1, 2, 3]))], 2, 4)
        cache.length += 1
        ids, pos, policy = logits.argmax(-1).repeat(2), lens.repeat(2), (0.0, 1.0, None, torch.tensor([], dtype=torch.long))
        with pytest.raises(Exception, match="data-dependent"):
            traced_capture(lambda: modeling.decode_step(lm, cache, ids, pos, None, policy))
    step = modeling.COMPILED[modeling.decode_step]
    with pytest.warns(UserWarning, match="without graphs"):
        assert modeling.graphed(lm, step) is step
    assert isinstance(modeling.graphed(tiny_lm(seed=7), step), modeling.GraphedStep)
    topk_ids = torch.randint(0, 8, (12, 2))
    make_fx(lambda t: kernels._moe_align(t, 8, 16), tracing_mode="fake")(topk_ids)      # no host sync
    monkeypatch.setattr(kernels, "use_triton", lambda t, supported=True: True)         # as on CUDA
    assert isinstance(modeling.graphed(lm, step), modeling.GraphedStep)


def test_folded_query_groups_give_sdpas_grouped_attention():
    """The masked attention CUDA runs (each kv head's query heads on the query axis, the mask
    repeated: the memory-efficient kernel takes no enable_gqa) equals SDPA's enable_gqa form."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 4, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)   # G = 3
    seen = torch.ones(3, 9, dtype=torch.bool)
    seen[0, :2] = seen[2, 3] = False                                            # padded slots
    mask = modeling.decode_mask(seen, 5, 4)                                     # (3, 1, 4, 9)
    want = modeling.grouped_attention(q, k, v, mask, fold=False)
    torch.testing.assert_close(modeling.grouped_attention(q, k, v, mask, fold=True), want, rtol=1e-5, atol=1e-6)


def test_folded_attention_gives_the_gqa_form_whatever_layout_sdpa_returns(monkeypatch):
    """grouped_attention's CUDA form (fold: each kv head's query heads on the query axis, the mask
    repeated) gives SDPA's GQA form under a padding mask, also when SDPA hands back a transposed
    buffer, as CUDA's fused kernels do ((B, L, H, D) memory seen as (B, H, L, D)): a `view` of it
    fails, so a CPU run, whose math kernel returns contiguous memory, would never show it."""
    torch.manual_seed(0)
    B, H, Hkv, T, S, hd = 2, 4, 2, 3, 5, 8
    q = torch.randn(B, T, H, hd).transpose(1, 2)                         # as Attention builds it
    k, v = torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)
    mask = modeling.decode_mask(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), 2, T)
    want = modeling.grouped_attention(q, k, v, mask, fold=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def cuda_layout(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", cuda_layout)
    torch.testing.assert_close(modeling.grouped_attention(q, k, v, mask, fold=True), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_masked_generation_on_cuda_runs_without_the_math_kernel():
    """Prefill of prompts of different lengths (a padding mask) and decode under bf16 autocast, with
    SDPA's fp32 math path ruled out: the masked attention reaches a fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    lm = tiny_lm(seed=9, sharpen=4.0).cuda()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]), \
            torch.autocast("cuda", dtype=torch.bfloat16):
        assert len(engine(lm, PROMPTS, 8, compile=False)) == len(PROMPTS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_generator_on_a_cuda_model():
    lm = tiny_lm(seed=9, sharpen=1.0).cuda()
    run = lambda: engine(lm, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(9),  # noqa: E731
                         compile=False)
    assert run() == run()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("experts", [0, 4])
def test_cuda_graphs_give_the_eager_tokens(experts):
    """compile="graphs" on a GPU: real CUDA graphs around the compiled step give the eager engine's
    tokens (fp32, sampled), dense and with an MoE layer (its Triton experts inside the graph); under
    bf16 autocast, RL's setting, two calls give the same rows."""
    lm = tiny_lm(seed=7, layers=2, sharpen=4.0, experts=experts).cuda()
    kw = dict(temperature=1.0, stop_tokens=tuple(range(0, 96, 12)), repeats=4)
    run = lambda compile, lps: engine(lm, PROMPTS, 40, generator=torch.Generator("cuda").manual_seed(4),  # noqa: E731
                                      logprobs=lps, compile=compile, **kw)
    want_lps, got_lps = [], []
    assert run("graphs", got_lps) == run(False, want_lps)
    assert max(abs(a - b) for x, y in zip(got_lps, want_lps) for a, b in zip(x, y)) < 1e-4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert run("graphs", []) == run("graphs", [])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_under_bf16_autocast_the_cache_is_bf16_and_gives_the_fp32_caches_rows(monkeypatch, device):
    """The trainer's CUDA setting (bf16 autocast), on the CPU too: the KV cache is held in bf16 (half
    the memory; SDPA gets bf16 keys and values under autocast whatever the cache holds, so an fp32
    cache would be copied to bf16 every step), and gives exactly the rows and log-probs an fp32
    cache gives; without autocast the cache stays fp32."""
    made = []
    monkeypatch.setattr(modeling, "KVCache", lambda *a: made.append(KVCache(*a)) or made[-1])
    lm = tiny_lm(seed=8, sharpen=4.0).to(device)
    run = lambda lps: engine(lm, PROMPTS, 12, temperature=1.0, stop_tokens=(5, 17), logprobs=lps,  # noqa: E731
                             generator=torch.Generator().manual_seed(0), repeats=2, compile=False)
    got_lps, want_lps, cache_dtype = [], [], modeling.cache_dtype
    with torch.autocast(device, dtype=torch.bfloat16):
        got = run(got_lps)
        monkeypatch.setattr(modeling, "cache_dtype", lambda x: x.dtype)     # the fp32 cache it replaced
        want = run(want_lps)
    assert got == want and got_lps == want_lps and len(set(map(len, got))) > 1
    monkeypatch.setattr(modeling, "cache_dtype", cache_dtype)
    run([])
    assert [(c.k[0].dtype, c.v[-1].dtype) for c in made] == [(torch.bfloat16,) * 2, (torch.float32,) * 2,
                                                              (torch.float32,) * 2]


def test_a_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*a):
        raise torch._dynamo.exc.TorchDynamoException("no C compiler")
    compiled = {fn: modeling.Compiled(fn) for fn in modeling.COMPILED}
    for c in compiled.values():
        c.fn = broken
    monkeypatch.setattr(modeling, "COMPILED", compiled)
    lm = tiny_lm(seed=10)
    with pytest.warns(UserWarning, match="running it eagerly"):
        got = engine(lm, PROMPTS, 6, compile=True)
    assert got == engine(lm, PROMPTS, 6, compile=False)
    assert all(c.fn is c.eager for c in compiled.values())


def test_the_sampled_distribution_is_the_recorded_policy_at_a_152k_vocabulary():
    """Inverse-CDF sampling (sample_tokens) picks token j for the draws between cdf[j-1] and cdf[j]:
    the distribution sampled is the cdf's differences, which must be softmax(policy), whose
    log-probs are recorded, also at Qwen's vocabulary, where a float32 running sum drops tail tokens."""
    torch.manual_seed(0)
    x = torch.randn(2, 151936)
    x[:, 7] += 12.0                                                   # one dominant token and a long tail
    logp = torch.log_softmax(x, -1)
    cdf = modeling.sampling_cdf(logp)
    sampled = torch.diff(cdf, prepend=torch.zeros(2, 1, dtype=cdf.dtype)) / cdf[:, -1:]
    assert (0.5 * (sampled - logp.double().exp()).abs().sum(-1)).max() < 1e-6      # total variation


# --- guards found by mutation testing ---------------------------------------------------------------

def test_top_p_of_one_keeps_every_token_where_the_head_holds_all_float32_mass():
    """top_p = 1 is no nucleus: the policy is logits / T at every id, also where the most likely
    token's float32 probability rounds to 1 (the mass before each tail token is then 1.0, which a
    nucleus taken at top_p = 1 would cut, giving those tokens log-prob -inf)."""
    logits = torch.zeros(2, 64)
    logits[0, 3] = 30.0                                              # p(3) = 1 - 63 e^-30: 1.0 in float32
    logits[1, 60] = 40.0
    for T in (1.0, 0.5, 0.0):
        got = modeling.policy_logits(logits, T, 1.0)
        assert torch.equal(got, logits / (T if T > 0 else 1.0))       # by hand: nothing masked
    assert torch.isfinite(modeling.policy_logits(logits, 1.0, 1.0, n_valid=64, banned=())).all()


def test_the_extreme_draws_pick_the_ends_of_the_support():
    """Inverse-CDF sampling, threshold (1 - u) * total: u = 0 asks for the whole mass, the last id of
    nonzero probability; u just below 1 for almost none, the first such id. Also for distributions
    whose float64 sum falls short of 1 (a threshold of 1 - u alone would pass the total: an id past
    the vocabulary). Ids 0..4 and 40..49 are banned (-inf)."""
    policy = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    policy[:, :5] = policy[:, 40:] = float("-inf")
    ids, lp = modeling.sample_tokens(policy, 1.0, torch.zeros(64, 1))
    assert ids.tolist() == [39] * 64 and torch.isfinite(lp).all()
    ids, lp = modeling.sample_tokens(policy, 1.0, torch.full((64, 1), 1.0 - 2.0 ** -24))
    assert ids.tolist() == [5] * 64 and torch.isfinite(lp).all()
    assert (torch.log_softmax(policy, -1).double().exp().sum(-1) < 1).any()   # not vacuous


def plain_attention(q, k, v, mask, fold):
    """Attention written out: kv heads repeated for their query groups, masked scores, softmax. A row
    that masks every slot gives NaN here (as some fused kernels do), where torch's CPU SDPA gives 0."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_no_attention_row_is_fully_masked(monkeypatch):
    """decode_mask lets each query see its own slot: a query on a prompt's left padding attends only
    itself, never nothing. Under an attention that gives NaN for a fully masked row, generation of
    prompts of different lengths still gives the reference loop's tokens (no NaN reaches the cache);
    and the mask by hand."""
    lm = tiny_lm()
    want = reference_generate(lm, PROMPTS, 10)
    monkeypatch.setattr(modeling, "grouped_attention", plain_attention)
    assert engine(lm, PROMPTS, 10, compile=False) == want
    seen = torch.tensor([[False, False, True, True, True, False], [True] * 6])
    got = modeling.decode_mask(seen, 0, 4)[:, 0].int().tolist()
    assert got == [[[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]],
                   [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]]
    got = modeling.decode_mask(seen, torch.tensor([5]), 1)[:, 0].int().tolist()
    assert got == [[[0, 0, 1, 1, 1, 1]], [[1, 1, 1, 1, 1, 1]]]


def test_rows_leave_the_batch_once_a_quarter_has_finished():
    """The decode batch step by step, by hand from the rows' outputs: every SYNC_EVERY steps the rows
    that have produced a stop token are counted; when the live ones are at most 3/4 of the batch it
    becomes the live rows, else it stays whole (moving the cache's rows costs a copy); none live: the
    loop ends."""
    assert [modeling.rows_to_keep(n, 32) for n in (0, 8, 24, 25, 32)] == [0, 8, 24, 32, 32]
    lm = tiny_lm(seed=4, sharpen=1.0)
    stop = (0, 32, 64)
    batch = []
    hook = lm.model.layers[0].register_forward_hook(lambda m, a, o: batch.append(a[0].shape[0]))
    got = engine(lm, PROMPTS, 40, temperature=1.0, stop_tokens=stop, repeats=8,
                 generator=torch.Generator().manual_seed(5))
    hook.remove()
    want, cur, shrank = [len(PROMPTS)], len(got), set()
    for step in range(40):
        if step:
            want.append(cur)
        if (step + 1) % modeling.SYNC_EVERY == 0:
            n_live = sum(not (r[-1] in stop and len(r) <= step + 1) for r in got)
            if n_live == 0:
                break
            if 4 * n_live <= 3 * cur:
                shrank.add((n_live, cur))
                cur = n_live
    assert batch == want
    assert any(4 * n == 3 * c for n, c in shrank) and any(2 * n > c for n, c in shrank), shrank   # the bounds hit


def test_no_tokens_asked_gives_empty_rows():
    """max_new_tokens = 0: an empty list per row (repeats included), no decode; `logprobs` receives
    an empty list per row too."""
    lm = tiny_lm()
    lps = [[0.5]]                                                         # a caller's earlier rows stay
    assert engine(lm, PROMPTS, 0, repeats=2, logprobs=lps) == [[]] * (2 * len(PROMPTS))
    assert lps == [[0.5]] + [[]] * (2 * len(PROMPTS))
    assert lm.generate(PROMPTS, max_new_tokens=0) == [[]] * len(PROMPTS)


def test_generate_entry_points_pass_the_tokenizers_size():
    """Qwen3LM.generate and SAILVL.generate hand n_valid_tokens to the engine: ids >= it (the
    embedding table's padded rows) are never generated; the reference loop masks them by hand."""
    lm = tiny_lm(seed=1)
    free = reference_generate(lm, PROMPTS, 12)
    n_valid = sorted(t for g in free for t in g)[len(PROMPTS) * 6]
    want = reference_generate(lm, PROMPTS, 12, n_valid=n_valid)
    assert want != free                                                  # the limit changes the rows
    assert lm.generate(PROMPTS, max_new_tokens=12, n_valid_tokens=n_valid) == want
    m = modeling.build_model("tiny").eval()
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    free = reference_generate(m.language_model, prompts, 8)
    n_valid = sorted(t for g in free for t in g)[len(prompts) * 4]
    want = reference_generate(m.language_model, prompts, 8, n_valid=n_valid)
    assert want != free
    assert m.generate(prompts, max_new_tokens=8, n_valid_tokens=n_valid) == want


def test_every_step_samples_with_its_own_draw_as_a_plain_loop_does():
    """At temperature 1 every step, not only the first, samples: token t of row i is the first id whose
    cumulative probability (float64) reaches (1 - u) of the total, u the i-th of that step's draws
    (one (B, 1) draw per step). The reference recomputes each row's whole sequence with a full
    forward per step (no cache); both use the same generator. No stop token: no row leaves."""
    lm = tiny_lm(seed=3, sharpen=1.0)
    n = 9
    got = engine(lm, PROMPTS, n, temperature=1.0, generator=torch.Generator().manual_seed(5))
    gen, seqs = torch.Generator().manual_seed(5), [list(p) for p in PROMPTS]
    for _ in range(n):
        u = torch.rand(len(PROMPTS), 1, generator=gen)
        for i, s in enumerate(seqs):
            with torch.no_grad():
                p = torch.softmax(lm(torch.tensor([s]))[0, -1].double(), -1)
            cdf = torch.cumsum(p, 0)
            s.append(int(torch.searchsorted(cdf, (1 - u[i].double()) * cdf[-1])))
    want = [s[len(p):] for s, p in zip(seqs, PROMPTS)]
    assert got == want
    assert want != engine(lm, PROMPTS, n)                                 # not the greedy rows
    assert any(row[1:] != g[1:] for row, g in zip(want, engine(lm, PROMPTS, n)))   # later steps sample too
