"""The server loop: sample clients, broadcast, let the executor train them (each through the worker seam,
`fipa.runner.ClientRunner`), stream their uploads into the aggregator, set the new global model, evaluate, log."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from fipa.aggregators.base import Aggregator
from fipa.client import ClientCallback
from fipa.components import Components, Phase, phase_of
from fipa.config import FederationConfig
from fipa.errors import ConfigError, require
from fipa.executors import Executor
from fipa.parameters import FlatParameters
from fipa.seeding import DROPOUT, SAMPLING, numpy_rng
from fipa.server_optimizers import ServerOptimizer, ServerSGD
from fipa.tasks.base import FederatedTask

log = logging.getLogger(__name__)


class Recorder(Protocol):
    def log_round(self, row: dict[str, Any]) -> None: ...
    def restore(self, rows: list[dict[str, Any]]) -> None: ...  # a resumed run's rounds so far
    def finish(self, summary: dict[str, Any]) -> None: ...


@dataclass
class RoundPlan:
    """One round in flight: who trains, what their jobs ship, and what their uploads have added up to so far."""

    round_idx: int
    phase: Phase
    sampled: list[int]  # before dropout
    round_states: list[Any]  # the client methods' round states (e.g. SCAFFOLD's server control)
    jobs: list[tuple[int, list[Any]]]  # (client, its client-method states), in the order results are absorbed
    aggregator_state: Any  # what the rule's client half needs this round
    device: torch.device  # the global model's: uploads from workers elsewhere move here
    uploaded: dict[str, int] = field(default_factory=dict)  # bytes by kind
    client_metrics: list[dict[str, float]] = field(default_factory=list)
    failed: int = 0


class FederatedTrainer:
    def __init__(
        self,
        task: FederatedTask,
        model: torch.nn.Module,
        flat: FlatParameters,
        phases: list[Phase],
        federation: FederationConfig,
        executor: Executor,
        client_methods: list[ClientCallback] | None = None,
        recorders: list[Recorder] | None = None,
        seed: int = 0,
        show_progress: bool | None = None,
        output_dir: str | Path | None = None,
        server_optimizer: ServerOptimizer | None = None,
    ):
        per_round = federation.clients_per_round
        require(
            per_round is None or 1 <= per_round <= task.num_clients,
            f"federation.clients_per_round must be between 1 and the number of clients ({task.num_clients}), "
            f"got {per_round}",
        )
        self.task, self.model, self.flat = task, model, flat  # the global model: evaluated and saved here
        self.phases = phases
        self.server_optimizer = server_optimizer or ServerSGD()  # moves the model along each round's proposal
        self.client_methods = list(client_methods or [])  # their server side: controls, previous models, ...
        self.federation = federation
        self.executor = executor  # where clients train: this process, or Ray workers
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.first_round = 1
        self.history: list[dict[str, Any]] = []  # every round's metrics row, saved with checkpoints
        self.clock = {"elapsed_s": 0.0, "wall_s": 0.0}  # carried over by resume
        self.recorders = list(recorders or [])
        self.seed = seed
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.bytes_per_param = self.flat.get().dtype.itemsize

    @classmethod
    def from_components(cls, parts: Components, executor: Executor | None = None, **kwargs) -> FederatedTrainer:
        """The server loop over a run's parts; without an executor, clients train in this process."""
        if executor is None:
            from fipa.executors import SequentialExecutor
            from fipa.runner import ClientRunner

            executor = SequentialExecutor()
            executor.bind({}, ClientRunner.from_components(parts))
        return cls(
            parts.task,
            parts.module.model,
            parts.flat,
            parts.phases,
            parts.federation,
            executor,
            client_methods=parts.client_methods,
            seed=parts.seed,
            server_optimizer=parts.server_optimizer,
            **kwargs,
        )

    def phase(self, round_idx: int) -> Phase:
        return phase_of(self.phases, round_idx)

    @property
    def aggregator(self) -> Aggregator:
        """The first phase's server rule (the only one unless a schedule switches)."""
        return self.phases[0].aggregator

    def sample_clients(self, round_idx: int) -> list[int]:
        per_round = self.federation.clients_per_round or self.task.num_clients
        if per_round == self.task.num_clients:
            return list(range(per_round))
        chosen = numpy_rng(self.seed, SAMPLING, round_idx).choice(self.task.num_clients, per_round, replace=False)
        return sorted(int(c) for c in chosen)

    def drop_out(self, round_idx: int, clients: list[int]) -> list[int]:
        """The sampled clients that stay in the round: each drops with federation.dropout_prob (seeded)."""
        if self.federation.dropout_prob == 0:
            return clients
        stays = numpy_rng(self.seed, DROPOUT, round_idx).random(len(clients)) >= self.federation.dropout_prob
        return [c for c, stay in zip(clients, stays) if stay]

    def run_round(self, round_idx: int, global_params: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        plan = self.begin_round(round_idx, global_params)
        # Results arrive in client order whatever the executor, so the streamed aggregate is bit-identical.
        outcomes = self.executor.run(round_idx, global_params, plan.round_states, plan.jobs, plan.aggregator_state)
        for client_id, outcome in outcomes:
            self.absorb(plan, client_id, outcome)
        return self.end_round(plan, global_params)

    def begin_round(self, round_idx: int, global_params: torch.Tensor) -> RoundPlan:
        """Sample the round's clients, start the rule at the broadcast point and gather what every job ships."""
        sampled = self.sample_clients(round_idx)
        clients = self.drop_out(round_idx, sampled)
        phase = self.phase(round_idx)
        phase.aggregator.begin_round(round_idx)
        phase.aggregator.reset(global_params)
        for method in self.client_methods:
            method.on_round_start(round_idx, self.task.num_clients)
        return RoundPlan(
            round_idx=round_idx,
            phase=phase,
            sampled=sampled,
            round_states=[method.round_state() for method in self.client_methods],
            jobs=[(c, [method.client_state(c) for method in self.client_methods]) for c in clients],
            aggregator_state=phase.aggregator.round_state(),
            device=global_params.device,
        )

    def absorb(self, plan: RoundPlan, client_id: int, outcome: Any) -> None:
        """Stream one client's outcome (its update and new client states, or its exception) into the round."""
        round_idx = plan.round_idx
        if isinstance(outcome, Exception):  # one faulty client must not end a long run
            log.warning(
                "round %d: client %d failed (%s: %s); left out of the round",
                round_idx,
                client_id,
                type(outcome).__name__,
                outcome,
            )
            plan.failed += 1
            return
        update, client_states = outcome
        if update.delta.device != plan.device:  # from a worker on another device
            update = update.to(plan.device)
        if not update.is_finite():
            log.warning("round %d: client %d returned non-finite values; left out of the round", round_idx, client_id)
            plan.failed += 1
            return
        for method, client_state in zip(self.client_methods, client_states):
            method.on_client_result(client_id, update, client_state)
        for kind, size in update.payload_bytes().items():
            plan.uploaded[kind] = plan.uploaded.get(kind, 0) + size
        plan.client_metrics.append(update.metrics)
        plan.phase.aggregator.update(update)

    def end_round(self, plan: RoundPlan, global_params: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The rule's proposal, applied by the server optimizer, and the round's metrics row."""
        phase, aggregator, client_metrics = plan.phase, plan.phase.aggregator, plan.client_metrics
        start = time.perf_counter()
        new_params = global_params
        if not client_metrics:
            log.warning("round %d: no client returned an update; keeping the previous model", plan.round_idx)
        else:
            proposed = aggregator.compute()
            if torch.isfinite(proposed).all():
                new_params = (phase.server_optimizer or self.server_optimizer).step(global_params, proposed)
                for method in self.client_methods:
                    new_params = method.on_round_end(new_params)
            else:  # neither the model nor the server optimizer's state take a non-finite proposal
                log.warning(
                    "round %d: aggregation produced non-finite parameters; keeping the previous model", plan.round_idx
                )
        aggregate_s = time.perf_counter() - start

        clients = len(plan.jobs)
        row: dict[str, Any] = {
            "clients": clients,
            "clients_dropped": len(plan.sampled) - clients,
            "clients_failed": plan.failed,
            "train_loss": _mean(m.get("train_loss") for m in client_metrics),
            "curvature_s": sum(m.get("curvature_s", 0.0) for m in client_metrics),
            "aggregate_s": aggregate_s,
            "bytes_up": sum(plan.uploaded.values()),
            "bytes_down": clients * self.flat.numel * self.bytes_per_param,
        }
        for kind in sorted({"update", *(k for p in self.phases for k in p.aggregator.required_statistics)}):
            row[f"bytes_up_{kind}"] = plan.uploaded.get(kind, 0)
        row["phase"] = self.phases.index(phase)
        row.update(_diagnostics_of_every_phase(self.phases, aggregator))
        return new_params, row

    # Checkpoints: the global model, the round, the client methods' and aggregators' state (e.g. SCAFFOLD
    # controls), the clocks, the RNG states and the metrics so far: everything `resume` needs.
    def save_checkpoint(self, round_idx: int, global_params: torch.Tensor) -> Path:
        require(self.output_dir is not None, "checkpoints need the run's output directory")
        directory = Path(str(self.output_dir)) / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "round": round_idx,
            "global_params": global_params,
            "parameter_names": self.flat.names,
            "client_methods": [method.state_dict() for method in self.client_methods],
            "aggregators": [phase.aggregator.state_dict() for phase in self.phases],
            "server_optimizer": self.server_optimizer.state_dict(),
            "phase_server_optimizers": [
                None if phase.server_optimizer is None else phase.server_optimizer.state_dict() for phase in self.phases
            ],
            "clock": dict(self.clock),
            "rng": rng_states(),
            "metrics": self.history,
        }
        path = directory / f"round_{round_idx}.pt"
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # never a half-written checkpoint
        return path

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Start from a saved round: the next round is round + 1 (lr decay and phases continue from there)."""
        state = load_checkpoint_file(path)
        require(
            state["parameter_names"] == self.flat.names,
            f"checkpoint {path} holds parameters of another model ({len(state['parameter_names'])} tensors)",
        )
        self.flat.set(state["global_params"])
        for method, method_state in zip(self.client_methods, state["client_methods"]):
            if method_state:
                method.load_state_dict(method_state)
        self.first_round = int(state["round"]) + 1
        return state

    def resume(self, path: str | Path) -> int:
        """Continue an interrupted run from its checkpoint: the model and client state as `load_checkpoint`, plus
        the aggregators, clocks, RNG states and the metrics rows so far (recorders get them back). Returns the
        checkpoint's round; the run then ends exactly as an uninterrupted one would."""
        state = self.load_checkpoint(path)
        require(
            "metrics" in state, f"checkpoint {path} predates resume support (format {state['format']}); use init_from"
        )
        for phase, aggregator_state in zip(self.phases, state["aggregators"]):
            phase.aggregator.load_state_dict(aggregator_state)
        self.server_optimizer.load_state_dict(state.get("server_optimizer", {}))  # none before the seam existed
        for phase, optimizer_state in zip(self.phases, state.get("phase_server_optimizers", [])):
            if phase.server_optimizer is not None and optimizer_state is not None:
                phase.server_optimizer.load_state_dict(optimizer_state)
        self.clock = dict(state["clock"])
        set_rng_states(state["rng"])
        self.history = [dict(row) for row in state["metrics"]]
        for recorder in self.recorders:
            recorder.restore(self.history)
        return int(state["round"])

    def fit(self) -> dict[str, Any]:
        fed = self.federation
        global_params = self.flat.get()
        # accumulated round time: curvature + local training + aggregation (the budget clock)
        elapsed = self.clock["elapsed_s"]
        wall_start = time.perf_counter() - self.clock["wall_s"]
        last_eval: dict[str, float] = self.task.evaluate(self.model)
        rounds_done = 0
        status = "running"
        self.executor.start()  # before the progress bar: a worker that cannot start leaves nothing open
        progress = tqdm(total=fed.rounds, desc="rounds", disable=not self.show_progress, dynamic_ncols=True)
        log_every = max(1, fed.rounds // 10)  # ten log lines per run, whatever its length
        try:
            for round_idx in range(self.first_round, fed.rounds + 1):
                start = time.perf_counter()
                global_params, row = self.run_round(round_idx, global_params)
                self.flat.set(global_params)
                round_s = time.perf_counter() - start
                elapsed += round_s
                rounds_done = round_idx
                budget_spent = fed.time_budget_s is not None and elapsed >= fed.time_budget_s
                evaluated = round_idx % fed.eval_every == 0 or round_idx == fed.rounds or budget_spent
                if evaluated:
                    last_eval = self.task.evaluate(self.model)
                row = {
                    "round": round_idx,
                    "elapsed_s": elapsed,
                    "round_s": round_s,
                    # a round that was not evaluated leaves its test metrics empty, never a stale copy
                    **(last_eval if evaluated else dict.fromkeys(last_eval, float("nan"))),
                    **row,
                    "wall_s": time.perf_counter() - wall_start,
                }
                self.history.append(row)
                for recorder in self.recorders:
                    recorder.log_round(row)
                self.clock = {"elapsed_s": elapsed, "wall_s": row["wall_s"]}
                if fed.checkpoint_every and round_idx % fed.checkpoint_every == 0 and self.output_dir is not None:
                    self.save_checkpoint(round_idx, global_params)
                progress.update(1)
                progress.set_postfix({self.task.metric: f"{last_eval[self.task.metric]:.3e}"}, refresh=False)
                if round_idx % log_every == 0 or budget_spent:
                    log.info(
                        "round %d/%d  %s=%.4e  elapsed_s=%.1f",
                        round_idx,
                        fed.rounds,
                        self.task.metric,
                        last_eval[self.task.metric],
                        elapsed,
                    )
                if budget_spent:
                    log.info("time budget of %.1f s spent after %d rounds", fed.time_budget_s, round_idx)
                    break
            status = "completed"
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("interrupted after %d rounds; metrics so far are saved", rounds_done)
        finally:
            progress.close()
            self.executor.shutdown()
        summary = {
            "status": status,
            "rounds_completed": rounds_done,
            "elapsed_s": elapsed,
            "wall_time_s": time.perf_counter() - wall_start,
            "metric": self.task.metric,
            **last_eval,
        }
        return summary


CHECKPOINT_FORMAT = "fipa-checkpoint-2"
READABLE_FORMATS = ("fipa-checkpoint-1", CHECKPOINT_FORMAT)  # format 1 (no resume state) still loads for init_from


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch, numpy, random), in types that weights_only loading accepts.

    fipa itself draws from per-(seed, stream, round, client) generators, so these only matter for user code
    that uses the global generators; they are saved so that resume is exact for it too.
    """
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": {"version": version, "internal": list(internal), "gauss": python_gauss},
    }


def set_rng_states(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's checkpoint with the highest round, or None."""
    paths = Path(run_dir).glob("checkpoints/round_*.pt")
    numbered = [(int(p.stem.removeprefix("round_")), p) for p in paths if p.stem.removeprefix("round_").isdigit()]
    return max(numbered)[1] if numbered else None


def load_checkpoint_file(path: str | Path) -> dict:
    """Safe loading (weights_only): a missing, truncated or foreign file gives one clear ConfigError."""
    path = Path(path)
    require(path.is_file(), f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt archives
        raise ConfigError(
            f"checkpoint {path} cannot be read ({type(error).__name__}): truncated or not a checkpoint"
        ) from None
    require(
        isinstance(state, dict) and state.get("format") in READABLE_FORMATS,
        f"{path} is not a fipa checkpoint (expected format {CHECKPOINT_FORMAT})",
    )
    return state


def _diagnostics_of_every_phase(phases: list[Phase], active: Aggregator) -> dict[str, float]:
    """The active aggregator's diagnostics, with NaN for the keys only other phases report (stable CSV header)."""
    keys = {k: float("nan") for p in phases if p.aggregator is not active for k in p.aggregator.diagnostic_keys}
    return {**keys, **active.diagnostics()}


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")
