"""The robust FIPA variants (issue 14) against dense p x p references on tiny problems: the complement step, the
FedAvg-anchored Levenberg-Marquardt solve with its adaptive damping, and the authors' per-client cut-off."""

import math

import pytest
import torch

from fipa.aggregators import FIPA
from fipa.aggregators.functional import weighted_average
from fipa.client import ClientUpdate
from fipa.curvature.eigen import top_eigenpairs_from_rows
from fipa.errors import ConfigError
from test_fipa import fipa_round

DT = torch.float64


def clients(p=7, ranks=(2, 2), counts=(3, 5), seed=5, loss=None, gradients=False):
    """Rank-deficient client curvatures H_m = A_m A_m^T, their updates, and the dense H, b, FedAvg step."""
    gen = torch.Generator().manual_seed(seed)
    updates, H, b, deltas = [], torch.zeros(p, p, dtype=DT), torch.zeros(p, dtype=DT), []
    total = sum(counts)
    for m, (r, n) in enumerate(zip(ranks, counts)):
        A = torch.randn(p, r, generator=gen, dtype=DT) * torch.linspace(1.0, 0.05, r, dtype=DT)
        Hm, delta = A @ A.T, torch.randn(p, generator=gen, dtype=DT)
        low = top_eigenpairs_from_rows(A.T, None)
        stats = {"eigenvectors": low.eigenvectors, "eigenvalues": low.eigenvalues}
        if loss is not None:
            stats["start_loss"] = torch.tensor([loss[m]], dtype=DT)
        if gradients:
            stats["gradient"] = torch.randn(p, generator=gen, dtype=DT)
        updates.append(ClientUpdate(m, n, delta, stats))
        H += n / total * Hm
        b += n / total * Hm @ delta
        deltas.append(delta)
    return updates, H, b, weighted_average(deltas, list(counts))


def kept_projector(H, rcond):
    evals, evecs = torch.linalg.eigh(H)
    kept = evecs[:, evals > rcond * evals.max()]
    return kept @ kept.T


@pytest.mark.parametrize("rcond", [1e-5, 0.2])
def test_the_complement_step_adds_the_fedavg_step_outside_the_solves_subspace(rcond):
    updates, H, b, fedavg = clients()
    start = torch.zeros(7, dtype=DT)
    result = fipa_round(FIPA(rank=None, step_size=0.5, rcond=rcond, complement_step=0.8), start, updates, 7)
    P = kept_projector(H, rcond)
    expected = 0.5 * torch.linalg.pinv(H, rtol=rcond, hermitian=True) @ b + 0.8 * (fedavg - P @ fedavg)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-11)
    plain = fipa_round(FIPA(rank=None, step_size=0.5, rcond=rcond), start, updates, 7)
    assert (plain - expected).norm() > 1e-3  # the paper's rule drops that part


def test_the_complement_step_with_the_damped_solve_uses_the_span_of_the_factors():
    updates, H, b, fedavg = clients()
    agg = FIPA(rank=None, solver="damped", beta=0.3, gamma=0.9, step_size=1.0, complement_step=0.5)
    result = fipa_round(agg, torch.zeros(7, dtype=DT), updates, 7)
    span = torch.linalg.qr(torch.cat([u.statistics["eigenvectors"] for u in updates], dim=1))[0]
    damped = 0.9 * 0.3 * torch.linalg.solve(H + 0.3 * torch.eye(7, dtype=DT), b)
    expected = damped + 0.5 * (fedavg - span @ (span.T @ fedavg))
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-11)
    share = agg.diagnostics()["complement_share"]
    assert share == pytest.approx(float((0.5 * (fedavg - span @ (span.T @ fedavg))).norm() / expected.norm()))


