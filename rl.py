"""Reinforcement learning of SAIL-VL2: verifiable rewards, DAPO and GSPO, mixed rewards (paper §4.2.3, §4.2.5).

§4.2.3 (RL with verifiable rewards) trains the LongCoT model on 70K math, puzzle, science, OCR and
counting prompts with two binary rewards, the answer (the `\\boxed{}` answer is correct) and the
format (`<think>` tags). Dense models use DAPO (arXiv 2503.14476), the MoE model GSPO
(arXiv 2507.18071). §4.2.5 (RL with mixed rewards) adds a "think" reward from a judge of the
reasoning and a judge for answers that rules cannot check; the coefficients of the rewards sum to
1. The file reads in that order:

  1. Verifiable rewards  `reward_answer` (the final `\\boxed{}` answer against the ground truth,
                         by data.py's grading API), `reward_format`.
  2. Group advantages    `group_advantages`: (r - mean) / (std + eps) in each prompt's group.
  3. Dynamic sampling    `filter_groups`: DAPO keeps groups whose rewards are not all equal.
  4. Overlong shaping    `overlong_penalty`, `truncation_mask` (off by default: not in the paper).
  5. Policy loss         `policy_loss`: DAPO, GSPO, GSPO-token; aggregation that does not depend
                         on how the rollout batch is split into micro-batches and ranks.
  6. KL estimators       `kl_estimate` (k1 / k2 / k3); off in the stages (DAPO and GSPO drop KL).
  7. Mixed rewards       `ThinkJudge`, `think_consistency`, `reference_judge`, `mixed_reward`;
                         a model judge is marked for later.
  8. Rollouts, updates and the `rl-verifiable` / `rl-mixed` stages follow the pure functions.

Every reward function is linear in its input: no regex with nested quantifiers over unbounded
text, no `signal.alarm` (it fails off the main thread), no sympy.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional, Protocol

import numpy as np
import torch

import data
import model as M
import packing
import sample
import train_stage as T
from data import answers_match, clean_answer, final_answer, last_boxed, split_think
from data import parse_number as _parse_number

# ----------------------------------------------------------------------------------------------
# 1. Verifiable rewards (§4.2.3): answer and format, both binary
#
# Replies are read and answers compared with the project's one grading API, data.py section 8
# (the evaluation in sample.py uses the same): the answer is the last balanced `\boxed{...}` after
# `</think>` (the box opened last: `\boxed{\boxed{1}+1}` answers 1, as for math-verify); a box
# inside the thinking is no final answer; a direct-mode reply without think tags is all answer;
# one that opened `<think>` and never closed it has none. Two answers agree by `answers_match`, a
# normaliser held to math-verify 0.9.0 (never equal where math-verify says different).

def reward_format(text: str) -> float:
    """1.0 if the completion is exactly `<think>T</think> ... \\boxed{A} ...` with non-empty T
    (leading whitespace allowed; one think block only; the box after `</think>`), else 0.0."""
    s = text.lstrip()
    if not s.startswith("<think>") or s.count("<think>") != 1 or s.count("</think>") != 1:
        return 0.0
    close = s.find("</think>")
    if not s[len("<think>"):close].strip():
        return 0.0
    return float(last_boxed(s[close + len("</think>"):]) is not None)


def reward_answer(text: str, ground_truth) -> float:
    """1.0 if the final `\\boxed{}` answer of `text` agrees with `ground_truth`, else 0.0."""
    pred = final_answer(text)
    return float(pred is not None and answers_match(pred, str(ground_truth)))


# ----------------------------------------------------------------------------------------------
# 2. Group advantages (GRPO, as DAPO and GSPO use them): A_i = (R_i - mean R) / (std R + eps)

def group_advantages(rewards, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """rewards (N,) laid out group after group (N = n_groups * group_size) -> advantages (N,).
    std is Bessel's (unbiased), as verl and TRL use. Policy: a group of one and a group whose
    rewards are all equal get advantage exactly 0 (verl would give a singleton its raw reward)."""
    r = torch.as_tensor(rewards)
    r = r if r.is_floating_point() else r.float()
    if group_size < 1 or r.dim() != 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)                                   # (n_groups, G)
    if group_size == 1:
        return torch.zeros_like(r)
    adv = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)
    flat = (g.amax(-1, keepdim=True) == g.amin(-1, keepdim=True))  # (n_groups, 1); float32 would
    # otherwise leave e.g. eight rewards of 0.9 with advantages of -0.056 (mean != 0.9 in float32)
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)


# ----------------------------------------------------------------------------------------------
# 3. Dynamic sampling (DAPO): resample until the batch holds groups with a learning signal

def filter_groups(rewards, group_size: int) -> torch.Tensor:
    """bool (n_groups,): True for groups whose rewards are not all equal (0 < #correct < G for
    binary rewards). A group of one is all-equal, so it is dropped (its advantage is 0)."""
    g = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return g.amax(-1) != g.amin(-1)


# ----------------------------------------------------------------------------------------------
# 4. Overlong shaping and filtering (DAPO §3.4); optional, the paper mentions neither

def overlong_penalty(lengths, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 for L <= max_len - cache_len,
    ((max_len - cache_len) - L) / cache_len in between, -1 for L >= max_len."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    L = torch.as_tensor(lengths, dtype=torch.float32)
    return ((max_len - cache_len - L) / cache_len).clamp(-1.0, 0.0)


def truncation_mask(truncated) -> torch.Tensor:
    """float (B,): 0 for completions cut at the length limit, 1 otherwise. Multiply it into the
    loss mask (`mask * truncation_mask(t)[:, None]`) to drop truncated completions from the loss
    (TRL's mask_truncated_completions); their rows then count as neither tokens nor sequences."""
    return 1.0 - torch.as_tensor(truncated).float()


# ----------------------------------------------------------------------------------------------
# 5. Policy loss: DAPO (dense models) and GSPO (MoE), §4.2.3
#
#   DAPO  r_it = pi(y_t) / pi_old(y_t);  L_it = max(-A r_it, -A clip(r_it, 1-lo, 1+hi)),
#         lo / hi = 0.2 / 0.28 ("clip-higher"), token-level mean over the whole rollout batch.
#   GSPO  s_i = exp(mean_t log r_it) (length-normalised sequence ratio), the same clipped
#         objective per sequence, lo / hi = 3e-4 / 4e-4, mean over sequences.
#   GSPO-token  s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]: value s_i on every token, gradient of a
#         per-token ratio, so advantages may be per token; equal to GSPO for per-sequence ones.
# The paper's "clip dynamically adjusted within [0.20, 0.28]" is per-token scale: it would rarely
# clip a sequence ratio, so GSPO keeps its own published range (pass clip_low/high to change it).
#
# Aggregation ("agg"), N = n_global:
#   token-mean               sum_it m L / N_tokens                       (DAPO)
#   seq-mean-token-mean      sum_i (sum_t m L / |y_i|) / N_seqs          (GSPO; token-mean would
#                            weight GSPO's sequence losses by length, TRL #3823)
#   seq-mean-token-sum-norm  sum_i (sum_t m L / norm_len) / N_seqs       (Dr.GRPO, arXiv 2503.20783;
#                            norm_len defaults to T, so pass the max response length when
#                            micro-batches are padded to different widths)
# With n_global = the count over the whole rollout batch, the losses (and gradients) of any split
# into micro-batches and ranks sum to those of the whole batch. DDP/FSDP average gradients over
# ranks, so there multiply the loss by the world size. Rows without valid tokens count as neither.

CLIP_DEFAULTS = {"dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4)}
AGG_DEFAULTS = {"dapo": "token-mean", "gspo": "seq-mean-token-mean", "gspo_token": "seq-mean-token-mean"}
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def loss_normalizer(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """The local count that `n_global` totals: valid tokens (token-mean) or non-empty rows."""
    m = mask.bool()                                               # (B, T)
    return m.sum() if agg == "token-mean" else m.any(-1).sum()


def _clipped_objective(ratio, adv, lo, hi, clip_c):
    """PPO's pessimistic clipped loss (elementwise) and where each clip is active."""
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - lo, 1 + hi))
    clipped = {"low": (ratio < 1 - lo) & (adv < 0), "high": (ratio > 1 + hi) & (adv > 0)}
    clipped["dual"] = torch.zeros_like(clipped["low"])
    if clip_c is not None:                                        # dual-clip: bound -A r at -A c for A < 0
        clipped["dual"] = (adv < 0) & (loss > -adv * clip_c)
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    return loss, clipped


def _masked_mean(x, m):
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp_min(1)


def policy_loss(logp, old_logp, advantages, mask, algo="dapo", clip_low=None, clip_high=None,
                agg=None, n_global=None, clip_c=None, norm_len=None):
    """(loss, stats) of one micro-batch. logp (B, T) with grad, old_logp (B, T), mask (B, T) bool
    or 0/1, advantages (B,) / (B, 1) per sequence or (B, T) per token (not for "gspo"). Defaults:
    clips and agg from CLIP_DEFAULTS / AGG_DEFAULTS; n_global None = this batch's own count
    (`loss_normalizer`); clip_c None = no dual-clip; norm_len None = T (sum-norm only).
    stats, detached 0-dim tensors over this call's valid units (tokens; sequences for "gspo"):
    clip_frac_low / clip_frac_high (the clipped branch is active: r < 1-lo with A < 0, r > 1+hi
    with A > 0), clip_frac_dual, ratio_mean, approx_kl (per-token k3 = (r - 1) - log r with
    r = pi/pi_old: KL(pi_old || pi) on the rollout tokens), n_tokens and n_seqs (to weight them)."""
    if algo not in CLIP_DEFAULTS:
        raise ValueError(f"algo must be one of {tuple(CLIP_DEFAULTS)}, got {algo!r}")
    agg = agg or AGG_DEFAULTS[algo]
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if clip_c is not None and clip_c <= 1:
        raise ValueError(f"dual-clip constant must be > 1, got {clip_c}")
    lo = CLIP_DEFAULTS[algo][0] if clip_low is None else clip_low
    hi = CLIP_DEFAULTS[algo][1] if clip_high is None else clip_high
    m = mask.bool()                                               # (B, T)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(m, logp, zero)                             # padding may hold -inf: gradient 0
    old_logp = torch.where(m, old_logp.detach().to(logp.dtype), zero)
    adv = torch.as_tensor(advantages, device=logp.device).detach().to(logp.dtype)
    adv = adv[:, 0] if adv.dim() == 2 and adv.shape[1] == 1 else adv           # (B, 1) -> (B,)
    if algo == "gspo" and adv.dim() != 1:
        raise ValueError("gspo takes one advantage per sequence, shape (B,); use gspo_token for (B, T)")
    adv_tok = torch.where(m, adv[:, None] if adv.dim() == 1 else adv, zero)   # (B, T)
    adv_seq = torch.where(m.any(-1), adv, zero) if adv.dim() == 1 else None   # (B,)
    log_ratio = logp - old_logp                                   # (B, T), 0 on padding
    lens = m.sum(-1)                                              # (B,)
    seq_log_ratio = log_ratio.sum(-1) / lens.clamp_min(1)         # (B,) mean_t log r_it

    if algo == "dapo":
        ratio = log_ratio.clamp(-20, 20).exp()                    # (B, T)
        tok_loss, clipped = _clipped_objective(ratio, adv_tok, lo, hi, clip_c)
        units = m
    elif algo == "gspo":
        ratio = seq_log_ratio.clamp(-20, 10).exp()                # (B,) s_i
        seq_loss, clipped = _clipped_objective(ratio, adv_seq, lo, hi, clip_c)
        tok_loss, units = seq_loss[:, None].expand_as(logp), m.any(-1)
    else:
        log_s = logp - logp.detach() + seq_log_ratio.detach()[:, None]
        ratio = log_s.clamp(-20, 10).exp()                        # (B, T), value s_i, token gradient
        tok_loss, clipped = _clipped_objective(ratio, adv_tok, lo, hi, clip_c)
        units = m

    tok_loss = torch.where(m, tok_loss, zero)                     # (B, T)
    n = loss_normalizer(m, agg) if n_global is None else n_global
    n = torch.as_tensor(n, dtype=logp.dtype, device=logp.device).clamp_min(1)
    if agg == "token-mean":
        loss = tok_loss.sum() / n
    else:
        per_row = lens.clamp_min(1) if agg == "seq-mean-token-mean" else (norm_len or logp.shape[-1])
        loss = (tok_loss.sum(-1) / per_row).sum() / n

    with torch.no_grad():
        lr = log_ratio.clamp(-20, 20)
        stats = {f"clip_frac_{k}": _masked_mean(v.to(logp.dtype), units) for k, v in clipped.items()}
        stats["ratio_mean"] = _masked_mean(ratio.detach(), units)
        stats["approx_kl"] = _masked_mean(lr.exp() - 1 - lr, m)
        stats["n_tokens"], stats["n_seqs"] = m.sum(), m.any(-1).sum()
    return loss, stats


# ----------------------------------------------------------------------------------------------
# 6. KL estimators (Schulman, "Approximating KL divergence"); optional, off in the stages

def kl_estimate(logp, ref_logp, kind: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(pi || ref) from tokens sampled from pi. With r = ref / pi:
    k1 = -log r = logp - ref_logp (unbiased, can be negative), k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r (unbiased, >= 0; log r clamped to +-20 before exp, as verl does)."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        log_r = log_r.clamp(-20, 20)
        return log_r.exp() - 1 - log_r
    raise ValueError(f"kind must be k1, k2 or k3, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# 7. Mixed rewards (§4.2.5): answer (rules or a judge), think (a judge of the reasoning), format,
#    combined with coefficients that sum to 1

class ThinkJudge(Protocol):
    """A judge of the reasoning: judge(question, thinking, answer, reference) -> score in [0, 1]."""
    def __call__(self, question: str, thinking: str, answer: str, reference: str) -> float: ...


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 = none, near 1 = a loop)."""
    words = text.split()
    total = len(words) - n + 1
    return 0.0 if total <= 0 else 1.0 - len(set(zip(*(words[i:] for i in range(n))))) / total


def think_consistency(text: str, max_repetition: float = 0.5) -> float:
    """Think reward for the synthetic arithmetic / counting tasks: 1.0 when the last number the
    thinking derives equals the boxed answer and the thinking is no loop (repetition_ratio of its
    word 4-grams below `max_repetition`), else 0.0. Linear in the length of `text`."""
    parts = split_think(text)
    if parts is None:
        return 0.0
    thinking, region = parts
    boxed, derived = last_boxed(region), data.last_number(thinking)
    if boxed is None or derived is None or repetition_ratio(thinking) >= max_repetition:
        return 0.0
    return float(answers_match(derived, boxed))


def reference_judge(answer: str, reference: str, metric: str = "rouge_l", threshold: Optional[float] = 0.5) -> float:
    """Rule-based judge of an unverifiable answer against a reference answer: ROUGE-L or word-F1,
    binarised at `threshold` (the paper's rewards are binary); threshold=None returns the score."""
    score = {"rouge_l": data.rouge_l, "word_f1": data.word_f1}[metric](answer, reference)
    return score if threshold is None else float(score >= threshold)


DEFAULT_MIXED_WEIGHTS = (0.8, 0.1, 0.1)     # answer, think, format: our choice, the paper gives none


def mixed_reward(answer, think, fmt, weights=DEFAULT_MIXED_WEIGHTS):
    """w_a * answer + w_t * think + w_f * format (floats or tensors); the three weights must be
    non-negative and sum to 1 (§4.2.5), otherwise ValueError."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or min(w) < 0 or not math.isclose(sum(w), 1.0, abs_tol=1e-6):
        raise ValueError(f"mixed_reward weights (answer, think, format) must be 3 non-negative "
                         f"numbers summing to 1, got {weights}")
    return w[0] * answer + w[1] * think + w[2] * fmt


# A model judge (§4.2.5's "LVM judge") scores with any of our checkpoints: `ModelJudge` in section
# 9, after the rollout machinery it shares.


# ==============================================================================================
# 8. Rollouts (§4.2.3): G samples per prompt from the policy, batched, with the KV cache
#
# Temperature 1 and no top-k / top-p by default, so rollout and training log-probs come from the
# same distribution; a row stops at <|im_end|> / <|endoftext|>, and one that reaches the token
# limit is recorded as truncated. Every prompt's image is encoded once and its embedding repeated
# for its G rows.



@dataclass(eq=False)                      # compared by identity (pixels are tensors)
class Prompt:
    """One RL prompt: its token ids (ending in the assistant header), pixels, answer and family."""
    ids: list
    pixels: object
    answer: Optional[str]
    family: str
    where: str


@dataclass(eq=False)
class Rollout:
    prompt: Prompt
    completion: list             # generated ids, the stop token included when there was one
    text: str                    # the completion decoded (without the stop token)
    truncated: bool
    rollout_logp: list           # per token, from the sampling distribution
    reward: float = 0.0
    answer_r: float = 0.0
    format_r: float = 0.0
    think_r: float = 0.0
    advantage: float = 0.0


def banned_ids(tok) -> tuple:
    """Tokens the policy never emits: the image tokens (a completion is fed back, and an image slot
    without an image breaks it). The policy is the LM restricted to the other tokens, in the
    rollouts and in the training forward alike, so the two log-probs agree."""
    ids = data.special_ids(tok)
    return ids.img_context, ids.img_start, ids.img_end


def rollouts(model, tok, prompts: list, group_size: int, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, generator=None, batch_rows: int = 64) -> list:
    """group_size completions per prompt, prompt after prompt (the layout group_advantages reads)."""
    stop, banned = sample.stop_ids(tok), banned_ids(tok)
    out = []
    per_call = max(1, batch_rows // group_size)
    with torch.inference_mode():
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            flat = torch.tensor([t for p in chunk for t in p.ids])[None]
            embeds = model.embed(flat, sample.concat_pixels([p.pixels for p in chunk]))[0]   # (sum L, H)
            rows = [e for e in embeds.split([len(p.ids) for p in chunk]) for _ in range(group_size)]
            lps = []
            gen = M.generate_from_embeds(model.language_model, rows, max_new_tokens, temperature, top_p, stop,
                                         generator, n_valid_tokens=tok.n_vocab, logprobs=lps, banned=banned)
            for k, (ids, lp) in enumerate(zip(gen, lps)):
                p = chunk[k // group_size]
                done = bool(ids) and ids[-1] in stop
                out.append(Rollout(p, ids, sample.decode_reply(tok, ids, stop), not done, lp))
    return out


def checkable(answer: str) -> bool:
    """A ground truth the rules can check: a number or a single word."""
    return _parse_number(clean_answer(answer)) is not None or len(answer.split()) == 1


def score_rollouts(rolls: list, reward: str, weights: tuple, judge=None) -> None:
    """Rewards in place. verifiable (§4.2.3): the answer (rules) and the format, combined with the
    weights' answer and format parts renormalised (default 0.8 / 0.1 -> 0.89 / 0.11). mixed (§4.2.5):
    w_a answer + w_t think + w_f format, where the answer is checked by rules when it is checkable
    and by the reference judge (ROUGE-L >= 0.5 against the ground truth) otherwise, and the think
    reward is `think_consistency` for the arithmetic / counting families, the model judge for the
    others when one is given (--judge), else 1 for a non-empty thinking that does not loop."""
    for r in rolls:
        r.format_r = reward_format(r.text)
        gold = r.prompt.answer or ""
        if reward == "verifiable" or checkable(gold):
            r.answer_r = reward_answer(r.text, gold)
        else:
            r.answer_r = reference_judge(final_answer(r.text) or "", gold)
        if reward == "verifiable":
            wa, _, wf = weights
            r.reward = (wa * r.answer_r + wf * r.format_r) / (wa + wf)
            continue
        parts = split_think(r.text)
        if r.prompt.family in NUMERIC_FAMILIES:
            r.think_r = think_consistency(r.text)
        elif parts is None or not parts[0].strip():
            r.think_r = 0.0
        elif judge is not None:
            r.think_r = float(judge(r.prompt.where, parts[0], final_answer(r.text) or "", gold))
        else:
            r.think_r = float(repetition_ratio(parts[0]) < 0.5)
        r.reward = mixed_reward(r.answer_r, r.think_r, r.format_r, weights)


NUMERIC_FAMILIES = ("count", "count_cot", "math", "math_direct", "chart")   # the think reward checks their arithmetic


# ==============================================================================================
# 9. The model judge (§4.2.5): any checkpoint grades a reasoning by the probability of "yes"

class ModelJudge:
    """judge(question, thinking, answer, reference) -> P(yes) / (P(yes) + P(no)) of a checkpoint
    asked a grading question (`--judge=DIR`: point it at a stronger checkpoint than the policy)."""

    PROMPT = ("Question: {q}\nReasoning: {t}\nAnswer: {a}\nReference answer: {r}\n"
              "Is the reasoning sound and does it lead to the answer? Answer yes or no.")

    def __init__(self, ckpt: str):
        self.model, self.tok, self.dcfg = sample.load(ckpt)
        self.yes, self.no = data.encode(self.tok, "yes")[0], data.encode(self.tok, "no")[0]

    @torch.no_grad()
    def __call__(self, question, thinking, answer, reference) -> float:
        text = self.PROMPT.format(q=question[:500], t=(thinking or "")[:1500], a=(answer or "")[:200],
                                  r=(reference or "")[:200])
        s = data.prompt_inputs(self.tok, self.dcfg, text)
        logits = self.model(s["input_ids"][None]).logits[0, -1].float()
        p = torch.softmax(logits[[self.yes, self.no]], -1)
        return float(p[0])


# ==============================================================================================
# 10. Updates (§4.2.3): old log-probs, mini-batches x epochs, packed micro-batches, one normaliser

def as_sample(r: Rollout) -> dict:
    """A rollout as a training sample: prompt + completion, loss positions on the completion."""
    return {"input_ids": torch.tensor(r.prompt.ids + r.completion),
            "labels": torch.tensor([-100] * len(r.prompt.ids) + r.completion), "pixel_values": r.prompt.pixels}


def micro_batches(rolls: list, max_tokens: int, img_context_id: int) -> list:
    """Packed micro-batches of rollouts: [(pack dict, [rollout index per sample])], stream order."""
    samples = [as_sample(r) for r in rolls]
    metas = [packing.sample_meta(s, i, img_context_id) for i, s in enumerate(samples)]
    plans = packing.plan_packs(metas, packing.PackingConfig(max_tokens=max_tokens, max_images_per_pack=10 ** 6,
                                                            overlong="own_pack"))
    return [(packing.collate_pack([samples[m.index] for m in p], p), [m.index for m in p]) for p in plans]


def completion_logps(model, pack: dict, device, banned=()) -> tuple:
    """Per sample of the pack: log-probs (L_i,) of its completion tokens and the mean entropy of the
    policy at those positions. A training-mode forward (no dropout in this model), the same code
    for the old log-probs and the update, so the first update's ratio is exactly 1."""
    p = T.to_device(pack, device)
    logits = model(p["input_ids"], p.get("pixel_values"), position_ids=p["position_ids"],
                   cu_seqlens=p["cu_seqlens"]).logits[0, :-1].float()            # (T-1, V)
    if banned:
        logits = logits.index_fill(1, torch.tensor(banned, device=logits.device), float("-inf"))
    targets = p["labels"][0, 1:]                                                  # (T-1,)
    logp_all = torch.log_softmax(logits, -1)
    tok_logp = logp_all.gather(1, targets.clamp_min(0)[:, None])[:, 0]           # (T-1,)
    ent = -(logp_all.exp() * logp_all.clamp_min(-1e30)).sum(-1)                  # (T-1,); 0 log 0 = 0
    keep = targets != -100
    bounds = p["cu_seqlens"].tolist()
    out, ents = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = keep[a:b - 1] if b - 1 > a else keep[a:a]
        out.append(tok_logp[a:b - 1][sel])
        ents.append(ent[a:b - 1][sel])
    return out, ents


def padded(rows: list, fill=0.0):
    """A list of 1-D tensors -> (B, T) padded matrix and its mask."""
    T_ = max(1, max(len(r) for r in rows))
    x = torch.full((len(rows), T_), fill, dtype=rows[0].dtype if rows else torch.float32)
    m = torch.zeros(len(rows), T_, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, :len(r)], m[i, :len(r)] = r, True
    return x, m


def global_count(value: float, device) -> float:
    return T.all_reduce_sum([float(value)], device)[0]


def update_episode(model, opt, params, rolls: list, cfg, device, world: int, img_context_id: int,
                   banned=()) -> dict:
    """The episode's updates: rollouts split into cfg.mini_batches mini-batches x cfg.epochs epochs
    (paper: 2048 rollouts / 512 x 2 = 8 updates), each mini-batch split into packed micro-batches
    whose losses use the mini-batch's global normaliser (all ranks), so they sum to its loss."""
    mbs = [list(range(len(rolls)))[k::cfg.mini_batches] for k in range(cfg.mini_batches)]
    mbs = [m for m in mbs if m]
    # old log-probs of the rollout policy, with the same packing the first epoch uses
    old = {}
    with torch.no_grad():
        for mb in mbs:
            for pack, idx in micro_batches([rolls[i] for i in mb], cfg.max_tokens, img_context_id):
                for j, lp in zip(idx, completion_logps(model, pack, device, banned)[0]):
                    old[mb[j]] = lp
    dlogp = max((float((torch.tensor(rolls[i].rollout_logp[:len(old[i])]) - old[i].cpu()).abs().max())
                 for i in old if len(old[i])), default=0.0)
    stats = {"clip_frac_low": 0.0, "clip_frac_high": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0, "entropy": 0.0,
             "updates": 0, "first_ratio_max_dev": None}
    agg = cfg.agg or AGG_DEFAULTS[cfg.algo]
    for epoch in range(cfg.epochs):
        order = mbs if epoch == 0 else [sorted(mb, key=lambda i: random.Random(epoch * 7919 + i).random())
                                        for mb in mbs]
        for mb_i, mb in enumerate(order):
            rows = [rolls[i] for i in mb]
            packs = micro_batches(rows, cfg.max_tokens, img_context_id)
            masks = [torch.ones(len(old[i]), dtype=torch.bool) for i in mb]
            n_local = sum(float(loss_normalizer(m[None], agg)) for m in masks)
            n_global = global_count(n_local, device)
            acc = {k: 0.0 for k in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "entropy")}
            units = 0.0
            for pack, idx in packs:
                lps, ents = completion_logps(model, pack, device, banned)
                logp, mask = padded(lps)
                old_lp, _ = padded([old[mb[j]].to(logp.device) for j in idx])
                adv = torch.tensor([rows[j].advantage for j in idx], device=logp.device)
                loss, st = policy_loss(logp, old_lp, adv, mask, cfg.algo, cfg.clip_low, cfg.clip_high, agg,
                                       n_global=n_global, clip_c=cfg.clip_c)
                (loss * world).backward()                              # FSDP averages gradients over ranks
                w = float(st["n_tokens"])
                for k in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean"):
                    acc[k] += float(st[k]) * w
                acc["entropy"] += float(sum(e.detach().sum() for e in ents))
                units += w
                if epoch == 0 and mb_i == 0:                           # the rollout policy itself: ratio 1
                    dev = float((logp.detach() - old_lp).abs().masked_fill(~mask, 0).max())
                    stats["first_ratio_max_dev"] = max(stats["first_ratio_max_dev"] or 0.0, dev)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats["updates"] += 1
            for k in acc:
                stats[k] += acc[k] / max(units, 1) / (len(order) * cfg.epochs)
    stats["dlogp"] = dlogp
    return stats


# ==============================================================================================
# 11. Dynamic sampling (§4.2.3, DAPO): zero-variance groups are dropped and more prompts drawn

def sample_groups(model, tok, pool, cfg, generator, judge=None) -> tuple:
    """Groups with a reward spread, up to cfg.prompts_per_episode, drawing fresh prompts from the
    pool for at most cfg.max_sampling_rounds rounds; then training goes on with what is there
    (logged), never an exception. Returns (rollouts of the kept groups, stats)."""
    kept, seen, all_rolls = [], 0, []
    for _ in range(cfg.max_sampling_rounds):
        need = cfg.prompts_per_episode - len(kept) // cfg.group_size
        if need <= 0:
            break
        prompts = pool.take(need)
        rolls = rollouts(model, tok, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                         generator, cfg.batch_rows)
        score_rollouts(rolls, cfg.reward, cfg.reward_weights, judge)
        all_rolls += rolls
        rewards = torch.tensor([r.reward for r in rolls])
        keep = filter_groups(rewards, cfg.group_size)
        seen += len(prompts)
        for g, ok in enumerate(keep.tolist()):
            if ok:
                kept += rolls[g * cfg.group_size:(g + 1) * cfg.group_size]
    kept = kept[:cfg.prompts_per_episode * cfg.group_size]
    if kept:
        adv = group_advantages(torch.tensor([r.reward for r in kept]), cfg.group_size)
        for r, a in zip(kept, adv.tolist()):
            r.advantage = a
    n = max(1, len(all_rolls))
    stats = {"reward": sum(r.reward for r in all_rolls) / n, "acc": sum(r.answer_r for r in all_rolls) / n,
             "fmt": sum(r.format_r for r in all_rolls) / n, "think": sum(r.think_r for r in all_rolls) / n,
             "kept": len(kept) // cfg.group_size, "groups": seen,
             "len": sum(len(r.completion) for r in all_rolls) / n,
             "trunc": sum(r.truncated for r in all_rolls) / n}
    return kept, stats


class PromptPool:
    """The stage's prompts, read once from its mixture (and pass@k-filtered when asked), then
    handed out in a seeded order, epoch after epoch; its cursor is saved with checkpoints."""

    def __init__(self, prompts: list, seed: int):
        self.prompts, self.seed, self.pos = prompts, seed, 0

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            epoch, k = divmod(self.pos, len(self.prompts))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))
            out.append(self.prompts[order[k]])
            self.pos += 1
        return out


