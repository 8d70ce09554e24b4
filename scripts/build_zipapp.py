#!/usr/bin/env python3
"""Build the zipapps reproducibly: sorted entries, fixed timestamps and modes.

Usage: python3 scripts/build_zipapp.py [--host] [OUTPUT]

- dist/enclave.pyz (default): the enclave image's. The runtime, the verifier library
  (enclave/nitro), the dev-shim PKI (dev-shim is part of the runtime for local use; staging and
  production refuse it) and `check-config` (to check the image's configuration in the image).
  NOT the other host commands (verify, probe, sign, send-secrets, seal-secrets): they run on
  parents and laptops, never in an enclave, so the measured image does not carry them.
- dist/enclave-host.pyz (--host): everything, for parents, laptops and host services.

Timestamps come from SOURCE_DATE_EPOCH (default 1980-01-01, the zip format's epoch), so two
builds of the same tree are byte-identical: the enclave's PCRs depend on it. An archive holds
only the project's code; cryptography and cbor2 come from the image's site-packages.
"""

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZIP_EPOCH = 315532800  # 1980-01-01T00:00:00Z, the earliest time a zip entry can hold
SHEBANG = b"#!/usr/bin/env python3\n"
FILE_MODE = 0o644
INCLUDE_SUFFIXES = (".py", ".pem")
MAIN = b'"""Zipapp entry point."""\nimport sys\n\nfrom enclave.cli import main\n\nsys.exit(main())\n'


HOST_PACKAGE = "enclave/host"
IN_THE_IMAGE_FROM_HOST = ("__init__.py", "check_config.py")  # check the image's configuration


def in_enclave_image(relative: str) -> bool:
    """Whether a package file goes into the enclave image's zipapp."""
    folder, _, name = relative.rpartition("/")
    return folder != HOST_PACKAGE or name in IN_THE_IMAGE_FROM_HOST


class BuildError(Exception):
    """The tree cannot be packed as it is (exit 2)."""


def tracked_files() -> list[str] | None:
    """The package files git tracks (relative paths), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "enclave"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [name for name in out.decode("utf-8").split("\0") if name]


def source_files(host: bool = False) -> list[Path]:
    """What goes into the archive. In a git checkout, ONLY files git tracks: a file git ignores
    or does not know (a key, a scratch module) must never reach a public, measured image, and a
    file that is not committed would make PCR0 impossible to rebuild from the commit."""
    package = ROOT / "enclave"
    on_disk = {p.relative_to(ROOT).as_posix() for p in package.rglob("*")
               if p.is_file() and p.suffix in INCLUDE_SUFFIXES and "__pycache__" not in p.parts}
    tracked = tracked_files()
    if tracked is not None:
        stray = sorted(on_disk - set(tracked))
        if stray:
            raise BuildError("files under enclave/ that git does not track would go into the "
                             f"archive: {', '.join(stray)} (commit or remove them)")
    names = sorted(n for n in on_disk if host or in_enclave_image(n))
    return [ROOT / n for n in names]


def build(output: Path, host: bool = False) -> Path:
    epoch = max(int(os.environ.get("SOURCE_DATE_EPOCH") or ZIP_EPOCH), ZIP_EPOCH)
    date_time = time.gmtime(epoch)[:6]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    with open(tmp, "wb") as raw:
        raw.write(SHEBANG)
        # Stored, not deflated: zlib builds differ in what they emit (zlib-ng, hardware
        # deflate), so compressed bytes, and the PCRs, would depend on the build host.
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as zf:
            entries = [("__main__.py", MAIN)]
            entries += [(p.relative_to(ROOT).as_posix(), p.read_bytes())
                        for p in source_files(host)]
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time)
                info.external_attr = (0o100000 | FILE_MODE) << 16
                info.compress_type = zipfile.ZIP_STORED
                info.create_system = 3  # unix, whatever the build host
                zf.writestr(info, data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)
    return output


USAGE = """usage: build_zipapp.py [-h] [--host] [OUTPUT]

Build a reproducible zipapp (sorted entries, fixed timestamps from SOURCE_DATE_EPOCH).

positional arguments:
  OUTPUT      where to write it (default dist/enclave.pyz, with --host dist/enclave-host.pyz)

options:
  -h, --help  show this help message and exit
  --host      the host tools' zipapp: every command (the default is the enclave image's,
              without verify, probe, sign, send-secrets and seal-secrets)
"""


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(USAGE)
        return 0
    host = "--host" in argv
    argv = [arg for arg in argv if arg != "--host"]
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        sys.stderr.write(USAGE.split("\n\n", 1)[0] + "\n")
        return 2
    default = ROOT / "dist" / ("enclave-host.pyz" if host else "enclave.pyz")
    try:
        print(build(Path(argv[0]) if argv else default, host=host))
    except BuildError as exc:
        sys.stderr.write(f"build_zipapp.py: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
