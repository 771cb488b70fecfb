"""rl.py under several processes (gloo on CPU, as torchrun runs it): each rank owns whole groups.

- The same fixed rollouts split over 2 FSDP ranks give the same update (loss and weights after
  the episode's four SGD steps, <= 1e-6 relative) as 1 process holding all of them, with uneven rollouts per rank
  (padding micro-batches of weight 0) and 2 mini-batches x 2 epochs.
- ...in both update memories (full: each FSDP unit gathered once per update; lean: per micro-batch).
- Rollouts on the sharded model itself (--generate_on=model) equal those on the full copy, with ranks
  holding different numbers of prompts and rows of very different lengths (the ranks leave each
  decode loop together), one LLM unit gathered at a time.
- Rollouts on a copy holding each rank's half of the experts (--generate_on=experts, tiny-moe)
  equal those on the full copy, likewise.
- A 2-process rl-verifiable run whose ranks generate rows of very different lengths finishes
  (by default on an unsharded copy: no collective per decode step), and after `kill -9`
  `--resume` ends with the same weights as the uninterrupted run; with --update_memory=lean its
  generation copy is freed during the updates; generating on the sharded model it ends with the
  copy's weights.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import data
import model as modeling
import moe
import rl
import train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synth):
    return longcot_start(tmp_path_factory.mktemp("rldist"), synth, "tiny")


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory, synth):
    return longcot_start(tmp_path_factory.mktemp("rldist_moe"), synth, "tiny-moe")


def longcot_start(root, synth, preset: str):
    """`root`, whose out/longcot holds a random `preset` model with the synthetic tokenizer: where RL starts."""
    modeling.save_checkpoint(str(root / "out" / "longcot"), modeling.build_model(preset, seed=0), {"stage": "longcot"},
                             0, 1, extra_files=train_stage.tokenizer_files(str(synth)))
    return root


def fixed_rollouts(cfg, tok, dcfg, n_groups: int) -> list:
    """n_groups groups of rollouts with completions of very different lengths and fixed rewards."""
    prompts = rl.read_prompts(cfg, tok, dcfg, "train", n_groups)
    g = torch.Generator().manual_seed(0)
    allowed = [t for t in range(tok.n_vocab) if t not in rl.banned_ids(tok)]
    rolls = []
    for p in prompts:
        for j in range(cfg.group_size):
            n = int(torch.randint(1, 40, (1,), generator=g))
            ids = [allowed[int(i)] for i in torch.randint(0, len(allowed), (n,), generator=g)]
            rolls.append(rl.Rollout(p, ids, "", False, [0.0] * n, reward=float(j % 3 == 0)))
    for r, a in zip(rolls, rl.group_advantages(torch.tensor([r.reward for r in rolls]), cfg.group_size).tolist()):
        r.advantage = a
    return rolls


def _update_worker(rank, world, init_file, out_dir, root, synth, lean=False):
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = rl.resolve_algo(rl.RLConfig(out_dir=str(root / "out"), data_dir=str(synth), group_size=4, mini_batches=2,
                                      epochs=2, max_tokens=200), modeling.preset_config("tiny"))
    model, _ = train_stage.place_model(cfg, modeling.preset_config("tiny"), rank, world, torch.device("cpu"), lambda *a: None)
    tok = data.load_tokenizer(str(synth))
    dcfg = data.DataConfig.from_model(model.cfg, label_mode="rl", think="on", max_len=2048)
    rolls = fixed_rollouts(cfg, tok, dcfg, 3)
    mine = [r for g in range(3)[rank::world] for r in rolls[g * 4:(g + 1) * 4]]       # 2 groups / 1 group
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)       # linear in the gradients: the split shows at float precision
    seen, step, old = [], rl.micro_step, rl.old_logprobs
    sharded = lambda: all(isinstance(p, DTensor) for p in model.parameters())    # noqa: E731 (every unit resharded)

    def watched_step(*args):                     # after each micro-batch: reduced into the shards, resharded?
        out = step(*args)
        seen.append((all(p.grad is not None for p in params), sharded()))
        return out

    def watched_old(*args):                      # forwards without a backward: each unit resharded after?
        out = old(*args)
        seen.append(("old", sharded()))
        return out
    rl.micro_step, rl.old_logprobs = watched_step, watched_old
    st = rl.update_episode(model, opt, params, mine, cfg, tok, rl.Rollout(rolls[0].prompt, [0], "", False, [0.0]),
                           lean=lean)
    sd = modeling.full_state_dict(model)
    if rank == 0:
        torch.save({"sd": sd, "loss": st["loss"], "updates": st["updates"], "seen": seen},
                   os.path.join(out_dir, f"world{world}{'lean' * lean}.pt"))
    train_stage.shutdown_distributed()
    train_stage.exit_process()                                            # as the command lines end


def test_two_ranks_give_the_update_of_one(ckpt, synth, tmp_path):
    """...in both update memories: full (each FSDP unit gathered, its gradients reduced, once per
    update) and lean (per micro-batch: after each one the gradients sit reduced in the shards and
    the weights are sharded again, where full holds them until the update's last micro-batch)."""
    for world, lean in ((1, False), (2, False), (2, True)):
        mp.spawn(_update_worker, args=(world, str(tmp_path / f"init{world}{lean}"), str(tmp_path), ckpt, synth, lean),
                 nprocs=world, join=True)
    one, *twos = (torch.load(tmp_path / name, weights_only=True) for name in ("world1.pt", "world2.pt", "world2lean.pt"))
    start = load_file(str(ckpt / "out" / "longcot" / "model.safetensors"))
    for two in twos:
        assert one["updates"] == two["updates"] == 4
        assert abs(one["loss"] - two["loss"]) <= 1e-6 * max(1.0, abs(one["loss"]))
        moved = 0
        for k, a in one["sd"].items():
            b = two["sd"][k]
            assert (a - b).norm() <= 1e-6 * a.norm(), k                              # relative to the weights
            moved += k in start and not torch.equal(a, start[k])
        assert moved                                                                   # not vacuous
    full, lean = (two["seen"] for two in twos)
    assert len(full) == len(lean) > 5                                    # several micro-batches per update
    assert lean[0] == ("old", True) and full[0] == ("old", False)
    assert all(s == (True, True) for s in lean[1:])
    assert (False, False) in full                                        # held between micro-batches


def uneven_generation(rank, world, init_file, root, synth, preset: str, batch_rows: int):
    """(cfg, sharded model, tokenizer, 5 prompts) in a gloo group of `world`, where rank 0's rows stop
    at their first token and rank 1's run all 24 (a hang fails after 60 s)."""
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    cfg = rl.RLConfig(out_dir=str(root / "out"), data_dir=str(synth), group_size=2, batch_rows=batch_rows,
                      max_new_tokens=24)
    model, _ = train_stage.place_model(cfg, modeling.preset_config(preset), rank, world, torch.device("cpu"),
                                       lambda *a: None)
    tok = data.load_tokenizer(str(synth))
    prompts = rl.read_prompts(cfg, tok, data.DataConfig.from_model(model.cfg, label_mode="rl", think="on", max_len=2048),
                              "train", 5)
    if rank == 0:
        everything = set(range(tok.n_vocab)) - set(rl.banned_ids(tok))
        rl.sample.stop_ids = lambda tok: everything
    return cfg, model, tok, prompts


def _generation_worker(rank, world, init_file, out_dir, root, synth):
    cfg, model, tok, prompts = uneven_generation(rank, world, init_file, root, synth, "tiny", batch_rows=2)
    layers = model.language_model.model.layers
    gathered = []                                # per LLM layer forward: how many LLM units hold full weights
    for layer in layers:
        layer.register_forward_pre_hook(lambda *a: gathered.append(
            sum(not isinstance(lay.self_attn.q_proj.weight, DTensor) for lay in layers)))
    copy = rl.generation_policy(model)           # the default: a full copy on each rank
    model.set_reshard_after_forward(False)       # as update_memory=full's update leaves the units
    out = {"none": {}, "uneven": {}}
    for policy in (copy, model):
        gen = torch.Generator().manual_seed(rank)        # one per policy: every call's draws count
        for name, mine in (("none", prompts[:2] if rank == 0 else []),                # 2 calls / none
                           ("uneven", prompts[:4] if rank == 0 else prompts[4:])):    # 4 calls / 1 call
            rolls = rl.rollouts(policy, tok, mine, cfg, gen)
            out[name][policy is model] = [(r.completion, r.rollout_logp) for r in rolls]
    out["gathered"] = gathered
    out["resharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad():                        # the root's forward still runs (FSDP2 took it as its root)
        model(torch.zeros(1, 1, dtype=torch.long))
    torch.save(out, os.path.join(out_dir, f"gen{rank}.pt"))
    train_stage.shutdown_distributed()
    train_stage.exit_process()


def test_generation_on_the_sharded_model_gives_the_copys_rollouts_one_unit_at_a_time(ckpt, synth, tmp_path):
    """--generate_on=model: rollouts on the FSDP2-sharded model itself (no copy) give the rollouts of
    the full copy, token for token and log-prob for log-prob, with ranks holding different numbers
    of prompts (4 calls against 1, 2 against none) and rows of very different lengths (the ranks
    leave the decode loop together: no hang); during the decode one LLM unit at a time holds its full
    weights, and all are sharded again after."""
    mp.spawn(_generation_worker, args=(2, str(tmp_path / "init"), str(tmp_path), ckpt, synth), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"gen{r}.pt", weights_only=True) for r in range(2)]
    for rank, out in enumerate(ranks):
        for name, n_rows in (("uneven", (8, 2)[rank]), ("none", (4, 0)[rank])):
            copy, on_model = out[name][False], out[name][True]
            assert len(copy) == n_rows and on_model == copy, (rank, name)
        assert out["resharded"] and out["gathered"] and set(out["gathered"]) == {1}
    lengths = [len(c) for out in ranks for c, _ in out["uneven"][True]]
    assert max(lengths[:8]) == 1 and max(lengths[8:]) == 24                  # rank 0 stops at once, rank 1 runs on



def _experts_worker(rank, world, init_file, out_dir, root, synth):
    cfg, model, tok, prompts = uneven_generation(rank, world, init_file, root, synth, "tiny-moe", batch_rows=4)
    out = {"uneven": {}, "none": {}}
    for place in ("copy", "experts"):
        policy = rl.generation_policy(model, place=place)
        gen = torch.Generator().manual_seed(rank)
        for name, mine in (("none", prompts[:2] if rank == 0 else []),                # 1 call / none
                           ("uneven", prompts[:4] if rank == 0 else prompts[4:])):    # 2 calls / 1 call
            rolls = rl.rollouts(policy, tok, mine, cfg, gen)                  # calls of 2 prompts (4 rows)
            out[name][place] = [(r.completion, r.rollout_logp) for r in rolls]
    out["held"] = [(b.expert_slice, tuple(b.experts.gate_proj.shape)) for b in moe.moe_blocks(policy)]
    torch.save(out, os.path.join(out_dir, f"experts{rank}.pt"))
    train_stage.shutdown_distributed()
    train_stage.exit_process()


def test_generation_on_experts_spread_over_the_ranks_gives_the_copys_rollouts(moe_ckpt, synth, tmp_path):
    """--generate_on=experts: each rank's copy holds half of every MoE layer's 8 experts, and its
    rollouts equal the full copy's, token for token and log-probs within 1e-5, with ranks holding
    different numbers of prompts (2 calls of 2 prompts against 1 of 1, one of 2 against none) and
    rows of very different lengths (every MoE layer is a collective: the ranks step together, no hang)."""
    mp.spawn(_experts_worker, args=(2, str(tmp_path / "init"), str(tmp_path), moe_ckpt, synth), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"experts{r}.pt", weights_only=True) for r in range(2)]
    for rank, out in enumerate(ranks):
        for name, n_rows in (("uneven", (8, 2)[rank]), ("none", (4, 0)[rank])):
            copy, experts = out[name]["copy"], out[name]["experts"]
            assert len(copy) == n_rows and [c for c, _ in experts] == [c for c, _ in copy], (rank, name)
            for (_, a), (_, b) in zip(experts, copy):                 # the experts' products: other batch sizes
                assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0), (rank, name)
        assert out["held"] == [((4 * rank, 4 * rank + 4), (4, 96, 128))] * 4            # 4 of the 8 experts
    lengths = [len(c) for out in ranks for c, _ in out["uneven"]["experts"]]
    assert max(lengths[:8]) == 1 and max(lengths[8:]) == 24                  # rank 0 stops at once, rank 1 runs on

