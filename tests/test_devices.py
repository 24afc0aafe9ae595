"""Devices on a machine without a GPU: every preset takes trainer.accelerator, the GPU settings fail clearly where
no GPU is visible, data move to the chosen device once, mixed precision leaves curvature and server math in float32,
and scripts/gpu_check.py runs in its CPU mode (what CI can check; the CUDA run needs a GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_config, fipa_cli
from fipa.components import build_components
from fipa.errors import ConfigError
from fipa.train import run
from test_image import DIGITS

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


@needs_no_gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_takes_trainer_accelerator_gpu_and_says_plainly_that_there_is_none(preset):
    cfg = compose_config(f"experiment={preset}", "trainer.accelerator=gpu", "task.dataset=digits")  \
        if preset in ("fmnist_dirichlet", "cifar10_resnet20") else compose_config(f"experiment={preset}", "trainer.accelerator=gpu")  # fmt: skip
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but no CUDA device is visible"):
        build_components(cfg)


@needs_no_gpu
def test_cli_exits_2_for_a_gpu_it_cannot_see(tmp_path):
    result = fipa_cli("trainer.accelerator=gpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "no CUDA device is visible" in result.stderr


def test_bad_accelerator_names_the_choices():
    with pytest.raises(ConfigError, match="trainer.accelerator must be one of auto, cpu, gpu, got 'tpu'"):
        build_components(compose_config(*TINY, "trainer.accelerator=tpu"))


@needs_no_gpu
def test_auto_trains_on_the_cpu_when_no_gpu_is_visible():
    parts = build_components(compose_config(*DIGITS))  # the image presets default to auto
    assert parts.trainer.accelerator == "auto" and parts.flat.get().device.type == "cpu"


def test_ray_workers_need_a_gpu_share_for_a_gpu_run():
    from fipa.executors import RayExecutor

    with pytest.raises(ConfigError, match="needs executor.gpus_per_worker > 0"):
        RayExecutor(num_workers=2).bind({"trainer": {"accelerator": "gpu"}}, None)
    RayExecutor(num_workers=4, gpus_per_worker=0.25).bind({"trainer": {"accelerator": "gpu"}}, None)
    with pytest.raises(ConfigError, match="executor.gpus_per_worker must be >= 0"):
        RayExecutor(gpus_per_worker=-1)


@pytest.mark.parametrize("overrides", [["aggregator=fedavg"], ["experiment=poisson_1d"], DIGITS],
                         ids=["regression", "pinn", "image"])  # fmt: skip
def test_a_task_moves_every_tensor_it_holds(overrides):
    """On the meta device nothing is computed: any tensor left behind would show up on the CPU."""
    task = build_components(compose_config(*overrides)).task.to("meta")
    for dataset in task.datasets:
        assert all(t.device.type == "meta" for t in dataset.tensors)
    left = [name for name, value in vars(task).items() if isinstance(value, torch.Tensor) and value.device.type != "meta"]
    assert left == []


def test_bf16_mixed_training_keeps_curvature_and_the_server_in_float32(tmp_path):
    cfg = compose_config(*DIGITS, "trainer.precision=bf16-mixed", "federation.rounds=3", "aggregator=fedavg",
                         "schedule.switch_round=1", "schedule.after=fipa_lastlayer")  # fmt: skip
    parts = build_components(cfg)
    from fipa.runner import ClientRunner

    runner = ClientRunner.from_components(parts)
    update, _ = runner.train(0, 2, parts.flat.get().clone(), [], [])  # round 2: the last-layer FIPA phase
    assert update.delta.dtype == torch.float32 and torch.isfinite(update.delta).all()
    assert update.statistics["eigenvectors"].dtype == torch.float32
    assert (update.statistics["eigenvalues"] > 0).all()
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed" and 0.0 < summary["test_acc"] <= 1.0


def gpu_check(*args):
    return subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@needs_no_gpu
def test_gpu_check_says_in_one_line_that_there_is_no_gpu_and_exits_0():
    result = gpu_check()
    assert result.returncode == 0
    assert result.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device visible; nothing to check (the CPU paths are covered by the test suite)"
    ]


def test_gpu_check_compares_metrics_and_times_in_a_dry_run_against_the_cpu():
    small = ["federation.local_epochs=1", "task.dataset=digits", "model.image_size=8", "task.num_clients=10",
             "federation.clients_per_round=2"]  # fmt: skip
    result = gpu_check("--target", "cpu", "--rounds", "2", "--cases", "fmnist_lastlayer", "--override", *small)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "gpu_check: ok"
    assert lines[1].startswith("fmnist_lastlayer: test_acc cpu ") and "(abs 0.02: ok)" in lines[1]
    assert "speed-up" in lines[1]
