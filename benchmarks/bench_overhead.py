"""Benchmark of the framework's local loop against hand-written PyTorch FedAvg loops, eager and compiled.

Every arm does the same work on the ``regression_1d_m4`` preset (4 clients x 400 points, MLP [1,20,20,20,1],
float64, full-batch Adam lr 1e-4 rebuilt every round, FedAvg, test MSE on 1024 points after every round):

* ``framework``: ``fipa.train.build`` of ``experiment=regression_1d_m4 aggregator=fedavg
  federation.local_epochs=TAU`` and ``trainer.fit()``: Lightning local fits (the tau full-batch updates inside
  one Lightning step), streaming FedAvg, per-round evaluation and the CSV recorder.
* ``framework_compiled``: the same with ``trainer.compile=true``.
* ``hand``: a plain loop -- ``for round: for client: load global; Adam; TAU x (zero_grad, forward, MSE,
  backward, step); accumulate N_m * Delta_m`` -- on the very tensors of the framework's task object, from a copy
  of the framework's initial parameters, with the same evaluation after every round. Adam with torch's defaults,
  as the framework's config has it.
* ``hand_compiled``: the best a PyTorch program does here: the same loop with each update one
  ``torch.compile``d function (``torch.func.grad_and_value`` of the functional loss and torch.optim's functional
  Adam, learning rate and step count as tensors).

Time is measured per round (local training + aggregation, as the framework's ``round_s``; evaluation is left out
of both), and the first round of every arm is left out: it holds the compilation of the compiled arms (reported
apart as ``compile_s``) and the first-call costs of the eager ones. The arms are interleaved (the order rotates
between repeats, after one untimed warm-up repeat) in one process; medians of the per-round times are compared.
The framework must end at the hand loop's test MSE bit for bit, and the compiled arms within ``--tolerance``
(relative) of it.

    python benchmarks/bench_overhead.py                  # tau 20 x 10 rounds, tau 1000 x 3 rounds, 3 repeats
    python benchmarks/bench_overhead.py --profile 20     # plus a cProfile of one framework fit at tau 20
    python benchmarks/bench_overhead.py --rounds 3 --taus 3 5 --points 40 --repeats 1 --warmup 0   # seconds

Last line: ``ratio_tau20=.. ratio_tau1000=.. ratio_compiled_tau20=.. ratio_compiled_tau1000=..
ratio_compiled_vs_hand_compiled_tau20=.. ratio_compiled_vs_hand_compiled_tau1000=..`` (framework arm / hand arm).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.adam import adam as functional_adam
from torch import nn

PRESET = "regression_1d_m4"
ARMS = ("framework", "framework_compiled", "hand", "hand_compiled")


def build_framework(tau: int, rounds: int, points: int | None, seed: int, workdir: Path, compiled: bool):
    from fipa.train import build, compose

    overrides = [f"experiment={PRESET}", "aggregator=fedavg", f"federation.local_epochs={tau}",
                 f"federation.rounds={rounds}", f"seed={seed}", "torch_threads=1",
                 f"trainer.compile={str(compiled).lower()}"]  # fmt: skip
    if points is not None:
        overrides.append(f"task.points_per_client={points}")
    trainer = build(compose(overrides), workdir)
    trainer.show_progress = False
    return trainer


def plain_mlp_like(model: nn.Module) -> nn.Sequential:
    """A plain nn.Sequential of the same Linear/Tanh layers carrying a copy of `model`'s parameters."""
    layers: list[nn.Module] = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            new = nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(layer.weight)
                new.bias.copy_(layer.bias)
            layers.append(new)
        elif isinstance(layer, nn.Tanh):
            layers.append(nn.Tanh())
        else:
            raise TypeError(f"unexpected layer {layer!r} in the preset model")
    return nn.Sequential(*layers)


