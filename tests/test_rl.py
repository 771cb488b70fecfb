"""Tests of rl.py's pure functions: losses, advantages, filters, KL, rewards.

References: cases computed by hand (written out in each test), plain-Python loop
re-implementations of the loss formulas (DAPO arXiv 2503.14476, GSPO arXiv 2507.18071), a real
2-process gloo group for the rank split, `statistics.stdev` for advantages, exact expectations
for the KL estimators. The answer reading and equivalence the rewards use (data.py's grading API)
are tested against math-verify 0.9.0 in tests/test_answers.py.
"""
import json
import math
import os
import statistics
import time

import pytest
import torch
import torch.multiprocessing as mp

import rl
from test_answers import HOSTILE      # the hostile replies the grading API is tested on

ALGOS = ("dapo", "gspo", "gspo_token")


def close(a, b, tol=1e-5):
    a, b = (torch.as_tensor(x).detach().item() for x in (a, b))
    return abs(a - b) < tol


# ----------------------------------------------------------------------------------------------
# hand-computed cases: each value below is worked out by hand in its docstring

def two_row_case():
    """new log-probs log[1.5, 1, 1 | 0.5, 1, 1.1], old 0, A = +1 / -1, valid lengths 1 and 3."""
    logp = torch.tensor([[1.5, 1.0, 1.0], [0.5, 1.0, 1.1]]).log().requires_grad_(True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    return logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask


def test_dapo_two_row_case_token_mean_and_seq_mean():
    logp, old, adv, mask = two_row_case()
    # row 1: max(-1.5, -1.28) = -1.28; row 2: max(0.5, 0.8) + 1 + 1.1 = 2.9
    loss, stats = rl.policy_loss(logp, old, adv, mask)                     # DAPO, token-mean
    assert close(loss, (-1.28 + 2.9) / 4) and close(loss, 0.405)
    loss, _ = rl.policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    assert close(loss, -0.156667)
    # clipped: token 1 high (1.5 > 1.28, A > 0), row 2 token 1 low (0.5 < 0.8, A < 0)
    assert close(stats["clip_frac_high"], 1 / 4) and close(stats["clip_frac_low"], 1 / 4)
    assert close(stats["ratio_mean"], (1.5 + 0.5 + 1 + 1.1) / 4)
    # seq-mean-token-sum-norm divides each row's token sum by T = 3: (-1.28 / 3 + 2.9 / 3) / 2
    loss, _ = rl.policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm")
    assert close(loss, (-1.28 + 2.9) / 3 / 2)
    loss, _ = rl.policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_len=10)
    assert close(loss, (-1.28 + 2.9) / 10 / 2)


def test_gspo_sequence_ratio_hand_case():
    logp, old, adv, mask = two_row_case()
    _, stats = rl.policy_loss(logp[1:], old[1:], adv[1:], mask[1:], algo="gspo")
    assert close(stats["ratio_mean"], 0.81932)                    # exp(mean log[0.5, 1, 1.1])
    assert close(stats["clip_frac_low"], 1.0) and close(stats["clip_frac_high"], 0.0)
    # both rows: s = 1.5 (A = +1) -> -(1 + 4e-4); s = 0.81932 (A = -1) -> 1 - 3e-4
    loss, stats = rl.policy_loss(logp, old, adv, mask, algo="gspo")
    assert close(loss, (-1.0004 + 0.9997) / 2, 1e-7)
    assert close(stats["clip_frac_high"], 0.5) and close(stats["clip_frac_low"], 0.5)


def test_dual_clip_hand_case():
    logp, old, mask = torch.tensor([[math.log(5.0)]]), torch.zeros(1, 1), torch.ones(1, 1)
    adv = torch.tensor([-1.0])
    loss, stats = rl.policy_loss(logp, old, adv, mask, clip_c=3.0)
    assert close(loss, 3.0) and close(stats["clip_frac_dual"], 1.0)
    loss, stats = rl.policy_loss(logp, old, adv, mask)            # off by default: -A r = 5
    assert close(loss, 5.0) and close(stats["clip_frac_dual"], 0.0)
    # dual-clip leaves positive advantages alone: A = +1, r = 5 -> -1.28 with or without it
    both = torch.tensor([[math.log(5.0)], [math.log(5.0)]])
    loss, stats = rl.policy_loss(both, torch.zeros(2, 1), torch.tensor([-1.0, 1.0]), torch.ones(2, 1), clip_c=3.0)
    assert close(loss, (3.0 - 1.28) / 2) and close(stats["clip_frac_dual"], 0.5)
    with pytest.raises(ValueError):
        rl.policy_loss(logp, old, adv, mask, clip_c=1.0)


