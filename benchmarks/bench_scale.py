"""Scale benchmarks (issue 7): Ray workers against one process, and memory against the number of clients.

1. **Ray speed-up** (target >= 1.6x with 2 workers on 2 cores). A compute-bound preset (default `poisson_1d`,
   FedAvg: 2 clients x 100 full-batch epochs of second-derivative residuals per round) runs with
   `executor=sequential` and `executor=ray` (2 workers), sequential / ray / sequential, in this process. The
   workers' start-up (Ray, imports, building the task) happens before the first round and is reported
   separately; the ratio compares the median round time, which is what a long run pays. Both runs end at the
   same test metric (bit-identical), printed as a check that the work is the same.
2. **Memory in the number of clients** (target <= 1.5x). A preset (default `fmnist_dirichlet`, FedAvg server)
   with a client method that keeps per-client state (default SCAFFOLD: one flat control-variate tensor of p
   elements per client that has trained, held by the server for the whole run) runs with 10 and with 1000
   clients, each in a fresh subprocess so that its peak RSS (`ru_maxrss`) is its own. **Every client trains in every round**
   (`federation.clients_per_round=null`), 1 local epoch per round, so both runs train on the same data (the
   whole training set once per round) and the 1000-client run ends holding 1000 states. The child counts the
   clients whose state the client method holds after the run and the script stops with an error unless it is
   every client. Reported: both peak RSS, their ratio, and the bytes per extra client,
   (peak_1000 - peak_10) / 990, next to the size of one client's state (p x element size), so that one can see
   whether the memory per client is just its state.

    python benchmarks/bench_scale.py                       # both parts (a few minutes)
    python benchmarks/bench_scale.py --skip-memory --rounds 6
    python benchmarks/bench_scale.py --skip-ray --memory-clients 10 1000 --memory-rounds 1

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
import json, resource, sys, time
from pathlib import Path
from fipa.train import build, compose

STATE_ATTRIBUTES = ("client_controls", "previous")  # per-client dicts: Scaffold's c_i, Moon's previous models
overrides, directory = json.loads(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
trainer = build(compose(overrides), directory)
summary = trainer.fit()
wall_s = time.perf_counter() - start
# the server side of the client methods (named client_callbacks in older fipa)
methods = getattr(trainer, "client_methods", None)
methods = getattr(trainer, "client_callbacks", []) if methods is None else methods
model = getattr(trainer, "model", None)
model = trainer.module.model if model is None else model
states = {}
for callback in methods:
    for name in STATE_ATTRIBUTES:
        held = getattr(callback, name, None)
        if isinstance(held, dict):
            states[type(callback).__name__ + "." + name] = held
kind, held = next(iter(states.items())) if len(states) == 1 else (None, {})
tensors = list(held.values())
rss_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(json.dumps({
    "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
    "end_rss_kib": rss_kib,
    "status": summary["status"], "metric": summary[summary["metric"]], "wall_s": wall_s,
    "num_params": sum(p.numel() for p in model.parameters()),
    "state_kinds": sorted(states), "state_kind": kind,
    "state_clients": len(held), "state_id_range": [min(held), max(held)] if held else None,
    "state_bytes": sum(t.numel() * t.element_size() for t in tensors),
    "state_numel": sorted({t.numel() for t in tensors}), "state_element_size": sorted({t.element_size() for t in tensors}),
    "round_clients": [row["clients"] for row in trainer.history],
    "clients_failed": sum(row.get("clients_failed", 0) for row in trainer.history),
}))
"""


