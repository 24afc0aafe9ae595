"""Read runs back from disk: find run directories, load them, group seeds into arms, aggregate a metric.

    from fipa.results import find_run_dirs, load_run, completed_runs, group_arms, final_value, seed_stats

    runs = [load_run(d) for d in find_run_dirs("multirun/2026-11-24/10-00-00")]
    done, problems = completed_runs(runs)        # problems: one line per unfinished or failed run
    for arm in group_arms(done):                 # runs that differ only by seed
        print(arm.label, seed_stats([final_value(r, "test_mse") for r in arm.runs]))

A run directory holds metrics.csv (one row per round), summary.json (written at the end) and, for Hydra jobs,
.hydra/overrides.yaml. Pure Python and numpy: scripts/collect.py, scripts/plot.py and the notebooks build on it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fipa.errors import ConfigError, require

RUN_MARKERS = ("metrics.csv", "summary.json", ".hydra/overrides.yaml")
# Config keys that never define an arm: the seed (whatever node it is copied into), where things are stored, and
# how often a run checkpoints (a resumed run ends as the uninterrupted one).
IGNORED_LEAVES = {"seed", "init_from", "output_dir", "data_dir", "root", "dir", "path", "checkpoint_every"}
MISSING = "<missing>"
COMMAND_FILE = "command.txt"  # the command that started the run (fipa.train.run), then one line per resume
PREDICTION_KEYS = {"x", "target", "prediction", "region_lo", "region_hi"}  # fipa.plotting.save_predictions


@dataclass
class Run:
    dir: Path
    summary: dict[str, Any] | None  # None: no (readable) summary.json yet
    metrics: list[dict[str, float]] = field(default_factory=list)  # one row per round; empty cells are NaN
    overrides: list[str] | None = None  # .hydra/overrides.yaml; None outside Hydra (e.g. scripts/pinn_table.py)
    error: str | None = None  # why summary.json or metrics.csv could not be read

    @property
    def config(self) -> dict[str, Any]:
        return (self.summary or {}).get("config") or {}

    @property
    def completed(self) -> bool:
        return self.summary is not None and self.summary.get("status") == "completed"


@dataclass
class Arm:
    """Runs whose settings are equal: the same experiment repeated over seeds."""

    settings: dict[str, str]
    runs: list[Run]

    @property
    def label(self) -> str:
        return arm_label(self.settings)


# ------------------------------------------------------------------------------------------------ finding, loading
def is_run_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_run_dirs(path: str | Path) -> list[Path]:
    """Every run directory at or below `path`, in natural order (job 10 after job 9)."""
    found = []
    for root, dirs, _ in os.walk(path):
        if is_run_dir(Path(root)):
            found.append(Path(root))
            dirs.clear()  # a run's own subfolders (checkpoints, wandb) hold no further runs
        else:
            dirs[:] = [d for d in dirs if d != ".hydra"]
    return sorted(found, key=natural_key)


def natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def load_run(path: str | Path) -> Run:
    path = Path(path)
    run = Run(dir=path, summary=None)
    try:
        if (path / "summary.json").is_file():
            run.summary = json.loads((path / "summary.json").read_text())
        if (path / "metrics.csv").is_file():
            run.metrics = read_metrics(path / "metrics.csv")
        if (path / ".hydra/overrides.yaml").is_file():
            run.overrides = read_overrides(path / ".hydra/overrides.yaml")
    except (OSError, ValueError, csv.Error, yaml.YAMLError) as error:  # half-written or hand-edited: report it
        run.error = f"{type(error).__name__}: {error}"
    return run


def load_runs(path: str | Path) -> list[Run]:
    return [load_run(d) for d in find_run_dirs(path)]


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{key: to_float(value) for key, value in row.items() if key is not None} for row in csv.DictReader(f)]


def to_float(value: Any) -> float:
    """A metrics cell as a float; empty (evaluation skipped that round) or unparsable cells become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_overrides(path: Path) -> list[str]:
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


