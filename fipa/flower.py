"""Flower interop (flwr >= 1.20, the message API): fipa's server loop on a Flower `Grid`, fipa clients as a `ClientApp`.

- `FipaStrategy` is a Flower strategy around fipa's server half (`FederatedTrainer`): any aggregator (FIPA
  included), any server optimizer and any client method. `configure_train` ships the global parameters, the
  round and the client methods' round state (e.g. SCAFFOLD's server control); `aggregate_train` streams each
  reply into the aggregator (reset / update / compute) and applies the server optimizer. Its `start` runs fipa's
  own round loop over the grid, so checkpoints, resume, time budgets, evaluation on the task's test set and the
  `metrics.csv` columns are those of `fipa-train`; bytes_up counts the records actually received.
- `client_app(config)` is a `ClientApp` that trains the client of its node's `partition-id` through the worker
  seam (`ClientRunner`): Lightning, callbacks and curvature run unchanged. It replies with the update and the
  client statistics (e.g. FIPA's eigenvectors and eigenvalues, each a named array). A client method's own state
  (SCAFFOLD's c_i, MOON's previous model) stays in the node's `Context`; only a method whose server half needs
  it (FedDyn's h is the mean of all client states) uploads it.
- `executor=flower` (`FlowerExecutor`) runs `fipa-train` on Flower's simulation engine, one virtual SuperNode per
  client; `server_app()` / `client_app()` without a config are the apps of a real deployment (`flwr run`),
  composed from the run config's `overrides` (see examples/flower).

Every job and reply travels as records: tensors in `ArrayRecord`s (float64 and float32 round-trip exactly),
everything else as JSON in a `ConfigRecord`. Jobs go out and results come back in client order, so a run
through Flower computes what `fipa-train` computes: same seed, same numbers.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fipa.client import ClientUpdate
from fipa.errors import ConfigError, require
from fipa.executors import Executor, RoundLoop

if TYPE_CHECKING:
    from fipa.federated_trainer import FederatedTrainer, RoundPlan
    from fipa.runner import ClientRunner

log = logging.getLogger("fipa")

TRAIN, QUERY = "train", "query"  # message types: train one client; ask a node which partition it holds
PARTITION_ID = "partition-id"  # the node_config key naming a node's client (Flower's convention)

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError:  # fipa works without Flower; the classes below need it
    Strategy = object  # type: ignore[assignment,misc]


def _require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("Flower is not installed: pip install 'fipa[flower]' (flwr[simulation]>=1.20)") from None


# ------------------------------------------------------------------------------- fipa values <-> Flower records


def pack(value: Any, arrays: ArrayRecord, path: str = "v") -> Any:
    """A JSON-able skeleton of `value` (tensors, None, numbers, strings, lists and str-keyed dicts of them); its
    tensors go into `arrays` under their path in the value, e.g. `v.0.control`."""
    if isinstance(value, torch.Tensor):
        arrays[path] = Array(value.detach().cpu().contiguous())
        return {"tensor": path}
    if isinstance(value, dict):
        require(all(isinstance(k, str) for k in value), f"only str-keyed dicts travel as records, got {list(value)}")
        return {"dict": {k: pack(v, arrays, f"{path}.{k}") for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [pack(v, arrays, f"{path}.{i}") for i, v in enumerate(value)]}
    require(
        value is None or isinstance(value, (bool, int, float, str)),
        f"a {type(value).__name__} cannot travel as a Flower record",
    )
    return {"value": value}


def unpack(skeleton: Any, arrays: ArrayRecord) -> Any:
    """The value `pack` took apart."""
    (kind, content), *_ = skeleton.items()
    if kind == "tensor":
        return torch.from_numpy(arrays[content].numpy().copy())
    if kind == "dict":
        return {k: unpack(v, arrays) for k, v in content.items()}
    if kind == "list":
        return [unpack(v, arrays) for v in content]
    return content


def _as_int(value: Any) -> int:
    """A record's integer (records type their values as a union of scalars and lists)."""
    return int(value)


def _packed_record(value: Any) -> tuple[ArrayRecord, ConfigRecord]:
    arrays = ArrayRecord()
    return arrays, ConfigRecord({"skeleton": json.dumps(pack(value, arrays))})


def _unpacked_record(arrays: ArrayRecord, config: ConfigRecord) -> Any:
    return unpack(json.loads(str(config["skeleton"])), arrays)


def job_content(
    round_idx: int, client_id: int, global_params: torch.Tensor, round_states: list[Any], aggregator_state: Any
) -> RecordDict:
    """A training job: the global parameters, and the round's state for the client methods and the rule's client
    half. The client's own state is not in it: it lives on the client."""
    arrays, state = _packed_record({"round_states": list(round_states), "aggregator_state": aggregator_state})
    state["round"], state["client"] = round_idx, client_id
    return RecordDict(
        {"global": ArrayRecord({"params": Array(global_params.detach().cpu())}), "job": state, "job.arrays": arrays}
    )


