"""Reinforcement learning of SAIL-VL2: verifiable rewards, DAPO and GSPO, mixed rewards (paper §4.2.3, §4.2.5).

§4.2.3 (RL with verifiable rewards) trains the LongCoT model on 70K math, puzzle, science, OCR and
counting prompts with two binary rewards, the answer (the `\\boxed{}` answer is correct) and the
format (`<think>` tags). Dense models use DAPO (arXiv 2503.14476), the MoE model GSPO
(arXiv 2507.18071). §4.2.5 (RL with mixed rewards) adds a "think" reward from a judge of the
reasoning and a judge for answers that rules cannot check; the coefficients of the rewards sum to
1. The file reads in that order:

  1. Verifiable rewards  `reward_answer` (last balanced `\\boxed{}` after `</think>`, a
                         hand-written normaliser), `reward_format`.
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
import itertools
import math
import re
from collections import Counter
from fractions import Fraction
from typing import Optional, Protocol

import torch

MAX_BOX_CHARS = 1000        # a \boxed{} whose content is longer is no answer (bounds all later work)

# ----------------------------------------------------------------------------------------------
# 1. Verifiable rewards (§4.2.3): answer and format, both binary
#
# The answer is the last balanced `\boxed{...}` after `</think>`; a box inside the thinking is no
# final answer. Text without `</think>`: if it has no `<think>` either (a direct-mode answer) the
# last box of the whole text counts; if it opened `<think>` and never closed it, there is no
# answer. "Last" means the box that closes last, so `\boxed{\boxed{1}+1}` answers `\boxed{1}+1`.
# Unclosed boxes are ignored, as is `\boxed` without braces (`\boxed 5`).

_BOX_TOKEN = re.compile(r"\\boxed[ \t]{0,8}\{|\\[\\{}]|[{}]")   # box opener | \{ \} \\ (literal) | brace


def last_boxed(text: str, max_chars: int = MAX_BOX_CHARS) -> Optional[str]:
    """Content of the last balanced `\\boxed{}` of `text`, or None. One pass over the braces from
    the first `\\boxed`; whenever no open box can still close within `max_chars` characters, the
    brace stack is dropped and the scan jumps to the next `\\boxed` (braces outside a box never
    change how a later box closes)."""
    pos = text.find("\\boxed")
    best, stack, boxes = None, [], []       # stack: content start of a box brace, -1 a plain one
    while pos >= 0:
        for m in _BOX_TOKEN.finditer(text, pos):
            tok, at = m.group(), m.start()
            if tok[1:2] == "b":                                   # \boxed{
                stack.append(m.end())
                boxes.append(m.end())
                continue
            if not boxes or at - boxes[-1] > max_chars:           # no open box can still count
                stack, boxes = [], []
                pos = text.find("\\boxed", at)
                break
            if tok == "}" and stack and stack.pop() >= 0:
                best = (boxes.pop(), at)
            elif tok == "{":
                stack.append(-1)
        else:
            pos = -1
    return None if best is None else text[best[0]:best[1]]


def final_answer(text: str) -> Optional[str]:
    """The completion's final answer (the rules above), or None."""
    end = text.rfind("</think>")
    if end < 0 and "<think>" in text:
        return None
    return last_boxed(text[end + len("</think>"):] if end >= 0 else text)


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