def read_prompts(cfg, tok, dcfg, split: str, limit: int) -> list:
    """Up to `limit` prompts of the stage's mix (train or held-out split) with their answers."""
    sources = T.stage_sources(cfg, split)
    mixture = data.Mixture(sources, tok, dcfg, seed=cfg.seed if split == "train" else T.EVAL_SEED,
                           training=False, verbose=False)
    out = []
    while len(out) < min(limit, len(mixture)):
        _, s = mixture.next()
        out.append(Prompt(s["input_ids"].tolist(), s["pixel_values"], s.get("answer"), family_of(s), s["source"]))
    return out


def family_of(sample_dict: dict) -> str:
    """The synthetic family of a sample: its manifest's folder, else its task."""
    where = sample_dict.get("source", "")
    return os.path.basename(os.path.dirname(where.rsplit(":", 1)[0])) or sample_dict.get("task", "")


def pass_at_k_filter(model, tok, prompts: list, k: int, max_new_tokens: int, generator, reasoning=("math", "count_cot"),
                     batch_rows: int = 64) -> tuple:
    """§4.2.3's difficulty filter with the current model: k samples per prompt; a prompt solved by
    all k is dropped, and for reasoning tasks also one solved by none. Returns (kept, counts)."""
    rolls = rollouts(model, tok, prompts, k, max_new_tokens, 1.0, 1.0, generator, batch_rows)
    kept, counts = [], {"always": 0, "never_reasoning": 0, "kept": 0}
    for i, p in enumerate(prompts):
        solved = sum(reward_answer(r.text, p.answer) for r in rolls[i * k:(i + 1) * k]) if p.answer else 0
        if solved == k:
            counts["always"] += 1
        elif solved == 0 and p.family in reasoning:
            counts["never_reasoning"] += 1
        else:
            kept.append(p)
            counts["kept"] += 1
    return kept, counts