def read_job(content: RecordDict) -> tuple[int, int, torch.Tensor, list[Any], Any]:
    """(round, client, global parameters, round states, aggregator state) of a job."""
    config = content.config_records["job"]
    shipped = _unpacked_record(content.array_records["job.arrays"], config)
    global_params = torch.from_numpy(content.array_records["global"]["params"].numpy().copy())
    return (
        _as_int(config["round"]),
        _as_int(config["client"]),
        global_params,
        shipped["round_states"],
        shipped["aggregator_state"],
    )


def reply_content(update: ClientUpdate, uploaded_states: list[Any]) -> RecordDict:
    """A client's reply: its update, each statistic as a named array beside it, its metrics (with Flower's
    `num-examples`), and the client-method states its server halves need (None for the others)."""
    arrays, client = _packed_record(uploaded_states)
    client["client"] = update.client_id
    metrics = MetricRecord({**{k: float(v) for k, v in update.metrics.items()}, "num-examples": update.num_samples})
    statistics = ArrayRecord({kind: Array(value.detach().cpu()) for kind, value in update.statistics.items()})
    return RecordDict(
        {
            "update": ArrayRecord({"delta": Array(update.delta.detach().cpu())}),
            "statistics": statistics,
            "metrics": metrics,
            "client": client,
            "client.arrays": arrays,
        }
    )


def read_reply(content: RecordDict) -> tuple[ClientUpdate, list[Any]]:
    """The update (its upload counted in bytes as received, array headers included) and the uploaded states."""
    update_record, statistics = content.array_records["update"], content.array_records["statistics"]
    metrics = dict(content.metric_records["metrics"])
    num_samples = _as_int(metrics.pop("num-examples"))
    update = ClientUpdate(
        client_id=_as_int(content.config_records["client"]["client"]),
        num_samples=num_samples,
        delta=torch.from_numpy(update_record["delta"].numpy().copy()),
        statistics={kind: torch.from_numpy(array.numpy().copy()) for kind, array in statistics.items()},
        metrics={k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
        wire_bytes={"update": len(update_record["delta"].data), **{k: len(a.data) for k, a in statistics.items()}},
    )
    return update, _unpacked_record(content.array_records["client.arrays"], content.config_records["client"])


# -------------------------------------------------------------------------------------------------- server side


def partition_nodes(grid: Grid, num_clients: int, timeout_s: float = 120.0) -> dict[int, int]:
    """Client (partition id) -> node id, asked of every connected node; waits up to `timeout_s` for all
    `num_clients` partitions (SuperNodes connect in their own time)."""
    deadline = time.monotonic() + timeout_s
    nodes: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        new = [node for node in grid.get_node_ids() if node not in asked]
        queries = [Message(RecordDict(), dst_node_id=node, message_type=QUERY) for node in new]
        for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())) if queries else []:
            asked.add(reply.metadata.src_node_id)
            if reply.has_error():
                raise ConfigError(f"node {reply.metadata.src_node_id} could not say its partition: {reply.error}")
            partition = _as_int(reply.content.config_records["node"][PARTITION_ID])
            require(
                0 <= partition < num_clients and partition not in nodes,
                f"node {reply.metadata.src_node_id} holds partition {partition}: the task has partitions "
                f"0..{num_clients - 1}, each on one node (taken: {sorted(nodes)})",
            )
            nodes[partition] = reply.metadata.src_node_id
        if len(nodes) == num_clients:
            return nodes
        if time.monotonic() > deadline:
            missing = sorted(set(range(num_clients)) - set(nodes))
            raise ConfigError(f"no node holds partition(s) {missing} after {timeout_s:.0f} s; {len(nodes)} connected")
        time.sleep(0.2)