class HandFedAvg:
    """The minimal loop: the same data, init, steps, dtype and per-round evaluation as the framework."""

    def __init__(self, trainer, rounds: int, tau: int, compiled: bool):
        task = trainer.task
        self.model = plain_mlp_like(trainer.model)  # copied before the framework's fit touches it
        self.clients = [task.client_dataset(m).tensors for m in range(task.num_clients)]
        self.test_x, self.test_y = task.test_inputs, task.test_targets
        self.lr = float(trainer.executor.runner.module.optimizer_factory.keywords["lr"])
        self.rounds, self.tau = rounds, tau
        self.params = list(self.model.parameters())
        self.names = [name for name, _ in self.model.named_parameters()]
        self.sizes = [p.numel() for p in self.params]
        self.local_fit = self._compiled_fit if compiled else self._eager_fit
        if compiled:
            self._step = torch.compile(self._functional_step)
            self._lr = torch.tensor(self.lr, dtype=torch.float64)

    def get(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def set(self, vector: torch.Tensor) -> None:
        for p, chunk in zip(self.params, vector.split(self.sizes)):
            p.copy_(chunk.view_as(p))

    @torch.no_grad()
    def evaluate(self) -> float:
        return F.mse_loss(self.model(self.test_x), self.test_y).item()

    def _eager_fit(self, x, y) -> None:
        model, optimizer = self.model, torch.optim.Adam(self.params, lr=self.lr)  # fresh state every round
        for _ in range(self.tau):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()

    def _loss(self, params, x, y):
        return F.mse_loss(torch.func.functional_call(self.model, dict(zip(self.names, params)), (x,)), y)

    def _functional_step(self, params, exp_avgs, exp_avg_sqs, steps, lr, x, y):
        grads, loss = torch.func.grad_and_value(self._loss)([p.detach() for p in params], x, y)
        with torch.no_grad():
            functional_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False, capturable=False,
                                  amsgrad=False, beta1=0.9, beta2=0.999, lr=lr, weight_decay=0.0, eps=1e-8,
                                  maximize=False)  # fmt: skip
        return loss

    def _compiled_fit(self, x, y) -> None:
        zeros = [torch.zeros_like(p) for p in self.params]
        exp_avgs, exp_avg_sqs = zeros, [torch.zeros_like(p) for p in self.params]
        steps = [torch.zeros((), dtype=torch.float64) for _ in self.params]
        for _ in range(self.tau):
            self._step(self.params, exp_avgs, exp_avg_sqs, steps, self._lr, x, y)

    def fit(self) -> tuple[float, list[float]]:
        test_mse = self.evaluate()
        global_params = self.get()
        round_times = []
        for _ in range(self.rounds):
            start = time.perf_counter()
            weighted_sum = torch.zeros_like(global_params)
            total = 0
            for x, y in self.clients:
                self.set(global_params)
                self.local_fit(x, y)
                weighted_sum.add_(self.get() - global_params, alpha=len(x))
                total += len(x)
            global_params = global_params + (1.0 / total) * weighted_sum
            self.set(global_params)
            round_times.append(time.perf_counter() - start)
            test_mse = self.evaluate()
        return test_mse, round_times


def framework_fit(trainer) -> tuple[float, list[float]]:
    summary = trainer.fit()
    return summary[trainer.task.metric], [row["round_s"] for row in trainer.history]


