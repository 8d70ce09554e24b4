"""The suite's own runner (tests/run.py): a module whose worker dies is a failure, never a hang."""

import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60

SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from tests import run
run.module_names = lambda: ["dies_at_import", "passes"]
sys.exit(run.main(["-j", "2"]))
"""


class WorkerDeathTest(unittest.TestCase):
    def test_a_dead_worker_fails_its_module_and_the_run_ends(self):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "dies_at_import.py").write_text("import os\nos._exit(3)\n")
            Path(tmp, "passes.py").write_text(
                "import unittest\n\nclass T(unittest.TestCase):\n"
                "    def test_ok(self):\n        pass\n")
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            proc = subprocess.run([sys.executable, "-c", SCRIPT, tmp], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        output = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 1, output)
        self.assertIn("dies_at_import: FAILED, its worker died", output)
        self.assertRegex(output, r"\d+ passed, [1-9]\d* failed, 0 skipped")


if __name__ == "__main__":
    unittest.main()
