"""Products with a client's generalized Gauss-Newton (GGN) matrix, from per-sample output functions.

    H = sum_groups weight * sum_i J_i^T S_i J_i,   J_i = d f(x_i; theta) / d theta  (C x p),
    S_i = Hessian of the loss w.r.t. the output z_i (MSE: I; softmax cross-entropy: diag(p_i) - p_i p_i^T).

Every S_i is written as s_i s_i^T with a factor s_i (C x k) (`output_factors`), so that

    H = B^T B,   row (i, j) of B = sqrt(weight) * s_ij^T J_i.

Three estimators choose s_i: "ggn" (exact S_i, k = C), "mc" (one Monte-Carlo sample, k = 1, E[s s^T] = S_i)
and "empirical" (the per-sample loss gradient w.r.t. z, k = 1: the empirical Fisher, biased).

All functions are pure and differentiate w.r.t. the `params` argument with torch.func; per-sample work is
vectorized with vmap over samples (processed in chunks of `chunk_size` samples), never a Python loop.

Monte-Carlo sampling (estimator "mc"): no function here advances the generator it is given. The noise is a
deterministic function of the generator's *state* (a copy of the generator is drawn from), so every call made
with the same generator -- e.g. all `curvature_matvec` calls of one randomized subspace iteration, and the
matching `factor_rows` / `curvature_diagonal` -- sees the same sample. For a fresh sample (next round, another
client), pass another generator or advance this one (e.g. `torch.randint(2**62, (1,), generator=g)`).
`generator=None` reads the state of torch's default CPU generator the same way. Noise is drawn in float64 per
group, up front, in sample order, so the sample does not depend on `chunk_size` or on the model's dtype:
MSE uses eps ~ N(0, I_C) per sample; cross-entropy uses u ~ U[0, 1) per sample and y~ = inverse-CDF(p, u).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

__all__ = [
    "ESTIMATORS",
    "LOSSES",
    "CurvatureGroup",
    "curvature_diagonal",
    "curvature_matvec",
    "factor_rows",
    "flatten_params",
    "output_factors",
    "subsample_groups",
    "unflatten_like",
]

ESTIMATORS = ("ggn", "mc", "empirical")
LOSSES = ("mse", "cross_entropy")


@dataclass(frozen=True)
class CurvatureGroup:
    """Samples that share one per-sample output function. H gets  weight * sum_i J_i^T S_i J_i.

    `output_fn(params, x_single)` returns the C outputs of ONE sample (it is called under torch.func.vmap, so
    it must be written for a single unbatched sample, typically with torch.func.functional_call).
    `targets`: mse (n, C) float, cross_entropy (n,) long; only the "empirical" estimator needs them.
    `loss`: "mse" (loss 1/2 ||z - y||^2, S = I) or "cross_entropy" (softmax CE).
    `weight`: e.g. 1/N for a mean-loss GGN, lambda_bc for PINN boundary residuals (must be >= 0).
    """

    output_fn: Callable[[dict[str, Tensor], Tensor], Tensor]
    inputs: Tensor
    targets: Tensor | None = None
    loss: str = "mse"
    weight: float = 1.0


def subsample_groups(
    groups: Sequence[CurvatureGroup], max_samples: int | None, generator: torch.Generator | None
) -> list[CurvatureGroup]:
    """At most `max_samples` samples per group: a uniform random subset without replacement, its weight scaled
    by n / max_samples, so the subsampled curvature is an unbiased estimate of the full one.

    The curvature's cost is linear in the samples (k backward passes each); large clients can trade variance
    for time. Groups no larger than the cap are returned unchanged and draw nothing from the generator.
    """
    if max_samples is None:
        return list(groups)
    subsampled = []
    for group in groups:
        n = len(group.inputs)
        if n <= max_samples:
            subsampled.append(group)
            continue
        keep = torch.randperm(n, generator=generator)[:max_samples].to(group.inputs.device)
        targets = None if group.targets is None else group.targets[keep]
        subsampled.append(
            replace(group, inputs=group.inputs[keep], targets=targets, weight=group.weight * n / max_samples)
        )
    return subsampled


# ----------------------------------------------------------------------------------------------- parameters


def flatten_params(params: dict[str, Tensor]) -> Tensor:
    """The parameters as one vector, in dict order (each tensor `.reshape(-1)`, concatenated)."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflatten_like(vec: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `flatten_params`: views of `vec` shaped like the entries of `params` (same keys and order).

    A leading batch of vectors is allowed: `vec` of shape (k, p) gives entries of shape (k, *param.shape).
    """
    sizes = [t.numel() for t in params.values()]
    lead = vec.shape[:-1]
    parts = vec.split(sizes, dim=-1)
    return {name: part.reshape(*lead, *t.shape) for (name, t), part in zip(params.items(), parts)}


def _flatten_batched(tree: dict[str, Tensor]) -> Tensor:
    """Entries of shape (k, *shape) -> (k, p), in dict order."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tree.values()], dim=1)


