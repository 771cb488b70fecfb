"""Checkpoint I/O (model.py): atomic folders, sizes and checksums, exact resume, resharding.

From a hand mutation round: each test guards one behaviour that a small change of model.py's checkpoint
section altered without any other test noticing (tests/test_train_stage.py holds the checkpoint flows
of a training run: kill -9 and resume, resharding between process counts, full disks)."""
import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import model as modeling


def writes(text):
    """write_fn for atomic_write_dir: one file a.txt holding `text`."""
    def fill(d):
        with open(os.path.join(d, "a.txt"), "w") as f:
            f.write(text)
    return fill


def trained_tiny(seed=0):
    """A tiny model and its AdamW after one step on text (the LLM has optimizer state, the ViT none)."""
    m = modeling.build_model("tiny", seed=seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (1, 16), generator=g)
    m(ids, labels=ids).ce_sum.backward()
    opt.step()
    opt.zero_grad()
    return m, opt


def files_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------
# the safetensors writer

def test_write_safetensors_refuses_a_tensor_whose_dtype_is_not_the_planned_one(tmp_path):
    """The header (dtypes, offsets) is written before any tensor is fetched: a fetched tensor of the
    planned shape but another dtype (8-byte floats where 4-byte ones were planned) would put bytes
    that disagree with the header into the file; it is refused, naming the tensor."""
    path = str(tmp_path / "x.safetensors")
    with pytest.raises(modeling.CheckpointError, match=r"w is torch\.float64 \(3,\), planned torch\.float32"):
        modeling.write_safetensors(path, [("w", torch.float32, (3,), lambda: torch.zeros(3, dtype=torch.float64))], {})


def test_save_tensors_writes_the_format_metadata_hf_writes(tmp_path):
    """save_tensors (stage outputs, HF exports) marks the file {"format": "pt"}, as
    safetensors/transformers do (older transformers refuse a file without it), and its tensors read
    back equal through the safetensors library."""
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, 2, dtype=torch.bfloat16)}
    path = str(tmp_path / "x.safetensors")
    modeling.save_tensors(path, tensors)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())


