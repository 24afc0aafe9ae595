"""Where per-round metrics go: metrics.csv always (flushed every round, so a crash loses nothing), and the recorder
of the `logger` group (wandb, TensorBoard, or any class named by `_target_`).

A recorder is built as `Recorder(run_dir=..., run_config=..., labels=RunLabels(...), **its own settings)` and has three
methods: `log_round(row)` after every round, `restore(rows)` when a run resumes (the rounds before its
checkpoint), and `finish(summary)` at the end. Rounds that were not evaluated carry NaN test metrics; recorders
leave them out (metrics.csv writes an empty cell) rather than repeat a stale value.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass
class RunLabels:
    """How trackers label a run: its name (the Hydra overrides), its group (the sweep) and tags (aggregator, seed,
    preset, variant, client method, sweep)."""

    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def finite_numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row that hold a value (NaN marks a metric the round did not measure)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class MetricsCSV:
    """One row per round. The header is fixed by the first row; every round reports the same keys."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = None
        self._writer: csv.DictWriter | None = None

    def log_round(self, row: dict[str, Any]) -> None:
        if self._file is None or self._writer is None:
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), extrasaction="ignore", restval="")
            self._writer.writeheader()
        self._writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
        self._file.flush()

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """A resumed run: rewrite the file with the checkpoint's rows (dropping any logged after it)."""
        if self._file is not None:
            self._file.close()
        self._file, self._writer = None, None
        for row in rows:
            self.log_round(row)

    def finish(self, summary: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.close()


class WandbRecorder:
    """Per-round metrics, the resolved config and the summary through wandb.

    Offline unless the user sets WANDB_MODE themselves, so no network or API key is needed; `wandb sync`
    uploads an offline run later.
    """

    def __init__(
        self,
        run_dir: str | Path,
        run_config: dict,
        labels: RunLabels | None = None,
        project: str = "fipa",
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
    ):
        import wandb  # slow import, only when asked for

        labels = labels or RunLabels()
        self.run = wandb.init(
            project=project,
            group=group or labels.group,
            tags=[str(t) for t in [*(tags or []), *labels.tags]],
            name=labels.name,
            config=run_config,
            dir=str(run_dir),
            mode=mode or os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            reinit="finish_previous",
        )

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """A resumed run is a new wandb run (same group and tags): give it the rounds before the checkpoint too."""
        for row in rows:
            self.log_round(row)

    def log_round(self, row: dict[str, Any]) -> None:
        self.run.log(finite_numbers(row), step=int(row["round"]))

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float, str)):
                self.run.summary[key] = value
        self.run.finish()


class TensorBoardRecorder:
    """Per-round metrics as TensorBoard scalars (`tensorboard --logdir <run dir>/tensorboard`), the resolved config
    and labels as text, and the summary's numbers as scalars at the last round. Event files are written locally;
    nothing needs a network."""

    def __init__(
        self, run_dir: str | Path, run_config: dict, labels: RunLabels | None = None, subdir: str = "tensorboard"
    ):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            from fipa.errors import ConfigError

            raise ConfigError("logger=tensorboard needs TensorBoard: pip install 'fipa[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir))
        labels = labels or RunLabels()
        self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```", 0)
        self.writer.add_text(
            "labels",
            ", ".join([*labels.tags, *(f"{k}:{v}" for k, v in (("name", labels.name), ("group", labels.group)) if v)]),
            0,
        )
        self._last_round = 0

    def log_round(self, row: dict[str, Any]) -> None:
        self._last_round = int(row["round"])
        for key, value in finite_numbers(row).items():
            if key != "round":
                self.writer.add_scalar(key, value, self._last_round)
        self.writer.flush()  # a crash loses nothing already logged

    def restore(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.log_round(row)

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in finite_numbers(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, self._last_round)
        self.writer.close()


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """JSON with non-finite floats written as null (strict JSON readers reject NaN)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(clean(payload), indent=2) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a summary
