"""Stream packing, balanced micro-batches and visual packing of SAIL-VL2 (paper §5.1).

§5.1 concatenates variable-length samples into streams whose positions and attention restart
at every sample. Each node keeps a buffer of candidate samples and builds micro-batches online,
filling them to the maximum length and balancing the work across devices. Samples that would
starve in the buffer are forced in periodically. "Visual packing" adds a constraint that
equalises the number of visual tokens (ViT work) across devices, which matters most for AnyRes.
The paper reports +50% training speed from packing and a further +48% from visual packing.

The file reads in that order:

  1. Stream packing      `StreamPacker`: an online buffer of the sample metadata it is given
                         (`push`), best-fit-decreasing fill toward `max_tokens` (`pop`), forced
                         inclusion of samples that waited `max_wait` packs, a stated rule for
                         samples longer than `max_tokens`, a cap on images per pack, and
                         `state_dict()` for exact resume. `collate_pack` turns a plan into
                         tensors (layout below).
  2. Balanced ranks      `balance_packs`: the packs of one optimizer step are split so that each
                         rank gets the same number of micro-batches and about the same work
                         (`pack_work`: 6·H·L + L² per sample, the verl FLOP proxy).
  3. Visual packing      the packer steers each pack's visual share toward the stream's, and
                         `balance_packs` balances visual tokens per rank as a second objective.
  4. This rank's packs   `PackLoader`: 1-3 over a sample stream, one optimizer step at a time;
                         `PackPlanner` plans from metadata, `PackDecoder` decodes this rank's
                         samples in torch DataLoader workers, ahead of training; exact resume.

This file imports no project file: it packs what it is given (token, visual-token and image
counts; tensors; a stream that measures and decodes samples). The sample order and decoding are
data.py's (data.Mixture), the loss normalisation is the training step's (train_stage.train_step),
and train_stage.StageBatches runs a PackLoader over the stage's mixture.

Why every rank plans the same global stream: packing decisions only need metadata (token,
visual-token and image counts per sample), which the stream reads without decoding pixels
(image headers, the tokenizer), so every rank runs the identical deterministic planner over
the global sample order, assigns the step's packs to ranks with `balance_packs`, and then
decodes and collates only its own samples. Balancing is exact, no communication is needed, each
sample is decoded once, on one rank, and the planner state is a few integers per buffered
sample (JSON, saved with each checkpoint).

Layout of one pack (the model computes the loss of logits[i] against labels[i+1]):

  input_ids    (1, T) long     samples concatenated in stream order, T <= max_tokens
  labels       (1, T) long     the samples' labels; the FIRST label of every sample is -100,
                               so logits at the end of sample k never score sample k+1's first
                               token (lossless: a sample's own first label is never a target)
  position_ids (1, T) long     0..L_k-1 for every sample k
  cu_seqlens   (n+1,) int32    sample boundaries for packed attention (kernels.packed_attention)
  max_seqlen   int             longest sample in the pack
  pixel_values (N, 3, S, S) | list of (1, 3, H, W) | None   the samples' tiles in order
  n_images     (n,) long       tiles/images per sample;  n_visual (n,) long visual tokens
  sample_ids   list[int]       the samples' indices (stream positions in training);  sources  list[str] (sample["source"] or "")

Benchmark (useful tokens and rank balance against pad-to-longest batching): `python tests/bench.py packing`.
"""
import bisect
import warnings
from collections import namedtuple
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

IGNORE_INDEX = -100          # labels with this value carry no loss (PyTorch's CE default)
WARN_LIMIT = 5               # warnings printed per kind; all occurrences are counted in stats


