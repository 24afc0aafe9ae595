"""Benchmark of a FIPA round against a FedAvg round with the same local work.

Side by side in one process: one trainer per case, rounds driven with ``FederatedTrainer.run_round`` (plus
the ``flat.set`` that ``fit`` does; no evaluation, as in ``fit``'s ``round_s``), the cases interleaved
round by round with a rotating order, after ``--warmup-rounds`` untimed rounds. Medians and ratios:

(i) regression (``experiment=regression_1d_m4``, tau 20, float64, 1 thread): ``aggregator=fipa`` (r 20) and
    ``aggregator=fipa_full`` against ``aggregator=fedavg``. Targets: FIPA round / FedAvg round <= 4x and
    FIPA round <= 0.2 s. The rows' ``curvature_s`` (summed over clients) and ``aggregate_s`` give the breakdown.
(ii) CNN: ``SmallCNN`` (55k parameters, float32) on synthetic 28x28 images (random labels fixed by the seed),
    SGD lr 0.05, batch 50, 1 local epoch; FIPA r 20, eigensolver=auto (oversample 10, power_iters 2),
    damped solver (beta 0.5, gamma 0.5: the image setting of FIPA_SPEC 5.3) against FedAvg. Target <= 4x.
(iii) on that CNN: the FIPA clients' curvature time / the FedAvg clients' local-training time of one epoch
    (both summed over the round's clients; client training time is Lightning's ``client_time_s``).

(iv) ``--fmnist``: the fmnist_dirichlet preset (SmallCNN), FedAvg against the rules of ``--fmnist-cases``
    (fipa_damped, fipa_lastlayer and fipa_kfac by default), ratios of the median round times.
(v) ``--resnet``: ResNet-20-GN (the paper's CIFAR-10 model) on synthetic 3x32x32 images, FedAvg against
    fipa_kfac (factors from 128 images per client): round ratio and curvature per local epoch.

Ends with the line
``ratio_regression_fipa=.. ratio_regression_fipa_full=.. ratio_cnn_fipa=.. ratio_cnn_curvature_per_epoch=..``.

    python benchmarks/bench_fipa_round.py                        # full size
    python benchmarks/bench_fipa_round.py --threads 2            # CNN part on 2 threads
    python benchmarks/bench_fipa_round.py --profile cnn          # plus a cProfile of one FIPA CNN round
    python benchmarks/bench_fipa_round.py --sample-block 32      # smaller curvature chunks (faster on CNNs)
    python benchmarks/bench_fipa_round.py --rounds 2 --cnn-rounds 1 --warmup-rounds 1 --tau 2 --points 40 \\
        --clients 2 --images 10 --test-images 10                 # a few seconds
    python benchmarks/bench_fipa_round.py --skip-regression --skip-cnn --fmnist --fmnist-cases fipa_kfac \
        --fmnist-rounds 2 --fmnist-override task.train_subset=3000 task.test_subset=200   # K-FAC smoke, seconds
    python benchmarks/bench_fipa_round.py --skip-regression --skip-cnn --resnet --resnet-images 20 \
        --resnet-curvature-samples 8 --test-images 10 --resnet-rounds 1      # ResNet-20 K-FAC smoke, seconds
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fipa.train import build, compose

PRESET = "regression_1d_m4"


# ------------------------------------------------------------------------------------------ instrumentation


class RoundRunner:
    """Drives one trainer round by round and keeps per-round timings (wall, curvature, aggregation, clients)."""

    def __init__(self, name: str, trainer):
        self.name = name
        self.trainer = trainer
        trainer.show_progress = False
        self.global_params = trainer.flat.get()
        self.round_idx = 0
        self.records: list[dict[str, float]] = []
        self._client_times: list[float] = []
        for local_trainer in trainer.executor.runner.local_trainers:
            local_trainer.fit = self._timed(local_trainer.fit)

    def _timed(self, fit):
        @functools.wraps(fit)
        def timed_fit(module, loader, epochs):  # records each local fit's client_time_s (Lightning fit incl. hooks)
            metrics = fit(module, loader, epochs)
            self._client_times.append(metrics["client_time_s"])
            return metrics

        return timed_fit

    def run(self, record: bool) -> float:
        self.round_idx += 1
        self._client_times = []
        start = time.perf_counter()
        new_params, row = self.trainer.run_round(self.round_idx, self.global_params)
        self.trainer.flat.set(new_params)
        seconds = time.perf_counter() - start
        self.global_params = new_params
        if record:
            client_s = sum(self._client_times)
            self.records.append({
                "round_s": seconds,
                "curvature_s": float(row.get("curvature_s", 0.0)),
                "aggregate_s": float(row.get("aggregate_s", 0.0)),
                "client_s": client_s,
                "train_s": client_s - float(row.get("curvature_s", 0.0)),
                "bytes_up": float(row.get("bytes_up", 0.0)),
            })
        return seconds

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.records)


def interleave(runners: list[RoundRunner], rounds: int, warmup: int, label: str) -> None:
    for k in range(warmup + rounds):
        shift = k % len(runners)
        order = runners[shift:] + runners[:shift]
        times = {r.name: r.run(record=k >= warmup) for r in order}
        tag = "warm-up" if k < warmup else f"round {k - warmup + 1}"
        print(f"{label} {tag}: " + "  ".join(f"{r.name}={times[r.name]:.3f}s" for r in runners), flush=True)


def report(runners: list[RoundRunner], label: str) -> None:
    for r in runners:
        print(f"{label} {r.name}: median round {r.median('round_s'):.4f}s = clients {r.median('client_s'):.4f}s "
              f"(of which curvature {r.median('curvature_s'):.4f}s, training {r.median('train_s'):.4f}s) "
              f"+ aggregate {r.median('aggregate_s'):.4f}s; upload {r.median('bytes_up') / 1e6:.2f} MB "
              f"({r.median('bytes_up') / runners[0].median('bytes_up'):.1f}x {runners[0].name}'s)")


def profile_round(runner: RoundRunner, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    runner.run(record=False)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(top)
    out.write("\n--- by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------- builders


def regression_trainer(aggregator: str, tau: int, rounds: int, points: int | None, seed: int, workdir: Path):
    from hydra import compose, initialize_config_dir

    from fipa.train import CONFIG_DIR, build

    overrides = [f"experiment={PRESET}", f"aggregator={aggregator}", f"federation.local_epochs={tau}",
                 f"federation.rounds={rounds}", f"seed={seed}", "torch_threads=1"]
    if points is not None:
        overrides.append(f"task.points_per_client={points}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return build(cfg, workdir / aggregator)


def synthetic_images(clients: int, images: int, test_images: int, classes: int, seed: int, shape=(1, 28, 28)):
    gen = torch.Generator().manual_seed(seed)
    client_data = [
        (torch.randn(images, *shape, generator=gen), torch.randint(0, classes, (images,), generator=gen))
        for _ in range(clients)
    ]
    test_data = (torch.randn(test_images, *shape, generator=gen),
                 torch.randint(0, classes, (test_images,), generator=gen))
    return client_data, test_data


def cnn_trainer(aggregator: str, args, rounds: int):
    from fipa.aggregators import FIPA, FedAvg
    from fipa.components import assemble
    from fipa.config import FederationConfig
    from fipa.federated_trainer import FederatedTrainer
    from fipa.models import SmallCNN
    from fipa.seeding import INIT, torch_generator
    from fipa.tasks.classification import ClassificationTask

    classes = 10
    client_data, test_data = synthetic_images(args.clients, args.images, args.test_images, classes, args.seed)
    task = ClassificationTask(client_data=client_data, test_data=test_data, num_classes=classes,
                              batch_size=args.batch_size)
    model = SmallCNN(in_features=1, out_features=classes, generator=torch_generator(args.seed, INIT))
    if aggregator == "fipa":
        agg = FIPA(rank=args.cnn_rank, step_size=1.0, solver="damped", beta=0.5, gamma=0.5,
                   eigensolver=args.eigensolver, oversample=args.oversample, power_iters=args.power_iters,
                   sample_block=args.sample_block, seed=args.seed)
    else:
        agg = FedAvg()
    federation = FederationConfig(rounds=rounds, local_epochs=args.cnn_epochs)
    parts = assemble(task, model, functools.partial(torch.optim.SGD, lr=args.lr), agg, federation, seed=args.seed)
    return FederatedTrainer.from_components(parts, show_progress=False)


def resnet_trainer(aggregator: str, args, rounds: int):
    """ResNet-20-GN (the paper's CIFAR-10 model, 269,722 parameters) on CIFAR-shaped synthetic images: the cost of a
    round does not depend on the pixels, and CIFAR-10 needs a download this machine cannot make."""
    from fipa.aggregators import FIPA, FedAvg
    from fipa.components import assemble
    from fipa.config import FederationConfig
    from fipa.federated_trainer import FederatedTrainer
    from fipa.models import ResNet20GN
    from fipa.seeding import INIT, torch_generator
    from fipa.tasks.classification import ClassificationTask

    classes = 10
    client_data, test_data = synthetic_images(args.resnet_clients, args.resnet_images, args.test_images, classes,
                                              args.seed, shape=(3, 32, 32))
    task = ClassificationTask(client_data=client_data, test_data=test_data, num_classes=classes,
                              batch_size=args.batch_size)
    model = ResNet20GN(generator=torch_generator(args.seed, INIT))
    if aggregator == "fipa_kfac":  # conf/aggregator/fipa_kfac.yaml with cifar10_resnet20's 128 curvature images
        agg = FIPA(rank=None, step_size=1.0, solver="damped", beta=0.1, gamma=0.5, representation="kfac",
                   curvature_samples=args.resnet_curvature_samples, sample_block=args.sample_block, seed=args.seed)
    else:
        agg = FedAvg()
    federation = FederationConfig(rounds=rounds, local_epochs=args.resnet_epochs)
    parts = assemble(task, model, functools.partial(torch.optim.SGD, lr=args.lr), agg, federation, seed=args.seed)
    return FederatedTrainer.from_components(parts, show_progress=False)


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="timed regression rounds per case")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds per case first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-regression", action="store_true")
    ap.add_argument("--skip-cnn", action="store_true")
    g = ap.add_argument_group("regression (i)")
    g.add_argument("--tau", type=int, default=20, help="local epochs")
    g.add_argument("--points", type=int, default=None, help="points per client (default: the preset's 400)")
    g = ap.add_argument_group("CNN (ii, iii)")
    g.add_argument("--cnn-rounds", type=int, default=3,
                   help="timed CNN rounds per case (a FIPA CNN round takes minutes at full size)")
    g.add_argument("--clients", type=int, default=4)
    g.add_argument("--images", type=int, default=300, help="images per client")
    g.add_argument("--test-images", type=int, default=500)
    g.add_argument("--batch-size", type=int, default=50)
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--cnn-epochs", type=int, default=1, help="local epochs")
    g.add_argument("--cnn-rank", type=int, default=20)
    g.add_argument("--oversample", type=int, default=10)
    g.add_argument("--power-iters", type=int, default=2)
    g.add_argument("--sample-block", type=int, default=32, help="FIPA sample_block (curvature chunk size; fipa_damped's default)")
    g.add_argument("--eigensolver", default="auto", choices=["auto", "exact", "randomized"],
                   help="auto (fipa_damped's default) builds the Jacobian rows when they fit in 2 GiB; randomized is matrix-free")
    g.add_argument("--threads", type=int, default=1, help="torch threads for the CNN part (regression: always 1)")
    g = ap.add_argument_group("Fashion-MNIST (iv): needs the data (Debian's dataset-fashion-mnist)")
    g.add_argument("--fmnist", action="store_true", help="also time the fmnist_dirichlet preset (minutes per FIPA round)")
    g.add_argument("--fmnist-rounds", type=int, default=2)
    g.add_argument("--fmnist-override", nargs="*", default=[], help="extra overrides, e.g. +preset.fipa_curvature_samples=128")
    g.add_argument("--fmnist-cases", default="fipa,fipa_lastlayer,fipa_kfac",
                   help="comma-separated rules timed against fedavg: fipa (fipa_damped), fipa_lastlayer, fipa_kfac "
                        "(factors from the preset's 128 images), fipa_kfac_all (from all images), fipa_kfac_k32 (factors "
                        "uploaded as 32 eigenpairs), fipa_kfac_mc "
                        "(all images, Monte-Carlo), fedfisher, fedfisher_kfac")
    g = ap.add_argument_group("ResNet-20-GN (v): synthetic 3x32x32 images, FedAvg against fipa_kfac")
    g.add_argument("--resnet", action="store_true", help="also time ResNet-20-GN rounds (a minute or more each)")
    g.add_argument("--resnet-rounds", type=int, default=2)
    g.add_argument("--resnet-clients", type=int, default=5, help="clients per round (the paper: 5 of 100)")
    g.add_argument("--resnet-images", type=int, default=500, help="images per client (CIFAR-10 over 100 clients)")
    g.add_argument("--resnet-epochs", type=int, default=1, help="local epochs (the paper: 5; time scales linearly)")
    g.add_argument("--resnet-curvature-samples", type=int, default=128)
    ap.add_argument("--profile", choices=["regression", "regression_full", "cnn"], action="append", default=[],
                    help="after timing, cProfile one more FIPA round of this case (repeatable)")
    ap.add_argument("--profile-top", type=int, default=25)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.cnn_rounds < 1:
        ap.error("--rounds and --cnn-rounds must be >= 1")

    import lightning

    print(f"rounds={args.rounds} cnn_rounds={args.cnn_rounds} warmup_rounds={args.warmup_rounds} torch={torch.__version__} "
          f"lightning={lightning.__version__}", flush=True)
    results: dict[str, float] = {}
    profiles: list[tuple[str, RoundRunner]] = []

    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_regression:
            torch.set_num_threads(1)
            print(f"\n(i) {PRESET}: tau={args.tau}, points/client={args.points or 'preset (400)'}, "
                  f"threads={torch.get_num_threads()}", flush=True)
            total = args.warmup_rounds + args.rounds + len(args.profile)
            runners = [RoundRunner(name, regression_trainer(name, args.tau, total, args.points, args.seed, Path(tmp)))
                       for name in ("fedavg", "fipa", "fipa_full")]
            interleave(runners, args.rounds, args.warmup_rounds, "regression")
            report(runners, "regression")
            fedavg, fipa, fipa_full = runners
            results["ratio_regression_fipa"] = fipa.median("round_s") / fedavg.median("round_s")
            results["ratio_regression_fipa_full"] = fipa_full.median("round_s") / fedavg.median("round_s")
            results["regression_fipa_round_s"] = fipa.median("round_s")
            results["regression_fipa_full_round_s"] = fipa_full.median("round_s")
            for name, runner in (("fipa", fipa), ("fipa_full", fipa_full)):
                r = results[f"ratio_regression_{name}"]
                s = runner.median("round_s")
                print(f"regression {name}/fedavg round time = {s:.4f}s / {fedavg.median('round_s'):.4f}s = {r:.2f}x "
                      f"(target <= 4x: {'met' if r <= 4 else 'MISSED'}); {name} round {s:.4f}s "
                      f"(target <= 0.2 s/round: {'met' if s <= 0.2 else 'MISSED'})")
            if "regression" in args.profile:
                profiles.append(("regression fipa", fipa))
            if "regression_full" in args.profile:
                profiles.append(("regression fipa_full", fipa_full))

        if not args.skip_cnn:
            torch.set_num_threads(args.threads)
            total = args.warmup_rounds + args.cnn_rounds + len(args.profile)
            runners = [RoundRunner(name, cnn_trainer(name, args, total)) for name in ("fedavg", "fipa")]
            p = runners[0].trainer.flat.numel
            print(f"\n(ii) SmallCNN p={p} float32: clients={args.clients} images/client={args.images} "
                  f"batch={args.batch_size} epochs={args.cnn_epochs}; FIPA rank={args.cnn_rank} eigensolver={args.eigensolver} "
                  f"(oversample {args.oversample}, power_iters {args.power_iters}, sample_block {args.sample_block}); "
                  f"threads={torch.get_num_threads()}", flush=True)
            interleave(runners, args.cnn_rounds, args.warmup_rounds, "cnn")
            report(runners, "cnn")
            fedavg, fipa = runners
            ratio = fipa.median("round_s") / fedavg.median("round_s")
            results["ratio_cnn_fipa"] = ratio
            print(f"cnn fipa/fedavg round time = {fipa.median('round_s'):.4f}s / {fedavg.median('round_s'):.4f}s "
                  f"= {ratio:.2f}x (target <= 4x: {'met' if ratio <= 4 else 'MISSED'})")
            epoch_s = fedavg.median("train_s") / args.cnn_epochs
            curv = fipa.median("curvature_s") / epoch_s
            results["ratio_cnn_curvature_per_epoch"] = curv
            print(f"(iii) cnn curvature / one local epoch = {fipa.median('curvature_s'):.4f}s / {epoch_s:.4f}s "
                  f"= {curv:.2f}x (curvature_s of the FIPA clients vs local-training time per epoch of the "
                  f"FedAvg clients, both summed over clients)")
            if "cnn" in args.profile:
                profiles.append(("cnn fipa", fipa))

        if args.fmnist:
            total = args.warmup_rounds + args.fmnist_rounds
            base = ["experiment=fmnist_dirichlet", "torch_threads=1", f"federation.rounds={total}", f"seed={args.seed}",
                    *args.fmnist_override]
            lowrank = [f"aggregator.eigensolver={args.eigensolver}"]  # K-FAC has no eigensolver
            known = {"fipa": ["aggregator=fipa_damped", *lowrank], "fipa_lastlayer": ["aggregator=fipa_lastlayer", *lowrank],
                     "fipa_kfac": ["aggregator=fipa_kfac"],
                     "fipa_kfac_all": ["aggregator=fipa_kfac", "aggregator.curvature_samples=null"],
                     "fipa_kfac_k32": ["aggregator=fipa_kfac", "aggregator.factor_rank=32"],
                     "fipa_kfac_mc": ["aggregator=fipa_kfac", "aggregator.estimator=mc", "aggregator.curvature_samples=null"],
                     "fedfisher": ["aggregator=fedfisher"], "fedfisher_kfac": ["aggregator=fedfisher_kfac"]}
            chosen = [c for c in args.fmnist_cases.split(",") if c]
            unknown = [c for c in chosen if c not in known]
            if unknown:
                ap.error(f"--fmnist-cases: unknown {', '.join(unknown)}; known: {', '.join(known)}")
            cases = {"fedavg": ["aggregator=fedavg"], **{c: known[c] for c in chosen}}
            with tempfile.TemporaryDirectory() as tmp:
                runners = []
                for name, overrides in cases.items():
                    extra = [o for o in base if not (name == "fedavg" and o.startswith("aggregator."))]
                    runners.append(RoundRunner(name, build(compose([*extra, *overrides]), Path(tmp) / name)))
                torch.set_num_threads(1)
                print(f"\n(iv) fmnist_dirichlet: SmallCNN, 5 of 100 clients x 600 images, 5 local epochs, batch 50; "
                      f"against FedAvg: {', '.join(chosen)} (fipa: full model r=20 damped, fipa_lastlayer: r=10, "
                      f"eigensolver={args.eigensolver}; fipa_kfac: K-FAC, damped CG)", flush=True)
                interleave(runners, args.fmnist_rounds, args.warmup_rounds, "fmnist")
            report(runners, "fmnist")
            fedavg = runners[0]
            epoch_s = fedavg.median("train_s") / 5  # 5 local epochs, summed over the round's clients
            for runner in runners[1:]:
                ratio = runner.median("round_s") / fedavg.median("round_s")
                curv = runner.median("curvature_s") / epoch_s
                results[f"ratio_fmnist_{runner.name}"] = ratio
                results[f"ratio_fmnist_{runner.name}_curvature_per_epoch"] = curv
                print(f"fmnist {runner.name}/fedavg round time = {runner.median('round_s'):.3f}s / "
                      f"{fedavg.median('round_s'):.3f}s = {ratio:.2f}x; curvature / one local epoch = {curv:.2f}x")

        if args.resnet:
            torch.set_num_threads(args.threads)
            total = args.warmup_rounds + args.resnet_rounds
            runners = [RoundRunner(name, resnet_trainer(name, args, total)) for name in ("fedavg", "fipa_kfac")]
            print(f"\n(v) ResNet-20-GN: {args.resnet_clients} clients x {args.resnet_images} synthetic 3x32x32 images, "
                  f"{args.resnet_epochs} local epoch(s), batch {args.batch_size}, threads={torch.get_num_threads()}; "
                  f"fipa_kfac: K-FAC from {args.resnet_curvature_samples} images per client", flush=True)
            interleave(runners, args.resnet_rounds, args.warmup_rounds, "resnet")
            report(runners, "resnet")
            fedavg, kfac = runners
            epoch_s = fedavg.median("train_s") / args.resnet_epochs
            results["ratio_resnet_fipa_kfac"] = kfac.median("round_s") / fedavg.median("round_s")
            results["ratio_resnet_fipa_kfac_curvature_per_epoch"] = kfac.median("curvature_s") / epoch_s
            results["resnet_fedavg_round_s"] = fedavg.median("round_s")
            results["resnet_fipa_kfac_round_s"] = kfac.median("round_s")
            print(f"resnet fipa_kfac/fedavg round time = {kfac.median('round_s'):.2f}s / {fedavg.median('round_s'):.2f}s "
                  f"= {results['ratio_resnet_fipa_kfac']:.2f}x; curvature / one local epoch = "
                  f"{results['ratio_resnet_fipa_kfac_curvature_per_epoch']:.2f}x")

        for label, runner in profiles:
            if label.startswith("cnn"):
                torch.set_num_threads(args.threads)
            else:
                torch.set_num_threads(1)
            print(f"\ncProfile of one {label} round:")
            print(profile_round(runner, args.profile_top))

    keys = ["ratio_resnet_fipa_kfac", "ratio_resnet_fipa_kfac_curvature_per_epoch", "ratio_regression_fipa", "ratio_regression_fipa_full", "ratio_cnn_fipa", "ratio_cnn_curvature_per_epoch",
            *(f"ratio_fmnist_{n}{suffix}" for n in ("fipa", "fipa_lastlayer", "fipa_kfac", "fipa_kfac_all", "fipa_kfac_k32", "fipa_kfac_mc", "fedfisher", "fedfisher_kfac") for suffix in ("", "_curvature_per_epoch"))]
    print(" ".join(f"{k}={results[k]:.2f}" for k in keys if k in results))
    return results


if __name__ == "__main__":
    main()
