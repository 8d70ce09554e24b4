"""The package's layers, read from the import statements with `ast` (nothing is executed).

- enclave/nitro/ (the verifier library) imports nothing of the runtime but the root error type;
- only enclave/host/ and enclave/cli.py import enclave/host/;
- the trust cores take plain values: they never import the configuration;
- one representation of time at module boundaries: outside enclave/nitro every function
  parameter named `now` is Unix seconds, annotated `float` (or `float | None`), never a
  datetime. enclave/nitro keeps `at_ms`, the unit of Nitro documents.
"""

import ast
import subprocess
import sys
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "enclave"
NITRO_MAY_IMPORT = {"enclave", "enclave.errors"}
TRUST_CORES = ("enclave.secrets", "enclave.rpcauth", "enclave.nsm", "enclave.sealing",
               "enclave.sigv4", "enclave.cms", "enclave.envelope")
HOST_IMPORTERS = ("enclave.host", "enclave.cli")
NOW_ANNOTATIONS = ("float", "float | None")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(name: str, is_package: bool, source: str) -> set[str]:
    """Absolute dotted names a module imports (relative imports resolved); `from X import y`
    yields both X and X.y, since y may be a module."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return {m for m in out if m == "enclave" or m.startswith("enclave.")}


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def package_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names = imported_names(module_name(path), path.name == "__init__.py", path.read_text())
        graph[module_name(path)] = {n for n in names if is_module(n)}
    return graph


def is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imports in sorted(graph.items()):
        for imported in sorted(imports):
            if (is_under(module, "enclave.nitro") and not is_under(imported, "enclave.nitro")
                    and imported not in NITRO_MAY_IMPORT):
                found.append(f"{module} -> {imported}: enclave.nitro must not import the runtime")
            if (is_under(imported, "enclave.host")
                    and not any(is_under(module, m) for m in HOST_IMPORTERS)):
                found.append(f"{module} -> {imported}: only enclave.host and enclave.cli "
                             "import enclave.host")
            if module in TRUST_CORES and imported == "enclave.config":
                found.append(f"{module} -> {imported}: a trust core takes plain values")
    return found


def time_violations(name: str, source: str) -> list[str]:
    """Every function parameter named `now` in module `name` is annotated Unix seconds
    (NOW_ANNOTATIONS); enclave/nitro is exempt (it takes `at_ms`)."""
    if is_under(name, "enclave.nitro"):
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = node.args
        for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs:
            if arg.arg != "now":
                continue
            where = f"{name}.{node.name} (line {node.lineno})"
            annotation = ast.unparse(arg.annotation) if arg.annotation is not None else None
            if annotation is None:
                found.append(f"{where}: parameter now has no annotation; it is Unix seconds "
                             "(float)")
            elif "datetime" in annotation:
                found.append(f"{where}: parameter now is annotated {annotation}; the time "
                             "crosses modules as Unix seconds (float), not a datetime")
            elif annotation not in NOW_ANNOTATIONS:
                found.append(f"{where}: parameter now is annotated {annotation}; expected "
                             f"{' or '.join(NOW_ANNOTATIONS)}")
    return found


def package_time_violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found.extend(time_violations(module_name(path), path.read_text()))
    return found


class TestLayering(unittest.TestCase):
    def test_the_package_keeps_its_layers(self):
        graph = package_graph()
        self.assertIn("enclave.nitro.cose", graph["enclave.nitro.verifier"])  # the graph is read
        self.assertIn("enclave.host.args", graph["enclave.host.probe"])
        self.assertEqual(violations(graph), [])

    def test_each_rule_catches_a_planted_import(self):
        planted = {
            "enclave.nitro.planted": imported_names(
                "enclave.nitro.planted", False, "from ..config import Settings\n"
                                                "from .. import errors\nfrom . import cose\n"),
            "enclave.server": imported_names("enclave.server", False,
                                             "from .host import probe\n"),
            "enclave.rpcauth": imported_names("enclave.rpcauth", False,
                                              "import enclave.config\n"),
            "enclave.host.verify": imported_names("enclave.host.verify", False,
                                                  "from ..config import Settings\n"),
        }
        planted = {m: {n for n in names if is_module(n)} for m, names in planted.items()}
        self.assertEqual(violations(planted), [
            "enclave.nitro.planted -> enclave.config: enclave.nitro must not import the runtime",
            "enclave.rpcauth -> enclave.config: a trust core takes plain values",
            "enclave.server -> enclave.host: only enclave.host and enclave.cli import "
            "enclave.host",
            "enclave.server -> enclave.host.probe: only enclave.host and enclave.cli import "
            "enclave.host",
        ])

    def test_now_is_unix_seconds_at_every_boundary(self):
        self.assertEqual(package_time_violations(), [])
        # the check reads the package: the functions it must see are there
        source = (PACKAGE / "secrets.py").read_text()
        self.assertIn("def apply_update(current: SecretsState, unverified: dict, now: float",
                      source)

    def test_the_time_rule_catches_planted_parameters(self):
        planted = ("import datetime as dt\n"
                   "from datetime import datetime\n"
                   "def a(now: float): ...\n"
                   "def b(x, *, now: float | None = None): ...\n"
                   "def c(now: dt.datetime): ...\n"
                   "def d(now: datetime | None = None): ...\n"
                   "def e(now=None): ...\n"
                   "class K:\n"
                   "    async def f(self, now: int): ...\n"
                   "    def g(self, moment: dt.datetime, at_ms: int): ...\n")
        self.assertEqual(time_violations("enclave.planted", planted), [
            "enclave.planted.c (line 5): parameter now is annotated dt.datetime; the time "
            "crosses modules as Unix seconds (float), not a datetime",
            "enclave.planted.d (line 6): parameter now is annotated datetime | None; the time "
            "crosses modules as Unix seconds (float), not a datetime",
            "enclave.planted.e (line 7): parameter now has no annotation; it is Unix seconds "
            "(float)",
            "enclave.planted.f (line 9): parameter now is annotated int; expected float or "
            "float | None",
        ])
        # enclave/nitro keeps its own unit and is not read by this rule
        self.assertEqual(time_violations("enclave.nitro.planted", planted), [])

    def test_importing_the_verifier_loads_no_runtime_module(self):
        script = ("import sys, enclave.nitro; print('\\n'.join(sorted(m for m in sys.modules "
                  "if m.startswith('enclave') or m in ('http.server', 'socketserver', 'ctypes'))))")
        loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.split()
        self.assertIn("enclave.nitro.verifier", loaded)
        self.assertEqual([m for m in loaded if not is_under(m, "enclave.nitro")
                          and m not in NITRO_MAY_IMPORT], [])


if __name__ == "__main__":
    unittest.main()