def test_the_weights_file_holds_a_tied_lm_head_once_and_an_untied_one_always(tmp_path):
    """write_weights: with tied embeddings the lm_head (the embedding itself) is not written a second
    time; with untied ones it is written, and it is its own tensor (here far from the embedding)."""
    tied = modeling.build_model("tiny", seed=0)
    tied.save_pretrained(str(tmp_path / "tied"))
    keys = set(load_file(str(tmp_path / "tied" / "model.safetensors")))
    assert keys == set(tied.state_dict()) - {"language_model.lm_head.weight"}
    cfg = modeling.preset_config("tiny")
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=False))
    torch.manual_seed(0)
    untied = modeling.SAILVL(cfg)
    untied.init_weights()
    with torch.no_grad():
        untied.language_model.lm_head.weight.add_(1.0)
    untied.save_pretrained(str(tmp_path / "untied"))
    sd = load_file(str(tmp_path / "untied" / "model.safetensors"))
    assert set(sd) == set(untied.state_dict())
    assert torch.equal(sd["language_model.lm_head.weight"], untied.language_model.lm_head.weight.detach())
    assert not torch.equal(sd["language_model.lm_head.weight"], sd["language_model.model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------
# atomic folders

def test_a_write_after_a_crash_between_the_renames_leaves_only_the_new_folder(tmp_path):
    """A crash between replace_dir's two renames leaves <path>.old-* and no <path>: the next
    atomic_write_dir first puts it back, then replaces it, so nothing is left beside the new folder."""
    target = tmp_path / "ck"
    modeling.atomic_write_dir(str(target), writes("old"))
    os.replace(target, tmp_path / "ck.old-x1y2")                # as a crash between the renames leaves it
    modeling.atomic_write_dir(str(target), writes("new"))
    assert sorted(os.listdir(tmp_path)) == ["ck"] and open(target / "a.txt").read() == "new"


def test_replacing_a_folder_twice_leaves_no_copy_of_the_old_ones(tmp_path):
    """The old folder replace_dir moved aside is removed once the new one is in place."""
    target = tmp_path / "ck"
    for text in ("one", "two", "three"):
        modeling.atomic_write_dir(str(target), writes(text))
    assert sorted(os.listdir(tmp_path)) == ["ck"] and os.listdir(target) == ["a.txt"]
    assert open(target / "a.txt").read() == "three"


def test_replace_dir_flushes_every_file_and_folder_then_the_renames(tmp_path, monkeypatch):
    """Durability: before the rename every file and folder of the new folder is fsynced, and after
    it the parent folder (whose entries the renames changed), last. Recorded at os.fsync, by the
    path each descriptor names (Linux /proc)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a file descriptor")
    real, seen, made = os.fsync, [], []

    def recording(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", recording)

    def fill(d):
        made.append(os.path.realpath(d))
        writes("x")(d)
        os.makedirs(os.path.join(d, "sub"))
        with open(os.path.join(d, "sub", "b.txt"), "w") as f:
            f.write("y")
    modeling.atomic_write_dir(str(tmp_path / "ck"), fill)
    tmp = made[0]
    assert sorted(seen[:-1]) == sorted([tmp, os.path.join(tmp, "a.txt"), os.path.join(tmp, "sub"),
                                        os.path.join(tmp, "sub", "b.txt")])
    assert seen[-1] == os.path.realpath(tmp_path)


def test_a_removal_cut_short_is_never_put_back(tmp_path, monkeypatch):
    """A crash while replace_dir removed the old folder left a half-removed <path>.old-* whose removals
    made it the newest; a later crash between the renames then put that one back, not the complete
    folder. The old folder is now renamed <path>.trash-* before its removal, and the next write
    removes what such crashes left while <path> was in place."""
    target = tmp_path / "ck"
    modeling.atomic_write_dir(str(target), writes("one"))
    rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, ignore_errors=False: None)     # the removal never ran
    modeling.atomic_write_dir(str(target), writes("two"))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert sorted(os.listdir(tmp_path))[0] == "ck" and sorted(os.listdir(tmp_path))[1].startswith("ck.trash-")
    os.makedirs(tmp_path / "ck.old-half")                       # a half-removed one of an older version, newest
    os.utime(tmp_path / "ck.old-half", (4_000_000_000, 4_000_000_000))
    modeling.atomic_write_dir(str(target), writes("three"))
    assert sorted(os.listdir(tmp_path)) == ["ck"]                # every leftover removed
    os.replace(target, tmp_path / "ck.old-x1y2")                # a crash between the next write's renames
    modeling.restore_moved_aside(str(target))
    assert (target / "a.txt").read_text() == "three"


def test_the_newest_moved_aside_folder_is_the_one_put_back(tmp_path):
    """Two <path>.old-* folders (a stale one a crash left before its removal, and the one a later
    crash left between the renames, <path> missing): the newest is the last complete folder and is
    the one put back, whatever the names' order."""
    for name, text, mtime in (("ck.old-zzzz", "older", 1_000_000), ("ck.old-aaaa", "newer", 2_000_000)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "a.txt").write_text(text)
        os.utime(tmp_path / name, (mtime, mtime))
    modeling.restore_moved_aside(str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "a.txt").read_text() == "newer"


# ----------------------------------------------------------------------------------------------
# HF folders: the LLM in and out

def test_load_hf_llm_reads_the_language_model_of_a_sailvl_folder(tmp_path):
    """load_hf_llm on a SAIL-VL2 folder: the LLM config from its config.json's llm_config, the
    tensors under language_model.; equal to the saved model's language model."""
    m = modeling.build_model("tiny", seed=3)
    m.save_pretrained(str(tmp_path / "ck"))
    lm = modeling.load_hf_llm(str(tmp_path / "ck"))
    assert lm.cfg == m.cfg.llm_config
    want = m.language_model.state_dict()
    got = lm.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_save_hf_llm_writes_the_tensors_hfs_own_save_writes(tmp_path):
    """save_hf_llm of a tied LLM: the keys of model.safetensors are those transformers' own
    save_pretrained writes for the same model (a tied lm_head not written again), and the metadata
    its files carry."""
    from transformers import Qwen3ForCausalLM
    lm = modeling.build_model("tiny", seed=0).language_model
    modeling.save_hf_llm(lm, str(tmp_path / "ours"))
    Qwen3ForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).save_pretrained(tmp_path / "hf")
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert "lm_head.weight" not in ours and lm.cfg.tie_word_embeddings


def test_a_failed_hf_export_keeps_the_previous_export_whole(tmp_path, monkeypatch):
    """save_hf_llm writes atomically: a full disk while the new weights are written leaves the
    previous export byte for byte, and no temp folder beside it."""
    modeling.save_hf_llm(modeling.build_model("tiny", seed=0).language_model, str(tmp_path / "hf"))
    before = files_bytes(tmp_path / "hf")

    def full_disk(path, tensors):                                   # half a file, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(modeling, "save_tensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        modeling.save_hf_llm(modeling.build_model("tiny", seed=1).language_model, str(tmp_path / "hf"))
    assert files_bytes(tmp_path / "hf") == before and os.listdir(tmp_path) == ["hf"]


# ----------------------------------------------------------------------------------------------
# meta.json: sizes and checksums

def test_meta_json_records_each_files_size_and_sha256(tmp_path):
    """Every file of a stage output, the extra files included, is in meta.json with its size and
    the sha256 of its whole content (model.safetensors is several read chunks long)."""
    src = tmp_path / "notes.txt"
    src.write_text("kept beside the weights\n")
    modeling.save_checkpoint(str(tmp_path / "ck"), modeling.build_model("tiny", seed=0), {"stage": "x"}, 0, 1,
                             extra_files={"notes.txt": str(src)})
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    assert set(meta["files"]) == {"config.json", "model.safetensors", "notes.txt"}
    assert os.path.getsize(tmp_path / "ck" / "model.safetensors") > 3 << 20
    for name, rec in meta["files"].items():
        data = (tmp_path / "ck" / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_an_output_whose_meta_lists_sha256_strings_still_verifies(tmp_path):
    """An output written before sizes were recorded lists each file's sha256 alone: it still counts
    as complete (its files present); a missing one is still refused."""
    ck = tmp_path / "ck"
    modeling.save_checkpoint(str(ck), modeling.build_model("tiny", seed=0), {"stage": "x"}, 0, 1)
    meta = json.loads((ck / "meta.json").read_text())
    meta["files"] = {n: rec["sha256"] for n, rec in meta["files"].items()}
    (ck / "meta.json").write_text(json.dumps(meta))
    assert modeling.verify_checkpoint(str(ck))["files"] == meta["files"] and modeling.is_finished_stage(str(ck))
    os.remove(ck / "config.json")
    with pytest.raises(modeling.CheckpointError, match="config.json is missing"):
        modeling.verify_checkpoint(str(ck))


def test_a_staging_folder_left_by_a_crash_does_not_block_the_next_save(tmp_path):
    """A crash while writing leaves <path>.staging: the next save_checkpoint starts it afresh (the
    crashed run's files are not carried into the new checkpoint) and leaves only <path>."""
    os.makedirs(tmp_path / "ck.staging")
    (tmp_path / "ck.staging" / "half.bin").write_bytes(b"\0" * 10)
    modeling.save_checkpoint(str(tmp_path / "ck"), modeling.build_model("tiny", seed=0), {"stage": "x"}, 0, 1)
    assert os.listdir(tmp_path) == ["ck"]
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "meta.json", "model.safetensors"]
    modeling.verify_checkpoint(str(tmp_path / "ck"))


# ----------------------------------------------------------------------------------------------
# exact resume: RNGs, tied weights, optimizer state, process counts

def test_the_rng_state_carries_the_cached_gaussians_of_python_and_numpy():
    """random.gauss and numpy's legacy standard_normal draw pairs and cache the second value: an
    exact resume restores that cache too (Python's gauss_next, numpy's has_gauss / cached_gaussian)."""
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)
    np.random.standard_normal()
    st = modeling.rng_state()
    assert st["python"][2] is not None and st["numpy"][3] == 1          # a value is cached in each
    want = (random.gauss(0, 1), float(np.random.standard_normal()), torch.randn(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    modeling.set_rng_state(st)
    got = (random.gauss(0, 1), float(np.random.standard_normal()), torch.randn(2))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_a_rank_keeps_its_own_gpus_rng_state_and_resumes_on_fewer_gpus(monkeypatch):
    """A rank saves its own device's CUDA RNG state, not every visible GPU's: restoring every one
    indexed devices a resume with fewer GPUs does not have. A state written the old way (a list)
    restores this rank's entry. (torch.cuda stubbed: no GPU here; rank 1 of a node of 2, its device 1.)"""
    states = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state",                # "cuda": the current device, 1
                        lambda device="cuda": states[torch.device(device).index if torch.device(device).index is not None else 1])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[0], states[1]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device="cuda": restored.append(t))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda ts: restored.append(ts))
    st = modeling.rng_state()
    assert torch.equal(st["cuda"], states[1])
    modeling.set_rng_state(st)
    modeling.set_rng_state({**st, "cuda": [states[0], states[1]]})
    assert [t.tolist() for t in restored] == [[11], [11]]


