"""Check that every task trains on a GPU and gives the CPU's numbers: a few rounds of each case on the CPU and on
CUDA, in one process, then the metrics side by side, the round times, the speed-up and the peak GPU memory.

    python scripts/gpu_check.py                  # all cases, 3 rounds each
    python scripts/gpu_check.py --rounds 5 --cases regression poisson_1d

Cases:
- regression: regression_1d_m4, FIPA r 20 (float64);
- poisson_1d: the PINN preset, FIPA (float64, forward Laplacian);
- fmnist_fedavg and fmnist_lastlayer: fmnist_dirichlet with FedAvg, and a FedAvg round followed by last-layer FIPA
  from round 2 on (float32 SmallCNN; scikit-learn's digits stand in where Fashion-MNIST is not installed);
- cifar10_resnet20: the paper's CIFAR-10 preset (ResNet-20-GN, augmentation) on the GPU only, in bf16-mixed
  and float32; on random CIFAR-shaped data (clearly labelled) when the real files are absent.

Agreement: float64 cases within a relative 1e-6 of the CPU's metric (FIPA's truncated eigendecompositions amplify
round-off from round to round); float32 CNNs within 2 accuracy points after the few rounds (cuDNN's convolution
algorithms and TF32 change the rounding). Without CUDA the script prints one line and exits 0 (CI runs it so).
The last line is `gpu_check: ok` or `gpu_check: FAILED <cases>`; the exit code is 1 on a failed case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {
    "regression": (["experiment=regression_1d_m4", "aggregator=fipa"], 1e-6, None),
    "poisson_1d": (["experiment=poisson_1d", "aggregator=fipa"], 1e-6, None),
    "fmnist_fedavg": (["experiment=fmnist_dirichlet", "aggregator=fedavg"], None, 0.02),
    "fmnist_lastlayer": (
        ["experiment=fmnist_dirichlet", "aggregator=fedavg", "schedule.switch_round=1", "schedule.after=fipa_lastlayer"],
        None,
        0.02,
    ),
}
GPU_ONLY = {"cifar10_resnet20": ["experiment=cifar10_resnet20", "aggregator=fedavg", "federation.checkpoint_every=null"]}


def image_data_overrides(root: Path) -> tuple[list[str], list[str]]:
    """Fashion-MNIST where installed, else digits; CIFAR-10 where present, else synthetic files in its layout."""
    from fipa.datasets import DEBIAN_FASHION_MNIST, DEFAULT_ROOT, write_synthetic_cifar
    from fipa.errors import ConfigError

    fmnist = [] if DEBIAN_FASHION_MNIST.is_dir() else ["task.dataset=digits", "model.image_size=8"]
    try:
        from fipa.datasets import load_dataset

        load_dataset("cifar10", DEFAULT_ROOT, train=False)
        cifar: list[str] = []
    except ConfigError:
        write_synthetic_cifar(root, "cifar10", per_file=2000, seed=0)
        cifar = [f"task.root={root}"]
    return fmnist, cifar


def one_run(overrides: list[str], accelerator: str, directory: Path) -> dict:
    from fipa.config import compose
    from fipa.train import run

    if accelerator == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = run(compose([*overrides, f"trainer.accelerator={'gpu' if accelerator == 'cuda' else 'cpu'}"]), directory)
    rows = _rows(directory / "metrics.csv")
    return {
        "metric": summary["metric"],
        "value": summary[summary["metric"]],
        "round_s": statistics.median(float(r["round_s"]) for r in rows),
        "wall_s": time.perf_counter() - start,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if accelerator == "cuda" else float("nan"),
    }


def _rows(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def agrees(cpu: float, gpu: float, rel: float | None, abs_tol: float | None) -> bool:
    if rel is not None:
        return abs(cpu - gpu) <= rel * abs(cpu)
    return abs(cpu - gpu) <= (abs_tol or 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=[*CASES, *GPU_ONLY], choices=[*CASES, *GPU_ONLY])
    ap.add_argument("--target", default="cuda", choices=["cuda", "cpu"],
                    help="what to compare against the CPU (cpu: a dry run of the plumbing, for tests)")  # fmt: skip
    ap.add_argument("--override", nargs="*", default=[], help="extra overrides for every run (e.g. smaller tasks)")
    args = ap.parse_args(argv)

    if args.target == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check (the CPU paths are covered by the test suite)")
        return 0
    device_name = torch.cuda.get_device_name() if args.target == "cuda" else "cpu"
    print(f"gpu_check: torch {torch.__version__}, target {args.target} ({device_name}), {args.rounds} rounds per case")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        fmnist, cifar = image_data_overrides(Path(tmp) / "data")
        for name in args.cases:
            data = fmnist if name.startswith("fmnist") else cifar if name.startswith("cifar") else []
            base = [f"federation.rounds={args.rounds}", "federation.time_budget_s=null", *data, *args.override]
            if name in GPU_ONLY:
                if args.target != "cuda":
                    continue
                for precision in ("bf16-mixed", "32-true"):
                    result = one_run([*GPU_ONLY[name], *base, f"trainer.precision={precision}"], "cuda",
                                     Path(tmp) / f"{name}_{precision}")  # fmt: skip
                    synthetic = " (synthetic CIFAR-shaped data)" if cifar else ""
                    print(f"{name} {precision}{synthetic}: {result['metric']}={result['value']:.4f} "
                          f"round {result['round_s']:.2f}s peak {result['peak_gib']:.2f} GiB")  # fmt: skip
                continue
            overrides, rel, abs_tol = CASES[name]
            cpu = one_run([*overrides, *base], "cpu", Path(tmp) / f"{name}_cpu")
            gpu = one_run([*overrides, *base], args.target, Path(tmp) / f"{name}_{args.target}")
            ok = agrees(cpu["value"], gpu["value"], rel, abs_tol)
            failed += [] if ok else [name]
            tolerance = f"rel {rel:g}" if rel is not None else f"abs {abs_tol:g}"
            print(f"{name}: {cpu['metric']} cpu {cpu['value']:.6e} {args.target} {gpu['value']:.6e} ({tolerance}: "
                  f"{'ok' if ok else 'MISMATCH'}); round cpu {cpu['round_s']:.3f}s {args.target} {gpu['round_s']:.3f}s "
                  f"speed-up {cpu['round_s'] / gpu['round_s']:.2f}x; peak GPU memory {gpu['peak_gib']:.2f} GiB",
                  flush=True)  # fmt: skip
    print("gpu_check: ok" if not failed else f"gpu_check: FAILED {' '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
