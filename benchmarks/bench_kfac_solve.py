#!/usr/bin/env python
"""The K-FAC server solve, per layer of SmallCNN, side by side in one process: fipa's `kfac_solve` (CG
preconditioned with the Kronecker product of the mean factors) against Jacobi-preconditioned CG.

Factors: exact-GGN K-FAC factors of 5 synthetic clients (128 images each, differently scaled and shifted inputs,
so their factors differ as label-skewed clients' do), at the dampings of fipa_kfac (beta 0.5 and 0.1) and of
FedFisher-K-FAC (1e-4). For each it prints the CG iterations and seconds of both (fipa's including its two
eigendecompositions), to relative residual 1e-8 (cap 1000), and ends with, per damping, Jacobi's total seconds over
fipa's.

    python benchmarks/bench_kfac_solve.py
    python benchmarks/bench_kfac_solve.py --clients 2 --images 16 --dampings 0.5   # seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from fipa.curvature.ggn import CurvatureGroup
from fipa.curvature.kfac import (
    conjugate_gradient,
    kfac_curvature,
    kfac_layers,
    kfac_solve,
    kron_sum_matvec,
)
from fipa.models import SmallCNN


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.5, 0.1, 1e-4])
    ap.add_argument("--max-iters", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = SmallCNN(generator=torch.Generator().manual_seed(0))
    layers, _ = kfac_layers(model, [n for n, _ in model.named_parameters()])
    factors = []
    for m in range(args.clients):
        g = torch.Generator().manual_seed(m)
        x = torch.randn(args.images, 1, 28, 28, generator=g) * (1 + m) + m
        y = torch.randint(0, 10, (args.images,), generator=g)
        factors.append(kfac_curvature(model, layers, [CurvatureGroup(None, x, y, "cross_entropy", 1 / args.images)])[0])
    weights = torch.full((args.clients,), 1 / args.clients, dtype=torch.float64)
    results: dict[str, float] = {}
    for damping in args.dampings:
        totals = {"jacobi": 0.0, "fipa": 0.0}
        for index, layer in enumerate(layers):
            Gs = torch.stack([f[index][1] for f in factors]).double()
            As = torch.stack([f[index][0] for f in factors]).double()
            B = torch.randn(layer.out_dim, layer.in_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

            def matvec(X):
                return kron_sum_matvec(Gs, As, weights, X) + damping * X

            diagonal = torch.einsum("m,mi,mj->ij", weights, Gs.diagonal(dim1=1, dim2=2), As.diagonal(dim1=1, dim2=2))
            start = time.perf_counter()
            _, jacobi = conjugate_gradient(matvec, B, None, lambda R: R / (diagonal + damping), 1e-8, args.max_iters)
            jacobi_s = time.perf_counter() - start
            start = time.perf_counter()
            _, kron = kfac_solve(Gs, As, weights, B, damping, 1e-8, args.max_iters)
            kron_s = time.perf_counter() - start
            totals["jacobi"] += jacobi_s
            totals["fipa"] += kron_s
            print(f"damping {damping:g} layer {layer.module} ({layer.out_dim}x{layer.in_dim}): jacobi {jacobi} "
                  f"iterations {jacobi_s:.3f}s | fipa (kronecker) {kron} iterations {kron_s:.3f}s", flush=True)
        results[f"ratio_jacobi_over_fipa_{damping:g}"] = totals["jacobi"] / totals["fipa"]
    print(" ".join(f"{k}={v:.2f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
