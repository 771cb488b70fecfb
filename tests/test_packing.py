"""Tests of packing.py (paper §5.1): stream-packing invariants, forced inclusion, the over-long
rule, determinism and exact resume, balanced ranks, visual balance, and a pack through the tiny
model equal to its samples run one by one. (The loss is the training step's: its invariance to
packing, micro-batches and ranks is tested through train_step in test_train_stage.py.)

References are independent of the code under test: samples are compared token by token with the
originals, the model reference runs every sample on its own.
"""
import json
import math
import random
import warnings

import pytest
import torch

from bench import padding_useful_fraction, synthetic_metas
from packing import (IGNORE_INDEX, PackingConfig, PackLoader, SampleMeta, StreamPacker, balance_packs, collate_pack,
                     pack_stream, pack_visual, pack_work, round_robin, sample_meta)

IMG = 7            # <IMG_CONTEXT> id of the test vocabulary
VOCAB = 1000


def make_samples(n, seed=0, max_len=120, image_frac=0.5, tile=4):
    """Random long-tailed samples: text-only ones are 'pre-training' (every label is a target,
    including the first, so the pack must mask it), image ones have a -100 prompt holding
    16 <IMG_CONTEXT> tokens per tile."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        L = min(max_len, max(2, int(rng.lognormvariate(math.log(25), 0.9))))
        ids = torch.randint(10, VOCAB, (L,), generator=g)
        if rng.random() < image_frac:
            tiles = rng.randint(1, 3)
            n_vis = 16 * tiles
            prompt = torch.randint(10, VOCAB, (2,), generator=g)
            ids = torch.cat([prompt[:1], torch.full((n_vis,), IMG), prompt[1:], ids])
            labels = ids.clone()
            labels[: n_vis + 2] = IGNORE_INDEX
            pv = torch.randn(tiles, 3, tile, tile, generator=g)
        else:
            labels, pv = ids.clone(), None
        samples.append(dict(input_ids=ids, labels=labels, pixel_values=pv, source=f"src{i % 3}"))
    return samples


def metas_of(samples, order=None):
    order = range(len(samples)) if order is None else order
    return [sample_meta(samples[i], i, IMG) for i in order]


def shuffled(n, seed):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def all_plans(samples, order_seed=0, **cfg_kw):
    """Every plan of one pass over the samples (in a seeded order), streamed through one packer as
    the trainer streams them: fill the buffer, pop a pack, ...; the buffer is drained at the end."""
    packer = StreamPacker(PackingConfig(**cfg_kw))
    plans = []
    for m in metas_of(samples, shuffled(len(samples), order_seed)):
        packer.push(m)
        if packer.full:
            plans.append(packer.pop())
    while (plan := packer.pop()) is not None:
        plans.append(plan)
    return plans, packer


# ----------------------------------------------------------------------------------------------
# 1. stream packing invariants

def test_every_sample_once_with_positions_labels_and_images_laid_out_per_sample():
    samples = make_samples(300, seed=1)
    plans, packer = all_plans(samples, max_tokens=256, buffer_size=32, max_images_per_pack=12)
    ids_seen = [m.index for p in plans for m in p]
    assert sorted(ids_seen) == list(range(len(samples)))
    interior, masked_by_pack = 0, 0
    for plan in plans:
        pack = collate_pack([samples[m.index] for m in plan], plan)
        T = pack["input_ids"].shape[1]
        assert T <= 256 and pack["labels"].shape == pack["position_ids"].shape == (1, T)
        cu = pack["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == T and len(cu) == len(plan) + 1
        assert pack["max_seqlen"] == max(int(b - a) for a, b in zip(cu[:-1], cu[1:]))
        assert pack["sample_ids"] == [m.index for m in plan]
        for k, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            s = samples[plan[k].index]
            assert torch.equal(pack["position_ids"][0, a:b], torch.arange(b - a))
            assert torch.equal(pack["input_ids"][0, a:b], s["input_ids"])
            assert pack["labels"][0, a] == IGNORE_INDEX
            assert torch.equal(pack["labels"][0, a + 1:b], s["labels"][1:])
            assert pack["sources"][k] == s["source"]
            if k > 0:
                interior += 1
                masked_by_pack += int(s["labels"][0] != IGNORE_INDEX)
        tiles = [samples[m.index]["pixel_values"] for m in plan if samples[m.index]["pixel_values"] is not None]
        if tiles:
            assert torch.equal(pack["pixel_values"], torch.cat(tiles))
        else:
            assert pack["pixel_values"] is None
        assert int(pack["n_images"].sum()) == sum(t.shape[0] for t in tiles) <= 12 or len(plan) == 1
        assert int(pack["n_visual"].sum()) == int((pack["input_ids"] == IMG).sum())
    # not vacuous: many packs hold several samples, and the first-label mask did real work
    assert interior > 100 and masked_by_pack > 30
    assert packer.stats["samples"] == len(samples) and packer.stats["packs"] == len(plans)


def test_no_target_crosses_a_sample_boundary():
    samples = make_samples(200, seed=2, image_frac=0.2)
    plans, _ = all_plans(samples, max_tokens=200, buffer_size=16)
    crossing_if_concatenated = 0
    for plan in plans:
        pack = collate_pack([samples[m.index] for m in plan], plan)
        owner = torch.repeat_interleave(torch.arange(len(plan)), torch.diff(pack["cu_seqlens"]).long())
        labels = pack["labels"][0]
        targets = torch.nonzero(labels[1:] != IGNORE_INDEX).flatten() + 1   # label j scores logits j-1
        assert torch.equal(owner[targets], owner[targets - 1])
        naive = torch.cat([samples[m.index]["labels"] for m in plan])        # plain concatenation
        t_naive = torch.nonzero(naive[1:] != IGNORE_INDEX).flatten() + 1
        crossing_if_concatenated += int((owner[t_naive] != owner[t_naive - 1]).sum())
    assert crossing_if_concatenated > 20    # the check above would catch the classic bug


def test_fill_ratio_on_a_long_tailed_stream_beats_padding():
    metas = synthetic_metas("longtail", 3000, seed=3, max_tokens=8192)
    plans = list(pack_stream(metas, PackingConfig(max_tokens=8192, buffer_size=256)))
    useful = sum(m.n_tokens for p in plans for m in p) / (len(plans) * 8192)
    assert useful >= 0.97, useful
    padded = padding_useful_fraction([m.n_tokens for m in metas], 16, grouped=False)
    assert padded < 0.6 < useful
    assert sorted(m.index for p in plans for m in p) == list(range(len(metas)))


def forced_stream(n_blocks):
    """Sample 0 (550 tokens) is never the largest that fits: a 600-token sample keeps arriving
    and eight 50-token fillers close each pack exactly (600 + 8 x 50 = 1000)."""
    metas = [SampleMeta(0, 550, 0, 0)]
    for b in range(n_blocks):
        base = 1 + 9 * b
        metas.append(SampleMeta(base, 600, 0, 0))
        metas += [SampleMeta(base + 1 + k, 50, 0, 0) for k in range(8)]
    return metas


def test_forced_inclusion_bounds_the_wait_of_a_starving_sample():
    metas = forced_stream(60)

    def pack_of_sample0(max_wait):
        packer = StreamPacker(PackingConfig(max_tokens=1000, buffer_size=16, max_wait=max_wait))
        plans = []
        for m in metas:
            packer.push(m)
            if packer.full:
                plans.append(packer.pop())
        while (plan := packer.pop()) is not None:
            plans.append(plan)
        return next(k for k, p in enumerate(plans) if any(m.index == 0 for m in p)), plans, packer

    starved, plans, _ = pack_of_sample0(None)
    assert starved >= 50                         # without forcing it waits for the stream's end
    assert all(sum(m.n_tokens for m in p) == 1000 for p in plans[:40])
    k, plans, packer = pack_of_sample0(5)
    assert k == 5 and packer.stats["forced"] >= 1   # waited 5 packs (0..4), forced into pack 5
    assert any(m.index == 0 for m in plans[5])
    assert sorted(m.index for p in plans for m in p) == list(range(len(metas)))


def test_overlong_rule_truncate_text_skip_visual_or_own_pack():
    samples = make_samples(40, seed=4, max_len=60)
    long_text = torch.arange(10, 10 + 300)
    samples[5] = dict(input_ids=long_text, labels=long_text.clone(), pixel_values=None)
    long_img = torch.cat([torch.full((32,), IMG), torch.arange(10, 300)])
    samples[9] = dict(input_ids=long_img, labels=long_img.clone(), pixel_values=torch.randn(2, 3, 4, 4))
    with pytest.warns(UserWarning, match="truncated to 128"):
        plans, packer = all_plans(samples, max_tokens=128, buffer_size=8)
    assert packer.stats["truncated"] == 1 and packer.stats["skipped_overlong"] == 1
    seen = [m.index for p in plans for m in p]
    assert sorted(seen) == [i for i in range(40) if i != 9]
    plan = next(p for p in plans if any(m.index == 5 for m in p))
    pack = collate_pack([samples[m.index] for m in plan], plan)
    k = [m.index for m in plan].index(5)
    a, b = pack["cu_seqlens"][k].item(), pack["cu_seqlens"][k + 1].item()
    assert b - a == 128 and torch.equal(pack["input_ids"][0, a:b], long_text[:128])
    assert all(sum(m.n_tokens for m in p) <= 128 for p in plans)

    with pytest.warns(UserWarning, match="packed alone"):
        plans, packer = all_plans(samples, max_tokens=128, buffer_size=8, overlong="own_pack")
    assert packer.stats["own_pack"] == 2
    alone = [p for p in plans if p[0].index in (5, 9)]
    assert len(alone) == 2 and all(len(p) == 1 for p in alone)
    assert {p[0].n_tokens for p in alone} == {300, 322}
    assert sorted(m.index for p in plans for m in p) == list(range(40))


def test_image_cap_per_pack():
    samples = make_samples(200, seed=5, image_frac=0.9)
    plans, _ = all_plans(samples, max_tokens=400, buffer_size=32, max_images_per_pack=4)
    assert all(sum(m.n_images for m in p) <= 4 for p in plans)
    assert max(sum(m.n_images for m in p) for p in plans) == 4        # the cap was binding


# ----------------------------------------------------------------------------------------------
# determinism and exact resume

def test_plans_are_a_function_of_the_stream_given():
    samples = make_samples(150, seed=6)
    a, _ = all_plans(samples, order_seed=3, max_tokens=200, buffer_size=16)
    b, _ = all_plans(samples, order_seed=3, max_tokens=200, buffer_size=16)
    c, _ = all_plans(samples, order_seed=4, max_tokens=200, buffer_size=16)
    assert a == b and a != c


@pytest.mark.parametrize("cut", [0, 1, 7, 23, 40])
def test_state_round_trip_resumes_the_same_packs(cut):
    samples = make_samples(120, seed=7)
    stream = metas_of(samples, shuffled(120, 1) * 3)              # three passes, as epochs would give
    cfg = PackingConfig(max_tokens=180, buffer_size=16, max_wait=4)

    def run(packer, metas, n=None):
        """Feed `metas` (the caller owns the stream position), popping as the trainer does."""
        plans, used = [], 0
        for m in metas:
            if n is not None and len(plans) == n:
                break
            packer.push(m)
            used += 1
            if packer.full:
                plans.append(packer.pop())
        return plans, used

    full, _ = run(StreamPacker(cfg), stream)
    assert len(full) > 45
    first = StreamPacker(cfg)
    head, used = run(first, stream, cut)
    state = json.loads(json.dumps(first.state_dict()))            # what meta.json holds
    resumed = StreamPacker(cfg)
    resumed.load_state_dict(state)
    tail, _ = run(resumed, stream[used:])
    assert head + tail == full
    uninterrupted = StreamPacker(cfg)
    run(uninterrupted, stream)
    assert resumed.stats == uninterrupted.stats
    with pytest.raises(ValueError, match="max_tokens"):
        StreamPacker(PackingConfig(max_tokens=200)).load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# 2./3. balanced ranks and visual packing

def test_pack_work_counts_the_quadratic_term_per_sample():
    one = [SampleMeta(0, 1000, 0, 0)]
    ten = [SampleMeta(i, 100, 0, 0) for i in range(10)]
    assert pack_work(one, hidden_size=1) == 6 * 1000 + 1000 ** 2
    assert pack_work(ten, hidden_size=1) == 6 * 1000 + 10 * 100 ** 2
    assert pack_work(one) == 24576 * 1000 + 1000 ** 2            # verl's proxy at H=4096


def step_ratios(plans_per_step, n_ranks, assign):
    rv, rw = [], []
    for plans in plans_per_step:
        groups = assign(plans)
        assert sorted(j for g in groups for j in g) == list(range(len(plans)))
        assert {len(g) for g in groups} == {len(plans) // n_ranks}
        v = [sum(pack_visual(plans[j]) for j in g) for g in groups]
        w = [sum(pack_work(plans[j]) for j in g) for g in groups]
        rv.append(max(v) * n_ranks / sum(v))
        rw.append(max(w) * n_ranks / sum(w))
    return sum(rv) / len(rv), sum(rw) / len(rw), max(rv)


@pytest.mark.parametrize("kind", ["longtail", "anyres"])
def test_ranks_get_balanced_work_and_visual_tokens(kind):
    R, K, steps = 8, 4, 15
    metas = synthetic_metas(kind, 6000, seed=10)

    def step_plans(visual_packing):
        stream = pack_stream(metas, PackingConfig(max_tokens=8192, micro_batches=K, visual_packing=visual_packing))
        return [[next(stream) for _ in range(R * K)] for _ in range(steps)]

    naive_v, naive_w, _ = step_ratios(step_plans(False), R, lambda p: round_robin(len(p), R))
    vis_v, vis_w, vis_worst = step_ratios(step_plans(True), R, lambda p: balance_packs(p, R))
    assert vis_v <= 1.05 and vis_w <= 1.05 and vis_worst <= 1.15, (vis_v, vis_w, vis_worst)
    assert naive_v > 1.10 > vis_v                  # the imbalance was real and was removed


@pytest.mark.parametrize("kind", ["longtail", "anyres"])
def test_visual_packing_steers_each_pack_toward_the_stream_share(kind):
    metas = synthetic_metas(kind, 6000, seed=13)

    def spread_and_fill(visual_packing):
        stream = pack_stream(metas, PackingConfig(visual_packing=visual_packing))
        plans = [next(stream) for _ in range(400)]
        v = torch.tensor([float(pack_visual(p)) for p in plans])
        fill = sum(m.n_tokens for p in plans for m in p) / (len(plans) * 8192)
        return float(v.std() / v.mean()), fill

    steered, fill = spread_and_fill(True)
    plain, _ = spread_and_fill(False)
    assert steered < 0.7 * plain, (steered, plain)     # per-pack ViT work is much more even
    assert fill >= 0.99                                 # at (almost) no cost in fill


def test_balance_packs_gives_equal_counts_and_lowers_the_max():
    rng = random.Random(11)
    plans = [[SampleMeta(j, rng.randint(100, 8000), rng.choice([0, 256, 1024, 3000]), 1)] for j in range(24)]
    groups = balance_packs(plans, 4, hidden_size=64)
    assert [len(g) for g in groups] == [6] * 4

    def worst(groups):     # the objective: max over ranks of max(work, visual) / their means
        w = [sum(pack_work(plans[j], 64) for j in g) for g in groups]
        v = [sum(pack_visual(plans[j]) for j in g) for g in groups]
        return max(max(a * 4 / sum(w), b * 4 / sum(v)) for a, b in zip(w, v))

    assert worst(groups) < worst(round_robin(24, 4)) and worst(groups) < 1.10, worst(groups)
    uneven = balance_packs(plans[:10], 4)
    assert sorted(len(g) for g in uneven) == [2, 2, 3, 3]


# ----------------------------------------------------------------------------------------------
# inputs: AnyRes lists, bad samples

def test_anyres_images_are_kept_as_an_ordered_list():
    a = dict(input_ids=torch.tensor([1, IMG, IMG, 2]), labels=torch.tensor([1, 2, 3, 4]),
             pixel_values=[torch.randn(1, 3, 8, 12), torch.randn(1, 3, 4, 4)])
    b = dict(input_ids=torch.tensor([5, 6]), labels=torch.tensor([5, 6]), pixel_values=None)
    c = dict(input_ids=torch.tensor([IMG, 9]), labels=torch.tensor([9, 9]), pixel_values=torch.randn(1, 3, 6, 6))
    pack = collate_pack([a, b, c], img_context_id=IMG)
    pv = pack["pixel_values"]
    assert isinstance(pv, list) and len(pv) == 3
    assert torch.equal(pv[0], a["pixel_values"][0]) and torch.equal(pv[2], c["pixel_values"])
    assert pack["n_images"].tolist() == [2, 0, 1] and pack["n_visual"].tolist() == [2, 0, 1]
    e = dict(input_ids=torch.tensor([IMG, 3]), labels=torch.tensor([3, 3]), n_visual_tokens=1,   # data.py keys
             pixel_values=[torch.randn(3, 7, 9)])                                               # (3, H, W)
    pack = collate_pack([e, a], img_context_id=IMG)
    assert len(pack["pixel_values"]) == 3 and pack["pixel_values"][0].shape == (3, 7, 9)
    assert pack["n_images"].tolist() == [1, 2] and pack["n_visual"].tolist() == [1, 2]
    c2 = dict(c, pixel_values=torch.randn(1, 3, 5, 5))
    d = dict(c, pixel_values=torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="different sizes"):
        collate_pack([c2, d], img_context_id=IMG)


def test_bad_samples_raise_clear_errors():
    good = dict(input_ids=torch.tensor([1, 2, 3]), labels=torch.tensor([1, 2, 3]), pixel_values=None)
    with pytest.raises(ValueError, match="sample 4: 'labels'"):
        sample_meta(dict(good, labels=torch.tensor([1, 2])), 4)
    with pytest.raises(ValueError, match="sample 2: 'input_ids'"):
        sample_meta(dict(good, input_ids=[1, 2, 3]), 2)
    with pytest.raises(ValueError, match="no way to count"):
        sample_meta(dict(good, pixel_values=torch.randn(1, 3, 4, 4)), 0)
    assert sample_meta(dict(good, pixel_values=torch.randn(2, 3, 4, 4), n_visual=32), 0) == SampleMeta(0, 3, 32, 2)
    with pytest.raises(ValueError, match="overlong"):
        PackingConfig(overlong="drop")
    with warnings.catch_warnings():                                 # an empty packer is quiet and empty
        warnings.simplefilter("error")
        assert StreamPacker(PackingConfig()).pop() is None


# ----------------------------------------------------------------------------------------------
# 4. PackLoader over a stream of in-memory samples (the trainer's, data.Mixture, in test_train_stage.py)

class Broken(Exception):
    pass


class ListStream:
    """The stream protocol PackLoader reads: metadata of position k = samples[k % n]; `load` fails
    (Broken) for the positions in `broken`, or returns `swap`'s sample instead."""

    def __init__(self, samples, broken=(), swap=None):
        self.samples, self.broken, self.swap, self.k = samples, set(broken), swap or {}, 0

    def next_meta(self, found):
        k, self.k = self.k, self.k + 1
        found.append(k)
        return tuple(sample_meta(self.samples[k % len(self.samples)], k, IMG))

    def cursor(self):
        return {"k": self.k}

    def seek(self, cursor):
        self.k = cursor["k"]

    def load(self, k):
        if k in self.broken:
            raise Broken(f"sample {k}")
        s = self.samples[self.swap.get(k, k) % len(self.samples)]
        return dict(s, n_visual=int((s["input_ids"] == IMG).sum()))


