"""The worker seam: one object that trains one client job, wherever a client trains.

A `ClientRunner` owns the task's data, the client `LightningModule`, its flat parameters, one Lightning
`LocalTrainer` per phase (holding that phase's aggregator client half and the client methods) and the client
methods' worker side. A job is

    (client, round, global parameters, round state, client state) -> (ClientUpdate, new client state)

The sequential executor runs jobs on the driver's runner; each Ray worker builds its own runner from the run
config (`ClientRunner.from_config`), and so can any other client host. The runner knows nothing of the server:
sampling, aggregation, evaluation and checkpoints stay in `FederatedTrainer`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fipa.client import ClientCallback, ClientModule, ClientUpdate, LocalTrainer, TrainerSettings, train_client
from fipa.components import Components, Phase, build_components, phase_of
from fipa.config import FederationConfig
from fipa.parameters import FlatParameters
from fipa.seeding import AUGMENT, SHUFFLE, torch_generator
from fipa.tasks.base import FederatedTask


class ClientRunner:
    def __init__(
        self,
        task: FederatedTask,
        module: ClientModule,
        flat: FlatParameters,
        phases: list[Phase],
        client_methods: list[ClientCallback],
        epochs_per_round: int,
        lr_decay: float = 1.0,
        seed: int = 0,
        trainer: TrainerSettings | None = None,
        federation: FederationConfig | None = None,
    ):
        self.task, self.module, self.flat = task, module, flat
        self.phases = phases
        self.client_methods = list(client_methods)
        self.epochs_per_round = epochs_per_round
        self.federation = federation  # with local_epochs_max, each job's epochs are drawn from it
        self.lr_decay = lr_decay
        self.seed = seed
        # One reused Lightning Trainer per phase: its callbacks are the phase's client half plus the client methods.
        self.local_trainers = [
            LocalTrainer([*phase.aggregator.client_callbacks(), *self.client_methods], trainer) for phase in phases
        ]

    @classmethod
    def from_components(cls, parts: Components) -> ClientRunner:
        return cls(
            parts.task,
            parts.module,
            parts.flat,
            parts.phases,
            parts.client_methods,
            parts.federation.epochs_per_round,
            parts.federation.lr_decay,
            parts.seed,
            parts.trainer,
            parts.federation,
        )

    @classmethod
    def from_config(cls, config: Any) -> ClientRunner:
        """A runner of its own, built from the run's resolved config (what a remote worker receives)."""
        from omegaconf import OmegaConf

        return cls.from_components(build_components(OmegaConf.create(config)))

    def epochs_of(self, round_idx: int, client_id: int) -> int:
        if self.federation is None:
            return self.epochs_per_round
        return self.federation.client_epochs(self.seed, round_idx, client_id)

    def local_trainer(self, round_idx: int) -> LocalTrainer:
        return self.local_trainers[self.phases.index(phase_of(self.phases, round_idx))]

    def train(
        self,
        client_id: int,
        round_idx: int,
        global_params: Tensor,
        round_states: list[Any],
        client_states: list[Any],
        aggregator_state: Any = None,
    ) -> tuple[ClientUpdate, list[Any]]:
        """Train one client from the broadcast point with the client methods' shipped state (and what the round's
        rule tells its client half, `Aggregator.round_state`); return its update and the client methods' new state
        for this client."""
        phase = phase_of(self.phases, round_idx)
        module = self.module
        module.lr_scale = self.lr_decay ** (round_idx - 1) * phase.lr_scale
        module.num_clients = self.task.num_clients
        # Every random draw of the job comes from (seed, purpose, round, client): the same numbers in any process.
        module.generator = torch_generator(self.seed, AUGMENT, round_idx, client_id)
        for method, round_state, client_state in zip(self.client_methods, round_states, client_states):
            method.begin_client(client_id, round_state, client_state)
        for callback in phase.aggregator.client_callbacks():
            callback.begin_client(client_id, aggregator_state, None)
        update = train_client(
            client_id,
            module,
            self.flat,
            global_params,
            self.task.client_dataset(client_id),
            self.task.client_loader(client_id, torch_generator(self.seed, SHUFFLE, round_idx, client_id)),
            self.epochs_of(round_idx, client_id),
            self.local_trainer(round_idx),
            round_idx,
        )
        return update, [method.end_client() for method in self.client_methods]
