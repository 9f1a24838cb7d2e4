"""The layers of docs/design.md ("Layers"), checked on the source: an import that breaks them fails here.

The import graph of the `optserve` package (client/optserve and server/optserve) is built from the
source with `ast`, without importing anything: every `import` and `from ... import` statement, at
module level, inside functions and under `if TYPE_CHECKING:` alike, so that no import cycle can hide
behind a function-level import or a type-only one. Relative imports are resolved against their
package, and `from pkg import name` is an import of the submodule `pkg.name` when there is one (else
of `pkg`). A package's `__init__` is not implied by an import of one of its submodules: an edge is
only what a statement names.

The rules (docs/design.md, "Layers"):
- no import cycle anywhere in the package;
- grpc, grpc_* and protobuf, and the generated `optserve.v1`, are imported only by the server's
  API layer (`optserve.server.api`), its entry points `cli/` and `server.py`, and the client
  package `optserve.client` (its transport);
- `optserve.wire`, the one package the client and the server share, imports only numpy, ml_dtypes,
  the standard library and itself;
- the server's layers import downwards only: api -> checkpoint -> state -> core -> spec, wire;
  the entry points (cli, server, demo, logs) sit above api;
- the client side (`optserve.client`, `optserve.wire`, `optserve.v1`) never imports the server, and
  below its entry points the server imports nothing of the client but `optserve.wire`;
- a function-level import of a module of this package is declared in DEFERRED_IMPORTS, with why;
- on the client side the frameworks (torch, jax, flax, optax) are imported only by their drop-ins,
  `optserve.torch` and `optserve.jax`, which the light client never imports; `optserve.client`
  converts a torch or jax leaf it was handed with function-level imports in pytree.py only.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping

import pytest

from tests.conftest import ROOT

SOURCE_ROOTS = (os.path.join(ROOT, "client"), os.path.join(ROOT, "server"))
PACKAGE = "optserve"

# Function-level imports of modules of this package, each allowed for the reason given. Only
# imports that defer a heavy dependency (jax, the server) for start-up time belong here: a
# function-level import that dodges an import cycle does not (the cycle test counts function-level
# imports anyway, so an entry here can never hide a cycle). An entry that matches no import fails
# the test: remove it with the import it described.
DEFERRED_IMPORTS: dict[tuple[str, str], str] = {
    # `import optserve.server` (the CLI, the demo's workers) must not load jax: `Server` is
    # imported on first access (module __getattr__).
    ("optserve.server", "optserve.server.server"): "jax on first use of Server",
    # `optserve --help` and the admin commands answer without loading jax or the server.
    ("optserve.server.cli.serve", "optserve.server.server"): "jax and the server: only `optserve serve` needs them",
    ("optserve.server.cli.serve", "optserve.server.api.auth"): "grpc and the client, after the cheap option checks",
    ("optserve.server.cli.serve", "optserve.server.logs"): "logging setup, only for `optserve serve`",
    ("optserve.server.cli.admin", "optserve.client"): "the client, only for the admin commands",
    ("optserve.server.cli.transfer", "optserve.client"): "the client, only for download and upload",
    ("optserve.server.cli.admin", "optserve.server.spec"): "the spec compiler (jax, optax), only for `optserve rules`",
    ("optserve.server.cli", "optserve.server.demo"): "the demo (scikit-learn), only for `optserve demo`",
    (
        "optserve.server.cli.reshard",
        "optserve.server.checkpoint.resharding",
    ): "jax and the spec compiler, only for `optserve reshard`",
    ("optserve.server.cli", "optserve.server.top"): "rich, only for `optserve top`",
    # `optserve demo` checks for scikit-learn before it loads jax and starts anything.
    ("optserve.server.demo", "optserve.server.server"): "jax and the server, after the scikit-learn check",
    ("optserve.server.demo", "optserve.client.optim"): "loaded with the server, after the scikit-learn check",
    ("optserve.server.demo", "optserve.server.demo_worker"): "loaded with the server, after the scikit-learn check",
}

# The server's layers, lowest first: a module may import modules of its own layer and below.
SERVER = "optserve.server"
LAYERS = ("wire", "spec", "core", "state", "checkpoint", "api", "entry")
LAYER_OF_PACKAGE = {
    "optserve.wire": "wire",
    "optserve.server.spec": "spec",
    "optserve.server.core": "core",
    "optserve.server.state": "state",
    "optserve.server.checkpoint": "checkpoint",
    "optserve.server.api": "api",
}
# Modules that talk gRPC and protobuf: the API layer, the server's entry points, the client.
TRANSPORT_IMPORTERS = (
    "optserve.server.api",
    "optserve.server.cli",
    "optserve.server.server",
    "optserve.client",
    "optserve.v1",
)
# The server's modules that may use the client: Server.client(), the admin commands, the demo.
CLIENT_USERS = ("optserve.server.server", "optserve.server.cli", "optserve.server.demo", "optserve.server.demo_worker")
WIRE_DEPENDENCIES = ("numpy", "ml_dtypes")
# The drop-ins (README.md, "PyTorch", "JAX and optax"): the only client-side packages that import a
# framework, each its own ones.
CLIENT_SIDE = ("optserve.client", "optserve.wire", "optserve.v1", "optserve.torch", "optserve.jax")
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "optax")
FRAMEWORKS_OF_DROPIN = {"optserve.torch": ("torch",), "optserve.jax": ("jax", "flax", "optax")}
# ...and the light client's converters of leaves the caller handed in, inside functions only.
LAZY_FRAMEWORK_IMPORTERS = ("optserve.client.pytree",)


@dataclasses.dataclass(frozen=True)
class Import:
    """One name an import statement brings in."""

    importer: str  # the importing module
    imported: str  # a module of the package, or the dotted name of an external one
    internal: bool  # `imported` is a module of the package
    kind: str  # "module", "function" (inside a def or lambda) or "type-checking"
    file: str
    line: int

    def where(self) -> str:
        kind = "" if self.kind == "module" else f", {self.kind} import"
        return f"{self.file}:{self.line}{kind}"


def module_files(roots: Iterable[str], package: str = PACKAGE) -> dict[str, tuple[str, bool]]:
    """Module name -> (file, is a package's __init__) for every .py file of `package` under `roots`."""
    modules = {}
    for root in roots:
        top = os.path.join(root, package)
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
                is_package = parts[-1] == "__init__"
                if is_package:
                    parts = parts[:-1]
                modules[".".join(parts)] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, file: str, modules: Mapping[str, object], package: str):
        self.module, self.file, self.modules, self.package = module, file, modules, package
        self.own_package = module if is_package else module.rpartition(".")[0]
        self.kind = "module"
        self.found: list[Import] = []
        self.unresolved: list[str] = []

    def _add(self, imported: str, line: int) -> None:
        if imported == self.package or imported.startswith(self.package + "."):
            if imported in self.modules:
                self.found.append(Import(self.module, imported, True, self.kind, self.file, line))
            else:
                self.unresolved.append(f"{self.file}:{line}: {imported}")
        else:
            self.found.append(Import(self.module, imported, False, self.kind, self.file, line))

    def _nested(self, node: ast.AST, kind: str) -> None:
        outer, self.kind = self.kind, kind
        self.generic_visit(node)
        self.kind = outer

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        # decorators and defaults run at definition time, but an import cannot be written there
        self._nested(node, "function")

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]
    visit_Lambda = visit_FunctionDef  # type: ignore[assignment]

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        for stmt in node.body:
            outer, self.kind = self.kind, "type-checking" if self.kind == "module" else self.kind
            self.visit(stmt)
            self.kind = outer
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.own_package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            internal = base == self.package or base.startswith(self.package + ".")
            if alias.name == "*":
                self._add(base, node.lineno)
            elif internal:
                self._add(sub if sub in self.modules else base, node.lineno)
            else:
                self._add(sub, node.lineno)


