"""The hospital's commands: ``privatune node`` and ``privatune keys``.

``node`` validates the site (policy, data, delta, model), states what will leave it and
starts Flower's SuperNode (``client.deploy``); ``keys`` makes this hospital's authentication
key pair, so the private key is made where it stays. ``add_commands`` adds both to the
``privatune`` parser. Heavy imports (torch, Flower) happen inside the handlers, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from privatune.common.cli import interrupt_on_sigterm, make_hospital_keys
from privatune.common.config import ConfigError


def acknowledge_command(policy_path: Path) -> int:
    """Record an operator's acknowledgement of this site's ledger rollback (see README)."""
    from privatune.client.rollback import acknowledge_rollback
    from privatune.client.policy import load_site_policy
    from privatune.client.site_state import SiteBusy
    from privatune.common.ledger import SiteLedger

    policy = load_site_policy(policy_path)
    try:
        written = acknowledge_rollback(policy)
    except (ValueError, SiteBusy) as err:  # nothing pending, LedgerError, a node answering
        print(f"privatune node: {err}", file=sys.stderr)
        return 2
    ledger = SiteLedger(policy.ledger_path)
    privacy = policy.privacy
    floor = written.record
    print(f"{policy.ledger_path}: rollback acknowledged (entry {written.seq}). The highest "
          f"spend reported with the lost releases (by the coordinator, which held ledger entry "
          f"{floor.reported_seq}, or by a kept release) is epsilon "
          f"{floor.reported_epsilon:.4f}; it is counted as a floor under this site's spend: "
          f"epsilon now {ledger.epsilon(privacy.delta, privacy.accountant_name):.4f} "
          f"at delta {privacy.delta + ledger.floor().delta:g} (cap {privacy.epsilon_cap:g}). "
          "The node trains again when the coordinator next asks.")
    return 0


def node_command(args: argparse.Namespace) -> int:
    from privatune.client.deploy import NodeConnection, run_node

    if args.acknowledge_ledger_rollback:
        return acknowledge_command(Path(args.site))
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
    interrupt_on_sigterm()
    try:
        return run_node(Path(args.site), connection)
    except ConfigError:
        raise
    except ValueError as err:  # DataError, LedgerError: they name their file and line
        print(f"privatune node: {err}", file=sys.stderr)
        return 2


def keys_command(args: argparse.Namespace) -> int:
    from privatune.common.certs import CertError

    try:
        print(make_hospital_keys(Path(args.out), args.hospital, overwrite=args.overwrite))
    except CertError as err:
        print(f"privatune keys: {err}", file=sys.stderr)
        return 1
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``node`` and ``keys`` to the ``privatune`` subcommands."""
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
    node.add_argument("--acknowledge-ledger-rollback", action="store_true",
                      help="after the node declined rounds because its ledger is behind what it "
                      "reported (restored from a backup, say): record that an operator knows, "
                      "counting the spend the coordinator held as a floor; then exit")
    node.set_defaults(handler=node_command)

    keys = commands.add_parser(
        "keys", help="make this hospital's authentication key pair (the private key stays here; "
        "send the .pub to the coordinator)")
    keys.add_argument("--hospital", required=True, metavar="NAME",
                      help="this hospital's name (letters, digits, '.', '_', '-')")
    keys.add_argument("--out", default="keys", help="directory for NAME.key and NAME.pub "
                      "(default: keys)")
    keys.add_argument("--overwrite", action="store_true",
                      help="replace an existing key pair (the new key must be registered again)")
    keys.set_defaults(handler=keys_command)
