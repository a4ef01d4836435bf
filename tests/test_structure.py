"""The package's shape: modules import in one direction (no cycles, function-level imports
included), and the preprocessing stands alone."""
import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "molmo"


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports():
    """molmo module -> the molmo modules it imports anywhere in its code."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        me = module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (base + ("." + node.module if node.module else "")) if node.level else node.module or ""
                names = [target + "." + a.name for a in node.names]
                deps |= {n for n in [target, *names] if n.startswith("molmo")}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("molmo")}
        graph[me] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_module_imports_have_no_cycles():
    graph = imports()
    # molmo/__init__ names its exports lazily (importlib, no import statement): packages are not nodes.
    graph = {m: {d for d in ds if not (PACKAGE.parent / d.replace(".", "/") / "__init__.py").is_file()}
             for m, ds in graph.items()}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            assert state.get(d) != "open", "import cycle: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_importing_preprocess_loads_no_network_code():
    code = "import sys, molmo.preprocess; print(sorted(m for m in sys.modules if m.startswith('molmo')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("molmo.model", "molmo.llm", "molmo.vision", "molmo.generation", "molmo.loading"):
        assert f"'{heavy}'" not in loaded
    assert "'molmo.preprocess.processor'" in loaded
