"""Every config option composes and instantiates; bad input fails before training with one clear message."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import TINY, compose_config, fipa_cli
from fipa.errors import ConfigError
from fipa.train import CONFIG_DIR, build, run

GROUPS = ["task", "model", "optimizer", "aggregator", "client", "partition", "federation", "logger", "variant", "executor",
          "server_optimizer"]
IMAGE_ONLY = {"fedrcl", "phase_fedrcl_fipa_lastlayer"}  # FedRCL needs the CNNs' per-level features
# Small sizes per task option so that building stays fast (digits needs no download).
TASK_SIZES = {
    "regression_1d": ["task.points_per_client=40"],
    "regression_2d": ["task.points_per_client=40", "task.test_grid=16"],
    "image": ["task.dataset=digits", "task.num_clients=10", "model=cnn", "model.image_size=8"],
    "pinn": ["task.points_per_client=16", "task.boundary_points=4"],
}


def options(group):
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_the_default_run_is_fipa_on_regression_1d_m4():
    cfg = compose_config()
    assert cfg.task.edges == [0.0, 0.25, 0.5, 0.75, 1.0] and cfg.task.frequency == 4
    assert cfg.aggregator._target_ == "fipa.aggregators.FIPA"  # bare fipa-train runs the headline method
    preset = compose_config("experiment=regression_1d_m4")
    assert preset.task == cfg.task and preset.model == cfg.model and preset.federation == cfg.federation


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option, tmp_path):
    sizes = TASK_SIZES[option] if group == "task" else TINY
    if option in IMAGE_ONLY:
        sizes = ["task=image", *TASK_SIZES["image"], "+preset.last_layer=9.*"]  # SmallCNN's last Linear
    if option in ("fipa_lastlayer", "fipa_lastlayer_robust", "phase_fipa_lastlayer"):
        sizes = [*sizes, "+preset.last_layer=6.*"]  # the regression MLP's last layer (the default glob is ResNet's fc.*)
    cfg = compose_config(*sizes, f"{group}={option}")
    if group == "variant" and option.startswith("phase_"):  # the image arms branch at a switch round
        sizes = [*sizes, "schedule.switch_round=1"]
        cfg = compose_config(*sizes, f"{group}={option}")
    if group == "logger" and option == "wandb":
        cfg.logger._target_ = None  # wandb itself is exercised in test_end_to_end
    trainer = build(cfg, tmp_path)  # instantiates task, model, optimizer, aggregator, client callbacks
    assert trainer.task.num_clients == (10 if option in IMAGE_ONLY else {"regression_2d": 9, "image": 10, "pinn": 2}.get(option, 4))
    for callback in cfg.client.callbacks:
        assert instantiate(callback) is not None


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_preset_composes_and_builds(preset, tmp_path):
    image = preset in ("fmnist_dirichlet", "cifar10_resnet20")
    # image presets are built on digits here: the real data sets need files (or a download) CI may not have
    sizes = ["task.dataset=digits", "model.image_size=8"] if preset == "fmnist_dirichlet" else ["task.points_per_client=8"]
    if preset == "cifar10_resnet20":
        sizes = ["task.dataset=digits"]
    cfg = compose_config(f"experiment={preset}", *sizes)
    trainer = build(cfg, tmp_path)
    expected_clients = {"regression_1d_m2": 2, "regression_1d_m4": 4, "regression_1d_m8": 8, "regression_2d": 9}
    assert trainer.task.num_clients == expected_clients.get(preset, 100 if image else 2)
    assert cfg.dtype == ("float32" if image else "float64")
    assert trainer.flat.get().dtype == (torch.float32 if image else torch.float64)


def test_spec_settings_of_the_regression_presets():
    m8 = compose_config("experiment=regression_1d_m8")
    assert m8.task.edges == [0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.85, 0.9, 1.0] and m8.task.frequency == 8
    assert list(m8.model.hidden) == [20, 20, 20] and m8.optimizer.lr == 1e-4
    two_d = compose_config("experiment=regression_2d")
    assert list(two_d.model.hidden) == [20, 20, 20, 20] and two_d.task.points_per_client == 1000
    fipa = instantiate(compose_config("aggregator=fipa").aggregator)
    assert (fipa.curvature.rank, fipa.step_size, fipa.rcond, fipa.solver) == (20, 0.5, 1e-5, "pinv")
    assert compose_config("aggregator=fipa_full").aggregator.rank is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("federation.rounds=0", "federation.rounds must be >= 1"),
        ("federation.local_epochs=0", "federation.local_epochs must be >= 1"),
        ("optimizer.lr=0", "optimizer.lr must be > 0"),
        ("optimizer.lr=-1e-3", "optimizer.lr must be > 0"),
        ("federation.clients_per_round=5", "clients_per_round must be between 1 and the number of clients (4)"),
        ("federation.time_budget_s=-1", "time_budget_s must be > 0"),
        ("dtype=float16", "dtype must be one of"),
        ("federation.local_epochs_scale=0", "federation.local_epochs_scale must be >= 1"),
    ],
)
def test_invalid_values_fail_before_training(override, message, tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(tiny_config(override), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["aggregator=fedprox", "aggregator.mu=-0.5"], "mu must be >= 0"),
        (["client=fedprox", "client.mu=-1"], "mu must be >= 0"),
        (["aggregator=fipa", "aggregator.rcond=0"], "aggregator.rcond must be > 0"),
        (["aggregator=fipa", "aggregator.step_size=-1"], "aggregator.step_size must be > 0"),
        (["aggregator=fipa", "aggregator.solver=damped", "aggregator.beta=0"], "aggregator.beta must be > 0"),
        (["aggregator=fipa", "aggregator.solver=damped", "aggregator.gamma=-2"], "aggregator.gamma must be > 0"),
        (["aggregator=fipa", "aggregator.rank=0"], "aggregator.rank must be >= 1"),
        (["aggregator=fipa", "aggregator.power_iters=0"], "aggregator.power_iters must be >= 1"),
        (["aggregator=fipa", "aggregator.solver=lu"], "aggregator.solver must be one of pinv, damped"),
        (["aggregator=fipa", "aggregator.params=nothing.*"], "matches no parameter"),
        (["aggregator=fipa", "aggregator.curvature_samples=0"], "aggregator.curvature_samples must be >= 1 or null"),
    ],
)
def test_invalid_aggregator_values_fail_before_training(overrides, message, tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run(tiny_config(*overrides), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["aggregator=fipa_diag", "aggregator.rank=5"], "aggregator.rank=5 has no effect with representation=diagonal"),
        (["aggregator=fipa", "aggregator.representation=diagonal"], "aggregator.rank=20 has no effect with representation=diagonal"),
        (["aggregator=fipa_diag", "aggregator.oversample=20"], "aggregator.oversample=20 has no effect with representation=diagonal"),
        (["aggregator=fipa_diag", "aggregator.solver=damped"], "aggregator.solver=damped has no effect with representation=diagonal"),
        (["aggregator=fipa_diag", "aggregator.beta=0.1"], "aggregator.beta=0.1 has no effect with representation=diagonal"),
        (["aggregator=fipa", "aggregator.beta=0.1"], "aggregator.beta=0.1 has no effect with solver=pinv"),
        (["aggregator=fipa_damped", "aggregator.rcond=1e-3"], "aggregator.rcond=0.001 has no effect with solver=damped"),
        (["aggregator=fipa_full", "aggregator.power_iters=4"], "aggregator.power_iters=4 has no effect with eigensolver=exact"),
        (["aggregator=fipa", "aggregator.others=freeze"], "aggregator.others=freeze freezes the parameters aggregator.params does not select"),
        (["schedule.after=fipa"], "schedule.after take effect only with schedule.switch_round"),
        (["schedule.lr_scale_after=0.5"], "schedule.lr_scale_after take effect only with schedule.switch_round"),
        (["schedule.switch_round=2"], "schedule.switch_round needs schedule.after"),
    ],
)  # fmt: skip
def test_settings_that_would_be_ignored_fail_before_training(overrides, message, tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        run(tiny_config(*overrides), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()


def test_the_settings_each_mode_uses_are_accepted(tiny_config, tmp_path):
    for overrides in (["aggregator=fipa", "aggregator.rcond=1e-4", "aggregator.oversample=4"],
                      ["aggregator=fipa_damped", "aggregator.beta=0.1", "aggregator.gamma=0.9"],
                      ["aggregator=fipa_diag", "aggregator.rcond=1e-3"],
                      ["aggregator=fipa", "aggregator.params=6.*", "aggregator.others=freeze"]):  # fmt: skip
        build(tiny_config(*overrides), tmp_path)


def test_cli_resume_with_other_overrides_is_refused(tmp_path):
    result = fipa_cli(f"resume={tmp_path}", "federation.rounds=500", cwd=tmp_path)
    assert result.returncode == 2
    assert "federation.rounds=500 would be ignored" in result.stderr and "init_from" in result.stderr


def test_cli_unknown_aggregator_lists_the_choices(tmp_path):
    result = fipa_cli("aggregator=nope", cwd=tmp_path)
    assert result.returncode != 0
    for name in ("fedavg", "fedprox", "fipa"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_preset_lists_the_choices(tmp_path):
    result = fipa_cli("experiment=regression_9d", cwd=tmp_path)
    assert result.returncode != 0
    assert "regression_1d_m4" in result.stderr and "regression_2d" in result.stderr


def test_cli_invalid_value_is_one_clear_line(tmp_path):
    result = fipa_cli("federation.rounds=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "fipa-train: error: federation.rounds must be >= 1, got 0"
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------- sweep presets
PHASE_AFTER = {"phase_fedavg": "fedavg", "phase_fedavg_lr01": "fedavg", "phase_fipa": "fipa_damped",
               "phase_fipa_lastlayer": "fipa_lastlayer", "phase_fedadam": "fedavg", "phase_fedadam_tuned": "fedavg",
               "phase_fednova": "fednova",
               "phase_fedavg_lr01_unequal": "fedavg"}
VARIANT_AGGREGATORS = {"fedavg": "FedAvg", "fedavg_10x": "FedAvg", "fedavg_tau1000": "FedAvg", "fipa": "FIPA", "fipa_full": "FIPA",
                       "fipa_anchored": "FIPA", "fipa_adaptive": "FIPA", "fipa_robust": "FIPA", "fipa_full_tau200": "FIPA",
                       "fipa_full_tau500": "FIPA", "fipa_tau200": "FIPA"}  # fmt: skip


def sweep_jobs(sweep: str) -> tuple[list[list[str]], object]:
    """Every job of a sweep preset (first seed only), as override lists, and the sweep's hydra node."""
    import itertools

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        hydra_node = compose("train", overrides=[f"sweep={sweep}"], return_hydra_config=True).hydra
    params = {key: str(values).split(",") for key, values in hydra_node.sweeper.params.items()}
    params["seed"] = params["seed"][:1]
    jobs = [[f"{k}={v}" for k, v in zip(params, combo)] for combo in itertools.product(*params.values())]
    return jobs, hydra_node