@torch.no_grad()
def held_out_reward(model, tok, prompts: list, cfg, samples: int = 4) -> dict:
    """The held-out prompts, thinking mode: greedy answers (accuracy overall and per family) and
    `samples` completions per prompt at the rollout temperature (the mean reward RL maximises, and
    its accuracy: pass@1 when sampling)."""
    model.eval()
    greedy = rollouts(model, tok, prompts, 1, cfg.max_new_tokens, 0.0, 1.0, None, cfg.batch_rows)
    sampled = rollouts(model, tok, prompts, samples, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                       torch.Generator().manual_seed(12345), cfg.batch_rows)     # the same draws every eval
    score_rollouts(greedy, cfg.reward, cfg.reward_weights)
    score_rollouts(sampled, cfg.reward, cfg.reward_weights)
    mean = lambda rs, key: sum(getattr(r, key) for r in rs) / max(1, len(rs))      # noqa: E731
    fams = sorted({r.prompt.family for r in greedy})
    return {"reward": mean(sampled, "reward"), "acc_sampled": mean(sampled, "answer_r"), "acc": mean(greedy, "answer_r"),
            "fmt": mean(greedy, "format_r"), "greedy_reward": mean(greedy, "reward"),
            "acc_per_family": {f: mean([r for r in greedy if r.prompt.family == f], "answer_r") for f in fams},
            "acc_sampled_per_family": {f: mean([r for r in sampled if r.prompt.family == f], "answer_r") for f in fams}}


