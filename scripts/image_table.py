#!/usr/bin/env python
"""Run (or resume) the image-classification comparison of FIPA_SPEC 5.3 and tabulate it.

For every client method and seed: a FedAvg warm-up of W rounds that saves a checkpoint, then P more rounds
branched from that checkpoint, one run per variant:

    fedavg           FedAvg continues unchanged (the paper's baseline)
    fedavg_lr01      FedAvg with the FIPA phase's client learning rate x0.1 (separates the lr cut from FIPA)
    fipa             full-model FIPA, damped solve (aggregator=fipa_damped), client lr x0.1
    fipa_lastlayer   last-layer FIPA (r 10, s 10, q 2, beta 0.01, gamma 1), other layers frozen, client lr x0.1
    fipa_robust      full-model robust FIPA (aggregator=fipa_robust: the FedAvg-anchored solve), client lr x0.1
    fipa_lastlayer_robust  last-layer FIPA with the FedAvg-anchored solve (aggregator=fipa_lastlayer_robust)
    fipa_kfac        full-model FIPA with K-FAC curvature (aggregator=fipa_kfac; factors from 128 images), client lr x0.1
    fipa_kfac_all    fipa_kfac with the factors from all of the client's images
    fipa_kfac_k32    fipa_kfac uploading each factor larger than 32 as its top 32 eigenpairs (aggregator.factor_rank)
    fedfisher        FedFisher, diagonal Fisher at the clients' trained models (aggregator=fedfisher), client lr x0.1
    fedfisher_kfac   FedFisher with K-FAC Fisher factors (aggregator=fedfisher_kfac), client lr x0.1
    fedadam          FedAvg's direction through FedAdam (server_optimizer=adam), client lr x0.1
    fedadam_tuned    fedadam at the server lr a grid chose (0.001 against the yaml's 0.01; docs/results.md section 7)
    fednova          FedNova (aggregator=fednova) under unequal local work: each client trains U{2..8} epochs a round
                     (mean 5, the preset's), client lr x0.1. With equal work FedNova is FedAvg exactly.
    fedavg_lr01_unequal  fedavg_lr01 under the same unequal local work (FedNova's like-for-like baseline)

Client methods: plain, fedprox, scaffold, moon, feddyn, and fedrcl, whose warm-up uses server momentum (FedAvgM)
as in the FIPA authors' code; its branches other than `fedavg` (which continues FedAvgM) take plain server steps
unless the arm names its own server optimizer.

    python scripts/image_table.py --seeds 0 1 2 --out results/image
    python scripts/image_table.py --clients fedprox scaffold --variants fedavg fipa_lastlayer --out results/image
    python scripts/image_table.py --collect-only --out results/image
    python scripts/image_table.py --variants fipa --warmups results/image --out results/image_sub128 \
        --override +preset.fipa_curvature_samples=128      # another branch study from the same warm-ups

Branching at several points of one longer warm-up (FIPA_SPEC 5.3 branches at rounds 200, 400, 600 and 800):

    python scripts/image_table.py --branch-at 200 400 600 800 --variants fedavg fedavg_lr01 fipa fipa_lastlayer \
        --seeds 0 1 2 --checkpoint-every 20 --out results/image_branches     # = fipa-train -m sweep=image_branches

The warm-up then runs to the last branch point and keeps a checkpoint at each; the arm branched at round K lands
in OUT/<client>/<variant>@K/seed<k>/ and its change is measured from the warm-up's accuracy at round K.

Runs go to WARMUPS/<client>/warmup/seed<k>/ (WARMUPS defaults to OUT) and OUT/<client>/<variant>/seed<k>/; a run whose summary.json says
"completed" is not repeated, so an interrupted study resumes. Runs are made one at a time, seed by seed, so
the first seeds' full comparison is available early. Writes OUT/results.csv (one row per branch run),
OUT/table.md (test accuracy after the branch phase: mean +- std over seeds, and the change from the warm-up)
and OUT/<client>.png (accuracy against round, the switch round marked).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

from fipa.train import completed_summary

CLIENTS = ["plain", "fedprox", "scaffold", "moon", "fedrcl", "feddyn"]
LAST = 5  # rounds averaged in the smoothed accuracy column
# Unequal local work with the preset's mean (5 epochs): FedNova's setting, where it differs from FedAvg.
UNEQUAL_WORK = ["federation.local_epochs=2", "federation.local_epochs_max=8"]
VARIANTS = {  # name -> overrides for the branch phase (rounds W+1 .. W+P)
    "fedavg": [],
    "fedavg_lr01": ["schedule.after=fedavg"],
    "fipa": ["schedule.after=fipa_damped"],
    "fipa_lastlayer": ["schedule.after=fipa_lastlayer"],
    "fipa_robust": ["schedule.after=fipa_robust"],
    "fipa_lastlayer_robust": ["schedule.after=fipa_lastlayer_robust"],
    "fipa_kfac": ["schedule.after=fipa_kfac"],
    "fipa_kfac_all": ["schedule.after=fipa_kfac", "preset.kfac_curvature_samples=null"],
    "fipa_kfac_k32": ["schedule.after=fipa_kfac", "+schedule.after_settings.factor_rank=32"],
    "fedfisher": ["schedule.after=fedfisher"],
    "fedfisher_kfac": ["schedule.after=fedfisher_kfac"],
    "fedadam": ["schedule.after=fedavg", "schedule.after_server_optimizer=adam"],
    "fedadam_tuned": [  # the server lr of a grid (docs/results.md section 7), as conf/variant/phase_fedadam_tuned
        "schedule.after=fedavg", "schedule.after_server_optimizer=adam",
        "+schedule.after_server_optimizer_settings.lr=0.001",
    ],
    "fednova": ["schedule.after=fednova", *UNEQUAL_WORK],
    "fedavg_lr01_unequal": ["schedule.after=fedavg", *UNEQUAL_WORK],
}
# The method matrix (issue 16): every server rule after each client method's warm-up.
MATRIX = ["fedavg", "fedavg_lr01", "fedadam", "fedadam_tuned", "fipa_lastlayer", "fipa", "fednova", "fedavg_lr01_unequal"]
# Warm-ups and the branches' first phase are FedAvg, whatever train.yaml's default aggregator is (bare fipa-train
# runs FIPA); the branch phase is chosen by schedule.after.
WARMUP = ["aggregator=fedavg"]
WARMUP_SERVER = {"fedrcl": ["server_optimizer=momentum"]}  # the client method's own warm-up server optimizer
# The client method's own settings, warm-up and branches alike: SCAFFOLD clips its corrected gradient at norm 10, as
# Acar et al.'s SCAFFOLD baseline does (unclipped, its warm-up diverged at round ~75: docs/results.md section 7).
CLIENT_SETTINGS = {"scaffold": ["client.clip_norm=10"]}


def _server_overrides(client: str, variant: str | None) -> list[str]:
    """The warm-up's server optimizer, and plain server steps for a branch arm that changes the rule (FedRCL)."""
    warmup = WARMUP_SERVER.get(client, [])
    if variant is None or not warmup or not VARIANTS[variant]:
        return warmup
    own = any(o.startswith("schedule.after_server_optimizer=") for o in VARIANTS[variant])
    return warmup if own else [*warmup, "schedule.after_server_optimizer=sgd"]


