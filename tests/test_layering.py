"""The package layout is the architecture (docs/architecture.md): read every module's imports
(module level, ``TYPE_CHECKING`` blocks and function bodies alike) and check that

- no modules of ``otaguard`` import each other in a circle;
- the campaign engine (``otaguard.rollout``) is pure: nothing of the server, devices,
  simulator or CLI, and no I/O library;
- inside ``otaguard.server`` the arrows point down the declared layers, and the device and
  admin APIs do not import each other.

The sources checked are those of the ``otaguard`` package imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import otaguard

ROOT = Path(otaguard.__file__).parent

# Lowest first. A server module may import modules of a lower layer, and modules of its own
# subpackage; the device and admin APIs share a layer and may not import each other.
SERVER_LAYERS: list[tuple[str, ...]] = [
    ("storage", "workers"),  # workers: process handling only, imports nothing of the server
    ("pki",),
    ("ratelimit", "metrics"),
    ("context", "sharedlimits"),
    ("health", "trustsync"),
    ("device_api", "admin_api"),
    ("dashboard",),  # the web pages: over the admin API's decisions, composed by app
    ("app",),
    ("runtime", "config"),
]

# Libraries that do I/O (network, files, databases, processes, HTTP frameworks).
IO_LIBRARIES = frozenset(
    {
        "alembic", "asyncio", "boto3", "fcntl", "http", "httpx", "io", "os", "pathlib",
        "psycopg", "psycopg2", "requests", "select", "selectors", "shutil", "socket",
        "sqlalchemy", "sqlite3", "ssl", "starlette", "subprocess", "tempfile", "urllib",
        "uvicorn",
    }
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = ["otaguard", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (absolute names)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for alias in node.names:  # ``from . import store``: the submodule itself
                if target.startswith("otaguard") and _is_module(f"{target}.{alias.name}"):
                    out.add(f"{target}.{alias.name}")
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _server_group(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["otaguard", "server"] or len(parts) < 3:
        return None
    return parts[2]


def _layer_of(group: str) -> int:
    for i, layer in enumerate(SERVER_LAYERS):
        if group in layer:
            return i
    raise AssertionError(f"otaguard.server.{group} is in no layer of SERVER_LAYERS")


# Circles outside the server that predate this test (a device HAL type-checking back-import,
# the signing service and its MCUboot half); issue #20 leaves them to their own change. The
# list may only shrink: a new circle anywhere fails.
KNOWN_CYCLES = [
    ["otaguard.device.bootstate", "otaguard.device.hal"],
    ["otaguard.signing.mcuboot", "otaguard.signing.service"],
]


def test_no_import_cycle() -> None:
    assert [c for c in _cycles(_internal(_graph())) if c not in KNOWN_CYCLES] == []


def test_no_import_cycle_in_server_or_engine() -> None:
    cycles = _cycles(_internal(_graph()))
    assert [
        c for c in cycles if any(m.startswith(("otaguard.server", "otaguard.rollout")) for m in c)
    ] == []


def test_cycle_detection_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_rollout_engine_is_pure() -> None:
    graph = _graph()
    engine = [m for m in graph if m == "otaguard.rollout" or m.startswith("otaguard.rollout.")]
    assert len(engine) >= 6
    bad = []
    for m in engine:
        for t in graph[m]:
            top = t.split(".")[0]
            if top in IO_LIBRARIES:
                bad.append((m, t))
    # nothing of the server, devices, simulator or CLI, even transitively
    internal = _internal(graph)
    seen: set[str] = set()
    todo = list(engine)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(internal[m])
    for m in seen:
        if m.split(".")[1] in {"server", "device", "sim", "cli", "signing"}:
            bad.append(("otaguard.rollout", m))
    assert bad == []


def test_server_layers_point_down() -> None:
    graph = _internal(_graph())
    bad = []
    for m, targets in graph.items():
        group = _server_group(m)
        if group is None or group == "__init__":
            continue
        mine = _layer_of(group)
        for t in targets:
            other = _server_group(t)
            if other is None or other == group:
                continue
            if _layer_of(other) >= mine:
                bad.append(f"{m} -> {t}")
    assert bad == []


def test_server_imports_nothing_above_it() -> None:
    graph = _internal(_graph())
    bad = [
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("otaguard.server")
        for t in ts
        if t.split(".")[1] in {"cli", "sim", "device"}
    ]
    assert bad == []
