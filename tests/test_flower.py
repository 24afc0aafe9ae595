"""Flower interop: fipa's records, FipaStrategy over a grid, the ClientApp's own state, and executor=flower on Flower's
simulation engine giving fipa-train's numbers."""

import pytest
import torch
from conftest import compose_config, metrics_without_timing

from fipa.client import ClientUpdate
from fipa.train import build, run

flwr = pytest.importorskip("flwr")
from flwr.app import ArrayRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

from fipa import flower  # noqa: E402

REGRESSION = ["experiment=regression_1d_m4", "federation.rounds=5", "torch_threads=1"]
BYTE_COLUMNS = ("bytes_up",)  # counted from the received records: each array's header on top of its data


def test_values_round_trip_through_records_exactly():
    value = {
        "control": torch.randn(7, dtype=torch.float64),
        "factors": [torch.randn(3, 2), None, 2.5, "x", True],
        "nested": {"n": 3, "nan": float("nan")},
    }
    arrays = ArrayRecord()
    back = flower.unpack(flower.pack(value, arrays), arrays)
    assert torch.equal(back["control"], value["control"]) and back["control"].dtype == torch.float64
    assert torch.equal(back["factors"][0], value["factors"][0]) and back["factors"][0].dtype == torch.float32
    assert back["factors"][1:] == [None, 2.5, "x", True] and back["nested"]["n"] == 3
    assert back["nested"]["nan"] != back["nested"]["nan"]
    with pytest.raises(Exception, match="cannot travel"):
        flower.pack(object(), ArrayRecord())


def test_a_job_and_a_reply_round_trip_with_the_statistics_beside_the_update():
    params = torch.randn(11, dtype=torch.float64)
    content = flower.job_content(4, 2, params, [torch.ones(11), None], {"gradient_sum_norm": 1.5})
    round_idx, client, received, round_states, aggregator_state = flower.read_job(content)
    assert (round_idx, client) == (4, 2) and torch.equal(received, params)
    assert torch.equal(round_states[0], torch.ones(11)) and round_states[1] is None
    assert aggregator_state == {"gradient_sum_norm": 1.5}

    statistics = {
        "eigenvectors": torch.randn(11, 3, dtype=torch.float64),
        "eigenvalues": torch.rand(3, dtype=torch.float64),
    }
    update = ClientUpdate(2, 40, torch.randn(11, dtype=torch.float64), statistics, {"train_loss": 0.25})
    back, states = flower.read_reply(flower.reply_content(update, [None, torch.zeros(2)]))
    assert torch.equal(back.delta, update.delta) and back.num_samples == 40 and back.metrics == {"train_loss": 0.25}
    assert all(torch.equal(back.statistics[k], v) for k, v in statistics.items())
    assert states[0] is None and torch.equal(states[1], torch.zeros(2))
    # bytes as received: the data plus each array's (small) header
    raw, wire = update.payload_bytes(), back.payload_bytes()
    assert set(raw) == set(wire) and all(0 < wire[k] - raw[k] < 256 for k in raw)


class InProcessGrid(Grid):
    """A grid whose nodes run the ClientApp in this process, each with its own Context (a test double of Flower's
    transport only: the ClientApp, the records and the strategy are Flower's and fipa's own)."""

    def __init__(self, app, num_nodes: int):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 0  # what a ServerApp process has
        self.app = app
        self.contexts = {
            100 + p: Context(0, 100 + p, {"partition-id": p, "num-partitions": num_nodes}, RecordDict(), {})
            for p in range(num_nodes)
        }
        self.sent = 0

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent += 1
            replies.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
        return replies

    def set_run(self, run):  # the rest of Grid's interface is not used by fipa
        raise NotImplementedError

    run = create_message = get_nodes = push_messages = pull_messages = set_run


def strategy_run(overrides, tmp_path):
    """A fipa run whose round loop is FipaStrategy.start over an in-process grid; returns (summary, trainer, grid)."""
    from omegaconf import OmegaConf

    cfg = compose_config(*overrides)
    grid = InProcessGrid(flower.client_app(OmegaConf.to_container(cfg, resolve=True)), 4)
    trainer = build(cfg, tmp_path)
    return flower.FipaStrategy(trainer).start(grid), trainer, grid