@pytest.mark.parametrize("sweep", options("sweep"))
def test_every_job_of_every_sweep_preset_composes(sweep):
    jobs, hydra_node = sweep_jobs(sweep)
    assert len(jobs) >= 3
    for job in jobs:
        cfg = compose_config(f"sweep={sweep}", *job)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves (e.g. the preset's time budget)
        variant = dict(o.split("=") for o in job)["variant"]
        if variant in VARIANT_AGGREGATORS:
            assert cfg.aggregator._target_.endswith(VARIANT_AGGREGATORS[variant])
        else:  # the image schedule arms: a FedAvg warm-up, then the arm's rule
            assert cfg.federation.rounds == cfg.schedule.switch_round + 20  # 20 rounds of the arm after the switch
            assert cfg.schedule.switch_round == (int(dict(o.split("=") for o in job).get("schedule.switch_round", 100)))
            assert cfg.schedule.after == PHASE_AFTER[variant]
    if compose_config(f"sweep={sweep}", *jobs[0]).federation.time_budget_s:
        assert hydra_node.launcher._target_.endswith("BasicLauncher")  # timed jobs never share the cores
    else:
        assert hydra_node.launcher._target_.endswith("JoblibLauncher")


def test_the_matrix_gives_fedrcl_its_fedavgm_warm_up_and_each_arm_its_own_server_steps():
    jobs, _ = sweep_jobs("matrix_fedrcl")
    after = {}
    for job in jobs:
        cfg = compose_config("sweep=matrix_fedrcl", *job)
        assert cfg.server_optimizer._target_.endswith("ServerMomentum")  # the warm-up's
        assert cfg.client.callbacks[0]._target_.endswith("FedRCL")
        after[dict(o.split("=") for o in job)["variant"]] = cfg.schedule.after_server_optimizer
    assert after.pop("phase_fedavg") is None  # FedAvgM continues, state and all
    assert after.pop("phase_fedadam") == "adam"
    assert after.pop("phase_fedadam_tuned") == "adam"
    assert set(after.values()) == {"sgd"}
    # FedNova and its baseline share the unequal local work; the other arms keep the preset's 5 epochs
    for variant, work in [("phase_fednova", (2, 8)), ("phase_fedavg_lr01_unequal", (2, 8)), ("phase_fipa", (5, None))]:
        cfg = compose_config("sweep=matrix", "client=moon", f"variant={variant}", "experiment=fmnist_dirichlet")
        assert (cfg.federation.local_epochs, cfg.federation.local_epochs_max) == work


def test_the_2d_regression_sweep_runs_the_papers_arms_at_its_300s_budget():
    arms = {}
    for job in sweep_jobs("regression_2d")[0]:
        cfg = compose_config("sweep=regression_2d", *job)
        assert cfg.federation.time_budget_s == 300 and cfg.task.grid == 3  # 3 x 3 = 9 clients
        name = cfg.aggregator._target_.rsplit(".", 1)[-1] + ("" if cfg.aggregator.get("rank", 0) != 20 else " r20")
        arms[dict(o.split("=") for o in job)["variant"]] = (name, cfg.federation.local_epochs)
    assert arms == {"fedavg_tau1000": ("FedAvg", 1000), "fipa_full_tau200": ("FIPA", 200),
                    "fipa_full_tau500": ("FIPA", 500), "fipa": ("FIPA r20", 20), "fipa_tau200": ("FIPA r20", 200)}  # fmt: skip


def test_the_pinn_sweeps_use_each_presets_budget_and_the_10x_arm_scales_its_tau():
    allen_cahn = compose_config("sweep=pinn_budget", "experiment=allen_cahn", "variant=fedavg_10x")
    poisson = compose_config("sweep=pinn_budget", "experiment=poisson_2d", "variant=fipa")
    assert allen_cahn.federation.time_budget_s == 30 and poisson.federation.time_budget_s == 60
    assert allen_cahn.federation.local_epochs * allen_cahn.federation.local_epochs_scale == 1000
    assert compose_config("sweep=regression", "experiment=regression_1d_m8", "variant=fedavg_tau1000").federation.local_epochs == 1000
    assert compose_config("variant=fipa", "experiment=poisson_1d").aggregator.rank == 20


def test_local_epochs_scale_multiplies_the_local_epochs(tiny_config, tmp_path):
    scaled = run(tiny_config("federation.local_epochs=1", "federation.local_epochs_scale=3"), tmp_path / "scaled")
    plain = run(tiny_config("federation.local_epochs=3"), tmp_path / "plain")
    assert scaled["test_mse"] == plain["test_mse"]
    assert run(tiny_config("federation.local_epochs=1"), tmp_path / "one")["test_mse"] != plain["test_mse"]
