"""Regenerate a results document from run directories: the document is its own template.

A block of the document such as

    <!-- report:table
    runs: results/regression_2d
    rows: experiment
    columns: variant
    metric: test_mse
    stall: 1.0e-2
    -->
    (generated: the table, then the commands that made its runs)
    <!-- /report -->

is rewritten from the completed runs below `runs`; everything outside the blocks (the prose) is kept byte for
byte. A block whose runs are not on this machine keeps its previous content and is listed as kept, so a document
can be regenerated section by section as the studies finish (scripts/report.py --strict refuses that).

A table also records, inside the block (`<!-- report:runs -->`, one JSON line per run), each run's seed, settings,
value, rounds and command. The next generation tabulates those records together with the runs on its machine (a
run on disk replaces its record), so a study spread over sessions or machines adds up to one table, and a table
whose run directories are gone regenerates to itself.

Block kinds and their options (YAML inside the opening comment):
- `table`: `runs` (a directory or a list), `metric`, `rows` and optionally `columns` (setting keys, see
  `setting`), `where` (setting: value or [values], runs to keep), `cell` (`median`: median [min, max];
  `mean`: mean ± std), `last` (average the metric's last K evaluated rounds instead of its final value), `scale`
  (e.g. 100 for percent), `format` (a Python format spec; default 3 significant digits), `stall` (count the seeds
  whose value is above it, or not finite), `rounds` (add the median number of rounds), `labels` (value: shown
  name), `row_order` / `column_order` (values first in this order, then the rest sorted).
- `figure`: `runs`, `where`, `plot` (`curves`: the metric against round and against time, a line per run and the
  arm's median; `fit`: the fitted functions or PINN error maps; `bars`: a table's cells as grouped bars, mean
  over seeds with a min-max whisker, from `rows` (the groups), `columns` (the bars) and the table options `last`,
  `scale`, `labels`, `row_order`, `column_order`), `metric`, `out` (the PNG, relative to the document), `caption`.
  A `bars` figure keeps its runs' records as a table does: redrawn whenever some of its runs are here, it shows
  every run it ever recorded.
Every block ends with the commands that made its runs (`command.txt` of each run directory, written by
fipa.train.run when the run starts).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from fipa.errors import ConfigError, require
from fipa.results import (
    Run,
    completed_runs,
    final_value,
    load_runs,
    natural_key,
    run_command,
    seed_of,
    seed_stats,
    series,
)

BLOCK = re.compile(r"<!-- report:(?P<kind>\w+)\n(?P<options>.*?)-->\n(?P<body>.*?)<!-- /report -->", re.S)
RECORDS = re.compile(r"<!-- report:runs\n(.*?)-->\n", re.S)
OPTIONS = {
    "table": {"runs", "metric", "rows", "columns", "where", "cell", "last", "scale", "format", "stall", "rounds",
              "labels", "row_order", "column_order"},
    "figure": {"runs", "where", "plot", "metric", "out", "caption", "rows", "columns", "last", "scale", "labels",
               "row_order", "column_order"},
}  # fmt: skip


@dataclass
class BlockOutcome:
    line: int  # where the block opens in the document
    kind: str
    runs: int  # completed runs it was made from; 0: kept as it was
    note: str  # what was made, or why the block was kept


# ------------------------------------------------------------------------------------------------ settings of a run
def setting(run: Run, key: str, bases: Sequence[Path]) -> str | None:
    """A run's value for `key`, looked up in order: `key=value` in its Hydra overrides or in a component of its
    path below its study directory (the first of `bases` that holds it; scripts/study.py names runs
    `experiment=...,variant=...,seed=0`); `path[i]`, the i-th component of that path (scripts/image_table.py:
    `<client>/<variant>/seed<k>`); a dotted key of its config."""
    base = next((b for b in bases if run.dir.is_relative_to(b)), None)
    parts = run.dir.relative_to(base).parts if base else run.dir.parts
    if match := re.fullmatch(r"path\[(-?\d+)\]", key):
        index = int(match[1])
        return parts[index] if -len(parts) <= index < len(parts) else None
    pairs = [o for o in run.overrides or [] if "=" in o] + [p for part in parts for p in part.split(",") if "=" in p]
    for pair in reversed(pairs):  # the last override wins, as on the command line
        name, _, value = pair.lstrip("+~").partition("=")
        if name == key:
            return value
    node: Any = run.config
    for name in key.split("."):
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return str(node)


def wanted_settings(where: dict[str, Any] | None) -> dict[str, set[str]]:
    """A block's `where` (setting: value or [values]) as setting -> the values kept."""
    return {
        str(key): {str(v) for v in (values if isinstance(values, list) else [values])}
        for key, values in (where or {}).items()
    }