def test_fipa_strategy_gives_fipa_trains_numbers_and_client_state_stays_on_the_node(tmp_path):
    overrides = [*REGRESSION, "aggregator=fipa", "client=scaffold", "federation.rounds=3"]
    summary, trainer, grid = strategy_run(overrides, tmp_path / "flower")
    local = run(compose_config(*overrides), tmp_path / "local")
    assert summary["test_mse"] == local["test_mse"]
    rows = metrics_without_timing(tmp_path / "flower" / "metrics.csv")
    local_rows = metrics_without_timing(tmp_path / "local" / "metrics.csv")
    for row, local_row in zip(rows, local_rows, strict=True):
        assert {k: v for k, v in row.items() if not k.startswith(BYTE_COLUMNS)} == {
            k: v for k, v in local_row.items() if not k.startswith(BYTE_COLUMNS)
        }
        assert 0 < int(row["bytes_up_eigenvectors"]) - int(local_row["bytes_up_eigenvectors"]) < 4 * 256
    scaffold = trainer.client_methods[0]
    assert scaffold.server_control is not None and scaffold.server_control.abs().sum() > 0
    assert scaffold.client_controls == {}  # c_i never reached the server...
    assert all("fipa.client" in c.state.config_records for c in grid.contexts.values())  # ...it stays on the node
    assert grid.sent == 4 + 3 * 4  # one partition query per node, then one job per client and round


def test_feddyn_uploads_its_client_state_because_its_server_needs_it(tmp_path):
    overrides = [*REGRESSION, "aggregator=fedavg", "client=feddyn", "federation.rounds=2"]
    summary, trainer, _ = strategy_run(overrides, tmp_path / "flower")
    assert summary["test_mse"] == run(compose_config(*overrides), tmp_path / "local")["test_mse"]
    assert sorted(trainer.client_methods[0].client_states) == [0, 1, 2, 3]


def test_flowers_own_round_loop_drives_configure_and_aggregate_train(tmp_path):
    """Strategy.start (Flower's loop) through FipaStrategy's configure_train / aggregate_train: the same model."""
    overrides = [*REGRESSION, "aggregator=fipa", "federation.rounds=2"]
    cfg = compose_config(*overrides)
    from omegaconf import OmegaConf

    grid = InProcessGrid(flower.client_app(OmegaConf.to_container(cfg, resolve=True)), 4)
    strategy = flower.FipaStrategy(build(cfg, tmp_path / "flower"))
    initial = ArrayRecord({"params": flower.Array(strategy.trainer.flat.get())})
    result = Strategy.start(strategy, grid, initial, num_rounds=2)
    local = build(compose_config(*overrides), tmp_path / "local")
    local.fit()
    assert torch.equal(torch.from_numpy(result.arrays["params"].numpy()), local.flat.get())
    assert result.train_metrics_clientapp[2]["clients"] == 4


def test_a_job_for_another_partition_is_refused(tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_config(*REGRESSION)
    app = flower.client_app(OmegaConf.to_container(cfg, resolve=True))
    job = Message(flower.job_content(1, 3, torch.zeros(10), [], None), dst_node_id=100, message_type=flower.TRAIN)
    context = Context(0, 100, {"partition-id": 0, "num-partitions": 4}, RecordDict(), {})
    with pytest.raises(Exception, match="job for client 3 sent to the node of partition 0"):
        app(job, context)


@pytest.mark.parametrize(
    "method", [["aggregator=fedavg"], ["aggregator=fipa"], ["aggregator=fipa", "client=scaffold"]], ids="+".join
)
def test_executor_flower_equals_fipa_train(method, tmp_path):
    """executor=flower on Flower's simulation engine (Ray), 5 rounds of regression_1d_m4: bit for bit."""
    flowered = run(compose_config(*REGRESSION, *method, "executor=flower", "executor.num_cpus=2"), tmp_path / "fl")
    local = run(compose_config(*REGRESSION, *method), tmp_path / "local")
    assert flowered["status"] == "completed" and flowered["rounds_completed"] == 5
    assert flowered["test_mse"] == local["test_mse"]
    rows = metrics_without_timing(tmp_path / "fl" / "metrics.csv")
    local_rows = metrics_without_timing(tmp_path / "local" / "metrics.csv")
    assert [r["test_mse"] for r in rows] == [r["test_mse"] for r in local_rows]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in local_rows]
    assert len({r["test_mse"] for r in rows}) == 5  # the model moved every round