def eval_line(episode: int, res: dict) -> str:
    return (f"eval {episode:04d} | held-out reward {res['reward']:.3f} (sampled) | acc {res['acc_sampled']:.3f} sampled, "
            f"{res['acc']:.3f} greedy | fmt {res['fmt']:.3f} | " +
            " ".join(f"{f} {a:.2f}" for f, a in res["acc_per_family"].items()))


# ==============================================================================================
# 12. The stages: torchrun rl.py --stage rl-verifiable | rl-mixed (rows of train_stage.RECIPE)

@dataclass
class RLConfig:
    stage: str = "rl-verifiable"          # rl-verifiable (§4.2.3) | rl-mixed (§4.2.5) | harvest (§4.2.4)
    preset: str = "tiny"                  # model preset when starting from random weights
    out_dir: str = "out"                  # writes out/<stage>/ (run state out/<stage>.run/)
    data_dir: str = "data_synth"          # synthetic default data
    manifests: str = ""                   # your own prompts ("a.jsonl:2,b.jsonl:1"), each with an "answer"
    eval_manifests: str = ""              # held-out prompts (default: the mix's eval split)
    init_from: str = ""                   # "" = the stage's previous stage (longcot / thinkfusion)
    tokenizer: str = ""                   # a Qwen tokenizer folder ("" = the checkpoint's own)
    algo: str = ""                        # dapo | gspo | gspo_token ("" = DAPO for dense, GSPO for MoE)
    reward: str = "verifiable"            # verifiable (answer + format) | mixed (answer + think + format)
    reward_weights: tuple = (0.8, 0.1, 0.1)   # answer, think, format (sum to 1; verifiable uses answer/format)
    judge: str = ""                       # mixed: a checkpoint that grades the thinking (P(yes)); "" = rules
    episodes: int = 30                    # rollout episodes (each followed by mini_batches x epochs updates)
    prompts_per_episode: int = 8          # groups per episode (paper: 2048 rollouts / G)
    group_size: int = 8                   # G rollouts per prompt
    mini_batches: int = 2                 # updates per epoch (paper: 4 of 512)
    epochs: int = 1                       # passes over an episode's rollouts (paper: 2)
    lr: float = 5e-5                      # constant after warm-up (paper: 1e-6 for 2B-8B models)
    warmup_steps: int = 2                 # updates of linear warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_low: float = -1.0                # -1 = the algorithm's default (DAPO 0.2, GSPO 3e-4)
    clip_high: float = -1.0               # -1 = the algorithm's default (DAPO 0.28, GSPO 4e-4)
    clip_schedule: bool = False           # DAPO: clip_high from 0.20 to 0.28 over the run (our reading)
    clip_c: float = 0.0                   # dual-clip constant for negative advantages (0 = off)
    agg: str = ""                         # loss aggregation ("" = the algorithm's default)
    kl_coef: float = 0.0                  # KL to a reference policy (off: DAPO and GSPO drop it)
    max_new_tokens: int = 96              # generation limit per rollout
    temperature: float = 1.0              # rollout sampling temperature
    top_p: float = 1.0
    batch_rows: int = 64                  # rollout rows per generate call
    max_sampling_rounds: int = 3          # dynamic sampling: rounds of fresh prompts before training on what is there
    max_tokens: int = 2048                # tokens per packed update micro-batch
    pool_size: int = 256                  # prompts read from the mix
    filter_k: int = 4                     # pass@k difficulty filter of the pool at the start (0 = off)
    general_share: float = 0.0            # rl-mixed: share of unfiltered general prompts kept beside the hard cases
    eval_prompts: int = 64                # held-out prompts scored greedily before and after
    eval_every: int = 10                  # held-out reward every N episodes (and at the start and end)
    save_every: int = 10                  # resumable checkpoint every N episodes
    keep_checkpoints: int = 2
    harvest_samples: int = 8              # harvest: completions per prompt
    seed: int = 1337


