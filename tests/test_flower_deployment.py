"""fipa on a real Flower deployment: examples/flower/deploy_local.sh starts a SuperLink and two SuperNodes on
loopback, `flwr run`s the example app (FIPA on regression_1d_m2, 3 rounds), and stops everything. The run must
complete with fipa-train's outputs and give, bit for bit, the numbers of the same run in this process."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config, metrics_without_timing

from fipa.train import run

pytest.importorskip("flwr")

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "flower" / "deploy_local.sh"
OVERRIDES = ["experiment=regression_1d_m2", "aggregator=fipa", "federation.rounds=3"]
BYTE_COLUMNS = ("bytes_up",)  # counted from the received records: each array's header on top of its data
TIMEOUT_S = 300


def processes_on(ports: list[int]) -> list[tuple[int, str]]:
    """Command lines of the live processes naming one of these ports (`--port P`, `host:P`): the SuperLink, the
    SuperNodes, their SuperExecs and the apps these start."""
    wanted = {str(p) for p in ports}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if any(arg.rpartition(":")[2] in wanted for arg in argv[1:]):
            found.append((int(entry.name), " ".join(argv)))
    return found


def deploy(work: Path, output: Path) -> subprocess.CompletedProcess:
    """deploy_local.sh, with Flower's and fipa's executables from this interpreter's environment; on a timeout it
    gets SIGTERM, on which it stops what it started."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = ["bash", str(SCRIPT), "--timeout", str(TIMEOUT_S - 30), str(work), " ".join(OVERRIDES), str(output)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        out, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        pytest.fail(f"deploy_local.sh ran over {TIMEOUT_S} s:\n{out[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, "")


def test_fipa_on_a_local_flower_deployment_gives_fipa_trains_numbers(tmp_path):
    work, output = tmp_path / "work", tmp_path / "output"
    result = deploy(work, output)
    logs = result.stdout[-5000:]
    ports_file = work / "ports.env"
    assert ports_file.is_file(), logs
    settings = dict(line.split("=", 1) for line in ports_file.read_text().splitlines())
    ports = [int(settings["SUPERLINK_PORT"]), *map(int, settings["SUPERNODE_PORTS"].strip('"').split())]
    assert len(ports) == 3, settings

    leftovers = processes_on(ports)
    for pid, _ in leftovers:  # not to disturb the tests after this one
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], "processes of the deployment left running"
    assert result.returncode == 0, logs
    runs = json.loads((work / "flwr_ls.json").read_text())["runs"]
    assert runs[0]["status"] == "finished:completed", runs

    summary = json.loads((output / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3, summary
    assert {"config.yaml", "model.pt", "metrics.csv"} <= {p.name for p in output.iterdir()}
    with open(output / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all(int(row["clients"]) == 2 and int(row["bytes_up_eigenvectors"]) > 0 for row in rows), rows

    # the point of a deployment: the same seed gives the same numbers as fipa-train in one process
    local = run(compose_config(*OVERRIDES), tmp_path / "local")
    assert summary["test_mse"] == local["test_mse"]
    local_rows = metrics_without_timing(tmp_path / "local" / "metrics.csv")
    assert [row["test_mse"] for row in rows] == [row["test_mse"] for row in local_rows]
    for row, local_row in zip(metrics_without_timing(output / "metrics.csv"), local_rows, strict=True):
        assert {k: v for k, v in row.items() if not k.startswith(BYTE_COLUMNS)} == {
            k: v for k, v in local_row.items() if not k.startswith(BYTE_COLUMNS)
        }