# ------------------------------------------------------------------------------------------------ problems
def run_problem(run: Run) -> str | None:
    """Why a run cannot be tabulated, or None when it completed."""
    if run.error:
        return f"unreadable ({run.error})"
    if run.summary is None:
        return f"no summary.json (still running or crashed; metrics.csv has {len(run.metrics)} rounds)"
    if not run.completed:
        return f"status {run.summary.get('status')!r} after {run.summary.get('rounds_completed', '?')} rounds"
    return None


def completed_runs(runs: Iterable[Run]) -> tuple[list[Run], list[str]]:
    """The completed runs, and one line `<dir>: <why>` per run left out."""
    done, problems = [], []
    for run in runs:
        problem = run_problem(run)
        if problem is None:
            done.append(run)
        else:
            problems.append(f"{run.dir}: {problem}")
    return done, problems


# ------------------------------------------------------------------------------------------------ values
def seed_of(run: Run) -> int | None:
    seeds = [o.split("=", 1)[1] for o in run.overrides or [] if o.startswith("seed=")]
    seed = seeds[-1] if seeds else run.config.get("seed")
    if seed is None:
        return None
    try:
        return int(seed)
    except (TypeError, ValueError):
        return None


def headline_metric(run: Run) -> str | None:
    return (run.summary or {}).get("metric")


def final_value(run: Run, name: str) -> float:
    """The final value of `name`: summary.json's when it has one, else the last finite entry of metrics.csv."""
    value = (run.summary or {}).get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value is None and name in (run.summary or {}):
        return math.nan  # written as null: the value was not finite (a diverged run)
    finite = [v for v in series(run, name)[1] if math.isfinite(v)]
    return finite[-1] if finite else math.nan


def has_value(run: Run, name: str) -> bool:
    return name in (run.summary or {}) or any(name in row for row in run.metrics)


