"""Reinforcement learning of SAIL-VL2: verifiable rewards, DAPO and GSPO, mixed rewards (paper §4.2.3, §4.2.5).

§4.2.3 (RL with verifiable rewards) trains the LongCoT model on 70K math, puzzle, science, OCR and
counting prompts with two binary rewards, the answer (the `\\boxed{}` answer is correct) and the
format (`<think>` tags). Dense models use DAPO (arXiv 2503.14476), the MoE model GSPO
(arXiv 2507.18071). §4.2.5 (RL with mixed rewards) adds a "think" reward from a judge of the
reasoning and a judge for answers that rules cannot check; the coefficients of the rewards sum to
1. The file reads in that order:

  1. Verifiable rewards  `reward_answer` (by sample.py's grading API), `reward_format`.
  2. Group advantages    `group_advantages`: (r - mean) / (std + eps) in each prompt's group.
  3. Dynamic sampling    `filter_groups`: DAPO keeps groups whose rewards are not all equal.
  4. Overlong shaping    `overlong_penalty`, `truncation_mask` (DAPO's; the paper and the stages use neither).
  5. Policy loss         `policy_loss`: DAPO, GSPO, GSPO-token; aggregation independent of the batch split.
  6. KL estimators       `kl_estimate` (k1 / k2 / k3); off in the stages (DAPO and GSPO drop KL).
  7. Mixed rewards       `ThinkJudge`, `think_consistency`, `reference_judge`, `mixed_reward`.
  8. Rollouts            G samples per prompt from the one policy function the training forward shares.
  9. Model judge         any checkpoint grades a reasoning by P(yes).
 10. Data parallelism    each rank owns whole groups; generation on an unsharded copy, one holding the rank's experts, or the sharded model.
 11. Dynamic sampling    groups whose `learning_signal` does not vary dropped, fresh prompts drawn.
 12. Updates             mini-batches x epochs of packed micro-batches, one global normaliser.
 13. Evaluation          greedy accuracy, pass@1, maj@k, pass@k on held-out prompts; paired before / after.
 14. The stages          rl-verifiable, rl-mixed (train_rl), harvest.
 15. Data tools          the CoT harvest (§4.2.4), the pass@k filter (§4.2.3). LongCoT data
                         cleaning (§4.2.2) is a curation tool: tests/curate.py clean-longcot.

Every reward function is linear in its input: no regex with nested quantifiers over unbounded
text, no `signal.alarm` (it fails off the main thread), no sympy.
"""
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as modeling
import moe
import packing
import sample
import train_stage
from data import split_think
from sample import answer_key, answers_match, clean_answer, final_answer, last_boxed
from sample import parse_number as _parse_number

# ----------------------------------------------------------------------------------------------
# 1. Verifiable rewards (§4.2.3): answer and format, both binary
#
# Replies are read and answers compared by sample.py's grading API, as the evaluation does: the
# answer is the last balanced `\boxed{...}` after `</think>` (none in a reply that opened `<think>`
# and never closed it; a direct-mode reply without think tags is all answer), and two answers agree
# by `answers_match`, a normaliser held to math-verify 0.9.0.

def reward_format(text: str) -> float:
    """1.0 if the completion is exactly `<think>T</think> ... \\boxed{A} ...` with non-empty T
    (leading whitespace allowed; one think block only; the box after `</think>`), else 0.0."""
    s = text.lstrip()
    if not s.startswith("<think>") or s.count("<think>") != 1 or s.count("</think>") != 1:
        return 0.0
    close = s.find("</think>")
    thinking, answer = s[len("<think>"):close], s[close + len("</think>"):]
    return float(bool(thinking.strip()) and last_boxed(answer) is not None)


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

    units = m                                                     # of the stats: tokens, sequences for gspo
    if algo == "dapo":
        ratio = log_ratio.clamp(-20, 20).exp()                    # (B, T)
        tok_loss, clipped = _clipped_objective(ratio, adv_tok, lo, hi, clip_c)
    elif algo == "gspo":
        ratio = seq_log_ratio.clamp(-20, 10).exp()                # (B,) s_i
        seq_loss, clipped = _clipped_objective(ratio, adv_seq, lo, hi, clip_c)
        tok_loss, units = seq_loss[:, None].expand_as(logp), m.any(-1)
    else:
        log_s = logp - logp.detach() + seq_log_ratio.detach()[:, None]
        ratio = log_s.clamp(-20, 10).exp()                        # (B, T), value s_i, token gradient
        tok_loss, clipped = _clipped_objective(ratio, adv_tok, lo, hi, clip_c)

    tok_loss = torch.where(m, tok_loss, zero)                     # (B, T)
    n = loss_normalizer(m, agg) if n_global is None else n_global
    n = torch.as_tensor(n, dtype=logp.dtype, device=logp.device).clamp_min(1)
    if agg == "token-mean":
        loss = tok_loss.sum() / n
    else:
        per_row = lens.clamp_min(1) if agg == "seq-mean-token-mean" else (norm_len or logp.shape[-1])
        loss = (tok_loss.sum(-1) / per_row).sum() / n

    with torch.no_grad():
        stats = {f"clip_frac_{k}": _masked_mean(v.to(logp.dtype), units) for k, v in clipped.items()}
        stats["ratio_mean"] = _masked_mean(ratio.detach(), units)
        stats["approx_kl"] = _masked_mean(kl_estimate(old_logp, logp, "k3"), m)     # KL(pi_old || pi)
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
    """Think reward for the synthetic arithmetic / counting / chart tasks: 1.0 when the thinking
    is no loop (repetition_ratio of its word 4-grams below `max_repetition`) and leads to the boxed
    answer: a number must be the last number the thinking derives; a word (a chart's "which bar
    is largest?") must be named after the last number it states (its conclusion, not its list of
    the bars). Else 0.0. Linear in the length of `text`."""
    parts = split_think(text)
    if parts is None:
        return 0.0
    thinking, region = parts
    boxed = last_boxed(region)
    if boxed is None or repetition_ratio(thinking) >= max_repetition:
        return 0.0
    if _parse_number(clean_answer(boxed)) is None:
        return float(named_after_the_last_number(sample.normalize_answer(boxed), sample.normalize_answer(thinking)))
    derived = sample.last_number(thinking)
    return float(derived is not None and answers_match(derived, boxed))


WORD = re.compile(r"\w+")


def named_after_the_last_number(answer: str, chain: str) -> bool:
    """Whether the words of `answer` occur in `chain` as whole words after its last word with a
    digit ("pear" is not in "appears"). Linear: both as word lists, searched as one string."""
    words, want = WORD.findall(chain), WORD.findall(answer)
    if not want:
        return False
    joined = " " + " ".join(words) + " "
    at = joined.rfind(" " + " ".join(want) + " ")
    if at < 0:
        return False
    last_digit = max((i for i, w in enumerate(words) if any(c.isdigit() for c in w)), default=-1)
    return joined.count(" ", 0, at) + len(want) - 1 > last_digit          # the match's last word, after it


def reference_judge(answer: str, reference: str, metric: str = "rouge_l", threshold: Optional[float] = 0.5) -> float:
    """Rule-based judge of an unverifiable answer against a reference answer: ROUGE-L or word-F1,
    binarised at `threshold` (the paper's rewards are binary); threshold=None returns the score."""
    score = {"rouge_l": sample.rouge_l, "word_f1": sample.word_f1}[metric](answer, reference)
    return score if threshold is None else float(score >= threshold)


def mixed_reward(answer, think, fmt, weights=(0.8, 0.1, 0.1)):
    """w_a * answer + w_t * think + w_f * format (floats or tensors); the three weights must be
    non-negative and sum to 1 (§4.2.5), otherwise ValueError. The default is our choice: the paper
    gives none."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or min(w) < 0 or not math.isclose(sum(w), 1.0, abs_tol=1e-6):
        raise ValueError(f"mixed_reward weights (answer, think, format) must be 3 non-negative "
                         f"numbers summing to 1, got {weights}")
    return w[0] * answer + w[1] * think + w[2] * fmt


# Direct-mode replies (§4.2.4's Think-Fusion model answers in both modes): rl-mixed asks a share of
# its prompts without the think prompt (`--direct_share`), or the RL model learns to run its direct
# replies on into a `<think>`-less chain closed by `</think>` (README, rl-mixed). A direct reply is
# graded by the family's answer rule of the evaluation (sample.score: no `\boxed{}`), its format is
# "no think tags", it has no think term, and its answer counts only when it is well-formed.

def reward_direct_format(text: str) -> float:
    """1.0 for a well-formed direct-mode reply: a non-empty answer without `<think>` / `</think>`."""
    return float(bool(text.strip()) and "<think>" not in text and "</think>" not in text)


# ==============================================================================================
# 8. Rollouts (§4.2.3): G samples per prompt from the policy
#
# The policy is the LM's next-token distribution with the sampling settings applied: temperature,
# top-p, and the tokens it never emits (the image tokens: a completion is fed back, and an image
# slot without an image breaks it; the embedding rows beyond the tokenizer). One function,
# `model.policy_logits`, computes it for the sampler and for the training forward alike, so a
# rollout's recorded log-probs and the first update's recomputed ones describe the same policy.
# Every prompt's image is encoded once and its prefill shared by its G rows.

@dataclass(eq=False)                      # compared by identity (pixels are tensors)
class Prompt:
    """One RL prompt: its token ids (ending in the assistant header), pixels, answer and family;
    think: asked in thinking mode (the think prompt appended), else in direct mode."""
    ids: list
    pixels: object
    answer: Optional[str]
    family: str
    where: str
    think: bool = True
    question: str = ""           # the question in words (what a judge of the reasoning is told)


@dataclass(eq=False)
class Rollout:
    prompt: Prompt
    completion: list             # generated ids, the stop token included when there was one
    text: str                    # the completion decoded (without the stop token)
    truncated: bool
    rollout_logp: list           # per token, from the sampling policy
    reward: float = 0.0
    answer_r: float = 0.0
    format_r: float = 0.0
    think_r: float = 0.0
    advantage: float = 0.0


def banned_ids(tok) -> tuple:
    """Tokens the policy never emits: the image tokens, and the ids the tokenizer cannot decode."""
    ids = data.special_ids(tok)
    return ids.img_context, ids.img_start, ids.img_end, *data.undecodable_ids(tok)


def policy_logprobs(logits, targets, cfg, n_valid: int, banned) -> tuple:
    """logits (N, V) of the model, targets (N,) -> (log-prob (N,) of each target under the
    sampling policy, the policy's entropy (N,)). The same `model.policy_logits` the sampler uses."""
    logp_all = torch.log_softmax(modeling.policy_logits(logits, cfg.temperature, cfg.top_p, n_valid, banned), -1)
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)     # 0 log 0 = 0
    return logp_all.gather(1, targets[:, None])[:, 0].clone(), entropy     # not a view: FSDP2 warns on a view output


def free_memory(device) -> Optional[int]:
    """Bytes free on a CUDA device, with what torch's caching allocator holds unused (the device counts
    it as taken; the last update's activations and gradients stay cached). None elsewhere: the CPU's
    rollouts are not sized by memory. The calls' sizes, and so which draws a row gets, follow it: on a
    GPU a resumed run samples from the same policy, not necessarily the same tokens."""
    if device.type != "cuda":
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


