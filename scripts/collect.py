#!/usr/bin/env python
"""Collect a sweep into one tidy CSV (one row per run) and a markdown table (one row per arm, statistics over seeds).

    python scripts/collect.py multirun/2026-11-24/10-00-00                       # the runs' headline metric
    python scripts/collect.py results/pinn --metric test_max_abs --out results/pinn/max_abs
    python scripts/collect.py results/robust --stall 1e-2 --baseline aggregator=fedavg   # seeds that stall, worst
                                                                                         # ratio to FedAvg at any round

Any directory below the sweep holding metrics.csv, summary.json or .hydra/overrides.yaml is a run (Hydra multirun
jobs, scripts/pinn_table.py and image_table.py trees, single runs). Runs that differ only by seed form an arm: Hydra
jobs by their overrides minus seed, other runs by the resolved config keys that differ. Writes PREFIX.csv and
PREFIX.md (default <sweep>/results) and prints the table; runs without a summary, or whose status is not
`completed`, are listed on stderr with the reason and left out.

Exit status: 0 with at least one completed run; 1 when none; 2 for a bad path or an unknown --metric.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fipa.errors import ConfigError
from fipa.results import (arm_table, choose_metric, completed_runs, has_value, load_runs, markdown_table,
                          summary_metric_names, tidy_rows, write_csv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a sweep directory (or a single run)")
    parser.add_argument("--metric", default=None, help="default: the runs' headline metric (summary.json 'metric')")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default: <sweep>/results)")
    parser.add_argument("--stall", type=float, default=None, metavar="T",
                        help="add the number of seeds whose final metric is above T (e.g. 1e-2)")
    parser.add_argument("--baseline", default=None, metavar="KEY=VALUE",
                        help="add each arm's worst ratio to the baseline arm at any round of any seed, e.g. "
                             "aggregator=fedavg (paired by seed and the settings outside the key's group)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        parser.exit(2, f"collect: {args.sweep} is not a directory\n")
    runs = load_runs(args.sweep)
    if not runs:
        parser.exit(1, f"collect: no runs found under {args.sweep}\n")
    done, problems = completed_runs(runs)
    for problem in problems:
        print(f"collect: missing: {problem}", file=sys.stderr)
    if not done:
        parser.exit(1, f"collect: no completed runs under {args.sweep} ({len(runs)} found)\n")
    try:
        metric = choose_metric(done, args.metric, summary_metric_names(done))
    except ConfigError as error:
        parser.exit(2, f"collect: {error}\n")
    for run in (r for r in done if not has_value(r, metric)):
        print(f"collect: missing: {run.dir}: no {metric} in this run", file=sys.stderr)
    done = [r for r in done if has_value(r, metric)]

    try:
        rows, table = tidy_rows(done, metric), arm_table(done, metric, args.stall, args.baseline)
    except ConfigError as error:
        parser.exit(2, f"collect: {error}\n")
    for row in (r for r in rows if not math.isfinite(r[metric])):
        print(f"collect: {row['dir']}: {metric} is not finite (left out of the statistics)", file=sys.stderr)
    out = args.out or args.sweep / "results"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    Path(f"{out}.md").write_text(markdown_table(table))
    print(markdown_table(table), end="")
    print(f"collect: wrote {out}.csv and {out}.md ({len(rows)} runs, {len(table)} arms)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