def _run_overrides(args, client: str, variant: str | None, seed: int) -> list[str]:
    """What a warm-up (variant None) and its branches share: the task, FedAvg, the server optimizer, the client
    method with its own settings, and the seed."""
    return [
        f"experiment={args.experiment}", *WARMUP, *_server_overrides(client, variant), f"client={client}",
        *CLIENT_SETTINGS.get(client, []), f"seed={seed}",
    ]


def warmup_overrides(args, client: str, seed: int) -> list[str]:
    return [
        *_run_overrides(args, client, None, seed),
        f"federation.rounds={args.warmup}", f"federation.checkpoint_every={args.checkpoint_every or args.warmup}",
        *args.override,
    ]


def branch_overrides(args, client: str, variant: str, seed: int, checkpoint: Path, at: int) -> list[str]:
    switch = [f"schedule.switch_round={at}"] if VARIANTS[variant] else []
    return [
        *_run_overrides(args, client, variant, seed), f"init_from={checkpoint}", f"federation.rounds={at + args.phase}",
        *switch, *VARIANTS[variant], *args.override,
    ]


def branch_name(args, variant: str, at: int) -> str:
    """The branch's directory: the variant, with @K when it branches before the warm-up's end."""
    return variant if at == args.warmup else f"{variant}@{at}"


