"""AdaLRS: online learning-rate search on the loss slope, with rollback (paper §3.2.3, §3.2.1).

SAIL-VL2 trains its basic multimodal pre-training stage (§3.2.1, adapter only) with AdaLRS
(Dong et al., arXiv 2506.13274): start from LR 2e-4 and let the search move it while training;
it ended at 6.75e-4 and a final loss more than 0.06 below the fixed-LR run. The rule (§3.2.3):

    eta_{t+k} = alpha' * eta_t   if v(alpha' * eta_t) > v(eta_t) + 2e        (keep the higher LR)
                beta'  * eta_t   if v(alpha' * eta_t) < v(eta_t) - 2e        (roll back, lower LR)
                eta_t            otherwise                                  (no evidence either way)
    alpha' = max(lambda^t * alpha, 1),   beta' = 1 / max(lambda^t * beta, 1)

v is the loss descent speed (minus the least-squares slope of the loss over a k-step window), e
its estimation error, alpha, beta > 1 co-prime integers and lambda in (0, 1) a decay that makes
the steps shrink so the search settles. What the papers leave open, and what this file chooses:

- Windows. Each decision compares two back-to-back k-step windows: a baseline window at the
  current LR, then a trial window at alpha' times it. After a keep, the trial window is the next
  baseline (so keeps chain); after a reject or a "no evidence" outcome, a fresh baseline is
  measured. Trials start only inside the search fraction of training (default [0.1, 0.4]) and
  only if the whole trial window fits in it; afterwards the LR scale is frozen and the trainer's
  normal schedule (warm-up + cosine, ...) continues, multiplied by it.
- e. The slope's standard error from the fit, sqrt(SSE / (k-2) / sum (i - mean i)^2), and for
  the comparison of two windows e = sqrt(e_base^2 + e_trial^2) (the standard error of the
  difference), so "more than 2e" is a ~95% two-sided test. The factor 2 is `error_mult`.
- t in lambda^t counts the decisions made so far (keep, reject, no evidence, decrease), not
  steps: with lambda = 0.99 a per-step t would end every search after ~110 steps. alpha' reaches
  1 (the search stops by itself) after ln(alpha) / ln(1/lambda) decisions: 110 for the default
  0.99, 11 for 0.9. Until then a peaked loss-speed curve makes the LR oscillate keep / reject
  around the best LR, between about best/2 and 1.5 x best for (3, 2).
- Back-to-back windows are biased against the trial: loss curves decelerate, so the later
  (trial) window is slower at equal LR. A trial must beat that natural slowdown, which makes the
  search conservative; keep k small relative to the steps already done (the auto k is 2% of
  the run, a fifth of the steps done when the search starts).
- Two safeguards from the AdaLRS paper's description (read via a secondary source, unverified
  against its text): a trial whose loss goes non-finite or above every loss seen so far is
  rejected at once; two back-to-back baseline windows whose loss rises significantly lower the LR
  by beta' (no rollback, there is no snapshot).
- Rollback restores the trainable parameters and the whole optimizer state (AdamW exp_avg,
  exp_avg_sq, step, ...) bit-exactly from a CPU snapshot taken when the trial began. Buffers
  are not snapshotted (none of this project's models changes a buffer while training). The data
  stream is NOT rewound: the trial's steps are spent (fresh data, nothing seen twice) and the
  trainer's step counter and schedule keep going.
- The 6.75e-4 of §3.2.1 is 2e-4 * 3^3 / 2^3: with (alpha, beta) = (3, 2), the defaults, three
  keeps (x3) and three rejects (/2), e.g. 2e-4 -> 6e-4 -> 3e-4 -> 9e-4 -> 4.5e-4 -> 1.35e-3 ->
  6.75e-4, up to the small lambda^t factors. The paper writes it as 2e-4 * 1.5^3; `alpha=1.5`
  (three keeps, no reject) is the other reading and is a plain config value here.

Integration with a trainer (see `AdaLRS.apply_lr`): the trainer sets the LR each step as
`base_lr * schedule(step) * adalrs.lr_scale` (or calls `adalrs.apply_lr(schedule(step))`), steps
the optimizer, then calls `adalrs.observe(loss)` once. Under FSDP2 every rank holds its own shard:
the snapshot copies each rank's local shards (no gathering), and the caller must pass the SAME
loss on every rank (the globally averaged loss, all-reduced) so all ranks take the same decision.

`python adalrs.py bench` compares fixed LR with AdaLRS from the same start: on the real `pretrain1`
stage through train_stage.run_stage when that exists (imported lazily, inside the bench only:
the search itself imports nothing from the project), else on a self-contained stand-in.
"""
import argparse
import copy
import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class AdaLRSConfig:
    window: int = 0            # k, steps per slope window; 0 = auto: max(8, total_steps // 50)
    alpha: float = 3.0         # trial up-scale (paper: co-prime integers alpha, beta > 1)
    beta: float = 2.0          # down-scale after a rejected trial
    decay: float = 0.99        # lambda in alpha' = max(lambda^t alpha, 1), beta' = 1/max(lambda^t beta, 1)
    start: float = 0.1         # search only in [start, end] of training (fractions of total_steps)
    end: float = 0.4
    error_mult: float = 2.0    # the "2" of 2e: how many standard errors a slope change must clear
    min_scale: float = 1e-2    # never search the LR below / above these multiples of the start LR
    max_scale: float = 1e2

    def check(self):
        """Raise ValueError naming the field when a value is out of range."""
        problems = []
        if self.window != 0 and self.window < 3:
            problems.append(f"window={self.window}: need >= 3 points to fit a slope and its error (or 0 = auto)")
        if not self.alpha > 1:
            problems.append(f"alpha={self.alpha}: must be > 1")
        if not self.beta > 1:
            problems.append(f"beta={self.beta}: must be > 1")
        if not 0 < self.decay <= 1:
            problems.append(f"decay={self.decay}: must be in (0, 1]")
        if not 0 <= self.start <= self.end <= 1:
            problems.append(f"start={self.start}, end={self.end}: need 0 <= start <= end <= 1")
        if not self.error_mult >= 0:
            problems.append(f"error_mult={self.error_mult}: must be >= 0")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            problems.append(f"min_scale={self.min_scale}, max_scale={self.max_scale}: need 0 < min <= 1 <= max")
        if problems:
            raise ValueError("adalrs.AdaLRSConfig: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Loss descent speed: least-squares slope over a k-step window, and its standard error (§3.2.3)

def fit_slope(losses):
    """Least-squares line through (i, losses[i]), i = 0..n-1 -> (slope per step, standard error).

    Pure-Python float64 on purpose: every rank gets the same loss list, so every rank computes
    bit-identical numbers and takes the same decision.
    """
    n = len(losses)
    if n < 3:
        raise ValueError(f"adalrs.fit_slope: need at least 3 losses, got {n}")
    x_mean = (n - 1) / 2
    y_mean = math.fsum(losses) / n
    sxx = math.fsum((i - x_mean) ** 2 for i in range(n))
    slope = math.fsum((i - x_mean) * (y - y_mean) for i, y in enumerate(losses)) / sxx
    intercept = y_mean - slope * x_mean
    sse = math.fsum((y - intercept - slope * i) ** 2 for i, y in enumerate(losses))
    return slope, math.sqrt(sse / (n - 2) / sxx)


def up_factor(cfg, t):
    """alpha' = max(lambda^t alpha, 1): the trial multiplier after t decisions."""
    return max(cfg.decay ** t * cfg.alpha, 1.0)


def down_factor(cfg, t):
    """beta' = 1 / max(lambda^t beta, 1): the multiplier after a rejected trial."""
    return 1.0 / max(cfg.decay ** t * cfg.beta, 1.0)


# ----------------------------------------------------------------------------------------------
# Snapshot and rollback of trainable parameters + optimizer state (CPU copies, exact)

def _local(t):
    """This rank's shard of an FSDP2 DTensor (no communication), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _copy_to_cpu(value):
    """Tensors -> contiguous CPU clones of the local shard; numbers etc. -> deep copies."""
    if isinstance(value, torch.Tensor):
        return _local(value.detach()).to("cpu", copy=True)
    return copy.deepcopy(value)


def _trainable_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def take_snapshot(model, optimizer):
    """{"params": [cpu tensor per trainable param], "optim": [state dict or None per optimizer param]}.

    Only plain tensors, lists, dicts and numbers, so it is safe to torch.save and to load back with
    weights_only=True. With FSDP2 these are the rank's local shards.
    """
    with torch.no_grad():
        params = [_copy_to_cpu(p) for p in _trainable_params(model)]
        optim = []
        for p in _optimizer_params(optimizer):
            state = optimizer.state.get(p)
            optim.append(None if not state else {k: _copy_to_cpu(v) for k, v in state.items()})
    return {"params": params, "optim": optim}


def restore_snapshot(model, optimizer, snap):
    """Copy a snapshot back in place (same devices, same DTensor shards); bit-exact.

    param_groups (the LR) are left alone on purpose: the LR after a rollback is AdaLRS's decision.
    """
    params, optim_params = _trainable_params(model), _optimizer_params(optimizer)
    if len(snap["params"]) != len(params) or len(snap["optim"]) != len(optim_params):
        raise ValueError(
            f"adalrs: snapshot holds {len(snap['params'])} params / {len(snap['optim'])} optimizer entries, "
            f"the model has {len(params)} trainable params and the optimizer {len(optim_params)}")
    with torch.no_grad():
        for p, saved in zip(params, snap["params"]):
            local = _local(p.data)
            if local.shape != saved.shape:
                raise ValueError(f"adalrs: snapshot param shape {tuple(saved.shape)} != {tuple(local.shape)}")
            local.copy_(saved)
        for p, saved in zip(optim_params, snap["optim"]):
            if saved is None:  # the param had no optimizer state yet when the trial began
                optimizer.state.pop(p, None)
                continue
            state = optimizer.state[p]
            for key in [k for k in state if k not in saved]:
                del state[key]
            for key, value in saved.items():
                current = state.get(key)
                if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor) \
                        and _local(current).shape == value.shape and _local(current).dtype == value.dtype:
                    _local(current).copy_(value)
                elif isinstance(value, torch.Tensor):
                    # state that did not exist yet (or changed shape): put it where the param lives,
                    # except scalar 'step' tensors, which torch optimizers keep on the CPU
                    device = value.device if value.dim() == 0 else _local(p).device
                    state[key] = value.to(device, copy=True)
                else:
                    state[key] = copy.deepcopy(value)


# ----------------------------------------------------------------------------------------------
# The search

class AdaLRS:
    """Online LR search with rollback. Call `observe(loss)` once per step, after optimizer.step().

    model:        the module being trained; its requires_grad params are snapshotted for rollback.
    optimizer:    any torch optimizer over (a subset of) them; its whole per-param state is
                  snapshotted. Each group's current 'lr' (or 'initial_lr' if a torch scheduler set
                  one) is taken as that group's base LR for `apply_lr`.
    total_steps:  the number of optimizer steps of the run (sets the search fraction).
    cfg:          AdaLRSConfig (None = defaults).
    log:          one-line logger for decisions (default print); pass a no-op on non-zero ranks.

    `lr_scale` is the LR multiplier found so far (1.0 at the start). On a change, observe()
    multiplies every param group's 'lr' by new/old at once, so a trainer that never touches the LR
    (or uses a chainable torch scheduler) needs nothing else; a trainer that sets the LR itself
    every step must include the factor: `adalrs.apply_lr(schedule(step))`, or
    `base_lr * schedule(step) * adalrs.lr_scale`, or LambdaLR(opt, lambda s: f(s) * adalrs.lr_scale).
    """

    def __init__(self, model, optimizer, total_steps, cfg=None, log=print):
        self.cfg = cfg if cfg is not None else AdaLRSConfig()
        self.cfg.check()
        if int(total_steps) < 1:
            raise ValueError(f"adalrs.AdaLRS: total_steps={total_steps}, expected a positive step count")
        self.model, self.optimizer, self.log = model, optimizer, log
        self.total_steps = int(total_steps)
        self.window = self.cfg.window or max(8, self.total_steps // 50)
        self.search_begin = int(math.ceil(self.cfg.start * self.total_steps))   # first step a trial may start
        self.search_end = int(math.floor(self.cfg.end * self.total_steps))      # a trial must finish by here
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.step = 0               # observe() calls so far = optimizer steps done
        self.lr_scale = 1.0
        self.phase = "baseline"     # "baseline": measuring the current LR; "trial": measuring alpha' x it
        self.losses = []            # the current window's losses
        self.base_slope = None      # baseline fit the running trial is compared with
        self.base_err = None
        self.trial_from = None      # (step, lr_scale) the running trial started from
        self.decisions = 0          # t in lambda^t
        self.rising = 0             # back-to-back baseline windows with a significantly rising loss
        self.max_loss = -math.inf
        self.settled = False        # alpha' reached 1 (or the LR its cap): the search stopped early
        self.finished = False       # the "search done" line was logged
        self.history = []           # one dict per decision, for tests / benchmarks / plots
        self.snapshot = None
        if self.search_begin + self.window > self.search_end:
            self._log(f"search fraction [{self.cfg.start}, {self.cfg.end}] of {self.total_steps} steps is "
                      f"shorter than one {self.window}-step window: the LR will not be searched")

    # -- public helpers ------------------------------------------------------------------------
    def apply_lr(self, multiplier=1.0):
        """Set every group's lr = its base lr * multiplier (the trainer's schedule) * lr_scale."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * float(multiplier) * self.lr_scale

    def lr_at(self, multiplier=1.0, group=0):
        """The LR a group gets from apply_lr(multiplier)."""
        return self.base_lrs[group] * float(multiplier) * self.lr_scale

    @property
    def searching(self):
        """True while a trial may still start or is running."""
        return self.phase == "trial" or (not self.settled and self.step + self.window <= self.search_end)

    # -- the per-step entry point --------------------------------------------------------------
    def observe(self, loss):
        """Feed the loss of the step just taken (a float or 0-dim tensor; the SAME value on every rank)."""
        loss = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        self.step += 1
        if self.phase == "trial":
            self._observe_trial(loss)
        else:
            self._observe_baseline(loss)
        if not self.finished and not self.searching:
            self.finished = True
            self._log(f"search done, lr scale {self.lr_scale:.4g} (lr {self._lr0():.2e}), "
                      f"{self.decisions} decisions; the schedule continues from here")

    def _observe_baseline(self, loss):
        if not math.isfinite(loss):
            self._log(f"non-finite loss {loss} ignored by the slope fit")
            return
        self.max_loss = max(self.max_loss, loss)
        if not self.searching:                 # after the search there is nothing left to measure
            return
        self.losses.append(loss)
        if len(self.losses) > self.window:     # outside the search: a rolling window of the last k
            self.losses.pop(0)
        in_search = self.search_begin <= self.step and self.step + self.window <= self.search_end
        if len(self.losses) < self.window or not in_search:
            return
        slope, err = fit_slope(self.losses)
        if slope > self.cfg.error_mult * err:   # the loss is going up, significantly
            self.rising += 1
            self.losses = []
            if self.rising >= 2:
                self._decrease(slope, err)
            return
        self.rising = 0
        self._start_trial(slope, err)

    def _observe_trial(self, loss):
        if not math.isfinite(loss) or loss > self.max_loss:
            self._reject(f"loss {loss:.4g} above every loss seen so far ({self.max_loss:.4g})")
            return
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return
        slope, err = fit_slope(self.losses)
        e = math.hypot(self.base_err, err)     # standard error of the difference of two slopes
        margin = self.cfg.error_mult * e
        detail = (f"slope {slope:.2e} vs {self.base_slope:.2e}, 2e {margin:.1e}")
        if slope < self.base_slope - margin:    # descends faster by more than 2e: keep
            self._keep(slope, err, detail)
        elif slope > self.base_slope + margin:  # descends slower by more than 2e: roll back, go lower
            self._reject(detail)
        else:                                   # no evidence either way: back to the old LR, no rollback
            self._neutral(detail)

    # -- the four outcomes ---------------------------------------------------------------------
    def _start_trial(self, slope, err):
        factor = up_factor(self.cfg, self.decisions)
        new_scale = min(self.lr_scale * factor, self.cfg.max_scale)
        if new_scale <= self.lr_scale:          # alpha' reached 1 or the cap: nothing left to try
            self.settled, self.losses = True, []
            self._log(f"search settled (alpha' = {factor:.3g}, lr scale {self.lr_scale:.4g} of max "
                      f"{self.cfg.max_scale:g}): no further trials")
            return
        self.snapshot = take_snapshot(self.model, self.optimizer)
        self.base_slope, self.base_err = slope, err
        self.trial_from = (self.step, self.lr_scale)
        old_lr = self._lr0()
        self._set_scale(new_scale)
        self.phase, self.losses = "trial", []
        self._log(f"trial lr {old_lr:.2e} -> {self._lr0():.2e} (x{factor:.3g}; slope {slope:.2e} ± {err:.1e})")

    def _keep(self, slope, err, detail):
        self._record("keep", self.trial_from[1], self.lr_scale)
        self._log(f"keep lr {self._lr0():.2e} (scale {self.lr_scale:.4g}; {detail})")
        self.snapshot, self.phase = None, "baseline"
        self.losses = []
        # the trial window measured the new LR: it is the next baseline, so trials chain
        if self.step + self.window <= self.search_end:
            self._start_trial(slope, err)

    def _reject(self, why):
        from_step, from_scale = self.trial_from
        restore_snapshot(self.model, self.optimizer, self.snapshot)
        new_scale = max(from_scale * down_factor(self.cfg, self.decisions), self.cfg.min_scale)
        self._record("reject", from_scale, new_scale)
        self._set_scale(new_scale)
        self._log(f"reject ({why}), rolled back to step {from_step}, lr -> {self._lr0():.2e} "
                  f"(scale {self.lr_scale:.4g})")
        self.snapshot, self.phase, self.losses = None, "baseline", []

    def _neutral(self, detail):
        from_scale = self.trial_from[1]
        self._record("neutral", from_scale, from_scale)
        self._set_scale(from_scale)
        self._log(f"no clear change, lr back to {self._lr0():.2e} without rollback ({detail})")
        self.snapshot, self.phase, self.losses = None, "baseline", []

    def _decrease(self, slope, err):
        old = self.lr_scale
        new_scale = max(old * down_factor(self.cfg, self.decisions), self.cfg.min_scale)
        self._record("decrease", old, new_scale)
        self._set_scale(new_scale)
        self._log(f"loss rising two windows running (slope {slope:.2e} ± {err:.1e}), lr -> {self._lr0():.2e}")
        self.rising = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record(self, kind, old_scale, new_scale):
        self.history.append({"step": self.step, "decision": kind, "from_scale": old_scale,
                             "to_scale": new_scale, "t": self.decisions})
        self.decisions += 1

    def _set_scale(self, new_scale):
        ratio = new_scale / self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
        self.lr_scale = new_scale

    def _lr0(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def _log(self, msg):
        if self.log is not None:
            self.log(f"adalrs: step {self.step} {msg}")

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self):
        """The search state as plain numbers / lists / dicts / None: JSON-serialisable (meta.json).

        Mid-trial the rollback copy lives apart, in `snapshot_state_dict()` (tensors, per rank);
        a checkpoint taken mid-trial needs both to resume exactly.
        """
        return {
            "version": 1, "config": asdict(self.cfg), "total_steps": self.total_steps,
            "window": self.window, "base_lrs": list(self.base_lrs), "step": self.step,
            "lr_scale": self.lr_scale, "phase": self.phase, "losses": list(self.losses),
            "base_slope": self.base_slope, "base_err": self.base_err,
            "trial_from": None if self.trial_from is None else list(self.trial_from),
            "decisions": self.decisions, "rising": self.rising,
            "max_loss": self.max_loss if math.isfinite(self.max_loss) else None,
            "settled": self.settled, "finished": self.finished, "history": [dict(h) for h in self.history],
            "has_snapshot": self.snapshot is not None,
        }

    def snapshot_state_dict(self):
        """None, or mid-trial the rollback copy {"params": [...], "optim": [...]}: CPU tensors of this
        rank's shards, numbers, lists, dicts. Save it per rank with torch.save (next to the optimizer
        state); it loads back with torch.load(weights_only=True)."""
        return self.snapshot

    def load_state_dict(self, state, snapshot=None):
        """Restore from state_dict() (+ snapshot_state_dict() when it was taken mid-trial).

        The config and total_steps must match this run's; a mid-trial state without its snapshot is
        refused (the trial could not be rolled back)."""
        if state.get("version") != 1:
            raise ValueError(f"adalrs.load_state_dict: unknown state version {state.get('version')!r}, expected 1")
        if state["config"] != asdict(self.cfg) or state["total_steps"] != self.total_steps:
            raise ValueError(
                f"adalrs.load_state_dict: saved config {state['config']} / total_steps {state['total_steps']} "
                f"differ from this run's {asdict(self.cfg)} / {self.total_steps}")
        if state["has_snapshot"] and snapshot is None:
            raise ValueError("adalrs.load_state_dict: the state was saved mid-trial; pass the rollback copy "
                             "saved from snapshot_state_dict() as snapshot=...")
        if snapshot is not None:
            n_params, n_optim = len(_trainable_params(self.model)), len(_optimizer_params(self.optimizer))
            if len(snapshot.get("params", ())) != n_params or len(snapshot.get("optim", ())) != n_optim:
                raise ValueError(f"adalrs.load_state_dict: snapshot has {len(snapshot.get('params', ()))} params / "
                                 f"{len(snapshot.get('optim', ()))} optimizer entries, expected {n_params} / {n_optim}")
        self.window, self.base_lrs = state["window"], list(state["base_lrs"])
        self.step, self.lr_scale, self.phase = state["step"], state["lr_scale"], state["phase"]
        self.losses = list(state["losses"])
        self.base_slope, self.base_err = state["base_slope"], state["base_err"]
        self.trial_from = None if state["trial_from"] is None else tuple(state["trial_from"])
        self.decisions, self.rising = state["decisions"], state["rising"]
        self.max_loss = -math.inf if state["max_loss"] is None else state["max_loss"]
        self.settled, self.finished = state["settled"], state["finished"]
        self.history = [dict(h) for h in state["history"]]
        self.snapshot = snapshot if state["has_snapshot"] else None