def test_lengths_one_and_three_any_split_gives_half():
    """Notes §G case 3 (modelscope/twinkle #292): A = +-1, ratio 1 -> 0.5 however it is split."""
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    whole, _ = rl.policy_loss(logp, logp, adv, mask)
    parts = [rl.policy_loss(logp[i:i + 1], logp[i:i + 1], adv[i:i + 1], mask[i:i + 1], n_global=4)[0]
             for i in range(2)]
    naive = [rl.policy_loss(logp[i:i + 1], logp[i:i + 1], adv[i:i + 1], mask[i:i + 1])[0] for i in range(2)]
    assert close(whole, 0.5) and close(sum(parts), 0.5)
    assert close(sum(naive), 0.0)                                  # per-micro-batch means: the bug


def test_gspo_ignores_token_spread_when_sequence_ratio_is_one():
    """Notes §G case 4: token log-ratios [+1, -1] give s = 1: GSPO does not clip, DAPO does."""
    logp = torch.tensor([[1.0, -1.0]])
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0])
    _, stats = rl.policy_loss(logp, old, adv, mask, algo="gspo")
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_frac_high"].item() == 0.0
    _, stats = rl.policy_loss(logp, old, adv, mask, algo="dapo")
    assert close(stats["clip_frac_high"], 0.5)


def test_first_update_ratio_is_exactly_one():
    """Notes §G case 8: logp == old_logp -> ratio exactly 1, no clipping, zero KL."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g) * 3
    mask = torch.rand(4, 6, generator=g) > 0.3
    old = torch.where(mask, logp, torch.randn(4, 6, generator=g))    # padding differs: garbage
    for algo in ALGOS:
        for adv in (torch.randn(4, generator=g), torch.randn(4, 1, generator=g), torch.randn(4, 6, generator=g)):
            if algo == "gspo" and adv.shape[-1] == 6:
                continue
            _, stats = rl.policy_loss(logp, old, adv, mask, algo=algo)
            assert stats["ratio_mean"].item() == 1.0, algo
            for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl"):
                assert stats[k].item() == 0.0, (algo, k)


def test_zero_valid_tokens_gives_zero_loss_and_zero_gradient():
    logp = torch.full((2, 4), -float("inf")).requires_grad_(True)  # padding may hold anything
    old = torch.full((2, 4), float("nan"))
    adv = torch.tensor([float("nan"), 1.0])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for algo in ALGOS:
        for agg in rl.AGG_MODES:
            for n_global in (None, 0):
                logp.grad = None
                loss, stats = rl.policy_loss(logp, old, adv, mask, algo=algo, agg=agg, n_global=n_global)
                assert loss.item() == 0.0 and loss.requires_grad
                loss.backward()
                assert torch.equal(logp.grad, torch.zeros(2, 4)), (algo, agg)
                assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())


def test_invalid_arguments_are_refused():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="gspo_token"):
        rl.policy_loss(x, x, torch.zeros(2, 3), mask, algo="gspo")
    with pytest.raises(ValueError):
        rl.policy_loss(x, x, torch.zeros(2), mask, algo="ppo")
    with pytest.raises(ValueError):
        rl.policy_loss(x, x, torch.zeros(2), mask, agg="token-sum")


# ----------------------------------------------------------------------------------------------
# an independent loop implementation, and split invariance of loss and gradients

def aggregate_rows(rows, agg, norm_len):
    """rows: (loss summed over the row's tokens, its length) of the non-empty rows."""
    if agg == "token-mean":
        return sum(r for r, _ in rows) / sum(n for _, n in rows)
    if agg == "seq-mean-token-mean":
        return sum(r / n for r, n in rows) / len(rows)
    return sum(r / norm_len for r, _ in rows) / len(rows)


def reference_loss(logp, old, adv, lengths, algo, agg, lo, hi, norm_len):
    """The objectives written out token by token (autograd flows through the scalar ops)."""
    rows = []                                     # (per-row loss sum, length) of non-empty rows
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        if algo == "dapo":
            terms = []
            for t in range(n):
                a = adv[i, t] if adv.dim() == 2 else adv[i]
                r = torch.exp(logp[i, t] - old[i, t])
                terms.append(torch.maximum(-a * r, -a * torch.clamp(r, 1 - lo, 1 + hi)))
            row = sum(terms)
        else:                                     # GSPO: one clipped objective per sequence
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n)) / n)
            row = n * torch.maximum(-adv[i] * s, -adv[i] * torch.clamp(s, 1 - lo, 1 + hi))
        rows.append((row, n))
    return aggregate_rows(rows, agg, norm_len)


