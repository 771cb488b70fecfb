"""Two RL stage outputs compared on the same held-out prompts (paper §4.2.3's evaluation, paired).

    python tests/rl_compare.py out-rl/rl-verifiable out-rl-control/rl-verifiable

Reads each output's heldout_predictions.jsonl (rl.py writes every held-out prompt before and after
the stage) and prints, per metric, A − B of the "after" side with its 95% paired bootstrap interval
(sample.paired_difference: the prompts must be the same). This is how the README compares a run with
its control; a stage's own after − before is in its meta.json and its log.
"""
import argparse
import json
import os
import sys

import repo_path

repo_path.add_repo_root()

import sample  # noqa: E402

METRICS = ("greedy_acc", "pass@1", "maj@k", "pass@k", "reward")
GREEDY_SHAPE = ("greedy_fmt", "greedy_think")      # the greedy reply well-formed, its think score: where both have them


def after_side(folder: str) -> list:
    path = os.path.join(folder, "heldout_predictions.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"rl_compare: {path} not found (not an RL stage output?)")
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["side"] == "after"]


def compare(a: list, b: list) -> dict:
    """{metric: sample.paired_difference of A and B on that metric}: METRICS, and GREEDY_SHAPE's where
    every prediction of both has them (rl.py writes them; older outputs lack them)."""
    metrics = METRICS + tuple(m for m in GREEDY_SHAPE if all(m in p for p in a + b))
    return {m: sample.paired_difference([dict(p, correct=p[m]) for p in a], [dict(p, correct=p[m]) for p in b])
            for m in metrics}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="an RL stage output folder (e.g. out/rl-verifiable)")
    ap.add_argument("b", help="another one, evaluated on the same held-out prompts")
    args = ap.parse_args(argv)
    a, b = after_side(args.a), after_side(args.b)
    print(f"A - B after the stage, {len(a)} prompts, 95% paired bootstrap intervals")
    for m, r in compare(a, b).items():
        lo, hi = r["interval"]
        print(f"  {m:12s} {r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    sys.exit(main())
