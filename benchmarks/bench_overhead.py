"""Benchmark of the framework's overhead against a minimal hand-written PyTorch FedAvg loop.

Both sides do the same work on the ``regression_1d_m4`` preset (4 clients x 400 points, MLP [1,20,20,20,1],
float64, full-batch Adam lr 1e-4 rebuilt every round, test MSE on 1024 points after every round):

* ``framework``: ``hydra.compose(experiment=regression_1d_m4 aggregator=fedavg federation.local_epochs=TAU
  federation.rounds=R)``, ``fipa.train.build(cfg, tmpdir)`` (untimed), then ``trainer.fit()`` (timed):
  Lightning local fits, streaming FedAvg, per-round evaluation and the CSV recorder.
* ``hand``: a plain loop -- ``for round: for client: load global; Adam; TAU x (zero_grad, forward, MSE,
  backward, step); accumulate N_m * Delta_m`` -- on the very tensors of the framework's task object, starting
  from a copy of the framework's initial parameters, then the same evaluation after every round.

The two runs are interleaved (the order alternates between repeats, after one untimed warm-up repeat) in
one process; medians and the ratio framework / hand are reported per tau (issue target: <= 1.3x). Both
must end at the same test MSE (same math, same order of operations): the difference is printed and a
mismatch above ``--tolerance`` is flagged. The last line is ``ratio_tau20=X.XX ratio_tau1000=Y.YY``.

``import lightning`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, which makes every optimizer step probe NVML (a
failing ``dlopen`` of libnvidia-ml on a machine without a GPU). fipa drops the variable when it is imported
(``fipa/client.py``), before anything is timed here, so neither loop pays that probe; the script prints the
variable's value as seen by the timed runs.

    python benchmarks/bench_overhead.py                      # tau 20 x 10 rounds, tau 1000 x 2 rounds, 3 repeats
    python benchmarks/bench_overhead.py --profile 20         # plus a cProfile of one framework fit at tau 20
    python benchmarks/bench_overhead.py --rounds 2 1 --taus 3 5 --points 40 --repeats 1 --warmup 0   # seconds
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PRESET = "regression_1d_m4"
NVML_VAR = "PYTORCH_NVML_BASED_CUDA_CHECK"


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from fipa.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def build_framework(tau: int, rounds: int, points: int | None, seed: int, workdir: Path):
    from fipa.train import build

    overrides = [f"experiment={PRESET}", "aggregator=fedavg", f"federation.local_epochs={tau}",
                 f"federation.rounds={rounds}", f"seed={seed}", "torch_threads=1"]
    if points is not None:
        overrides.append(f"task.points_per_client={points}")
    trainer = build(compose_config(overrides), workdir)
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

    def __init__(self, trainer, rounds: int, tau: int):
        task = trainer.task
        self.model = plain_mlp_like(trainer.model)  # copied before the framework's fit touches it
        self.clients = [task.client_dataset(m).tensors for m in range(task.num_clients)]
        self.test_x, self.test_y = task.test_inputs, task.test_targets
        self.lr = float(trainer.executor.runner.module.optimizer_factory.keywords["lr"])
        self.rounds, self.tau = rounds, tau
        self.params = list(self.model.parameters())
        self.sizes = [p.numel() for p in self.params]

    def get(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def set(self, vector: torch.Tensor) -> None:
        for p, chunk in zip(self.params, vector.split(self.sizes)):
            p.copy_(chunk.view_as(p))

    @torch.no_grad()
    def evaluate(self) -> float:
        return F.mse_loss(self.model(self.test_x), self.test_y).item()

    def fit(self) -> float:
        model, params = self.model, self.params
        test_mse = self.evaluate()
        global_params = self.get()
        for _ in range(self.rounds):
            weighted_sum = torch.zeros_like(global_params)
            total = 0
            for x, y in self.clients:
                self.set(global_params)
                optimizer = torch.optim.Adam(params, lr=self.lr)  # fresh state every round
                for _ in range(self.tau):
                    optimizer.zero_grad()
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    optimizer.step()
                weighted_sum.add_(self.get() - global_params, alpha=len(x))
                total += len(x)
            global_params = global_params + (1.0 / total) * weighted_sum
            self.set(global_params)
            test_mse = self.evaluate()
        return test_mse


def profile_framework(tau: int, rounds: int, points: int | None, seed: int, top: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_framework(tau, rounds, points, seed, Path(tmp))
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
    ap.add_argument("--rounds", type=int, nargs="+", default=[10, 2],
                    help="rounds for each tau (one value: the same for all)")
    ap.add_argument("--points", type=int, default=None, help="points per client (default: the preset's 400)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed interleaved repeats first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-10,
                    help="largest accepted |test_mse framework - hand| / test_mse")
    ap.add_argument("--profile", type=int, nargs="?", const=20, default=None, metavar="TAU",
                    help="also cProfile one framework fit at this tau (default 20) and print the top functions")
    ap.add_argument("--profile-top", type=int, default=25)
    args = ap.parse_args(argv)
    if len(args.rounds) == 1:
        args.rounds = args.rounds * len(args.taus)
    if len(args.rounds) != len(args.taus):
        ap.error("--rounds takes one value or one per --taus value")

    torch.set_num_threads(1)
    import lightning

    print(f"preset={PRESET} taus={args.taus} rounds={args.rounds} repeats={args.repeats} warmup={args.warmup} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} lightning={lightning.__version__}")

    ratios: dict[str, float] = {}
    nvml_seen: set[str | None] = set()  # the variable's value when each timed run starts
    with tempfile.TemporaryDirectory() as tmp:
        for tau, rounds in zip(args.taus, args.rounds):
            times: dict[str, list[float]] = {"framework": [], "hand": []}
            mse: dict[str, float] = {}
            for rep in range(args.warmup + args.repeats):
                framework = build_framework(tau, rounds, args.points, args.seed, Path(tmp) / f"tau{tau}_rep{rep}")
                hand = HandFedAvg(framework, rounds, tau)
                runs = {"framework": lambda framework=framework: framework.fit()[framework.task.metric], "hand": hand.fit}
                order = ["framework", "hand"] if rep % 2 == 0 else ["hand", "framework"]
                for name in order:
                    nvml_seen.add(os.environ.get(NVML_VAR))
                    start = time.perf_counter()
                    mse[name] = runs[name]()
                    seconds = time.perf_counter() - start
                    if rep >= args.warmup:
                        times[name].append(seconds)
                if rep >= args.warmup:
                    print(f"tau={tau} repeat {rep - args.warmup + 1}: framework={times['framework'][-1]:.3f}s "
                          f"hand={times['hand'][-1]:.3f}s")
            med = {name: statistics.median(values) for name, values in times.items()}
            ratio = med["framework"] / med["hand"]
            steps = rounds * framework.task.num_clients * tau
            diff = abs(mse["framework"] - mse["hand"])
            rel = diff / max(abs(mse["hand"]), 1e-300)
            verdict = "OK" if rel <= args.tolerance else f"MISMATCH (> {args.tolerance:g})"
            print(f"tau={tau} rounds={rounds} steps={steps}: framework {med['framework']:.3f}s "
                  f"({1e3 * med['framework'] / steps:.3f} ms/step), hand {med['hand']:.3f}s "
                  f"({1e3 * med['hand'] / steps:.3f} ms/step), ratio {ratio:.2f}x (target <= 1.3x)")
            print(f"tau={tau} final test_mse: framework {mse['framework']:.12e} hand {mse['hand']:.12e} "
                  f"|diff| {diff:.2e} (rel {rel:.2e}) {verdict}")
            ratios[f"ratio_tau{tau}"] = ratio
            ratios[f"mse_rel_diff_tau{tau}"] = rel

    if args.profile is not None:
        print(f"\ncProfile of one framework fit, tau={args.profile}, rounds={args.rounds[0]}:")
        print(profile_framework(args.profile, args.rounds[0], args.points, args.seed, args.profile_top))

    seen = ", ".join(sorted("unset" if v is None else repr(v) for v in nvml_seen)) or "none timed"
    print(f"{NVML_VAR} during the timed runs: {seen}"
          f"{'' if nvml_seen <= {None} else ' (NOT unset: every optimizer step probes NVML)'}")
    print(" ".join(f"ratio_tau{tau}={ratios[f'ratio_tau{tau}']:.2f}" for tau in args.taus))
    return ratios


if __name__ == "__main__":
    main()