def reference_loss_gspo_token(logp, old, adv, lengths, agg, lo, hi, norm_len):
    """GSPO-token with per-token advantages: s_it = sg[s_i] exp(logp_it - sg[logp_it])."""
    rows = []
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        s = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n)) / n).detach()
        terms = []
        for t in range(n):
            r = s * torch.exp(logp[i, t] - logp[i, t].detach())
            terms.append(torch.maximum(-adv[i, t] * r, -adv[i, t] * torch.clamp(r, 1 - lo, 1 + hi)))
        rows.append((sum(terms), n))
    return aggregate_rows(rows, agg, norm_len)


LENGTHS = [3, 7, 0, 1, 5, 2]                      # uneven, with a fully-masked row


def policy_batch(seed, per_token_adv=False, spread=0.3):
    """A tiny linear 'policy' W (D, V) whose log-probs of fixed tokens give logp (B, T)."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, V = len(LENGTHS), max(LENGTHS), 4, 5
    W = (torch.randn(D, V, generator=g) * 0.5).requires_grad_(True)
    feats = torch.randn(B, T, D, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    with torch.no_grad():
        old = torch.log_softmax(feats @ W, -1).gather(-1, tokens[..., None])[..., 0]
        old = old + spread * torch.randn(B, T, generator=g)           # some ratios outside the clip
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    return W, feats, tokens, old, adv, mask


def logp_of(W, feats, tokens):
    return torch.log_softmax(feats @ W, -1).gather(-1, tokens[..., None])[..., 0]   # (B, T)


# wider GSPO clips than the defaults, so that with these ratios some sequences clip and some do not
CLIPS = {"dapo": (0.2, 0.28), "gspo": (0.05, 0.08), "gspo_token": (0.05, 0.08)}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("agg", rl.AGG_MODES)
def test_loss_and_grads_match_loop_reference_and_any_micro_batch_split(algo, agg):
    lo, hi = CLIPS[algo]
    cases = [(0, False)] + ([(2, True)] if algo != "gspo" else [(1, False)])
    for seed, per_token in cases:
        W, feats, tokens, old, adv, mask = policy_batch(seed, per_token)
        T = mask.shape[1]
        # the whole batch, against the loop reference
        whole, stats = rl.policy_loss(logp_of(W, feats, tokens), old, adv, mask, algo, lo, hi, agg)
        (g_whole,) = torch.autograd.grad(whole, W)
        if algo == "gspo_token" and per_token:    # per-token A: the token form of GSPO-token
            ref = reference_loss_gspo_token(logp_of(W, feats, tokens), old, adv, LENGTHS, agg, lo, hi, T)
        else:                                     # per-sequence A: GSPO-token is GSPO
            ref = reference_loss(logp_of(W, feats, tokens), old, adv, LENGTHS,
                                 "dapo" if algo == "dapo" else "gspo", agg, lo, hi, T)
        (g_ref,) = torch.autograd.grad(ref, W)
        assert close(whole, ref, 1e-6), (seed, whole.item(), ref.item())
        assert torch.allclose(g_whole, g_ref, atol=1e-6)
        assert stats["clip_frac_low"] + stats["clip_frac_high"] > 0          # clipping is exercised
        # uneven micro-batches (rows 1 / 3 / 2), each trimmed to its own longest row
        n_global = rl.loss_normalizer(mask, agg)
        total, W.grad = 0.0, None
        for rows in ([0], [1, 2, 3], [4, 5]):
            width = max(1, max(LENGTHS[r] for r in rows))
            sl = (torch.tensor(rows), slice(0, width))
            part, _ = rl.policy_loss(logp_of(W, feats[sl[0], :width], tokens[sl[0], :width]), old[sl],
                                     adv[sl] if per_token else adv[sl[0]], mask[sl], algo, lo, hi, agg,
                                     n_global=n_global, norm_len=T)
            part.backward()
            total += part.item()
        assert close(total, whole, 1e-6)
        assert torch.allclose(W.grad, g_whole, atol=1e-6)


def test_naive_micro_batch_normalisation_would_differ():
    """Guard against a vacuous split test: without n_global the summed losses are wrong."""
    W, feats, tokens, old, adv, mask = policy_batch(0)
    whole, _ = rl.policy_loss(logp_of(W, feats, tokens), old, adv, mask)
    naive = sum(rl.policy_loss(logp_of(W, feats[r], tokens[r]), old[r], adv[r], mask[r])[0].item()
                for r in ([0], [1, 2, 3], [4, 5]))
    assert abs(naive - whole.item()) > 1e-3


@pytest.mark.parametrize("agg", rl.AGG_MODES)
def test_gspo_token_equals_gspo_for_sequence_advantages(agg):
    for seed in range(3):
        W, feats, tokens, old, adv, mask = policy_batch(seed, spread=0.003)
        out = {}
        for algo in ("gspo", "gspo_token"):
            loss, stats = rl.policy_loss(logp_of(W, feats, tokens), old, adv, mask, algo=algo, agg=agg)
            (grad,) = torch.autograd.grad(loss, W)
            out[algo] = (loss, grad, stats)
        assert close(out["gspo"][0], out["gspo_token"][0], 1e-7)
        assert torch.allclose(out["gspo"][1], out["gspo_token"][1], atol=1e-7, rtol=1e-5)
        assert out["gspo"][1].abs().max() > 1e-4                           # not both zero
        fr = out["gspo"][2]["clip_frac_low"] + out["gspo"][2]["clip_frac_high"]
        assert 0 < fr < 1                                                  # some clipped, some not


# a real 2-process gloo group: each rank has its shard, both use the global normaliser

def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        W, feats, tokens, old, adv, mask = policy_batch(0)
        rows = torch.tensor([[0, 1, 2], [3, 4, 5]][rank])                # uneven token counts
        result = {}
        for algo, agg in (("dapo", "token-mean"), ("gspo", "seq-mean-token-mean")):
            n_global = rl.loss_normalizer(mask[rows], agg).clone()
            dist.all_reduce(n_global)                                     # the rollout batch's count
            W.grad = None
            loss, _ = rl.policy_loss(logp_of(W, feats[rows], tokens[rows]), old[rows], adv[rows],
                                     mask[rows], algo=algo, agg=agg, n_global=n_global)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            dist.all_reduce(W.grad)
            result[algo] = (total, W.grad.clone())
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_split_equals_single_process(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    W, feats, tokens, old, adv, mask = policy_batch(0)
    for algo, agg in (("dapo", "token-mean"), ("gspo", "seq-mean-token-mean")):
        loss, _ = rl.policy_loss(logp_of(W, feats, tokens), old, adv, mask, algo=algo, agg=agg)
        (grad,) = torch.autograd.grad(loss, W)
        for r in range(world):
            assert close(res[r][algo][0], loss, 1e-6)
            assert torch.allclose(res[r][algo][1], grad, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# advantages, filter, overlong, KL

def test_group_advantages():
    adv = rl.group_advantages(torch.tensor([1.0, 0.0]), 2)
    assert close(adv[0], 0.70711) and close(adv[1], -0.70711)
    rewards = [1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0.3, 0.9, 0.1, 0.5]
    adv = rl.group_advantages(torch.tensor(rewards), 4)
    for k in range(4):                                           # statistics.stdev is Bessel's
        g = rewards[4 * k:4 * k + 4]
        sd = statistics.stdev(g)
        want = [0.0] * 4 if sd == 0 else [(x - statistics.mean(g)) / (sd + 1e-6) for x in g]
        assert all(close(a, w) for a, w in zip(adv[4 * k:4 * k + 4], want))
    assert adv[:8].eq(0).all()                                   # zero-variance groups: exactly 0
    assert close(adv[8], 0.75 / (0.5 + 1e-6))
    # float32: the mean of eight 0.9s is not 0.9, and (r - mean) / (std + eps) would give -0.056
    assert rl.group_advantages(torch.full((8,), 0.9), 8).eq(0).all()
    assert rl.group_advantages(torch.tensor([1.0, 0.0, 5.0]), 1).eq(0).all()   # groups of one: 0
    with pytest.raises(ValueError):
        rl.group_advantages(torch.zeros(5), 2)


def test_filter_groups():
    keep = rl.filter_groups(torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]), 4)
    assert keep.tolist() == [False, False, True]
    assert rl.filter_groups(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]


def test_overlong_penalty_and_truncation_mask():
    pen = rl.overlong_penalty(torch.tensor([50, 80, 90, 100, 120]), max_len=100, cache_len=20)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError):
        rl.overlong_penalty([1], max_len=10, cache_len=0)
    tm = rl.truncation_mask(torch.tensor([True, False]))
    assert tm.tolist() == [0.0, 1.0]
    logp, old, adv, mask = two_row_case()                        # drop row 1 (truncated)
    loss, stats = rl.policy_loss(logp, old, adv, mask * tm[:, None])
    assert close(loss, 2.9 / 3) and stats["n_seqs"].item() == 1 and stats["n_tokens"].item() == 3


def test_kl_estimators_hand_case_and_unbiasedness():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert close(rl.kl_estimate(logp, ref, "k1"), 1.0)
    assert close(rl.kl_estimate(logp, ref, "k2"), 0.5)
    assert close(rl.kl_estimate(logp, ref, "k3"), 0.367879)
    # exact expectations under pi of two categorical distributions: k1 and k3 are unbiased
    pi = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    kl = (pi * (pi / q).log()).sum()
    for kind in ("k1", "k3"):
        assert close((pi * rl.kl_estimate(pi.log(), q.log(), kind)).sum(), kl, 1e-6)
    assert (rl.kl_estimate(pi.log(), q.log(), "k3") >= 0).all()
    with pytest.raises(ValueError):
        rl.kl_estimate(logp, ref, "k4")


# ----------------------------------------------------------------------------------------------
# answer and format rewards (their reading of replies and answers: tests/test_answers.py)

def test_reward_answer():
    assert rl.reward_answer(r"<think>2+2</think> \boxed{4}", "4") == 1.0
    assert rl.reward_answer(r"<think>2+2</think> \boxed{4}", 4) == 1.0
    assert rl.reward_answer(r"<think>t</think> \boxed{1} or \boxed{2}", "1") == 0.0
    assert rl.reward_answer(r"<think>\boxed{4}</think> 4", "4") == 0.0
    assert rl.reward_answer(r"<think>t</think> \boxed{}", "") == 0.0                  # empty never wins
    assert rl.reward_answer(r"<think>t</think> \boxed{\dfrac{1}{2}}", "0.5") == 1.0
    assert rl.reward_answer(r"The answer is \boxed{(C)}.", "C") == 1.0
    assert rl.reward_answer("<think>t</think> \\boxed{π}", "π") == 1.0
    assert rl.reward_answer(r"<think>t</think> \boxed{\boxed{1}+1}", "1") == 1.0          # the box opened last
    assert rl.reward_answer(r"<think>t</think> \boxed{12", "12") == 0.0                   # an unclosed box


@pytest.mark.parametrize("text,want", [
    (r"<think>reasoning</think> so \boxed{1}", 1.0),
    ("\n <think>reasoning</think>\\boxed{1}", 1.0),
    (r"<think>a</think><think>b</think> \boxed{1}", 0.0),                     # two think blocks
    (r"<think>a</think> \boxed{1} </think>", 0.0),
    ("<think> \n </think> \\boxed{1}", 0.0),                                  # empty thinking
    (r"<think>reasoning</think> the answer is 1", 0.0),                       # missing box
    (r"\boxed{1} <think>reasoning</think>", 0.0),                             # box before think
    (r"<think>reasoning \boxed{1}</think> 1", 0.0),                           # box only in thinking
    (r"The answer is \boxed{1}", 0.0),                                        # no think block
    (r"<think>reasoning \boxed{1}", 0.0),                                     # unclosed think
    (r"<think>reasoning</think> \boxed{1", 0.0),                              # unclosed box
])
def test_reward_format(text, want):
    assert rl.reward_format(text) == want


# ----------------------------------------------------------------------------------------------
# hostile inputs: every reward is linear; the adversarial regex case must stay fast

def best_of_3(fn, text, bound):
    """The best of up to 3 timed runs (stops at the first run under `bound`: noise only slows)."""
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - t)
        if best < bound:
            break
    return best


REWARDS = {"answer": lambda s: rl.reward_answer(s, "1"), "format": rl.reward_format,
           "think": rl.think_consistency, "judge": lambda s: rl.reference_judge(s, s),
           "judge_f1": lambda s: rl.reference_judge(s, s, metric="word_f1")}

@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_are_fast(name):
    text = HOSTILE[name]
    for kind, fn in REWARDS.items():
        t = best_of_3(fn, text, 0.5)
        assert t < 0.5, (name, kind, t)


def test_adversarial_think_box_pattern_under_50ms():
    """The string that makes the `<think>.*</think>.*\\boxed{.*}` regex take ~40 s (a backtracking
    engine tries every split of the `.*`s)."""
    text = "<think>" + "a</think>" * 3000 + "\\boxed{" * 3000
    assert len(text) > 30000
    for kind, fn in REWARDS.items():
        if kind in ("answer", "format", "think"):
            assert best_of_3(fn, text, 0.05) < 0.05, kind
    assert rl.reward_format(text) == 0.0 and rl.reward_answer(text, "a") == 0.0


# ----------------------------------------------------------------------------------------------
# mixed rewards (§4.2.5)

def test_think_consistency():
    assert rl.think_consistency(r"<think>3 + 4 = 7</think> \boxed{7}") == 1.0
    assert rl.think_consistency(r"<think>3 + 4 = 7</think> \boxed{8}") == 0.0
    assert rl.think_consistency(r"<think>2 red and 3 blue, so 5 shapes.</think> \boxed{5}") == 1.0
    assert rl.think_consistency(r"<think>half of 1 is 0.50</think> \boxed{\frac{1}{2}}") == 1.0
    assert rl.think_consistency(r"<think>10 * 100 = 1,000</think> \boxed{1000}") == 1.0
    assert rl.think_consistency(r"<think>7 - 12 = -5</think> \boxed{-5}") == 1.0
    assert rl.think_consistency(r"<think>no numbers here</think> \boxed{5}") == 0.0
    assert rl.think_consistency(r"<think>3 + 4 = 7</think> the answer is 7") == 0.0    # no box
    assert rl.think_consistency(r"3 + 4 = 7 \boxed{7}") == 0.0                          # no think
    # a word answer (chart: "Which fruit has the largest value?") must be named by the thinking
    assert rl.think_consistency(r"<think>pear 3, fig 9, kiwi 4: largest is 9, Fig.</think> \boxed{fig}") == 1.0
    assert rl.think_consistency(r"<think>pear 3, fig 9, kiwi 4: largest is 9.</think> \boxed{kiwi}") == 0.0
    # a whole word, not a piece of another one ("pear" in "appears", "cat" in "indicates")
    assert rl.think_consistency(r"<think>pear 3, fig 9: the largest appears to be fig.</think> \boxed{pear}") == 0.0
    assert rl.think_consistency(r"<think>cat 3, dog 9: 9 indicates dog.</think> \boxed{cat}") == 0.0
    assert rl.think_consistency(r"<think>3, 9: the end</think> \boxed{e}") == 0.0
    assert rl.think_consistency(r"<think>red 3, green apple 9: so green apple.</think> \boxed{Green Apple}") == 1.0
    word = "a" * 20000          # the word branch's search on a long answer and a long thinking: linear
    assert best_of_3(rl.think_consistency, f"<think>9 {(word + 'b ') * 50} {word}</think> \\boxed{{{word} {word}}}",
                     0.05) < 0.05
    loop = "<think>" + "let me check the sum again " * 30 + "so 3 + 4 = 7</think> \\boxed{7}"
    assert rl.think_consistency(loop) == 0.0                                             # degenerate
    # repetition_ratio by hand: 4-grams of "a b c d a b c d": abcd bcda cdab dabc abcd -> 1 - 4/5
    assert close(rl.repetition_ratio("a b c d a b c d"), 0.2)
    assert rl.repetition_ratio("a b c") == 0.0
    assert rl.repetition_ratio("x " * 100) > 0.95


def test_reference_judge_binarises_rouge_l_or_word_f1():
    assert rl.reference_judge("a b c d", "d c b a") == 0.0                        # ROUGE-L 0.25 < 0.5
    assert rl.reference_judge("a b c d", "d c b a", metric="word_f1") == 1.0       # word-F1 1.0
    assert close(rl.reference_judge("a b c d", "d c b a", threshold=None), 0.25)


def test_mixed_reward_weights():
    assert close(rl.mixed_reward(1.0, 0.0, 1.0, weights=(0.5, 0.3, 0.2)), 0.7)
    judge: rl.ThinkJudge = lambda question, thinking, answer, reference: 0.5    # the judge interface
    think = judge("q", "t", "a", "r")
    out = rl.mixed_reward(torch.tensor([1.0, 0.0]), think, torch.tensor([1.0, 1.0]), weights=(0.6, 0.2, 0.2))
    assert torch.allclose(out, torch.tensor([0.9, 0.3]))
    assert close(rl.mixed_reward(1.0, 1.0, 1.0), 1.0)                          # default weights sum to 1
    for bad in ((0.5, 0.5, 0.5), (0.3, 0.3, 0.3), (1.2, -0.1, -0.1), (0.5, 0.5)):
        with pytest.raises(ValueError, match="sum"):
            rl.mixed_reward(1.0, 1.0, 1.0, weights=bad)


def test_rl_compare_pairs_two_outputs_on_the_after_side(tmp_path, capsys):
    """tests/rl_compare.py: A - B of the "after" side on the same prompts (before rows ignored)."""
    import rl_compare
    for name, right in (("a", [1, 1, 0, 0]), ("b", [0, 1, 0, 0])):
        (tmp_path / name).mkdir()
        rows = [{"side": side, "family": "count_cot", "where": f"f:{i}", **{m: float(x if side == "after" else 1)
                 for m in rl_compare.METRICS}} for side in ("before", "after") for i, x in enumerate(right)]
        (tmp_path / name / "heldout_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rl_compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "4 prompts" in out and "pass@1       +0.250" in out, out


# ----------------------------------------------------------------------------------------------
# mutation-review additions: the logged KL's direction, the judge-free think reward of rl-mixed

def test_policy_loss_logs_approx_kl_of_pi_old_from_pi_by_hand():
    """stats["approx_kl"] is k3 of KL(pi_old || pi) with r = pi / pi_old per token: (r - 1) - log r.
    Two valid tokens, pi 0.5 / pi_old 0.25 (r = 2) and pi = pi_old = 0.3 (r = 1), one padding token:
    (1 - ln 2 + 0) / 2 = 0.153426. The other direction (r = pi_old / pi = 0.5) would give
    (-0.5 + ln 2) / 2 = 0.096574; unclamped GSPO-token and GSPO log it the same way."""
    logp = torch.tensor([[0.5, 0.3, 0.9]]).log().requires_grad_(True)
    old = torch.tensor([[0.25, 0.3, 0.1]]).log()
    mask = torch.tensor([[True, True, False]])
    for algo in ALGOS:
        _, stats = rl.policy_loss(logp, old, torch.tensor([1.0]), mask, algo=algo)
        assert close(stats["approx_kl"], (1 - math.log(2)) / 2), algo
    # one token, r = 1/2 (pi halved): (0.5 - 1) + ln 2 = 0.193147 (the other direction: 1 - ln 2)
    _, stats = rl.policy_loss(torch.tensor([[0.2]]).log(), torch.tensor([[0.4]]).log(), torch.tensor([1.0]),
                              torch.tensor([[True]]))
    assert close(stats["approx_kl"], math.log(2) - 0.5)


def test_mixed_think_reward_without_a_judge_is_one_for_a_chain_that_does_not_loop():
    """rl-mixed, no --judge, a family whose think reward is not the arithmetic check (caption_qa,
    ocr: not rl.NUMERIC_FAMILIES): 1 for a non-empty thinking whose word 4-grams repeat less than
    half the time, else 0. By hand: "the circle is red" x 10 has 37 4-grams, 4 distinct: ratio 0.89
    -> 0 ("queen" x 12: 9 4-grams, 1 distinct, 0.89 -> 0); "a b c" x 3 has 6 4-grams, 3 distinct:
    ratio exactly 0.5 -> 0 (below 0.5 only); chains of different words: ratio 0 -> 1. Every reply
    is right and well-formed, so reward = 0.8 + 0.1 x think + 0.1."""
    cfg = rl.RLConfig(reward="mixed")
    assert cfg.reward_weights == (0.8, 0.1, 0.1)
    assert "caption_qa" not in rl.NUMERIC_FAMILIES and "ocr" not in rl.NUMERIC_FAMILIES

    def roll(thinking, answer, family):
        return rl.Rollout(rl.Prompt([], None, answer, family, "x:1"), [], f"<think>\n{thinking}\n</think>\n"
                          f"The answer is \\boxed{{{answer}}}.", False, [])
    chains = [("the circle is red " * 10, "red", "caption_qa"), ("a b c " * 3, "red", "caption_qa"),
              ("I look at the only circle in the image and its fill colour reads red", "red", "caption_qa"),
              ("queen " * 12, "queen", "ocr"), ("the letters spell q u e e n so the word is queen", "queen", "ocr")]
    rolls = [roll(*c) for c in chains]
    assert [round(rl.repetition_ratio(t), 2) for t, _, _ in chains] == [0.89, 0.5, 0.0, 0.89, 0.0]
    rl.score_rollouts(rolls, cfg)
    assert [r.answer_r for r in rolls] == [1.0] * 5 and [r.format_r for r in rolls] == [1.0] * 5
    assert [r.think_r for r in rolls] == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert [r.reward for r in rolls] == pytest.approx([0.9, 0.9, 1.0, 0.9, 1.0])


# ----------------------------------------------------------------------------------------------
# mutation-review additions (round 2): bounds and edge cases of the shaping, KL and think rewards

def test_overlong_penalty_accepts_a_cache_as_long_as_the_limit():
    """cache_len == max_len is allowed (0 < cache_len <= max_len): the soft penalty then runs from
    length 0, -L / max_len, down to -1 at the limit. By hand with max_len = cache_len = 100:
    L = 0 -> 0, 50 -> -0.5, 100 -> -1, 130 -> -1 (clamped)."""
    pen = rl.overlong_penalty([0, 50, 100, 130], max_len=100, cache_len=100)
    assert torch.allclose(pen, torch.tensor([0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError):
        rl.overlong_penalty([1], max_len=100, cache_len=101)


def test_k3_clamps_the_log_ratio_at_20_before_the_exp():
    """k3 = exp(log r) - 1 - log r with log r = ref_logp - logp clamped to [-20, 20] (as verl does),
    so a token the reference all but rules out, or one it all but insists on, gives a finite bound.
    By hand: log r = -50 -> e^-20 - 1 + 20 = 19.000000002 (unclamped: 49); log r = +50 ->
    e^20 - 1 - 20 = 485165174.4 (unclamped: 5.2e21)."""
    kl = rl.kl_estimate(torch.tensor([0.0, 0.0]), torch.tensor([-50.0, 50.0]), "k3")
    assert close(kl[0], math.exp(-20) - 1 + 20, 1e-4)
    assert abs(kl[1].item() - (math.exp(20) - 21)) / (math.exp(20) - 21) < 1e-5


def test_think_consistency_refuses_a_loop_at_exactly_the_repetition_bound():
    """A thinking whose word 4-gram repetition ratio reaches max_repetition (0.5) is a loop: 0.0,
    even when its last number is the boxed one; just below the bound it counts. By hand:
    "x 7 x 7 x 7 x" has 4 four-grams, 2 distinct: ratio 0.5 -> 0.0; "x 7 x 7 x 7 y" has 3 distinct
    of 4: ratio 0.25 -> 1.0."""
    assert rl.repetition_ratio("x 7 x 7 x 7 x") == 0.5
    assert rl.think_consistency(r"<think>x 7 x 7 x 7 x</think> \boxed{7}") == 0.0
    assert rl.think_consistency(r"<think>x 7 x 7 x 7 y</think> \boxed{7}") == 1.0
    assert rl.think_consistency(r"<think>x 7 x 7 x 7 y</think> \boxed{7}", max_repetition=0.25) == 0.0


def test_a_word_answer_named_by_a_thinking_without_numbers_counts():
    """A chart's word answer when the thinking states no number at all: any whole-word mention of
    the answer counts, its first word included ("fig" is word 0 of the chain; there is no last
    number for it to follow)."""
    assert rl.think_consistency(r"<think>fig is the tallest bar and pear is short</think> \boxed{fig}") == 1.0
    assert rl.think_consistency(r"<think>Fig</think> \boxed{fig}") == 1.0
    assert rl.think_consistency(r"<think>the tallest bar is kiwi</think> \boxed{fig}") == 0.0


def test_reference_judge_passes_a_score_of_exactly_the_threshold():
    """Binarised at `threshold` inclusively (score >= 0.5). By hand: "red circle" vs "red square":
    LCS 1 word, ROUGE-L = 2 * 1 / (2 + 2) = 0.5, word-F1 = 2 * 1 / 4 = 0.5 -> 1.0 for both;
    "red big circle" vs "red square": 2 * 1 / 5 = 0.4 -> 0.0."""
    assert rl.reference_judge("red circle", "red square") == 1.0
    assert rl.reference_judge("red circle", "red square", metric="word_f1") == 1.0
    assert rl.reference_judge("red big circle", "red square") == 0.0
    assert rl.reference_judge("red circle", "red square", threshold=0.6) == 0.0


def mixed_roll(text, answer, family="caption_qa", question=""):
    return rl.Rollout(rl.Prompt([], None, answer, family, "x:1", True, question), [], text, False, [])


def test_mixed_think_reward_of_an_empty_thinking_is_zero_and_the_judge_is_not_asked():
    """rl-mixed, a family the judge (or the no-judge rule) grades: a `<think>` block holding only
    whitespace earns think 0 without asking the judge, and format 0 (reward_format wants a non-empty
    thinking). Right answer: reward = 0.8 x 1 + 0.1 x 0 + 0.1 x 0 = 0.8, with or without a judge
    (the no-judge rule would otherwise give an empty chain, which repeats nothing, think 1)."""
    cfg = rl.RLConfig(reward="mixed")
    asked = []
    for judge in (None, lambda *a: asked.append(a) or 1.0):
        r = mixed_roll("<think>\n  \n</think>\nThe answer is \\boxed{red}.", "red")
        rl.score_rollouts([r], cfg, judge)
        assert (r.answer_r, r.format_r, r.think_r) == (1.0, 0.0, 0.0)
        assert r.reward == pytest.approx(0.8)
    assert asked == []


def test_the_judge_is_given_the_rollouts_answer_and_then_the_reference():
    """ThinkJudge's order: judge(question, thinking, answer, reference): the answer is the rollout's
    boxed one, the reference the prompt's ground truth (a wrong answer must not be graded as the
    reference). Its score is the think term: 0.8 x 0 + 0.1 x 0.25 + 0.1 x 1 = 0.125."""
    seen = []
    r = mixed_roll("<think>\nlook\n</think>\n\\boxed{square}", "a circle", question="What is shown?")
    rl.score_rollouts([r], rl.RLConfig(reward="mixed"), lambda q, t, a, ref: seen.append((q, t, a, ref)) or 0.25)
    assert seen == [("What is shown?", "\nlook\n", "square", "a circle")]
    assert (r.answer_r, r.think_r) == (0.0, 0.25) and r.reward == pytest.approx(0.125)
