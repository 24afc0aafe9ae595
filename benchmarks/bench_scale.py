"""Scale benchmarks (issue 7): Ray workers against one process, and memory against the number of clients.

1. **Ray speed-up** (target >= 1.6x with 2 workers on 2 cores). A compute-bound preset (default `poisson_1d`,
   FedAvg: 2 clients x 100 full-batch epochs of second-derivative residuals per round) runs with
   `executor=sequential` and `executor=ray` (2 workers), sequential / ray / sequential, in this process. The
   workers' start-up (Ray, imports, building the task) happens before the first round and is reported
   separately; the ratio compares the median round time, which is what a long run pays. Both runs end at the
   same test metric (bit-identical), printed as a check that the work is the same.
2. **Memory in the number of clients** (target <= 1.5x). The same preset (default `fmnist_dirichlet` with
   SCAFFOLD, whose per-client control variates are the state that grows with clients) runs with 10 and with
   1000 clients, each in a fresh subprocess; the ratio is the peak RSS of the 1000-client run over the
   10-client run. Same data, same clients per round, same rounds.

    python benchmarks/bench_scale.py                       # both parts (a few minutes)
    python benchmarks/bench_scale.py --skip-memory --rounds 6
    python benchmarks/bench_scale.py --skip-ray --memory-clients 10 1000 --memory-rounds 5

Ends with one line `ratio_ray_speedup=.. ratio_memory_clients=..` (only the parts that ran).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fipa.train import compose


def timed_fit(overrides: list[str], directory: Path) -> dict:
    from fipa.train import build

    trainer = build(compose(overrides), directory)
    start = time.perf_counter()
    trainer.executor.start()  # Ray and its workers start here, untimed; fit()'s own start() is then a no-op
    startup_s = time.perf_counter() - start
    summary = trainer.fit()
    rounds = [row["round_s"] for row in trainer.history]
    return {"startup_s": startup_s, "round_s": statistics.median(rounds), "metric": summary[summary["metric"]],
            "rounds": rounds}


def ray_speedup(args) -> float:
    base = [f"experiment={args.preset}", "aggregator=fedavg", f"federation.rounds={args.rounds}", "torch_threads=1",
            f"seed={args.seed}", *args.override]
    with tempfile.TemporaryDirectory() as tmp:
        first = timed_fit(base, Path(tmp) / "seq1")
        parallel = timed_fit([*base, "executor=ray", f"executor.num_workers={args.workers}"], Path(tmp) / "ray")
        second = timed_fit(base, Path(tmp) / "seq2")
    sequential = statistics.mean([first["round_s"], second["round_s"]])
    ratio = sequential / parallel["round_s"]
    print(f"ray: {args.preset} FedAvg, {args.rounds} rounds; median round: sequential {first['round_s']:.3f}s / "
          f"{second['round_s']:.3f}s, ray x{args.workers} {parallel['round_s']:.3f}s (start-up {parallel['startup_s']:.1f}s, "
          f"untimed); speed-up {ratio:.2f}x (target >= 1.6x: {'met' if ratio >= 1.6 else 'MISSED'})")
    same = first["metric"] == parallel["metric"] == second["metric"]
    print(f"ray: final metric sequential {first['metric']:.6e} ray {parallel['metric']:.6e} "
          f"{'identical' if same else 'MISMATCH'}")
    return ratio


MEMORY_CHILD = """
import json, resource, sys
from fipa.train import compose, run
summary = run(compose(json.loads(sys.argv[1])), sys.argv[2])
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "status": summary["status"], "metric": summary[summary["metric"]]}))
"""


def peak_memory(overrides: list[str], directory: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(overrides), str(directory)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_ratio(args) -> float:
    small, large = args.memory_clients
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (small, large):
            overrides = [f"experiment={args.memory_preset}", f"client={args.memory_client}", f"task.num_clients={clients}",
                         "federation.clients_per_round=5", "federation.local_epochs=1",
                         f"federation.rounds={args.memory_rounds}", "torch_threads=1", f"seed={args.seed}",
                         *args.memory_override]
            peaks[clients] = peak_memory(overrides, Path(tmp) / str(clients))
            print(f"memory: {args.memory_preset} client={args.memory_client} with {clients} clients: peak RSS "
                  f"{peaks[clients]['peak_rss_mb']:.0f} MB ({peaks[clients]['status']})")
    ratio = peaks[large]["peak_rss_mb"] / peaks[small]["peak_rss_mb"]
    print(f"memory: peak RSS {large} clients / {small} clients = {ratio:.2f}x (target <= 1.5x: "
          f"{'met' if ratio <= 1.5 else 'MISSED'})")
    return ratio


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="poisson_1d", help="the compute-bound preset of the Ray part")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--override", nargs="*", default=[], help="extra overrides for the Ray part")
    ap.add_argument("--memory-preset", default="fmnist_dirichlet")
    ap.add_argument("--memory-client", default="scaffold")
    ap.add_argument("--memory-clients", type=int, nargs=2, default=[10, 1000])
    ap.add_argument("--memory-rounds", type=int, default=5)
    ap.add_argument("--memory-override", nargs="*", default=[], help="extra overrides for the memory part")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    ratios = {}
    if not args.skip_ray:
        ratios["ratio_ray_speedup"] = ray_speedup(args)
    if not args.skip_memory:
        ratios["ratio_memory_clients"] = memory_ratio(args)
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return ratios


if __name__ == "__main__":
    main()
