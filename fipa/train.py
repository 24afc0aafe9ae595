"""`fipa-train` / `python -m fipa.train`: one federated run from a Hydra config.

`run(cfg)` is a plain function (tests call it with a composed config); `main()` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fipa.config import CONFIG_DIR, compose, compose_option, instantiate
from fipa.errors import ConfigError, require

__all__ = ["CONFIG_DIR", "build", "completed_summary", "compose", "compose_option", "main", "run", "run_resumable"]

log = logging.getLogger("fipa")


def build(cfg: DictConfig, output_dir: Path):
    """Instantiate every component of a run; all input errors surface here, before any training.

    The composition root: the run's parts (`fipa.components`), the driver's `ClientRunner`, the executor, the
    recorders and the server loop.
    """
    from fipa.components import build_components
    from fipa.federated_trainer import FederatedTrainer
    from fipa.recorders import MetricsCSV
    from fipa.runner import ClientRunner

    run_config = OmegaConf.to_container(cfg, resolve=True)  # before the schedule grafts its node in
    parts = build_components(cfg)
    recorders: list[Any] = [MetricsCSV(output_dir / "metrics.csv")]
    if cfg.logger.get("_target_"):
        recorders.append(_recorder(cfg, output_dir))
    executor = instantiate(cfg.executor)
    executor.bind(run_config, ClientRunner.from_components(parts))
    trainer = FederatedTrainer.from_components(parts, executor, recorders=recorders, output_dir=output_dir)
    if cfg.init_from:
        trainer.load_checkpoint(cfg.init_from)
    return trainer


def completed_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's summary if that run completed, else None (resumable studies skip these runs)."""
    import json

    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" else None


def quoted_override(key: str, value: str | Path) -> str:
    """key='value' for Hydra: study directories are named key=value,key=value, which unquoted would not parse."""
    # Hydra's quoted strings: a quote is escaped with a backslash, and backslashes are escaped only where they
    # stand before a quote (or the closing one)
    escaped = re.sub(r"(\\*)'", lambda m: 2 * m.group(1) + "\\'", str(value))
    escaped = re.sub(r"(\\+)$", lambda m: 2 * m.group(1), escaped)
    return f"{key}='{escaped}'"


def run_resumable(overrides: list[str], run_dir: str | Path) -> dict[str, Any]:
    """For study scripts: run into run_dir, or, if an earlier attempt left a checkpoint there, resume it
    (add federation.checkpoint_every=K to the overrides of long runs so that a killed study loses little)."""
    from fipa.federated_trainer import latest_checkpoint

    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file() and latest_checkpoint(run_dir) is not None:
        return run(compose([quoted_override("resume", run_dir)]), run_dir)
    return run(compose(overrides), run_dir)


def _recorder(cfg: DictConfig, output_dir: Path):
    """The `logger` group's recorder, instantiated from its `_target_` with the run directory, the resolved config
    and the run's labels (name, group, tags) that trackers show."""
    from hydra.core.hydra_config import HydraConfig

    from fipa.recorders import RunLabels

    group, name, choices = None, None, {}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
            group = str(Path(hydra_cfg.sweep.dir).name)  # runs of one sweep share a group
        name = hydra_cfg.job.override_dirname or None
        choices = hydra_cfg.runtime.choices
    aggregator = cfg.aggregator._target_.rsplit(".", 1)[-1].lower()
    tags = [f"aggregator:{aggregator}", f"seed:{cfg.seed}"]
    # the preset and other named choices, for filtering in a tracker's UI (e.g. preset:poisson_2d, client:scaffold)
    tags += [
        f"{'preset' if group_name == 'experiment' else group_name}:{choice}"
        for group_name, choice in choices.items()
        if group_name in ("experiment", "variant", "client", "sweep") and choice not in (None, "plain")
    ]
    labels = RunLabels(name=name, group=group, tags=tags)
    config = OmegaConf.to_container(cfg, resolve=True)
    # partial first: the run config it receives is plain data, which Hydra must not convert or instantiate
    return instantiate(cfg.logger, _partial_=True)(run_dir=output_dir, run_config=config, labels=labels)


