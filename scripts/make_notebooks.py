#!/usr/bin/env python
"""Write the notebooks in notebooks/ from the cell sources below (outputs stripped by construction).

    python scripts/make_notebooks.py            # after editing a cell here; commit the .ipynb files with it

One notebook per task family (regression, pinn, image). Each draws runs on disk with fipa.results and
fipa.plotting: `RESULTS = None` makes a few tiny real runs into notebook_runs/<notebook>/ first (seconds), a
directory (a Hydra sweep, a scripts/pinn_table.py or image_table.py output) draws those runs instead. Keeping the
source here makes notebook diffs reviewable; cell ids are fixed so regenerating changes nothing by itself.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def md(text: str):
    return new_markdown_cell(dedent(text).strip())


def code(*parts: str, sep: str = "\n\n"):
    """A code cell from source parts (each dedented on its own), joined by a blank line."""
    return new_code_cell(sep.join(dedent(part).strip() for part in parts))


def settings(results_example: str, out: str, metric: str, plots: str, results: str) -> str:
    """The first code cell: imports (`plots` from fipa.plotting, `results` from fipa.results) and the knobs."""
    return f"""
        from pathlib import Path

        from hydra import compose, initialize_config_dir
        from IPython.display import Image, Markdown, display

        import fipa.train
        from fipa.plotting import {plots}
        from fipa.results import {results}

        RESULTS = None  # e.g. '{results_example}': draw those runs, train nothing
        OUT = Path('notebook_runs') / '{out}'  # the tiny runs, and the figures in OUT / 'figures'
        METRIC = '{metric}'
        """


PLOT_IMPORTS = "plot_learning_curves, plot_prediction_panels"
RESULT_IMPORTS = "arm_table, completed_runs, load_runs, markdown_table"

TRAIN = """
    def train(name, *overrides):
        \"\"\"One real run into OUT / name: the config fipa-train would compose, run by fipa.train.run.\"\"\"
        with initialize_config_dir(config_dir=fipa.train.CONFIG_DIR, version_base='1.3'):
            cfg = compose('train', overrides=list(overrides))
        return fipa.train.run(cfg, OUT / name)
    """

# After `def problem(run)`: the completed runs, split by problem (a sweep may hold several presets).
LOAD = """
    runs, left_out = completed_runs(load_runs(RESULTS or OUT))
    for line in left_out:  # unfinished or failed runs, each with the reason
        print('left out:', line)
    groups = {}
    for run in runs:
        groups.setdefault(problem(run), []).append(run)
    print({name: len(group) for name, group in groups.items()})

    FIGURES = OUT / 'figures'
    FIGURES.mkdir(parents=True, exist_ok=True)
    slug = lambda name: ''.join(c if c.isalnum() else '_' for c in name)  # a file name per problem
    """

# Seeds of one arm (runs that differ only by seed) are pooled by fipa.results.
TABLE = """
    for name, group in groups.items():
        display(Markdown(f'**{name}**: final {METRIC} over seeds\\n\\n' + markdown_table(arm_table(group, METRIC))))
    """

CURVES = """
    for name, group in groups.items():
        path = FIGURES / f'{slug(name)}_curves.png'
        plot_learning_curves(group, METRIC, path, title=name)
        display(Image(filename=str(path)))
    """

PANELS = """
    for name, group in groups.items():
        path = FIGURES / f'{slug(name)}_panels.png'
        if plot_prediction_panels(group, path, metric=METRIC):  # 0: no run of the group saved predictions.npz
            display(Image(filename=str(path)))
    """

REGRESSION = [
    md("""
        # Nonlinear regression: FedAvg vs FIPA

        The paper's 1-D regression comparison (FIPA_SPEC 5.1), drawn from runs on disk with `fipa.results` and
        `fipa.plotting`: the table of the final test MSE per arm, test MSE against rounds and against accumulated
        round time, and each arm's fitted function over the shaded client regions with its pointwise error below.

        **Where the runs come from.** With `RESULTS = None` the notebook first makes two tiny real runs of
        `experiment=regression_1d_m2` (FedAvg and FIPA, `ROUNDS` rounds: a few seconds) into
        `notebook_runs/regression/`. Set `RESULTS` to a directory to draw finished runs instead and train nothing:
        a Hydra sweep such as `multirun/regression/<time>` (`fipa-train -m sweep=regression`), any folder of run
        directories, or a single run. Seeds of one arm are pooled (thin line per run, median in bold), and each
        problem of the sweep (M = 2, 4, 8 clients, the 2-D task) gets its own table and figures. Figures are
        written to `notebook_runs/regression/figures/`; `scripts/collect.py` and `scripts/plot.py` make the same
        table and figures from the command line.
        """),
    code(settings("multirun/regression/2026-11-24_10-00-00", "regression", "test_mse", PLOT_IMPORTS, RESULT_IMPORTS),
         "ROUNDS = 20", sep="\n"),
    code(TRAIN, """
        if RESULTS is None:
            for aggregator in ('fedavg', 'fipa'):
                train(aggregator, 'experiment=regression_1d_m2', f'aggregator={aggregator}',
                      f'federation.rounds={ROUNDS}')
        """),
    code("""
        def problem(run):
            \"\"\"The task a run solves and its number of clients, e.g. 'Sine1D, 2 clients'.\"\"\"
            task = run.config['task']
            clients = len(task['edges']) - 1 if 'edges' in task else task.get('grid', 0) ** 2
            return f"{task['_target_'].rsplit('.', 1)[-1]}, {clients} clients"
        """, LOAD),
    md("## Final test MSE"),
    code(TABLE),
    md("## Learning curves\n\nTest MSE (log scale) against the round and against the accumulated round time "
       "(curvature + local training + aggregation): a FIPA round adds the clients' curvature and the server "
       "solve, so compare at equal time too."),
    code(CURVES),
    md("## Fitted functions\n\nThe final global model of each arm (its first seed) against the target, client "
       "regions shaded; below, the pointwise error on a log scale (2-D tasks: prediction and error maps)."),
    code(PANELS),
]

PINN = [
    md("""
        # PINNs: FedAvg vs FIPA

        The paper's PDE comparison (FIPA_SPEC 5.2), drawn from runs on disk with `fipa.results` and
        `fipa.plotting`: per problem, the table of the final relative L2 test error per arm, the error against
        rounds and accumulated round time (log scale), and the solution panels: for a 1-D problem the predicted
        and exact solution over the two client strips with the pointwise error below, for a 2-D problem the
        predicted solution and the |error| map with the client strips outlined.

        **Where the runs come from.** With `RESULTS = None` the notebook first makes tiny real runs into
        `notebook_runs/pinn/`: FedAvg and FIPA on `experiment=poisson_1d`, and on a shrunken `poisson_2d` for
        the error map (few collocation points, rounds and local epochs: seconds, far from converged). Set
        `RESULTS` to a directory to draw finished runs instead and train nothing: a Hydra sweep such as
        `multirun/pinn/<time>` (`fipa-train -m sweep=pinn` or `sweep=pinn_budget`), a `scripts/pinn_table.py`
        output directory, or any folder of runs. Runs are grouped by problem (PDE and dimension), seeds of an arm
        pooled. Figures are written to `notebook_runs/pinn/figures/`.
        """),
    code(settings("multirun/pinn/2026-11-24_10-00-00", "pinn", "test_rel_l2", PLOT_IMPORTS, RESULT_IMPORTS)),
    code(TRAIN, """
        # Tiny: 100 collocation points per client instead of 400, 10 rounds of 20 local epochs instead of 100 x 100.
        if RESULTS is None:
            for aggregator in ('fedavg', 'fipa'):
                train(f'poisson_1d/{aggregator}', 'experiment=poisson_1d', f'aggregator={aggregator}',
                      'federation.rounds=10', 'federation.local_epochs=20', 'task.points_per_client=100')
        """),
    md("A 2-D problem, for the error map: `poisson_2d` shrunk to 100 collocation and 20 boundary points per client, "
       "a 16 x 16 test grid and 3 rounds of 10 local epochs."),
    code("""
        if RESULTS is None:
            for aggregator in ('fedavg', 'fipa'):
                train(f'poisson_2d/{aggregator}', 'experiment=poisson_2d', f'aggregator={aggregator}',
                      'federation.rounds=3', 'federation.local_epochs=10', 'task.points_per_client=100',
                      'task.boundary_points=20', 'task.test_points=256')
        """),
    code("""
        def problem(run):
            \"\"\"The PDE and its dimension, e.g. 'poisson 1-D' (a sweep holds several presets).\"\"\"
            task = run.config['task']
            return f"{task['pde']} {task['dim']}-D"
        """, LOAD),
    md("## Final relative L2 error"),
    code(TABLE),
    md("## Learning curves\n\nRelative L2 test error against the round and against the accumulated round time."),
    code(CURVES),
    md("## Solutions and errors\n\n1-D: the global model against the exact solution over the shaded client strips, "
       "the pointwise error below (log scale, shared across arms). 2-D: the predicted solution (top) and the |error| "
       "map (bottom, shared log colour scale) with the client strips outlined in white."),
    code(PANELS),
]

IMAGE = [
    md("""
        # Image classification: FedAvg warm-up, then FIPA

        The paper's image protocol (FIPA_SPEC 5.3): FedAvg warm-up rounds under label skew, then a switch to
        last-layer FIPA (`schedule.switch_round=K schedule.after=fipa_lastlayer`, client learning rate x0.1)
        against simply continuing FedAvg. Drawn from runs on disk with `fipa.results` and `fipa.plotting`: the
        table of the final test accuracy per arm, accuracy against rounds and accumulated round time with the
        switch round dashed, and the clients' class histogram that image runs save (`class_histogram.png`).

        **Where the runs come from.** With `RESULTS = None` the notebook first makes two tiny real runs into
        `notebook_runs/image/`: the `fmnist_dirichlet` preset on scikit-learn's bundled 8x8 digits (no download),
        10 clients with balanced Dirichlet(0.05) label skew, 2 clients per round, 1 local epoch, `WARMUP` FedAvg
        rounds then `ROUNDS - WARMUP` rounds of each arm (seconds; accuracies are far from the paper's). Set
        `RESULTS` to a directory to draw finished runs instead and train nothing: a Hydra sweep such as
        `multirun/image/<time>` (`fipa-train -m sweep=image`), a `scripts/image_table.py` output directory
        (warm-up runs appear as their own arm), or any folder of runs. Runs are grouped by client method (plain,
        FedProx, SCAFFOLD, ...), seeds of an arm pooled. Figures are written to `notebook_runs/image/figures/`.
        """),
    code(settings("multirun/image/2026-11-24_10-00-00", "image", "test_acc", "plot_learning_curves",
                  RESULT_IMPORTS + ", seed_of"),
         "WARMUP, ROUNDS = 20, 30  # FedAvg rounds before the switch, all rounds", sep="\n"),
    code(TRAIN, """
        TINY = ['experiment=fmnist_dirichlet', 'task.dataset=digits', 'model.image_size=8', 'task.num_clients=10',
                'federation.clients_per_round=2', 'federation.local_epochs=1',
                f'federation.rounds={ROUNDS}', f'schedule.switch_round={WARMUP}',
                'torch_threads=1']  # the preset leaves threads to torch (real CNNs); one is fastest for this tiny one
        if RESULTS is None:
            # Both runs repeat the same seeded warm-up, so their curves coincide up to the switch round. (The paper
            # branches once from a saved checkpoint instead: scripts/image_table.py, init_from=...)
            for variant in ('phase_fedavg', 'phase_fipa_lastlayer'):
                train(variant, *TINY, f'variant={variant}')
        """),
    code("""
        def problem(run):
            \"\"\"The data set and the client method (plain, ProximalTerm, ...): one figure each.\"\"\"
            callbacks = run.config['client']['callbacks']
            method = '+'.join(c['_target_'].rsplit('.', 1)[-1] for c in callbacks) or 'plain'
            return f"{run.config['task']['dataset']}, client method {method}"
        """, LOAD),
    md("## Final test accuracy"),
    code(TABLE),
    md("## Accuracy curves\n\nTest accuracy against the round and against the accumulated round time; the dashed "
       "line is `schedule.switch_round`, the last warm-up round."),
    code(CURVES),
    md("## Label skew\n\nClients x classes of the partition (`class_histogram.png`, saved by every image run; "
       "`class_histogram.csv` holds the counts). Runs of one seed share the partition: one figure per seed."),
    code("""
        for name, group in groups.items():
            shown = set()
            for run in group:
                histogram = run.dir / 'class_histogram.png'
                if seed_of(run) not in shown and histogram.is_file():
                    shown.add(seed_of(run))
                    display(Markdown(f'**{name}**, seed {seed_of(run)}'), Image(filename=str(histogram)))
        """),
]

NOTEBOOK_CELLS = {"regression": REGRESSION, "pinn": PINN, "image": IMAGE}


def build(name: str) -> nbformat.NotebookNode:
    cells = NOTEBOOK_CELLS[name]
    for number, cell in enumerate(cells):
        cell.id = f"{name}-{number}"  # fixed ids: regenerating an unchanged notebook leaves the file unchanged
    return new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC})


def main() -> None:
    NOTEBOOKS.mkdir(exist_ok=True)
    for name in NOTEBOOK_CELLS:
        nbformat.write(build(name), NOTEBOOKS / f"{name}.ipynb")
        print(NOTEBOOKS / f"{name}.ipynb")


if __name__ == "__main__":
    main()
