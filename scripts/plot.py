#!/usr/bin/env python
"""Plot finished runs: learning curves per arm and the fitted-function panels, as PNG files.

    python scripts/plot.py multirun/2026-11-24/10-00-00                      # a sweep: every run below it
    python scripts/plot.py outputs/a outputs/b --metric train_loss --out figures

Writes into --out (default: the first directory given) and prints the paths:
- curves_<metric>.png: the metric against the round and against the accumulated round time (elapsed_s), a thin
  line per run coloured by arm (runs that differ only by seed) and the arm's median in bold; log scale for errors
  and losses; a dashed line at schedule.switch_round;
- fit_panels.png, when the runs saved predictions.npz (regression and PINN tasks): per arm the target and the
  global model over the shaded client regions with the pointwise error below (1-D), or the error map (2-D).

Only completed runs are drawn; the others are listed on stderr. Exit status: 0 when something was written, 1 when no
completed run was found, 2 for a bad path or a --metric that is not a metrics.csv column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fipa.errors import ConfigError
from fipa.plotting import plot_learning_curves, plot_prediction_panels
from fipa.results import choose_metric, completed_runs, load_runs, metric_columns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+", help="run or sweep directories")
    parser.add_argument("--metric", default=None, help="a metrics.csv column (default: the runs' headline metric)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNG files go (default: the first directory)")
    args = parser.parse_args(argv)
    for path in args.dirs:
        if not path.is_dir():
            parser.exit(2, f"plot: {path} is not a directory\n")
    runs = [run for path in args.dirs for run in load_runs(path)]
    done, problems = completed_runs(runs)
    for problem in problems:
        print(f"plot: left out: {problem}", file=sys.stderr)
    if not done:
        where = ", ".join(map(str, args.dirs))
        parser.exit(1, f"plot: no {'completed ' if runs else ''}runs found under {where}\n")
    try:
        metric = choose_metric(done, args.metric, metric_columns(done) - {"round"})
    except ConfigError as error:
        parser.exit(2, f"plot: {error}\n")

    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    curves = out / f"curves_{metric}.png"
    plot_learning_curves(done, metric, curves)
    written = [curves]
    panels = out / "fit_panels.png"
    if plot_prediction_panels(done, panels):
        written.append(panels)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
