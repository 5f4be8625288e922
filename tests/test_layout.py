"""The package's shape holds: imports point one way, no command imports another, no import cycle.

Layers, lowest first (docs/architecture.md has the table):

    foundation   cocoshard (the class tuple), errors, atomic, input_files, folder_lock, output_paths,
                 machine, seeds, console, settings, config, config_scoring, commands, remote,
                 shard_cache
    pure         cocoshard.pure: labels, format, split, folds, plan, metrics, threshold_tuning
    prepare      the rest of cocoshard.prepare
    loading      the rest of cocoshard.loading
    training     cocoshard.training
    scoring      the rest of cocoshard.scoring
    top          demo, info, cli, __main__

A module imports only from its own layer or lower ones; pure modules are the helpers every stage
may use, and they import nothing but the foundation and each other. Every import counts: those
inside functions and those under `if TYPE_CHECKING:` too (an annotation that needs a module from a
higher layer, or one that closes a cycle, is a dependency all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cocoshard"

FOUNDATION = {
    "cocoshard",
    "cocoshard.errors",
    "cocoshard.atomic",
    "cocoshard.input_files",
    "cocoshard.folder_lock",
    "cocoshard.output_paths",
    "cocoshard.machine",
    "cocoshard.seeds",
    "cocoshard.console",
    "cocoshard.settings",
    "cocoshard.config",
    "cocoshard.config_scoring",
    "cocoshard.commands",
    "cocoshard.remote",
    "cocoshard.shard_cache",
}
TOP = {"cocoshard.demo", "cocoshard.info", "cocoshard.cli", "cocoshard.__main__"}
STAGES = ("prepare", "loading", "training", "scoring")
COMMANDS = {
    "cocoshard.prepare.synth",
    "cocoshard.prepare.pack",
    "cocoshard.prepare.inspect",
    "cocoshard.training.train",
    "cocoshard.scoring.predict",
    "cocoshard.scoring.evaluate",
    "cocoshard.scoring.thresholds",
    "cocoshard.scoring.ensemble",
    "cocoshard.demo",
    "cocoshard.info",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """0 foundation, 1 pure, 2-5 the stages in data-flow order, 6 the top."""
    if module in FOUNDATION:
        return 0
    if module == "cocoshard.pure" or module.startswith("cocoshard.pure."):
        return 1
    if module in TOP:
        return 6
    stage = module.split(".")[1]
    assert stage in STAGES, f"{module} belongs to no layer: add it to test_layout.py and docs/architecture.md"
    return 2 + STAGES.index(stage)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The cocoshard modules a file imports: at the top, inside functions, under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cocoshard")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cocoshard"):
            for alias in node.names:  # `from cocoshard.pure import metrics` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def test_every_import_points_down_or_sideways_within_a_layer(graph) -> None:
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer(target) > layer(module) or (layer(module) == 1 and layer(target) > 1)
    ]
    assert not upward


def test_no_command_imports_another_and_nothing_imports_the_cli(graph) -> None:
    sideways = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if module in COMMANDS and target in COMMANDS
    ]
    cli = [
        module
        for module, targets in graph.items()
        if "cocoshard.cli" in targets and module != "cocoshard.__main__"
    ]
    assert not sideways and not cli


def test_no_import_cycle(graph) -> None:
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


# Libraries a pure module may use: computation only, nothing that reads files, talks to processes
# or prints. (The foundation modules it may import are the class names and the seed scheme.)
PURE_LIBRARIES = {"__future__", "collections", "dataclasses", "math", "numpy", "re", "struct", "typing"}
PURE_FOUNDATION = {"cocoshard", "cocoshard.seeds"}


def test_pure_modules_do_no_io() -> None:
    impure = []
    for path in sorted((PACKAGE / "pure").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name.startswith("cocoshard"):
                    if not name.startswith("cocoshard.pure") and name not in PURE_FOUNDATION:
                        impure.append(f"{path.name} imports {name}")
                elif top not in PURE_LIBRARIES:
                    impure.append(f"{path.name} imports {name}")
    assert not impure


def test_the_rules_would_catch_a_violation(graph) -> None:
    """The checks above are not vacuous: the graph is real, and a planted upward import is seen."""
    assert "cocoshard.pure.format" in graph["cocoshard.loading.tario"] | graph["cocoshard.loading.decode"]
    assert (
        layer("cocoshard.prepare.pack")
        < layer("cocoshard.training.train")
        < layer("cocoshard.scoring.predict")
    )
    planted = {
        **graph,
        "cocoshard.pure.labels": graph["cocoshard.pure.labels"] | {"cocoshard.scoring.predict"},
    }
    with pytest.raises(AssertionError):
        test_every_import_points_down_or_sideways_within_a_layer(planted)
