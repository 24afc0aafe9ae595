#!/usr/bin/env python
"""fipa's K-FAC factors against curvlinops' KFACLinearOperator: agreement and time, side by side in one process.

curvlinops (curvlinops-for-pytorch) is not a fipa dependency: this script is how the choice of fipa's own hooks
(fipa.curvature.kfac) was measured (issue 15). Install it beside fipa to rerun:

    pip install curvlinops-for-pytorch
    python benchmarks/compare_curvlinops.py                 # SmallCNN, 600 images (one fmnist client), 1 thread

For each layer it prints the largest entrywise difference of A and G relative to the largest entry (curvlinops'
type-2 Fisher is the exact GGN; with separate_weight_and_bias=False the bias joins A as fipa's does), then the
median seconds of each estimator over --repeats calls, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fipa.curvature.ggn import CurvatureGroup
from fipa.curvature.kfac import kfac_curvature, kfac_layers
from fipa.models import SmallCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--chunk", type=int, default=256, help="samples per forward pass (both libraries)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from curvlinops import KFACLinearOperator

    torch.set_num_threads(args.threads)
    model = SmallCNN(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.images,), generator=g)
    layers, _ = kfac_layers(model, [n for n, _ in model.named_parameters()])
    group = CurvatureGroup(output_fn=None, inputs=x, targets=y, loss="cross_entropy", weight=1 / args.images)
    batches = [(x[i : i + args.chunk], y[i : i + args.chunk]) for i in range(0, args.images, args.chunk)]

    def curvlinops(fisher_type: str):
        op = KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), batches,
                                check_deterministic=False, fisher_type=fisher_type,
                                separate_weight_and_bias=False, num_data=args.images)
        op.compute_kronecker_factors()
        return op

    def fipa(estimator: str):
        return kfac_curvature(model, layers, [group], estimator, torch.Generator().manual_seed(1), args.chunk)[0]

    theirs = curvlinops("type-2")
    for layer, (A, G) in zip(layers, fipa("ggn")):
        A2, G2 = theirs._input_covariances[layer.module], theirs._gradient_covariances[layer.module]
        print(f"layer {layer.module}: A {float((A - A2).abs().max() / A2.abs().max()):.1e}, "
              f"G {float((G - G2).abs().max() / G2.abs().max()):.1e} (relative max difference)")
    cases = {"fipa ggn": lambda: fipa("ggn"), "curvlinops type-2": lambda: curvlinops("type-2"),
             "fipa mc": lambda: fipa("mc"), "curvlinops mc": lambda: curvlinops("mc"),
             "fipa empirical": lambda: fipa("empirical"), "curvlinops empirical": lambda: curvlinops("empirical")}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"{name}: median {statistics.median(seconds):.3f} s over {len(seconds)}")


if __name__ == "__main__":
    main()
