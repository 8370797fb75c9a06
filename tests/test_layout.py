"""The package layout is a stack of layers with imports in one direction, and the core imports no plugin.

Layers, lowest first: shared services (errors, paths, registry, runtime, weights, atomic, text_cache, visualize), the
pure-torch `pipeline`, the `evaluation` harness, `report`, and the front ends (`api`, `cli`). A module
may import from its own layer and the layers below it; function-level (lazy) imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ovseg"
LAYERS = ["services", "pipeline", "evaluation", "report", "frontends"]
PUBLIC_ALIASES = {"stages", "segmenter", "windows", "vocabulary", "protocol", "metrics"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "frontends"  # ovseg/__init__.py: the public API
    head = parts[1]
    if head in ("pipeline", "evaluation", "report"):
        return head
    if head in ("api", "cli"):
        return "frontends"
    if head in PUBLIC_ALIASES:
        return "alias"
    return "services"


def _imports(path: Path) -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from pkg import module` depends on the module; `from module import name` on the module
            found |= {(name, f"{name}.{a.name}") for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "configs" not in p.parts}

    def target(item):
        if isinstance(item, str):
            return item
        name, sub = item
        return sub if sub in modules else name

    return {m: {t for t in map(target, _imports(p)) if t in modules and t != m} for m, p in modules.items()}


def test_layers_import_downwards_only():
    bad = []
    for module, targets in _graph().items():
        src = _layer(module)
        if src == "alias":
            continue
        for target in targets:
            dst = _layer(target)
            if dst == "alias":
                bad.append(f"{module} imports the public alias {target}; import the real module")
            elif LAYERS.index(dst) > LAYERS.index(src):
                bad.append(f"{module} ({src}) imports {target} ({dst})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_core_imports_no_plugin():
    plugins = [p.name for p in (PACKAGE.parent / "plugins").iterdir() if p.is_dir() and p.name.startswith("ovseg_")]
    assert plugins
    offenders = [
        f"{_module_name(p)} imports {name}"
        for p in PACKAGE.rglob("*.py")
        for item in _imports(p)
        for name in ([item] if isinstance(item, str) else item[:1])
        if name.split(".")[0] in plugins
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "path, names",
    [
        ("ovseg", ["build_predictor", "build_extractor", "build_refiner", "list_plugins", "load_segmenter"]),
        ("ovseg.segmenter", ["Segmenter"]),
        ("ovseg.protocol", ["Protocol"]),
        ("ovseg.vocabulary", ["Vocabulary"]),
        ("ovseg.windows", ["sliding_windows"]),
        ("ovseg.metrics", ["IoU", "BoundaryIoU"]),
        ("ovseg.stages", ["VLMPredictor", "FeatureExtractor", "Refiner"]),
    ],
)
def test_public_import_paths(path, names):
    import importlib

    module = importlib.import_module(path)
    for name in names:
        assert getattr(module, name) is not None