def rl_config(argv: list) -> tuple:
    """(RLConfig, options) from the command line, in train_stage's one option style."""
    opts = T.split_options(argv)
    given = dict(opts)
    stage = given.get("stage") or "rl-verifiable"
    row = T.stage_row(stage)
    if row.runner != "rl.py":
        raise T.UsageError(f"{stage} is not an RL stage: `{T.command_for(row, T.StageConfig())}`")
    cfg = RLConfig(stage=stage)
    for key, value in [*((k, str(v)) for k, v in row.tiny), *opts]:      # the recipe row's tiny values, then the CLI
        if key not in ("stage", "resume", "help"):
            T.set_key({"": cfg}, key, value)
    if cfg.reward not in ("verifiable", "mixed"):
        raise T.UsageError(f"--reward must be verifiable or mixed, got {cfg.reward!r}")
    try:
        mixed_reward(0, 0, 0, cfg.reward_weights)                  # refuses weights that do not sum to 1
    except ValueError as e:
        raise T.UsageError(f"--reward_weights: {e}") from None
    return cfg, given


def stage_view(cfg: RLConfig) -> T.StageConfig:
    """The train_stage config of the same stage (its mix, init rule, folders) for the shared helpers."""
    sc = T.stage_config(cfg.stage)
    for k in ("preset", "out_dir", "data_dir", "manifests", "eval_manifests", "init_from", "tokenizer", "seed"):
        setattr(sc, k, getattr(cfg, k))
    sc.label_mode = "rl"
    return sc