# the stage through torchrun: a stub reward the random model can earn, and rank 0's rows stop at
# their first token (every token stops them) while rank 1's run up to 24
DRIVER = """
import gc
import os
import sys
sys.path.insert(0, {root!r})
import rl

def parity(rolls, cfg, judge=None):
    for r in rolls:
        want = int(r.prompt.where.rsplit(":", 1)[1]) % 2
        r.answer_r = r.reward = float(bool(r.completion) and r.completion[0] % 2 == want)

if os.environ["RANK"] == "0":                 # every token it may sample
    rl.sample.stop_ids = lambda tok: set(range(tok.n_vocab)) - set(rl.banned_ids(tok))

real_update = rl.update_episode
def counted(*args, **kwargs):             # the models alive: the sharded policy, and its generation copy?
    gc.collect()
    n = sum(isinstance(o, rl.modeling.SAILVL) for o in gc.get_objects())
    print(f"rank {{rl.rank_and_world()[0]}}: {{n}} models during the update", flush=True)
    return real_update(*args, **kwargs)

rl.score_rollouts, rl.update_episode = parity, counted
rl.train_stage.run_command(lambda: rl.main(sys.argv[1:]))     # as rl.py ends: no abort at exit
"""


def torchrun(driver, args, out, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver), *args,
           f"--out_dir={out}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def test_two_process_stage_with_uneven_rows_finishes_and_resumes_after_kill(ckpt, synth, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    args = ["--stage", "rl-verifiable", f"--data_dir={synth}", "--episodes=4", "--group_size=4",
            "--prompts_per_episode=4", "--eval_prompts=4", "--eval_samples=2", "--save_every=2", "--lr=1e-3",
            "--keep_checkpoints=5", "--direct_share=0.5", "--max_new_tokens=24"]   # rl-mixed's direct prompts too
    for d in ("a", "b"):
        os.makedirs(tmp_path / d)
        os.symlink(ckpt / "out" / "longcot", tmp_path / d / "longcot")
    ref = torchrun(driver, args, tmp_path / "a")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    assert "episode 0004/0004" in out
    assert " | thinking greedy " in out and " | direct greedy " in out        # both modes held out
    assert "rank 1: 2 models during the update" in out                        # full: the copy kept
    cut = torchrun(driver, args, tmp_path / "b")                 # killed once its episode-2 checkpoint exists
    deadline = time.time() + 600
    while not (tmp_path / "b" / "rl-verifiable.run" / "step-000002" / "meta.json").exists():
        assert cut.poll() is None and time.time() < deadline, "the run ended before its checkpoint"
        time.sleep(0.2)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    res = torchrun(driver, [*args, "--resume"], tmp_path / "b")
    out, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out[-3000:]
    assert "resume: continuing from" in out
    wa, wb = (load_file(str(tmp_path / d / "rl-verifiable" / "model.safetensors")) for d in "ab")
    start = load_file(str(ckpt / "out" / "longcot" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], start[k]) for k in start)