def run(cfg: DictConfig, output_dir: str | Path | None = None, host=None) -> dict[str, Any]:
    """One federated run. Writes metrics.csv and summary.json into output_dir and returns the summary.
    `host(trainer)` runs the round loop (default: the executor's `host`, e.g. inside Flower for executor=flower)."""
    from fipa.recorders import write_json
    from fipa.results import COMMAND_FILE

    output_dir = Path(output_dir or _hydra_output_dir() or ".")
    checkpoint = None
    if cfg.get("resume"):
        ignored = [o for o in _command_line_overrides() if not o.startswith("resume=")]
        require(
            not ignored,
            f"resume={cfg.resume} continues that run with its saved config.yaml; {' '.join(ignored)} would be "
            "ignored: drop it, or start a new run from a checkpoint with init_from=<dir>/checkpoints/round_K.pt",
        )
        cfg, output_dir, checkpoint = _resumed(cfg.resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)  # what `resume=<this dir>` rebuilds from
        (output_dir / COMMAND_FILE).write_text(command_line() + "\n")  # the report's "made by"
    else:
        with open(output_dir / COMMAND_FILE, "a") as f:
            f.write(f"# resumed by: {command_line()}\n")
    trainer = build(cfg, output_dir)
    if checkpoint is not None:
        log.info("resuming %s after round %d", output_dir, trainer.resume(checkpoint))
    summary: dict[str, Any] = {"status": "failed"}
    try:
        summary = (host or trainer.executor.host)(trainer)
        save_model(trainer.model, output_dir / "model.pt")
        trainer.task.save_artifacts(trainer.model, output_dir)
    finally:
        summary["config"] = OmegaConf.to_container(cfg, resolve=True)
        summary["output_dir"] = str(output_dir)
        write_json(output_dir / "summary.json", summary)
        for recorder in trainer.recorders:
            recorder.finish(summary)
    return summary


def _resumed(run_dir: str) -> tuple[DictConfig, Path, Path]:
    """`resume=<run dir>`: that run's saved config, its directory and its latest checkpoint."""
    from fipa.federated_trainer import latest_checkpoint

    directory = Path(run_dir)
    require(directory.is_dir(), f"resume={run_dir}: no such run directory")
    saved = directory / "config.yaml"
    require(saved.is_file(), f"resume={run_dir}: not a fipa run directory (no config.yaml)")
    checkpoint = latest_checkpoint(directory)
    require(
        checkpoint is not None,
        f"resume={run_dir}: no checkpoint to resume from (runs save them with federation.checkpoint_every=K)",
    )
    config = OmegaConf.load(saved)
    require(isinstance(config, DictConfig), f"resume={run_dir}: {saved} is not a run config")
    return config, directory, checkpoint  # type: ignore[return-value]


def save_model(model, path: Path) -> None:
    """model.pt: the final global state_dict (load with torch.load(path, weights_only=True))."""
    import torch

    torch.save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, path)


def summary_line(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    return (
        f"fipa: {summary['status']} rounds={summary['rounds_completed']} {metric}={summary[metric]:.4e} "
        f"elapsed_s={summary['elapsed_s']:.1f} dir={summary['output_dir']}"
    )


def command_line() -> str:
    """This process's command line as one would type it: `fipa-train -m sweep=...`, `python scripts/study.py ...`."""
    program = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    head = ["python", program] if program.endswith(".py") else [Path(program).name]
    return shlex.join([*head, *sys.argv[1:]])


def _command_line_overrides() -> list[str]:
    """The run's overrides of the config (not Hydra's own settings), when launched by Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _hydra_output_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except ConfigError as error:
        print(f"fipa-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(summary), flush=True)
    return summary.get(summary["metric"])  # the sweep objective, for Hydra sweepers


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