class FipaStrategy(Strategy):
    """fipa's server half as a Flower strategy: any aggregator, server optimizer and client method.

    Built around a `FederatedTrainer` (e.g. `fipa.train.build`); `start(grid, ...)` runs its round loop, whose
    clients train on the grid's nodes. `configure_train` / `aggregate_train` are the same round in Flower's
    two halves, for a ServerApp that drives rounds itself.
    """

    def __init__(self, trainer: FederatedTrainer, timeout_s: float = 3600.0):
        _require_flower()
        self.trainer, self.timeout_s = trainer, timeout_s
        self.nodes: dict[int, int] = {}  # client -> node
        self._plan: RoundPlan | None = None
        self._global: torch.Tensor | None = None

    def connect(self, grid: Grid, timeout_s: float = 120.0) -> None:
        """Learn which node holds which client (the nodes say their partition-id)."""
        self.nodes = partition_nodes(grid, self.trainer.task.num_clients, timeout_s)

    # --- a round in Flower's halves
    def train_messages(self, round_idx: int, global_params, round_states, jobs, aggregator_state) -> list[Message]:
        require(bool(self.nodes), "FipaStrategy.connect(grid) first: which node holds which client is unknown")
        return [
            Message(
                job_content(round_idx, client_id, global_params, round_states, aggregator_state),
                dst_node_id=self.nodes[client_id],
                message_type=TRAIN,
            )
            for client_id, _ in jobs
        ]

    def outcomes(self, jobs, replies: Iterable[Message]) -> Iterator[tuple[int, Any]]:
        """(client, (update, uploaded states) or exception) in job order; a client without a reply failed."""
        by_node = {reply.metadata.src_node_id: reply for reply in replies}
        for client_id, _ in jobs:
            reply = by_node.get(self.nodes[client_id])
            if reply is None:
                yield client_id, TimeoutError(f"no reply within {self.timeout_s:.0f} s")
            elif reply.has_error():
                yield client_id, RuntimeError(f"the client app failed: {reply.error.reason}")
            else:
                yield client_id, read_reply(reply.content)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if not self.nodes:
            self.connect(grid)
        self._global = self.trainer.flat.get()
        plan = self._plan = self.trainer.begin_round(server_round, self._global)
        return self.train_messages(server_round, self._global, plan.round_states, plan.jobs, plan.aggregator_state)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        plan, global_params = self._plan, self._global
        require(plan is not None and global_params is not None, "aggregate_train before configure_train")
        assert plan is not None and global_params is not None  # for mypy
        for client_id, outcome in self.outcomes(plan.jobs, replies):
            self.trainer.absorb(plan, client_id, outcome)
        new_params, row = self.trainer.end_round(plan, global_params)
        self.trainer.flat.set(new_params)
        numbers: dict[str, Any] = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        return ArrayRecord({"params": Array(new_params.detach().cpu())}), MetricRecord(numbers)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return []  # the global model is evaluated on the task's test set, on the server

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return None

    def summary(self) -> None:
        phases = ", ".join(type(p.aggregator).__name__ for p in self.trainer.phases)
        log.info("FipaStrategy: %s; %d clients", phases, self.trainer.task.num_clients)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None, **_):  # type: ignore[override]
        """fipa's round loop (`FederatedTrainer.fit`) with the clients on the grid's nodes; returns fit's summary.
        The initial model and the number of rounds are the run config's unless given."""
        if initial_arrays is not None:
            self.trainer.flat.set(torch.from_numpy(initial_arrays["params"].numpy().copy()))
        if num_rounds is not None:
            self.trainer.federation.rounds = num_rounds
        executor = GridExecutor(self, grid)
        self.trainer.executor = executor
        return self.trainer.fit()


class GridExecutor(Executor):
    """Jobs as messages over a Flower grid (what `FipaStrategy.start` gives the round loop)."""

    def __init__(self, strategy: FipaStrategy, grid: Grid):
        self.strategy, self.grid = strategy, grid

    def start(self) -> None:
        if not self.strategy.nodes:
            self.strategy.connect(self.grid)

    def run(self, round_idx, global_params, round_states, jobs, aggregator_state=None):
        messages = self.strategy.train_messages(round_idx, global_params, round_states, jobs, aggregator_state)
        replies = self.grid.send_and_receive(messages, timeout=self.strategy.timeout_s)
        yield from self.strategy.outcomes(jobs, replies)