def test_lean_two_process_stages_free_the_copy_or_generate_on_the_sharded_model(ckpt, synth, tmp_path):
    """--update_memory=lean (auto's choice on a GPU a large model crowds): while the policy trains
    only the sharded model is alive on each rank, not the generation copy, and the run ends. With
    --generate_on=model there is no copy at all, and the run ends with the same weights: the same
    rollouts, with rows of very different lengths on the two ranks."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    args = ["--stage", "rl-verifiable", f"--data_dir={synth}", "--episodes=1", "--group_size=4", "--lr=1e-3",
            "--prompts_per_episode=4", "--eval_prompts=4", "--eval_samples=2", "--update_memory=lean",
            "--max_new_tokens=24"]                             # the final evaluation runs on the rebuilt copy
    outs = {}
    for d, where in (("copy", "copy"), ("model", "model")):
        os.makedirs(tmp_path / d)
        os.symlink(ckpt / "out" / "longcot", tmp_path / d / "longcot")
        run = torchrun(driver, [*args, f"--generate_on={where}"], tmp_path / d)
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:]
        assert "update memory: lean" in out and "episode 0001/0001" in out
        assert out.count(": 1 models during the update") == 2 and "2 models during" not in out     # 2 ranks
        outs[d] = out
    assert "generation: on the sharded model" in outs["model"] and "generation: on" not in outs["copy"]
    wa, wb = (load_file(str(tmp_path / d / "rl-verifiable" / "model.safetensors")) for d in ("copy", "model"))
    start = load_file(str(ckpt / "out" / "longcot" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], start[k]) for k in start)


def test_a_two_process_moe_stage_generating_on_the_ranks_experts_ends_with_the_copys_weights(moe_ckpt, synth, tmp_path):
    """rl-verifiable on tiny-moe under torchrun with --generate_on=experts (each rank's copy holds half
    of every layer's experts) says so, and ends with the weights of the run on full copies (the same
    rollouts; their log-probs within float rounding), with rows of very different lengths on the two
    ranks and the final evaluation on the rebuilt copy."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    args = ["--stage", "rl-verifiable", f"--data_dir={synth}", "--episodes=1", "--group_size=4", "--lr=1e-3",
            "--prompts_per_episode=4", "--eval_prompts=4", "--eval_samples=2", "--update_memory=lean",
            "--max_new_tokens=24"]
    outs = {}
    for where in ("copy", "experts"):
        os.makedirs(tmp_path / where)
        os.symlink(moe_ckpt / "out" / "longcot", tmp_path / where / "longcot")
        run = torchrun(driver, [*args, f"--generate_on={where}"], tmp_path / where)
        outs[where], _ = run.communicate(timeout=600)
        assert run.returncode == 0 and "episode 0001/0001" in outs[where], outs[where][-3000:]
    assert "generation: on a copy holding 1/2 of each MoE layer's experts" in outs["experts"]
    assert "generation: on" not in outs["copy"]
    wa, wb = (load_file(str(tmp_path / d / "rl-verifiable" / "model.safetensors")) for d in ("copy", "experts"))
    start = load_file(str(moe_ckpt / "out" / "longcot" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)
    assert any(not torch.allclose(wa[k], start[k], rtol=1e-4, atol=1e-5) for k in start)      # it trained