# The answer normaliser. It maps an answer to a key (a number as an exact Fraction, a choice
# letter, an ordered tuple/interval, a set, a plain list, a whole-number percent, or the cleaned
# text) and calls two answers equal when their keys are. It is held to never call equal what
# math-verify 0.9.0 calls different (tests/test_rl.py); math-verify's equality is not transitive
# (5 = 5.0 and 5 = \text{5}, but 5.0 != \text{5}; 5 = 5% but 5.0 != 5%), so every key class must
# be equal pairwise there, which makes this normaliser stricter. It handles: `$`, `\$`,
# whitespace, `\text{}` `\textbf{}` `\textrm{}` `\textnormal{}` `\mathrm{}` `\mbox{}` `\boxed{}`
# wrappers around words (around a bare number they stay text: `\text{5}` != `5`), `\left` /
# `\right`, `\!` and `{,}` thousands separators (`1,234` but not `1, 234`), trailing zeros, `a/b`
# and `\frac` `\dfrac` `\tfrac` `\frac13` vs decimals, `%` after a whole number written bare
# (28% = 28; 12.5% only equals 12.5%), `^\circ`, signs and the Unicode minus, one capital choice
# letter with or without parentheses, `(1,2)` vs `[1,2)` vs `\{1,2\}` (sets unordered), and a
# leading `x =` (but `x=1` != `y=1`). It does NOT handle: algebra (`2x` vs `x+x`), radicals and
# pi, decimals vs repeating fractions (1/3 vs 0.333), lowercase choices, units, scientific
# notation, leading zeros (`03` stays text), mixed numbers, matrices, relations, `°`.

