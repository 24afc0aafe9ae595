#!/usr/bin/env python
"""Run (or resume) the PINN comparison of FIPA_SPEC 5.2 and tabulate it: FedAvg (tau), FedAvg (10 tau), FIPA.

    python scripts/pinn_table.py --presets poisson_1d allen_cahn --seeds 0 1 2 --out results/pinn
    python scripts/pinn_table.py --budget --seeds 0 1 2 3 4 --out results/pinn_budget     # equal wall-clock
    python scripts/pinn_table.py --collect-only --out results/pinn                          # tables from finished runs

Every run goes to OUT/<preset>/<variant>/seed<k>/ (metrics.csv, summary.json, the solution plot); a run whose
summary.json says "completed" is not repeated, and an interrupted run that saved checkpoints (pass
--override federation.checkpoint_every=2 for long runs) resumes from its latest one. Runs are made one
at a time, in this process (timings are only comparable without contention). Writes OUT/results.csv (one row per
run), OUT/table.md (median [min, max] of the final test_rel_l2 over seeds) and OUT/<preset>.png (test_rel_l2 vs
accumulated round time, one line per run).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from fipa.train import compose, completed_summary

PRESETS = ["poisson_1d", "poisson_2d", "poisson_3d", "poisson_5d", "allen_cahn", "bratu", "fisher_kpp", "reaction_diffusion"]
# The paper's equal-time budgets in seconds (FIPA_SPEC 5.2; also written in each preset's header).
BUDGET_S = {"poisson_1d": 60, "poisson_2d": 60, "poisson_3d": 60, "poisson_5d": 60,
            "allen_cahn": 30, "bratu": 30, "fisher_kpp": 30, "reaction_diffusion": 60}
VARIANTS = {  # name -> overrides (the 10x variant's local_epochs is filled in from the preset)
    "fedavg": ["aggregator=fedavg"],
    "fedavg_10x": ["aggregator=fedavg"],
    "fipa": ["aggregator=fipa"],
}


def overrides_for(preset: str, variant: str, seed: int, rounds: int | None, budget: bool, extra: list[str]) -> list[str]:
    overrides = [f"experiment={preset}", f"seed={seed}", *VARIANTS[variant]]
    if variant == "fedavg_10x":
        tau = compose([f"experiment={preset}"]).federation.local_epochs
        overrides.append(f"federation.local_epochs={10 * tau}")
    if budget:
        overrides += [f"federation.time_budget_s={BUDGET_S[preset]}", f"federation.rounds={rounds or 100000}"]
    elif rounds is not None:
        overrides.append(f"federation.rounds={rounds}")
    return overrides + extra


def run_all(args) -> None:
    from fipa.train import run_resumable, summary_line

    for preset in args.presets:
        for variant in args.variants:
            for seed in args.seeds:
                run_dir = args.out / preset / variant / f"seed{seed}"
                if completed_summary(run_dir):
                    continue
                overrides = overrides_for(preset, variant, seed, args.rounds, args.budget, args.override)
                print(f"[pinn_table] {' '.join(overrides)}", flush=True)
                summary = run_resumable(overrides, run_dir)  # an interrupted run with checkpoints resumes
                print(summary_line(summary), flush=True)


def collect(out: Path) -> list[dict]:
    rows = []
    for summary_file in sorted(out.glob("*/*/seed*/summary.json")):
        run_dir = summary_file.parent
        summary = json.loads(summary_file.read_text())
        if summary.get("status") != "completed":
            continue
        preset, variant = run_dir.parent.parent.name, run_dir.parent.name
        rows.append({
            "preset": preset,
            "variant": variant,
            "seed": int(run_dir.name.removeprefix("seed")),
            "test_rel_l2": summary["test_rel_l2"],
            "rounds": summary["rounds_completed"],
            "elapsed_s": round(summary["elapsed_s"], 2),
            "local_epochs": summary["config"]["federation"]["local_epochs"],
            "dir": str(run_dir),
        })
    return rows


def write_tables(rows: list[dict], out: Path) -> str:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    presets = [p for p in PRESETS if any(r["preset"] == p for r in rows)]
    lines = [
        "final test_rel_l2: median [min, max] over seeds (seeds; median rounds)",
        "",
        "| preset | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for preset in presets:
        cells = []
        for variant in variants:
            runs = [r for r in rows if r["preset"] == preset and r["variant"] == variant]
            if not runs:
                cells.append("-")
                continue
            values = [r["test_rel_l2"] for r in runs]
            rounds = statistics.median(r["rounds"] for r in runs)
            cells.append(f"{statistics.median(values):.2e} [{min(values):.1e}, {max(values):.1e}] ({len(runs)}; {rounds:g})")
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def plot_curves(rows: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = {"fedavg": "tab:blue", "fedavg_10x": "tab:green", "fipa": "tab:red"}
    for preset in sorted({r["preset"] for r in rows}):
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        labelled = set()
        for r in (r for r in rows if r["preset"] == preset):
            with open(Path(r["dir"]) / "metrics.csv") as f:
                metrics = list(csv.DictReader(f))
            ax.semilogy(
                [float(m["elapsed_s"]) for m in metrics],
                [float(m["test_rel_l2"]) for m in metrics],
                color=colors.get(r["variant"], "k"),
                lw=1,
                alpha=0.8,
                label=None if r["variant"] in labelled else r["variant"],
            )
            labelled.add(r["variant"])
        ax.set_xlabel("accumulated round time (s)")
        ax.set_ylabel("test relative L2 error")
        ax.set_title(preset)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{preset}.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=None, help="default: the preset's 100 (or unbounded with --budget)")
    parser.add_argument("--budget", action="store_true", help="stop each run at the paper's time budget")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("results/pinn"))
    parser.add_argument("--collect-only", action="store_true", help="only tabulate finished runs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        run_all(args)
    rows = collect(args.out)
    if not rows:
        print(f"no completed runs under {args.out}", file=sys.stderr)
        return 1
    print(write_tables(rows, args.out), end="")
    plot_curves(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