@dataclasses.dataclass
class ImportGraph:
    modules: dict[str, tuple[str, bool]]
    imports: list[Import]
    unresolved: list[str]

    def edges(self) -> dict[str, dict[str, Import]]:
        """importer -> {imported module of the package: the first statement that imports it}."""
        out: dict[str, dict[str, Import]] = {m: {} for m in self.modules}
        for imp in self.imports:
            if imp.internal and imp.imported != imp.importer:
                out[imp.importer].setdefault(imp.imported, imp)
        return out


def build_graph(roots: Iterable[str] = SOURCE_ROOTS, package: str = PACKAGE) -> ImportGraph:
    modules = module_files(roots, package)
    imports: list[Import] = []
    unresolved: list[str] = []
    for module, (path, is_package) in sorted(modules.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        collector = _ImportCollector(module, is_package, os.path.relpath(path, ROOT), modules, package)
        collector.visit(tree)
        imports += collector.found
        unresolved += collector.unresolved
    return ImportGraph(modules, imports, unresolved)


def strongly_connected(edges: Mapping[str, Mapping[str, Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def enter(node: str) -> tuple[str, Iterator[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return node, iter(sorted(edges.get(node, {})))

    for root in sorted(edges):
        if root in index:
            continue
        work = [enter(root)]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    work.append(enter(child))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def shortest_cycle(edges: Mapping[str, Mapping[str, Import]], component: list[str]) -> list[Import]:
    """A shortest cycle through the component's first module, as the imports that make it."""
    members, start = set(component), component[0]
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier and start not in came_from:
        reached = []
        for node in frontier:
            for child, imp in sorted(edges[node].items()):
                if child in members and child not in came_from:
                    came_from[child] = imp
                    reached.append(child)
        frontier = reached
    path, node = [], start
    while True:
        imp = came_from[node]
        path.append(imp)
        node = imp.importer
        if node == start:
            return path[::-1]


def find_cycles(edges: Mapping[str, Mapping[str, Import]]) -> list[list[Import]]:
    """One shortest cycle per strongly connected component (describe_cycle shows the rest)."""
    return [shortest_cycle(edges, c) for c in strongly_connected(edges)]


def describe_cycle(cycle: list[Import], edges: Mapping[str, Mapping[str, Import]] | None = None) -> str:
    """The cycle, then (with `edges`) every import among the modules of its component: all of the
    imports one of which must go."""
    lines = [cycle[0].importer]
    lines += [f"  -> {imp.imported}   ({imp.where()})" for imp in cycle]
    if edges is not None:
        component = next(c for c in strongly_connected(edges) if cycle[0].importer in c)
        if len(component) > len(cycle):
            lines.append(f"  in a tangle of {len(component)} modules, whose imports among themselves are:")
            lines += [
                f"    {a} -> {b}   ({imp.where()})"
                for a in component
                for b, imp in sorted(edges[a].items())
                if b in component
            ]
    return "\n".join(lines)


def layer_of(module: str) -> str | None:
    """The server layer of a module of the server or of the wire; None for the client side."""
    for package, layer in LAYER_OF_PACKAGE.items():
        if module == package or module.startswith(package + "."):
            return layer
    if module == SERVER or module.startswith(SERVER + "."):
        return "entry"
    return None


def within(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def is_transport(imp: Import) -> bool:
    """grpc, grpc_* (health, reflection, tools), protobuf, or the generated modules."""
    if imp.internal:
        return within(imp.imported, ("optserve.v1",))
    top = imp.imported.split(".")[0]
    return top == "grpc" or top.startswith("grpc_") or within(imp.imported, ("google.protobuf",))


def report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n" + "\n".join(problems)


# -- checks of the tree --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_graph()


def test_the_graph_covers_the_package(graph: ImportGraph):
    """The checks below see every module and every kind of import (else they could pass vacuously)."""
    for module in (
        "optserve.client",
        "optserve.client.client",
        "optserve.wire",
        "optserve.v1.optserve_pb2",
        "optserve.server",
        "optserve.server.server",
        "optserve.server.cli",
        "optserve.server.spec.compiler",
    ):
        assert module in graph.modules, f"{module} not found under {SOURCE_ROOTS}"
    for package in (
        "optserve.server.api",
        "optserve.server.core",
        "optserve.server.state",
        "optserve.server.checkpoint",
    ):
        assert any(m.startswith(package + ".") for m in graph.modules), f"no module in {package}"
    kinds = {imp.kind for imp in graph.imports if imp.internal}
    assert "module" in kinds and "function" in kinds, kinds
    edges = graph.edges()
    assert "optserve.server.server" in edges["optserve.server.cli.serve"]  # a function-level import
    assert any(m.startswith("optserve.wire") for m in edges["optserve.client.model"])
    assert not graph.unresolved, report(graph.unresolved, "imports of modules that do not exist")


def test_no_import_cycles(graph: ImportGraph):
    edges = graph.edges()
    cycles = find_cycles(edges)
    assert not cycles, report(
        [describe_cycle(c, edges) for c in cycles],
        "import cycles (function-level and TYPE_CHECKING imports count: break the cycle, do not hide it)",
    )


def test_only_the_api_layer_the_entry_points_and_the_client_talk_grpc(graph: ImportGraph):
    problems = [
        f"{imp.importer} imports {imp.imported} ({imp.where()})"
        for imp in graph.imports
        if is_transport(imp) and not within(imp.importer, TRANSPORT_IMPORTERS)
    ]
    assert not problems, report(
        problems,
        "imports of grpc, protobuf or optserve.v1 outside optserve.server.api, cli/, server.py and optserve.client",
    )


def test_the_wire_imports_only_numpy_ml_dtypes_and_the_standard_library(graph: ImportGraph):
    problems = []
    for imp in graph.imports:
        if not within(imp.importer, ("optserve.wire",)):
            continue
        if imp.internal:
            ok = within(imp.imported, ("optserve.wire",))
        else:
            top = imp.imported.split(".")[0]
            ok = top in WIRE_DEPENDENCIES or top in sys.stdlib_module_names
        if not ok:
            problems.append(f"{imp.importer} imports {imp.imported} ({imp.where()})")
    assert not problems, report(problems, "imports in optserve.wire beyond numpy, ml_dtypes and the standard library")


def test_the_server_layers_import_downwards_only(graph: ImportGraph):
    problems = []
    for importer, targets in graph.edges().items():
        own = layer_of(importer)
        if own is None or own == "wire":  # the wire's own rule is the test above
            continue
        for imported, imp in targets.items():
            theirs = layer_of(imported)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(own):
                problems.append(f"{importer} ({own}) imports {imported} ({theirs}) ({imp.where()})")
    assert not problems, report(problems, f"upward imports (the order, lowest first: {' < '.join(LAYERS)})")


def test_the_client_side_never_imports_the_server(graph: ImportGraph):
    problems = [
        f"{importer} imports {imported} ({imp.where()})"
        for importer, targets in graph.edges().items()
        if within(importer, CLIENT_SIDE)
        for imported, imp in targets.items()
        if within(imported, (SERVER,))
    ]
    assert not problems, report(problems, "imports of the server by the client side")


def test_only_the_drop_ins_import_the_frameworks(graph: ImportGraph):
    problems = []
    for imp in graph.imports:
        if not within(imp.importer, CLIENT_SIDE):
            continue
        if imp.internal:
            dropins = tuple(FRAMEWORKS_OF_DROPIN)
            if within(imp.imported, dropins) and not within(imp.importer, dropins):
                problems.append(f"{imp.importer} imports the drop-in {imp.imported} ({imp.where()})")
            continue
        top = imp.imported.split(".")[0]
        if top not in FRAMEWORKS:
            continue
        own = [d for d in FRAMEWORKS_OF_DROPIN if within(imp.importer, (d,))]
        if own and top in FRAMEWORKS_OF_DROPIN[own[0]]:
            continue
        if within(imp.importer, LAZY_FRAMEWORK_IMPORTERS) and imp.kind == "function" and top in ("torch", "jax"):
            continue
        problems.append(f"{imp.importer} imports {imp.imported} ({imp.where()})")
    assert not problems, report(
        problems,
        "imports of torch, jax, flax or optax on the client side outside their drop-ins (optserve.torch, "
        "optserve.jax) and pytree.py's function-level converters",
    )
    importers = {imp.importer for imp in graph.imports if not imp.internal and imp.imported.split(".")[0] == "torch"}
    assert "optserve.torch.optimizer" in importers, "the check above saw no import of torch by optserve.torch"


def test_the_server_shares_only_the_wire_with_the_client(graph: ImportGraph):
    problems = [
        f"{importer} imports {imported} ({imp.where()})"
        for importer, targets in graph.edges().items()
        if within(importer, (SERVER,)) and not within(importer, CLIENT_USERS)
        for imported, imp in targets.items()
        if within(imported, ("optserve.client",))
    ]
    assert not problems, report(
        problems,
        "imports of optserve.client by the server below its entry points "
        "(what both sides need belongs in optserve.wire)",
    )


def test_function_level_imports_are_declared(graph: ImportGraph):
    found = {(imp.importer, imp.imported): imp for imp in graph.imports if imp.internal and imp.kind == "function"}
    undeclared = [
        f"{a} imports {b} ({imp.where()})" for (a, b), imp in sorted(found.items()) if (a, b) not in DEFERRED_IMPORTS
    ]
    stale = [f"{a} -> {b}" for a, b in sorted(DEFERRED_IMPORTS) if (a, b) not in found]
    assert not undeclared, report(
        undeclared,
        "function-level imports not in DEFERRED_IMPORTS (move them to the "
        "top of the module; declare only those that defer a heavy import)",
    )
    assert not stale, report(stale, "DEFERRED_IMPORTS entries that match no function-level import (remove them)")


# -- the checker itself, on a package written for the purpose --------------------------------------


def _write_package(root: str, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = os.path.join(root, "pkg", *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))


def test_the_checker_sees_cycles_behind_function_level_relative_and_type_checking_imports(tmp_path):
    _write_package(
        str(tmp_path),
        {
            "__init__.py": "",
            "a/__init__.py": "",
            "a/one.py": "from . import two\n",  # relative, `from pkg import submodule`
            "a/two.py": "def f():\n    from pkg.b import three\n",  # function level
            "b/__init__.py": "",
            "b/three.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a.one import X\n",
            "b/four.py": "import pkg.a.one\nfrom pkg.b import three, helper\n",  # outside the cycle
        },
    )
    g = build_graph([str(tmp_path)], "pkg")
    assert not g.unresolved
    edges = g.edges()
    assert set(edges["pkg.a.one"]) == {"pkg.a.two"}
    assert edges["pkg.a.two"]["pkg.b.three"].kind == "function"
    assert edges["pkg.b.three"]["pkg.a.one"].kind == "type-checking"
    assert set(edges["pkg.b.four"]) == {"pkg.a.one", "pkg.b.three", "pkg.b"}  # helper: a name in pkg.b
    (cycle,) = find_cycles(edges)
    assert [imp.importer for imp in cycle] == ["pkg.a.one", "pkg.a.two", "pkg.b.three"]
    text = describe_cycle(cycle)
    assert "pkg.a.two" in text and "function import" in text and "type-checking import" in text, text


def test_the_checker_finds_no_cycle_in_a_layered_package(tmp_path):
    _write_package(
        str(tmp_path),
        {
            "__init__.py": "from pkg import top\n",
            "top.py": "import json\nfrom pkg import low\ndef f():\n    from pkg import low\n",
            "low.py": "import numpy\n",
        },
    )
    g = build_graph([str(tmp_path)], "pkg")
    assert find_cycles(g.edges()) == []
    assert {(i.importer, i.imported, i.kind) for i in g.imports if not i.internal} == {
        ("pkg.top", "json", "module"),
        ("pkg.low", "numpy", "module"),
    }


def test_the_checker_reports_imports_of_modules_that_do_not_exist(tmp_path):
    _write_package(str(tmp_path), {"__init__.py": "", "a.py": "from pkg.gone import x\nimport pkg.b.c\n"})
    g = build_graph([str(tmp_path)], "pkg")
    assert len(g.unresolved) == 2, g.unresolved


def test_layers_and_transport_rules_classify_modules():
    assert layer_of("optserve.server.core.model") == "core"
    assert layer_of("optserve.server.api") == "api"
    assert layer_of("optserve.server.cli") == "entry" and layer_of("optserve.server") == "entry"
    assert layer_of("optserve.wire.framing") == "wire"
    assert layer_of("optserve.client.model") is None
    grpc_import = Import("m", "grpc_health.v1.health", False, "module", "f", 1)
    assert is_transport(grpc_import) and is_transport(dataclasses.replace(grpc_import, imported="grpc"))
    assert is_transport(dataclasses.replace(grpc_import, imported="google.protobuf.message"))
    assert is_transport(Import("m", "optserve.v1.optserve_pb2", True, "module", "f", 1))
    assert not is_transport(dataclasses.replace(grpc_import, imported="grpcx"))