def profile_framework(tau: int, rounds: int, points: int | None, seed: int, top: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_framework(tau, rounds, points, seed, Path(tmp), compiled=False)
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.fit()
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(top)
    out.write("\n--- by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--taus", type=int, nargs="+", default=[20, 1000], help="local epochs per round")
    ap.add_argument("--rounds", type=int, nargs="+", default=[10, 3],
                    help="rounds for each tau, at least 2 (one value: the same for all); round 1 is not timed")
    ap.add_argument("--points", type=int, default=None, help="points per client (default: the preset's 400)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed interleaved repeats first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-9,
                    help="largest accepted |test_mse compiled - eager| / test_mse")
    ap.add_argument("--profile", type=int, nargs="?", const=20, default=None, metavar="TAU",
                    help="also cProfile one framework fit at this tau (default 20) and print the top functions")
    ap.add_argument("--profile-top", type=int, default=25)
    args = ap.parse_args(argv)  # fmt: skip
    if len(args.rounds) == 1:
        args.rounds = args.rounds * len(args.taus)
    if len(args.rounds) != len(args.taus) or min(args.rounds) < 2:
        ap.error("--rounds takes one value or one per --taus value, each at least 2")

    torch.set_num_threads(1)
    import lightning

    print(f"preset={PRESET} taus={args.taus} rounds={args.rounds} repeats={args.repeats} warmup={args.warmup} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} lightning={lightning.__version__}")

    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tau, rounds in zip(args.taus, args.rounds):
            per_round: dict[str, list[float]] = {arm: [] for arm in ARMS}
            first: dict[str, list[float]] = {arm: [] for arm in ARMS}
            mse: dict[str, float] = {}
            for rep in range(args.warmup + args.repeats):
                workdir = Path(tmp) / f"tau{tau}_rep{rep}"
                frameworks = {arm: build_framework(tau, rounds, args.points, args.seed, workdir / arm,
                                                   compiled=arm.endswith("compiled"))
                              for arm in ("framework", "framework_compiled")}  # fmt: skip
                fits = {
                    "framework": lambda: framework_fit(frameworks["framework"]),
                    "framework_compiled": lambda: framework_fit(frameworks["framework_compiled"]),
                    "hand": HandFedAvg(frameworks["framework"], rounds, tau, compiled=False).fit,
                    "hand_compiled": HandFedAvg(frameworks["framework"], rounds, tau, compiled=True).fit,
                }
                order = ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]
                for arm in order:
                    mse[arm], times = fits[arm]()
                    if rep >= args.warmup:
                        per_round[arm] += times[1:]
                        first[arm].append(times[0] - statistics.median(times[1:]))
                if rep >= args.warmup:
                    print(f"tau={tau} repeat {rep - args.warmup + 1}: " + " ".join(
                        f"{arm}={statistics.median(per_round[arm][-(rounds - 1):]):.4f}s" for arm in ARMS))  # fmt: skip
            med = {arm: statistics.median(values) for arm, values in per_round.items()}
            steps = frameworks["framework"].task.num_clients * tau
            print(f"tau={tau}: median round time, {steps} local steps per round:")
            for arm in ARMS:
                compile_note = f", round 1 +{statistics.median(first[arm]):.1f}s" if arm.endswith("compiled") else ""
                print(f"  {arm:19s} {med[arm]:.4f}s ({1e3 * med[arm] / steps:.3f} ms/step{compile_note})")
            ratios[f"ratio_tau{tau}"] = med["framework"] / med["hand"]
            ratios[f"ratio_compiled_tau{tau}"] = med["framework_compiled"] / med["hand"]
            ratios[f"ratio_compiled_vs_hand_compiled_tau{tau}"] = med["framework_compiled"] / med["hand_compiled"]
            ratios[f"compile_s_tau{tau}"] = statistics.median(first["framework_compiled"])
            print(f"  framework / hand {ratios[f'ratio_tau{tau}']:.2f}x (target <= 1.0x); framework compiled / hand "
                  f"{ratios[f'ratio_compiled_tau{tau}']:.2f}x (target <= 0.6x at tau 1000); framework compiled / "
                  f"hand compiled {ratios[f'ratio_compiled_vs_hand_compiled_tau{tau}']:.2f}x")  # fmt: skip
            exact = mse["framework"] == mse["hand"]
            drift = {arm: abs(mse[arm] - mse["hand"]) / abs(mse["hand"]) for arm in ("framework_compiled", "hand_compiled")}
            ok = exact and all(v <= args.tolerance for v in drift.values())
            print(f"  final test_mse: hand {mse['hand']:.12e}; framework {'bit-identical' if exact else 'DIFFERS'}; "
                  f"compiled arms rel {drift['framework_compiled']:.1e} / {drift['hand_compiled']:.1e} "
                  f"{'OK' if ok else 'MISMATCH'}")  # fmt: skip
            ratios[f"mse_rel_diff_compiled_tau{tau}"] = drift["framework_compiled"]

    if args.profile is not None:
        print(f"\ncProfile of one framework fit, tau={args.profile}, rounds={args.rounds[0]}:")
        print(profile_framework(args.profile, args.rounds[0], args.points, args.seed, args.profile_top))

    keys = [f"{kind}_tau{tau}" for kind in ("ratio", "ratio_compiled", "ratio_compiled_vs_hand_compiled")
            for tau in args.taus]  # fmt: skip
    print(" ".join(f"{key}={ratios[key]:.2f}" for key in keys))
    return ratios


if __name__ == "__main__":
    main()
