"""The package's shape: stages import only downward, no import cycle, no folder over ~a fifth of the code, no module
over ~400 lines, no function over ~80 lines of body."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ctmae"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # body lines, after the signature and docstring (Typer signatures are long by nature)
MAX_FOLDER_SHARE = 0.22  # of the package's lines, per stage folder
# The stages, bottom first: a module may import its own stage and the ones before it, never one after it.
STAGES = ("runtime", "io", "preprocess", "mae", "seg", "draw", "infer", "share", "experiments", "api", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ctmae modules it imports anywhere in its body (lazy imports inside functions included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctmae"):
                for alias in node.names:  # `from ctmae.cli import pretrain` imports the module ctmae.cli.pretrain
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("ctmae")}
        # the package root is a facade (version, lazy load_encoder/load_unetr): stages may read its __version__
        graph[name] = {e for e in edges if e in modules and e not in (name, "ctmae")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                if body and node.end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}: {node.name}() {node.end_lineno - body[0].lineno + 1} lines")
    assert not too_long, too_long


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a stage to a later one in ``STAGES``, as "importer -> imported"."""

    def rank(module: str) -> int | None:
        parts = module.split(".")
        return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None

    return sorted(
        f"{m} -> {e}"
        for m, edges in graph.items()
        for e in edges
        if None not in (rank(m), rank(e)) and rank(e) > rank(m)
    )


def test_stages_import_only_downward():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {"ctmae.io.volume": {"ctmae.mae.config"}, "ctmae.mae.config": {"ctmae.io.volume"}}
    assert upward_imports(graph) == ["ctmae.io.volume -> ctmae.mae.config"]


def test_no_folder_holds_more_than_a_fifth_of_the_code():
    lines: dict[str, int] = {}
    for path in PACKAGE.rglob("*.py"):
        folder = path.relative_to(PACKAGE).parts[0] if path.parent != PACKAGE else "(root)"
        lines[folder] = lines.get(folder, 0) + len(path.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    heavy = {f: f"{n / total:.0%}" for f, n in lines.items() if n > MAX_FOLDER_SHARE * total}
    assert not heavy, heavy


def test_each_stage_is_a_subpackage():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert stages <= set(STAGES), f"a folder that is no stage: {sorted(stages - set(STAGES))}"
    assert set(STAGES) - {"api"} <= stages
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside the stage folders: {loose}"
