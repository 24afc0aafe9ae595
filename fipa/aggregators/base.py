"""The aggregator interface: a server rule plus the client half it needs.

Streaming, as in FLSim: `reset` at the broadcast point, `update` once per arriving client, `compute` at the
end of the round. Clients are never held in memory together; only what the rule must keep (a running sum
for FedAvg, the low-rank factors for FIPA).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from fipa.client import ClientCallback, ClientUpdate
from fipa.parameters import FlatParameters


class Aggregator(ABC):
    #: Statistics each client must upload (keys of ClientUpdate.statistics); checked by the trainer.
    required_statistics: tuple[str, ...] = ()
    #: Keys `diagnostics()` reports, so metrics.csv keeps one header when a schedule switches rules.
    diagnostic_keys: tuple[str, ...] = ()

    def client_callbacks(self) -> list[ClientCallback]:
        """The rule's client half (e.g. a proximal term, a curvature estimator)."""
        return []

    def bind(self, flat: FlatParameters) -> None:
        """Learn the parameter layout once, before the first round (needed for per-parameter rules)."""

    def begin_round(self, round_idx: int) -> None:
        """The round about to start (1-based), before `reset`; rules that depend on it (e.g. a schedule) keep it."""

    def round_state(self) -> Any:
        """What the rule's client half needs this round, shipped with every job (after `begin_round`); None: nothing."""
        return None

    @abstractmethod
    def reset(self, global_params: Tensor) -> None:
        """Start a round at the broadcast point."""

    @abstractmethod
    def update(self, update: ClientUpdate) -> None:
        """Fold one client's upload into the round's state."""

    @abstractmethod
    def compute(self) -> Tensor:
        """The new global parameters (the broadcast point if no client arrived)."""

    def diagnostics(self) -> dict[str, float]:
        """Per-round numbers worth logging (e.g. curvature ranks); the same keys every round."""
        return {}

    def state_dict(self) -> dict:
        """State that must survive a checkpoint (kept across rounds); the built-in rules keep none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
