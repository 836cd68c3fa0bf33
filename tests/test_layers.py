"""The package layers of ARCHITECTURE.md, read from the source with ast (lazy imports inside functions
included): a module imports only from its own package or packages below it, and no modules import each
other in a circle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmlab"

# Top to bottom. A module may import from its own layer and from every layer after it in this list.
LAYERS = ["commands", "serving", "tuning", "optimizing", "learn", "orchestration", "scoring", "prompting",
          "backends", "runs", "io", "core"]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every llmlab module that `path` imports, at the top or inside a function; `from pkg import mod`
    counts as importing pkg.mod when that is a module, else pkg."""
    top = root.name
    names: set[str] = set()
    known = {module_name(p, root) for p in root.rglob("*.py")}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == top}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == top:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                names.add(full if full in known else node.module)
    return names - {module_name(path, root)}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None  # llmlab.PKG.mod -> PKG; top-level modules have none


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, root): imports(p, root) for p in sorted(root.rglob("*.py"))}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        here = layer(mod)
        if here is None:
            continue
        for dep in deps:
            there = layer(dep)
            if there is not None and there != here and LAYERS.index(there) < LAYERS.index(here):
                bad.append(f"{mod} -> {dep}")
    return sorted(bad)


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def test_every_package_is_a_known_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages - {"_prompts"} <= set(LAYERS)


def test_no_upward_import():
    assert upward_imports(graph()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_checks_find_a_planted_circle_and_an_upward_import(tmp_path):
    root = tmp_path / "llmlab"
    for pkg in ("core", "io"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "core" / "a.py").write_text("def f():\n    from llmlab.io import b\n")  # lazy, still counted
    (root / "io" / "b.py").write_text("from llmlab.core import a\n")
    g = graph(root)
    assert upward_imports(g) == ["llmlab.core.a -> llmlab.io.b"]
    assert circles(g) == [["llmlab.core.a", "llmlab.io.b"]]