class FlowerExecutor(Executor):
    """`executor=flower`: the run on Flower's simulation engine, one virtual SuperNode per client.

    The round loop runs inside a Flower ServerApp (`host`), and every client trains in a Flower ClientApp on
    the simulation's Ray backend, `cpus_per_client` CPUs each (`num_cpus` in all; null: one per client slot).
    """

    def __init__(
        self,
        num_cpus: int | None = None,
        cpus_per_client: float = 1.0,
        gpus_per_client: float = 0.0,
        timeout_s: float = 3600.0,
    ):
        require(cpus_per_client > 0, f"executor.cpus_per_client must be > 0, got {cpus_per_client}")
        require(num_cpus is None or num_cpus >= 1, f"executor.num_cpus must be >= 1, got {num_cpus}")
        self.num_cpus, self.cpus_per_client, self.gpus_per_client = num_cpus, cpus_per_client, gpus_per_client
        self.timeout_s = timeout_s

    def host(self, trainer: RoundLoop) -> dict[str, Any]:
        _require_flower()
        from flwr.simulation import run_simulation

        from fipa.federated_trainer import FederatedTrainer

        # Flower drives the round's two halves (begin_round / end_round), so it needs the server loop itself
        require(isinstance(trainer, FederatedTrainer), "executor=flower hosts a fipa FederatedTrainer")
        assert isinstance(trainer, FederatedTrainer)  # for mypy

        require(self.config is not None, "executor=flower needs the run config (fipa.train.build binds it)")
        assert self.config is not None  # for mypy
        strategy = FipaStrategy(trainer, self.timeout_s)
        outcome: dict[str, Any] = {}
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                outcome["summary"] = strategy.start(grid)
            except BaseException as error:  # re-raised in the caller's thread, not swallowed by Flower
                outcome["error"] = error

        slots = self.num_cpus or max(1, int((os.cpu_count() or 1) // self.cpus_per_client))
        backend: dict[str, Any] = {
            "client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": self.gpus_per_client},
            "init_args": {"num_cpus": int(max(self.cpus_per_client, slots)), "logging_level": "ERROR"},
        }
        logging.getLogger("flwr").setLevel(logging.WARNING)  # fipa logs the rounds itself
        os.environ.setdefault("RAY_worker_niceness", "0")  # as executor=ray: niced workers starve on a busy machine
        run_simulation(app, client_app(self.config), trainer.task.num_clients, backend_config=backend)
        if "error" in outcome:
            raise outcome["error"]
        require("summary" in outcome, "Flower's simulation ended without running the ServerApp (see its log above)")
        return outcome["summary"]

    def run(self, round_idx, global_params, round_states, jobs, aggregator_state=None):
        raise ConfigError("executor=flower runs its rounds inside Flower (FlowerExecutor.host), not on its own")


# -------------------------------------------------------------------------------------------------- client side

_RUNNERS: dict[str, ClientRunner] = {}  # one runner per run config and process (a Ray actor trains many nodes)


def _runner(config: dict[str, Any]) -> ClientRunner:
    from fipa.runner import ClientRunner

    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # a new run: the previous one's data and model go
        _RUNNERS[key] = ClientRunner.from_config(config)
    return _RUNNERS[key]


def _config_of(context: Context, config: dict[str, Any] | None) -> dict[str, Any]:
    """The run config: the one the app was built with, or (a deployment) composed from the run config's
    `overrides`, e.g. `flwr run . --run-config "overrides='experiment=regression_1d_m4 aggregator=fipa'"`."""
    if config is not None:
        return config
    from omegaconf import OmegaConf

    from fipa.config import compose

    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    return OmegaConf.to_container(compose(overrides), resolve=True)  # type: ignore[return-value]


def client_app(config: dict[str, Any] | None = None) -> ClientApp:
    """A Flower ClientApp training the client of its node's `partition-id` from a fipa run config (resolved, as
    `OmegaConf.to_container(cfg, resolve=True)`; None: composed from the Flower run config's `overrides`)."""
    _require_flower()
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        node = ConfigRecord({PARTITION_ID: _as_int(context.node_config[PARTITION_ID])})
        return Message(RecordDict({"node": node}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        runner = _runner(_config_of(context, config))
        round_idx, client_id, global_params, round_states, aggregator_state = read_job(message.content)
        partition = _as_int(context.node_config[PARTITION_ID])
        require(client_id == partition, f"job for client {client_id} sent to the node of partition {partition}")
        if config is None:  # a deployment's node holds its own partition, nothing else (a simulation's workers
            runner.task.keep_only(client_id)  # train many virtual nodes)
        methods = runner.client_methods
        own = context.state.config_records.get("fipa.client")
        states = [None] * len(methods) if own is None else _unpacked_record(context.state["fipa.client.arrays"], own)  # type: ignore[arg-type]
        update, new_states = runner.train(client_id, round_idx, global_params, round_states, states, aggregator_state)
        arrays, record = _packed_record(new_states)
        context.state["fipa.client"], context.state["fipa.client.arrays"] = record, arrays  # stays on this node
        uploaded = [s if m.server_keeps_client_state else None for m, s in zip(methods, new_states)]
        return Message(reply_content(update.to("cpu"), uploaded), reply_to=message)

    return app


def server_app() -> ServerApp:
    """The ServerApp of a deployment: the fipa run composed from the Flower run config's `overrides`, written to
    its `output-dir` (default outputs/flower/<date>_<time>) with fipa-train's files, clients on the SuperNodes."""
    _require_flower()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from omegaconf import OmegaConf

        from fipa.config import compose
        from fipa.train import run, summary_line

        cfg = compose(shlex.split(str(context.run_config.get("overrides", ""))))
        output_dir = Path(
            str(context.run_config.get("output-dir") or time.strftime("outputs/flower/%Y-%m-%d_%H-%M-%S"))
        )
        log.info("fipa on Flower: %s -> %s", OmegaConf.to_container(cfg.aggregator), output_dir)
        summary = run(cfg, output_dir, host=lambda trainer: FipaStrategy(trainer).start(grid))
        print(summary_line(summary), flush=True)

    return app