@pytest.mark.parametrize("nu", [1e-4, 0.3, 30.0])
def test_the_anchored_solve_is_the_dense_levenberg_marquardt_step_towards_fedavg(nu):
    updates, H, b, fedavg = clients()
    start = torch.randn(7, dtype=DT, generator=torch.Generator().manual_seed(0))
    agg = FIPA(rank=None, solver="anchored", damping=nu, step_size=0.7)
    result = fipa_round(agg, start, updates, 7)
    mu = nu * float(torch.linalg.eigvalsh(H).max())
    expected = start + 0.7 * torch.linalg.solve(H + mu * torch.eye(7, dtype=DT), b + mu * fedavg)
    torch.testing.assert_close(result, expected, rtol=1e-8, atol=1e-10)
    assert agg.diagnostics()["damping"] == nu


def test_the_anchor_step_scales_only_the_fedavg_part_of_the_anchored_solve():
    updates, H, b, fedavg = clients()
    start = torch.randn(7, dtype=DT, generator=torch.Generator().manual_seed(0))
    agg = FIPA(rank=None, solver="anchored", damping=0.3, step_size=0.5, anchor_step=1.0)
    result = fipa_round(agg, start, updates, 7)
    mu = 0.3 * float(torch.linalg.eigvalsh(H).max())
    damped = H + mu * torch.eye(7, dtype=DT)
    expected = start + 0.5 * torch.linalg.solve(damped, b) + 1.0 * torch.linalg.solve(damped, mu * fedavg)
    torch.testing.assert_close(result, expected, rtol=1e-8, atol=1e-10)
    # nu -> inf: the FedAvg step itself, with FedAvg's step 1 (the whole-solve scaling would give 0.5 of it)
    far = fipa_round(FIPA(rank=None, solver="anchored", damping=1e4, step_size=0.5, anchor_step=1.0), start, updates, 7)
    assert float((far - start - fedavg).norm()) < 1e-3 * float(fedavg.norm())


def run_rounds(agg, losses_per_round, p=7):
    """One round per entry: round k broadcasts its own start point, its clients report these losses there and
    upload the round's own problem. Returns the damping in force, the outputs, and each round's (start, H, b, g)."""
    nus, outputs, problems = [], [], []
    agg.rejected = []
    for k, losses in enumerate(losses_per_round, 1):
        updates, H, b, fedavg = clients(loss=losses, seed=10 + k)
        start = torch.randn(p, dtype=DT, generator=torch.Generator().manual_seed(k))
        agg.begin_round(k)
        outputs.append(fipa_round(agg, start, updates, p))
        nus.append(agg.diagnostics()["damping"])
        agg.rejected.append(agg.diagnostics().get("step_rejected"))
        problems.append((start, H, b, fedavg))
    return nus, outputs, problems


def anchored_from(problem, nu, step):
    start, H, b, fedavg = problem
    mu = nu * float(torch.linalg.eigvalsh(H).max())
    return start + step * torch.linalg.solve(H + mu * torch.eye(len(b), dtype=DT), b + mu * fedavg)


def test_the_trust_region_accepts_steps_that_do_not_raise_the_clients_loss_and_retries_the_others():
    agg = FIPA(rank=None, solver="anchored", damping=1e-2, adaptive_damping=True, damping_factor=4.0, step_size=0.5)
    # means weighted by N = (3, 5): 1.375 (first: accepted), 0.6875 (<= 1.375: accepted, damping / 4), 0.7
    # (> 0.6875: rejected, damping x 4), 0.7 again (rejected, x 4), 0.5 (<= 0.6875: accepted, / 4)
    nus, outputs, problems = run_rounds(agg, [[2.0, 1.0], [1.0, 0.5], [1.2, 0.4], [1.2, 0.4], [0.5, 0.5]])
    assert nus == pytest.approx([1e-2, 1e-2 / 4, 1e-2, 4e-2, 1e-2])
    assert agg.rejected == [0, 0, 1, 1, 0]
    for k, accepted_round in ((0, 0), (1, 1), (2, 1), (3, 1), (4, 4)):  # rejected rounds re-solve round 2's problem
        expected = anchored_from(problems[accepted_round], nus[k], 0.5)
        torch.testing.assert_close(outputs[k], expected, rtol=1e-8, atol=1e-10)