@dataclass
class PackingConfig:
    """The packer's knobs; defaults are the paper-scale ones (the trainer's tiny stages set their
    own, reachable as --packing.key=value)."""
    max_tokens: int = 8192            # pack length (paper: 8192 in pre-training/SFT, 16384, 20480)
    micro_batches: int = 1            # packs per rank per optimizer step (gradient accumulation)
    buffer_size: int = 256            # candidate samples held by the node buffer
    max_wait: Optional[int] = 128     # packs a sample may wait before forced inclusion; None: never
    max_images_per_pack: int = 48     # tiles/images per pack: bounds the ViT batch (InternVL: 48)
    overlong: str = "truncate"        # samples > max_tokens: "truncate" or "own_pack" (see StreamPacker)
    visual_packing: bool = True       # §5.1 visual packing (pack steering + rank balance)

    def __post_init__(self):
        def reject_if(bad, key, rule):
            if bad:
                raise ValueError(f"PackingConfig.{key} must be {rule}, got {getattr(self, key)!r}")
        reject_if(self.max_tokens < 2, "max_tokens", ">= 2")
        reject_if(self.buffer_size < 1, "buffer_size", ">= 1")
        reject_if(self.max_wait is not None and self.max_wait < 1, "max_wait", ">= 1 or None")
        reject_if(self.max_images_per_pack < 1, "max_images_per_pack", ">= 1")
        reject_if(self.overlong not in ("truncate", "own_pack"), "overlong", "'truncate' or 'own_pack'")
        reject_if(self.micro_batches < 1, "micro_batches", ">= 1")


# ----------------------------------------------------------------------------------------------
# samples and their metadata
#
# A sample is a dict: input_ids (L,) int, labels (L,) int (-100 = no loss, aligned with
# input_ids), pixel_values None | (N, 3, S, S) | list of (1, 3, H, W) (AnyRes), and optionally
# n_visual (visual tokens) and source. Packing decisions only read its metadata.

SampleMeta = namedtuple("SampleMeta", "index n_tokens n_visual n_images")


def count_images(pixel_values) -> int:
    """Tiles (fixed resolution, (N, 3, S, S)) or images (AnyRes list of (1, 3, H, W))."""
    if pixel_values is None:
        return 0
    if isinstance(pixel_values, torch.Tensor):
        return pixel_values.shape[0]
    return sum(p.shape[0] if p.dim() == 4 else 1 for p in pixel_values)


def check_sample(sample, index) -> None:
    """Raise a ValueError naming the sample and the key when a sample is malformed."""
    if not isinstance(sample, dict):
        raise ValueError(f"sample {index}: expected a dict, got {type(sample).__name__}")
    for key in ("input_ids", "labels"):
        t = sample.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point:
            raise ValueError(f"sample {index}: {key!r} must be a 1-D integer tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")
    if sample["input_ids"].numel() == 0:
        raise ValueError(f"sample {index}: 'input_ids' is empty")
    if sample["labels"].shape != sample["input_ids"].shape:
        raise ValueError(f"sample {index}: 'labels' {tuple(sample['labels'].shape)} must match "
                         f"'input_ids' {tuple(sample['input_ids'].shape)}")
    pv = sample.get("pixel_values")
    if pv is None:
        return
    if isinstance(pv, torch.Tensor):
        ok = pv.dim() == 4 and pv.shape[1] == 3
    else:
        ok = isinstance(pv, (list, tuple)) and all(
            isinstance(p, torch.Tensor) and ((p.dim() == 4 and p.shape[1] == 3) or (p.dim() == 3 and p.shape[0] == 3))
            for p in pv)
    if not ok:
        raise ValueError(f"sample {index}: 'pixel_values' must be None, a (N, 3, S, S) tensor or a "
                         f"list of (1, 3, H, W) / (3, H, W) images")


def sample_meta(sample, index: int, img_context_id: Optional[int] = None) -> SampleMeta:
    """Metadata of one sample. Visual tokens: sample["n_visual"] (data.py: "n_visual_tokens") if
    present, else the number of `img_context_id` tokens, else 0 for a text-only sample (a sample
    with pixel_values needs one of them)."""
    check_sample(sample, index)
    n_images = count_images(sample.get("pixel_values"))
    given = sample.get("n_visual", sample.get("n_visual_tokens"))
    if given is not None:
        n_visual = int(given)
    elif img_context_id is not None:
        n_visual = int((sample["input_ids"] == img_context_id).sum())
    elif n_images == 0:
        n_visual = 0
    else:
        raise ValueError(f"sample {index} has pixel_values but no way to count its visual tokens: "
                         f"give the sample an 'n_visual' key or pass img_context_id")
    return SampleMeta(index, sample["input_ids"].numel(), n_visual, n_images)