def keep_where(runs: list[Run], where: dict[str, Any], bases: Sequence[Path]) -> list[Run]:
    """The runs whose settings match every `key: value` (or `key: [values]`) of `where`."""
    wanted = wanted_settings(where)
    return [run for run in runs if all(setting(run, key, bases) in values for key, values in wanted.items())]


# ------------------------------------------------------------------------------------------------ numbers
def run_value(run: Run, metric: str, last: int | None = None) -> float:
    """The run's final `metric`, or the mean of its last `last` evaluated rounds (steadier under label skew)."""
    if not last:
        return final_value(run, metric)
    values = [v for v in series(run, metric)[1] if math.isfinite(v)][-last:]
    return statistics.fmean(values) if values else math.nan


def format_number(value: float, spec: str | None = None) -> str:
    """3 significant digits, in exponent form outside [1e-2, 1e4) (1.7e-4, 0.442, 769); or a format spec."""
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if spec:
        return format(value, spec)
    if value != 0 and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.3g}"


def seed_cell(values: Sequence[float], options: dict[str, Any], rounds: Sequence[float] = ()) -> str:
    """One table cell: median [min, max] (or mean ± std) over the seeds' finite values (the value alone when one
    seed is finite), the number of seeds, the seeds that diverged (not finite), and with `stall` the seeds above it
    or not finite."""
    scale, spec = float(options.get("scale", 1.0)), options.get("format")
    stats = seed_stats([scale * v for v in values])

    def show(value: float) -> str:
        return format_number(value, spec)

    if not stats["n"]:
        text = "diverged"
    elif stats["n"] == 1:  # one seed has no spread to show
        text = show(stats["median"])
    elif options.get("cell", "median") == "mean":
        text = f"{show(stats['mean'])} ± {show(stats['std'])}"
    else:
        text = f"{show(stats['median'])} [{show(stats['min'])}, {show(stats['max'])}]"
    counts = [f"n={len(values)}"]
    if len(values) > stats["n"]:
        counts.append(f"{len(values) - stats['n']} diverged")
    if options.get("stall") is not None:
        threshold = float(options["stall"])
        counts.append(f"{sum(1 for v in values if not (math.isfinite(v) and v <= threshold))} stalled")
    text += f" ({', '.join(counts)})"
    if options.get("rounds") and rounds:
        text += f"; {statistics.median(rounds):g} rounds"
    return text


def ordered(values: set[str], first: Sequence[Any] | None) -> list[str]:
    head = [str(v) for v in first or [] if str(v) in values]
    return head + sorted(values - set(head), key=lambda v: natural_key(Path(v)))


@dataclass
class RunRecord:
    """What a table needs of one run, kept in the document (`<!-- report:runs -->`) so that a table outlives its
    run directories: a study split over machines or sessions is tabulated from every run it ever recorded."""

    run: str  # the run directory, relative to the report's root: the key a run on disk replaces its record by
    seed: int | None
    settings: dict[str, str]  # the block's rows, columns and where keys
    values: dict[str, float]  # `metric` (final) or `metric@lastK`
    rounds: float
    command: str | None

    def to_json(self) -> str:
        # a command may hold "-->", which would end the HTML comment early
        return json.dumps(asdict(self), sort_keys=True).replace("-->", "--\\u003e")


def value_key(options: dict[str, Any]) -> str:
    return f"{options['metric']}@last{options['last']}" if options.get("last") else str(options["metric"])


def setting_keys(options: dict[str, Any]) -> list[str]:
    keys = [options["rows"], options.get("columns"), *(options.get("where") or {})]
    return list(dict.fromkeys(str(k) for k in keys if k))


def record_run(run: Run, options: dict[str, Any], root: Path, bases: Sequence[Path]) -> RunRecord:
    """The record of a run on this machine, for the table of the block with these options."""
    return RunRecord(
        run=run.dir.relative_to(root).as_posix() if run.dir.is_relative_to(root) else run.dir.as_posix(),
        seed=seed_of(run),
        settings={k: v for k in setting_keys(options) if (v := setting(run, k, bases)) is not None},
        values={value_key(options): run_value(run, options["metric"], options.get("last"))},
        rounds=float((run.summary or {}).get("rounds_completed", len(run.metrics))),
        command=run_command(run),
    )


def read_records(body: str, line: int) -> list[RunRecord]:
    """The records a block kept from its previous generation (none for a hand-made or never-generated block)."""
    match = RECORDS.search(body)
    try:
        return [RunRecord(**json.loads(text)) for text in match[1].splitlines() if text.strip()] if match else []
    except (TypeError, ValueError) as error:
        raise ConfigError(f"line {line}: a report:runs record cannot be read: {error}") from error