def test_the_trust_region_state_survives_a_checkpoint():
    make = lambda: FIPA(rank=None, solver="anchored", damping=1e-2, adaptive_damping=True, damping_factor=4.0)
    agg = make()
    run_rounds(agg, [[2.0, 1.0], [1.0, 0.5]])
    resumed = make()
    resumed.load_state_dict(agg.state_dict())  # a resumed run continues from the same accepted point and damping
    _, expected, _ = run_rounds(agg, [[1.2, 0.4]])
    nus, outputs, _ = run_rounds(resumed, [[1.2, 0.4]])
    assert nus == [1e-2] and torch.equal(outputs[0], expected[0])  # rejected in both: round 2's problem again


def test_adaptive_damping_stays_within_its_bounds():
    agg = FIPA(rank=None, solver="anchored", damping=1e3, adaptive_damping=True, damping_factor=100.0)
    nus, _, _ = run_rounds(agg, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert nus[-1] == 1e4


def test_the_damping_schedule_starts_near_fedavg_and_decays_to_its_floor():
    agg = FIPA(rank=None, solver="anchored", damping=1e-3, damping_start=0.1, damping_decay=0.25, step_size=0.5)
    nus, outputs, problems = run_rounds(agg, [[1.0, 1.0]] * 6)
    assert nus == pytest.approx([0.1, 0.025, 0.00625, 0.0015625, 1e-3, 1e-3])  # 0.1 x 0.25^k, floored at `damping`
    for output, problem, nu in zip(outputs, problems, nus):  # each round is the dense LM step at its damping
        torch.testing.assert_close(output, anchored_from(problem, nu, 0.5), rtol=1e-8, atol=1e-10)
    start, *_, fedavg = problems[0]
    huge = FIPA(rank=None, solver="anchored", damping=1e-3, damping_start=1e4, step_size=1.0)
    first, *_ = run_rounds(huge, [[1.0, 1.0]])[1]  # mu -> inf: the first round is FedAvg's step
    assert float((first - start - fedavg).norm()) < 1e-3 * float(fedavg.norm())


def test_the_damping_schedule_resumes_where_it_stopped():
    make = lambda: FIPA(rank=None, solver="anchored", damping=1e-3, damping_start=0.1, damping_decay=0.5)
    agg = make()
    run_rounds(agg, [[1.0, 1.0]] * 2)
    resumed = make()
    resumed.load_state_dict(agg.state_dict())
    assert run_rounds(resumed, [[1.0, 1.0]])[0] == pytest.approx([0.025])


def test_the_authors_cutoff_keeps_each_clients_eigenpairs_above_its_threshold():
    p, C, k = 7, 3.0, 2
    updates, *_ = clients(ranks=(3, 3), gradients=True)
    agg = FIPA(rank=None, adaptive_cutoff=C, step_size=1.0)
    agg.begin_round(k)
    result = fipa_round(agg, torch.zeros(p, dtype=DT), updates, p)
    total = sum(u.statistics["gradient"] for u in updates).norm()
    H, b, cutoffs = torch.zeros(p, p, dtype=DT), torch.zeros(p, dtype=DT), []
    for u in updates:  # the dense reference: each client's factor cut, then the ordinary FIPA solve
        U, lam = u.statistics["eigenvectors"], u.statistics["eigenvalues"]
        thr = min(max(C / (k * (u.statistics["gradient"].norm() + total + 1e-12)), 0.0), 0.99)
        keep = lam > thr * lam.max()
        Hm = U[:, keep] @ torch.diag(lam[keep]) @ U[:, keep].T
        H += u.num_samples / 8 * Hm
        b += u.num_samples / 8 * Hm @ u.delta
        cutoffs.append(float(thr))
    assert 0 < min(cutoffs) and any(int((u.statistics["eigenvalues"] > 0).sum()) > 0 for u in updates)
    expected = torch.linalg.pinv(H, rtol=1e-5, hermitian=True) @ b
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-11)
    assert agg.diagnostics()["cutoff_mean"] == pytest.approx(sum(cutoffs) / 2)
    no_cut = fipa_round(FIPA(rank=None, step_size=1.0), torch.zeros(p, dtype=DT), clients(ranks=(3, 3))[0], p)
    assert (no_cut - expected).norm() > 1e-6  # the cut removed some eigenpairs


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"complement_step": 0.5, "solver": "anchored"}, "complement_step=0.5 has no effect with solver=anchored"),
        ({"damping": 0.1}, "damping=0.1 has no effect with solver=pinv"),
        ({"adaptive_damping": True, "solver": "damped"}, "adaptive_damping=True has no effect with solver=damped"),
        ({"representation": "diagonal", "rank": None, "adaptive_cutoff": 1.0}, "adaptive_cutoff=1.0 has no effect"),
        ({"solver": "anchored", "damping": 0.0}, "aggregator.damping must be in"),
        ({"solver": "anchored", "adaptive_damping": True, "damping_factor": 1.0}, "damping_factor must be > 1"),
        ({"complement_step": -1.0}, "complement_step must be >= 0"),
        ({"solver": "anchored", "damping_decay": 0.5}, "damping_decay=0.5 has no effect with damping_start unset"),
        ({"solver": "anchored", "damping": 1e-2, "damping_start": 1e-3}, "damping_start must be in"),
        ({"solver": "anchored", "damping_start": 1.0, "damping_decay": 1.0}, "damping_decay must be in"),
        ({"solver": "anchored", "damping_start": 1.0, "adaptive_damping": True, "damping_decay": 0.5},
         "damping_decay=0.5 has no effect with adaptive_damping"),
        ({"damping_start": 1.0}, "damping_start=1.0 has no effect with solver=pinv"),
        ({"anchor_step": 1.0}, "anchor_step=1.0 has no effect with solver=pinv"),
        ({"solver": "anchored", "anchor_step": 0.0}, "anchor_step must be > 0"),
        ({"adaptive_epochs": 0.1}, "adaptive_epochs needs aggregator.adaptive_cutoff"),
        ({"adaptive_epochs": 0.1, "adaptive_cutoff": 1.0, "curvature_at": "epoch_end"}, "needs curvature_at=start"),
        ({"max_local_epochs": 50}, "max_local_epochs=50 has no effect with adaptive_epochs unset"),
    ],
)
def test_robust_settings_follow_the_mode_rules(settings, message):
    with pytest.raises(ConfigError, match=message):
        FIPA(**settings)


