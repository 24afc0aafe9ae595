"""The package imports downward only, so the worker seam can run a client without the server loop.

Layers, bottom to top: pure math, data and models; the client module and its callbacks; tasks, curvature and client
methods; aggregators; the run's composition from a config; the worker seam (ClientRunner); the executors; the server
loop and recorders; the command line and the Flower apps that host the server loop. A module may import its own layer
or any layer below it, never one above.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fipa"

LAYERS = [
    {"fipa", "fipa.errors", "fipa.seeding", "fipa.parameters", "fipa.data", "fipa.datasets", "fipa.partition",
     "fipa.aggregators.functional", "fipa.curvature.adaptive", "fipa.curvature.eigen", "fipa.curvature.ggn",
     "fipa.curvature.kfac",
     "fipa.curvature", "fipa.pde", "fipa.pde.operators", "fipa.pde.problems", "fipa.models", "fipa.models.cnn",
     "fipa.models.mlp", "fipa.models.resnet", "fipa.results", "fipa.report", "fipa.plotting", "fipa.config",
     "fipa.recorders", "fipa.local_steps", "fipa.server_optimizers"},
    {"fipa.client"},
    {"fipa.client_methods", "fipa.curvature.callback", "fipa.tasks", "fipa.tasks.base", "fipa.tasks.regression",
     "fipa.tasks.pinn", "fipa.tasks.classification", "fipa.tasks.image"},
    {"fipa.aggregators", "fipa.aggregators.base", "fipa.aggregators.fedavg", "fipa.aggregators.fipa",
     "fipa.aggregators.fedfisher", "fipa.aggregators.kfac", "fipa.aggregators.fednova"},
    {"fipa.components"},
    {"fipa.runner"},
    {"fipa.executors"},
    {"fipa.federated_trainer"},
    {"fipa.train", "fipa.flower"},
]  # fmt: skip
LAYER_OF = {module: level for level, modules in enumerate(LAYERS) for module in modules}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every fipa module the file imports, at the top or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fipa")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fipa"):
            # `from fipa import partition` imports the module fipa.partition
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in LAYER_OF}
            found.add(node.module)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert sorted(m for m in map(module_name, SOURCES) if m not in LAYER_OF) == []


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_no_module_imports_a_layer_above_its_own(path):
    module = module_name(path)
    above = sorted(m for m in imported_modules(path) if LAYER_OF[m] > LAYER_OF[module])
    assert above == [], f"{module} imports {above} from a higher layer"


def test_the_worker_seam_and_the_executors_load_without_the_server_or_the_command_line():
    code = (
        "import sys, fipa.executors, fipa.runner; "
        "print(sorted(m for m in sys.modules if m in ('fipa.train', 'fipa.federated_trainer', 'fipa.recorders')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
