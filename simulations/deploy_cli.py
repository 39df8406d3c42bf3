"""``privatune coordinator``, ``privatune node`` and ``privatune certs``: a real federation.

``add_deployment_commands`` adds the three subcommands to the ``privatune`` parser; this
module also runs on its own (``python -m privatune.simulations.deploy_cli ...``) with the same
arguments. Heavy imports (torch, Flower) happen inside the handlers, so ``--help`` and
``certs`` stay fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from privatune.common.config import ConfigError

DEFAULT_DEPLOYMENT = "coordinator.yaml"


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (systemd, docker stop) like Ctrl-C, so child processes are stopped."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------- handlers


def _coordinator(args: argparse.Namespace) -> int:
    from privatune.common.config import load_job_config
    from privatune.server.deploy import DeploymentError, RunInputs, coordinate, load_deployment, serve

    job_path = Path(args.config).resolve()
    deployment_path = Path(args.deployment) if args.deployment else job_path.parent / DEFAULT_DEPLOYMENT
    deployment = load_deployment(deployment_path)
    extra = [Path(p).resolve() for p in args.register]
    _interrupt_on_sigterm()
    try:
        job = load_job_config(job_path)  # fail here, not inside the ServerApp
        run = deployment.run
        if run.model_dir:
            model_dir = deployment.resolve(run.model_dir)
        else:
            from privatune.simulations.runner import resolve_base_model

            model_dir = resolve_base_model(job, print).resolve()
        print(f"base model: {model_dir} (every hospital needs a copy; set it as site.model)",
              flush=True)
        if args.serve:
            return serve(deployment, extra)
        inputs = RunInputs(job_config=job_path, model_dir=model_dir,
                           out_dir=Path(args.out).resolve() if args.out else deployment.resolve(run.out_dir),
                           central_eval=deployment.resolve(run.central_eval) if run.central_eval else None)
        return coordinate(deployment, inputs, extra)
    except DeploymentError as err:
        print(f"privatune coordinator: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("privatune coordinator: interrupted", file=sys.stderr)
        return 130


def _node(args: argparse.Namespace) -> int:
    from privatune.client.deploy import NodeConnection, run_node

    connection = None
    if not args.check:
        missing = [flag for flag, value in (("--superlink", args.superlink),
                                            ("--root-cert", args.root_cert),
                                            ("--auth-key", args.auth_key)) if not value]
        if missing:
            raise ConfigError(f"privatune node: {', '.join(missing)} required to join a "
                              "federation (or pass --check to only validate the site)")
        connection = NodeConnection(superlink=args.superlink, root_cert=Path(args.root_cert),
                                    auth_key=Path(args.auth_key), runtime_port=args.runtime_port,
                                    max_wait_s=args.max_wait)
    _interrupt_on_sigterm()
    try:
        return run_node(Path(args.site), connection)
    except ConfigError:
        raise
    except ValueError as err:  # DataError, LedgerError: they name their file and line
        print(f"privatune node: {err}", file=sys.stderr)
        return 2


def _certs(args: argparse.Namespace) -> int:
    from privatune.common.certs import (CA_CERT, CA_KEY, SERVER_CERT, CertError, CertificateAuthority,
                              certificate_hosts, fingerprint, make_ca, make_node_keys,
                              make_server_cert, server_hosts)

    out = Path(args.out)
    try:
        if not args.keys_only:
            ca = CertificateAuthority(out / CA_CERT, out / CA_KEY)
            if ca.cert.exists() or ca.key.exists():  # never replaced: every node trusts it
                print(f"CA: reusing {ca.cert}")
            else:
                ca = make_ca(out)
                print(f"CA: {ca.cert} (give to hospitals) and {ca.key} (keep secret)")
            server_cert = out / SERVER_CERT
            wanted = server_hosts(args.host)
            if server_cert.exists() and not args.overwrite:
                missing = sorted(set(wanted) - set(certificate_hosts(server_cert)))
                if missing:
                    raise CertError(f"{server_cert}: exists but is not valid for "
                                    f"{', '.join(missing)}; pass --overwrite to make a new "
                                    "SuperLink certificate (same CA, nodes are unaffected)")
                print(f"SuperLink certificate: reusing {server_cert}")
            else:
                server = make_server_cert(ca, out, args.host, overwrite=args.overwrite)
                print(f"SuperLink certificate: {server.cert}, key {server.key}; valid for "
                      f"{', '.join(server.hosts)}")
            print(f"CA fingerprint (SHA-256), for hospitals to check ca.pem out of band:\n  "
                  f"{fingerprint(ca.cert)}")
        for name in args.hospital:
            pair = make_node_keys(out if args.keys_only else out / "nodes", name,
                                  overwrite=args.overwrite)
            print(f"hospital {name}: private key {pair.private_key} (stays at the site), public "
                  f"key {pair.public_key} (register it with the coordinator)")
    except CertError as err:
        print(f"privatune certs: {err}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- parser


def add_deployment_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``coordinator``, ``node`` and ``certs`` to the ``privatune`` subcommands."""
    coordinator = commands.add_parser(
        "coordinator", help="run a real federation: start or connect to the SuperLink "
        "(TLS, node authentication, state database) and run the job on it")
    coordinator.add_argument("--config", required=True,
                             help="job config YAML, e.g. configs/federation.yaml")
    coordinator.add_argument("--deployment", default="",
                             help=f"deployment YAML (SuperLink, certificates, node keys); default: "
                             f"{DEFAULT_DEPLOYMENT} next to --config")
    coordinator.add_argument("--out", default="", help="run directory (overrides run.out_dir)")
    coordinator.add_argument("--register", action="append", default=[], metavar="KEY.pub",
                             help="also register this hospital public key (repeatable)")
    coordinator.add_argument("--serve", action="store_true",
                             help="only run the SuperLink (and register keys) until Ctrl-C; "
                             "later 'privatune coordinator' calls submit runs to it")
    coordinator.set_defaults(handler=_coordinator)

    node = commands.add_parser(
        "node", help="join a federation as a hospital: validate the site, state what leaves "
        "it, start the SuperNode")
    node.add_argument("--site", required=True, help="the site policy YAML, e.g. configs/hospital.yaml")
    node.add_argument("--superlink", default="", metavar="HOST:PORT",
                      help="the coordinator's SuperLink address")
    node.add_argument("--root-cert", default="", metavar="ca.pem",
                      help="the federation's CA certificate (from the coordinator)")
    node.add_argument("--auth-key", default="", metavar="NAME.key",
                      help="this hospital's private authentication key")
    node.add_argument("--runtime-port", type=int, default=9094,
                      help="local port of the SuperNode's Runtime API (default 9094; change it "
                      "to run several nodes on one machine)")
    node.add_argument("--max-wait", type=float, default=None, metavar="SECONDS",
                      help="give up reconnecting to the SuperLink after this long (default: never)")
    node.add_argument("--check", action="store_true",
                      help="only validate the site and print what would leave it")
    node.set_defaults(handler=_node)

    certs = commands.add_parser(
        "certs", help="make the federation CA, the SuperLink certificate and hospital key pairs")
    certs.add_argument("--out", default="certs", help="directory for the files (default: certs)")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a DNS name or IP address hospitals use to reach the SuperLink "
                       "(repeatable; localhost and 127.0.0.1 are always included)")
    certs.add_argument("--hospital", action="append", default=[], metavar="NAME",
                       help="make an authentication key pair for this hospital (repeatable)")
    certs.add_argument("--keys-only", action="store_true",
                       help="only make hospital key pairs, directly in --out (run this at the "
                       "hospital so the private key never travels)")
    certs.add_argument("--overwrite", action="store_true",
                       help="replace an existing SuperLink certificate or hospital key "
                       "(a replaced key must be registered again); the CA is never replaced")
    certs.set_defaults(handler=_certs)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point with the same subcommands (until wired into ``privatune``)."""
    parser = argparse.ArgumentParser(prog="privatune")
    add_deployment_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as err:
        print(f"privatune: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
