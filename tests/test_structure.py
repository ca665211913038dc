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


def reach(start: str, graph: dict[str, set[str]]) -> set[str]:
    """Every meanflow module `start` imports, directly or through others (lazy imports included)."""
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_training_and_the_objectives_never_import_the_pipeline_plan():
    """A job resolves its configs once (stages/__init__.job builds the plan); below it, the library
    that trains takes configs and never resolves them again."""
    graph = {m: imports(m, f) for m, f in MODULES.items()}
    for m in MODULES:
        if m.startswith(("meanflow.training", "meanflow.objective")):
            assert not reach(m, graph) & {"meanflow.plan", "meanflow.reuse"}, m


def test_config_sections_are_the_schema_keys():
    """meanflow/sections.py's fields (what grep and editors find) are the schema's keys, in order,
    with the schema's types: a key added to one and not the other fails here."""
    import dataclasses
    import types
    import typing

    from meanflow import config, sections
    py = {"integer": int, "number": float, "boolean": bool, "string": str, "array": tuple, "object": dict}
    for name in config.SECTIONS:
        cls, props = sections.SECTIONS[name], config.schema()["$defs"][name]["properties"]
        assert [f.name for f in dataclasses.fields(cls)] == list(props), name
        hints = typing.get_type_hints(cls)
        for key, p in props.items():
            t = p.get("type", "string" if "enum" in p else "object")
            want = {py[x] if x != "null" else type(None) for x in ([t] if isinstance(t, str) else t)}
            h = hints[key]
            members = typing.get_args(h) if isinstance(h, types.UnionType) else (h,)
            got = {typing.get_origin(a) or a for a in members}
            assert got == want, f"{name}.{key}: {hints[key]} vs schema type {t}"
        cfg = config.build({})
        assert type(getattr(cfg, name)) is cls


def test_checkout_guard_sees_what_a_test_changes(tmp_path):
    """conftest's guard over the checkout's outputs: a created, a deleted and a rewritten file are
    named; a read is not a change; a symlinked data/ is not walked."""
    import os

    from conftest import changes, snapshot
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "ema.safetensors").write_bytes(b"w")
    (tmp_path / "results" / "t.csv").parent.mkdir()
    (tmp_path / "results" / "t.csv").write_text("a")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "big").write_text("x")
    (tmp_path / "data").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    assert "data" in before and not any(p.startswith("data/") for p in before) and "runs/r/ema.safetensors" in before
    (tmp_path / "results" / "t.csv").read_text()
    assert changes(before, snapshot(tmp_path)) == []
    (tmp_path / "logs").mkdir()
    (tmp_path / "runs" / "r" / "ema.safetensors").unlink()
    st = os.stat(tmp_path / "results" / "t.csv")
    (tmp_path / "results" / "t.csv").write_text("b")
    os.utime(tmp_path / "results" / "t.csv", ns=(st.st_atime_ns, st.st_mtime_ns))   # same size and mtime: unseen (no hashing)
    (tmp_path / "results" / "u.csv").write_text("c")
    assert changes(before, snapshot(tmp_path)) == ["created  logs", "created  results/u.csv",
                                                   "deleted  runs/r/ema.safetensors", "modified results",
                                                   "modified runs/r"]