def loader_of(stream, **kw):
    cfg = PackingConfig(max_tokens=120, micro_batches=2, buffer_size=6)
    return PackLoader(stream, cfg, 0, 1, 64, bad_errors=(Broken,), **kw), cfg


def test_a_pack_whose_samples_all_fail_to_decode_is_one_padding_token_without_targets():
    samples = make_samples(40, seed=3)
    plans = list(pack_stream(metas_of(samples), PackingConfig(max_tokens=120, buffer_size=6)))
    loader, _ = loader_of(ListStream(samples, broken=[m.index for m in plans[1]] + [plans[0][0].index]))
    first, second = loader.next()
    assert first["sample_ids"] == [m.index for m in plans[0][1:]]           # the rest of its pack trains
    assert second["sample_ids"] == [] and second["input_ids"].shape == (1, 1) and second["pixel_values"] is None
    assert (second["labels"] == IGNORE_INDEX).all() and second["cu_seqlens"].tolist() == [0, 1]
    assert sorted(k for k, _ in loader.dropped) == sorted([m.index for m in plans[1]] + [plans[0][0].index])
    assert loader.found == list(range(len(loader.found)))                   # what the step's planning read


def test_a_decoded_sample_unlike_its_plan_is_an_error_not_a_wrong_pack():
    samples = make_samples(40, seed=3, image_frac=0.5)
    text = next(i for i, s in enumerate(samples) if s["pixel_values"] is None)
    image = next(i for i, s in enumerate(samples) if s["pixel_values"] is not None)
    loader, _ = loader_of(ListStream(samples, swap={image: text}))     # decodes other tiles than planned
    with pytest.raises(RuntimeError, match="planned as"):
        for _ in range(10):
            loader.next()