def test_a_step_checkpoint_stores_a_tied_lm_head_once_and_restores_the_tie(tmp_path):
    """The shards hold the tied lm_head once (as the embedding); a resumed model has the saved
    embedding and its lm_head is still that same tensor."""
    m, opt = trained_tiny()
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 1, {}, opt=opt)
    keys = set()
    for p in glob.glob(str(tmp_path / "ck" / "state" / "*.safetensors")):
        with safe_open(p, framework="pt") as f:
            keys |= set(f.keys())
    assert "model.language_model.model.embed_tokens.weight" in keys
    assert not [k for k in keys if k.startswith("model.") and "lm_head" in k]
    m2 = modeling.build_model("tiny", seed=1)
    modeling.load_checkpoint(str(tmp_path / "ck"), m2, torch.optim.AdamW(m2.parameters(), lr=1e-3), 0, 1)
    lm2 = m2.language_model
    assert lm2.lm_head.weight is lm2.model.embed_tokens.weight
    assert torch.equal(lm2.model.embed_tokens.weight, m.language_model.model.embed_tokens.weight)


def test_resuming_an_optimizer_that_trains_fewer_modules_is_one_checkpoint_error(tmp_path):
    """A checkpoint with optimizer state for the LLM, resumed by a run whose optimizer holds only the
    adapter: refused as a CheckpointError naming the problem (not a KeyError from deep inside)."""
    m, opt = trained_tiny()
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 1, {}, opt=opt)
    m2 = modeling.build_model("tiny", seed=1)
    modeling.freeze(m2, ["mlp1"])
    opt2 = torch.optim.AdamW([p for p in m2.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(modeling.CheckpointError, match="optimizer state for parameters this run does not train"):
        modeling.load_checkpoint(str(tmp_path / "ck"), m2, opt2, 0, 1)


def test_a_mid_trial_adalrs_checkpoint_resumes_only_with_its_process_count(tmp_path):
    """meta.json records the saving process count; a checkpoint taken in the middle of an AdaLRS
    trial (a per-process rollback copy) is refused by another process count, taken by the same."""
    m, opt = trained_tiny()
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 2,
                             {"adalrs_snapshot": {"lr": torch.tensor(0.5)}}, opt=opt)
    assert json.loads((tmp_path / "ck" / "meta.json").read_text())["world_size"] == 2
    m2 = modeling.build_model("tiny", seed=1)
    with pytest.raises(modeling.CheckpointError, match="saved by 2 processes in the middle of an AdaLRS trial"):
        modeling.load_checkpoint(str(tmp_path / "ck"), m2, torch.optim.AdamW(m2.parameters(), lr=1e-3), 0, 1)
    _, st = modeling.load_checkpoint(str(tmp_path / "ck"), m2, torch.optim.AdamW(m2.parameters(), lr=1e-3), 0, 2)
    assert float(st["adalrs_snapshot"]["lr"]) == 0.5


def test_a_rank_the_saving_run_did_not_have_takes_rank_0s_state(tmp_path):
    """Resharding up: a 1-process checkpoint resumed as rank 1 of 2 gives rank 1 the rank0.pt state
    (there is no rank1.pt) and the saved weights."""
    m, opt = trained_tiny()
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x", "step": 1}, 0, 1, {"marker": torch.tensor(7)},
                             opt=opt)
    assert not (tmp_path / "ck" / "rank1.pt").exists()
    m2 = modeling.build_model("tiny", seed=1)
    meta, st = modeling.load_checkpoint(str(tmp_path / "ck"), m2, torch.optim.AdamW(m2.parameters(), lr=1e-3), 1, 2)
    assert int(st["marker"]) == 7 and meta["world_size"] == 1
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# the run folder: which step checkpoint a --resume takes, which are pruned

