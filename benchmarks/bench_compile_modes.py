"""Which `torch.compile` pays for a local update (issue 13): the model, the loss, or the whole functional step.

One client of ``regression_1d_m4`` (400 points, MLP [1,20,20,20,1], float64, full-batch Adam lr 1e-4, one torch
thread), four hand-written update loops, each `--steps` updates from the same start:

* ``eager``: zero_grad, forward, MSE, backward, Adam step.
* ``compiled_model``: the same with ``torch.compile(model)``.
* ``compiled_loss``: the same with the forward + MSE as one compiled function.
* ``compiled_step``: ``torch.func.grad_and_value`` of the functional loss and torch.optim's functional Adam, each
  compiled (what ``trainer.compile=true`` does, fipa/local_steps.py).

Compilation happens in an untimed warm-up; then the arms are interleaved for ``--repeats`` rounds and the median
time per update is compared with ``eager``.

    python benchmarks/bench_compile_modes.py
    python benchmarks/bench_compile_modes.py --steps 50 --repeats 1     # seconds

Last line: ``ratio_compiled_model=.. ratio_compiled_loss=.. ratio_compiled_step=..`` (arm / eager, per update).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.optim._functional import adam


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                         nn.Linear(20, 1)).double()  # fmt: skip


def data(points: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(0.0, 0.25, points, dtype=torch.float64).unsqueeze(1)
    return x, torch.sin(4 * torch.pi * x)


def module_loop(forward, model: nn.Module, x, y, steps: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        forward(x, y).backward()
        optimizer.step()


def make_arms():
    x, y = data()
    eager_model, model_for_compile, loss_model, step_model = mlp(), mlp(), mlp(), mlp()
    compiled_model = torch.compile(model_for_compile)
    compiled_loss = torch.compile(lambda a, b: nn.functional.mse_loss(loss_model(a), b))

    def functional_loss(params, a, b):
        return nn.functional.mse_loss(functional_call(step_model, params, (a,)), b)

    compiled_grad = torch.compile(grad_and_value(functional_loss))

    @torch.compile
    def compiled_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr):
        adam(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], list(steps), amsgrad=False,
             beta1=0.9, beta2=0.999, lr=lr, weight_decay=0.0, eps=1e-8, maximize=False, capturable=False,
             differentiable=False, has_complex=False)  # fmt: skip

    def step_loop(steps: int) -> None:
        params = {n: p.detach().clone() for n, p in step_model.named_parameters()}
        exp_avgs = [torch.zeros_like(p) for p in params.values()]
        exp_avg_sqs = [torch.zeros_like(p) for p in params.values()]
        counts = [torch.tensor(0.0, dtype=torch.float64) for _ in params]
        lr = torch.tensor(1e-4, dtype=torch.float64)
        for _ in range(steps):
            grads, _ = compiled_grad(params, x, y)
            compiled_update(list(params.values()), [grads[n] for n in params], exp_avgs, exp_avg_sqs, counts, lr)

    return {
        "eager": lambda n: module_loop(lambda a, b: nn.functional.mse_loss(eager_model(a), b), eager_model, x, y, n),
        "compiled_model": lambda n: module_loop(
            lambda a, b: nn.functional.mse_loss(compiled_model(a), b), model_for_compile, x, y, n
        ),
        "compiled_loss": lambda n: module_loop(compiled_loss, loss_model, x, y, n),
        "compiled_step": step_loop,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="updates per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per arm")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    arms = make_arms()
    for run in arms.values():  # untimed: compilation and first-call costs
        run(3)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        order = list(arms)[repeat % len(arms) :] + list(arms)[: repeat % len(arms)]
        for name in order:
            start = time.perf_counter()
            arms[name](args.steps)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    per_step = {name: statistics.median(values) for name, values in times.items()}
    for name, value in per_step.items():
        print(f"{name:15s} {value:.3f} ms/update  ({value / per_step['eager']:.2f}x eager)")
    ratios = {f"ratio_{name}": per_step[name] / per_step["eager"] for name in arms if name != "eager"}
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return ratios


if __name__ == "__main__":
    main()