# ----------------------------------------------------------------------------------------------
# end to end: a pack through the tiny SAILVL equals its samples run one by one

def test_tiny_sailvl_packed_forward_equals_unpacked():
    model = pytest.importorskip("model")
    torch.manual_seed(14)
    net = model.build_model("tiny").eval()
    cfg = net.cfg
    img, per_tile, S = cfg.img_context_token_id, cfg.tokens_per_tile, cfg.vision_config.image_size
    g = torch.Generator().manual_seed(14)
    samples = []
    for L, tiles in ((23, 0), (9, 1), (1, 0), (31, 2), (17, 0)):
        ids = torch.randint(300, cfg.llm_config.vocab_size, (L,), generator=g)
        if tiles:
            ids = torch.cat([ids[:2], torch.full((tiles * per_tile,), img), ids[2:]])
        labels = torch.where(ids == img, IGNORE_INDEX, ids)
        pv = torch.randn(tiles, 3, S, S, generator=g) if tiles else None
        samples.append(dict(input_ids=ids, labels=labels, pixel_values=pv))
    pack = collate_pack(samples, img_context_id=img)
    assert len(pack["sample_ids"]) == 5 and pack["pixel_values"].shape[0] == 3

    def loss_and_grad(run):
        net.zero_grad(set_to_none=True)
        loss_sum, n, logits = run()
        (loss_sum / n).backward()
        return (loss_sum / n).detach(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]), logits

    def unpacked():
        outs = [net(s["input_ids"][None], pixel_values=s["pixel_values"], labels=s["labels"][None], return_logits=True)
                for s in samples]
        return sum(o.ce_sum for o in outs), sum(int(o.n_targets) for o in outs), [o.logits[0] for o in outs]

    def packed():
        out = net(pack["input_ids"], pixel_values=pack["pixel_values"], labels=pack["labels"],
                  position_ids=pack["position_ids"], cu_seqlens=pack["cu_seqlens"], return_logits=True)
        return out.ce_sum, int(out.n_targets), list(out.logits[0].split(torch.diff(pack["cu_seqlens"]).tolist()))

    ref_loss, ref_grad, ref_logits = loss_and_grad(unpacked)
    loss, grad, logits = loss_and_grad(packed)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) >= 0.9999