def summary_metric_names(runs: Iterable[Run]) -> list[str]:
    """Numeric entries of the summaries, plus every metrics.csv column: what --metric may name."""
    names = set()
    for run in runs:
        names |= {k for k, v in (run.summary or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        names |= metric_columns([run])
    return sorted(names)


def metric_columns(runs: Iterable[Run]) -> set[str]:
    return {key for run in runs for row in run.metrics for key in row}


def finite_rows(run: Run, *columns: str) -> list[dict[str, float]]:
    """The metrics rows where every one of `columns` is finite (rounds without evaluation have empty cells)."""
    return [row for row in run.metrics if all(math.isfinite(row.get(c, math.nan)) for c in columns)]


def series(run: Run, name: str, x: str = "round") -> tuple[list[float], list[float]]:
    """(x, y) over the rounds where both are finite."""
    rows = finite_rows(run, x, name)
    return [row[x] for row in rows], [row[name] for row in rows]


def switch_round(run: Run) -> int | None:
    """schedule.switch_round of the run's config: rounds after it use the second aggregator."""
    value = (run.config.get("schedule") or {}).get("switch_round")
    return int(value) if value is not None else None


def load_predictions(run: Run) -> dict[str, Any] | None:
    """predictions.npz (regression and PINN runs) as a dict of arrays, or None when the run has none."""
    import numpy as np

    path = run.dir / "predictions.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile):  # half-written: draw the other runs
        return None
    return arrays if PREDICTION_KEYS <= set(arrays) else None


def run_command(run: Run) -> str | None:
    """The command that started the run (the first line of its command.txt), or None for runs made before fipa
    recorded it."""
    path = run.dir / COMMAND_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return lines[0] if lines else None


# ------------------------------------------------------------------------------------------------ arms
def run_settings(runs: Sequence[Run]) -> list[dict[str, str]]:
    """What tells each run apart from the others, seed left out: one dict per run, in order.

    Hydra jobs: their command-line overrides minus seed and hydra.*. Otherwise (or when some runs lack overrides):
    the flattened resolved config keys whose values differ between the runs, with `<group>._target_` shown as
    `<group>=<class name>` and keys that exist only in some runs with one value dropped (implied by the group).
    """
    if runs and all(run.overrides is not None for run in runs):
        return [settings_from_overrides(run.overrides or []) for run in runs]
    return settings_from_configs([run.config for run in runs])


def settings_from_overrides(overrides: Iterable[str]) -> dict[str, str]:
    settings = {}
    for override in overrides:
        if "=" not in override:
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("hydra") or key.rsplit(".", 1)[-1] in IGNORED_LEAVES:
            continue
        settings[key] = value
    return settings


def settings_from_configs(configs: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    flat = [{k: v for k, v in flatten(c).items() if not ignored_key(k)} for c in configs]
    keys = sorted({k for f in flat for k in f})
    # A key only some runs have, with a single value, comes with the group (e.g. aggregator.rank of FIPA runs).
    varying = [k for k in keys if len({f[k] for f in flat if k in f}) > 1]
    varying = [k for k in varying if not implied_by_target(k, varying, flat)]
    return [{short_key(k): short_value(k, f.get(k, "")) for k in varying} for f in flat]


def implied_by_target(key: str, varying: list[str], flat: list[dict[str, str]]) -> bool:
    """True when `key` lies under a node whose _target_ varies and is constant among runs sharing that _target_:
    aggregator.step_size 1.0 vs 0.5 says nothing that aggregator=fedavg vs fipa does not."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        target = ".".join(parts[:depth]) + "._target_"
        if target != key and target in varying:
            values: dict[str, set] = {}
            for f in flat:
                values.setdefault(f.get(target, MISSING), set()).add(f.get(key, MISSING))
            return all(len(v) == 1 for v in values.values())
    return False


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node if isinstance(node, str) else json.dumps(node)}


def ignored_key(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    # schedule.after_aggregator is the composed node of schedule.after: the name already tells the arm apart
    return (
        key.startswith(("hydra.", "schedule.after_aggregator."))
        or leaf in IGNORED_LEAVES
        or leaf.endswith(("_dir", "_path"))
    )


def short_key(key: str) -> str:
    return key.removesuffix("._target_")


def short_value(key: str, value: str) -> str:
    # fipa.aggregators.FIPA -> fipa: the name used on the command line
    return value.rsplit(".", 1)[-1].lower() if key.endswith("._target_") and value else value


def arm_label(settings: dict[str, str]) -> str:
    """ "aggregator=fipa experiment=regression_1d_m4"; "all runs" when nothing tells the runs apart."""
    return " ".join(f"{k}={v}" for k, v in sorted(settings.items()) if v != "") or "all runs"


def group_arms(runs: Sequence[Run]) -> list[Arm]:
    """Runs grouped by their settings (everything but the seed), arms sorted by label and runs by seed."""
    groups: dict[tuple, Arm] = {}
    for run, settings in zip(runs, run_settings(runs)):
        key = tuple(sorted(settings.items()))
        groups.setdefault(key, Arm(settings, [])).runs.append(run)
    for arm in groups.values():
        arm.runs.sort(key=lambda r: (seed_of(r) is None, seed_of(r) or 0, natural_key(r.dir)))
    return sorted(groups.values(), key=lambda arm: arm.label)


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample; 0 for one seed), median, min, max and n over the finite values (NaN when none)."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "median": statistics.median(finite),
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


# ------------------------------------------------------------------------------------------------ tables
def choose_metric(runs: Sequence[Run], requested: str | None, available: Iterable[str]) -> str:
    """`requested` if the runs have it, else the runs' common headline metric; ConfigError says what exists."""
    available = sorted(available)
    if requested is not None:
        require(requested in available, f"unknown metric {requested!r}; available: {', '.join(available)}")
        return requested
    headlines = sorted({m for m in map(headline_metric, runs) if m})
    if len(headlines) != 1:
        found = f"different metrics ({', '.join(headlines)})" if headlines else "no headline metric"
        raise ConfigError(f"the runs report {found}; choose one with --metric from: {', '.join(available)}")
    return headlines[0]


def tidy_rows(runs: Sequence[Run], metric: str) -> list[dict[str, Any]]:
    """One row per run: its settings, seed, the final metric, rounds completed, elapsed_s and directory."""
    settings = filled(run_settings(runs))
    return [
        {
            **s,
            "seed": seed_of(run),
            metric: final_value(run, metric),
            "rounds_completed": (run.summary or {}).get("rounds_completed", len(run.metrics)),
            "elapsed_s": final_value(run, "elapsed_s"),
            "dir": str(run.dir),
        }
        for run, s in zip(runs, settings)
    ]


def arm_table(
    runs: Sequence[Run], metric: str, stall_above: float | None = None, baseline: str | None = None
) -> list[dict[str, Any]]:
    """One row per arm: its settings, the number of seeds, the metric's statistics over seeds, median rounds.

    `stall_above`: also the number of seeds whose final value is above it (or not finite). `baseline` ("key=value",
    e.g. "aggregator=fedavg"): also the worst ratio metric / baseline's metric at any round of any seed, against the
    baseline run of the same seed and otherwise the same settings (see `baseline_runs`)."""
    settings = run_settings(runs)
    keys = sorted({k for s in settings for k in s})
    baselines = baseline_runs(runs, settings, baseline) if baseline else {}
    table = []
    for arm in group_arms(runs):
        finals = [final_value(run, metric) for run in arm.runs]
        stats = seed_stats(finals)
        rounds = [(run.summary or {}).get("rounds_completed", len(run.metrics)) for run in arm.runs]
        row = {
            **({k: arm.settings.get(k, "") for k in keys} if keys else {"arm": arm.label}),
            "seeds": len(arm.runs),
            **{f"{metric}_{name}": stats[name] for name in ("mean", "std", "median", "min", "max")},
            "rounds_median": statistics.median(rounds),
        }
        if stall_above is not None:
            row["stalled"] = stalled_count(finals, stall_above)
        if baseline:
            ratios = [worst_ratio(run, baselines[id(run)], metric) for run in arm.runs if id(run) in baselines]
            row["worst_ratio_to_baseline"] = max(ratios) if ratios else math.nan
        table.append(row)
    return table


def stalled_count(finals: Sequence[float], threshold: float) -> int:
    """Seeds whose final value is above `threshold` or not finite (a diverged run has stalled too)."""
    return sum(1 for v in finals if not (math.isfinite(v) and v <= threshold))


def baseline_runs(runs: Sequence[Run], settings: Sequence[dict[str, str]], baseline: str) -> dict[int, Run]:
    """For each run that is not a baseline run, by id(): the baseline run ("key=value" among its settings) of the same
    seed whose settings agree on every key outside the baseline key's group (e.g. "aggregator" and "aggregator.*"
    for "aggregator=fedavg": the rule's own settings differ, the experiment must not)."""
    key, _, value = baseline.partition("=")
    require(bool(key) and bool(value), f"--baseline must be key=value (e.g. aggregator=fedavg), got {baseline!r}")
    group = key.split(".")[0]

    def shared(s: dict[str, str]) -> tuple:
        return tuple(sorted((k, v) for k, v in s.items() if k.split(".")[0].split("=")[0] != group))

    def is_baseline(s: dict[str, str]) -> bool:
        return s.get(key, "").lower() == value.lower()  # class names show lower-case, as on the command line

    index = {(seed_of(r), shared(s)): r for r, s in zip(runs, settings) if is_baseline(s)}
    require(bool(index), f"--baseline {baseline}: no run has {key}={value}")
    return {
        id(r): index[(seed_of(r), shared(s))]
        for r, s in zip(runs, settings)
        if not is_baseline(s) and (seed_of(r), shared(s)) in index
    }


def worst_ratio(run: Run, baseline: Run, metric: str) -> float:
    """max over the rounds both runs evaluated of run's metric / baseline's: above 1 where the run was behind."""
    ours = dict(zip(*series(run, metric)))
    theirs = dict(zip(*series(baseline, metric)))
    ratios = [ours[r] / theirs[r] for r in ours.keys() & theirs.keys() if theirs[r] > 0]
    return max(ratios) if ratios else math.nan


def filled(settings: list[dict[str, str]]) -> list[dict[str, str]]:
    """The same keys in every dict (missing ones empty), sorted, so they make table columns."""
    keys = sorted({k for s in settings for k in s})
    return [{k: s.get(k, "") for k in keys} for s in settings]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no completed runs)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