# ----------------------------------------------------------------------------------------------
# 1. stream packing (§5.1): online buffer, best-fit-decreasing fill, forced inclusion

class StreamPacker:
    """Online packer over the sample metadata it is given; `pop()` yields plans (lists of SampleMeta).

    The caller streams samples in: `push(meta)` while `not packer.full`, then `pop()` builds one
    pack from the buffer (kept sorted by length):
      a. samples that waited `max_wait` packs are forced in first, oldest first (§5.1);
      b. then, repeatedly, the LARGEST sample that still fits (best-fit-decreasing for the open
         pack), within `max_images_per_pack`; with visual packing, after the first sample, the
         largest one that moves the pack's visual share toward the stream's is preferred
         (_wanted_kind, §5.1).
    Largest-first fills packs almost exactly, but a sample that is rarely the largest that fits
    (short fillers; a mid-sized sample while larger ones keep arriving; a sample of the kind
    the open packs do not want) can wait indefinitely: once it has waited `max_wait` packs it is
    forced into the next pack it fits in (room allowing: a wait can run past max_wait while packs
    fill with other forced samples or an over-long one takes a pack). The buffer turns over every
    buffer_size / (samples per pack) packs on average, a data-dependent number (tens of packs at
    the defaults), so forcing is for the rare sample, not the rule.

    Over-long samples (> max_tokens), cfg.overlong, applied by `push`:
      "truncate"  text-only samples are cut to max_tokens (counted in stats["truncated"] and
                  warned). Samples with visual tokens are never cut (that would orphan image
                  features): they are skipped, counted in stats["skipped_overlong"] and warned.
      "own_pack"  the sample is emitted whole, alone, in a pack of its own length (T > max_tokens;
                  counted in stats["own_pack"]).
    Samples are kept in stream order inside a pack. The plan's n_tokens is the length to use.
    The packer knows nothing of files or models: `state_dict()` is its buffer and counters (JSON);
    `name(index)` says which sample a warning is about (the stream's file:line where it has one).
    """

    def __init__(self, cfg: PackingConfig, name=None):
        self.cfg, self.name = cfg, name or (lambda index: f"sample {index}")
        self.seq = 0                      # arrival counter (tie-break; "oldest" = smallest seq)
        self.packs_emitted = 0
        self.seen_tokens = self.seen_visual = 0   # running totals: the stream's visual share
        self.buffer = []                  # sorted entries (n_tokens, seq, born_at_pack, meta)
        self.stats = dict(samples=0, packs=0, tokens=0, forced=0, truncated=0, skipped_overlong=0, own_pack=0)
        self._warned = {}

    # -- the stream ----------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        """True when the buffer holds `buffer_size` samples: time to `pop()` a pack."""
        return len(self.buffer) >= self.cfg.buffer_size

    def push(self, meta: SampleMeta) -> bool:
        """Add one sample to the buffer (after the over-long rule); False if the rule skipped it."""
        meta = self._apply_overlong_rule(meta)
        if meta is None:
            return False
        self.seen_tokens += meta.n_tokens
        self.seen_visual += meta.n_visual
        bisect.insort(self.buffer, (meta.n_tokens, self.seq, self.packs_emitted, meta))
        self.seq += 1
        return True

    def _apply_overlong_rule(self, meta: SampleMeta) -> Optional[SampleMeta]:
        cap = self.cfg.max_tokens
        if meta.n_tokens <= cap:
            return meta
        too_long = f"{self.name(meta.index)} has {meta.n_tokens} > max_tokens={cap} tokens"
        if self.cfg.overlong == "own_pack":
            self._count("own_pack", f"{too_long}: packed alone (overlong='own_pack')")
            return meta
        if meta.n_visual > 0:
            self._count("skipped_overlong", f"{too_long} and {meta.n_visual} visual tokens: skipped "
                                            f"(cutting it would orphan image features)")
            return None
        self._count("truncated", f"{too_long}: truncated to {cap}")
        return meta._replace(n_tokens=cap)

    def _count(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        self._warned[kind] = self._warned.get(kind, 0) + 1
        if self._warned[kind] <= WARN_LIMIT:
            more = " (further ones are only counted in StreamPacker.stats)" if self._warned[kind] == WARN_LIMIT else ""
            warnings.warn(f"packing: {message}{more}", stacklevel=3)

    # -- building one pack ---------------------------------------------------------------------
    def _wanted_kind(self, pack_visual: int, pack_tokens: int) -> int:
        """Visual packing (§5.1): +1 if the open pack's visual share is below the stream's
        (prefer visual-rich samples), -1 otherwise (prefer text-rich ones), 0 for no preference.
        Exact integer comparisons, so plans never depend on float rounding."""
        if not self.cfg.visual_packing or self.seen_visual == 0 or pack_tokens == 0:
            return 0
        return 1 if pack_visual * self.seen_tokens < self.seen_visual * pack_tokens else -1

    def _best_fit(self, room: int, img_room: int, want: int, empty: bool) -> Optional[int]:
        """Buffer position of the largest sample that fits `room` tokens and `img_room` images
        (any number of images when the pack is empty), preferring one of the `want`ed kind
        (visual share >= the stream's for +1, <= for -1); None when nothing fits."""
        j = bisect.bisect_right(self.buffer, room, key=lambda e: e[0])
        fallback = None
        for k in range(j - 1, -1, -1):
            meta = self.buffer[k][3]
            if meta.n_images > img_room and not empty:
                continue
            richer = meta.n_visual * self.seen_tokens - self.seen_visual * meta.n_tokens  # >0: more visual
            if want == 0 or (want > 0 and richer >= 0) or (want < 0 and richer <= 0):
                return k
            if fallback is None:
                fallback = k
        return fallback

    def pop(self) -> Optional[list]:
        """Build and return the next pack's plan (list of SampleMeta), or None when the buffer is empty."""
        if not self.buffer:
            return None
        cfg, chosen = self.cfg, []
        room, img_room, pack_visual = cfg.max_tokens, cfg.max_images_per_pack, 0

        def take(k):
            nonlocal room, img_room, pack_visual
            entry = self.buffer.pop(k)
            room -= entry[3].n_tokens
            img_room -= entry[3].n_images
            pack_visual += entry[3].n_visual
            chosen.append(entry)

        if self.buffer[-1][0] > cfg.max_tokens:               # overlong="own_pack": alone
            take(len(self.buffer) - 1)
        else:
            # a. forced periodic inclusion (§5.1): samples that waited max_wait packs, oldest first
            if cfg.max_wait is not None:
                starving = sorted((e for e in self.buffer if self.packs_emitted - e[2] >= cfg.max_wait),
                                  key=lambda e: e[1])
                for entry in starving:
                    if entry[3].n_tokens <= room and (not chosen or entry[3].n_images <= img_room):
                        take(self.buffer.index(entry))
                        self.stats["forced"] += 1
            # b. best-fit-decreasing: the largest sample that still fits, until none does. The
            # first sample of a pack is simply the largest (long samples never wait for a pack);
            # then visual packing steers the pack's visual share toward the stream's.
            while True:
                want = self._wanted_kind(pack_visual, cfg.max_tokens - room)
                k = self._best_fit(room, img_room, want, empty=not chosen)
                if k is None:
                    break
                take(k)
        self.packs_emitted += 1
        plan = [entry[3] for entry in sorted(chosen, key=lambda e: e[1])]   # stream order
        self.stats["packs"] += 1
        self.stats["samples"] += len(plan)
        self.stats["tokens"] += sum(m.n_tokens for m in plan)
        return plan

    # -- resume --------------------------------------------------------------------------------
    _PLAN_KEYS = ("max_tokens", "buffer_size", "max_wait", "max_images_per_pack", "overlong", "visual_packing")

    def state_dict(self) -> dict:
        """JSON-serialisable state: the buffered samples' metadata and the counters."""
        return dict(version=2, seq=self.seq, packs_emitted=self.packs_emitted, seen_tokens=self.seen_tokens,
                    seen_visual=self.seen_visual, stats=dict(self.stats),
                    buffer=[[n, seq, born, list(meta)] for n, seq, born, meta in self.buffer],
                    config={k: getattr(self.cfg, k) for k in self._PLAN_KEYS})

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict()`; given the same samples afterwards, later plans
        equal those of an uninterrupted run."""
        if state.get("version") != 2:
            raise ValueError(f"StreamPacker state: unknown version {state.get('version')!r}")
        for key in self._PLAN_KEYS:
            if state["config"][key] != getattr(self.cfg, key):
                raise ValueError(f"StreamPacker state was saved with {key}={state['config'][key]!r} but "
                                 f"this packer has {key}={getattr(self.cfg, key)!r}; packs would differ")
        self.seq, self.packs_emitted = state["seq"], state["packs_emitted"]
        self.seen_tokens, self.seen_visual = state["seen_tokens"], state["seen_visual"]
        self.stats = dict(state["stats"])
        self.buffer = [(n, seq, born, SampleMeta(*meta)) for n, seq, born, meta in state["buffer"]]


def pack_stream(metas, cfg: PackingConfig):
    """Plans of a stream of sample metadata packed online, as a training loop does: fill the
    buffer, pop a pack, repeat; at the end of a finite stream the buffer is drained."""
    packer = StreamPacker(cfg)
    for m in metas:
        packer.push(m)
        if packer.full:
            yield packer.pop()
    while (plan := packer.pop()) is not None:
        yield plan


def plan_packs(metas: Sequence[SampleMeta], cfg: PackingConfig) -> list:
    """Pack a known list of samples at once (e.g. one step of RL rollouts): the whole list is
    the buffer, one pass, stream order kept; returns a list of plans."""
    return list(pack_stream(metas, PackingConfig(**{**asdict(cfg), "buffer_size": max(1, len(metas))})))


def collate_pack(samples: Sequence[dict], plan: Optional[Sequence[SampleMeta]] = None,
                 img_context_id: Optional[int] = None) -> dict:
    """Concatenate samples into one packed row (layout in the module docstring).

    `plan` (from the packer) gives each sample's index, length to keep and visual tokens; without
    it the samples are taken whole and their metadata computed here."""
    if plan is None:
        plan = [sample_meta(s, i, img_context_id) for i, s in enumerate(samples)]
    if len(plan) != len(samples) or not samples:
        raise ValueError(f"collate_pack: {len(samples)} samples for a plan of {len(plan)} (need >= 1)")
    ids, labels, positions, images = [], [], [], []
    any_list = False
    for sample, meta in zip(samples, plan):
        check_sample(sample, meta.index)
        L = meta.n_tokens                                     # the packer may have truncated it
        if L > sample["input_ids"].numel():
            raise ValueError(f"collate_pack: plan keeps {L} tokens of sample {meta.index}, "
                             f"which has {sample['input_ids'].numel()}")
        ids.append(sample["input_ids"][:L])
        lab = sample["labels"][:L].clone()
        lab[0] = IGNORE_INDEX            # logits of the previous sample's last token: no target
        labels.append(lab)
        positions.append(torch.arange(L))
        pv = sample.get("pixel_values")
        if isinstance(pv, torch.Tensor):
            images.append(pv)
        elif pv is not None:
            any_list = True
            images.extend(pv)
    lengths = [m.n_tokens for m in plan]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    if not images:
        pixel_values = None
    elif any_list:                       # AnyRes: one entry per image, in order
        pixel_values = [im for t in images for im in (t.split(1) if t.dim() == 4 else [t])]
    else:
        sizes = {tuple(t.shape[1:]) for t in images}
        if len(sizes) > 1:
            raise ValueError(f"collate_pack: tiles of different sizes {sorted(sizes)} in one pack; "
                             f"give AnyRes samples a list of (1, 3, H, W) images")
        pixel_values = torch.cat(images)                     # (N, 3, S, S)
    return dict(
        input_ids=torch.cat(ids)[None].long(),               # (1, T)
        labels=torch.cat(labels)[None].long(),               # (1, T)
        position_ids=torch.cat(positions)[None],             # (1, T)
        cu_seqlens=cu_seqlens,                               # (n+1,) int32
        max_seqlen=max(lengths),
        pixel_values=pixel_values,
        n_images=torch.tensor([m.n_images for m in plan]),
        n_visual=torch.tensor([m.n_visual for m in plan]),
        sample_ids=[m.index for m in plan],
        sources=[str(s.get("source", "")) for s in samples],
    )


# ----------------------------------------------------------------------------------------------
# 2. balanced micro-batches across ranks

def pack_work(plan: Sequence[SampleMeta], hidden_size: int = 4096) -> float:
    """LLM FLOP proxy of one pack: per sample 6·H·L (matmuls, per token ~ 6·H per layer-unit)
    + L² (attention; packed attention is per sample, so the L² term is per sample, not per pack).
    With H=4096 this is verl's 24576·L + L²."""
    return float(sum(6 * hidden_size * m.n_tokens + m.n_tokens ** 2 for m in plan))


def pack_visual(plan: Sequence[SampleMeta]) -> int:
    """ViT work proxy of one pack: its visual tokens."""
    return sum(m.n_visual for m in plan)


def round_robin(n_packs: int, n_ranks: int) -> list:
    """The naive assignment (pack j -> rank j mod R), the benchmark's baseline."""
    return [list(range(r, n_packs, n_ranks)) for r in range(n_ranks)]


def balance_packs(plans: Sequence[Sequence[SampleMeta]], n_ranks: int, hidden_size: int = 4096,
                  visual: bool = True, max_swaps: int = 200) -> list:
    """Split one step's packs over ranks: returns, per rank, the list of pack positions.

    Every rank gets len(plans) // n_ranks packs, the first ranks one more when it does not divide.
    FSDP/DDP ranks must run the same number of forward/backward passes: PackPlanner always passes
    world x micro_batches packs, so there the counts are equal.
    Objective: the largest normalised load max(work_r / mean work, visual_r / mean visual) over
    ranks (visual only when `visual`). Greedy LPT (largest pack first onto the rank it loads least)
    followed by pairwise swaps between the most loaded rank and any other while that lowers it.
    """
    n = len(plans)
    if n_ranks < 1:
        raise ValueError(f"balance_packs: n_ranks must be >= 1, got {n_ranks}")
    base, extra = divmod(n, n_ranks)
    capacity = [base + (r < extra) for r in range(n_ranks)]
    work = [pack_work(p, hidden_size) for p in plans]
    vis = [pack_visual(p) if visual else 0 for p in plans]
    mean_w = sum(work) / n_ranks or 1.0
    mean_v = sum(vis) / n_ranks or 1.0

    def load(w, v):
        return max(w / mean_w, v / mean_v)

    groups = [[] for _ in range(n_ranks)]
    W, V = [0.0] * n_ranks, [0.0] * n_ranks
    for j in sorted(range(n), key=lambda j: -load(work[j], vis[j])):
        r = min((r for r in range(n_ranks) if len(groups[r]) < capacity[r]),
                key=lambda r: (load(W[r] + work[j], V[r] + vis[j]), r))
        groups[r].append(j)
        W[r] += work[j]
        V[r] += vis[j]
    for _ in range(max_swaps):
        a = max(range(n_ranks), key=lambda r: load(W[r], V[r]))
        worst, best = load(W[a], V[a]), None
        for b in [r for r in range(n_ranks) if r != a]:
            for ia, pa in enumerate(groups[a]):
                for ib, pb in enumerate(groups[b]):
                    dw, dv = work[pb] - work[pa], vis[pb] - vis[pa]
                    new = max(load(W[a] + dw, V[a] + dv), load(W[b] - dw, V[b] - dv))
                    if new < worst - 1e-12 and (best is None or new < best[0]):
                        best = (new, b, ia, ib, dw, dv)
        if best is None:
            break
        _, b, ia, ib, dw, dv = best
        groups[a][ia], groups[b][ib] = groups[b][ib], groups[a][ia]
        W[a], V[a], W[b], V[b] = W[a] + dw, V[a] + dv, W[b] - dw, V[b] - dv
    return [sorted(g) for g in groups]


# ----------------------------------------------------------------------------------------------
# 3. visual packing is in StreamPacker._wanted_kind / _best_fit (each pack's visual share steered toward
# the stream's, fill first) and balance_packs(visual=True) (visual tokens equalised across ranks).


# ----------------------------------------------------------------------------------------------
# 4. this rank's micro-batches: every rank plans the global stream from metadata, and decodes only
# the samples of its own packs, in DataLoader workers that prefetch the next steps

class PackPlanner:
    """The global pack plan, one optimizer step at a time, identical on every rank: the packer fed
    with the stream's metadata (no pixels), world x micro_batches packs popped per step and split by
    balance_packs. Iterating it yields this rank's packs as (step, plan): it is the sampler of
    PackLoader's DataLoader, so it runs in the main process, ahead of training by the prefetch.
    `pending[step]` keeps, until that step is trained, the state right after planning it (the
    stream's cursor, the packer's state: the exact resume position), what its reads found (for the
    stream's bad-sample ledger) and its global plans and rank groups."""

    def __init__(self, stream, cfg: PackingConfig, rank: int, world: int, hidden_size: int):
        self.stream, self.cfg, self.rank, self.world, self.hidden_size = stream, cfg, rank, world, hidden_size
        self.packer, self.step, self.pending = StreamPacker(cfg, getattr(stream, "where", None)), 0, {}

    def plan_step(self) -> list:
        found, plans = [], []
        while len(plans) < self.world * self.cfg.micro_batches:
            while not self.packer.full:
                self.packer.push(SampleMeta(*self.stream.next_meta(found)))
            plans.append(self.packer.pop())
        groups = (balance_packs(plans, self.world, self.hidden_size, self.cfg.visual_packing)
                  if self.world > 1 else [list(range(len(plans)))])
        self.step += 1
        self.pending[self.step] = dict(cursor=self.stream.cursor(), packer=self.packer.state_dict(), found=found,
                                       plans=plans, groups=groups)
        return plans

    def __iter__(self):
        while True:
            plans = self.plan_step()
            for j in self.pending[self.step]["groups"][self.rank]:
                yield self.step, plans[j]


def empty_pack() -> dict:
    """One padding token and no target: a rank's pack when every one of its samples failed to
    decode (every rank still runs micro_batches forward passes per step)."""
    return dict(input_ids=torch.zeros(1, 1, dtype=torch.long), labels=torch.full((1, 1), IGNORE_INDEX),
                position_ids=torch.zeros(1, 1, dtype=torch.long), cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                max_seqlen=1, pixel_values=None, n_images=torch.zeros(0, dtype=torch.long),
                n_visual=torch.zeros(0, dtype=torch.long), sample_ids=[], sources=[])


class PackDecoder(torch.utils.data.Dataset):
    """What a loader worker does with one of this rank's packs: decode its samples (`load(index)`),
    drop those that raise one of `bad_errors` (a file whose header read but whose pixels do not),
    collate the rest. The pack carries its step and the dropped (index, error) pairs. A decoded
    sample must have its planned metadata; it may only be longer when the plan truncated it
    (a text-only sample planned at `max_tokens`)."""

    def __init__(self, load, bad_errors: tuple, max_tokens: int):
        self.load, self.bad_errors, self.max_tokens = load, bad_errors, max_tokens

    def __getitem__(self, item) -> dict:
        step, plan = item
        samples, kept, dropped = [], [], []
        for meta in plan:
            try:
                sample = self.load(meta.index)
            except self.bad_errors as e:
                dropped.append((meta.index, e))
                continue
            got = sample_meta(sample, meta.index)
            cut = meta.n_tokens == self.max_tokens and meta.n_visual == 0
            if (got.n_visual, got.n_images) != (meta.n_visual, meta.n_images) or got.n_tokens < meta.n_tokens \
                    or (got.n_tokens > meta.n_tokens and not cut):
                raise RuntimeError(f"sample {meta.index} decodes to {got}, but was planned as {meta}: the "
                                   f"metadata and the decoded sample must agree")
            samples.append(sample)
            kept.append(meta)
        return dict(collate_pack(samples, kept) if kept else empty_pack(), step=step, dropped=dropped)


def _as_is(item):
    return item


class PackLoader:
    """This rank's packed micro-batches, one optimizer step at a time (§5.1).

    The PackPlanner plans (the same on every rank); this rank's packs are decoded in a torch DataLoader
    with `num_workers` worker processes that keep `prefetch_factor` packs each in flight (num_workers=0:
    decoded in this process when asked). Per-sample randomness (video frame jitter) is the stream's, a
    function of the stream position, whichever worker decodes. `stream` (data.Mixture) provides
      next_meta(found) -> (index, n_tokens, n_visual, n_images)   the next usable sample's metadata
                           from headers and tokens (index: its stream position); what the read
                           found (bad samples) goes into the list `found`
      cursor() / seek(cursor)   its position (small, JSON)
      load(index) -> sample     the decoded sample, run in the workers
    After `next()`: `found` (what the planning of that step read) and `dropped` (this rank's
    samples that failed to decode), for the caller's bad-sample ledger. `state_dict()` is the
    planner's state right after planning the last step returned, so a resumed run sees the same
    packs in the same order, whatever the number of workers or what was prefetched."""

    def __init__(self, stream, cfg: PackingConfig, rank: int, world: int, hidden_size: int = 4096,
                 num_workers: int = 0, prefetch_factor: int = 2, bad_errors: tuple = ()):
        self.stream, self.cfg, self.num_workers, self.prefetch_factor = stream, cfg, num_workers, prefetch_factor
        self.planner = PackPlanner(stream, cfg, rank, world, hidden_size)
        self.decoder = PackDecoder(stream.load, bad_errors, cfg.max_tokens)
        self.steps, self.found, self.dropped, self.plans, self.groups = 0, [], [], [], []
        self.position = dict(cursor=stream.cursor(), packer=self.planner.packer.state_dict())
        self._packs = None

    def _start(self):
        return iter(torch.utils.data.DataLoader(
            self.decoder, batch_size=None, sampler=self.planner, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None, collate_fn=_as_is,
            generator=torch.Generator().manual_seed(0)))     # its own seed: the process's RNGs stay untouched

    def next(self) -> list:
        if self._packs is None:
            self._packs = self._start()
        packs = [next(self._packs) for _ in range(self.cfg.micro_batches)]
        self.steps += 1
        if any(p.pop("step") != self.steps for p in packs):
            raise RuntimeError("PackLoader: packs arrived out of step order")
        done = self.planner.pending.pop(self.steps)
        self.position = dict(cursor=done["cursor"], packer=done["packer"])
        self.found, self.plans, self.groups = done["found"], done["plans"], done["groups"]
        self.dropped = [d for p in packs for d in p.pop("dropped")]
        return packs

    def state_dict(self) -> dict:
        return dict(self.position, steps=self.steps)

    def load_state_dict(self, state: dict):
        """Back to a saved position: what was planned and decoded ahead is dropped (a DataLoader
        iterator shuts its workers down when dropped) and planned again from there."""
        self._packs = None
        self.planner.pending.clear()
        self.stream.seek(state["cursor"])
        self.planner.packer.load_state_dict(state["packer"])
        self.planner.step = self.steps = state["steps"]
        self.position = dict(cursor=state["cursor"], packer=state["packer"])