def merge_records(kept: list[RunRecord], present: list[RunRecord]) -> list[RunRecord]:
    """The kept records, each replaced by its run's fresh record where the run is on this machine, plus new runs."""
    merged = {r.run: r for r in kept} | {r.run: r for r in present}
    return [merged[key] for key in sorted(merged, key=lambda k: natural_key(Path(k)))]


def records_markdown(records: list[RunRecord]) -> str:
    return "<!-- report:runs\n" + "".join(r.to_json() + "\n" for r in records) + "-->\n"


Cells = dict[tuple[str, str], list[RunRecord]]


def grouped_records(records: list[RunRecord], options: dict[str, Any], line: int) -> tuple[Cells, list[str], list[str]]:
    """The records kept by `where`, by (row, column) (one column, `metric`, without `columns`), each cell in seed
    order, with the rows and columns in display order."""
    rows_key, columns_key, metric = options["rows"], options.get("columns"), options["metric"]
    where = wanted_settings(options.get("where"))
    cells: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        missing = [k for k in [*setting_keys(options), value_key(options)] if k not in record.settings | record.values]
        require(
            not missing,
            f"line {line}: {record.run} has no {', '.join(missing)}: its directory must be here to tabulate a "
            f"setting or metric that its record lacks",
        )
        if not all(record.settings[key] in values for key, values in where.items()):
            continue
        row, column = record.settings[rows_key], record.settings[columns_key] if columns_key else metric
        cells.setdefault((row, column), []).append(record)
    for arm in cells.values():
        arm.sort(key=lambda r: (r.seed is None, r.seed or 0))
    return (
        cells,
        ordered({r for r, _ in cells}, options.get("row_order")),
        ordered({c for _, c in cells}, options.get("column_order")),
    )


def block_labels(options: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (options.get("labels") or {}).items()}


def table_markdown(records: list[RunRecord], options: dict[str, Any], line: int) -> str:
    """Rows x columns of seed cells (one column, `metric`, without `columns`)."""
    labels = block_labels(options)
    cells, row_values, column_values = grouped_records(records, options, line)

    def name(value: str) -> str:
        return labels.get(value, value)

    lines = [
        f"| {name(options['rows'])} | " + " | ".join(map(name, column_values)) + " |",
        "|---|" + "---|" * len(column_values),
    ]
    for row in row_values:
        texts = []
        for column in column_values:
            arm = cells.get((row, column), [])
            values = [r.values[value_key(options)] for r in arm]
            texts.append(seed_cell(values, options, [r.rounds for r in arm]) if arm else "–")
        lines.append(f"| {name(row)} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ commands
def commands_markdown(commands_of_runs: Sequence[str | None]) -> str:
    """The distinct commands that made the runs, and how many runs recorded none."""
    runs = list(commands_of_runs)
    commands = sorted({c for c in runs if c})
    unrecorded = sum(1 for c in runs if c is None)
    text = "```bash\n" + "".join(f"{c}\n" for c in commands) + "```\n" if commands else ""
    if unrecorded:
        text += f"({unrecorded} of the {len(runs)} runs did not record their command.)\n"
    return text


# ------------------------------------------------------------------------------------------------ the document
def parse_options(kind: str, text: str, line: int) -> dict[str, Any]:
    require(kind in OPTIONS, f"line {line}: unknown report block {kind!r}; known: {', '.join(OPTIONS)}")
    try:
        options = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"line {line}: report:{kind} options are not YAML: {error}") from error
    require(isinstance(options, dict), f"line {line}: report:{kind} options must be `key: value` lines")
    unknown = sorted(set(options) - OPTIONS[kind])
    require(not unknown, f"line {line}: report:{kind} has unknown options {unknown}; known: {sorted(OPTIONS[kind])}")
    required = {"table": ("runs", "metric", "rows"), "figure": ("runs", "plot", "out")}[kind]
    missing = [name for name in required if name not in options]
    require(not missing, f"line {line}: report:{kind} needs {', '.join(missing)}")
    if kind == "figure":
        require(options["plot"] in ("curves", "fit", "bars"), f"line {line}: plot must be curves, fit or bars")
        require(options["plot"] == "fit" or "metric" in options, f"line {line}: plot: {options['plot']} needs a metric")
        require(options["plot"] != "bars" or "rows" in options, f"line {line}: plot: bars needs rows")
    return options


def named_runs(options: dict[str, Any]) -> list[str]:
    """The block's `runs:` option (one directory or a list), as a list."""
    runs = options["runs"]
    return [str(d) for d in runs] if isinstance(runs, list) else [str(runs)]


def study_dirs(options: dict[str, Any], root: Path) -> list[Path]:
    """The block's `runs:` directories below `root`."""
    return [root / d for d in named_runs(options)]


