"""The package's shape: imports without cycles, and only the two owners name the run and final dirs' files."""
import ast
from pathlib import Path

from speakerlab import finaldir, rundir

PACKAGE = Path(__file__).resolve().parent.parent / "speakerlab"


def modules():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def test_imports_have_no_cycles():
    found = modules()
    graph = {}
    for name, path in found.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        # a submodule importing its own package's parts is not a cycle through the package
        graph[name] = {d for d in deps if d in found and d != name and not name.startswith(d + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, [" -> ".join(c) for c in cycles]
    assert "speakerlab.extract.main" in graph and "speakerlab.rundir" in graph["speakerlab.extract.main"]


def test_only_the_owners_name_run_and_final_files():
    names = {rundir.SCAN, rundir.READY, rundir.LOCK, rundir.METADATA, rundir.EMBEDDINGS, rundir.PARTS,
             rundir.JOURNAL, *rundir.RANK_PICKLES, *finaldir.KNOWN}
    owners = {PACKAGE / "rundir.py", PACKAGE / "finaldir.py"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                    and str(node.values[0].value).startswith(("rank_", "part_")):
                offenders.append(f"{path.name}:{node.lineno} f-string {node.values[0].value!r}...")
    assert not offenders, offenders