def test_a_step_checkpoint_with_a_torn_meta_json_is_skipped_for_the_previous_one(tmp_path):
    """A meta.json that is not JSON (torn by a disk fault): the checkpoint is reported and skipped
    (the one before is resumed), and it does not count as a finished output."""
    m, opt = trained_tiny()
    run = tmp_path / "x.run"
    for step in (2, 4):
        modeling.save_checkpoint(str(run / f"step-{step:06d}"), m, {"stage": "x", "step": step}, 0, 1, {}, opt=opt)
    meta = run / "step-000004" / "meta.json"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    logs = []
    assert modeling.find_resume_checkpoint(str(run), logs.append) == str(run / "step-000002")
    assert len(logs) == 1 and "step-000004" in logs[0] and "meta.json is unreadable" in logs[0]
    assert not modeling.is_finished_stage(str(run / "step-000004"))


def test_what_a_crash_left_is_no_step_checkpoint_and_pruning_clears_the_half_written_ones(tmp_path):
    """Beside step-N the run folder may hold what a crash left (step-N.staging, step-N.tmp-*,
    step-N.old-*): none is a resume candidate. The half-written ones, each as large as a checkpoint,
    go when the next checkpoint is pruned; a moved-aside folder stays for restore_moved_aside."""
    names = ["step-000002", "step-000003.old-ab12", "step-000004.staging", "step-000005.tmp-cd34", "notes.staging"]
    for n in names:
        os.makedirs(tmp_path / n)
    assert modeling.step_checkpoints(str(tmp_path)) == [str(tmp_path / "step-000002")]
    modeling.prune_checkpoints(str(tmp_path), 1, 2)
    assert sorted(os.listdir(tmp_path)) == ["notes.staging", "step-000002", "step-000003.old-ab12"]


