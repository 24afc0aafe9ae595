#!/usr/bin/env python
"""Early-round comparison of a study laid out by scripts/study.py (<out>/<key=value,...>/): per arm, the median over
seeds of a metric after chosen rounds, the worst ratio to a baseline arm at any round (paired by seed and by the
other keys), and per seed the first round from which the arm is never again behind the baseline.

    python scripts/rounds_table.py results/pinn_early10 --rounds 1 2 3 4 5 10
    python scripts/rounds_table.py results/robust --metric test_mse --baseline variant=fedavg --rounds 1 10 100

Prints a markdown table; lower is better for the metric (an error). Exit status 1 when no run is found.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path


def load(study: Path, metric: str) -> dict[tuple[tuple[str, str], ...], list[float]]:
    """{(key, value) pairs of the run's directory name: the metric per round} for every run with a metrics.csv."""
    runs = {}
    for path in sorted(study.glob("*/metrics.csv")):
        keys = tuple(tuple(part.split("=", 1)) for part in path.parent.name.split(",") if "=" in part)
        with open(path) as f:
            runs[keys] = [float(row[metric]) for row in csv.DictReader(f) if row.get(metric)]
    return runs


def first_round_never_behind(ratios: list[float]) -> int:
    """1-based round from which every later ratio to the baseline is <= 1 (one past the run's last round if none)."""
    behind = [k for k, r in enumerate(ratios, 1) if r > 1]
    return behind[-1] + 1 if behind else 1


def rows(runs: dict, baseline: tuple[str, str], rounds: list[int]) -> list[dict]:
    key_of_arm = baseline[0]
    out = []
    for group in sorted({tuple(kv for kv in keys if kv[0] not in ("seed", key_of_arm)) for keys in runs}):
        arms = sorted({dict(keys)[key_of_arm] for keys in runs if set(group) <= set(keys)},
                      key=lambda arm: (arm != baseline[1], arm))  # fmt: skip
        for arm in arms:
            seeds = {dict(k)["seed"]: v for k, v in runs.items() if set(group) <= set(k) and dict(k)[key_of_arm] == arm}
            row = {"group": ",".join("=".join(kv) for kv in group), key_of_arm: arm, "seeds": len(seeds)}
            for r in rounds:
                values = [v[r - 1] for v in seeds.values() if len(v) >= r]
                row[f"r{r}"] = statistics.median(values) if len(values) == len(seeds) else float("nan")
            if arm != baseline[1]:
                paired = []
                for seed, values in sorted(seeds.items()):
                    base = next((v for k, v in runs.items() if set(group) <= set(k) and dict(k)[key_of_arm] ==
                                 baseline[1] and dict(k)["seed"] == seed), None)  # fmt: skip
                    if base:
                        paired.append([a / b for a, b in zip(values, base)])
                row["worst"] = max(max(p) for p in paired) if paired else float("nan")
                row["ahead_from"] = " ".join(str(first_round_never_behind(p)) for p in paired)
            out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    header = list(dict.fromkeys(k for row in table for k in row))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in header) + " |" for row in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("--metric", default="test_rel_l2")
    ap.add_argument("--baseline", default="variant=fedavg", metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    args = ap.parse_args(argv)
    runs = load(args.study, args.metric)
    if not runs:
        print(f"rounds_table: no runs with {args.metric} under {args.study}", file=sys.stderr)
        return 1
    key, _, value = args.baseline.partition("=")
    print(markdown(rows(runs, (key, value), args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
