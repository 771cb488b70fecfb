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
  measured. Every baseline window is followed by a trial: the paper's "when the loss descent
  slows, try a higher LR" has no test of its own here (the keep / reject rule above decides
  whether the trial paid). Trials start only inside the search fraction of training (default [0.1, 0.4]) and
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

Integration with a trainer: the trainer alone writes the LR. Each step it sets every group's
`lr = base_lr * schedule(step) * adalrs.lr_scale`, steps the optimizer, then calls
`adalrs.observe(loss)` once; AdaLRS only moves `lr_scale` (and rolls back parameters and
optimizer state). Under FSDP2 every rank holds its own shard: the snapshot copies each rank's
local shards (no gathering), and the caller must pass the SAME loss on every rank (the globally
averaged loss, all-reduced) so all ranks take the same decision.

Measured on the real pretrain1 stage by `python tests/bench.py adalrs` (the trainer's side:
this file imports nothing from the project); tests/test_adalrs.py also holds a self-contained
stand-in (an adapter trained into a frozen LM head) run through the trainer's schedule.
"""
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
        states = [optimizer.state.get(p) for p in _optimizer_params(optimizer)]
        optim = [{k: _copy_to_cpu(v) for k, v in state.items()} if state else None for state in states]
    return {"params": params, "optim": optim}


def restore_snapshot(model, optimizer, snap):
    """Copy a snapshot back in place (same devices, same DTensor shards); bit-exact.

    param_groups (the LR) are left alone on purpose: the LR is the trainer's to write.
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
                  snapshotted. AdaLRS never writes its LR.
    total_steps:  the number of optimizer steps of the run (sets the search fraction).
    cfg:          AdaLRSConfig (None = defaults).
    log:          one-line logger for decisions (default print); pass a no-op on non-zero ranks.
    base_lr:      the run's peak LR, for the log lines only (default: group 0's LR at start).

    `lr_scale` is the LR multiplier found so far (1.0 at the start); the trainer multiplies its
    scheduled LR by it every step (see the module docstring).
    """

    def __init__(self, model, optimizer, total_steps, cfg=None, log=print, base_lr=None):
        self.cfg = cfg if cfg is not None else AdaLRSConfig()
        self.cfg.check()
        if int(total_steps) < 1:
            raise ValueError(f"adalrs.AdaLRS: total_steps={total_steps}, expected a positive step count")
        self.model, self.optimizer, self.log = model, optimizer, log
        self.total_steps = int(total_steps)
        self.window = self.cfg.window or max(8, self.total_steps // 50)
        self.search_begin = int(math.ceil(self.cfg.start * self.total_steps))   # a trial may start after it
        self.search_end = int(math.floor(self.cfg.end * self.total_steps))      # a trial must finish by here
        self.base_lr = float(optimizer.param_groups[0]["lr"] if base_lr is None else base_lr)
        self.step = 0               # observe() calls so far = optimizer steps done
        self.lr_scale = 1.0
        self.phase = "baseline"     # "baseline": measuring the current LR; "trial": measuring alpha' x it
        self.losses = []            # the current window's losses
        self.base_slope = self.base_err = None   # baseline fit the running trial is compared with
        self.trial_from = None      # (step, lr_scale) the running trial started from
        self.decisions = 0          # t in lambda^t
        self.rising = 0             # back-to-back baseline windows with a significantly rising loss
        self.max_loss = -math.inf
        self.settled = False        # alpha' reached 1 (or the LR its cap): the search stopped early
        self.finished = False       # the "search done" line was logged
        self.history = []           # one dict per decision, for tests / benchmarks / plots
        self.snapshot = None
        if max(self.search_begin, self.window) + self.window > self.search_end:   # a baseline window, then a trial
            self._log(f"search fraction [{self.cfg.start}, {self.cfg.end}] of {self.total_steps} steps is "
                      f"shorter than one {self.window}-step window: the LR will not be searched")

    @property
    def searching(self):
        """True while a trial may still start or is running."""
        return self.phase == "trial" or (not self.settled and self.step + self.window <= self.search_end)

    # -- the per-step entry point --------------------------------------------------------------
    def observe(self, loss):
        """Feed the loss of the step just taken (a float or 0-dim tensor; the SAME value on every rank)."""
        loss = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        self.step += 1
        (self._observe_trial if self.phase == "trial" else self._observe_baseline)(loss)
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
        margin = self.cfg.error_mult * math.hypot(self.base_err, err)  # e: std error of their difference
        detail = f"slope {slope:.2e} vs {self.base_slope:.2e}, 2e {margin:.1e}"
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
        self.lr_scale = new_scale
        self.phase, self.losses = "trial", []
        self._log(f"trial lr {old_lr:.2e} -> {self._lr0():.2e} (x{factor:.3g}; slope {slope:.2e} ± {err:.1e})")

    def _keep(self, slope, err, detail):
        self._record("keep", self.trial_from[1], self.lr_scale)
        self._log(f"keep lr {self._lr0():.2e} (scale {self.lr_scale:.4g}; {detail})")
        self.snapshot, self.phase, self.losses = None, "baseline", []
        # the trial window measured the new LR: it is the next baseline, so trials chain
        if self.step + self.window <= self.search_end:
            self._start_trial(slope, err)

    def _reject(self, why):
        from_step, from_scale = self.trial_from
        restore_snapshot(self.model, self.optimizer, self.snapshot)
        new_scale = max(from_scale * down_factor(self.cfg, self.decisions), self.cfg.min_scale)
        self._record("reject", from_scale, new_scale)
        self.lr_scale = new_scale
        self._log(f"reject ({why}), rolled back to step {from_step}, lr -> {self._lr0():.2e} "
                  f"(scale {self.lr_scale:.4g})")
        self.snapshot, self.phase, self.losses = None, "baseline", []

    def _neutral(self, detail):
        from_scale = self.trial_from[1]
        self._record("neutral", from_scale, from_scale)
        self.lr_scale = from_scale
        self._log(f"no clear change, lr back to {self._lr0():.2e} without rollback ({detail})")
        self.snapshot, self.phase, self.losses = None, "baseline", []

    def _decrease(self, slope, err):
        old = self.lr_scale
        new_scale = max(old * down_factor(self.cfg, self.decisions), self.cfg.min_scale)
        self._record("decrease", old, new_scale)
        self.lr_scale = new_scale
        self._log(f"loss rising two windows running (slope {slope:.2e} ± {err:.1e}), lr -> {self._lr0():.2e}")
        self.rising = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record(self, kind, old_scale, new_scale):
        self.history.append({"step": self.step, "decision": kind, "from_scale": old_scale,
                             "to_scale": new_scale, "t": self.decisions})
        self.decisions += 1

    def _lr0(self):
        """The peak LR the current scale gives (for the log lines)."""
        return self.base_lr * self.lr_scale

    def _log(self, msg):
        if self.log is not None:
            self.log(f"adalrs: step {self.step} {msg}")

    # -- checkpointing -------------------------------------------------------------------------
    # the search state saved as it is (the rest of state_dict() is converted to JSON types)
    _PLAIN_STATE = ("window", "step", "lr_scale", "phase", "base_slope", "base_err", "decisions", "rising",
                    "settled", "finished")

    def state_dict(self):
        """The search state as plain numbers / lists / dicts / None: JSON-serialisable (meta.json).

        Mid-trial the rollback copy lives apart, in `snapshot_state_dict()` (tensors, per rank);
        a checkpoint taken mid-trial needs both to resume exactly.
        """
        return {"version": 2, "config": asdict(self.cfg), "total_steps": self.total_steps,
                **{k: getattr(self, k) for k in self._PLAIN_STATE}, "losses": list(self.losses),
                "trial_from": None if self.trial_from is None else list(self.trial_from),
                "max_loss": self.max_loss if math.isfinite(self.max_loss) else None,
                "history": [dict(h) for h in self.history], "has_snapshot": self.snapshot is not None}

    def snapshot_state_dict(self):
        """None, or mid-trial the rollback copy {"params": [...], "optim": [...]}: CPU tensors of this
        rank's shards, numbers, lists, dicts. Save it per rank with torch.save (next to the optimizer
        state); it loads back with torch.load(weights_only=True)."""
        return self.snapshot

    def load_state_dict(self, state, snapshot=None):
        """Restore from state_dict() (+ snapshot_state_dict() when it was taken mid-trial).

        The config and total_steps must match this run's; a mid-trial state without its snapshot is
        refused (the trial could not be rolled back)."""
        if state.get("version") != 2:
            raise ValueError(f"adalrs.load_state_dict: unknown state version {state.get('version')!r}, expected 2")
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
        for k in self._PLAIN_STATE:
            setattr(self, k, state[k])
        self.losses = list(state["losses"])
        self.trial_from = None if state["trial_from"] is None else tuple(state["trial_from"])
        self.max_loss = -math.inf if state["max_loss"] is None else state["max_loss"]
        self.history = [dict(h) for h in state["history"]]
        self.snapshot = snapshot if state["has_snapshot"] else None
