"""Where the clients of a round train: in this process (`executor=sequential`) or on Ray workers (`executor=ray`).

An executor runs jobs `(client_id, client_states)` through a `ClientRunner` (the worker seam) and yields
`(client_id, (update, new_client_states))`, or `(client_id, exception)` for a client that failed, in the jobs'
order. The round loop streams them into the aggregator as they come; the order makes the aggregate, and so
the whole run, bit-identical between executors for the same seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fipa.errors import ConfigError, require

if TYPE_CHECKING:
    from fipa.runner import ClientRunner

log = logging.getLogger("fipa")

Job = tuple[int, list[Any]]


class RoundLoop(Protocol):
    """What an executor hosts: the server's round loop (fipa.federated_trainer.FederatedTrainer, a layer above)."""

    def fit(self) -> dict[str, Any]: ...


class Executor:
    config: dict[str, Any] | None = None  # the resolved run config (remote workers build their runners from it)
    runner: ClientRunner | None = None  # the driver's own runner (clients that train in this process use it)

    def bind(self, config: dict[str, Any], runner: ClientRunner) -> None:
        """Called by fipa.train.build before the run."""
        self.config, self.runner = config, runner

    def host(self, trainer: RoundLoop) -> dict[str, Any]:
        """Run the round loop (`trainer.fit`) where this executor's clients can be reached; returns its summary.
        Here, in this process; executor=flower runs it inside a Flower ServerApp."""
        return trainer.fit()

    def start(self) -> None:
        """Called by FederatedTrainer.fit before the first round."""

    def run(
        self,
        round_idx: int,
        global_params: torch.Tensor,
        round_states: list[Any],
        jobs: list[Job],
        aggregator_state: Any = None,
    ) -> Iterator[tuple[int, Any]]:
        """Train the round's jobs; yield (client, (update, client states) or the client's exception) in job order.
        `round_states` are the client methods' round states, `aggregator_state` what the rule's client half needs."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release workers at the end of a run (also after a failure)."""


class SequentialExecutor(Executor):
    """One client after another in this process, on the driver's ClientRunner (the default)."""

    def run(self, round_idx, global_params, round_states, jobs, aggregator_state=None):
        runner = self.runner
        if runner is None:
            raise ConfigError("executor=sequential needs the driver's ClientRunner (fipa.train.build binds it)")
        for client_id, client_states in jobs:
            outcome: Any
            try:
                outcome = runner.train(
                    client_id, round_idx, global_params, round_states, client_states, aggregator_state
                )
            except Exception as error:
                outcome = error
            yield client_id, outcome


class ClientWorker:
    """A Ray actor: builds its own ClientRunner from the run config once, then trains whichever clients it is sent
    (their client-method state travels with the job)."""

    def __init__(self, config: dict[str, Any]):
        from fipa.runner import ClientRunner

        self.runner = ClientRunner.from_config(config)

    def ready(self) -> bool:
        return True

    def train(self, client_id, round_idx, global_params, round_states, client_states, aggregator_state=None):
        update, states = self.runner.train(
            client_id, round_idx, global_params, round_states, client_states, aggregator_state
        )
        # results travel as host tensors: the driver may have no GPU, or another one
        cpu = [state.cpu() if isinstance(state, torch.Tensor) else state for state in states]
        return update.to("cpu"), cpu


class RayExecutor(Executor):
    """Clients of a round train in parallel on `num_workers` Ray actors.

    Locally it starts Ray with `num_workers * cpus_per_worker` CPUs; with `address` (e.g. "ray://head:10001" or
    "auto") it joins an existing cluster, whose nodes need fipa installed and the data at the same paths.
    Each worker holds one copy of the task's data (not one per client). The global parameters are put in
    Ray's object store once per round; a worker that dies fails only its client (counted in clients_failed).
    `gpus_per_worker` (fractional, e.g. 0.25) lets several workers share one GPU, so a round's clients train
    concurrently on it; with trainer.accelerator=gpu each worker needs a share.
    """

    def __init__(
        self,
        num_workers: int = 2,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
    ):
        require(num_workers >= 1, f"executor.num_workers must be >= 1, got {num_workers}")
        require(cpus_per_worker > 0, f"executor.cpus_per_worker must be > 0, got {cpus_per_worker}")
        require(gpus_per_worker >= 0, f"executor.gpus_per_worker must be >= 0, got {gpus_per_worker}")
        self.num_workers, self.address = num_workers, address
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.workers: list[Any] = []
        self._started_ray = False

    def bind(self, config: dict[str, Any], runner: ClientRunner) -> None:
        accelerator = config.get("trainer", {}).get("accelerator", "cpu")
        require(
            not (accelerator in ("gpu", "cuda") and self.gpus_per_worker == 0),
            f"trainer.accelerator={accelerator} with executor=ray needs executor.gpus_per_worker > 0 (e.g. 0.25 for "
            "four workers per GPU): Ray hides the GPUs from workers that asked for none",
        )
        super().bind(config, runner)

    def start(self) -> None:
        if self.workers:  # already started (e.g. by a benchmark timing the start-up apart)
            return
        require(self.config is not None, "executor=ray needs the run config (fipa.train.build binds it)")
        try:
            import ray
        except ImportError:
            raise ConfigError("executor=ray needs Ray: pip install 'ray>=2.9'") from None
        if not ray.is_initialized():
            # Ray renices its workers to 15; on a shared machine they would then starve behind the driver and
            # any other job, so a local Ray keeps them at normal priority (set RAY_worker_niceness to override).
            os.environ.setdefault("RAY_worker_niceness", "0")
            local: dict[str, Any] = (
                {} if self.address else {"num_cpus": int(max(1, round(self.num_workers * self.cpus_per_worker)))}
            )
            ray.init(
                address=self.address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                **local,
            )
            self._started_ray = True
        self._worker_class = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker)(ClientWorker)
        self.workers = [self._worker_class.remote(self.config) for _ in range(self.num_workers)]
        ray.get([worker.ready.remote() for worker in self.workers])  # start-up is not round time

    def run(self, round_idx, global_params, round_states, jobs, aggregator_state=None):
        import ray

        host_states = [state.cpu() if isinstance(state, torch.Tensor) else state for state in round_states]
        params_ref, states_ref = ray.put(global_params.cpu()), ray.put(host_states)
        idle, running, finished = list(self.workers), {}, {}
        submitted = yielded = 0
        while yielded < len(jobs):
            while idle and submitted < len(jobs):  # keep every worker busy
                worker = idle.pop()
                client_id, client_states = jobs[submitted]
                ref = worker.train.remote(client_id, round_idx, params_ref, states_ref, client_states, aggregator_state)
                running[ref] = (submitted, worker)
                submitted += 1
            (done,), _ = ray.wait(list(running), num_returns=1)
            position, worker = running.pop(done)
            try:
                finished[position] = ray.get(done)
                idle.append(worker)
            except ray.exceptions.RayTaskError as error:  # the client raised: report its own exception
                finished[position] = error.cause if isinstance(error.cause, Exception) else RuntimeError(str(error))
                idle.append(worker)
            except ray.exceptions.RayActorError as error:  # the worker died: replace it
                finished[position] = RuntimeError(f"Ray worker died: {error}")
                idle.append(self._replace(worker))
            while yielded in finished:  # hand results over in job order, as soon as the order allows
                yield jobs[yielded][0], finished.pop(yielded)
                yielded += 1

    def _replace(self, dead):
        index = self.workers.index(dead)
        self.workers[index] = self._worker_class.remote(self.config)
        return self.workers[index]

    def shutdown(self) -> None:
        if not self.workers:
            return
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
