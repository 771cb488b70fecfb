"""Test set-up: repo root on sys.path (HF's `kernels` package bound first: tests/repo_path.py),
offline, deterministic, Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here (the
interpreter is how CPU CI runs the hand-written kernels; it computes bf16 arithmetic wrongly, Triton issue #4972, so kernels upcast first).
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    try:
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repo_path  # noqa: E402

repo_path.add_repo_root()              # after transformers has bound HF's `kernels` (see repo_path.py)

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# Two threads for one test process; under pytest-xdist (`-n 2`, README's command) each worker gets its
# share of the cores: tiny tensors gain little from a second thread, so two tests at a time go faster.
# The processes a test launches (torchrun, the recipe's stages) inherit the share through OMP_NUM_THREADS:
# more threads than cores, each spinning at its parallel regions' barriers, would run several times slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
torch.set_num_threads(_threads)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """The default synthetic dataset (every family, its BPE tokenizer), generated once per test
    session (~15 s) and shared read-only by every module that trains or evaluates on it."""
    import synth
    return synth.ensure_synth(tmp_path_factory.mktemp("synth") / "data", progress=False)     # a Path


@pytest.fixture
def on_the_cpu():
    """on_the_cpu(fn) -> fn run with the CPU as the default device. The device tests run the code a
    GPU runs inside `torch.device("meta")` (a tensor made without a device has no data there, and
    meeting the model's tensors it raises); what they wrap with this is the data side, whose
    tensors are CPU tensors by design, and the optimizer's step: torch.optim keeps Adam's step
    counters on the default device, the CPU in a real run (torch 2.11 reads them with .item())."""
    def wrap(fn):
        def run(*args, **kwargs):
            with torch.device("cpu"):
                return fn(*args, **kwargs)
        return run
    return wrap


@pytest.fixture
def sharded_in_bf16(monkeypatch):
    """A process group of one in which train_stage.place_model shards with FSDP2's bf16 mixed
    precision, as it does on CUDA only (modeling.parallelize's mixed_precision forced on)."""
    import torch.distributed as dist
    import model as modeling
    shard = modeling.parallelize
    monkeypatch.setattr(modeling, "parallelize", lambda model, device, mixed_precision: shard(model, device, True))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def launch_contexts(monkeypatch):
    """(seen, inside): kernels._device_context recorded. `seen` lists the tensor each context was
    made for, `inside` those entered and not yet left (len(inside) at a launch: whether it runs
    inside one). The CUDA device itself cannot be made current on a machine without one."""
    import contextlib
    import kernels
    seen, inside = [], []

    @contextlib.contextmanager
    def recorded(t):
        seen.append(t)
        inside.append(t)
        yield
        inside.pop()
    monkeypatch.setattr(kernels, "_device_context", recorded)
    return seen, inside


# The longest tests (a minute or more on 2 cores) start first, so that under `-n 2` one worker runs
# them while the other works through the rest, instead of their ending the suite alone.
LONGEST_FIRST = ("test_golden_a_shortened_chain_learns_to_see", "test_an_interrupted_recipe_continues_to_the_same_report")


# No test takes 5 minutes, even on one core beside another: one that runs 15 is hung (a deadlock in a
# forked data-loader worker once stalled the whole suite). pytest-timeout then fails it, with every
# thread's stack, and the suite goes on.
TEST_TIMEOUT_S = 900


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.name not in LONGEST_FIRST)        # stable: the rest keep their order
    for item in items:
        item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))
