"""Smoke tests of the benchmark scripts: they run end to end at a tiny size and print their ratio lines.

No timing is asserted (the machine is shared and noisy); only that each script completes and that its last
line carries every ratio as a finite positive number. The scripts are not a package: each is loaded with
runpy (without running its `__main__` block) and its `main(argv)` is called in this process.
"""

from __future__ import annotations

import math
import re
import runpy
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PAIR = re.compile(r"(\w+)=(\S+)")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_benchmark(script: str, argv: list[str], capsys) -> tuple[dict, dict[str, float]]:
    namespace = runpy.run_path(str(BENCHMARKS / script))
    returned = namespace["main"](argv)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines, f"{script} printed nothing"
    printed = {key: float(value) for key, value in PAIR.findall(lines[-1])}
    return returned, printed


def assert_ratios(printed: dict[str, float], expected: list[str]) -> None:
    assert sorted(printed) == sorted(expected), printed
    for key, value in printed.items():
        assert math.isfinite(value) and value > 0, f"{key}={value}"


def test_bench_overhead_runs_and_prints_ratios(capsys):
    argv = ["--taus", "3", "5", "--rounds", "2", "--points", "20", "--repeats", "1", "--warmup", "0"]
    returned, printed = run_benchmark("bench_overhead.py", argv, capsys)
    assert_ratios(printed, [f"{kind}_tau{tau}" for kind in ("ratio", "ratio_compiled", "ratio_compiled_vs_hand_compiled")
                            for tau in (3, 5)])  # fmt: skip
    assert returned["mse_rel_diff_compiled_tau5"] <= 1e-9  # the compiled arms train the same model
    assert set(printed) <= set(returned)


def test_bench_fipa_round_runs_and_prints_ratios(capsys):
    argv = [
        "--rounds", "1", "--cnn-rounds", "1", "--warmup-rounds", "0",
        "--tau", "2", "--points", "20",
        "--clients", "2", "--images", "6", "--test-images", "6", "--batch-size", "3",
        "--cnn-rank", "2", "--oversample", "1", "--power-iters", "1", "--sample-block", "3",
    ]
    returned, printed = run_benchmark("bench_fipa_round.py", argv, capsys)
    assert_ratios(
        printed,
        ["ratio_regression_fipa", "ratio_regression_fipa_full", "ratio_cnn_fipa", "ratio_cnn_curvature_per_epoch"],
    )
    assert set(printed) <= set(returned)


def test_bench_server_solve_runs_and_prints_both_ratios(capsys):
    argv = ["--p", "300", "--clients", "2", "--rank", "3", "--repeats", "1", "--warmup", "0"]
    returned, printed = run_benchmark("bench_server_solve.py", argv, capsys)
    assert_ratios(printed, ["ratio_pinv", "ratio_damped", "ratio_pinv_geqrf", "ratio_damped_geqrf"])
    assert set(printed) <= set(returned)


@pytest.mark.slow  # two fresh Python processes (~25 s)
def test_bench_scale_memory_part_runs_and_prints_its_ratio(capsys):
    # The Ray part is exercised by tests/test_executors.py; starting Ray again here would only add time.
    argv = ["--skip-ray", "--memory-clients", "10", "40", "--memory-rounds", "1",
            "--memory-override", "task.dataset=digits", "model.image_size=8"]
    returned, printed = run_benchmark("bench_scale.py", argv, capsys)
    assert_ratios(printed, ["ratio_memory_clients"])
    assert printed["ratio_memory_clients"] == pytest.approx(returned["ratio_memory_clients"], abs=0.005)
    # every client trained and its SCAFFOLD control variate is held at the end of the run
    assert returned["memory_state_clients_10"] == 10 and returned["memory_state_clients_40"] == 40
    assert returned["memory_state_bytes"] > 0