# ----------------------------------------------------------------------------------------------
# Benchmark: fixed LR vs AdaLRS from the same start (§3.2.1: "> 0.06 lower final loss")
#
# The real benchmark is the `pretrain1` stage of train_stage.py on the tiny preset. Until that
# exists (and as a fast stand-in), the bench trains a miniature of the same situation: a
# randomly initialised 2-layer MLP adapter between a frozen "vision" feature space and a frozen
# LM head, next-token cross-entropy on labels drawn from a hidden teacher adapter, AdamW,
# warm-up + cosine, starting from an LR that is too small.

# Hook for the real stage (train_stage.py). What it relies on:
#   train_stage.run_stage(stage: str, overrides: list of "--key=value") -> the run folder, which
#   holds metrics.jsonl (one JSON record per step; "eval_loss" on eval steps) and meta.json
#   ("final_loss": the last training loss); StageConfig has `adalrs` (bool) and `out_dir`.
# The two runs differ only in --adalrs and their output folder; both start from the same weights
# (--init_from, default: the previous stage's output under the default out dir, if it exists).
STAGE_RUNS = {"fixed": ["--adalrs=false"], "adalrs": ["--adalrs=true"]}


def final_loss_of(run_dir):
    """The held-out loss of the last eval in run_dir/metrics.jsonl, else meta.json's final_loss."""
    import json
    import os
    last_eval = None
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            for line in f:
                record = json.loads(line)
                if "eval_loss" in record:
                    last_eval = float(record["eval_loss"])
    if last_eval is not None:
        return last_eval, "held-out"
    with open(os.path.join(run_dir, "meta.json")) as f:
        return float(json.load(f)["final_loss"]), "last train step"


