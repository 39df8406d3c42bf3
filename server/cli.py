"""The coordinator's commands: ``privatune coordinator``, ``certs`` and ``export``.

``coordinator`` runs a real federation (``server.deploy``), ``certs`` makes the federation's
CA and the SuperLink certificate, ``export`` releases a run's adapter through the privacy
audit gate. ``add_commands`` adds them to the ``privatune`` parser. Heavy imports (torch,
Flower) happen inside the handlers, so ``--help`` and ``certs`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from privatune.common.cli import interrupt_on_sigterm, make_hospital_keys
from privatune.common.config import ConfigError
from privatune.common.extras import require_extra

if TYPE_CHECKING:
    from privatune.server.site_keys import SiteKeyFile

DEFAULT_DEPLOYMENT = "coordinator.yaml"


def coordinator_command(args: argparse.Namespace) -> int:
    from privatune.common.config import load_job_config
    from privatune.server.deploy import coordinate, serve
    from privatune.server.deployment import DeploymentError, load_deployment, say
    from privatune.server.run_inputs import base_model_dir, run_inputs
    from privatune.server.tracking import check_tracking

    job_path = Path(args.config).resolve()
    deployment_path = Path(args.deployment) if args.deployment else job_path.parent / DEFAULT_DEPLOYMENT
    deployment = load_deployment(deployment_path)
    extra = [site_key_file(text) for text in args.register]
    require_extra("report", "privatune coordinator (its report's figures)")
    interrupt_on_sigterm()
    try:
        job = load_job_config(job_path)  # fail here, not inside the ServerApp
        check_tracking(job.tracking)
        model_dir = base_model_dir(deployment, job)
        say(f"base model: {model_dir} (every hospital needs a copy; set it as site.model)")
        if args.serve:
            return serve(deployment, extra)
        inputs = run_inputs(deployment, job_path, model_dir, Path(args.out) if args.out else None)
        return coordinate(deployment, inputs, extra)
    except DeploymentError as err:
        print(f"privatune coordinator: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("privatune coordinator: interrupted", file=sys.stderr)
        return 130


def site_key_file(text: str) -> SiteKeyFile:
    """``--register SITE=KEY.pub``: the key and the site it authenticates."""
    from privatune.server.site_keys import SiteKeyFile

    site, sep, key = text.partition("=")
    if not sep or not site or not key:
        raise ConfigError(f"--register {text}: write SITE=KEY.pub (SITE: the hospital policy's "
                          "site.name), e.g. --register st-mary=certs/nodes/st-mary.pub")
    return SiteKeyFile(site, Path(key).resolve())


def certs_command(args: argparse.Namespace) -> int:
    from privatune.common.certs import (CA_CERT, CA_KEY, SERVER_CERT, CertError, CertificateAuthority,
                                        certificate_hosts, fingerprint, make_ca, make_server_cert,
                                        server_hosts)

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
            print(make_hospital_keys(out if args.keys_only else out / "nodes", name,
                                     overwrite=args.overwrite))
    except CertError as err:
        print(f"privatune certs: {err}", file=sys.stderr)
        return 1
    return 0


def export_command(args: argparse.Namespace) -> int:
    from privatune.server.export import (ReleaseRefused, describe_audit, describe_unverified,
                                         export_adapter, export_merged, select_adapter)

    ledgers = {}
    for item in args.ledger:
        site, _, path = item.partition("=")
        if not site or not path:
            raise ConfigError(f"--ledger {item!r}: expected SITE=PATH (the site's name in the run, "
                              "and the ledger.jsonl collected from it)")
        ledgers[site] = Path(path)
    if args.force and not args.reason:
        raise ConfigError("--force needs --reason '...' (it is recorded in releases.jsonl)")
    if args.base_model and not args.merged:
        raise ConfigError("--base-model is used only with --merged")
    run, out, reason = Path(args.run), Path(args.out), args.reason if args.force else None
    source = select_adapter(run, args.round)
    try:
        if args.merged:
            import warnings

            from transformers.utils import logging as transformers_logging

            warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notices
            transformers_logging.disable_progress_bar()
            gate = export_merged(run, out, reason, args.round, args.overwrite,
                                 Path(args.base_model) if args.base_model else None, ledgers)
        else:
            gate = export_adapter(run, out, reason, args.round, args.overwrite, ledgers)
    except ReleaseRefused as err:
        print(f"privatune: {err}", file=sys.stderr)
        return 3
    for audit in gate.audits:
        print(f"{audit.name}: ledger {audit.path} audited: {describe_audit(audit, gate)}")
    for record in gate.unverified:
        print(describe_unverified(record))
    what = "merged model" if args.merged else "adapter"
    findings = gate.findings
    print(f"exported the {what} of {source.label} ({source.adapter}) to {out}"
          + (f" (FORCED over {len(findings)} findings; reason recorded)" if findings else ""))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``coordinator``, ``certs`` and ``export`` to the ``privatune`` subcommands."""
    coordinator = commands.add_parser(
        "coordinator", help="run a real federation: start or connect to the SuperLink "
        "(TLS, node authentication, state database) and run the job on it")
    coordinator.add_argument("--config", required=True,
                             help="job config YAML, e.g. configs/federation.yaml")
    coordinator.add_argument("--deployment", default="",
                             help=f"deployment YAML (SuperLink, certificates, node keys); default: "
                             f"{DEFAULT_DEPLOYMENT} next to --config")
    coordinator.add_argument("--out", default="", help="run directory (overrides run.out_dir)")
    coordinator.add_argument("--register", action="append", default=[], metavar="SITE=KEY.pub",
                             help="also register this hospital public key as site SITE (its "
                             "policy's site.name; repeatable)")
    coordinator.add_argument("--serve", action="store_true",
                             help="only run the SuperLink (and register keys) until Ctrl-C; "
                             "later 'privatune coordinator' calls submit runs to it")
    coordinator.set_defaults(handler=coordinator_command)

    certs = commands.add_parser(
        "certs", help="make the federation CA, the SuperLink certificate (and, for hospitals "
        "that ask the coordinator to, their key pairs)")
    certs.add_argument("--out", default="certs", help="directory for the files (default: certs)")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a DNS name or IP address hospitals use to reach the SuperLink "
                       "(repeatable; localhost and 127.0.0.1 are always included)")
    certs.add_argument("--hospital", action="append", default=[], metavar="NAME",
                       help="make an authentication key pair for this hospital in OUT/nodes "
                       "(repeatable)")
    certs.add_argument("--keys-only", action="store_true",
                       help="only make hospital key pairs, directly in --out (what "
                       "'privatune keys' does at a hospital)")
    certs.add_argument("--overwrite", action="store_true",
                       help="replace an existing SuperLink certificate or hospital key "
                       "(a replaced key must be registered again); the CA is never replaced")
    certs.set_defaults(handler=certs_command)

    export = commands.add_parser("export", help="release a run's adapter, or the model with it "
                                 "merged in, through the privacy audit gate")
    export.add_argument("run", help="run directory")
    export.add_argument("--out", required=True, help="new directory for the exported adapter "
                        "(or merged model)")
    export.add_argument("--round", default="final", metavar="final|best|N",
                        help="which round's adapter: the final one (default), the best one (lowest "
                        "central held-out perplexity, see report.md) or round N's checkpoint")
    export.add_argument("--merged", action="store_true",
                        help="write a standalone Hugging Face model: the adapter merged into the "
                        "base weights, the tokenizer and a model card (README.md)")
    export.add_argument("--base-model", default="", metavar="DIR",
                        help="with --merged: the base model directory, if not where the run had "
                        "it (report.json's base_model)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out directory (only once the new export is "
                        "complete)")
    export.add_argument("--ledger", action="append", default=[], metavar="SITE=PATH",
                        help="a site's ledger.jsonl collected from its hospital (repeatable): "
                        "audited against the run's record; without every site's ledger and the "
                        "run's record the export is refused unless forced")
    export.add_argument("--force", action="store_true",
                        help="export despite audit findings or evidence missing (the model card "
                        "names what was not verified)")
    export.add_argument("--reason", help="why the export is forced (recorded)")
    export.set_defaults(handler=export_command)
