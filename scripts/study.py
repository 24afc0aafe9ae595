"""Run a sweep preset as a resumable study: every job of `conf/sweep/<name>.yaml` into its own directory.

    python scripts/study.py regression_equal_time --out results/regression_equal_time
    python scripts/study.py regression --only variant=fedavg_tau1000 --out results/regression --checkpoint-every 10
    python scripts/study.py pinn_budget --only experiment=poisson_1d,allen_cahn seed=0 --out results/pinn_budget

The jobs are the product of the preset's `hydra.sweeper.params` (narrowed by --only), run one at a time in this
order (the timed presets must not share cores). A job whose summary says completed is skipped; a job that left a
checkpoint resumes from it (fipa.train.run_resumable), so a study killed mid-way loses at most
`--checkpoint-every` rounds of one job. Each job lands in <out>/<key=value,...>/, the layout scripts/collect.py and
scripts/plot.py read. Prints one summary line per job and the jobs still missing at the end.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import yaml

from fipa.config import CONFIG_DIR
from fipa.train import completed_summary, run_resumable, summary_line


def sweep_axes(name: str) -> dict[str, list[str]]:
    path = Path(CONFIG_DIR) / "sweep" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"study: unknown sweep {name!r}; choose one of {', '.join(choices)}")
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    return {key: [v.strip() for v in str(value).split(",")] for key, value in params.items()}


def jobs(name: str, only: list[str]) -> list[list[str]]:
    axes = sweep_axes(name)
    for item in only:
        key, _, values = item.partition("=")
        if key not in axes:
            raise SystemExit(f"study: --only {item}: {key} is not an axis of sweep {name} ({', '.join(axes)})")
        axes[key] = values.split(",")
    return [[f"{k}={v}" for k, v in zip(axes, combo)] for combo in itertools.product(*axes.values())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a preset of conf/sweep/")
    ap.add_argument("--out", type=Path, required=True, help="the study directory")
    ap.add_argument("--only", nargs="*", default=[], metavar="KEY=V1,V2", help="narrow an axis")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="federation.checkpoint_every of each job")
    ap.add_argument("--override", nargs="*", default=[], help="extra overrides for every job")
    args = ap.parse_args(argv)

    todo = jobs(args.sweep, args.only)
    extra = [f"sweep={args.sweep}", *args.override]
    if args.checkpoint_every:
        extra.append(f"federation.checkpoint_every={args.checkpoint_every}")
    missing = []
    for number, job in enumerate(todo, 1):
        directory = args.out / ",".join(job)
        done = completed_summary(directory)
        if done is None:
            try:
                done = run_resumable([*extra, *job], directory)
            except KeyboardInterrupt:
                print(f"study: interrupted in {directory}; run again to resume", file=sys.stderr)
                return 130
        print(f"[{number}/{len(todo)}] {' '.join(job)}: {summary_line(done)}", flush=True)
        if done.get("status") != "completed":
            missing.append(directory)
    print(f"study: {len(todo) - len(missing)}/{len(todo)} jobs completed in {args.out}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