def read_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_variants_run_from_the_config_and_count_what_clients_upload(tiny_config, tmp_path):
    from fipa.train import run

    p = 20 + 20 * 20 * 2 + 20 * 3 + 21  # MLP [1, 20, 20, 20, 1]
    run(tiny_config("aggregator=fipa", "aggregator.solver=anchored", "aggregator.adaptive_damping=true",
                    "aggregator.adaptive_cutoff=1.0"), tmp_path / "lm")  # fmt: skip
    rows = read_rows(tmp_path / "lm" / "metrics.csv")
    for row in rows:
        assert int(row["bytes_up_start_loss"]) == 4 * 8 and int(row["bytes_up_gradient"]) == 4 * p * 8
        assert float(row["damping"]) > 0 and row["step_rejected"] in ("0.0", "1.0")
        assert 0 <= float(row["cutoff_mean"]) <= 0.99
    run(tiny_config("aggregator=fipa", "aggregator.adaptive_cutoff=1.0", "aggregator.adaptive_epochs=0.1",
                    "aggregator.max_local_epochs=9"), tmp_path / "epochs")  # fmt: skip
    assert all(1 <= float(r["local_epochs_mean"]) <= 9 for r in read_rows(tmp_path / "epochs" / "metrics.csv"))
    run(tiny_config("aggregator=fipa", "aggregator.complement_step=1.0"), tmp_path / "complement")
    assert all(0 <= float(r["complement_share"]) <= 1 for r in read_rows(tmp_path / "complement" / "metrics.csv"))


def test_a_resumed_trust_region_run_ends_as_the_uninterrupted_one(tiny_config, tmp_path):
    from conftest import resumed_equals_uninterrupted

    overrides = ["aggregator=fipa", "aggregator.solver=anchored", "aggregator.adaptive_damping=true"]
    assert resumed_equals_uninterrupted(tiny_config, overrides, tmp_path)