def prompts_per_call(cfg, llm, longest: int, G: int, device) -> int:
    """Prompts per generate call: cfg.batch_rows // G rows' worth, fewer where their memory would
    pass 80% of the device's free memory. A row holds `longest` + max_new_tokens slots of KV cache
    in every layer (prefilled once per prompt, then copied into its G rows), and its sampling
    temporaries (logits, log-softmax, float64 CDF: 32 bytes per vocabulary entry)."""
    per_call = max(1, cfg.batch_rows // G)
    free = free_memory(device)
    if free is None:
        return per_call
    itemsize = (modeling.compute_dtype(device) or torch.float32).itemsize        # the cache's dtype
    kv = 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * itemsize * (longest + cfg.max_new_tokens)
    per_prompt = kv * (G + 1) + 32 * llm.vocab_size * G
    if per_prompt > 0.8 * free:
        raise RuntimeError(f"rollouts: one prompt's {G} rows need {per_prompt / 2 ** 30:.1f} GiB (KV cache of "
                           f"{longest} + {cfg.max_new_tokens} tokens per row) and {free / 2 ** 30:.1f} GiB are free on "
                           f"{device}: lower --max_new_tokens or --group_size")
    return min(per_call, int(0.8 * free // per_prompt))


def rollouts(policy, tok, prompts: list, cfg, generator, group_size: Optional[int] = None,
             greedy: bool = False, progress: bool = False, call_seed: Optional[int] = None) -> list:
    """group_size (default cfg.group_size) completions per prompt, prompt after prompt (the layout
    group_advantages reads); sampled with cfg.temperature / cfg.top_p, or greedy. Every tensor on
    the policy's device; `generator` on that device too. `call_seed`: instead of `generator`, generate
    call c draws from a generator seeded call_seed + c * 2**20, so its draws do not depend on how many
    steps the calls before it ran (each call stops when its rows are done). Where every forward is a
    collective (--generate_on=model on the sharded model, see model.generating_sharded; experts spread
    over the ranks, --generate_on=experts) every rank makes as many calls as the rank with the most,
    eagerly, the decode loops in step; the padding calls' rows are dropped."""
    G = group_size or cfg.group_size
    device = modeling.model_device(policy)
    stop, banned = sample.stop_ids(tok), banned_ids(tok)
    temperature, top_p = (0.0, 1.0) if greedy else (cfg.temperature, cfg.top_p)
    in_step, out = modeling.is_sharded(policy) or moe.is_expert_parallel(policy), []
    with modeling.generating_sharded(policy), torch.inference_mode(), modeling.autocast(device):
        longest = max((len(p.ids) for p in prompts), default=0)
        per_call = prompts_per_call(cfg, policy.cfg.llm_config, longest, G, device)   # sharded: the root gathered
        chunks = [prompts[i:i + per_call] for i in range(0, len(prompts), per_call)]
        n_mine = len(chunks)
        if in_step:               # each forward is a collective with the other ranks: as many calls everywhere
            n_calls = int(modeling.all_reduce([n_mine], device, "max")[0])
            chunks += [[Prompt([min(stop)], None, None, "", "padding")]] * (n_calls - n_mine)
        for c, chunk in enumerate(tqdm(chunks, desc="rollouts", disable=data.no_bar(progress), leave=False)):
            if call_seed is not None:
                generator = torch.Generator(device).manual_seed(call_seed + c * 2 ** 20)
            flat = torch.tensor([t for p in chunk for t in p.ids], device=device)[None]
            pixels = modeling.on_device(sample.concat_pixels([p.pixels for p in chunk]), device)
            prefixes = policy.embed(flat, pixels)[0].split([len(p.ids) for p in chunk])   # (L_i, H) each
            lps, padding = [], c >= n_mine         # a padding call: greedy, drawing nothing from `generator`
            ids_per_row = modeling.generate_from_embeds(policy.language_model, list(prefixes), cfg.max_new_tokens,
                                                 0.0 if padding else temperature, top_p, stop, generator,
                                                 n_valid_tokens=tok.n_vocab, logprobs=lps, banned=banned, repeats=G,
                                                 compile=False if in_step else COMPILE[cfg.compile], in_step=in_step)
            if padding:
                continue
            for k, (ids, lp) in enumerate(zip(ids_per_row, lps)):
                done = bool(ids) and ids[-1] in stop
                out.append(Rollout(chunk[k // G], ids, sample.decode_reply(tok, ids, stop), not done, lp))
    return out


def checkable(answer: str) -> bool:
    """A ground truth the rules can check: a number or a single word."""
    return _parse_number(clean_answer(answer)) is not None or len(answer.split()) == 1


NUMERIC_FAMILIES = ("count", "count_cot", "math", "math_direct", "chart")   # the think reward checks their arithmetic


def verifiable_reward(answer, fmt, weights, gated: bool = True):
    """The verifiable reward of score_rollouts: the answer counts only in a well-formed reply; not
    `gated` (the ablation, --format_gate=false), answer and format summed with their weights."""
    wa, _, wf = weights
    return (fmt * (wa * answer + wf) if gated else wa * answer + wf * fmt) / (wa + wf)


def answer_score(r, cfg) -> float:
    """The answer reward of one rollout (0 or 1). Thinking mode: the final `\\boxed{}` answer by
    rules, or (mixed rewards) by the reference judge when the ground truth is no number or word.
    Direct mode: the family's answer rule of the evaluation (sample.score) for a synthetic family or
    a checkable ground truth, else the judge on the whole reply."""
    gold = r.prompt.answer or ""
    if not r.prompt.think:
        if r.prompt.family in data.SYNTH_FAMILIES or checkable(gold):
            return float(sample.score(r.prompt.family, r.text, "", gold)[0])
        return reference_judge(sample.answer_region(r.text) or "", gold)
    if cfg.reward == "verifiable" or checkable(gold):
        return reward_answer(r.text, gold)
    return reference_judge(final_answer(r.text) or "", gold)


def score_rollouts(rolls: list, cfg, judge=None) -> None:
    """Rewards in place. verifiable (§4.2.3): the answer (rules) and the format, combined with the
    weights' answer and format parts renormalised (default 0.8 / 0.1 -> 0.89 / 0.11), the answer
    counting only in a well-formed reply (as DAPO, arXiv 2503.14476, reads it only from the required
    format): 1 right and well-formed, 0.11 wrong but well-formed, 0 malformed. Ungated, a right
    answer without its `<think>` chain still earns 0.89, and the miniature's well-formed rollouts fell
    to 0.73 (>= 0.88 gated; README, RL section). mixed (§4.2.5): w_a answer + w_t think + w_f format,
    the think reward `think_consistency` for the arithmetic / counting families, the model judge
    (--judge) for the others, else 1 for a non-empty thinking that does not loop. A prompt asked in
    direct mode: its answer and `reward_direct_format`, gated as the verifiable reward is."""
    for r in rolls:
        r.answer_r = answer_score(r, cfg)
        r.format_r = reward_format(r.text) if r.prompt.think else reward_direct_format(r.text)
        if cfg.reward == "verifiable" or not r.prompt.think:
            r.reward = verifiable_reward(r.answer_r, r.format_r, cfg.reward_weights, cfg.format_gate)
            continue
        parts = split_think(r.text)
        if r.prompt.family in NUMERIC_FAMILIES:
            r.think_r = think_consistency(r.text)
        elif parts is None or not parts[0].strip():
            r.think_r = 0.0
        elif judge is not None:
            r.think_r = float(judge(r.prompt.question, parts[0], final_answer(r.text) or "", r.prompt.answer or ""))
        else:
            r.think_r = float(repetition_ratio(parts[0]) < 0.5)
        r.reward = mixed_reward(r.answer_r, r.think_r, r.format_r, cfg.reward_weights)


# ==============================================================================================
# 9. The model judge (§4.2.5): any checkpoint grades a reasoning by the probability of "yes"

class ModelJudge:
    """judge(question, thinking, answer, reference) -> P(yes) / (P(yes) + P(no)) of a checkpoint
    asked a grading question (`--judge=DIR`: point it at a stronger checkpoint than the policy)."""

    PROMPT = ("Question: {q}\nReasoning: {t}\nAnswer: {a}\nReference answer: {r}\n"
              "Is the reasoning sound and does it lead to the answer? Answer yes or no.")

    def __init__(self, ckpt: str, device=None):
        self.device = device or torch.device("cpu")
        self.model, self.tok, self.dcfg = sample.load(ckpt, self.device)     # on CUDA its matrices in bf16
        self.yes, self.no = data.encode(self.tok, "yes")[0], data.encode(self.tok, "no")[0]

    @torch.no_grad()
    def __call__(self, question, thinking, answer, reference) -> float:
        text = self.PROMPT.format(q=question[:500], t=(thinking or "")[:1500], a=(answer or "")[:200],
                                  r=(reference or "")[:200])
        ids = data.prompt_inputs(self.tok, self.dcfg, text)["input_ids"][None].to(self.device)
        lm = self.model.language_model
        with modeling.autocast(self.device):
            h, _ = lm.run(ids)                                           # (1, T, H): logits at the last position only
            logits = lm.lm_head(h[0, -1]).float()
        return float(torch.softmax(logits[[self.yes, self.no]], -1)[0])


# ==============================================================================================
# 10. Data parallelism: each rank owns whole groups (their advantages stay local)
#
# Every rank draws the same prompts and keeps its share (prompts r, r + N, ...), samples with its
# own generator (seed + rank) and trains on its own rollouts; counts and statistics are summed
# across ranks. Generation runs on a full, unsharded copy of the policy on every rank (refreshed
# from the FSDP shards once per episode, tensor by tensor), with no collective: the sharded model
# all-gathers every layer at every decode step, and its ranks must keep their calls and decode loops
# in step. Where the copy does not fit, it holds a share of the experts only, or generation runs on
# the sharded model all the same (--generate_on).

def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def my_share(items: list) -> list:
    rank, world = rank_and_world()
    return items[rank::world]


def gather_shares(mine: list) -> list:
    """Every rank's `my_share` results, back in the original order (on every rank)."""
    rank, world = rank_and_world()
    if world == 1:
        return list(mine)
    parts = [None] * world
    dist.all_gather_object(parts, list(mine))
    return [parts[i % world][i // world] for i in range(sum(len(p) for p in parts))]


def generation_policy(model, replica=None, place: str = "copy"):
    """The module rollouts run on (`place`, see generation_place): the model itself on one process
    without autocast (the CPU) or at place "model"; else a copy on this rank (`replica`, created on
    first use) loaded with the current weights: under FSDP a full one ("experts": all but the other
    ranks' experts), under autocast (CUDA) one whose LLM matrices are held in autocast's dtype (see
    generation_copy). `replica` None after a lean update (see lean_updates) makes a new one."""
    low = modeling.compute_dtype(modeling.model_device(model))
    if place == "model" or (not dist.is_initialized() and low is None):
        return model.eval()
    replica = replica if replica is not None and replica is not model else \
        generation_copy(model, low, None, ranks_sharing_experts(place))
    load_weights(replica, model)
    return replica.eval().requires_grad_(False)


@torch.no_grad()
def load_weights(replica, model):
    """`model`'s weights into `replica`, one tensor at a time: under FSDP each is all-gathered alone
    (every rank in the same order), so no rank holds a second full fp32 copy of the model at once,
    as a full state dict would (32 GB for an 8B LLM). The fp32 shards are registered first: a unit
    left gathered after a forward holds bf16 copies of them under FSDP's mixed precision."""
    from torch.distributed.tensor import DTensor
    for m in model.modules():
        if modeling.is_sharded(m):
            m.reshard()
    dst = {**dict(replica.named_parameters(remove_duplicate=False)), **dict(replica.named_buffers())}
    rank_experts = {f"{name}.experts": b.expert_slice for name, b in replica.named_modules()
                    if isinstance(b, moe.SparseMoeBlock) and b.expert_slice is not None}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        part = rank_experts.get(name.rsplit(".", 1)[0])                   # (E, ...): this rank's experts
        dst.pop(name).copy_(full if part is None else full[part[0]:part[1]])
    if model.cfg.llm_config.tie_word_embeddings:        # the lm_head: the embedding itself, or a bf16 copy of it
        head, embed = dst.pop("language_model.lm_head.weight"), replica.language_model.model.embed_tokens.weight
        if head is not embed:
            head.copy_(embed)
    if dst:
        raise RuntimeError(f"generation copy: the model has no weights for {sorted(dst)}")


def generation_copy(model, low, device=None, expert_ranks: int = 1):
    """An empty SAILVL like `model` on its device (or `device`: "meta" sizes it); given autocast's
    dtype `low`, its LLM's matrices held in it (model.hold_matrices_in: cast once per episode, not in
    every decode step); `expert_ranks` > 1: each MoE layer holding this rank's share of its experts
    (moe.hold_rank_experts; its forwards then a collective over those ranks)."""
    with torch.device("meta"):                  # cast before allocating: never a full fp32 copy at once
        replica = modeling.SAILVL(model.cfg)
        lm = replica.language_model
        for block in moe.moe_blocks(replica) if expert_ranks > 1 else []:
            moe.hold_rank_experts(block, rank_and_world()[0] % expert_ranks, expert_ranks)
        if low is not None:
            modeling.hold_matrices_in(lm, low)
    replica = replica.to_empty(device=device or modeling.model_device(model))    # in place: `lm` stays valid
    if low is None and model.cfg.llm_config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return replica


# Where rollouts run (--generate_on). "copy": on a full copy of the model on every rank (its LLM's
# matrices in bf16 on a GPU), generated from without any collective, at the cost of that copy's memory
# next to the shards and the optimizer's state. For a model whose copy does not fit beside its
# training state (30b-a3b: a 64 GB copy beside 61 GB of shards, gradient and Adam per rank on 8 GPUs):
# "experts", an MoE model's copy with each rank holding E / world of every layer's experts (8 GPUs:
# 14 GB for 30b-a3b), each MoE layer's tokens gathered from every rank and its output summed over
# them (moe.SparseMoeBlock.expert_parallel), every decode step: two small collectives per MoE layer,
# eager; "model", on the sharded model itself, each FSDP unit gathered per forward, every decode step
# (model.generating_sharded): no copy, but an all-gather of the whole model per generated token, eager.
GENERATE_SHARE = 0.6  # auto: past the copy where it and the rank's training state pass this share of the GPU


def copy_bytes(model, low, expert_ranks: int = 1) -> int:
    """Bytes of a generation copy of `model` (see generation_copy) for autocast's dtype `low`."""
    copy = generation_copy(model, low, "meta", expert_ranks)
    return sum(t.numel() * t.element_size() for t in [*copy.parameters(), *copy.buffers()])


def training_state_bytes(model, world: int) -> int:
    """Bytes of a rank's share of the training state over `world` ranks: the fp32 weights, and the
    trainable ones' gradient and AdamW's two moments."""
    return sum(p.numel() * (16 if p.requires_grad else 4) for p in model.parameters()) // world


def ranks_sharing_experts(place: str) -> int:
    """Over how many ranks a generation copy at `place` spreads each MoE layer's experts."""
    return rank_and_world()[1] if place == "experts" else 1


def experts_split(model, world: int) -> bool:
    """Whether every MoE layer's experts split evenly over `world` > 1 ranks."""
    blocks = moe.moe_blocks(model)
    return world > 1 and bool(blocks) and all(b.cfg.num_experts % world == 0 for b in blocks)


def generation_place(cfg, model) -> str:
    """Where rollouts run: "copy", "experts" or "model" (cfg.generate_on; see above). auto: a copy,
    unless on a GPU the copy and this rank's training state would pass GENERATE_SHARE of its memory;
    then the experts spread over the ranks where they split evenly and that fits, else the model."""
    if cfg.generate_on != "auto":
        return cfg.generate_on
    device, world = modeling.model_device(model), rank_and_world()[1]
    if device.type != "cuda":
        return "copy"
    low, budget = modeling.compute_dtype(device), GENERATE_SHARE * torch.cuda.get_device_properties(device).total_memory
    state = training_state_bytes(model, world)
    if copy_bytes(model, low) + state <= budget:
        return "copy"
    return "experts" if experts_split(model, world) and copy_bytes(model, low, world) + state <= budget else "model"


# The update's memory (--update_memory). "full" keeps the generation copy through the update and,
# under FSDP, each unit gathered from an update's first micro-batch to its last with its gradients
# reduced once, at the last: one all-gather and one reduce-scatter per unit and update, but every
# rank holds the whole model twice and its full fp32 gradient, which no number of GPUs shrinks.
# "lean" frees the copy while the policy trains, and gathers each unit (the root's too) and
# reduce-scatters its gradients per micro-batch: one unit at a time, collectives per micro-batch.
LEAN_SHARE = 0.4     # auto: lean where what full holds beyond lean passes this share of the GPU's memory


def full_update_bytes(model, low, sharded: bool, place: str = "copy") -> int:
    """Bytes that update_memory=full holds through an update beyond lean: the generation copy (made
    where one is made: several processes, or autocast's dtype `low`, and not at place "model"), and
    `sharded` (FSDP) the whole model gathered (in `low`, FSDP's parameter dtype, else fp32) and the
    trainable weights' fp32 gradient, accumulated unreduced. (The 8b preset as RL trains it: 21 +
    18 + 33 GB.)"""
    held = copy_bytes(model, low, ranks_sharing_experts(place)) if (sharded or low is not None) and place != "model" else 0
    if sharded:
        held += modeling.count_params(model) * (low.itemsize if low is not None else 4)
        held += sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    return held


def lean_updates(cfg, model, place: str = "copy") -> bool:
    """Whether the episode's updates run lean (cfg.update_memory; see above). auto: on a GPU where
    full would hold more than LEAN_SHARE of its memory beyond lean; full elsewhere (the CPU)."""
    if cfg.update_memory != "auto":
        return cfg.update_memory == "lean"
    device = modeling.model_device(model)
    if device.type != "cuda":
        return False
    held = full_update_bytes(model, modeling.compute_dtype(device), dist.is_initialized(), place)
    return held > LEAN_SHARE * torch.cuda.get_device_properties(device).total_memory


# ==============================================================================================
# 11. Dynamic sampling (§4.2.3, DAPO): groups whose learning signal does not vary are dropped and
# fresh prompts drawn, up to a per-rank quota

class PromptPool:
    """The stage's training prompts (stream positions of its mixture, optionally pass@k-filtered),
    handed out without repeats (a seeded permutation per pass) and decoded when taken; `pos`, the
    cursor, is saved with checkpoints. Bad samples are reported and counted, and skipped."""

    def __init__(self, mixture: data.Mixture, positions: list, seed: int, direct: Optional[data.Mixture] = None,
                 direct_share: float = 0.0):
        self.mixture, self.positions, self.seed, self.pos = mixture, list(positions), seed, 0
        self.direct, self.direct_share = direct, direct_share

    def take(self, n: int) -> list:
        out, misses = [], 0
        while len(out) < n:
            epoch, k = divmod(self.pos, len(self.positions))
            self.pos += 1
            pick = self.positions[np.random.default_rng([self.seed, epoch]).permutation(len(self.positions))[k]]
            try:
                out.append(load_prompt(self.mixture, pick, self.direct, self.direct_share))
            except data.DataError as e:
                if epoch == 0:                   # each sample counted once, good or bad: in the first pass
                    self.mixture.bad.bad(e)
                misses += 1
                if misses >= len(self.positions):
                    raise data.TooMuchBadData(f"no usable prompt in a whole pass of the pool: "
                                              f"{self.mixture.bad.report()}") from None
                continue
            misses = 0
            if epoch == 0:
                self.mixture.bad.good()
        return out


def asked_directly(seed: int, k: int, share: float) -> bool:
    """Whether the prompt at stream position k is asked in direct mode: a `share` of the positions,
    a pure function of (seed, k), so a resumed run and every rank agree."""
    return share > 0 and np.random.default_rng([seed, k, 2]).random() < share


def load_prompt(mixture: data.Mixture, k: int, direct: Optional[data.Mixture] = None, share: float = 0.0) -> Prompt:
    """The prompt at stream position k: from `direct` (the same mixture without the think prompt)
    when asked_directly, else from `mixture`."""
    think = direct is None or not asked_directly(mixture.seed, k, share)
    s = mixture.load(k) if think else direct.load(k)
    return Prompt(s["input_ids"].tolist(), s["pixel_values"], s.get("answer"), family_of(s), s["source"], think,
                  s.get("question", ""))


def quota(cfg) -> int:
    """This rank's share of cfg.prompts_per_episode groups."""
    rank, world = rank_and_world()
    return cfg.prompts_per_episode // world + (rank < cfg.prompts_per_episode % world)


def shuffle_within_groups(adv, G: int, generator):
    """The control runs' advantages: each group's own values dealt to its G rollouts at random.
    Each group still sums to 0, so what all its rollouts share (the format, the think tags) gets
    no net push, as in the real run; only which rollout gets which value is no longer the reward's."""
    n = adv.shape[0] // G
    perm = torch.rand(n, G, generator=generator).argsort(1) + torch.arange(0, n * G, G)[:, None]   # (groups, G)
    return adv[perm.flatten().to(adv.device)]


def control_advantages(rolls: list, cfg, generator):
    """Advantages not tied to what a control run must not learn from. "answer": the rewards with
    each group's answer scores dealt at random among its rollouts, each keeping its own format
    score (the format still taught, which answer is right no longer). "shuffle": the advantages
    themselves dealt at random within each group (shuffle_within_groups). "sign": the same, times a
    random sign per group. The last two carry no direction at all, and a random walk of Adam steps
    at the real run's LR breaks the format the real run keeps (README, RL section)."""
    G = cfg.group_size
    if cfg.advantage_control == "answer":
        answers = shuffle_within_groups(torch.tensor([r.answer_r for r in rolls]), G, generator)
        fmts = torch.tensor([r.format_r for r in rolls])
        return group_advantages(verifiable_reward(answers, fmts, cfg.reward_weights, cfg.format_gate), G)
    adv = shuffle_within_groups(group_advantages(torch.tensor([r.reward for r in rolls]), G), G, generator)
    if cfg.advantage_control == "sign":
        signs = torch.randint(0, 2, (adv.shape[0] // G, 1), generator=generator) * 2 - 1       # (groups, 1)
        adv = (adv.view(-1, G) * signs.to(adv)).flatten()
    return adv


def learning_signal(r: Rollout, cfg) -> float:
    """What dynamic sampling asks to vary within a group (cfg.dynamic_sampling_on; auto: by reward).
    Verifiable rewards: the accuracy, as DAPO filters (a format difference alone does not keep a
    group whose answers are all wrong or all right). Mixed rewards (§4.2.5): the reward itself,
    whose think and format terms are what the stage adds: on its hard cases most groups have no
    right answer, and filtering on accuracy dropped 3 of 4 groups together with the think and
    format differences they held."""
    on = cfg.dynamic_sampling_on
    if on == "auto":
        on = "answer" if cfg.reward == "verifiable" else "reward"
    return r.answer_r if on == "answer" else r.reward


def kept_groups(rolls: list, cfg) -> list:
    """The rollouts of the groups whose learning signal varies, and so does the reward the
    advantages come from (answers that vary in replies all malformed are all rewarded 0: advantages
    all 0). Rewards are a few Python numbers per rollout: this and set_advantages compute on the CPU."""
    if not rolls:
        return []
    ok = (filter_groups(torch.tensor([learning_signal(r, cfg) for r in rolls]), cfg.group_size)
          & filter_groups(torch.tensor([r.reward for r in rolls]), cfg.group_size)).tolist()
    return [r for i, r in enumerate(rolls) if ok[i // cfg.group_size]]


def set_advantages(kept: list, cfg, seed: int) -> None:
    """Each kept rollout's advantage within its group (a control run's: control_advantages, seeded)."""
    if not kept:
        return
    if cfg.advantage_control:
        adv = control_advantages(kept, cfg, torch.Generator().manual_seed(seed))
    else:
        adv = group_advantages(torch.tensor([r.reward for r in kept]), cfg.group_size)
    for r, a in zip(kept, adv.tolist()):
        r.advantage = a


def sample_groups(policy, tok, pool: PromptPool, cfg, generator, judge=None) -> tuple:
    """This rank's kept groups (with advantages) and the episode's statistics over all ranks.
    At most cfg.max_sampling_rounds rounds of fresh prompts: every rank takes the same prompts from
    the pool and samples its share; a group is kept when its `learning_signal` and its reward vary,
    up to this rank's quota; the rounds stop when every rank is full, and training goes on with
    what is there. A round draws for the rank that needs the most; a rank that needs fewer cuts its
    share, and its unused prompts come again in the pool's next pass."""
    device = modeling.model_device(policy)
    rank, world = rank_and_world()
    kept, seen, all_rolls = [], 0, []
    for _ in range(cfg.max_sampling_rounds):
        need = int(modeling.all_reduce([quota(cfg) - len(kept) // cfg.group_size], device, "max")[0])
        if need <= 0:
            break
        prompts = pool.take(need * world)                            # the same list on every rank
        mine = my_share(prompts)[:quota(cfg) - len(kept) // cfg.group_size]
        rolls = rollouts(policy, tok, mine, cfg, generator)
        score_rollouts(rolls, cfg, judge)
        all_rolls += rolls
        seen += len(mine)
        kept += kept_groups(rolls, cfg)
    set_advantages(kept, cfg, cfg.seed + len(all_rolls))
    sums = modeling.all_reduce([len(all_rolls), sum(r.reward for r in all_rolls), sum(r.answer_r for r in all_rolls),
                                sum(r.format_r for r in all_rolls), sum(r.think_r for r in all_rolls),
                                sum(len(r.completion) for r in all_rolls), sum(r.truncated for r in all_rolls),
                                len(kept) // cfg.group_size, seen], device)
    n = max(1.0, sums[0])
    stats = {"reward": sums[1] / n, "acc": sums[2] / n, "fmt": sums[3] / n, "think": sums[4] / n,
             "len": sums[5] / n, "trunc": sums[6] / n, "kept": int(sums[7]), "groups": int(sums[8])}
    return kept, stats


# ==============================================================================================
# 12. Updates (§4.2.3): old log-probs, mini-batches x epochs, packed micro-batches, one normaliser

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


def completion_logps(model, pack: dict, cfg, n_valid: int, banned=()) -> tuple:
    """Per sample of the pack: the policy's log-probs (L_i,) of its completion tokens and its
    entropy there. A training-mode forward (no dropout in this model), the same code for the old
    log-probs and the update, so the first update's ratio is exactly 1. The logits are made a chunk
    of positions at a time and again in backward (model.over_chunks), for the completion tokens
    only: never the pack's (T, V) (8k x 152k: 2.5 GB in bf16, and the fp32 log-softmax, its exp
    and their grads 5 GB each)."""
    def chunk_terms(h, weight, targets):                                  # (C, H), (V, H), (C,)
        keep = targets != -100
        return policy_logprobs(F.linear(h[keep], weight), targets[keep], cfg, n_valid, banned)

    device = modeling.model_device(model)
    p = train_stage.to_device(pack, device)
    with modeling.autocast(device):
        chunks = model(p["input_ids"], p.get("pixel_values"), p["labels"], position_ids=p["position_ids"],
                       cu_seqlens=p["cu_seqlens"], per_token=chunk_terms).per_token
    logp, ent = (torch.cat(t) for t in zip(*chunks))                       # (n_completion,) each
    keep, cu = pack["labels"][0, 1:] != -100, pack["cu_seqlens"].tolist()   # the host pack's: no device sync
    lens = [int(keep[a:b - 1].sum()) for a, b in zip(cu[:-1], cu[1:])]
    return list(logp.split(lens)), list(ent.split(lens))


def padded(rows: list, device, fill=0.0):
    """A list of 1-D tensors -> (B, T) padded matrix and its mask, on `device`."""
    T_max = max(1, max(len(r) for r in rows))
    x = torch.full((len(rows), T_max), fill, dtype=torch.float32, device=device)
    m = torch.zeros(len(rows), T_max, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        x[i, :len(r)], m[i, :len(r)] = r, True
    return x, m


def split_mini_batches(rolls: list, cfg) -> list:
    """cfg.mini_batches contiguous chunks of whole groups (rollout indices) of this rank's kept
    groups. When every rank keeps the same number of groups, the union over ranks of chunk k is
    chunk k of one process holding all of them (groups dealt round-robin)."""
    n_groups = len(rolls) // cfg.group_size
    return [[g * cfg.group_size + j for g in chunk.tolist() for j in range(cfg.group_size)]
            for chunk in np.array_split(np.arange(n_groups), cfg.mini_batches)]


def old_logprobs(model, mbs: list, packs: list, cfg, tok) -> dict:
    """{rollout index: log-probs under the rollout policy}, before any update of the episode, for the
    mini-batches that need them: all but the first in the first epoch, whose own forward is that
    policy (none with one mini-batch and one epoch). Every pack of `packs` is run, padding ones too,
    as the updates run them, so the ranks stay in step."""
    old = {}
    with torch.no_grad():
        for k, (mb, mb_packs) in enumerate(zip(mbs, packs)):
            if k == 0 and cfg.epochs == 1:
                continue
            for pack, idx in mb_packs:
                lps = completion_logps(model, pack, cfg, tok.n_vocab, banned_ids(tok))[0]
                old.update({mb[i]: lp for i, lp in zip(idx, lps)})
    return old


SUM_STATS = ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean")     # token-weighted means


def micro_step(model, pack: dict, rows: list, olds, cfg, tok, n_global: float, weight: float) -> tuple:
    """Forward and backward of one packed micro-batch with the mini-batch's global normaliser.
    `olds` None: the rollout policy is the current one (ratio 1). `weight` 0: a padding pack that
    only keeps this rank in step with the others' collectives. -> (sums, maxes) for the stats."""
    device = modeling.model_device(model)
    _, world = rank_and_world()
    lps, ents = completion_logps(model, pack, cfg, tok.n_vocab, banned_ids(tok))
    logp, mask = padded(lps, device)                                        # (B, T)
    old_lp, _ = padded([lp.detach() for lp in lps] if olds is None else olds, device)
    adv = torch.tensor([r.advantage for r in rows], device=device)        # (B,)
    loss, st = policy_loss(logp, old_lp, adv, mask, cfg.algo, cfg.clip_low, cfg.clip_high, cfg.agg, n_global,
                           clip_c=cfg.clip_c, norm_len=cfg.max_new_tokens)   # Dr.GRPO's constant, not T
    (loss * (weight * world)).backward()                                   # FSDP averages gradients over ranks
    dlogp = [(torch.tensor(r.rollout_logp, device=device) - lp.detach()).abs().max()   # the rollout's own log-probs
             for r, lp in zip(rows, lps) if len(lp)] if olds is None and weight else []    # vs the recompute
    stats = [st["n_tokens"], *(st[key] for key in SUM_STATS), loss.detach(),
             sum((e.detach().sum() for e in ents), torch.zeros((), device=device)),
             (logp.detach() - old_lp).abs().masked_fill(~mask, 0).max(),
             torch.stack(dlogp).max() if dlogp else torch.zeros((), device=device)]
    n, *means, loss_v, ent, ratio_dev, dlogp_max = torch.stack([t.float().to(device) for t in stats]).tolist()  # one read
    n *= weight
    sums = dict(zip(SUM_STATS, (m * n for m in means)), tokens=n, loss=loss_v * weight, entropy=ent * weight)
    return sums, {"ratio_dev": ratio_dev * weight, "dlogp": dlogp_max}


def update_episode(model, opt, params, rolls: list, cfg, tok, filler: Rollout, lr_at=None, lean=False) -> dict:
    """The episode's updates: this rank's rollouts in cfg.mini_batches mini-batches x cfg.epochs
    epochs (paper: 2048 rollouts / 512 x 2 = 8 updates), each split into packed micro-batches whose
    losses use the mini-batch's normaliser over all ranks, so they sum to its loss. Every rank runs
    the same number of micro-batches (FSDP's collectives): a rank with fewer pads with `filler`
    packs of weight 0; a mini-batch empty on every rank is no update. `lr_at(update)` sets the LR
    of each update. Under FSDP each unit is gathered and its gradients reduced once per update, or
    per micro-batch when `lean` (see lean_updates). Stats are over all ranks: means per update run,
    `ratio_max_dev` of the first update (0: the rollout policy itself) and `ratio_max_dev_later` of
    the others (> 0 once the policy moved)."""
    device = modeling.model_device(model)
    sharded = modeling.is_sharded(model)
    if sharded:
        model.set_reshard_after_forward(lean)
    img_id = model.cfg.img_context_token_id
    agg = cfg.agg or AGG_DEFAULTS[cfg.algo]
    mbs = split_mini_batches(rolls, cfg)
    packs = [micro_batches([rolls[i] for i in mb], cfg.max_tokens, img_id) for mb in mbs]
    n_packs = modeling.all_reduce([len(p) for p in packs], device, "max")
    pad = (micro_batches([filler], cfg.max_tokens, img_id)[0][0], [])      # a pack holding no rollout of ours
    packs = [p + [pad] * (int(n) - len(p)) for p, n in zip(packs, n_packs)]   # as many on every rank
    old = old_logprobs(model, mbs, packs, cfg, tok)
    stats = {key: 0.0 for key in (*SUM_STATS, "loss", "entropy", "dlogp", "ratio_max_dev", "ratio_max_dev_later")}
    stats["updates"] = 0
    for epoch in range(cfg.epochs):
        for k, mb in enumerate(mbs):
            n_local = sum(len(rolls[i].completion) if agg == "token-mean" else bool(rolls[i].completion) for i in mb)
            n_global = modeling.all_reduce([n_local], device)[0]
            if n_global == 0:         # no rank holds a rollout of it (fewer kept groups than mini-batches): no
                continue              # update, which Adam's moments would still move the weights in
            if lr_at is not None:
                lr_at(stats["updates"])
            sums, maxes = Counter(), {"ratio_dev": 0.0, "dlogp": 0.0}
            for j, (pack, idx) in enumerate(packs[k]):
                if sharded:                                        # full: the gathered weights and the unreduced
                    last = lean or j == len(packs[k]) - 1          # gradients stay until the last micro-batch
                    model.set_requires_gradient_sync(last)         # (resharded before the step); lean: per
                    model.set_reshard_after_backward(last)         # micro-batch
                rows = [rolls[mb[i]] for i in idx] or [filler]                 # a pad pack: weight 0
                olds = None if (epoch == 0 and k == 0) or not idx else [old[mb[i]] for i in idx]
                s, m = micro_step(model, pack, rows, olds, cfg, tok, n_global, float(bool(idx)))
                sums.update(s)
                maxes = {key: max(maxes[key], m[key]) for key in maxes}
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats["updates"] += 1
            names = [*SUM_STATS, "entropy", "loss", "tokens"]
            total = dict(zip(names, modeling.all_reduce([sums[key] for key in names], device)))
            high = dict(zip(maxes, modeling.all_reduce(list(maxes.values()), device, "max")))
            for key in (*SUM_STATS, "entropy"):
                stats[key] += total[key] / max(total["tokens"], 1.0)
            stats["loss"] += total["loss"]
            stats["dlogp"] = max(stats["dlogp"], high["dlogp"])
            which = "ratio_max_dev" if epoch == k == 0 else "ratio_max_dev_later"
            stats[which] = max(stats[which], high["ratio_dev"])
    for key in (*SUM_STATS, "entropy", "loss"):                       # means over the updates run
        stats[key] /= max(stats["updates"], 1)
    return stats


# ==============================================================================================
# 13. Held-out evaluation: greedy accuracy, pass@1, maj@k and pass@k, with intervals

def family_of(sample_dict: dict) -> str:
    """The synthetic family of a sample: its manifest's folder, else its task."""
    where = sample_dict.get("source", "")
    return os.path.basename(os.path.dirname(where.rsplit(":", 1)[0])) or sample_dict.get("task", "")


def prompt_sources(cfg, split: str) -> list:
    """The stage's prompt manifests: --manifests / --eval_manifests, else its synthetic mix, where a
    family's RL split (rl.jsonl / rl_eval.jsonl: scenes no SFT stage reads) replaces train / eval."""
    own = cfg.manifests if split == "train" else cfg.eval_manifests
    out = []
    for path, w in train_stage.stage_sources(cfg, split):
        rl_path = os.path.join(os.path.dirname(path), ("rl" if split == "train" else "rl_eval") + ".jsonl")
        out.append((rl_path if not own and os.path.exists(rl_path) else path, w))
    return out


def prompt_data_config(cfg, model_cfg) -> data.DataConfig:
    """How RL, the pass@k filter and harvest read prompts: the think prompt on, at most
    cfg.max_tokens, the run's bad-data limit and image root."""
    return data.DataConfig.from_model(model_cfg, label_mode="rl", think="on", max_len=cfg.max_tokens,
                                      max_bad_fraction=cfg.max_bad_fraction, image_root=cfg.image_root)


def prompt_mixture(cfg, tok, dcfg, split: str) -> data.Mixture:
    return data.Mixture(prompt_sources(cfg, split), tok, dcfg, seed=cfg.seed if split == "train" else train_stage.EVAL_SEED,
                        training=False, verbose=rank_and_world()[0] == 0)      # bad prompts reported by rank 0


def direct_mixture(cfg, tok, dcfg, split: str) -> Optional[data.Mixture]:
    """The stage's prompts without the think prompt, for its cfg.direct_share asked directly (None at 0)."""
    return prompt_mixture(cfg, tok, dataclasses.replace(dcfg, think="off"), split) if cfg.direct_share else None


def read_prompts(cfg, tok, dcfg, split: str, limit: int) -> list:
    """Up to `limit` distinct prompts of the stage's mix (train or held-out split), decoded, a
    cfg.direct_share of them in direct mode. The mixture draws with replacement across its
    sources: a repeat is skipped (a held-out prompt counted twice would weigh twice in every mean
    and break the pairing of before and after)."""
    mixture, direct = prompt_mixture(cfg, tok, dcfg, split), direct_mixture(cfg, tok, dcfg, split)
    want, out = min(limit, len(mixture)), {}                      # {where: prompt}, in draw order
    for _ in range(8 * want):
        if len(out) == want:
            break
        k, _ = mixture.next(measure=True)         # its line and image headers: decoded once, below, in its mode
        try:
            prompt = load_prompt(mixture, k, direct, cfg.direct_share)
        except data.DataError as e:               # pixels that fail to decode after good headers
            mixture.record_decode_failure(k, e)
            continue
        out.setdefault(prompt.where, prompt)
    return list(out.values())


def answer_of(r: Rollout) -> Optional[str]:
    """The answer a rollout gives, read as answer_score reads it: in thinking mode its last
    `\\boxed{}`; in direct mode (no box) what the family's rule extracts, else its answer region."""
    if r.prompt.think:
        return final_answer(r.text)
    gold = r.prompt.answer or ""
    if r.prompt.family in data.SYNTH_FAMILIES or checkable(gold):
        return sample.score(r.prompt.family, r.text, "", gold)[1]
    return sample.normalize_answer(sample.answer_region(r.text) or "")


def answer_key_of(r: Rollout):
    """What majority voting counts (maj@k): the answer's key, so that answers equal as answers_match
    compares them ("3", "3.0", "x = 3") are one vote, however written."""
    key = answer_key(answer_of(r) or "")
    return None if key is None else key[1]


def per_prompt(greedy: Rollout, samples: list) -> dict:
    """What the evaluation keeps of one prompt: the greedy answer's scores, each sample's accuracy
    and the majority answer's."""
    keys = [answer_key_of(s) for s in samples]                           # each sample's answer read once
    votes = Counter(k for k in keys if k is not None)
    top = votes.most_common(1)[0][0] if votes else None
    maj = next((s.answer_r for s, k in zip(samples, keys) if k == top), 0.0) if top is not None else 0.0
    return {"where": greedy.prompt.where, "family": greedy.prompt.family, "think": greedy.prompt.think,
            "answer": greedy.prompt.answer, "greedy": greedy.text, "greedy_acc": greedy.answer_r,
            "greedy_reward": greedy.reward, "greedy_fmt": greedy.format_r, "greedy_think": greedy.think_r,
            "samples_acc": [s.answer_r for s in samples], "samples_reward": [s.reward for s in samples],
            "maj_acc": maj}


EVAL_METRICS = {   # metric -> its value for one prompt's record
    "greedy_acc": lambda p: p["greedy_acc"],
    "pass@1": lambda p: sum(p["samples_acc"]) / len(p["samples_acc"]),
    "maj@k": lambda p: p["maj_acc"],
    "pass@k": lambda p: float(max(p["samples_acc"]) == 1.0),
    "reward": lambda p: sum(p["samples_reward"]) / len(p["samples_reward"]),
    "greedy_fmt": lambda p: p["greedy_fmt"],
    "greedy_think": lambda p: p["greedy_think"],
}


def mean_and_se(xs: list) -> tuple:
    n = len(xs)
    m = sum(xs) / max(n, 1)
    var = sum((x - m) ** 2 for x in xs) / max(n - 1, 1)
    return m, math.sqrt(var / max(n, 1))


def mean_se_interval(xs: list) -> dict:
    """{"mean", "se", "interval"}: the mean over prompts, its standard error and a 95% interval:
    Wilson's where every value is 0 or 1 (greedy accuracy, maj@k, pass@k, format: 0 of 16 right is
    [0, 0.19], where mean ± 1.96 SE says [0, 0]), else mean ± 1.96 SE (pass@1, reward)."""
    m, se = mean_and_se(xs)
    if all(x in (0.0, 1.0) for x in xs):
        interval = sample.wilson_interval(round(sum(xs)), len(xs))
    else:
        interval = (m - sample.Z95 * se, m + sample.Z95 * se)
    return {"mean": m, "se": se, "interval": list(interval)}


def summarize(records: list) -> dict:
    """{metric: {"mean", "se", "interval"} (mean_se_interval)} over prompts, plus greedy accuracy per
    family, and per mode with its "n"."""
    out = {"n": len(records), "k": len(records[0]["samples_acc"]) if records else 0}
    for name, f in EVAL_METRICS.items():
        out[name] = mean_se_interval([f(p) for p in records])
    out["greedy_acc_per_family"] = {f: mean_and_se([p["greedy_acc"] for p in records if p["family"] == f])[0]
                                    for f in sorted({p["family"] for p in records})}
    for mode, mine in by_mode(records).items():
        out[f"{mode}_greedy_acc"] = {**mean_se_interval([p["greedy_acc"] for p in mine]), "n": len(mine)}
    return out


def by_mode(records: list) -> dict:
    """{"thinking": records, "direct": records} when the prompts were asked in both modes (rl-mixed's
    --direct_share), else {}."""
    modes = {"thinking": [p for p in records if p.get("think", True)],
             "direct": [p for p in records if not p.get("think", True)]}
    return modes if all(modes.values()) else {}


def paired(before: list, after: list) -> dict:
    """Per metric the paired difference after - before over the same prompts (and the same sample
    seeds), with the recipe's 95% paired bootstrap interval (sample.paired_difference)."""
    def side(records, f):
        return [{"family": p["family"], "where": p["where"], "correct": f(p)} for p in records]
    out = {name: sample.paired_difference(side(after, f), side(before, f)) for name, f in EVAL_METRICS.items()}
    after_modes, greedy = by_mode(after), EVAL_METRICS["greedy_acc"]
    for mode, b in by_mode(before).items():
        out[f"{mode}_greedy_acc"] = sample.paired_difference(side(after_modes[mode], greedy), side(b, greedy))
    return out


EVAL_SEED = 12345      # the sampled half of every evaluation draws from this seed (+ rank, + the call)


@torch.no_grad()
def evaluate_prompts(policy, tok, prompts: list, cfg, judge=None, progress: bool = False) -> list:
    """Per held-out prompt (asked in its mode, thinking or direct): the greedy answer and
    cfg.eval_samples samples at the rollout temperature, scored like the rollouts. Each rank
    answers its share; every rank gets all records, in prompt order. Each generate call draws from
    its own seed (EVAL_SEED, the rank, the call), so a "before" and an "after" give each sample the
    same random number at each step wherever the calls split alike (always on the CPU; on a GPU the
    split follows free memory, prompts_per_call)."""
    rank, _ = rank_and_world()
    mine = my_share(prompts)
    greedy = rollouts(policy, tok, mine, cfg, None, group_size=1, greedy=True, progress=progress)
    sampled = rollouts(policy, tok, mine, cfg, None, group_size=cfg.eval_samples, progress=progress,
                       call_seed=EVAL_SEED + rank)
    score_rollouts(greedy + sampled, cfg, judge)
    k = cfg.eval_samples
    return gather_shares([per_prompt(g, sampled[i * k:(i + 1) * k]) for i, g in enumerate(greedy)])


def eval_line(episode: int, s: dict) -> str:
    """One log line of a held-out evaluation; ± is the larger side of each metric's 95% interval."""
    f = lambda m: sample.plus_minus(s[m]["mean"], s[m]["interval"], digits=3)         # noqa: E731
    return (f"eval {episode:04d} | {s['n']} prompts x {s['k']}, ± 95% | greedy {f('greedy_acc')} | pass@1 {f('pass@1')} | "
            f"maj@{s['k']} {f('maj@k')} | pass@{s['k']} {f('pass@k')} | reward {f('reward')} | fmt "
            f"{f('greedy_fmt')}" + "".join(f" | {m} greedy {f(m + '_greedy_acc')} ({s[m + '_greedy_acc']['n']})"
                                           for m in ("thinking", "direct") if m + "_greedy_acc" in s))


def pass_at_k_filter(policy, tok, prompts: list, cfg, k: int, generator) -> tuple:
    """§4.2.3's difficulty filter with the current model: k samples per prompt; a prompt solved by
    all k is dropped, and one solved by none when its family is one the stage trains to reason on
    (`cfg.reasoning_families`). Each rank samples its share. Returns (kept indices, counts)."""
    mine = my_share(list(range(len(prompts))))
    rolls = rollouts(policy, tok, [prompts[i] for i in mine], cfg, generator, group_size=k)
    solved = gather_shares([sum(answer_score(r, cfg) for r in rolls[j * k:(j + 1) * k])
                            if prompts[i].answer else 0 for j, i in enumerate(mine)])
    hopeless = reasoning_families(cfg)
    why = ["always" if n == k else "never_reasoning" if n == 0 and p.family in hopeless else "kept"
           for p, n in zip(prompts, solved)]
    counts = {w: why.count(w) for w in ("always", "never_reasoning", "kept")}
    return [i for i, w in enumerate(why) if w == "kept"], counts


REASONING_FAMILIES = ("math", "count_cot")     # synthetic families whose answers come with a <think> chain


def reasoning_families(cfg) -> tuple:
    """The families of the stage's own mix that it trains to reason on."""
    return tuple(name for name, _ in train_stage.stage_row(cfg.stage).mix if name in REASONING_FAMILIES)


# ==============================================================================================
# 14. The stages: torchrun rl.py --stage rl-verifiable | rl-mixed | harvest (rows of train_stage.RECIPE)

@dataclass
class RLConfig(train_stage.StageConfig):
    """An RL stage's config: the stage config (folders, data, init, optimizer, seed) with the RL
    stages' defaults, plus the RL settings below. One `--key=value` parser serves both."""
    stage: str = "rl-verifiable"          # rl-verifiable (§4.2.3) | rl-mixed (§4.2.5) | harvest (§4.2.4)
    trainable: str = "language_model"     # the RL rows' tiny value (the paper trains all modules, Table 4)
    label_mode: str = "rl"                # prompts end in the assistant header; no labels
    lr: float = 1e-4                      # peak LR (paper: 1e-6 for 2B-8B models); cosine over all updates. The tiny
                                          # model: 5e-5 moves it slowly, 3e-4 moves its greedy answer, 1e-3 breaks the format
    warmup_steps: int = 5                 # updates (not episodes) of linear warm-up
    save_every: int = 10                  # resumable checkpoint every N episodes; 0 = only the stage output
    eval_every: int = 0                   # held-out evaluation every N episodes (always at the start and end)
    algo: str = ""                        # dapo | gspo | gspo_token ("" = DAPO for dense, GSPO for MoE)
    reward: str = "verifiable"            # verifiable (answer, counted only when well-formed, + format) | mixed (answer + think + format)
    reward_weights: tuple = (0.8, 0.1, 0.1)   # answer,think,format: three comma-separated weights summing to 1 (verifiable uses answer and format)
    judge: str = ""                       # mixed: a checkpoint that grades the thinking (P(yes)); "" = rules
    episodes: int = 30                    # rollout episodes, each followed by mini_batches x epochs updates
    prompts_per_episode: int = 16         # groups kept per episode, over all ranks (paper: 2048 rollouts / G)
    group_size: int = 8                   # G rollouts per prompt
    mini_batches: int = 1                 # updates per epoch (paper: 4 of 512); 1 x 1 = on-policy
    epochs: int = 1                       # passes over an episode's rollouts (paper: 2)
    clip_low: float = -1.0                # -1 = the algorithm's default (DAPO 0.2, GSPO 3e-4)
    clip_high: float = -1.0               # -1 = the algorithm's default (DAPO 0.28, GSPO 4e-4)
    clip_schedule: bool = False           # DAPO: clip_high grown from 0.20 to 0.28 over the run (our reading of §4.2.3)
    clip_c: float = 0.0                   # dual-clip constant for negative advantages (0 = off)
    agg: str = ""                         # loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm ("" = the algorithm's)
    max_new_tokens: int = 512             # generation limit per rollout (a 9-object count_cot chain is ~400 tokens)
    temperature: float = 1.0              # rollout sampling temperature (the policy the loss uses)
    top_p: float = 1.0                    # rollout nucleus sampling (the policy the loss uses)
    batch_rows: int = 128                 # rollout rows per generate call, at most (a GPU takes fewer if they do not fit)
    generate_on: str = "auto"             # copy | experts | model | auto: rollouts on a full copy of the model per rank, on a copy holding the rank's share of each MoE layer's experts (tokens gathered per layer), or on the sharded model itself, gathered per decode step (auto: past the copy on a GPU it would crowd)
    update_memory: str = "auto"           # full | lean | auto: during updates the generation copy kept and FSDP units gathered once per update, or the copy freed and units gathered per micro-batch (auto: lean on a GPU full would crowd)
    compile: str = "auto"                 # the rollout engine under torch.compile: auto (on CUDA, not on CPU) | true | false | graphs (compiled, its decode step as CUDA graphs)
    max_sampling_rounds: int = 3          # dynamic sampling: rounds of fresh prompts before training on what is there
    max_tokens: int = 4096                # tokens per packed update micro-batch
    pool_size: int = 0                    # training prompts the pool holds (0 = the whole mix)
    filter_k: int = 0                     # pass@k difficulty filter of the pool at the start (0 = off)
    general_share: float = 0.0            # rl-mixed: share of unfiltered general prompts kept beside the hard cases
    direct_share: float = 0.0             # share of the prompts (training, held-out) asked in direct mode: no think prompt
    eval_prompts: int = 512               # held-out prompts, evaluated at the start and the end
    eval_samples: int = 8                 # samples per held-out prompt (pass@1, maj@k, pass@k)
    harvest_samples: int = 8              # harvest: completions per prompt
    format_gate: bool = True              # the answer reward counts only in a well-formed reply (false: summed, an ablation)
    dynamic_sampling_on: str = "auto"     # what a group must vary in to be kept: answer (DAPO's accuracy) | reward | auto (answer for verifiable rewards, reward for mixed)
    advantage_control: str = ""           # a control that must not learn: "answer" (answer scores permuted within groups) | "shuffle" (advantages permuted within groups) | "sign" (and a random sign per group)


# the start-up line names these (every option: <out>/<stage>.run/config.json)
RL_SUMMARY_KEYS = ("init_from", "algo", "reward", "episodes", "prompts_per_episode", "group_size", "mini_batches",
                   "lr", "max_new_tokens", "seed")

# stage options that have no meaning in an RL stage: given, they are refused with the reason
RL_UNUSED = {"steps": "use --episodes", "text_only": "", "label_mode": "RL prompts have no labels",
             "packing": "use --max_tokens", "adalrs": "", "adalrs_cfg": "", "ngram_rebalance": "", "eval_packs": "",
             "max_bad_steps": "", "fsdp": "several processes always shard", "auto_steps": "",
             "scale": "", "init_llm": "start from a SAIL-VL2 checkpoint: --init_from", "init_vit": "",
             "preset": "the model comes from its checkpoint", "model_options": "the model comes from its checkpoint",
             "num_workers": "RL reads its prompts in the trainer", "prefetch_factor": "RL reads its prompts in the trainer"}
# options that train, which the harvest (sampling from a finished model) does not read
HARVEST_UNUSED = ("episodes", "prompts_per_episode", "mini_batches", "epochs", "clip_low", "clip_high", "clip_schedule",
                  "clip_c", "agg", "algo", "max_sampling_rounds", "dynamic_sampling_on", "advantage_control", "filter_k", "general_share",
                  "eval_prompts", "eval_samples", "format_gate", "update_memory", "generate_on", *train_stage.TRAINING_ONLY)


RL_STAGES = tuple(s.name for s in train_stage.RECIPE if s.runner == "rl.py")   # what --stage takes here
COMPILE = {"auto": "auto", "true": True, "false": False, "graphs": "graphs"}   # --compile -> generate_from_embeds's


def rl_config(argv: list) -> tuple:
    """(RLConfig, options) from the command line, in train_stage's one option style."""
    opts = train_stage.split_options(argv)
    given = dict(opts)
    stage = given.get("stage", RLConfig.stage)
    row = train_stage.stage_row(stage, RL_STAGES)
    if row.runner != "rl.py":
        raise train_stage.UsageError(f"{stage} is not an RL stage: `{train_stage.command_for(row, RLConfig())}`")
    cfg = RLConfig(stage=stage, trainable=",".join(row.trainable))
    for key, value in [*((k, str(v)) for k, v in row.tiny), *opts]:      # the recipe row's tiny values, then the CLI
        if key in ("stage", "resume", "help"):
            continue
        if (why := RL_UNUSED.get(key.split(".")[0])) is not None:
            raise train_stage.UsageError(f"--{key} does not apply to an RL stage" + (f": {why}" if why else ""))
        train_stage.set_key({"": cfg}, key, value)
    train_stage.check_init_options(cfg)
    train_stage.check_run_options(cfg)
    if stage == "harvest" and (unused := [k for k in given if k.split(".")[0] in HARVEST_UNUSED]):
        raise train_stage.UsageError(f"--{unused[0]} does not apply to the harvest: it samples from a finished model")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0 and 0 < cfg.top_p <= 1):
        raise train_stage.UsageError(f"--temperature must be above 0 (rollouts are sampled) and --top_p in (0, 1], "
                                     f"got {cfg.temperature} and {cfg.top_p}")
    if cfg.judge and not os.path.isdir(cfg.judge):
        raise train_stage.UsageError(f"--judge {cfg.judge}: no such folder")
    if cfg.step_scale <= 0:
        raise train_stage.UsageError(f"--step_scale must be above 0, got {cfg.step_scale:g}")
    if cfg.reward not in ("verifiable", "mixed"):
        raise train_stage.UsageError(f"--reward must be verifiable or mixed, got {cfg.reward!r}")
    if cfg.update_memory not in ("auto", "full", "lean"):
        raise train_stage.UsageError(f"--update_memory must be auto, full or lean, got {cfg.update_memory!r}")
    if cfg.generate_on not in ("auto", "copy", "experts", "model"):
        raise train_stage.UsageError(f"--generate_on must be auto, copy, experts or model, got {cfg.generate_on!r}")
    if cfg.compile not in COMPILE:
        raise train_stage.UsageError(f"--compile must be auto, true, false or graphs, got {cfg.compile!r}")
    if cfg.compile == "graphs" and not torch.cuda.is_available():
        raise train_stage.UsageError("--compile=graphs replays the decode step as CUDA graphs: it needs a GPU")
    if cfg.dynamic_sampling_on not in ("auto", "answer", "reward"):
        raise train_stage.UsageError(f"--dynamic_sampling_on must be auto, answer or reward, got {cfg.dynamic_sampling_on!r}")
    if cfg.advantage_control not in ("", "answer", "shuffle", "sign"):
        raise train_stage.UsageError(f"--advantage_control must be '', answer, shuffle or sign, got {cfg.advantage_control!r}")
    if cfg.advantage_control == "answer" and cfg.reward != "verifiable":
        raise train_stage.UsageError("--advantage_control=answer needs --reward=verifiable")
    if not 0.0 <= cfg.general_share < 1.0:
        raise train_stage.UsageError(f"--general_share must be in [0, 1), got {cfg.general_share}")
    if cfg.general_share and not cfg.filter_k:
        raise train_stage.UsageError("--general_share is the share of general prompts kept beside the hard cases "
                                     "of the pass@k filter: give --filter_k=K too")
    if not 0.0 <= cfg.direct_share <= 1.0:
        raise train_stage.UsageError(f"--direct_share must be in [0, 1], got {cfg.direct_share}")
    if cfg.agg not in ("", *AGG_MODES):
        raise train_stage.UsageError(f"--agg must be {', '.join(AGG_MODES[:-1])} or {AGG_MODES[-1]}, got {cfg.agg!r}")
    if cfg.clip_c and cfg.clip_c <= 1:
        raise train_stage.UsageError(f"--clip_c, the dual-clip constant, must be > 1 (or 0: off), got {cfg.clip_c}")
    for key in ("episodes", "group_size", "mini_batches", "epochs", "prompts_per_episode", "eval_samples",
                "eval_prompts", "max_sampling_rounds"):
        if getattr(cfg, key) < 1:
            raise train_stage.UsageError(f"--{key} must be >= 1, got {getattr(cfg, key)}")
    cfg.episodes = max(1, round(cfg.episodes * cfg.step_scale))   # shortens an RL stage as it does every stage
    try:
        mixed_reward(0, 0, 0, cfg.reward_weights)                  # refuses weights that do not sum to 1
    except ValueError as e:
        raise train_stage.UsageError(f"--reward_weights: {e}") from None
    if cfg.reward_weights[0] + cfg.reward_weights[2] <= 0:
        raise train_stage.UsageError("--reward_weights: the answer and format weights must not both be 0 (the "
                                     "verifiable reward and direct-mode prompts use only those two)")
    return cfg, given


def resolve_algo(cfg: RLConfig, model_cfg) -> RLConfig:
    algo = cfg.algo or ("gspo" if model_cfg.llm_config.num_experts else "dapo")
    if algo not in CLIP_DEFAULTS:
        raise train_stage.UsageError(f"--algo must be one of {', '.join(CLIP_DEFAULTS)}, got {algo!r}")
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


def require_sources(cfg: RLConfig):
    """The synthetic data (unless --manifests), and the checkpoint the stage starts from."""
    rank, _ = rank_and_world()
    if not cfg.manifests:
        if rank == 0:
            data.ensure_synth(cfg.data_dir)
        modeling.barrier()
    missing = train_stage.missing_sources(cfg)
    if missing:
        raise train_stage.UsageError(
            f"{cfg.stage} starts from {train_stage.stage_dir(cfg, missing[0])}, which is missing: run "
            f"`{train_stage.command_for(train_stage.STAGES[missing[0]], cfg)}` first, or pass --init-from=DIR")


FILTER_CHUNK = 256       # pool prompts the pass@k filter decodes at a time (a whole 70k pool's pixels: terabytes)


def filtered_positions(policy, tok, mixture, direct, cfg, generator, log) -> tuple:
    """The pool's stream positions after the pass@k filter (§4.2.3), with its counts; rl-mixed keeps
    a share of unfiltered general prompts beside the hard cases."""
    positions = list(range(min(cfg.pool_size or len(mixture), len(mixture))))
    if not cfg.filter_k:
        return positions, None
    t0 = time.time()
    usable, families, kept, counts = [], [], [], Counter(always=0, never_reasoning=0, kept=0)
    for start in range(0, len(positions), FILTER_CHUNK):          # a chunk's pixels held at a time
        chunk = []
        for k in positions[start:start + FILTER_CHUNK]:
            try:
                chunk.append((k, load_prompt(mixture, k, direct, cfg.direct_share)))
            except data.DataError as e:  # counted here (the pool counts the usable ones when it hands them out)
                mixture.bad.bad(e)
        got, c = pass_at_k_filter(policy, tok, [p for _, p in chunk], cfg, cfg.filter_k, generator)
        kept += [len(usable) + i for i in got]
        counts.update(c)
        usable += [k for k, _ in chunk]
        families += [p.family for _, p in chunk]
    positions, counts, hard = usable, dict(counts), set(kept)
    general = [i for i, f in enumerate(families) if f not in NUMERIC_FAMILIES and i not in hard]
    n_general = round(cfg.general_share * len(kept) / (1 - cfg.general_share))   # share s of the pool: s K / (1 - s)
    counts["general_added"] = len(general[:n_general])
    log(f"pass@{cfg.filter_k} filter ({time.time() - t0:.0f} s): {counts}")
    if not kept:
        raise train_stage.UsageError(f"{cfg.stage}: no prompt left after the pass@{cfg.filter_k} filter ({counts}); "
                                     f"the policy solves everything or nothing: lower --filter_k or use other data")
    return [positions[i] for i in sorted(kept + general[:n_general])], counts


# options that define the saved run's prompt pool (its positions, cursor and direct-mode share) and its
# held-out evaluation (the "before" side is saved, and "after" must be sampled and scored alike; max_tokens
# is the prompts' length limit): a resume with other values is refused
FIXED_ON_RESUME = ("seed", "data_dir", "manifests", "eval_manifests", "image_root", "pool_size",
                   "filter_k", "general_share", "direct_share", "eval_prompts", "eval_samples", "max_tokens",
                   "max_new_tokens", "temperature", "top_p", "reward", "reward_weights", "format_gate", "judge")


def resume_rl(path: str, cfg: RLConfig, model, opt, gen, rank: int, world: int, log) -> dict:
    """Weights, optimizer state (run with this run's options), the RNGs and the rollout generator
    from an RL checkpoint; returns its metadata (episode, prompt pool, the first evaluation).
    Options changed since the checkpoint are logged; one in FIXED_ON_RESUME is refused."""
    meta, rank_state = modeling.load_checkpoint(path, model, opt, rank, world)
    if meta["episode"] > cfg.episodes:
        raise train_stage.UsageError(f"{path} is at episode {meta['episode']}, past this run's {cfg.episodes} "
                                     f"episodes: resume with --episodes of at least {meta['episode']}, or start afresh")
    changed = train_stage.changed_options(meta.get("config", {}), asdict(cfg))
    if fixed := [c for c in changed if c.split(" ")[0] in FIXED_ON_RESUME]:
        raise train_stage.UsageError(f"{path} was saved with other prompts or held-out evaluation ({', '.join(fixed)}): "
                                     "resume with its values, or start the stage afresh")
    if changed:
        log(f"resume: options changed since {path} was saved, continuing with the new values: {', '.join(changed)}")
    train_stage.set_optimizer_options(opt, cfg)        # the loaded state carries the saving run's options
    modeling.set_rng_state(rank_state["rng"])
    restore_generator(gen, rank_state, rank, meta["world_size"], cfg.seed, meta["episode"])
    log(f"resume: continuing from {path} at episode {meta['episode']}")
    return meta


def restore_generator(gen, rank_state: dict, rank: int, saved_world: int, seed: int, episode: int):
    """A rank's rollout generator from its checkpoint; a rank the saving run did not have (resumed
    on more processes), or a generator of another device type (a CPU run resumed on a GPU: their
    states differ in kind and size), gets a stream of its own, seeded from (seed, rank, episode)."""
    state = rank_state["generator"] if rank < saved_world else None
    if state is not None and state.numel() == gen.get_state().numel():
        gen.set_state(state)
    else:
        gen.manual_seed(int(np.random.default_rng([seed, rank, episode]).integers(2 ** 62)))


def save_rl_checkpoint(cfg: RLConfig, episode: int, model, opt, gen, files: dict, run_state: dict):
    """A resumable checkpoint out/<stage>.run/step-NNNNNN/ through the one writer (weights, optimizer,
    every RNG and each rank's rollout generator, `run_state`: the prompt pool, the filter's counts,
    the first evaluation), then only the newest --keep_checkpoints kept."""
    rank, world = rank_and_world()
    rdir = train_stage.run_dir(cfg)
    meta = {"stage": cfg.stage, "episode": episode, "step": episode, "config": asdict(cfg), **run_state}
    modeling.save_checkpoint(os.path.join(rdir, f"step-{episode:06d}"), model, meta, rank, world,
                             {"rng": modeling.rng_state(), "generator": gen.get_state()},
                             extra_files=files, model_cfg=model.cfg, opt=opt)
    if rank == 0:
        modeling.prune_checkpoints(rdir, cfg.keep_checkpoints, episode)


def generation_and_update_memory(cfg: RLConfig, model, log) -> tuple:
    """(where rollouts run, the generation policy, whether updates run lean): --generate_on and
    --update_memory resolved for this model and machine, and said in the log."""
    place, sharded, world = generation_place(cfg, model), modeling.is_sharded(model), rank_and_world()[1]
    if place == "experts" and not experts_split(model, world):
        experts = sorted({b.cfg.num_experts for b in moe.moe_blocks(model)}) or "no MoE layer"
        raise train_stage.UsageError(f"--generate_on=experts: needs several processes and an MoE model whose experts "
                                     f"split evenly over them ({world} processes, experts per layer: {experts})")
    in_step = place == "experts" or place == "model" and sharded
    if in_step and cfg.compile in ("true", "graphs"):
        raise train_stage.UsageError(f"--compile={cfg.compile}: generation on the experts spread over the ranks or on "
                                     f"the sharded model (--generate_on={cfg.generate_on}) runs eagerly, its forwards "
                                     "collectives: give --generate_on=copy or --compile=auto")
    policy = generation_policy(model, place=place)
    if place == "model":
        log("generation: on the " + ("sharded model (each unit gathered per decode step; eager)" if sharded else
                                     "model itself (no copy)"))
    if place == "experts":
        log(f"generation: on a copy holding 1/{world} of each MoE layer's experts (tokens gathered per layer; eager)")
    if lean := lean_updates(cfg, model, place) and (policy is not model or sharded):   # else nothing to free
        log("update memory: lean (" + ("" if policy is model else "the generation copy freed during updates, ")
            + "sharded units gathered per micro-batch)")
    return place, policy, lean


def train_rl(cfg: RLConfig, resume: Optional[str] = None) -> str:
    """One RL stage: held-out evaluation, then per episode dynamic sampling, advantages and the
    updates, then the evaluation again on the same prompts and draws; checkpoints through
    train_stage's one writer; returns out/<stage>/."""
    started = time.time()
    rank, world, device = train_stage.setup_distributed()
    log = lambda *a: train_stage.print0(rank, *a)                       # noqa: E731
    resume = modeling.all_gather(resume)[0]      # rank 0's choice: nodes may list the run folder differently
    modeling.seed_all(cfg.seed + rank)
    require_sources(cfg)
    train_stage.writable_dir(cfg.out_dir)                # (after the refusals: a refused run makes no folder)
    model, model_cfg = train_stage.place_model(cfg, modeling.preset_config(cfg.preset), rank, world, device, log, resume)
    cfg = resolve_algo(cfg, model_cfg)
    tok_dir = train_stage.tokenizer_dir(cfg)
    tok, tok_files = data.load_tokenizer(tok_dir), train_stage.tokenizer_files(tok_dir)
    dcfg = prompt_data_config(cfg, model_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train_stage.build_optimizer(cfg, params, device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)       # each rank its own draws
    rdir = train_stage.run_dir(cfg)
    if rank == 0 and not resume:
        train_stage.clear_earlier_run(cfg, log)
    eval_set = read_prompts(cfg, tok, dcfg, "eval", cfg.eval_prompts)
    mixture, direct = prompt_mixture(cfg, tok, dcfg, "train"), direct_mixture(cfg, tok, dcfg, "train")
    judge = ModelJudge(cfg.judge, device) if cfg.judge else None
    place, policy, lean = generation_and_update_memory(cfg, model, log)
    meta = resume_rl(resume, cfg, model, opt, gen, rank, world, log) if resume else {}
    episode = meta.get("episode", 0)
    started -= meta.get("seconds", 0.0)          # the stage's time: the runs before the resume, up to its checkpoint
    if resume:
        policy = generation_policy(model, policy, place)
        positions, filter_counts = meta["pool"]["positions"], meta["filter"]
        mixture.bad.load_state_dict(meta["pool"]["bad"])
    else:
        positions, filter_counts = filtered_positions(policy, tok, mixture, direct, cfg, gen, log)
    pool = PromptPool(mixture, positions, cfg.seed, direct, cfg.direct_share)
    pool.pos = meta.get("pool", {}).get("pos", 0)
    filler = Rollout(eval_set[0], [next(iter(sample.stop_ids(tok)))], "", False, [0.0])
    train_stage.log_config(cfg, model.cfg, rdir, rank, log, RL_SUMMARY_KEYS)
    metrics = train_stage.open_metrics(os.path.join(rdir, "metrics.jsonl"), episode, "episode") if rank == 0 else None
    before = meta.get("before") or evaluate_prompts(policy, tok, eval_set, cfg, judge, progress=rank == 0)
    if not resume:
        log(eval_line(0, summarize(before)))
    per_episode = cfg.mini_batches * cfg.epochs
    schedule = dataclasses.replace(cfg, steps=cfg.episodes * per_episode)

    def set_lr(update: int):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * train_stage.lr_multiplier(episode * per_episode + update, schedule)
    start = episode
    while True:
        last = episode == cfg.episodes
        if cfg.save_every and episode % cfg.save_every == 0 and episode > start and not last:
            save_rl_checkpoint(cfg, episode, model, opt, gen, tok_files, {"filter": filter_counts, "before": before,
                               "pool": {"positions": positions, "pos": pool.pos, "bad": mixture.bad.state_dict()},
                               "seconds": round(time.time() - started, 1)})
        if last:
            after = evaluate_prompts(policy, tok, eval_set, cfg, judge, progress=rank == 0)
            log(f"data: {mixture.bad.report()}")
            counts = {"filter": filter_counts, "bad_data": mixture.bad.state_dict(),
                      "seconds": round(time.time() - started, 1)}
            return finish(cfg, model, before, after, counts, metrics, tok_files, log)
        t0, episode_cfg = time.time(), dataclasses.replace(cfg, clip_high=clip_high_at(cfg, episode))
        kept, st = sample_groups(policy, tok, pool, episode_cfg, gen, judge)
        t_gen = time.time() - t0
        if lean and st["kept"] and policy is not model:
            policy = None                                              # the copy's memory, for the update
        model.train()
        up = update_episode(model, opt, params, kept, episode_cfg, tok, filler, set_lr, lean) if st["kept"] \
            else {"updates": 0}
        policy = generation_policy(model, policy, place)
        episode += 1
        rec = {"episode": episode, "lr": opt.param_groups[0]["lr"], "clip_high": clip_high_at(cfg, episode - 1),
               **st, **up, "gen_seconds": t_gen, "seconds": time.time() - t0}
        log(episode_line(episode, cfg, rec))
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if cfg.eval_every and episode % cfg.eval_every == 0 and episode < cfg.episodes:
            log(eval_line(episode, summarize(evaluate_prompts(policy, tok, eval_set, cfg, judge))))


def episode_line(episode: int, cfg, rec: dict) -> str:
    line = (f"episode {episode:04d}/{cfg.episodes:04d} | reward {rec['reward']:.3f} | acc {rec['acc']:.3f} | fmt "
            f"{rec['fmt']:.3f} | kept {rec['kept']}/{rec['groups']} groups | lr {rec['lr']:.2e} | len {rec['len']:.0f} "
            f"| trunc {100 * rec['trunc']:.0f}%")
    if not rec["updates"]:
        return line + " | no group whose learning signal varies: no update"
    return line + (f" | clip lo/hi {rec['clip_frac_low']:.3f}/{rec['clip_frac_high']:.3f} | ent {rec['entropy']:.3f} | "
                   f"kl {rec['approx_kl']:.4f} | dlogp {rec['dlogp']:.1e} | {rec['gen_seconds']:.1f}/{rec['seconds']:.1f} s")


def finish(cfg, model, before: list, after: list, counts: dict, metrics, tok_files: dict, log) -> str:
    """The paired differences of the evaluations before and after training (the same prompts and
    draws), and the stage output (weights; heldout_predictions.jsonl: every prompt before and after,
    its greedy answer's correctness as the recipe's effects read it, and every metric; `counts`:
    the pool filter's and the bad prompts', and the stage's seconds, into meta.json)."""
    rank, world = rank_and_world()
    s_before, s_after, diff = summarize(before), summarize(after), paired(before, after)
    log(eval_line(cfg.episodes, s_after))
    log("paired after - before: " + " | ".join(f"{m} {d['difference']:+.3f} [{d['interval'][0]:+.3f}, "
                                               f"{d['interval'][1]:+.3f}]" for m, d in diff.items()))
    rdir = train_stage.run_dir(cfg)
    if metrics:
        metrics.write(json.dumps({"episode": cfg.episodes, "eval": {"before": s_before, "after": s_after,
                                                                   "paired": diff}}) + "\n")
        metrics.close()
        data.write_atomic(os.path.join(rdir, train_stage.RL_HELDOUT), "".join(     # the recipe's effects read it
            json.dumps({"side": side, "correct": bool(p["greedy_acc"]), **{m: g(p) for m, g in EVAL_METRICS.items()},
                        **p}) + "\n" for side, recs in (("before", before), ("after", after)) for p in recs))
    modeling.barrier()
    meta = {"stage": cfg.stage, "step": cfg.episodes, "config": asdict(cfg), **counts,
            "reward": {"before": s_before["reward"]["mean"], "after": s_after["reward"]["mean"]},
            "rl_eval": {"before": s_before, "after": s_after, "paired": diff},
            "final_loss": None, "first_loss": None, "eval_loss": None}
    out = train_stage.stage_dir(cfg)
    modeling.save_checkpoint(out, model, meta, rank, world, model_cfg=model.cfg,
                             extra_files={"metrics.jsonl": os.path.join(rdir, "metrics.jsonl"),
                                             train_stage.RL_HELDOUT: os.path.join(rdir, train_stage.RL_HELDOUT),
                                             **tok_files})
    return out


# ==============================================================================================
# 15. Data tools: the CoT harvest for Think-Fusion SFT (§4.2.4) and the pass@k filter (§4.2.3)

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


def inference_model(cfg, device, log):
    """The stage's starting checkpoint, whole on every rank (inference only: no sharding), held for
    generation (model.for_generation: on a GPU its LLM's matrices in bf16, read straight into them
    there, not first whole in fp32 on every rank's host)."""
    require_sources(cfg)
    model = train_stage.build_stage_model(cfg, modeling.preset_config(cfg.preset), log, device,
                                          modeling.compute_dtype(device))
    model = modeling.for_generation(model, device)
    tok = data.load_tokenizer(train_stage.tokenizer_dir(cfg))
    return model, tok, prompt_data_config(cfg, model.cfg)


def harvest(cfg: RLConfig) -> str:
    """Rejection sampling from the RL model (§4.2.4): harvest_samples completions per prompt of the
    harvest mix (each rank samples its share); those with answer = format = 1 are kept,
    deduplicated, as LongCoT records in out/harvest/cot.jsonl, which the thinkfusion stage reads
    (its mix's `out:harvest/cot.jsonl`)."""
    started = time.time()
    rank, world, device = train_stage.setup_distributed()
    log = lambda *a: train_stage.print0(rank, *a)                       # noqa: E731
    model, tok, dcfg = inference_model(cfg, device, log)
    prompts = read_prompts(cfg, tok, dcfg, "train", cfg.pool_size or 256)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    k = cfg.harvest_samples
    mine = rollouts(model, tok, my_share(prompts), cfg, gen, group_size=k,
                    progress=rank == 0)
    judged = gather_shares([[(r.prompt.where, r.text, reward_answer(r.text, r.prompt.answer) == 1.0
                              and reward_format(r.text) == 1.0) for r in mine[i * k:(i + 1) * k]]
                            for i in range(len(mine) // k)])
    out = train_stage.stage_dir(cfg)
    seen, lines, counts = set(), [], Counter()
    for where, text, ok in (x for group in judged for x in group):
        key = (where, " ".join(text.split()))
        counts["correct_and_formatted" if ok else "rejected"] += 1
        if ok and key in seen:
            counts["duplicate"] += 1
        elif ok:
            seen.add(key)
            lines.append(json.dumps(as_manifest_line(record_of(where), text.strip(), out)))
    tmp = out + ".lines"
    if rank == 0:
        data.write_atomic(tmp, "".join(line + "\n" for line in lines))
    solved = len({w for w, _ in seen})
    meta = {"stage": "harvest", "source": train_stage.init_sources(cfg)["language_model"],
            "samples": len(prompts) * k, "kept": len(lines), "prompts": len(prompts),
            "prompts_with_a_kept_chain": solved, "counts": dict(counts), "config": asdict(cfg),
            "seconds": round(time.time() - started, 1)}
    log(f"harvest: {len(lines)} chains kept of {meta['samples']} samples ({solved}/{len(prompts)} prompts): "
        f"{dict(counts)}")
    if not lines:
        raise data.TooMuchBadData("harvest kept no chain: the RL model never answers right in the format; "
                                  "train it longer")
    modeling.save_checkpoint(out, None, meta, rank, world, extra_files={"cot.jsonl": tmp})
    if rank == 0:
        os.remove(tmp)
    return out


def filter_cli(argv):
    """python rl.py filter --ckpt DIR --out FILE.jsonl [--k=4] [--stage=rl-verifiable] [rl.py options]:
    the pass@k filter (§4.2.3) as a tool: K samples per prompt of the stage's training prompts (its
    --pool_size, else 256), keeping those neither always nor never solved, written as a manifest
    (each rank samples its share)."""
    opts = dict(train_stage.split_options(argv))
    if "help" in opts:
        return print(filter_cli.__doc__.split("\n\n")[0].replace("\n    ", "\n"))
    ckpt, out, k = opts.pop("ckpt", None), opts.pop("out", None), opts.pop("k", "4")
    if not ckpt or not out:
        raise train_stage.UsageError("filter needs --ckpt DIR and --out FILE.jsonl (python rl.py filter --help)")
    if not k.isdigit() or int(k) < 1:
        raise train_stage.UsageError(f"--k must be a whole number >= 1, got {k!r}")
    k = int(k)
    cfg, _ = rl_config([f"--{a}={b}" for a, b in opts.items()] + [f"--init_from={ckpt}"])
    rank, world, device = train_stage.setup_distributed()
    model, tok, dcfg = inference_model(cfg, device, lambda *a: train_stage.print0(rank, *a))
    prompts = read_prompts(cfg, tok, dcfg, "train", cfg.pool_size or 256)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    kept, counts = pass_at_k_filter(model, tok, prompts, cfg, k, gen)
    if rank == 0:
        base = os.path.dirname(os.path.abspath(out))
        data.write_atomic(out, "".join(json.dumps(as_manifest_line(record_of(prompts[i].where), None, base)) + "\n"
                                       for i in kept))
        print(f"pass@{k} filter of {len(prompts)} prompts with {ckpt}: {counts}; kept prompts in {out}")


# ==============================================================================================
# command line

def help_text(cfg: RLConfig) -> str:
    """--help: the stages, then every option with its value for cfg's stage (the recipe row's
    tiny values applied, and the options given)."""
    doc = {**train_stage.field_help(train_stage.StageConfig), **train_stage.field_help(RLConfig)}
    lines = [__doc__.split("\n\n")[0], "",
             "    torchrun rl.py --stage rl-verifiable       # §4.2.3, from out/longcot",
             "    torchrun rl.py --stage harvest             # §4.2.4, CoT from out/rl-verifiable",
             "    torchrun rl.py --stage rl-mixed            # §4.2.5, from out/thinkfusion",
             "    python rl.py filter --ckpt DIR --out FILE  # the pass@k filter as a tool",
             "    python rl.py bench [options]               # the rollout engine vs HF generate "
             "(= python tests/bench.py rollout)",
             "", f"options (--key=value or --key value), with their values for --stage {cfg.stage}:",
             train_stage.option_line("--resume [DIR]", "continue from DIR, or from the newest good "
                                     "out/<stage>.run/step-* checkpoint")]
    for f in dataclasses.fields(RLConfig):
        if f.name in RL_UNUSED:
            continue
        value = getattr(cfg, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        lines.append(train_stage.option_line(f"--{f.name}={shown}", doc.get(f.name, "")))
    return "\n".join(lines)


def run_cli(argv: list):
    """One RL stage (or the harvest, or the filter tool) from the command line."""
    if argv[:1] == ["filter"]:
        return filter_cli(argv[1:])
    cfg, opts = rl_config(argv)
    log = lambda *a: train_stage.print0(int(os.environ.get("RANK", "0")), *a)     # noqa: E731
    if "help" in opts:
        return log(help_text(cfg))
    row = train_stage.stage_row(cfg.stage)
    log(f"stage {cfg.stage} ({row.section}): {row.note}")
    if cfg.stage == "harvest":
        out = harvest(cfg)
    else:
        out = train_rl(cfg, train_stage.resume_checkpoint(opts, cfg, log))
    train_stage.log_done(log, cfg.stage, out)
    if (nxt := train_stage.next_name(row)) and not train_stage.in_recipe():
        log(f"next: {train_stage.command_for(train_stage.STAGES[nxt], cfg)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:                                             # the benchmark lives with the tooling
        train_stage.run_tool("bench.py", ["rollout", *argv[1:]])
    opts = {"stage": "filter"} if argv[:1] == ["filter"] else \
        train_stage.one_line_errors(lambda: dict(train_stage.split_options(argv)), "rl.py")
    train_stage.one_line_errors(lambda: run_cli(argv), "rl.py", on_interrupt=train_stage.interrupt_hint(opts, RLConfig.stage))
    train_stage.shutdown_distributed()


if __name__ == "__main__":
    train_stage.run_command(main)
