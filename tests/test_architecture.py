"""The shape of the code: the imports between the project's own modules (read with ast, those
inside functions included) have no cycle, no training or evaluation script imports another
script, metrics.py imports no project module, and no file outgrows its share of the code."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the commands; a command imports library modules only (demo.py and study.py drive the others)
SCRIPTS = {"train_pretrain", "train_downstream", "evaluate", "predict", "probe", "demo", "study", "bench"}
RUN_ALONE = ("train_pretrain", "train_downstream", "evaluate", "predict", "probe")


def project_modules():
    """Module name -> path of every Python file of the project outside tests/."""
    files = sorted(ROOT.glob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    return {(f"kernels.{f.stem}" if f.parent.name == "kernels" else f.stem): f for f in files}


def imports(path, known):
    """The project modules that `path` imports anywhere in its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


@pytest.fixture(scope="module")
def graph():
    mods = project_modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_checker_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_scripts_import_no_script(graph):
    bad = {m: sorted(graph[m] & SCRIPTS) for m in RUN_ALONE if m in graph and graph[m] & SCRIPTS}
    assert not bad, f"scripts importing scripts: {bad}"
    libraries = {m: sorted(graph[m] & SCRIPTS) for m in graph if m not in SCRIPTS and graph[m] & SCRIPTS}
    assert not libraries, f"library modules importing scripts: {libraries}"


def test_metrics_imports_no_project_module(graph):
    assert graph["metrics"] == set()
    assert graph["files"] == set()


def test_no_file_holds_more_than_18_percent_of_the_code():
    lines = {m: len(p.read_text().splitlines()) for m, p in project_modules().items()}
    total = sum(lines.values())
    big = {m: f"{n / total:.1%}" for m, n in lines.items() if n > 0.18 * total}
    assert not big, f"files over 18% of the {total} lines: {big}"
    assert lines["evaluate"] < 1000