def resolve_algo(cfg: RLConfig, model_cfg) -> RLConfig:
    algo = cfg.algo or ("gspo" if model_cfg.llm_config.num_experts else "dapo")
    if algo not in CLIP_DEFAULTS:
        raise T.UsageError(f"--algo must be one of {', '.join(CLIP_DEFAULTS)}, got {algo!r}")
    lo, hi = CLIP_DEFAULTS[algo]
    return dataclasses.replace(cfg, algo=algo, clip_low=lo if cfg.clip_low < 0 else cfg.clip_low,
                               clip_high=hi if cfg.clip_high < 0 else cfg.clip_high,
                               clip_c=cfg.clip_c or None)


def clip_high_at(cfg: RLConfig, episode: int) -> float:
    """The paper's clip "dynamically adjusted within [0.20, 0.28]": our reading is DAPO's
    clip-higher grown linearly from 0.20 to 0.28 over the run (more room to raise rare tokens as
    the policy sharpens), when --clip_schedule is on; else the fixed clip_high."""
    if not cfg.clip_schedule or cfg.algo != "dapo":
        return cfg.clip_high
    return 0.20 + 0.08 * episode / max(1, cfg.episodes - 1)


def train_rl(cfg: RLConfig, resume: Optional[str] = None) -> str:
    """One RL stage: the pool (pass@k-filtered), then per episode dynamic sampling, advantages and
    the updates; held-out reward before / every eval_every / after; checkpoints through
    train_stage's one writer; returns out/<stage>/."""
    T.writable_dir(cfg.out_dir)
    rank, world, device = T.setup_distributed()
    log = lambda *a: T.print0(rank, *a)                                   # noqa: E731
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    sc = stage_view(cfg)
    if not cfg.manifests:
        if rank == 0:
            data.ensure_synth(cfg.data_dir)
        T.barrier()
    missing = T.missing_sources(sc)
    if missing and not resume:
        raise T.UsageError(f"{cfg.stage} starts from {T.stage_dir(sc, missing[0])}, which is missing: run "
                           f"`{T.command_for(T.STAGES[missing[0]], sc)}` first, or pass --init-from=DIR")
    model, model_cfg = T.place_model(dataclasses.replace(sc, trainable="vision_model,mlp1,language_model"),
                                     M.preset_config(cfg.preset), rank, world, device, log)
    cfg = resolve_algo(cfg, model_cfg)
    tok_dir = T.tokenizer_dir(sc)
    tok, tok_files = data.load_tokenizer(tok_dir), T.tokenizer_files(tok_dir)
    dcfg = data.DataConfig.from_model(model_cfg, label_mode="rl", think="on", max_len=cfg.max_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            foreach=device.type != "cuda" or None)
    # every rank draws the same rollouts and updates on all of them (correct under FSDP, not yet
    # faster with more ranks: splitting the rollouts across ranks is future work)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rdir = T.run_dir(sc)
    eval_set = read_prompts(sc, tok, dcfg, "eval", cfg.eval_prompts)
    episode, pool_state, filter_counts = 0, None, None
    if resume:
        meta, rank_state = T.load_checkpoint(resume, model, opt, rank, world)
        episode, pool_state, filter_counts = meta["episode"], meta["pool"], meta["filter"]
        T.set_rng_state(rank_state["rng"])
        gen.set_state(rank_state["generator"])
        log(f"resume: continuing from {resume} at episode {episode}")
    pool_prompts = read_prompts(sc, tok, dcfg, "train", cfg.pool_size)
    if pool_state is not None:
        pool_prompts = [pool_prompts[i] for i in pool_state["kept"]]
    elif cfg.filter_k:
        t0 = time.time()
        general = [p for p in pool_prompts if p.family not in NUMERIC_FAMILIES]
        hard, filter_counts = pass_at_k_filter(model, tok, pool_prompts, cfg.filter_k, cfg.max_new_tokens, gen,
                                               batch_rows=cfg.batch_rows)
        n_general = int(cfg.general_share * len(hard) / max(1e-9, 1 - cfg.general_share)) if cfg.general_share else 0
        extra = [p for p in general if p not in hard][:n_general]
        pool_prompts = hard + extra
        filter_counts["general_added"] = len(extra)
        log(f"pass@{cfg.filter_k} filter ({time.time() - t0:.0f} s): {filter_counts}; pool {len(pool_prompts)} prompts")
    if not pool_prompts:
        raise T.UsageError(f"{cfg.stage}: no prompt left after the pass@{cfg.filter_k} filter ({filter_counts}); "
                           f"the policy solves everything or nothing: lower --filter_k or use other data")
    pool = PromptPool(pool_prompts, cfg.seed)
    if pool_state is not None:
        pool.pos = pool_state["pos"]
    all_prompts = read_prompts(sc, tok, dcfg, "train", cfg.pool_size)
    kept_where = {q.where for q in pool_prompts}
    kept_index = [i for i, p in enumerate(all_prompts) if p.where in kept_where]
    judge = ModelJudge(cfg.judge) if cfg.judge else None
    log("config: " + json.dumps(asdict(cfg)))
    metrics = T.open_metrics(os.path.join(rdir, "metrics.jsonl"), episode if resume else 0) if rank == 0 else None
    before = None if resume else held_out_reward(model, tok, eval_set, cfg)
    if before:
        log(eval_line(0, before))
        if metrics:
            metrics.write(json.dumps({"episode": 0, "eval": before}) + "\n")
    start = episode
    while True:
        last = episode == cfg.episodes
        if cfg.save_every and episode % cfg.save_every == 0 and episode > start and not last:
            meta = {"stage": cfg.stage, "episode": episode, "config": asdict(cfg), "filter": filter_counts,
                    "pool": {"kept": kept_index, "pos": pool.pos}, "before": before, "step": episode}
            T.save_checkpoint(os.path.join(rdir, f"step-{episode:06d}"), model, meta, rank, world,
                              {"optimizer": T.local_optimizer_state(opt), "rng": T.rng_state(),
                               "generator": gen.get_state()}, extra_files=tok_files, model_cfg=model_cfg)
            if rank == 0:
                T.prune_checkpoints(rdir, cfg.keep_checkpoints)
        if last:
            after = held_out_reward(model, tok, eval_set, cfg)
            log(eval_line(episode, after))
            if before is None:                                         # a resumed run: the saved start
                before = json.load(open(os.path.join(resume, "meta.json")))["before"]
            if metrics:
                metrics.write(json.dumps({"episode": episode, "eval": after}) + "\n")
                metrics.close()
            meta = {"stage": cfg.stage, "step": episode, "config": asdict(cfg), "filter": filter_counts,
                    "reward": {"before": before["reward"], "after": after["reward"]},
                    "rl_eval": {"before": before, "after": after},
                    "final_loss": None, "first_loss": None, "eval_loss": None}
            T.save_checkpoint(T.stage_dir(sc), model, meta, rank, world, model_cfg=model_cfg,
                              extra_files={"metrics.jsonl": os.path.join(rdir, "metrics.jsonl"), **tok_files})
            return T.stage_dir(sc)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (episode + 1) / max(1, cfg.warmup_steps))
        ep_cfg = dataclasses.replace(cfg, clip_high=clip_high_at(cfg, episode))
        t0 = time.time()
        model.eval()
        kept, st = sample_groups(model, tok, pool, ep_cfg, gen, judge)
        t_gen = time.time() - t0
        model.train()
        up = update_episode(model, opt, params, kept, ep_cfg, device, world, model_cfg.img_context_token_id,
                            banned_ids(tok)) if kept else \
            {"clip_frac_low": 0.0, "clip_frac_high": 0.0, "approx_kl": 0.0, "entropy": 0.0, "dlogp": 0.0,
             "updates": 0, "first_ratio_max_dev": None}
        episode += 1
        rec = {"episode": episode, **st, **up, "gen_seconds": t_gen, "seconds": time.time() - t0}
        log(f"update {episode:04d}/{cfg.episodes:04d} | reward {st['reward']:.3f} | acc {st['acc']:.3f} | fmt "
            f"{st['fmt']:.3f} | kept {st['kept']}/{st['groups']} groups | clip lo/hi {up['clip_frac_low']:.3f}/"
            f"{up['clip_frac_high']:.3f} | len {st['len']:.0f} | trunc {100 * st['trunc']:.0f}% | ent "
            f"{up['entropy']:.3f} | kl {up['approx_kl']:.4f} | dlogp {up['dlogp']:.2e}"
            + ("" if kept else " | no group with a reward spread: no update"))
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if cfg.eval_every and episode % cfg.eval_every == 0 and episode < cfg.episodes:
            mid = held_out_reward(model, tok, eval_set, cfg)
            log(eval_line(episode, mid))
            if metrics:
                metrics.write(json.dumps({"episode": episode, "eval": mid}) + "\n")


