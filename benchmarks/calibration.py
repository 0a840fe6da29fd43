"""The report's verdicts on simulated suites (report.significance.decide, as the reporter runs it),
printed as a Markdown table: false-positive rate of equal methods, family-wise rate of a whole
report of 10 equal methods, interval coverage and power, per seed count and seed SD; beside
them, the round-2 alternatives the procedure replaced (Holm over the K - 1 comparisons with the
best alone, and a Holm per family). The simulation is tests/test_calibration.py's.

    python benchmarks/calibration.py [--experiments 2000]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import stats  # noqa: E402
from report.significance import decide  # noqa: E402
from tests.test_calibration import CLAIMS, split_truth, suite  # noqa: E402


def per_family_holm(rows) -> bool:
    """The alternative: each family corrected alone (best: K - 1; each reference: K - 1)."""
    claims = False
    for family in {r["family"] for r in rows}:
        part = [r for r in rows if r["family"] == family]
        adjusted = stats.holm([r["p"] for r in part])
        claims |= any(p < 0.05 for p in adjusted)
    return claims


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiments", type=int, default=2000)
    args = parser.parse_args(argv)
    n_exp = args.experiments
    rng = np.random.default_rng(0)
    print("| seeds | seed SD (points) | equal pair: claimed | 10 equal rows, report: any claim | "
          "same, Holm per family | 95% interval covers | 20 points found (2 rows) | 20 points found (10 rows) |")
    print("|---|---|---|---|---|---|---|---|")
    for seeds in (2, 3, 5, 10):
        for seed_sd in (0.005, 0.01, 0.02, 0.03):
            pair = family = separate = covered = found2 = found10 = 0
            for i in range(n_exp):
                values, e = suite(rng, [0.5, 0.5], range(seeds), 2000, seed_sd, 0.1)
                pair += decide(values)[0][0]["verdict"] in CLAIMS
                if i < n_exp // 4:  # ten rows cost more: a quarter of the experiments
                    values, _ = suite(rng, [0.5] * 10, range(seeds), 2000, seed_sd, 0.1)
                    rows, _ = decide(values, references={"vs m0": "m0", "vs m1": "m1"})
                    family += any(r["verdict"] in CLAIMS for r in rows)
                    separate += per_family_holm(rows)
                    values, _ = suite(rng, [0.6] + [0.4] * 9, range(seeds), 2000, seed_sd, 0.1)
                    rows, best = decide(values)
                    found10 += best == "m0" and all(r["verdict"] == stats.BETTER for r in rows if r["family"] == "best")
                values, e = suite(rng, [0.53, 0.5], range(seeds), 2000, seed_sd, 0.1)
                (row,), _ = decide(values)
                covered += row["ci_low"] <= split_truth(0.53, 0.5, e, seed_sd, 0.1, 2000) <= row["ci_high"]
                values, _ = suite(rng, [0.6, 0.4], range(seeds), 2000, seed_sd, 0.1)
                found2 += decide(values)[0][0]["verdict"] == stats.BETTER
            quarter = n_exp // 4
            print(f"| {seeds} | {100 * seed_sd:g} | {pair / n_exp:.1%} | {family / quarter:.1%} | "
                  f"{separate / quarter:.1%} | {covered / n_exp:.1%} | {found2 / n_exp:.1%} | {found10 / quarter:.1%} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