def test_a_sample_that_decodes_other_than_planned_is_refused():
    """Decoding must give the planned metadata; longer only where the plan truncated a text sample
    to max_tokens (else collate would cut its tail, or its image slots, without a word)."""
    from packing import PackDecoder
    s = dict(input_ids=torch.arange(10), labels=torch.arange(10), pixel_values=None)
    for planned in (8, 12):
        with pytest.raises(RuntimeError, match="must agree"):
            PackDecoder(lambda k: s, (), max_tokens=64)[(0, [SampleMeta(0, planned, 0, 0)])]
    assert PackDecoder(lambda k: s, (), max_tokens=64)[(0, [SampleMeta(0, 10, 0, 0)])]["input_ids"].shape[-1] == 10
    assert PackDecoder(lambda k: s, (), max_tokens=8)[(0, [SampleMeta(0, 8, 0, 0)])]["input_ids"].shape[-1] == 8


# ----------------------------------------------------------------------------------------------
# gaps found by mutation testing: the max_tokens boundary, stream order in a pack, the rank split
# of PackLoader, and PackLoader's resume with read-ahead

def test_a_sample_of_exactly_max_tokens_is_packed_whole_neither_truncated_nor_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # no over-long warning either
        for overlong in ("truncate", "own_pack"):
            packer = StreamPacker(PackingConfig(max_tokens=100, buffer_size=4, overlong=overlong))
            text, image = SampleMeta(0, 100, 0, 0), SampleMeta(1, 100, 16, 1)
            assert packer.push(text) and packer.push(image)
            assert sorted([packer.pop(), packer.pop()]) == [[text], [image]] and packer.pop() is None
            assert packer.stats["truncated"] == packer.stats["skipped_overlong"] == packer.stats["own_pack"] == 0