def block_runs(options: dict[str, Any], root: Path) -> list[Run]:
    bases = study_dirs(options, root)
    runs = [run for base in bases if base.is_dir() for run in load_runs(base)]
    done, _ = completed_runs(runs)
    return keep_where(done, options.get("where") or {}, bases)


def block_records(options: dict[str, Any], body: str, root: Path, line: int) -> tuple[list[RunRecord], list[RunRecord]]:
    """The records of the block's runs on this machine, and those merged with the records the block kept."""
    bases = study_dirs(options, root)
    present = [record_run(run, options, root, bases) for run in block_runs(options, root)]
    return present, merge_records(read_records(body, line), present)


def table_body(records: list[RunRecord], options: dict[str, Any], line: int) -> str:
    return (
        table_markdown(records, options, line)
        + "\n"
        + commands_markdown([r.command for r in records])
        + records_markdown(records)
    )


def bars_body(records: list[RunRecord], options: dict[str, Any], document_dir: Path, line: int) -> str:
    """A table's cells drawn as grouped bars (plotting.plot_grouped_bars), its commands and its records."""
    from fipa.plotting import plot_grouped_bars

    cells, groups, bars = grouped_records(records, options, line)
    scale, key = float(options.get("scale", 1.0)), value_key(options)
    finite = {cell: [scale * r.values[key] for r in arm if math.isfinite(r.values[key])] for cell, arm in cells.items()}
    last = f", mean of the last {options['last']} rounds" if options.get("last") else ""
    path = document_dir / options["out"]
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_grouped_bars(finite, groups, bars, path, f"{options['metric']}{last}", block_labels(options))
    return (
        f"![{options.get('caption', '')}]({options['out']})\n\n"
        + commands_markdown([r.command for r in records])
        + records_markdown(records)
    )


def figure_body(options: dict[str, Any], runs: list[Run], document_dir: Path) -> str:
    from fipa.plotting import plot_learning_curves, plot_prediction_panels

    path = document_dir / options["out"]
    path.parent.mkdir(parents=True, exist_ok=True)
    if options["plot"] == "curves":
        plot_learning_curves(runs, options["metric"], path)
    else:
        require(plot_prediction_panels(runs, path) > 0, f"plot: fit found no predictions.npz under {options['runs']}")
    caption = options.get("caption", "")
    return f"![{caption}]({options['out']})\n\n" + commands_markdown([run_command(r) for r in runs])


def regenerate(
    text: str,
    root: Path,
    document_dir: Path,
    progress: Callable[[BlockOutcome], None] | None = None,
    only: str | None = None,
) -> tuple[str, list[BlockOutcome]]:
    """The document with every block rewritten from its runs (tables: the runs here and the runs recorded in the
    block), and what happened to each block. `only`: rewrite just the blocks whose `runs` name this directory (the
    study that just finished)."""
    outcomes: list[BlockOutcome] = []

    def replace(match: re.Match) -> str:
        line = text.count("\n", 0, match.start()) + 1
        kind, body = match["kind"], match["body"]
        options = parse_options(kind, match["options"], line)
        if only is not None and Path(only) not in map(Path, named_runs(options)):
            outcome = BlockOutcome(line, kind, 0, f"kept: {options['runs']} not selected by only={only}")
        elif kind == "table":
            present, records = block_records(options, body, root, line)
            if records:
                body = table_body(records, options, line)
                outcome = BlockOutcome(
                    line,
                    kind,
                    len(records),
                    f"table from {len(records)} runs "
                    f"({len(present)} here, {len(records) - len(present)} recorded before)",
                )
            else:
                outcome = BlockOutcome(line, kind, 0, f"kept: no completed runs under {options['runs']}")
        elif options["plot"] == "bars":  # redrawn only where some of its runs are: no runs, no change
            present, records = block_records(options, body, root, line)
            if present:
                body = bars_body(records, options, document_dir, line)
                outcome = BlockOutcome(line, kind, len(records), f"bars from {len(records)} runs ({len(present)} here)")
            else:
                outcome = BlockOutcome(line, kind, 0, f"kept: no completed runs under {options['runs']}")
        elif runs := block_runs(options, root):
            body = figure_body(options, runs, document_dir)
            outcome = BlockOutcome(line, kind, len(runs), f"figure from {len(runs)} runs")
        else:
            outcome = BlockOutcome(line, kind, 0, f"kept: no completed runs under {options['runs']}")
        outcomes.append(outcome)
        if progress:
            progress(outcome)
        opening = match.group(0)[: match.start("body") - match.start()]
        return f"{opening}{body}<!-- /report -->"

    return BLOCK.sub(replace, text), outcomes