# ------------------------------------------------------------------------------------------- output factors


def _check(loss: str, estimator: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")


def _one_hot(labels: Tensor, num_classes: int, like: Tensor) -> Tensor:
    # A comparison instead of F.one_hot, which has no vmap batching rule (its output size is data dependent).
    classes = torch.arange(num_classes, device=like.device)
    return (labels.unsqueeze(-1) == classes).to(like.dtype)


def _factors(z: Tensor, targets: Tensor | None, noise: Tensor | None, loss: str, estimator: str) -> Tensor:
    """s with S ~= s s^T, shape (..., C, k) for outputs z of shape (..., C).

    Written for any leading shape, so it serves both a batch of outputs and a single sample under vmap.
    """
    num_out = z.shape[-1]
    if loss == "mse":
        if estimator == "ggn":
            return torch.eye(num_out, dtype=z.dtype, device=z.device).expand(*z.shape, num_out)
        if estimator == "mc":
            assert noise is not None  # drawn by the caller for the Monte-Carlo estimator
            return noise.to(z.dtype).unsqueeze(-1)
        assert targets is not None  # the empirical Fisher needs the labels
        return (z - targets.reshape(z.shape).to(z.dtype)).unsqueeze(-1)
    prob = torch.softmax(z, dim=-1)
    if estimator == "ggn":
        # A A^T = diag(p) - 2 p p^T + p (sum p) p^T = diag(p) - p p^T, since sum p = 1.
        sqrt_p = prob.sqrt()
        return torch.diag_embed(sqrt_p) - prob.unsqueeze(-1) * sqrt_p.unsqueeze(-2)
    if estimator == "mc":
        # Inverse-CDF sampling from one uniform per sample: vmap friendly and independent of chunking.
        cdf = prob.cumsum(dim=-1)
        assert noise is not None
        labels = (cdf < noise.to(z.dtype).unsqueeze(-1)).sum(dim=-1).clamp(max=num_out - 1)
    else:
        assert targets is not None
        labels = targets
    return (prob - _one_hot(labels, num_out, z)).unsqueeze(-1)


def _copy_generator(generator: torch.Generator | None) -> torch.Generator:
    """A copy of `generator` (or of the default CPU generator), so that drawing never advances the original."""
    source = torch.default_generator if generator is None else generator
    copy = torch.Generator(device=source.device)
    copy.set_state(source.get_state())
    return copy


def _draw_noise(shape: tuple[int, ...], loss: str, generator: torch.Generator) -> Tensor:
    """float64 noise for the mc factors: N(0, I) for mse (n, C); U[0, 1) for cross-entropy (n,)."""
    if loss == "mse":
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)
    return torch.rand(shape[:1], generator=generator, dtype=torch.float64, device=generator.device)


