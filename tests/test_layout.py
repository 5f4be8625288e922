"""The package's shape holds: imports point one way, no command imports another, no import cycle.

Layers, lowest first (docs/architecture.md has the table):

    foundation   cocoshard (the class tuple), errors, atomic, input_files, folder_lock, machine, seeds,
                 console, settings, config, commands
    pure         prepare.labels, prepare.format, prepare.split, loading.plan, scoring.metrics
    prepare      the rest of cocoshard.prepare
    loading      the rest of cocoshard.loading
    training     cocoshard.training
    scoring      the rest of cocoshard.scoring
    top          demo, info, cli, __main__

A module imports only from its own layer or lower ones; pure modules are the helpers every stage
may use, and they import nothing but the foundation and each other. Imports inside functions count
(they are still dependencies); imports under `if TYPE_CHECKING:` do not (annotations only).
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
    "cocoshard.machine",
    "cocoshard.seeds",
    "cocoshard.console",
    "cocoshard.settings",
    "cocoshard.config",
    "cocoshard.commands",
}
PURE = {
    "cocoshard.prepare.labels",
    "cocoshard.prepare.format",
    "cocoshard.prepare.split",
    "cocoshard.loading.plan",
    "cocoshard.scoring.metrics",
}
TOP = {"cocoshard.demo", "cocoshard.info", "cocoshard.cli", "cocoshard.__main__"}
STAGES = ("prepare", "loading", "training", "scoring")
COMMANDS = {
    "cocoshard.prepare.synth",
    "cocoshard.prepare.pack",
    "cocoshard.prepare.inspect",
    "cocoshard.training.loop",
    "cocoshard.scoring.predict",
    "cocoshard.scoring.evaluate",
    "cocoshard.scoring.thresholds",
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
    if module in PURE:
        return 1
    if module in TOP:
        return 6
    stage = module.split(".")[1]
    assert stage in STAGES, f"{module} belongs to no layer: add it to test_layout.py and docs/architecture.md"
    return 2 + STAGES.index(stage)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            return True
    return False


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The cocoshard modules a file imports (at the top or inside functions), TYPE_CHECKING aside."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cocoshard")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cocoshard"):
            for alias in node.names:  # `from cocoshard.scoring import metrics` imports a module
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


def test_the_rules_would_catch_a_violation(graph) -> None:
    """The checks above are not vacuous: the graph is real, and a planted upward import is seen."""
    assert "cocoshard.prepare.format" in graph["cocoshard.loading.tario"] | graph["cocoshard.loading.decode"]
    assert (
        layer("cocoshard.prepare.pack")
        < layer("cocoshard.training.loop")
        < layer("cocoshard.scoring.predict")
    )
    planted = {
        **graph,
        "cocoshard.prepare.labels": graph["cocoshard.prepare.labels"] | {"cocoshard.scoring.predict"},
    }
    with pytest.raises(AssertionError):
        test_every_import_points_down_or_sideways_within_a_layer(planted)
