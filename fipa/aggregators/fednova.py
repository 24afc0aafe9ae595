"""FedNova (Wang et al., NeurIPS 2020): normalized averaging, exact when clients do unequal local work.

Client m takes tau_m local steps; its update Delta_m = sum_k a_mk (-lr g_mk) weighs its steps by a_m (all ones for
plain SGD). FedAvg's average of such updates optimises a surrogate objective that favours the clients that
stepped most. FedNova averages the normalised updates d_m = Delta_m / ||a_m||_1 and rescales by the effective
number of steps tau_eff = sum_m p_m ||a_m||_1:

    theta + step_size * tau_eff * sum_m p_m Delta_m / ||a_m||_1,        p_m = N_m / sum N,

which is FedAvg when every ||a_m||_1 is the same. ||a_m||_1 (`normalized_steps`) comes from the client: its step
count tau for SGD, and for SGD with momentum rho (heavy ball) sum_{k=1..tau} (1 - rho^k) / (1 - rho), the paper's
form. Other optimizers (Adam, ...) have no such closed form: they count their steps, FedNova's vanilla rule.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from fipa.aggregators import functional as AF
from fipa.aggregators.base import Aggregator
from fipa.client import ClientCallback, ClientUpdate
from fipa.errors import require


def momentum_step_norm(steps: int, momentum: float) -> float:
    """||a||_1 of `steps` heavy-ball SGD steps: sum_{k=1..steps} (1 - momentum^k) / (1 - momentum); steps if 0."""
    if momentum == 0:
        return float(steps)
    return (steps - momentum * (1 - momentum**steps) / (1 - momentum)) / (1 - momentum)


class LocalStepCounter(ClientCallback):
    """FedNova's client half: counts the local optimizer steps of a fit and reports ||a||_1 (`normalized_steps`)."""

    def __init__(self) -> None:
        self._steps = 0
        self._momentum = 0.0

    @property
    def needs_epochs(self) -> bool:
        return False  # a fused fit's one batch carries its steps_per_batch updates: counted all the same

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps = 0
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        plain_heavy_ball = isinstance(optimizer, torch.optim.SGD) and not group.get("nesterov", False)
        self._momentum = float(group.get("momentum", 0.0)) if plain_heavy_ball else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += int(getattr(pl_module, "steps_per_batch", 1))

    def client_metrics(self) -> dict[str, float]:
        return {"local_steps": float(self._steps), "normalized_steps": momentum_step_norm(self._steps, self._momentum)}


class FedNova(Aggregator):
    diagnostic_keys = ("tau_eff",)

    def __init__(self, step_size: float = 1.0):
        require(step_size > 0, f"aggregator.step_size must be > 0, got {step_size}")
        self.step_size = float(step_size)
        self._counter = LocalStepCounter()
        self._tau_eff = float("nan")

    def client_callbacks(self) -> list[ClientCallback]:
        return [self._counter]

    def reset(self, global_params: Tensor) -> None:
        self._global = global_params
        self._normalized_sum = torch.zeros_like(global_params)  # sum_m N_m Delta_m / ||a_m||_1
        self._weighted_norms = 0.0  # sum_m N_m ||a_m||_1
        self._total_samples = 0

    def update(self, update: ClientUpdate) -> None:
        norm = update.metrics.get("normalized_steps")
        require(norm is not None, "aggregator=fednova needs each client's normalized_steps (its LocalStepCounter)")
        assert norm is not None
        if norm <= 0:  # a client that took no step moved nothing: it adds no direction and no steps
            return
        AF.accumulate_weighted(self._normalized_sum, update.delta, update.num_samples / norm)
        self._weighted_norms += update.num_samples * norm
        self._total_samples += update.num_samples

    def compute(self) -> Tensor:
        if self._total_samples == 0:
            return self._global
        self._tau_eff = self._weighted_norms / self._total_samples  # sum_m p_m ||a_m||_1
        return self._global + AF.mean_from_sum(
            self._normalized_sum, self._total_samples, self.step_size * self._tau_eff
        )

    def diagnostics(self) -> dict[str, float]:
        return {"tau_eff": self._tau_eff}
