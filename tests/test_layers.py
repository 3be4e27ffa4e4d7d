"""The layers hold: who may import whom, no import cycles, no runtime module too long to read,
and one image decoder.

Every .py file of the repository is parsed (never imported) and each import, at module level or
inside a function, under `if TYPE_CHECKING` too, becomes an edge between two modules. The
product's folders are named as installed: device/x.py is `smearscope.device.x`.

The hardened decoder is `smearscope.device.ingest` (re-exported as `smearscope.service.ingest`,
stage 1 of the analysis). It lives in `device/` because the frame sources there (watched folder,
replay) read image files too, and `device/` may import nothing of the rest: with the decoder in
`service/` they had decoded with a bare `cv2.imdecode` (a PNG declaring 20000x20000 px allocated
gigabytes; 12-bit samples came out 16 times too dark). So the one rule beside the import graph:
no runtime module but the decoder calls OpenCV's image decoding (`imdecode`, `imread`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Repository folders and the package each is installed as (pyproject.toml package-dir).
MAPPED = {"device": "smearscope.device", "engines": "smearscope.engines", "export": "smearscope.export",
          "service": "smearscope.service", "smearscope": "smearscope"}
#: Folders that are not installed but hold project code (they import as `training.x` etc.).
UNMAPPED = ("training", "tests", "bench", "tools")
#: Modules in tests/ import each other as top-level names (pytest puts tests/ on sys.path).
TEST_HELPERS = ("broker", "hostile", "oracle", "realdata", "conftest")
RUNTIME = ("smearscope.device", "smearscope.engines", "smearscope.export", "smearscope.service",
           "smearscope.cli", "smearscope.__main__", "smearscope")
MAX_RUNTIME_LINES = 500


def _module_name(path: Path) -> str | None:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    top = parts[0]
    if top in MAPPED:
        parts = MAPPED[top].split(".") + parts[1:]
    elif top not in UNMAPPED:
        return None
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _python_files() -> Iterator[Path]:
    for top in (*MAPPED, *UNMAPPED):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def _modules() -> dict[str, Path]:
    return {name: path for path in _python_files() if (name := _module_name(path)) is not None}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (the longest known prefix), or None (third party)."""
    if name.split(".")[0] in TEST_HELPERS:
        name = f"tests.{name}"
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in MODULES:
            return candidate
    return None


def _imports(module: str, path: Path) -> set[str]:
    """The project modules `module` imports (`from a import b` counts b when b is a module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...],
                allowed_importers: tuple[str, ...] = ()) -> list[str]:
    out = []
    for module, targets in GRAPH.items():
        if not any(_within(module, p) for p in importers) or any(_within(module, p) for p in allowed_importers):
            continue
        out += [f"{module} imports {t}" for t in sorted(targets) if any(_within(t, f) for f in forbidden)]
    return out


def test_the_scan_sees_the_layout() -> None:
    assert "smearscope.service.analysis.pipeline" in MODULES
    assert "smearscope.cli" in MODULES and "training.evaluate" in MODULES
    assert "smearscope.service.analysis.records" in GRAPH["smearscope.service.analysis.pipeline"]
    assert "tests.oracle" in GRAPH["tests.test_daemon"]


@pytest.mark.parametrize("package", ["smearscope.device", "smearscope.engines"])
def test_device_and_engines_import_nothing_of_the_rest(package: str) -> None:
    others = ("smearscope", "training", "tests", "bench", "tools")
    bad = [v for v in _violations((package,), others) if not _within(v.split(" imports ")[1], package)]
    assert not bad, bad


def test_export_and_service_never_import_each_other_training_or_the_cli() -> None:
    assert not _violations(("smearscope.export",), ("smearscope.service", "smearscope.cli", "training"))
    assert not _violations(("smearscope.service",), ("smearscope.export", "smearscope.cli", "training"))


def test_the_analysis_knows_neither_the_station_nor_mqtt() -> None:
    analysis = ("smearscope.service.analysis", "smearscope.service.ingest")
    assert not _violations(analysis, ("smearscope.service.station", "smearscope.service.mqtt"))
    assert not _violations(("smearscope.service.mqtt",), ("smearscope.service.station", "smearscope.service.analysis"))


def test_config_models_build_nothing() -> None:
    """service/config describes: it never reaches the runtime side it configures."""
    runtime = ("smearscope.service.analysis", "smearscope.service.station", "smearscope.service.mqtt",
               "smearscope.service.ingest")
    assert not _violations(("smearscope.service.config",), runtime)


def test_nothing_below_the_cli_imports_it() -> None:
    assert not _violations(("smearscope.device", "smearscope.engines", "smearscope.export", "smearscope.service"),
                           ("smearscope.cli",))


def test_only_training_tests_bench_and_tools_import_training() -> None:
    importers = tuple(m for m in GRAPH if not m.startswith(UNMAPPED))
    assert not _violations(importers, ("training",))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root, children_of_root in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(children_of_root)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    out.append(sorted(component))
    return out


def test_no_import_cycles() -> None:
    # A package imports its own submodules to re-export them; that is not a cycle between modules.
    graph = {m: {t for t in ts if not _within(t, m)} for m, ts in GRAPH.items()}
    assert not _strongly_connected(graph)


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _strongly_connected(graph) == [["a", "b", "c"]]


def test_no_runtime_module_is_too_long_to_read() -> None:
    long = {m: n for m, p in MODULES.items() if any(_within(m, r) for r in RUNTIME)
            and (n := len(p.read_text().splitlines())) > MAX_RUNTIME_LINES}
    assert not long, long


DECODER = "smearscope.device.ingest"
_DECODING_CALLS = ("imdecode", "imread", "imreadmulti")


def test_only_the_decoder_decodes_image_files() -> None:
    """Every image file that enters the pipeline goes through `smearscope.device.ingest`."""
    found = []
    for module, path in MODULES.items():
        if not any(_within(module, r) for r in RUNTIME) or _within(module, DECODER):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in _DECODING_CALLS:
                found.append(f"{module}:{node.lineno} {node.attr}")
    assert not found, found
