"""The package's layers, read from the import statements with `ast` (nothing is executed).

- enclave/nitro/ (the verifier library) imports nothing of the runtime but the root error type;
- only enclave/host/ and enclave/cli.py import enclave/host/;
- the trust cores take plain values: they never import the configuration.
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