@pytest.mark.slow  # loads Fashion-MNIST (Debian's dataset-fashion-mnist; skipped without it)
def test_bench_fipa_round_fmnist_part_runs_and_prints_ratios(capsys):
    from fipa.datasets import DEBIAN_FASHION_MNIST

    if not any(DEBIAN_FASHION_MNIST.glob("train-images*")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    cases = ("fipa", "fipa_lastlayer", "fipa_kfac", "fedfisher_kfac")
    argv = ["--skip-regression", "--skip-cnn", "--fmnist", "--fmnist-rounds", "1", "--warmup-rounds", "0",
            "--fmnist-cases", ",".join(cases), "--fmnist-override", "task.train_subset=1000", "task.test_subset=100",
            "+preset.fipa_curvature_samples=8", "preset.kfac_curvature_samples=8"]
    _, printed = run_benchmark("bench_fipa_round.py", argv, capsys)
    assert_ratios(printed, [f"ratio_fmnist_{n}{s}" for n in cases for s in ("", "_curvature_per_epoch")])


@pytest.mark.slow  # ResNet-20 forward and backward passes (~30 s)
def test_bench_fipa_round_resnet_part_runs_and_prints_ratios(capsys):
    argv = ["--skip-regression", "--skip-cnn", "--resnet", "--resnet-rounds", "1", "--warmup-rounds", "0",
            "--resnet-clients", "2", "--resnet-images", "8", "--resnet-curvature-samples", "4", "--test-images", "4"]
    returned, printed = run_benchmark("bench_fipa_round.py", argv, capsys)
    assert_ratios(printed, ["ratio_resnet_fipa_kfac", "ratio_resnet_fipa_kfac_curvature_per_epoch"])
    assert returned["resnet_fipa_kfac_round_s"] > 0


@pytest.mark.slow  # a fresh subprocess for the memory part (~25 s)
def test_bench_pinn_runs_and_prints_ratios(capsys):
    tiny = ["task.points_per_client=16", "task.boundary_points=4", "federation.local_epochs=2", "task.test_points=32"]
    argv = ["--loop-presets", "poisson_1d", "--presets", "poisson_1d", "poisson_5d", "--rounds", "1",
            "--warmup-rounds", "1", "--override", *tiny,
            "preset.fipa_rank=4", "--memory-rounds", "1", "--memory-override", *tiny,
            "--step-presets", "poisson_3d", "--step-repeats", "2"]
    _, printed = run_benchmark("bench_pinn.py", argv, capsys)
    assert_ratios(printed, ["loop_ratio_poisson_1d", "loop_ratio_compiled_poisson_1d", "ratio_poisson_1d",
                            "ratio_poisson_5d", "peak_rss_gib_poisson_5d_fipa", "laplacian_speedup_poisson_3d"])
    assert 0.1 < printed["peak_rss_gib_poisson_5d_fipa"] < 8


def test_bench_round_times_runs_and_prints_each_arms_round_time(capsys):
    # the eager arm only: compilation (tests/test_local_steps.py) and Ray start-up would cost a minute here
    _, printed = run_benchmark("bench_round_times.py", ["--tau", "2", "--rounds", "2", "--arms", "sequential-eager"], capsys)
    assert_ratios(printed, ["round_s_sequential_eager"])


@pytest.mark.slow  # compiles four graphs (~30 s)
def test_bench_compile_modes_runs_and_prints_ratios(capsys):
    ratios, printed = run_benchmark("bench_compile_modes.py", ["--steps", "5", "--repeats", "1"], capsys)
    assert_ratios(printed, ["ratio_compiled_model", "ratio_compiled_loss", "ratio_compiled_step"])
    assert set(printed) == set(ratios)


@pytest.mark.slow
def test_bench_flower_runs_and_prints_ratios(capsys):
    pytest.importorskip("flwr")
    returned, printed = run_benchmark("bench_flower.py", ["--rounds", "2"], capsys)
    assert_ratios(printed, ["ratio_flower_over_ray", "ratio_flower_over_sequential"])
    assert returned == pytest.approx(printed, rel=1e-3)