def output_factors(
    z: Tensor,
    targets: Tensor | None,
    loss: str,
    estimator: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n, C, k) factors s_i with S_i ~= s_i s_i^T, for outputs z (n, C).

    ggn/mse: identity (k = C); ggn/cross_entropy: A_i = diag(sqrt p) - p sqrt(p)^T (k = C, A A^T = diag(p) - p p^T);
    mc/mse: eps ~ N(0, I) (k = 1); mc/cross_entropy: p - onehot(y~ ~ Cat(p)) (k = 1);
    empirical/mse: z - y (k = 1); empirical/cross_entropy: p - onehot(y_true) (k = 1).
    For "mc" the sample is a function of the generator's state; the generator is not advanced (module docstring).
    """
    _check(loss, estimator)
    if estimator == "empirical" and targets is None:
        raise ValueError("the empirical estimator needs targets")
    noise = None
    if estimator == "mc":
        noise = _draw_noise(tuple(z.shape), loss, _copy_generator(generator)).to(z.device)
    return _factors(z, targets, noise, loss, estimator)


# ---------------------------------------------------------------------------------------- chunked sweeps


def _prepare(
    params: dict[str, Tensor],
    groups: Sequence[CurvatureGroup],
    estimator: str,
    generator: torch.Generator | None,
) -> tuple[dict[str, Tensor], list[Tensor | None]]:
    """Detached params, validated groups, and the per-group mc noise (None for deterministic estimators)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    params = {name: t.detach() for name, t in params.items()}
    for group in groups:
        _check(group.loss, estimator)
        if group.weight < 0:
            raise ValueError(f"a curvature group weight must be >= 0, got {group.weight}")
        if estimator == "empirical" and group.targets is None:
            raise ValueError("the empirical estimator needs targets in every CurvatureGroup")
        if group.targets is not None and group.targets.shape[0] != group.inputs.shape[0]:
            raise ValueError("CurvatureGroup targets and inputs have different numbers of samples")
    noises: list[Tensor | None] = [None] * len(groups)
    if estimator == "mc":
        gen = _copy_generator(generator)
        device = next(iter(params.values())).device
        for index, group in enumerate(groups):
            n = group.inputs.shape[0]
            num_out = 1
            if group.loss == "mse" and n > 0:  # need C: one probe forward of the first sample
                with torch.no_grad():
                    num_out = group.output_fn(params, group.inputs[0].detach()).numel()
            noises[index] = _draw_noise((n, num_out), group.loss, gen).to(device)
    return params, noises


def _chunks(
    group: CurvatureGroup, noise: Tensor | None, chunk_size: int | None
) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
    n = group.inputs.shape[0]
    step = n if chunk_size is None else int(chunk_size)
    if step < 1 and n > 0:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    for start in range(0, n, max(step, 1)):
        stop = start + step
        targets = None if group.targets is None else group.targets[start:stop].detach()
        yield group.inputs[start:stop].detach(), targets, None if noise is None else noise[start:stop]


def _single_output(output_fn: Callable) -> Callable:
    """output_fn with its result flattened to (C,), so scalar outputs also work."""
    return lambda params, x: output_fn(params, x).reshape(-1)


def _chunk_rows(
    params: dict[str, Tensor],
    group: CurvatureGroup,
    estimator: str,
    inputs: Tensor,
    targets: Tensor | None,
    noise: Tensor | None,
) -> Tensor:
    """Unscaled rows s_ij^T J_i of one chunk, shape (b, k, p): one vjp per factor column, vmapped twice.

    vjp with the k factor columns as cotangents costs k backward passes per sample instead of the C of a full
    Jacobian (k = 1 for mc and empirical).
    """
    f = _single_output(group.output_fn)

    def rows_one(x: Tensor, extra: tuple[Tensor | None, Tensor | None]) -> Tensor:
        target, eps = extra
        z, vjp_fn = vjp(lambda q: f(q, x), params)  # type: ignore[misc]
        s = _factors(z, target, eps, group.loss, estimator)  # (C, k)
        (grads,) = vmap(vjp_fn, in_dims=1)(s)
        return _flatten_batched(grads)  # (k, p)

    extra_dims = (None if targets is None else 0, None if noise is None else 0)
    return vmap(rows_one, in_dims=(0, extra_dims))(inputs, (targets, noise))


