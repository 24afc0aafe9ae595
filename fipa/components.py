"""What a run is made of, built from its config: the task, the client module, the server rule of each phase and
the client methods. The driver and every client host (a Ray worker, a Flower ClientApp) build it the same way, so
they hold the same data, the same initial model and the same client halves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fipa.aggregators.base import Aggregator
from fipa.client import ClientCallback, ClientModule, TrainerSettings, resolve_device
from fipa.config import FederationConfig, compose_option, instantiate
from fipa.errors import require
from fipa.local_steps import check_compilable
from fipa.parameters import FlatParameters
from fipa.seeding import INIT, torch_generator
from fipa.server_optimizers import ServerOptimizer, ServerSGD
from fipa.tasks.base import FederatedTask

DTYPES = ("float32", "float64")


@dataclass
class Phase:
    """A stretch of rounds with one server rule, e.g. a FedAvg warm-up and then a FIPA phase."""

    first_round: int
    aggregator: Aggregator
    lr_scale: float = 1.0  # client learning-rate multiplier during the phase (0.1 in the paper's FIPA phase)
    server_optimizer: ServerOptimizer | None = None  # the phase's own (fresh) server optimizer; None: the run's


def phase_of(phases: list[Phase], round_idx: int) -> Phase:
    return [p for p in phases if p.first_round <= round_idx][-1]


@dataclass
class Components:
    task: FederatedTask
    module: ClientModule
    flat: FlatParameters
    phases: list[Phase]
    client_methods: list[ClientCallback]  # the `client` group's callbacks: server and worker halves in one object
    federation: FederationConfig
    seed: int
    trainer: TrainerSettings  # how clients train locally: device, precision, compiled updates
    server_optimizer: ServerOptimizer = field(default_factory=ServerSGD)  # applies each round's proposal


def validate(cfg: DictConfig) -> None:
    """Checks that need no instantiation; the components check their own arguments when built."""
    require(cfg.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    require(isinstance(cfg.seed, int), f"seed must be an integer, got {cfg.seed!r}")
    lr = cfg.optimizer.get("lr")
    require(lr is not None and lr > 0, f"optimizer.lr must be > 0, got {lr}")
    require(cfg.torch_threads is None or cfg.torch_threads >= 1, f"torch_threads must be >= 1, got {cfg.torch_threads}")


def build_components(cfg: DictConfig) -> Components:
    """Instantiate the run's parts; every input error surfaces here, before any training."""
    validate(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    dtype = getattr(torch, cfg.dtype)
    federation = FederationConfig(**OmegaConf.to_container(cfg.federation, resolve=True))  # type: ignore[arg-type]
    trainer = TrainerSettings(**OmegaConf.to_container(cfg.trainer, resolve=True))  # type: ignore[arg-type]
    task = instantiate(cfg.task, seed=cfg.seed, dtype=dtype)
    model = instantiate(
        cfg.model,
        in_features=task.input_dim,
        out_features=task.output_dim,
        generator=torch_generator(cfg.seed, INIT),
        dtype=dtype,
    )
    phases = [Phase(1, instantiate(cfg.aggregator))]
    later = _later_phase(cfg)
    if later is not None:
        phases.append(later)
    client_methods = [instantiate(c) for c in cfg.client.callbacks]
    # a run directory saved before the server-optimizer seam has none: its rounds were plain sgd (lr 1)
    server_optimizer = instantiate(cfg.server_optimizer) if cfg.get("server_optimizer") else None
    return assemble(
        task, model, instantiate(cfg.optimizer), phases, federation, client_methods, cfg.seed, trainer, server_optimizer
    )


def assemble(
    task: FederatedTask,
    model: torch.nn.Module,
    optimizer,
    phases: list[Phase] | Aggregator,
    federation: FederationConfig | None = None,
    client_methods: list[ClientCallback] | None = None,
    seed: int = 0,
    trainer: TrainerSettings | None = None,
    server_optimizer: ServerOptimizer | None = None,
) -> Components:
    """A run's parts from Python objects (what `build_components` does from a config): the client module of the
    task's kind around `model`, with `optimizer` a callable of the parameters, e.g. functools.partial(torch.optim.SGD,
    lr=0.1); `phases` a list of Phase, or one aggregator for the whole run. The data and the model move to the
    trainer's device once, for the whole run. `server_optimizer` applies each round's proposal (None: sgd, lr 1)."""
    trainer = trainer or TrainerSettings()
    if trainer.compile:  # the compiled update needs an optimizer with a functional form: say so before training
        check_compilable(optimizer([torch.nn.Parameter(torch.zeros(1))]))
    device = resolve_device(trainer.accelerator)
    task.to(device)
    model.to(device)
    module = task.build_module(model, optimizer)
    flat = FlatParameters(module.model)
    for method in client_methods or []:
        method.validate(model)
    phases = [Phase(1, phases)] if isinstance(phases, Aggregator) else list(phases)
    for phase in phases:
        phase.aggregator.bind(flat)
    federation = federation or FederationConfig()
    return Components(
        task,
        module,
        flat,
        phases,
        list(client_methods or []),
        federation,
        seed,
        trainer,
        server_optimizer or ServerSGD(),
    )


def _option_with_settings(group: str, name: str, settings: Any, key: str) -> DictConfig:
    """The composed `group=name` node with `settings` (the schedule's `key`) merged in; unknown settings refused."""
    node = compose_option(group, name)
    unknown = sorted(str(k) for k in set(settings or {}) - set(node))
    require(
        not unknown,
        f"schedule.{key}: {', '.join(unknown)} not settings of {group}={name} "
        f"(its settings: {', '.join(str(k) for k in node if k != '_target_')})",
    )
    return OmegaConf.merge(node, settings or {})  # type: ignore[return-value]  # dict into dict: a DictConfig


def _later_phase(cfg: DictConfig) -> Phase | None:
    """`schedule.switch_round=K schedule.after=<aggregator name>`: rounds after K use that aggregator."""
    schedule = cfg.schedule
    if schedule.switch_round is None:
        keys = ("after", "lr_scale_after", "after_server_optimizer")
        changed = [f"schedule.{key}" for key in keys if schedule.get(key) is not None]
        changed += [f"schedule.{k}" for k in ("after_settings", "after_server_optimizer_settings") if schedule.get(k)]
        require(not changed, f"{' and '.join(changed)} take effect only with schedule.switch_round=<round>")
        return None
    require(schedule.switch_round >= 1, f"schedule.switch_round must be >= 1, got {schedule.switch_round}")
    require(schedule.after is not None, "schedule.switch_round needs schedule.after=<aggregator name>")
    lr_scale = 0.1 if schedule.lr_scale_after is None else schedule.lr_scale_after  # the paper's FIPA-phase cut
    require(lr_scale > 0, f"schedule.lr_scale_after must be > 0, got {lr_scale}")
    node = _option_with_settings("aggregator", schedule.after, schedule.get("after_settings"), "after_settings")
    # Graft the composed node into this config so its interpolations (seed, preset keys) resolve against it.
    with open_dict(cfg):
        cfg.schedule.after_aggregator = node
    optimizer_name = schedule.get("after_server_optimizer")
    optimizer_settings = schedule.get("after_server_optimizer_settings")
    require(
        optimizer_name is not None or not optimizer_settings,
        "schedule.after_server_optimizer_settings needs schedule.after_server_optimizer=<name>",
    )
    server_optimizer = (
        None
        if optimizer_name is None
        else instantiate(
            _option_with_settings(
                "server_optimizer", optimizer_name, optimizer_settings, "after_server_optimizer_settings"
            )
        )
    )
    return Phase(
        schedule.switch_round + 1, instantiate(cfg.schedule.after_aggregator), float(lr_scale), server_optimizer
    )
