"""The package's shape: no import cycle among meanflow's modules (lazy imports included), every
module opens with a docstring, and none grows far past ~400 lines."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
           for f in sorted((ROOT / "meanflow").rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """meanflow modules `name` imports anywhere in its body; `from . import sub` imports sub."""
    out = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            mod = n.module or ""
            if n.level:
                parts = pkg.split(".")
                mod = ".".join(parts[:len(parts) - n.level + 1] + ([mod] if mod else []))
            subs = {f"{mod}.{a.name}" for a in n.names} & MODULES.keys()
            out |= subs | ({mod} if len(subs) < len(n.names) else set())
    return (out & MODULES.keys()) - {name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = "done"
        stack.pop()
        return None
    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_no_import_cycle():
    graph = {m: imports(m, f) for m, f in MODULES.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_modules_open_with_a_docstring_and_stay_small():
    for m, f in MODULES.items():
        assert ast.get_docstring(ast.parse(f.read_text())), f"{f}: no opening docstring"
        assert len(f.read_text().splitlines()) <= 440, f"{f}: over ~400 lines"