def bench_real_stage(stage="pretrain1", init_from="", keep=False):
    """Run `stage` twice through train_stage.run_stage; None when train_stage cannot do it yet."""
    import os
    import shutil
    import tempfile
    try:
        import train_stage  # lazy on purpose: adalrs.py itself imports nothing from the project
    except ImportError as err:
        print(f"adalrs bench: train_stage.py is not importable ({err}); running the self-contained stand-in")
        return None
    run_stage = getattr(train_stage, "run_stage", None)
    if run_stage is None:
        print("adalrs bench: train_stage.py has no run_stage(stage, overrides) yet; running the stand-in")
        return None
    if not init_from and hasattr(train_stage, "stage_config") and hasattr(train_stage, "previous_stage_dir"):
        init_from = train_stage.previous_stage_dir(train_stage.stage_config(stage)) or ""
    print(f"adalrs bench: {stage} tiny, fixed LR vs AdaLRS, both from "
          f"{init_from or 'the same random init (no previous stage output found: run the earlier stages for the real start)'}")
    tmp = tempfile.mkdtemp(prefix="adalrs_bench_")
    results = {}
    try:
        for name, flags in STAGE_RUNS.items():
            overrides = flags + [f"--out_dir={os.path.join(tmp, name)}"]
            overrides += [f"--init_from={init_from}"] if init_from else []
            results[name] = final_loss_of(run_stage(stage, overrides))
    finally:
        if keep:
            print(f"adalrs bench: runs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    (fixed, kind), (ada, _) = results["fixed"], results["adalrs"]
    print(f"{stage} tiny ({kind} loss): fixed LR {fixed:.4f} | AdaLRS {ada:.4f} | "
          f"fixed - AdaLRS = {fixed - ada:+.4f} (paper §3.2.1, full scale: > +0.06)")
    return results


@dataclass
class ToyConfig:
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-4          # the paper's starting LR for basic pre-training (§3.2.1)
    feat_dim: int = 256       # frozen vision features
    hidden: int = 256         # LLM width the adapter maps into
    vocab: int = 256
    warmup: float = 0.03      # fraction of steps
    min_lr_frac: float = 0.1  # cosine floor, as a fraction of the peak
    eval_size: int = 4096
    teacher_gain: float = 2.0 # init variance gain of the hidden teacher (sets how peaked its tokens are)


class ToyAdapter(torch.nn.Module):
    """Trainable MLP adapter (the pretrain1 trainable part) + frozen LM head: feats (B, F) -> logits (B, V)."""

    def __init__(self, cfg):
        super().__init__()
        self.adapter = torch.nn.Sequential(torch.nn.Linear(cfg.feat_dim, cfg.hidden), torch.nn.GELU(),
                                           torch.nn.Linear(cfg.hidden, cfg.hidden))
        self.lm_head = torch.nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.lm_head.requires_grad_(False)

    def forward(self, feats):
        return self.lm_head(self.adapter(feats))


def warmup_cosine(step, cfg):
    """LR multiplier in [min_lr_frac, 1]: linear warm-up, then cosine decay to the floor."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def toy_task(cfg, seed):
    """A hidden teacher adapter into the same frozen head, and a sampler gen -> (feats (B, F), probs (B, V)).

    Targets are the teacher's token distributions (soft labels): the per-step loss noise then
    comes only from the batch of features, like the very large batches of real pre-training
    (2048 samples x 8192 tokens), which is what makes loss slopes over short windows measurable.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    teacher = ToyAdapter(cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (cfg.teacher_gain / p.shape[-1]) ** 0.5)

    def sample(gen, n):
        feats = torch.randn(n, cfg.feat_dim, generator=gen)
        with torch.no_grad():
            return feats, torch.softmax(teacher(feats), dim=-1)

    return teacher, sample


def train_toy(cfg, seed, use_adalrs, lr=None, log=None):
    """Train the toy adapter; same init and data order for every call with the same seed.

    Returns (held-out loss at the end, final LR multiplier found by AdaLRS or 1.0)."""
    teacher, sample = toy_task(cfg, seed)
    torch.manual_seed(seed)
    model = ToyAdapter(cfg)
    model.lm_head.weight.data.copy_(teacher.lm_head.weight)   # the frozen LLM is shared, the adapter is not
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr or cfg.lr,
                            weight_decay=0.0)
    search = AdaLRS(model, opt, cfg.steps, log=log) if use_adalrs else None
    data_gen = torch.Generator().manual_seed(20_000 + seed)
    for step in range(cfg.steps):
        mult = warmup_cosine(step, cfg)
        if search is not None:
            search.apply_lr(mult)
        else:
            for group in opt.param_groups:
                group["lr"] = (lr or cfg.lr) * mult
        feats, targets = sample(data_gen, cfg.batch)
        # KL(teacher || student) = soft-label cross-entropy minus the teacher's entropy: the same
        # gradient, without the teacher-entropy variance across samples in the observed loss
        loss = torch.nn.functional.kl_div(torch.log_softmax(model(feats), -1), targets, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if search is not None:
            search.observe(loss)
    eval_feats, eval_targets = sample(torch.Generator().manual_seed(30_000 + seed), cfg.eval_size)
    with torch.no_grad():
        final = float(torch.nn.functional.cross_entropy(model(eval_feats), eval_targets))
    return final, (search.lr_scale if search is not None else 1.0)


def bench_toy(cfg, seeds):
    """Fixed LR vs AdaLRS (same start, same data) on the stand-in; prints one line per seed + mean."""
    import time
    diffs = []
    print(f"stand-in for pretrain1 (adapter-only, frozen LM head): {cfg.steps} steps, batch {cfg.batch}, "
          f"start LR {cfg.lr:g}, AdamW, warm-up + cosine; AdaLRS defaults {asdict(AdaLRSConfig())}")
    for seed in range(seeds):
        t0 = time.perf_counter()
        lines = []
        fixed, _ = train_toy(cfg, seed, use_adalrs=False)
        ada, scale = train_toy(cfg, seed, use_adalrs=True, log=lines.append)
        found, _ = train_toy(cfg, seed, use_adalrs=False, lr=cfg.lr * scale)
        diffs.append(fixed - ada)
        for line in lines:
            print("   ", line)
        print(f"seed {seed}: fixed LR {cfg.lr:.1e} final loss {fixed:.4f} | AdaLRS peak LR -> {cfg.lr * scale:.2e} "
              f"final loss {ada:.4f} | fixed at the found LR from step 0: {found:.4f} | "
              f"fixed - AdaLRS = {fixed - ada:+.4f} ({time.perf_counter() - t0:.1f}s)")
    print(f"mean over {seeds} seeds: fixed - AdaLRS = {sum(diffs) / len(diffs):+.4f} "
          f"(paper §3.2.1, real pretrain1: > +0.06)")
    return diffs


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="AdaLRS learning-rate search (SAIL-VL2 §3.2.3). `bench` compares the final loss of a "
                    "fixed LR with AdaLRS from the same start.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    bench = sub.add_parser("bench", help="final loss, fixed LR vs AdaLRS from the same start",
                           description="Runs train_stage.run_stage('pretrain1', ...) twice (fixed LR, AdaLRS) "
                                       "when train_stage.py provides it; otherwise, or with --toy, a "
                                       "self-contained stand-in: an MLP adapter trained into a frozen LM head.")
    bench.add_argument("--toy", action="store_true", help="skip the real pretrain1 stage, run only the stand-in")
    bench.add_argument("--stage", default="pretrain1", help="train_stage stage to run (default pretrain1)")
    bench.add_argument("--seeds", type=int, default=3, help="stand-in: number of seeds (default 3)")
    bench.add_argument("--steps", type=int, default=ToyConfig.steps, help=f"stand-in: training steps (default {ToyConfig.steps})")
    bench.add_argument("--lr", type=float, default=ToyConfig.lr, help=f"stand-in: starting / fixed LR (default {ToyConfig.lr:g}, the paper's)")
    bench.add_argument("--init-from", default="", help="real stage: checkpoint folder both runs start from "
                                                        "(default: the previous stage's output, if any)")
    bench.add_argument("--keep", action="store_true", help="real stage: keep the two run folders")
    args = parser.parse_args(argv)
    if not args.toy and bench_real_stage(args.stage, args.init_from, args.keep) is not None:
        return
    bench_toy(ToyConfig(steps=args.steps, lr=args.lr), args.seeds)


if __name__ == "__main__":
    main()