def test_adaptive_local_epochs_by_hand():
    from fipa.curvature.adaptive import adaptive_local_epochs, kept_by_cutoff, relative_cutoff

    lam = torch.tensor([2.0, 0.5, 1e-3], dtype=DT)
    # thr = 1 / (2 (3 + 7)) = 0.05: 0.5 > 0.05 x 2 is kept, 1e-3 is not
    assert relative_cutoff(1.0, 2, 3.0, 7.0) == pytest.approx(0.05)
    assert kept_by_cutoff(lam, 0.05).tolist() == [True, True, False]
    assert relative_cutoff(100.0, 1, 0.1, 0.1) == 0.99  # clipped: at least the largest stays
    kept = lam[kept_by_cutoff(lam, 0.05)]
    # target 1 / (2 x 10) = 0.05, rho = 1 - 0.1 x 0.5 = 0.95: ceil(log 0.05 / log 0.95) = ceil(58.40) = 59
    assert adaptive_local_epochs(kept, 10.0, 2, 0.1, 1.0, 200) == 59
    assert adaptive_local_epochs(kept, 10.0, 2, 0.1, 1.0, 40) == 40  # the cap
    assert adaptive_local_epochs(kept, 0.1, 2, 0.1, 1.0, 200) == 1  # the gradient is already below the target
    assert adaptive_local_epochs(kept, 10.0, 2, 3.0, 1.0, 200) == 1  # lr x lambda_min >= 1: one step overshoots
    assert adaptive_local_epochs(kept[:0], 10.0, 2, 0.1, 1.0, 200) == 200  # nothing kept: no contraction known


@pytest.mark.parametrize("real_epochs", [False, True], ids=["fused", "real-epochs"])
def test_each_client_trains_the_adaptive_epochs_it_reports(real_epochs):
    from test_local_steps import NeedsEpochs, StepRecorder, job, runner_for

    from fipa.curvature.adaptive import adaptive_local_epochs, kept_by_cutoff, relative_cutoff

    recorder = StepRecorder()
    runner = runner_for("aggregator=fipa", "aggregator.rank=null", "aggregator.adaptive_cutoff=1.0",
                        "aggregator.adaptive_epochs=0.1", "aggregator.max_local_epochs=60",
                        "task.points_per_client=40", "federation.local_epochs=7", "optimizer.lr=0.01",
                        extra=[recorder, *([NeedsEpochs()] if real_epochs else [])])  # fmt: skip
    assert runner.local_trainers[0].epochs_in_one_step is not real_epochs
    update, _ = job(runner, round_idx=2)
    stats = update.statistics  # the client's own view: no server norm in a job without round state
    g = float(stats["gradient"].norm())
    lam = stats["eigenvalues"]
    expected = adaptive_local_epochs(lam[kept_by_cutoff(lam, relative_cutoff(1.0, 2, g, g))], g, 2, 0.01, 0.1, 60)
    assert expected != 7 and update.metrics["local_epochs"] == expected
    assert recorder.calls.count("before_optimizer_step") == expected


def test_the_server_tells_clients_last_rounds_gradient_norm_and_checkpoints_it():
    p = 7
    updates, *_ = clients(ranks=(3, 3), gradients=True)
    agg = FIPA(rank=None, adaptive_cutoff=1.0, adaptive_epochs=0.1)
    agg.begin_round(1)
    assert agg.round_state() == {"gradient_sum_norm": None}  # round 1: each client uses its own norm
    fipa_round(agg, torch.zeros(p, dtype=DT), updates, p)
    total = float(sum(u.statistics["gradient"] for u in updates).norm())
    assert agg.round_state() == {"gradient_sum_norm": pytest.approx(total)}
    resumed = FIPA(rank=None, adaptive_cutoff=1.0, adaptive_epochs=0.1)
    resumed.load_state_dict(agg.state_dict())
    assert resumed.round_state() == agg.round_state()
    assert FIPA(rank=None, adaptive_cutoff=1.0).round_state() is None  # nothing to tell without adaptive epochs