# ==============================================================================================
# 13. Data tools: the CoT harvest for Think-Fusion SFT (§4.2.4) and the pass@k filter (§4.2.3)

def record_of(where: str):
    """The manifest record a prompt came from ('file:line')."""
    path, line = where.rsplit(":", 1)
    ds = data.JsonlDataset(path, None, None)
    return ds.record(int(np.searchsorted(ds.line_numbers, int(line))))


def as_manifest_line(rec, reply: Optional[str], out_dir: str) -> dict:
    """A record (with `reply` as its new last assistant turn when given), media relative to out_dir."""
    turns = list(rec.turns[:-1] if rec.turns[-1][0] == "assistant" else rec.turns)
    if reply is not None:
        turns.append(("assistant", reply))
    obj = {"conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in turns],
           "answer": rec.answer, "task": rec.task}
    if reply is not None and "<think>" in reply:
        obj["think"] = True
    return data.rebase_media(obj, rec, data.Path(out_dir))


def harvest(cfg: RLConfig) -> str:
    """Rejection sampling from the RL model (§4.2.4): harvest_samples completions per prompt of the
    harvest mix; those with answer = format = 1 are kept, deduplicated, as LongCoT records in
    out/harvest/cot.jsonl, which the thinkfusion stage reads (its mix's `out:harvest/cot.jsonl`)."""
    rank, world, device = T.setup_distributed()
    log = lambda *a: T.print0(rank, *a)                                   # noqa: E731
    sc = stage_view(cfg)
    data.ensure_synth(cfg.data_dir)
    missing = T.missing_sources(sc)
    if missing:
        raise T.UsageError(f"harvest samples from {T.stage_dir(sc, missing[0])}, which is missing: run "
                           f"`{T.command_for(T.STAGES[missing[0]], sc)}` first, or pass --init-from=DIR")
    model = T.build_stage_model(sc, M.preset_config(cfg.preset), log).to(device).eval()
    tok = data.load_tokenizer(T.tokenizer_dir(sc))
    dcfg = data.DataConfig.from_model(model.cfg, label_mode="rl", think="on", max_len=cfg.max_tokens)
    prompts = read_prompts(sc, tok, dcfg, "train", cfg.pool_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    rolls = rollouts(model, tok, prompts, cfg.harvest_samples, cfg.max_new_tokens, cfg.temperature, 1.0, gen,
                     cfg.batch_rows)
    out = T.stage_dir(sc)
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    seen, lines, counts = set(), [], Counter()
    for r in rolls:
        ok = reward_answer(r.text, r.prompt.answer) == 1.0 and reward_format(r.text) == 1.0
        key = (r.prompt.where, " ".join(r.text.split()))
        counts["correct_and_formatted" if ok else "rejected"] += 1
        if ok and key in seen:
            counts["duplicate"] += 1
        elif ok:
            seen.add(key)
            lines.append(json.dumps(as_manifest_line(record_of(r.prompt.where), r.text.strip(), out)))
    with open(os.path.join(tmp, "cot.jsonl"), "w") as f:
        f.writelines(line + "\n" for line in lines)
    solved = len({w for w, _ in seen})
    meta = {"stage": "harvest", "source": T.init_sources(sc)["language_model"], "samples": len(rolls),
            "kept": len(lines), "prompts": len(prompts), "prompts_with_a_kept_chain": solved, "counts": dict(counts)}
    log(f"harvest: {len(lines)} chains kept of {len(rolls)} samples ({solved}/{len(prompts)} prompts): {dict(counts)}")
    if not lines:
        raise T.UsageError("harvest kept no chain: the RL model never answers right in the format; train it longer")
    T.save_checkpoint(out, None, meta, rank, world, extra_files={"cot.jsonl": os.path.join(tmp, "cot.jsonl")})
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def filter_cli(argv):
    """python rl.py filter --ckpt DIR --stage rl-verifiable --out FILE [--k 4]: the pass@k filter
    as a tool, writing the kept prompts as a manifest."""
    opts = dict(T.split_options(argv))
    ckpt, out = opts.pop("ckpt", None), opts.pop("out", None)
    if not ckpt or not out:
        raise T.UsageError("filter needs --ckpt DIR and --out FILE.jsonl")
    k = int(opts.pop("k", 4))
    cfg, _ = rl_config([f"--{a}={b}" for a, b in opts.items()] + [f"--init_from={ckpt}"])
    sc = stage_view(cfg)
    data.ensure_synth(cfg.data_dir)
    model, tok, dcfg = sample.load(ckpt)
    dcfg = data.DataConfig.from_model(model.cfg, label_mode="rl", think="on", max_len=cfg.max_tokens)
    prompts = read_prompts(sc, tok, dcfg, "train", cfg.pool_size)
    kept, counts = pass_at_k_filter(model, tok, prompts, k, cfg.max_new_tokens, torch.Generator().manual_seed(cfg.seed),
                                    batch_rows=cfg.batch_rows)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.writelines(json.dumps(as_manifest_line(record_of(p.where), None, os.path.dirname(os.path.abspath(out))))
                     + "\n" for p in kept)
    print(f"pass@{k} filter of {len(prompts)} prompts with {ckpt}: {counts}; kept prompts in {out}")


# ==============================================================================================
# 14. Benchmark: rollout tokens/s against HF generate, and the share of an RL step spent generating

def bench(argv):
    ap = argparse.ArgumentParser(prog="rl.py bench", description="Rollout generation tokens/s of ours (KV cache, "
                                 "batched, sampling at T=1) vs HF transformers' generate on the same weights and batch; "
                                 "then one RL episode of the tiny model: generation time vs update time.")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--ckpt", default=None, help="a checkpoint instead of a random preset")
    ap.add_argument("--batch", type=int, default=64, help="rows per generate call (prompts x G)")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SystemExit("rl.py bench compares against HF transformers: pip install -r tests/requirements.txt")
    import tempfile
    torch.manual_seed(0)
    sailvl = M.SAILVL.from_pretrained(args.ckpt) if args.ckpt else M.build_model(args.preset)
    lm = sailvl.eval().language_model
    with tempfile.TemporaryDirectory() as d:
        M.save_hf_llm(lm, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, min(256, lm.cfg.vocab_size), (args.batch, args.prompt_len))
    n = args.new_tokens

    def ours():
        with torch.inference_mode():
            rows = list(lm.model.embed_tokens(ids))
            return M.generate_from_embeds(lm, rows, n, 1.0, 1.0, (), torch.Generator().manual_seed(0))

    def theirs():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, pad_token_id=0)
    ours(), theirs()                                                    # warm-up
    best = {name: min(T.timed(fn) for _ in range(args.repeats)) for name, fn in (("ours", ours), ("hf", theirs))}
    tps = {k: args.batch * n / v for k, v in best.items()}
    print(f"rollouts, {args.ckpt or args.preset} LLM, batch {args.batch}, prompt {args.prompt_len}, {n} new tokens, "
          f"sampling T=1, fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"  ours (KV cache) {tps['ours']:9,.0f} tok/s | HF generate {tps['hf']:9,.0f} tok/s | ratio "
          f"{tps['ours'] / tps['hf']:.2f}x")
    # one RL episode of the tiny model on synthetic prompts: generation vs update
    cfg = RLConfig(episodes=1, pool_size=16, prompts_per_episode=8, group_size=8, filter_k=0, max_sampling_rounds=1)
    sc = stage_view(cfg)
    root = data.ensure_synth(cfg.data_dir, progress=False)
    tok = data.load_tokenizer(root)
    dcfg = data.DataConfig.from_model(sailvl.cfg, label_mode="rl", think="on", max_len=cfg.max_tokens)
    pool = PromptPool(read_prompts(sc, tok, dcfg, "train", cfg.pool_size), 0)
    cfg = resolve_algo(cfg, sailvl.cfg)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    kept, st = sample_groups(sailvl, tok, pool, dataclasses.replace(cfg, max_sampling_rounds=1), gen)
    t_gen = time.perf_counter() - t0
    for r in kept or []:
        r.advantage = 1.0
    rolls = kept or rollouts(sailvl, tok, pool.take(2), cfg.group_size, cfg.max_new_tokens, 1.0, 1.0, gen)
    params = list(sailvl.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    t0 = time.perf_counter()
    sailvl.train()
    update_episode(sailvl, opt, params, rolls, cfg, torch.device("cpu"), 1, sailvl.cfg.img_context_token_id,
                   banned_ids(tok))
    t_up = time.perf_counter() - t0
    print(f"one RL episode ({cfg.prompts_per_episode} prompts x {cfg.group_size}, {st['len']:.0f} tokens per "
          f"rollout): generation {t_gen:.1f} s, updates {t_up:.1f} s -> generation is {t_gen / (t_gen + t_up):.0%} "
          f"of the step")


# ==============================================================================================
# command line

def help_text() -> str:
    doc = T.field_help(RLConfig)
    lines = [__doc__.split("\n\n")[0], "",
             "    torchrun rl.py --stage rl-verifiable       # §4.2.3, from out/longcot",
             "    torchrun rl.py --stage harvest             # §4.2.4, CoT from out/rl-verifiable",
             "    torchrun rl.py --stage rl-mixed            # §4.2.5, from out/thinkfusion",
             "    python rl.py filter --ckpt DIR --out FILE  # the pass@k filter as a tool",
             "    python rl.py bench                         # rollout tokens/s vs HF generate", "", "options:",
             f"  {'--resume [DIR]':<34} continue from DIR, or from the newest good out/<stage>.run/step-*"]
    for f in dataclasses.fields(RLConfig):
        lines.append(f"  {'--' + f.name + '=' + repr(getattr(RLConfig(), f.name)):<34} {doc.get(f.name, '')}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:
            return bench(argv[1:])
        if argv[:1] == ["filter"]:
            return filter_cli(argv[1:])
        cfg, opts = rl_config(argv)
        rank = int(os.environ.get("RANK", "0"))
        log = lambda *a: T.print0(rank, *a)                               # noqa: E731
        if "help" in opts:
            return log(help_text())
        row = T.stage_row(cfg.stage)
        log(f"stage {cfg.stage} ({row.section}): {row.note}")
        if cfg.stage == "harvest":
            out = harvest(cfg)
        else:
            resume = opts.get("resume") or None
            if "resume" in opts and resume is None:
                resume = T.find_resume_checkpoint(T.run_dir(stage_view(cfg)), log)
            elif resume:
                T.verify_checkpoint(resume, resumable=True)
            out = train_rl(cfg, resume)
        log(f"done: {cfg.stage} in {out}/")
        nxt = T.next_name(row)
        if nxt:
            log(f"next: {T.command_for(T.STAGES[nxt], stage_view(cfg))}")
    except T.UsageError as e:
        T.fail(str(e), 2, "rl.py")
    except (data.TooMuchBadData, data.DataError, T.CheckpointError, FloatingPointError) as e:
        T.fail(str(e), 1, "rl.py")
    T.shutdown_distributed()


if __name__ == "__main__":
    main()
