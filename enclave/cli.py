"""Command line: serve (default) in the enclave; check-config, verify, probe, sign, send-secrets
and seal-secrets on hosts (enclave.host).

Exit codes are part of the contract: 0 success, 1 rejected or failed check, 2 usage or
configuration error.
"""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2

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


def main(argv: list[str] | None = None) -> int:
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
            modules[name] = importlib.import_module(module_name)
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