def test_resume_skips_a_step_folder_that_holds_no_optimizer_state(tmp_path):
    """find_resume_checkpoint takes the newest *resumable* step checkpoint: a complete but
    non-resumable folder (a stage output, no state/) in a newer step-N is reported and skipped."""
    m, opt = trained_tiny()
    run = tmp_path / "x.run"
    modeling.save_checkpoint(str(run / "step-000002"), m, {"stage": "x", "step": 2}, 0, 1, {}, opt=opt)
    modeling.save_checkpoint(str(run / "step-000004"), m, {"stage": "x", "step": 4}, 0, 1)
    logs = []
    assert modeling.find_resume_checkpoint(str(run), logs.append) == str(run / "step-000002")
    assert len(logs) == 1 and "not a resumable step checkpoint" in logs[0]


def test_weights_reach_the_host_one_at_a_time_inside_the_writer(tmp_path, monkeypatch):
    """A stage output and save_pretrained of a one-process model hand the writer the model's own
    tensors: each goes to the host inside write_safetensors, one at a time, never all of them first
    (a GPU model's whole state on the host). Every Tensor.cpu() call here is recorded with its caller."""
    m = modeling.build_model("tiny", seed=0)
    callers, cpu = [], torch.Tensor.cpu

    def recording_cpu(self, *a, **kw):
        import sys
        callers.append(sys._getframe(1).f_code.co_name)
        return cpu(self, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "cpu", recording_cpu)
    modeling.save_checkpoint(str(tmp_path / "ck"), m, {"stage": "x"}, 0, 1)
    m.save_pretrained(str(tmp_path / "pre"))
    monkeypatch.undo()
    got = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert got.keys() == load_file(str(tmp_path / "pre" / "model.safetensors")).keys()
    assert set(callers) == {"write_safetensors"} and len(callers) == 2 * len(got)     # once per tensor written
    for k, v in modeling.hub_layout(m.state_dict()).items():
        if k in got:
            assert torch.equal(got[k], v)


