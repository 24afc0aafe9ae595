"""Absolute FedAvg round times of a preset, sequential and on Ray workers, eager and compiled (issue 13's absolute
figures: for the notes, never for tests, because this machine is shared).

Each arm is a real `fipa.train.build` run of `experiment=PRESET aggregator=fedavg federation.local_epochs=TAU`
for `--rounds` rounds; the first round (Ray start-up is outside it, compilation inside it) is reported apart and
the median of the others is the round time. The arms run one after another in this process, so give the machine
to it: Ray's arm uses `--workers` cores.

    python benchmarks/bench_round_times.py                         # regression_1d_m4, tau 1000, 4 rounds, 2 workers
    python benchmarks/bench_round_times.py --tau 20 --rounds 3 --arms sequential-eager

Last line: ``round_s_<arm>=..`` for every arm.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

ARMS = {
    "sequential-eager": [],
    "sequential-compiled": ["trainer.compile=true"],
    "ray-eager": ["executor=ray"],
    "ray-compiled": ["executor=ray", "trainer.compile=true"],
}


def round_times(preset: str, tau: int, rounds: int, workers: int, extra: list[str]) -> list[float]:
    from fipa.train import build, compose

    overrides = [f"experiment={preset}", "aggregator=fedavg", f"federation.local_epochs={tau}",
                 f"federation.rounds={rounds}", *extra]  # fmt: skip
    if "executor=ray" in extra:
        overrides.append(f"executor.num_workers={workers}")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(compose(overrides), Path(tmp))
        trainer.show_progress = False
        trainer.fit()
        return [row["round_s"] for row in trainer.history]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="regression_1d_m4")
    ap.add_argument("--tau", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per arm (>= 2: the first is reported apart)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2")
    warnings.filterwarnings("ignore")
    results = {}
    for arm in args.arms:
        times = round_times(args.preset, args.tau, args.rounds, args.workers, ARMS[arm])
        results[arm] = statistics.median(times[1:])
        print(f"{arm}: {args.preset} FedAvg tau={args.tau}: first round {times[0]:.3f} s, "
              f"median of rounds 2-{args.rounds} {results[arm]:.3f} s", flush=True)  # fmt: skip
    print(" ".join(f"round_s_{arm.replace('-', '_')}={value:.3f}" for arm, value in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