def peak_memory(overrides: list[str], directory: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(overrides), str(directory)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory child failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_every_client_holds_state(clients: int, peak: dict, args) -> None:
    """The measurement means something only if every client trained and its state is held at the end."""
    if peak["state_kind"] is None:
        raise RuntimeError(f"client={args.memory_client}: expected one per-client state dict, found "
                           f"{peak['state_kinds'] or 'none'} (use a client method with per-client state, e.g. scaffold)")
    if peak["state_clients"] != clients or peak["state_id_range"] != [0, clients - 1]:  # distinct keys: all of 0..n-1
        raise RuntimeError(f"{clients} clients: only {peak['state_clients']} hold {peak['state_kind']} after the run "
                           f"(clients per round {peak['round_clients']}, {peak['clients_failed']} failed); the memory "
                           "figure would not include every client's state")
    if peak["state_numel"] != [peak["num_params"]] or len(peak["state_element_size"]) != 1:
        raise RuntimeError(f"unexpected state sizes {peak['state_numel']} x {peak['state_element_size']} bytes "
                           f"(p = {peak['num_params']})")


def memory_ratio(args) -> dict[str, float]:
    small, large = args.memory_clients
    if not small < large:
        raise SystemExit(f"--memory-clients needs SMALL < LARGE, got {small} {large}")
    peaks = {}
    print(f"memory: {args.memory_preset} aggregator=fedavg client={args.memory_client}, every client in every "
          f"round (federation.clients_per_round=null), 1 local epoch, {args.memory_rounds} round(s), "
          "one subprocess each")
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (small, large):
            overrides = [f"experiment={args.memory_preset}", "aggregator=fedavg", f"client={args.memory_client}",
                         f"task.num_clients={clients}", "federation.clients_per_round=null", "federation.local_epochs=1",
                         f"federation.rounds={args.memory_rounds}", "torch_threads=1", f"seed={args.seed}",
                         *args.memory_override]
            peak = peaks[clients] = peak_memory(overrides, Path(tmp) / str(clients))
            check_every_client_holds_state(clients, peak, args)
            one = peak["num_params"] * peak["state_element_size"][0]
            print(f"memory: {clients} clients: peak RSS {peak['peak_rss_kib'] / 1024:.0f} MB (RSS at the end "
                  f"{peak['end_rss_kib'] / 1024:.0f} MB, {peak['status']}, {peak['wall_s']:.0f}s); "
                  f"{peak['state_clients']}/{clients} clients trained and hold their {peak['state_kind']} "
                  f"({peak['num_params']} x {peak['state_element_size'][0]} B = {one} B each, "
                  f"{peak['state_bytes'] / 2**20:.1f} MB in all); clients per round {peak['round_clients']}")
    ratio = peaks[large]["peak_rss_kib"] / peaks[small]["peak_rss_kib"]
    print(f"memory: peak RSS {large} clients / {small} clients = {ratio:.2f}x (target <= 1.5x: "
          f"{'met' if ratio <= 1.5 else 'MISSED'})")
    per_client = (peaks[large]["peak_rss_kib"] - peaks[small]["peak_rss_kib"]) * 1024 / (large - small)
    one_state = peaks[large]["num_params"] * peaks[large]["state_element_size"][0]
    print(f"memory: per extra client (peak_{large} - peak_{small}) / {large - small} = {per_client:.0f} B; one "
          f"client's state = {one_state} B; per client / state = {per_client / one_state:.2f}")
    return {"ratio_memory_clients": ratio, "memory_bytes_per_client": per_client, "memory_state_bytes": one_state,
            **{f"memory_state_clients_{n}": peaks[n]["state_clients"] for n in (small, large)}}


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
    ap.add_argument("--memory-rounds", type=int, default=1,
                    help="rounds of the memory part; every client trains in each round")
    ap.add_argument("--memory-override", nargs="*", default=[], help="extra overrides for the memory part")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    ratios, details = {}, {}
    if not args.skip_ray:
        ratios["ratio_ray_speedup"] = ray_speedup(args)
    if not args.skip_memory:
        details = memory_ratio(args)
        ratios["ratio_memory_clients"] = details["ratio_memory_clients"]
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return {**details, **ratios}


if __name__ == "__main__":
    main()
