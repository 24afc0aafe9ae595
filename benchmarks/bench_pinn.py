"""PINN benchmarks: the local loop's FedAvg round against the loop before 2026-12-01 (target <= 0.6x on poisson_1d
and poisson_2d), FIPA round / FedAvg round on poisson_1d, poisson_2d and poisson_5d (target <= 3x on poisson_1d),
the peak memory of a poisson_5d FIPA run (limit 8 GiB), and the speed-up of the forward
Laplacian (`task.laplacian=forward`, the default for the presets' MLP) over torch.func reverse-over-reverse
derivatives (`task.laplacian=autograd`) for one training step.

For each preset the FedAvg and FIPA trainers (the presets' own settings: tau, collocation and boundary
counts, FIPA rank and step) run interleaved round by round from the same initial model, after an untimed
warm-up round; the ratio is of the median round times. Round time = the clients' local fits including the
curvature, plus the server aggregation (evaluation excluded, as in `elapsed_s`). The peak memory comes from
a fresh subprocess that runs the poisson_5d FIPA preset for `--memory-rounds` rounds (`ru_maxrss`). The
Laplacian speed-up times loss + backward on client 0's full batch at the preset's sizes, both modes on the same
model and data, interleaved `--step-repeats` times after one untimed step each; it is the ratio of the medians.

The loop comparison runs the preset's FedAvg three ways from the same initial model, interleaved round by round:
`fast` (the default: a full-batch fit's tau updates inside one Lightning step, per-update hooks called directly),
`compiled` (the same with trainer.compile=true; its first, compiling round is the untimed warm-up) and `before`
(every update a real Lightning epoch, with Lightning's manual_backward and optimizer step: the training step and
loop as they were before the fast loop). `fast` and `before` end at the same parameters bit for bit (checked).

    python benchmarks/bench_pinn.py                                     # about 10 minutes (poisson_5d rounds are slow)
    python benchmarks/bench_pinn.py --presets poisson_1d --rounds 5 --skip-memory
    python benchmarks/bench_pinn.py --loop-presets poisson_1d poisson_2d --presets --step-presets --skip-memory

Last line: `loop_ratio_poisson_1d=.. loop_ratio_compiled_poisson_1d=.. (the same for poisson_2d) ratio_poisson_1d=..
ratio_poisson_2d=.. ratio_poisson_5d=.. peak_rss_gib_poisson_5d_fipa=.. laplacian_speedup_poisson_1d=.. ...`.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared round timer of bench_fipa_round.py
from bench_fipa_round import RoundRunner, interleave, report  # noqa: E402

from fipa.tasks.pinn import PINNModule  # noqa: E402
from fipa.train import build, compose  # noqa: E402

MEMORY_CHILD = """
import json, resource, sys
from fipa.train import compose, run
summary = run(compose(json.loads(sys.argv[1])), sys.argv[2])
print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "status": summary["status"]}))
"""


def round_ratio(preset: str, rounds: int, warmup: int, extra: list[str]) -> float:
    base = [f"experiment={preset}", "torch_threads=1", f"federation.rounds={warmup + rounds}", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        runners = [RoundRunner(name, build(compose([*base, f"aggregator={name}"]), Path(tmp) / name)) for name in ("fedavg", "fipa")]
        torch.set_num_threads(1)
        print(f"\n{preset}: FedAvg vs FIPA (rank {runners[1].trainer.aggregator.curvature.rank}), "
              f"{runners[0].trainer.flat.numel} parameters", flush=True)
        interleave(runners, rounds, warmup, preset)
    report(runners, preset)
    fedavg, fipa = runners
    ratio = fipa.median("round_s") / fedavg.median("round_s")
    target = " (target <= 3x: " + ("met)" if ratio <= 3 else "MISSED)") if preset == "poisson_1d" else ""
    print(f"{preset} fipa/fedavg round time = {fipa.median('round_s'):.3f}s / {fedavg.median('round_s'):.3f}s = {ratio:.2f}x{target}")
    return ratio


class LoopBefore2026_12(PINNModule):
    """The client step before the fast loop: one update per Lightning training step, through Lightning's
    manual_backward and optimizer step (the LocalTrainer then runs every epoch as a real Lightning epoch)."""

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.training_loss(batch)
        self.manual_backward(loss)
        optimizer.step()
        self.last_train_loss = loss.detach()


def loop_ratios(preset: str, rounds: int, warmup: int, extra: list[str]) -> dict[str, float]:
    base = [f"experiment={preset}", "aggregator=fedavg", "torch_threads=1", f"federation.rounds={warmup + rounds}", *extra]
    arms = {"fast": [], "compiled": ["trainer.compile=true"], "before": []}
    with tempfile.TemporaryDirectory() as tmp:
        runners = [RoundRunner(name, build(compose([*base, *more]), Path(tmp) / name)) for name, more in arms.items()]
        before = runners[-1].trainer.executor.runner
        before.module.__class__ = LoopBefore2026_12  # manual optimization stays on: the module was built as a PINN
        for local in before.local_trainers:
            local.epochs_in_one_step = False
        torch.set_num_threads(1)
        print(f"\n{preset}: the FedAvg round with the fast loop, compiled, and as before 2026-12-01", flush=True)
        interleave(runners, rounds, warmup, preset)
    report(runners, preset)
    fast, compiled, old = runners
    same = torch.equal(fast.trainer.flat.get(), old.trainer.flat.get())
    ratios = {f"loop_ratio_{preset}": fast.median("round_s") / old.median("round_s"),
              f"loop_ratio_compiled_{preset}": compiled.median("round_s") / old.median("round_s")}  # fmt: skip
    print(f"{preset} FedAvg round: fast {fast.median('round_s'):.4f}s, compiled {compiled.median('round_s'):.4f}s, "
          f"before {old.median('round_s'):.4f}s; fast / before = {ratios[f'loop_ratio_{preset}']:.2f}x (target <= 0.6x), "
          f"compiled / before = {ratios[f'loop_ratio_compiled_{preset}']:.2f}x; fast and before end at "
          f"{'the same parameters bit for bit' if same else 'DIFFERENT parameters'}")  # fmt: skip
    return ratios


def peak_memory_gib(rounds: int, extra: list[str]) -> float:
    overrides = ["experiment=poisson_5d", "aggregator=fipa", "torch_threads=1", f"federation.rounds={rounds}", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(overrides), tmp],
                                capture_output=True, text=True, check=True)
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_gib"]  # ru_maxrss is in KiB on Linux
    print(f"poisson_5d FIPA, {rounds} rounds: peak RSS {peak:.2f} GiB (limit 8 GiB: {'met' if peak <= 8 else 'MISSED'})")
    return peak


def laplacian_speedup(preset: str, repeats: int, extra: list[str]) -> float:
    """Median training-step time with reverse-over-reverse derivatives / with the forward Laplacian."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(compose([f"experiment={preset}", "torch_threads=1", *extra]), Path(tmp))
    task, model = trainer.task, trainer.model
    data = task.client_dataset(0)
    params = dict(model.named_parameters())
    modules = {mode: PINNModule(model, None, task.pde, task.lambda_bc, mode) for mode in ("autograd", "forward")}
    seconds: dict[str, list[float]] = {mode: [] for mode in modules}
    for step in range(repeats + 1):
        for mode, module in modules.items():
            start = time.perf_counter()
            module.pinn_loss(params, data).backward()
            if step:  # the first step of each mode is a warm-up
                seconds[mode].append(time.perf_counter() - start)
    autograd, forward = (statistics.median(seconds[mode]) for mode in modules)
    print(f"{preset} training step (loss + backward, {len(data)} residuals): autograd {1e3 * autograd:.1f} ms / "
          f"forward Laplacian {1e3 * forward:.1f} ms = {autograd / forward:.2f}x")
    return autograd / forward


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loop-presets", nargs="*", default=["poisson_1d", "poisson_2d"],
                    help="presets for the loop comparison (none: skip it)")
    ap.add_argument("--presets", nargs="*", default=["poisson_1d", "poisson_2d", "poisson_5d"],
                    help="presets for the FIPA / FedAvg round ratio (none: skip it)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case")
    ap.add_argument("--warmup-rounds", type=int, default=1)
    ap.add_argument("--override", nargs="*", default=[], help="extra overrides for every case")
    ap.add_argument("--memory-rounds", type=int, default=2)
    ap.add_argument("--memory-override", nargs="*", default=[], help="extra overrides for the memory run (tests shrink it)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--step-presets", nargs="*", default=["poisson_1d", "poisson_2d", "poisson_3d", "poisson_5d"],
                    help="presets for the forward-Laplacian speed-up (none: skip it)")
    ap.add_argument("--step-repeats", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, float] = {}
    for preset in args.loop_presets:
        results.update(loop_ratios(preset, args.rounds, args.warmup_rounds, args.override))
    results.update({f"ratio_{p}": round_ratio(p, args.rounds, args.warmup_rounds, args.override) for p in args.presets})
    if not args.skip_memory:
        results["peak_rss_gib_poisson_5d_fipa"] = peak_memory_gib(args.memory_rounds, args.memory_override)
    print()
    for preset in args.step_presets:
        results[f"laplacian_speedup_{preset}"] = laplacian_speedup(preset, args.step_repeats, args.override)
    print(" ".join(f"{k}={v:.2f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
