"""`fipa-train` / `python -m fipa.train`: one federated run from a Hydra config.

`run(cfg)` is a plain function (tests call it with a composed config); `main()` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from fipa.errors import ConfigError, require

log = logging.getLogger("fipa")

CONFIG_DIR = next(
    str(path)
    for path in (Path(__file__).parent / "conf", Path(__file__).resolve().parent.parent / "conf")
    if path.is_dir()
)
DTYPES = ("float32", "float64")


def validate(cfg: DictConfig) -> None:
    """Checks that need no instantiation; the components check their own arguments when built."""
    require(cfg.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    require(isinstance(cfg.seed, int), f"seed must be an integer, got {cfg.seed!r}")
    lr = cfg.optimizer.get("lr")
    require(lr is not None and lr > 0, f"optimizer.lr must be > 0, got {lr}")
    require(cfg.torch_threads is None or cfg.torch_threads >= 1, f"torch_threads must be >= 1, got {cfg.torch_threads}")
    require(cfg.logger.name in ("csv", "wandb"), f"logger must be csv or wandb, got {cfg.logger.name!r}")


def build(cfg: DictConfig, output_dir: Path | None, worker: bool = False):
    """Instantiate every component; all input errors surface here, before any training.

    `worker=True` builds what a remote client worker needs (executor=ray): task, model and local trainers,
    without recorders, executor or checkpoint loading (the driver ships weights and client state per job).
    """
    import torch
    from hydra.utils import instantiate

    from fipa.federated_trainer import FederatedTrainer, FederationConfig
    from fipa.recorders import MetricsCSV, WandbRecorder
    from fipa.seeding import INIT, torch_generator

    validate(cfg)
    run_config = OmegaConf.to_container(cfg, resolve=True)  # before _later_phase grafts its node in
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    dtype = getattr(torch, cfg.dtype)
    federation = FederationConfig(**OmegaConf.to_container(cfg.federation, resolve=True))
    task = _instantiate(cfg.task, seed=cfg.seed, dtype=dtype)
    model = _instantiate(
        cfg.model,
        in_features=task.input_dim,
        out_features=task.output_dim,
        generator=torch_generator(cfg.seed, INIT),
        dtype=dtype,
    )
    aggregator = _instantiate(cfg.aggregator)
    client_callbacks = [_instantiate(c) for c in cfg.client.callbacks]
    later_phase = _later_phase(cfg)
    recorders: list[Any] = [] if worker else [MetricsCSV(output_dir / "metrics.csv")]
    if cfg.logger.name == "wandb" and not worker:
        recorders.append(_wandb_recorder(cfg, output_dir, WandbRecorder))
    executor = None if worker else _instantiate(cfg.executor)
    if executor is not None:
        executor.bind(run_config)
    trainer = FederatedTrainer(
        task=task,
        model=model,
        optimizer=instantiate(cfg.optimizer),
        aggregator=aggregator,
        federation=federation,
        client_callbacks=client_callbacks,
        recorders=recorders,
        seed=cfg.seed,
        later_phase=later_phase,
        output_dir=output_dir,
        executor=executor,
    )
    if cfg.init_from and not worker:
        trainer.load_checkpoint(cfg.init_from)
    return trainer


def _later_phase(cfg: DictConfig):
    """`schedule.switch_round=K schedule.after=<aggregator name>`: rounds after K use that aggregator."""
    schedule = cfg.schedule
    if schedule.switch_round is None:
        return None
    require(schedule.switch_round >= 1, f"schedule.switch_round must be >= 1, got {schedule.switch_round}")
    require(schedule.lr_scale_after > 0, f"schedule.lr_scale_after must be > 0, got {schedule.lr_scale_after}")
    node = compose_option("aggregator", schedule.after)
    # Graft the composed node into this config so its interpolations (seed, preset keys) resolve against it.
    with open_dict(cfg):
        cfg.schedule.after_aggregator = node
    return schedule.switch_round + 1, _instantiate(cfg.schedule.after_aggregator), float(schedule.lr_scale_after)


def compose(overrides: list[str]) -> DictConfig:
    """The run config for these command-line overrides, composed as `fipa-train` would (for scripts and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def completed_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """A run directory's summary if that run completed, else None (resumable studies skip these runs)."""
    import json

    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "completed" else None


def run_resumable(overrides: list[str], run_dir: str | Path) -> dict[str, Any]:
    """For study scripts: run into run_dir, or, if an earlier attempt left a checkpoint there, resume it
    (add federation.checkpoint_every=K to the overrides of long runs so that a killed study loses little)."""
    from fipa.federated_trainer import latest_checkpoint

    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file() and latest_checkpoint(run_dir) is not None:
        return run(compose([f"resume={run_dir}"]), run_dir)
    return run(compose(overrides), run_dir)


def compose_option(group: str, name: str) -> DictConfig:
    """The config node of option `name` of `group`, composed by Hydra (defaults lists included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    def node():
        try:
            return compose("train", overrides=[f"{group}={name}"])[group]
        except MissingConfigException:
            choices = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
            raise ConfigError(f"unknown {group} {name!r}; choose one of {', '.join(choices)}") from None

    if GlobalHydra.instance().is_initialized():
        return node()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return node()


def _instantiate(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with a component's ConfigError passed through unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def _wandb_recorder(cfg: DictConfig, output_dir: Path, recorder_cls):
    from hydra.core.hydra_config import HydraConfig

    group, name, choices = cfg.logger.group, None, {}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if group is None and hydra_cfg.mode.name == "MULTIRUN":
            group = str(Path(hydra_cfg.sweep.dir).name)  # runs of one sweep share a wandb group
        name = hydra_cfg.job.override_dirname or None
        choices = hydra_cfg.runtime.choices
    aggregator = cfg.aggregator._target_.rsplit(".", 1)[-1].lower()
    tags = [*cfg.logger.tags, f"aggregator:{aggregator}", f"seed:{cfg.seed}"]
    # the preset and other named choices, for filtering in the wandb UI (e.g. preset:poisson_2d, client:scaffold)
    tags += [
        f"{'preset' if group_name == 'experiment' else group_name}:{choice}"
        for group_name, choice in choices.items()
        if group_name in ("experiment", "variant", "client", "sweep") and choice not in (None, "plain")
    ]
    config = OmegaConf.to_container(cfg, resolve=True)
    return recorder_cls(output_dir, config=config, project=cfg.logger.project, group=group, tags=tags, name=name)


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """One federated run. Writes metrics.csv and summary.json into output_dir and returns the summary."""
    from fipa.recorders import write_json

    output_dir = Path(output_dir or _hydra_output_dir() or ".")
    checkpoint = None
    if cfg.get("resume"):
        cfg, output_dir, checkpoint = _resumed(cfg.resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)  # what `resume=<this dir>` rebuilds from
    trainer = build(cfg, output_dir)
    if checkpoint is not None:
        log.info("resuming %s after round %d", output_dir, trainer.resume(checkpoint))
    summary: dict[str, Any] = {"status": "failed"}
    try:
        summary = trainer.fit()
        save_model(trainer.module.model, output_dir / "model.pt")
        trainer.task.save_artifacts(trainer.module.model, output_dir)
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
    return OmegaConf.load(saved), directory, checkpoint


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
