"""What the evaluations cost and what they decide: today's schedule (every alpha in full at
every evaluation, the 0.1 default) against the library's default (the current weights at every
evaluation; the alpha grid only for the final choice, by successive halving), on the demo's
task, side by side in one process: the same seeds, data, training and weights on both sides.

Per seed and schedule: generated tokens and sampling wall time of all evaluations, the chosen
alpha, the held-out (cross-fitted) Pass@k / Pass@1 of the merge, the step of the collapse
warning, and the alphas that halving stopped after its first round. The last line printed is one
JSON object (with `token_ratio` = new / old tokens, the largest over the seeds).

    .venv/bin/python bench/eval_cost.py            # three seeds, the full demo (long)
    .venv/bin/python bench/eval_cost.py --quick    # one seed, the demo's quick settings
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from wise_callback.demo.run import FULL_GRID, run_demo
from wise_callback.options import EvalOptions

SCHEDULES = {"old": FULL_GRID, "new": {}}
"""Today's schedule (every alpha in full at every evaluation), and the library's defaults."""


def one_run(seed: int, quick: bool, evaluation: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        summary = run_demo(out, quick=quick, seed=seed, progress=False, evaluation=evaluation)
        lines = Path(out, "history.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    last = max(r["step"] for r in records)
    final = [r for r in records if r["step"] == last]
    most = max(r["num_samples"] for r in final)
    held = summary["heldout"]
    return {
        "generated_tokens": summary["spent"]["generated_tokens"],
        "sample_s": round(summary["spent"]["sample_s"], 2),
        "evaluations": summary["spent"]["evaluations"],
        "chosen_alpha": summary["chosen_alpha"],
        "heldout_pass@k": held["chosen"]["pass@k"],
        "heldout_pass@k_se": held["chosen"]["pass@k_se"],
        "heldout_pass@1": held["chosen"]["pass@1"],
        "collapse_warning_step": summary["collapse_warning_step"],
        "final_alphas_first_round_only": [r["alpha"] for r in final if r["num_samples"] < most],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, quick demo settings")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (quick: 0)")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    per_seed = {}
    for seed in seeds:
        old = one_run(seed, args.quick, SCHEDULES["old"])
        new = one_run(seed, args.quick, SCHEDULES["new"])
        same_choice = new["chosen_alpha"] == old["chosen_alpha"] or (
            abs(new["heldout_pass@k"] - old["heldout_pass@k"]) <= old["heldout_pass@k_se"]
        )
        warning_kept = old["collapse_warning_step"] is None or (
            new["collapse_warning_step"] is not None
            and new["collapse_warning_step"] <= old["collapse_warning_step"]
        )
        per_seed[seed] = {
            "old": old,
            "new": new,
            "token_ratio": round(new["generated_tokens"] / old["generated_tokens"], 4),
            "decision_kept": same_choice and warning_kept,
        }
    ratios = [r["token_ratio"] for r in per_seed.values()]
    kept = all(r["decision_kept"] for r in per_seed.values())
    print(
        json.dumps(
            {
                "bench": "eval_cost",
                "quick": args.quick,
                "schedule_old": SCHEDULES["old"],
                "schedule_new": {
                    k: v for k, v in dataclasses.asdict(EvalOptions()).items() if k in FULL_GRID
                },
                "seeds": per_seed,
                "token_ratio": max(ratios),
                "goal_token_ratio": 0.4,
                "decisions_kept": kept,
                "goals_met": max(ratios) <= 0.4 and kept,
            }
        )
    )


if __name__ == "__main__":
    main()