_WRAPPER_TOKEN = re.compile(r"\\(?:boxed|textbf|textrm|textnormal|text|mathrm|mbox)[ ]{0,8}\{|\\[\\{}]|[{}]")
_SPACING = re.compile(r"\\[,;: ]|~|\\q?quad(?![a-zA-Z])")
_THOUSANDS = re.compile(r"[+-]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = r"[+-]?(?:(?:0|[1-9]\d*)(?:\.\d+)?|\.\d+)"       # no leading zeros, digits after a point
_NUMBER = re.compile(_DECIMAL)
_RATIO = re.compile(f"({_DECIMAL})/({_DECIMAL})")
_FRAC = re.compile(f"([+-]?)\\\\frac(?:\\{{({_DECIMAL})\\}}\\{{({_DECIMAL})\\}}|(\\d)(\\d))")
_CHOICE = re.compile(r"\(([A-Z])\)|([A-Z])")
_ASSIGN = re.compile(r"([A-Za-z])=([^=]+)")
_BRACKET = re.compile(r"\\\{|\\\}|[()\[\]{},]")
_NUMERIC_TEXT = re.compile(r"[^A-Za-z\\]*")          # wrapper content without words or commands
_PERCENT = re.compile(r"(0|[1-9]\d*)%")


def _unwrap(s: str) -> str:
    """Drop `\\text{` ... `}`-style wrappers and keep their content, except around content without
    letters (a number): math-verify reads `\\text{5}` as text, equal to `5` but not to `5.0`, so
    it stays `\\text{5}` here. One pass, linear."""
    out, stack, last = [], [], 0            # stack: (wrapper token or None, index into out)
    for m in _WRAPPER_TOKEN.finditer(s):
        out.append(s[last:m.start()])
        tok, last = m.group(), m.end()
        if tok == "{" or (len(tok) > 2 and tok[-1] == "{"):
            stack.append((None if tok == "{" else tok, len(out)))
            out.append("{" if tok == "{" else "")
        elif tok == "}":
            wrapper, at = stack.pop() if stack else (None, None)
            if wrapper is None or wrapper.startswith("\\boxed"):
                out.append("}" if wrapper is None else "")
            elif len(out) - at == 2 and _NUMERIC_TEXT.fullmatch(out[-1]):
                out[at] = wrapper.replace(" ", "")
                out.append("}")
        else:
            out.append(tok)
    out.append(s[last:])
    return "".join(out)


def _squeeze_spaces(s: str) -> str:
    """Remove whitespace, except one space between two letters/digits (`\\pi r`, `1 000` stay apart)."""
    def repl(m):
        a, b = m.start() - 1, m.end()
        return " " if a >= 0 and b < len(s) and s[a].isalnum() and s[b].isalnum() else ""
    return re.sub(r"\s+", repl, s).strip()


def clean_answer(s: str) -> str:
    """The answer with the notation above normalised away (the text that `_key` reads)."""
    s = str(s).replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\!\s*", "", s).replace("{,}", ",")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])|\\displaystyle", "", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = _unwrap(s)
    s = re.sub(r"(\d)\^(?:\\circ|\{\\circ\})", r"\1", s).replace("\\%", "%").strip()
    if _THOUSANDS.fullmatch(s):                       # before whitespace goes: `32, 349` is a list
        s = s.replace(",", "")
    return _squeeze_spaces(s)


def _parse_number(s: str) -> Optional[Fraction]:
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    m = _RATIO.fullmatch(s) or _FRAC.fullmatch(s)
    if m is None:
        return None
    sign, num, den = (("", m[1], m[2]) if m.re is _RATIO else (m[1], m[2] or m[4], m[3] or m[5]))
    if Fraction(den) == 0:
        return None
    return Fraction(num) / Fraction(den) * (-1 if sign == "-" else 1)


def _split_top(s: str):
    """(items, enclosed): `s` split at top-level commas, and whether its first bracket closes last."""
    items, depth, last, enclosed = [], 0, 0, False
    for m in _BRACKET.finditer(s):
        tok = m.group()
        if tok == ",":
            if depth == 0:
                items.append(s[last:m.start()])
                last = m.end()
        elif tok in ("(", "[", "{", "\\{"):
            if depth == 0 and m.start() == 0:
                enclosed = True
            depth += 1
        else:
            depth -= 1
            if depth == 0 and m.end() < len(s):
                enclosed = False
            if depth < 0:
                return [s], False
    items.append(s[last:])
    return items, enclosed and depth == 0


def _key(s: str, depth: int = 0):
    """Comparison key of a cleaned answer (see above); None for an empty one."""
    if not s:
        return None
    if (m := _PERCENT.fullmatch(s)) is not None:
        return ("pct", int(m[1]))                      # equal to the same bare integer, see below
    if (m := _CHOICE.fullmatch(s)) is not None:
        return ("choice", m[1] or m[2])
    if (x := _parse_number(s)) is not None:
        return ("num", x)
    if depth < 4:
        items, enclosed = _split_top(s)
        if enclosed:
            inner, _ = _split_top(s[2:-2] if s.startswith("\\{") and s.endswith("\\}") else s[1:-1])
            keys = [_key(e, depth + 1) for e in inner]
            if None not in keys:
                if s.startswith("\\{") and s.endswith("\\}"):
                    return ("set", tuple(sorted(keys, key=repr)))
                if len(keys) == 1 and s[0] == "(" and s[-1] == ")":
                    return keys[0]                     # redundant parentheses: (5) = 5
                if len(keys) > 1 and s[0] in "([" and s[-1] in ")]":
                    return ("seq", s[0], s[-1], tuple(keys))
        elif len(items) > 1:
            keys = [_key(e, depth + 1) for e in items]
            if None not in keys:
                return ("list", tuple(keys))
    return ("str", s)


def answer_key(answer: str):
    """(variable or None, key, cleaned text) of an answer: `x = 5` gives ("x", key of 5, "5")."""
    s = clean_answer(answer)
    m = _ASSIGN.fullmatch(s)
    var, s = (m[1], m[2]) if m else (None, s)
    key = _key(s)
    return None if key is None else (var, key, s)


def answers_match(pred: str, truth: str) -> bool:
    """Equal keys; besides, a whole-number percent equals the same integer written bare (28% = 28,
    but math-verify calls 28% != 28.0, so 28.0 does not match 28%)."""
    a, b = answer_key(pred), answer_key(truth)
    if a is None or b is None or (a[0] and b[0] and a[0] != b[0]):
        return False
    if {a[1][0], b[1][0]} == {"pct", "num"}:
        (_, pct, _), (_, num, text) = (a, b) if a[1][0] == "pct" else (b, a)
        return text.isdigit() and text.isascii() and num[1] == pct[1]
    return a[1] == b[1]


def reward_answer(text: str, ground_truth) -> float:
    """1.0 if the final `\\boxed{}` answer of `text` matches `ground_truth`, else 0.0."""
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


def split_think(text: str):
    """(thinking, answer region) of `<think>T</think>A`, or None without a closed think block."""
    start, end = text.find("<think>"), text.rfind("</think>")
    return None if start < 0 or end < start else (text[start + len("<think>"):end], text[end + len("</think>"):])


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 = none, near 1 = a loop)."""
    words = text.split()
    total = len(words) - n + 1
    return 0.0 if total <= 0 else 1.0 - len(set(zip(*(words[i:] for i in range(n))))) / total


def last_number(text: str) -> Optional[str]:
    """The last number (integer or decimal, with its sign) written in `text`."""
    end = max(text.rfind(d) for d in "0123456789")
    if end < 0:
        return None
    found = re.findall(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?", text[max(0, end - MAX_BOX_CHARS):end + 1])
    return found[-1] if found else None


def think_consistency(text: str, max_repetition: float = 0.5) -> float:
    """Think reward for the synthetic arithmetic / counting tasks: 1.0 when the last number the
    thinking derives equals the boxed answer and the thinking is no loop (repetition_ratio of its
    word 4-grams below `max_repetition`), else 0.0. Linear in the length of `text`."""
    parts = split_think(text)
    if parts is None:
        return 0.0
    thinking, region = parts
    boxed, derived = last_boxed(region), last_number(thinking)
    if boxed is None or derived is None or repetition_ratio(thinking) >= max_repetition:
        return 0.0
    return float(answers_match(derived, boxed))


MAX_LCS_TOKENS = 256        # ROUGE-L's LCS is O(n m): both sides are cut to their first 256 words


def _words(s: str, limit: Optional[int] = None) -> list:
    """Lowercased \\w+ tokens; with `limit`, only the first `limit` (read lazily)."""
    if limit is None:
        return re.findall(r"\w+", s.lower())
    return [m.group().lower() for m in itertools.islice(re.finditer(r"\w+", s), limit)]


def word_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-words F1 of lowercased \\w+ tokens; 0.0 if either side is empty."""
    p, r = _words(pred), _words(ref)
    common = sum((Counter(p) & Counter(r)).values())
    return 0.0 if common == 0 else 2 * common / (len(p) + len(r))


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 (beta = 1): LCS of the word sequences, P = LCS / |pred|, R = LCS / |ref|."""
    p, r = _words(pred, MAX_LCS_TOKENS), _words(ref, MAX_LCS_TOKENS)
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)                                     # one DP row of the LCS table
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))


def reference_judge(answer: str, reference: str, metric: str = "rouge_l", threshold: Optional[float] = 0.5) -> float:
    """Rule-based judge of an unverifiable answer against a reference answer: ROUGE-L or word-F1,
    binarised at `threshold` (the paper's rewards are binary); threshold=None returns the score."""
    score = {"rouge_l": rouge_l, "word_f1": word_f1}[metric](answer, reference)
    return score if threshold is None else float(score >= threshold)


# Model judge (§4.2.5, an LVM judge): scores with a checkpoint given a grading prompt, reward =
# probability of "yes". It needs the model and tokenizer, so it is written with the rollouts
# below (by the lead); it satisfies ThinkJudge.

DEFAULT_MIXED_WEIGHTS = (0.8, 0.1, 0.1)     # answer, think, format: our choice, the paper gives none


def mixed_reward(answer, think, fmt, weights=DEFAULT_MIXED_WEIGHTS):
    """w_a * answer + w_t * think + w_f * format (floats or tensors); the three weights must be
    non-negative and sum to 1 (§4.2.5), otherwise ValueError."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3 or min(w) < 0 or not math.isclose(sum(w), 1.0, abs_tol=1e-6):
        raise ValueError(f"mixed_reward weights (answer, think, format) must be 3 non-negative "
                         f"numbers summing to 1, got {weights}")
    return w[0] * answer + w[1] * think + w[2] * fmt


# ----------------------------------------------------------------------------------------------
# 8. Rollouts, updates and stages (rl-verifiable, rl-mixed) follow below.