@pytest.mark.parametrize("preset,tied", [("tiny", True), ("tiny", False), ("tiny-moe", True)])
def test_from_pretrained_reads_straight_into_bf16_matrices_what_for_generation_would_hold(tmp_path, preset, tied):
    """from_pretrained(matrices_dtype=bf16), as sample.load and RL's harvest read a model for a GPU:
    the same tensors and dtypes as the fp32 model then model.for_generation's cast (a tied lm_head
    its own bf16 copy of the embedding; the MoE experts too), with no fp32 model made first."""
    cfg = modeling.preset_config(preset)
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=tied))
    torch.manual_seed(0)
    m = modeling.SAILVL(cfg)
    m.init_weights()                                  # the experts are made with torch.empty: no NaN to compare
    m.save_pretrained(str(tmp_path / "ck"))
    want = modeling.SAILVL.from_pretrained(str(tmp_path / "ck"))
    modeling.hold_matrices_in(want.language_model, torch.bfloat16)
    got = modeling.SAILVL.from_pretrained(str(tmp_path / "ck"), matrices_dtype=torch.bfloat16)
    w, g = want.state_dict(), got.state_dict()
    assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) and w[k].dtype == g[k].dtype for k in w)
    assert {t.dtype for t in g.values()} == {torch.float32, torch.bfloat16}
    lm = got.language_model
    assert lm.lm_head.weight is not lm.model.embed_tokens.weight and lm.lm_head.weight.dtype == torch.bfloat16


def tiny_with_head(tied: bool, seed: int = 0):
    cfg = modeling.preset_config("tiny")
    cfg = dataclasses.replace(cfg, llm_config=dataclasses.replace(cfg.llm_config, tie_word_embeddings=tied))
    torch.manual_seed(seed)
    m = modeling.SAILVL(cfg)
    m.init_weights()
    return m


def test_an_lm_head_is_never_made_up_or_lost_between_tied_and_untied(tmp_path):
    """The embedding stands in for the head only where the checkpoint ties them: an untied checkpoint
    that lacks its lm_head is refused (missing), not given the embedding; a tied checkpoint into an
    untied model gives the head the embedding; an untied checkpoint into a model that ties them is
    refused (its trained head would be lost), through SAIL-VL2 folders and Qwen3 ones alike."""
    from safetensors.torch import save_file
    untied = tiny_with_head(False)
    untied.save_pretrained(str(tmp_path / "untied"))
    sd = load_file(str(tmp_path / "untied" / "model.safetensors"))
    del sd["language_model.lm_head.weight"]
    save_file(sd, str(tmp_path / "untied" / "model.safetensors"))
    for dtype in (None, torch.bfloat16):
        with pytest.raises(ValueError, match="1 missing keys.*lm_head"):
            modeling.SAILVL.from_pretrained(str(tmp_path / "untied"), matrices_dtype=dtype)
    tied = tiny_with_head(True, seed=1)
    tied.save_pretrained(str(tmp_path / "tied"))
    got = modeling.SAILVL.from_pretrained(str(tmp_path / "tied"), cfg=untied.cfg).language_model
    assert got.lm_head.weight is not got.model.embed_tokens.weight
    assert torch.equal(got.lm_head.weight, tied.language_model.model.embed_tokens.weight)
    untied.save_pretrained(str(tmp_path / "untied2"))
    with pytest.raises(ValueError, match="lm_head of its own .* would be lost"):
        modeling.SAILVL.from_pretrained(str(tmp_path / "untied2"), cfg=tied.cfg)
    modeling.save_hf_llm(untied.language_model, str(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="lm_head of its own .* would be lost"):
        modeling.load_llm_weights(tied.language_model, str(tmp_path / "qwen"))


def test_a_safetensors_index_without_its_weight_map_is_an_oserror(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(OSError, match="not a safetensors index with a weight_map"):
        modeling.vit.read_safetensors_folder(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(OSError, match="not a safetensors index"):
        modeling.vit.read_safetensors_folder(str(tmp_path))
