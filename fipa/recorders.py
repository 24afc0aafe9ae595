"""Where per-round metrics go: metrics.csv always (flushed every round, so a crash loses nothing), wandb on request."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsCSV:
    """One row per round. The header is fixed by the first row; every round reports the same keys."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._writer: csv.DictWriter | None = None

    def log_round(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=list(row), extrasaction="ignore", restval="")
            self._writer.writeheader()
        self._writer.writerow(row)
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
        config: dict,
        project: str = "fipa",
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        mode: str | None = None,
    ):
        import wandb  # slow import, only when asked for

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            group=group,
            tags=[str(t) for t in tags or []],
            name=name,
            config=config,
            dir=str(run_dir),
            mode=mode or os.environ.get("WANDB_MODE", "offline"),
            reinit="finish_previous",
        )

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """A resumed run is a new wandb run (same group and tags): give it the rounds before the checkpoint too."""
        for row in rows:
            self.log_round(row)

    def log_round(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row["round"]))

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float, str)):
                self.run.summary[key] = value
        self.run.finish()


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
