"""Command line: serve (default) in the enclave; check-config, verify, probe, sign, send-secrets
and seal-secrets on hosts (enclave.host).

Exit codes are part of the contract: 0 success, 1 rejected or failed check, 2 usage or
configuration error. A missing (or broken) `cryptography` or `cbor2` is one line and exit 2,
not a traceback: host tools often run on a parent or a laptop without the enclave's image.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2
REQUIRED_PACKAGES = ("cryptography", "cbor2")  # requirements.txt; the rest is the stdlib

# command name -> (module, one line for the command list). The module exposes HELP (the
# command's own description), add_arguments(parser) and run(args) -> int. Modules are imported
# only when their command runs, to keep start-up fast.
COMMANDS = {
    "serve": ("enclave.service", "run the runtime (the default command)"),
    "check-config": ("enclave.host.check_config", "validate the configuration, print it redacted"),
    "verify": ("enclave.host.verify", "verify an attestation document (and evidence, responses)"),
    "probe": ("enclave.host.probe", "fail-closed start-up probe of a running runtime"),
    "sign": ("enclave.host.sign", "print X-Enclave-* headers that sign an RPC request"),
    "send-secrets": ("enclave.host.send_secrets", "deliver a secrets JSON file to the listener"),
    "seal-secrets": ("enclave.host.seal_secrets", "seal a secrets payload under a KMS key"),
}


def missing_package(exc: ImportError) -> str | None:
    """The required package an ImportError is about: not installed (`exc.name`), or installed
    but failing to import (raised from inside it). None for any other ImportError."""
    top = (exc.name or "").partition(".")[0]
    if top in REQUIRED_PACKAGES:
        return top
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    innermost = next((f for f in reversed(frames) if not f.startswith("<")), "")
    parts = os.path.normpath(innermost).split(os.sep)
    return next((name for name in REQUIRED_PACKAGES if name in parts), None)


def _carried(module_name: str) -> bool:
    """Whether this build holds the module's source (dist/enclave.pyz leaves host tools out)."""
    import importlib.resources  # here: only a failed host-command import needs it
    package, _, name = module_name.rpartition(".")
    try:
        return importlib.resources.files(package).joinpath(f"{name}.py").is_file()
    except (ModuleNotFoundError, TypeError):
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ImportError as exc:
        package = missing_package(exc)
        if package is None:
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"enclave: missing Python package {package!r} ({reason}): "
              f"pip install -r requirements.txt (see README \"Host tools\")", file=sys.stderr)
        return EXIT_USAGE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["serve"]):
        # The enclave's own start: nothing to parse, and argparse costs ~8 ms of start-up.
        try:
            from enclave import service
            return service.run(SimpleNamespace(command="serve", env_file=None))
        except KeyboardInterrupt:  # before serve installs its own signal handlers
            return 130
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")
    import argparse  # imported here: the plain `serve` path above does without it
    parser = argparse.ArgumentParser(prog="enclave",
                                     description="Enclave runtime for AWS Nitro Enclaves.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv[0]:  # import only the command that runs
            try:
                modules[name] = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name or _carried(module_name):
                    raise  # a real import problem, not a build without host tools
                print(f"enclave: '{name}' is a host command and this build does not carry it "
                      "(dist/enclave.pyz is the enclave image's: the runtime and check-config); use "
                      "dist/enclave-host.pyz or python3 enclave.py", file=sys.stderr)
                return EXIT_USAGE
            command.description = modules[name].HELP
            modules[name].add_arguments(command)
    if argv[0] == "sign":  # nonces may start with "-": argparse would take them for options
        from enclave.host.args import attach_option_values
        from enclave.rpcauth import NONCE_RE
        argv = attach_option_values(argv, {"--nonce": NONCE_RE})
    args = parser.parse_args(argv)
    if args.version:
        from enclave import __version__
        print(__version__)
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return modules[args.command].run(args)
    except KeyboardInterrupt:
        return 130
