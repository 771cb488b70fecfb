"""The repository root on sys.path for the tests and tests/bench.py, without hiding HF's `kernels`.

The project's kernels.py and the PyPI package `kernels` share one import name. HF transformers
>= 5.25 requires that package and imports it when its model code loads
(transformers/integrations/hub_kernels.py: `from kernels import CUDAProperties, ...`), so with the
repository root first on sys.path every HF oracle failed with "cannot import name
'CUDAProperties' from 'kernels'". `add_repo_root` lets transformers import that module first, with
the root off sys.path: it binds the names it needs from the real package. Then the name `kernels`
is left to the project's kernels.py for the project's files and the tests. Hub kernels are
switched off (USE_HUB_KERNELS=NO, as transformers' own tests do): from 5.25 on `from_pretrained`
would otherwise kernelize the model, importing `kernels` again and fetching kernels from the Hub,
while the oracles must be HF's plain torch code, offline.
"""
import importlib
import importlib.metadata
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(ROOT, "kernels.py")


def _is_root(entry: str) -> bool:
    return os.path.abspath(entry or os.curdir) == ROOT          # "" on sys.path is the working directory


def bind_hf_kernels() -> None:
    """Switch hub kernels off, and import transformers' hub-kernels module against the PyPI
    `kernels` if that package is installed (transformers >= 5.25 depends on it; 5.24 does not)."""
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    ours = sys.modules.pop("kernels", None)
    if ours is not None and getattr(ours, "__file__", None) != OURS:
        ours = None                                              # the PyPI package: the name goes to ours
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    try:
        importlib.import_module("transformers.integrations.hub_kernels")
    except ImportError:                                          # no transformers: nothing imports `kernels`
        pass
    finally:
        sys.path[:] = saved
        sys.modules.pop("kernels", None)                         # the PyPI package, bound by transformers
        if ours is not None:
            sys.modules["kernels"] = ours


def add_repo_root() -> None:
    """Bind HF's `kernels` first, then put the repository root first on sys.path."""
    bind_hf_kernels()
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
