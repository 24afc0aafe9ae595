"""Round time through Flower's simulation engine against fipa-train on the same preset (issue 17), side by side.

One preset (default `regression_1d_m4` with FIPA: 4 clients, curvature statistics uploaded beside the update)
runs in this process four ways, in this order: `executor=sequential`, `executor=ray` (2 workers),
`executor=flower` (Flower's simulation engine on Ray, 2 CPUs, one client per CPU), `executor=sequential` again.
Ray and Flower start their workers before the first round; the time outside the rounds (start-up, evaluation,
logging) is reported apart, and the ratios compare
the median round time, which is what a long run pays. Like for like: Flower against Ray (both train 2 clients at a
time in worker processes, both ship every job and reply across processes), and against one process. All four runs
must end at the same test metric (bit-identical), printed as a check that the work is the same.

    python benchmarks/bench_flower.py                                   # regression_1d_m4, FIPA, 10 rounds
    python benchmarks/bench_flower.py --preset poisson_1d --aggregator fedavg --rounds 6

Ends with one line `ratio_flower_over_ray=.. ratio_flower_over_sequential=..` (round time: above 1 is slower).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fipa.train import build, compose


def timed_run(overrides: list[str], directory: Path) -> dict:
    trainer = build(compose(overrides), directory)
    start = time.perf_counter()
    summary = trainer.executor.host(trainer)  # Flower's ServerApp hosts the loop; the others run it here
    total = time.perf_counter() - start
    rounds = [row["round_s"] for row in trainer.history]
    # outside the rounds: start-up (Ray, Flower, the workers' imports and tasks), evaluation and logging
    return {"round_s": statistics.median(rounds), "outside_s": total - sum(rounds), "metric": summary[summary["metric"]]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="regression_1d_m4")
    ap.add_argument("--aggregator", default="fipa")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=[])
    args = ap.parse_args(argv)
    base = [f"experiment={args.preset}", f"aggregator={args.aggregator}", f"federation.rounds={args.rounds}",
            "torch_threads=1", *args.override]  # fmt: skip
    arms = {
        "sequential": base,
        "ray": [*base, "executor=ray", f"executor.num_workers={args.workers}"],
        "flower": [*base, "executor=flower", f"executor.num_cpus={args.workers}"],
        "sequential_again": base,
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: timed_run(overrides, Path(tmp) / name) for name, overrides in arms.items()}
    for name, result in results.items():
        print(f"flower: {args.preset} {args.aggregator} {args.rounds} rounds, {name:16s} median round "
              f"{result['round_s']:.3f}s  outside the rounds {result['outside_s']:.1f}s  metric {result['metric']:.6e}")  # fmt: skip
    sequential = statistics.mean([results["sequential"]["round_s"], results["sequential_again"]["round_s"]])
    ratios = {
        "ratio_flower_over_ray": results["flower"]["round_s"] / results["ray"]["round_s"],
        "ratio_flower_over_sequential": results["flower"]["round_s"] / sequential,
    }
    same = len({result["metric"] for result in results.values()}) == 1
    print(f"flower: final metric {'identical in all four runs' if same else 'MISMATCH'}")
    print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    return ratios


if __name__ == "__main__":
    main()