def run_all(args) -> None:
    from fipa.train import run_resumable, summary_line

    def run_once(overrides: list[str], run_dir: Path) -> None:
        if completed_summary(run_dir):
            return
        print(f"[image_table] {' '.join(overrides)}", flush=True)
        print(summary_line(run_resumable(overrides, run_dir)), flush=True)  # resumes from a checkpoint if one exists

    for seed in args.seeds:
        for client in args.clients:
            warmup_dir = args.warmups / client / "warmup" / f"seed{seed}"
            run_once(warmup_overrides(args, client, seed), warmup_dir)
            for at in args.branch_at:
                checkpoint = warmup_dir / "checkpoints" / f"round_{at}.pt"
                if not checkpoint.is_file():
                    raise SystemExit(f"image_table: {checkpoint} is missing (a warm-up made with other settings?)")
                for variant in args.variants:
                    run_dir = args.out / client / branch_name(args, variant, at) / f"seed{seed}"
                    run_once(branch_overrides(args, client, variant, seed, checkpoint, at), run_dir)


def final_accuracy(run_dir: Path) -> tuple[float, int]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["test_acc"], summary["rounds_completed"]


def accuracy_at(run_dir: Path, round_idx: int) -> float:
    """The run's test accuracy after round `round_idx` (a branch point inside a longer warm-up)."""
    with open(run_dir / "metrics.csv") as f:
        return next(float(m["test_acc"]) for m in csv.DictReader(f) if int(m["round"]) == round_idx)


def collect(out: Path, warmups: Path) -> list[dict]:
    rows = []
    for summary_file in sorted(out.glob("*/*/seed*/summary.json")):
        run_dir = summary_file.parent
        client, variant = run_dir.parent.parent.name, run_dir.parent.name
        warmup_dir = warmups / client / "warmup" / run_dir.name
        if variant == "warmup" or not completed_summary(run_dir) or not completed_summary(warmup_dir):
            continue
        acc, rounds = final_accuracy(run_dir)
        warmup_acc, warmup_rounds = final_accuracy(warmup_dir)
        if "@" in variant:  # branched at round K of a longer warm-up
            warmup_rounds = int(variant.rsplit("@", 1)[1])
            warmup_acc = accuracy_at(warmup_dir, warmup_rounds)
        last = _accuracies(run_dir)[-LAST:]
        rows.append({
            "client": client,
            "variant": variant,
            "seed": int(run_dir.name.removeprefix("seed")),
            "warmup_rounds": warmup_rounds,
            "rounds": rounds,
            "warmup_test_acc": warmup_acc,
            "test_acc": acc,
            "delta_acc": acc - warmup_acc,
            f"test_acc_last{LAST}": sum(last) / len(last),  # single rounds swing by several points under label skew
            "phase_s": round(_phase_seconds(run_dir, warmup_rounds), 2),
            "dir": str(run_dir),
        })
    return rows


def _accuracies(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(m["test_acc"]) for m in csv.DictReader(f) if m.get("test_acc")]


def _phase_seconds(run_dir: Path, after_round: int) -> float:
    with open(run_dir / "metrics.csv") as f:
        return sum(float(m["round_s"]) for m in csv.DictReader(f) if int(m["round"]) > after_round)