def factor_rows(
    params: dict[str, Tensor],
    groups: Sequence[CurvatureGroup],
    estimator: str = "ggn",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 256,
) -> Tensor:
    """Matrix B (m x p) with H = B^T B; row (i, j) = sqrt(weight) * s_ij^T J_i, rows ordered sample-major.

    Columns follow `flatten_params(params)`. m = sum over groups of n * k (k = C for ggn, 1 otherwise).
    """
    params, noises = _prepare(params, groups, estimator, generator)
    num_params = sum(t.numel() for t in params.values())
    ref = next(iter(params.values()))
    blocks = []
    for group, noise in zip(groups, noises):
        scale = math.sqrt(float(group.weight))
        for inputs, targets, eps in _chunks(group, noise, chunk_size):
            rows = _chunk_rows(params, group, estimator, inputs, targets, eps)
            blocks.append(scale * rows.reshape(-1, num_params))
    if not blocks:
        return ref.new_zeros(0, num_params)
    return torch.cat(blocks)


def curvature_matvec(
    params: dict[str, Tensor],
    groups: Sequence[CurvatureGroup],
    V: Tensor,
    estimator: str = "ggn",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 256,
) -> Tensor:
    """H @ V for V (p, k) or (p,), without forming B or H.

    Per chunk of samples: Z = J V by forward-mode jvp (vmapped over the k columns, the model vmapped over the
    samples), W = weight * s (s^T Z), then J^T W by one vjp of the batched outputs (vmapped over the columns),
    which also sums over the samples. Memory: one chunk's activations times k.
    Computed in the parameters' dtype; returned in V's dtype. For "mc", repeated calls with the same generator
    use the same sample (module docstring), as a subspace iteration needs.
    """
    params, noises = _prepare(params, groups, estimator, generator)
    ref = next(iter(params.values()))
    vector = V.dim() == 1
    block = V.unsqueeze(1) if vector else V
    tangents = unflatten_like(block.T.to(device=ref.device, dtype=ref.dtype).contiguous(), params)
    out = torch.zeros(block.shape[1], block.shape[0], dtype=ref.dtype, device=ref.device)  # (k, p)
    with warnings.catch_warnings():
        # torch's first forward-mode AD call loads jvp decompositions through torch.jit.script, which warns
        # (FutureWarning) about its own internals; nothing a caller can act on.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        for group, noise in zip(groups, noises):
            if group.weight == 0:
                continue
            f = _single_output(group.output_fn)
            for inputs, targets, eps in _chunks(group, noise, chunk_size):
                batched = lambda q, xs=inputs, f=f: vmap(f, in_dims=(None, 0))(q, xs)
                z, vjp_fn = vjp(batched, params)  # type: ignore[misc]
                jv = vmap(lambda t, fn=batched: jvp(fn, (params,), (t,))[1])(tangents)  # (k, b, C)
                s = _factors(z, targets, eps, group.loss, estimator)  # (b, C, kk)
                w = torch.einsum("bck,jbk->jbc", s, torch.einsum("bck,jbc->jbk", s, jv)) * float(group.weight)
                (grads,) = vmap(vjp_fn)(w)
                out += _flatten_batched(grads)
    result = out.T.to(V.dtype)
    return result.squeeze(1) if vector else result


def curvature_diagonal(
    params: dict[str, Tensor],
    groups: Sequence[CurvatureGroup],
    estimator: str = "ggn",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 256,
) -> Tensor:
    """diag(H) (p,) = column sums of B**2, accumulated chunk by chunk (memory of one chunk of rows)."""
    params, noises = _prepare(params, groups, estimator, generator)
    ref = next(iter(params.values()))
    diag = torch.zeros(sum(t.numel() for t in params.values()), dtype=ref.dtype, device=ref.device)
    for group, noise in zip(groups, noises):
        if group.weight == 0:
            continue
        for inputs, targets, eps in _chunks(group, noise, chunk_size):
            rows = _chunk_rows(params, group, estimator, inputs, targets, eps)
            diag += float(group.weight) * rows.square().sum(dim=(0, 1))
    return diag