def test_samples_keep_their_stream_order_inside_a_pack():
    """The packer picks largest-first, but a plan lists its samples in arrival order."""
    samples = make_samples(200, seed=15)
    plans = list(pack_stream(metas_of(samples), PackingConfig(max_tokens=200, buffer_size=16)))
    assert all([m.index for m in p] == sorted(m.index for m in p) for p in plans)
    # not vacuous: in many packs the largest-first pick order differs from the stream order
    assert sum([m.n_tokens for m in p] != sorted((m.n_tokens for m in p), reverse=True) for p in plans) > 10


def global_step_plans(samples, cfg, world, steps):
    """The global plans of each step (world x micro_batches packs), as pack_stream packs the stream
    positions 0, 1, ... (metadata of samples[k % n]): what every rank's planner must compute."""
    stream = pack_stream((sample_meta(samples[k % len(samples)], k, IMG) for k in range(10 ** 6)), cfg)
    return [[next(stream) for _ in range(world * cfg.micro_batches)] for _ in range(steps)]


def test_each_rank_gets_its_balanced_share_of_the_global_step():
    samples = make_samples(60, seed=16, max_len=60)
    cfg = PackingConfig(max_tokens=120, micro_batches=2, buffer_size=6)
    world, steps = 2, 3
    reference = global_step_plans(samples, cfg, world, steps)
    got = {}
    for rank in range(world):
        loader = PackLoader(ListStream(samples), cfg, rank, world, 64)
        got[rank] = [[p["sample_ids"] for p in loader.next()] for _ in range(steps)]
    for s, plans in enumerate(reference):
        groups = balance_packs(plans, world, 64)
        for rank in range(world):
            assert got[rank][s] == [[m.index for m in plans[j]] for j in groups[rank]], (s, rank)
        ids = [i for rank in range(world) for p in got[rank][s] for i in p]
        assert sorted(ids) == sorted(m.index for p in plans for m in p)      # disjoint, nothing lost
    assert got[0] != got[1]


def test_a_loader_resumed_from_its_state_gives_the_packs_of_the_uninterrupted_run():
    """The state after step 2 of a loader whose worker decodes (and plans) ahead is the position
    right after planning step 2, not what was read ahead: a fresh loader resumed from it gives the
    uninterrupted run's steps 3 and 4."""
    samples = make_samples(60, seed=17, max_len=60)
    cfg = PackingConfig(max_tokens=120, micro_batches=2, buffer_size=6)

    def packs(loader, n):
        return [[(p["sample_ids"], p["input_ids"].tolist()) for p in loader.next()] for _ in range(n)]

    full = packs(PackLoader(ListStream(samples), cfg, 0, 1, 64), 4)
    first = PackLoader(ListStream(samples), cfg, 0, 1, 64, num_workers=1, prefetch_factor=4)
    assert packs(first, 2) == full[:2]
    state = json.loads(json.dumps(first.state_dict()))
    assert first.planner.step > 2                               # the worker did read ahead
    resumed = PackLoader(ListStream(samples), cfg, 0, 1, 64)
    resumed.load_state_dict(state)
    assert packs(resumed, 2) == full[2:] and resumed.steps == 4