def _variant_order(name: str) -> tuple[float, int]:
    """By branch point (the warm-up's end last), then in VARIANTS' order (arms it does not know last: a directory
    made by another version of this script, or by hand)."""
    variant, _, at = name.partition("@")
    known = list(VARIANTS)
    return float(at or math.inf), known.index(variant) if variant in known else len(known)


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def write_tables(rows: list[dict], out: Path) -> str:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "test accuracy (%) after the branch phase: mean ± std over seeds; change from the warm-up checkpoint; "
        f"mean over the last {LAST} rounds; seeds; median phase seconds",
        "",
        f"| client | variant | warm-up acc | final acc | change | last-{LAST} mean | seeds | phase s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for client in [c for c in CLIENTS if any(r["client"] == c for r in rows)]:
        for variant in sorted({r["variant"] for r in rows if r["client"] == client}, key=_variant_order):
            runs = [r for r in rows if r["client"] == client and r["variant"] == variant]
            lines.append(
                f"| {client} | {variant} | {_mean_std([r['warmup_test_acc'] for r in runs])} | "
                f"{_mean_std([r['test_acc'] for r in runs])} | {_mean_std([r['delta_acc'] for r in runs])} | "
                f"{_mean_std([r[f'test_acc_last{LAST}'] for r in runs])} | "
                f"{len(runs)} | {statistics.median(r['phase_s'] for r in runs):.0f} |"
            )
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def plot_curves(rows: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = {
        "fedavg": "tab:blue", "fedavg_lr01": "tab:green", "fipa": "tab:red", "fipa_lastlayer": "tab:orange",
        "fipa_kfac": "tab:purple", "fipa_kfac_all": "tab:olive", "fedfisher": "tab:brown", "fedfisher_kfac": "tab:pink",
        "fedadam": "tab:gray", "fedadam_tuned": "black", "fednova": "tab:cyan", "fedavg_lr01_unequal": "tab:olive",
    }
    for client in sorted({r["client"] for r in rows}):
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        labelled = set()
        for r in (r for r in rows if r["client"] == client):
            with open(Path(r["dir"]) / "metrics.csv") as f:
                metrics = [m for m in csv.DictReader(f) if m.get("test_acc")]
            ax.plot(
                [int(m["round"]) for m in metrics],
                [100 * float(m["test_acc"]) for m in metrics],
                color=colors.get(r["variant"].split("@")[0], "k"), lw=1, alpha=0.8,
                label=None if r["variant"].split("@")[0] in labelled else r["variant"].split("@")[0],
            )
            labelled.add(r["variant"].split("@")[0])
        for switch in sorted({r["warmup_rounds"] for r in rows if r["client"] == client}):
            ax.axvline(switch + 0.5, color="gray", ls="--", lw=1)
        ax.set_xlabel("round (dashed: switch from the warm-up)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"client={client}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{client}.png", dpi=110)


def plot_matrix(rows: list[dict], out: Path) -> None:
    """OUT/matrix.png: the last-5 accuracy of every arm, grouped by client method (bar: mean over seeds; whisker:
    min to max; the number of seeds under each group)."""
    from fipa.plotting import plot_grouped_bars

    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["variant"] in MATRIX:
            cells.setdefault((r["client"], r["variant"]), []).append(100 * r["test_acc_last5"])
    clients = [c for c in CLIENTS if any(client == c for client, _ in cells)]
    arms = [v for v in MATRIX if any(variant == v for _, variant in cells)]
    plot_grouped_bars(cells, clients, arms, out / "matrix.png", "test accuracy %, mean of the last 5 rounds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="fmnist_dirichlet")
    parser.add_argument("--clients", nargs="+", default=["plain"], choices=CLIENTS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, "matrix"],
                        help="branch arms; 'matrix' stands for the method matrix's arms")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--warmup", type=int, default=100, help="FedAvg warm-up rounds (checkpoint at the end)")
    parser.add_argument("--phase", type=int, default=20, help="rounds after the warm-up")
    parser.add_argument("--branch-at", nargs="+", type=int, default=None, metavar="K",
                        help="branch at these warm-up rounds (the warm-up runs to the last; default: --warmup)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="warm-up checkpoints every K rounds (K must divide --warmup and every --branch-at), so a "
                             "killed warm-up resumes")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("results/image"))
    parser.add_argument("--warmups", type=Path, default=None, help="where the warm-up runs live (default: --out)")
    parser.add_argument("--collect-only", action="store_true", help="only tabulate finished runs")
    args = parser.parse_args(argv)
    args.warmups = args.warmups or args.out
    args.variants = [v for name in args.variants for v in (MATRIX if name == "matrix" else [name])]
    if args.branch_at:
        if min(args.branch_at) < 1:
            parser.error(f"--branch-at rounds must be >= 1, got {args.branch_at}")
        args.branch_at = sorted(set(args.branch_at))
        args.warmup = args.branch_at[-1]
        args.checkpoint_every = args.checkpoint_every or math.gcd(*args.branch_at)
    args.branch_at = args.branch_at or [args.warmup]
    for point in [args.warmup, *args.branch_at]:
        if args.checkpoint_every and point % args.checkpoint_every:
            parser.error(f"--checkpoint-every {args.checkpoint_every} must divide the warm-up's branch point {point}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect_only:
        run_all(args)
    rows = collect(args.out, args.warmups)
    if not rows:
        print(f"no completed branch runs under {args.out}", file=sys.stderr)
        return 1
    print(write_tables(rows, args.out), end="")
    plot_curves(rows, args.out)
    if any(r["variant"] in MATRIX[2:] for r in rows):
        plot_matrix(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
