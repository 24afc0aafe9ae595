"""The run's settings: Hydra composition helpers and the federation's own settings.

The lowest layer of the package that knows about configs: the driver (`fipa.train`) and every client host (a
Ray worker, a Flower ClientApp) compose and instantiate through it, so all of them build the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fipa.errors import ConfigError, require
from fipa.seeding import LOCAL_WORK, numpy_rng

CONFIG_DIR = next(
    str(path)
    for path in (Path(__file__).parent / "conf", Path(__file__).resolve().parent.parent / "conf")
    if path.is_dir()
)

# ${add:a,b}: e.g. a branch's federation.rounds = its switch round + the phase (sweep=image_branches)
OmegaConf.register_new_resolver("add", lambda *values: sum(values), replace=True)


@dataclass
class FederationConfig:
    rounds: int = 100
    local_epochs: int = 20
    local_epochs_scale: int = 1  # multiplies local_epochs: "FedAvg with 10x local epochs" across presets' taus
    local_epochs_max: int | None = None  # unequal local work: each client's epochs ~ U{local_epochs..this} per round
    clients_per_round: int | None = None  # None: all clients, every round
    time_budget_s: float | None = None  # stop once the accumulated round time exceeds it (equal-time protocol)
    eval_every: int = 1  # rounds between test evaluations; the rounds in between leave the test metrics empty
    lr_decay: float = 1.0  # client learning rate x lr_decay^(round-1); the image presets use 0.998
    checkpoint_every: int | None = None  # save the global model and client-method state every n rounds
    dropout_prob: float = 0.0  # each sampled client independently drops out of a round (seeded), as devices do

    def __post_init__(self):
        require(self.rounds >= 1, f"federation.rounds must be >= 1, got {self.rounds}")
        require(self.local_epochs >= 1, f"federation.local_epochs must be >= 1, got {self.local_epochs}")
        require(
            self.local_epochs_scale >= 1,
            f"federation.local_epochs_scale must be >= 1, got {self.local_epochs_scale}",
        )
        require(self.eval_every >= 1, f"federation.eval_every must be >= 1, got {self.eval_every}")
        require(
            self.local_epochs_max is None or self.local_epochs_max >= self.local_epochs,
            f"federation.local_epochs_max must be >= local_epochs ({self.local_epochs}) or null, "
            f"got {self.local_epochs_max}",
        )
        require(
            self.time_budget_s is None or self.time_budget_s > 0,
            f"federation.time_budget_s must be > 0 or null, got {self.time_budget_s}",
        )
        require(0 < self.lr_decay <= 1, f"federation.lr_decay must be in (0, 1], got {self.lr_decay}")
        require(0 <= self.dropout_prob < 1, f"federation.dropout_prob must be in [0, 1), got {self.dropout_prob}")
        require(
            self.checkpoint_every is None or self.checkpoint_every >= 1,
            f"federation.checkpoint_every must be >= 1 or null, got {self.checkpoint_every}",
        )

    @property
    def epochs_per_round(self) -> int:
        """Local epochs each client trains per round (tau); with local_epochs_max, the fewest."""
        return self.local_epochs * self.local_epochs_scale

    def client_epochs(self, seed: int, round_idx: int, client_id: int) -> int:
        """The epochs this client trains this round: tau, or with `local_epochs_max` a draw from
        U{local_epochs, ..., local_epochs_max} (FedNova's heterogeneous local work, Wang et al. 2020), seeded by
        (seed, round, client) so every process draws the same; times local_epochs_scale."""
        if self.local_epochs_max is None:
            return self.epochs_per_round
        rng = numpy_rng(seed, LOCAL_WORK, round_idx, client_id)
        return int(rng.integers(self.local_epochs, self.local_epochs_max + 1)) * self.local_epochs_scale


def compose(overrides: list[str]) -> DictConfig:
    """The run config for these command-line overrides, composed as `fipa-train` would (for scripts and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def compose_option(group: str, name: str) -> DictConfig:
    """The config node of option `name` of `group`, composed by Hydra (defaults lists included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    def node():
        try:
            return compose("train", overrides=[f"{group}={name}"])[group]
        except MissingConfigException:
            raise ConfigError(f"unknown {group} {name!r}; choose one of {', '.join(options(group))}") from None

    if GlobalHydra.instance().is_initialized():
        return node()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return node()


def options(group: str) -> list[str]:
    """The option names of a config group (its yaml files)."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def instantiate(node: Any, **kwargs):
    """hydra.utils.instantiate, with a component's ConfigError passed through unwrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
