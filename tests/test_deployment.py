"""A real deployment on one machine: a SuperLink and SuperNodes as separate processes on
loopback, with TLS, SuperNode authentication and a persistent state database, driven through
the ``privatune`` commands a coordinator and hospitals run (``coordinator``, ``node``) by the
rehearsal harness ``simulations/loopback.py``.

Checked: an unregistered node and a node with the wrong CA are refused; the run finishes its
two rounds although one node is killed during round 1 (the round closes after
``round_timeout_s`` with the others' updates); the surviving sites' ledgers hold every
release. Sizes are the smallest that still train; the file takes about 4.5 minutes on two
busy cores, most of it Flower starting a ClientApp process (torch, Opacus) per message.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from privatune.common.certs import CertError, certificate_hosts, make_ca, make_node_keys, make_server_cert
from privatune.common.ledger import SiteLedger
from privatune.server.export import ReleaseRefused, export_adapter, release_findings
from privatune.server.report import RunReport
from privatune.server.rounds import site_records
from privatune.simulations.loopback import LoopbackFederation, Proc
from tests.conftest import write_notes

SITES = ("alpha", "beta", "gamma")  # gamma is killed during round 1
ROUND_TIMEOUT_S = 50


# --------------------------------------------------------------------------- certificates


def test_certificates_are_what_flower_expects(tmp_path):
    ca = make_ca(tmp_path)
    server = make_server_cert(ca, tmp_path, ["fl.example.org", "10.1.2.3"])
    assert set(certificate_hosts(server.cert)) == {"localhost", "127.0.0.1", "fl.example.org",
                                                   "10.1.2.3"}
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert.read_bytes()).subject
    pair = make_node_keys(tmp_path / "nodes", "st-mary")
    # flower-supernode and `flwr supernode register` load exactly these formats
    assert isinstance(load_ssh_private_key(pair.private_key.read_bytes(), None),
                      ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key(pair.public_key.read_bytes()), ec.EllipticCurvePublicKey)
    assert pair.private_key.stat().st_mode & 0o077 == 0
    with pytest.raises(CertError, match="already exists"):
        make_node_keys(tmp_path / "nodes", "st-mary")
    with pytest.raises(CertError, match="already exists"):
        make_ca(tmp_path)


# --------------------------------------------------------------------------- the federation


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    """SuperLink (``coordinator --serve``) and three hospital nodes, all online, plus two
    nodes that must be refused: one whose key was never registered, one with another CA."""
    tmp = tmp_path_factory.mktemp("deploy")
    fed = LoopbackFederation(tmp, tiny_model_dir)
    fed.make_certs()
    for seed, name in enumerate((*SITES, "unregistered", "wrong-ca"), start=1):
        fed.add_site(name, write_notes(tmp / "data" / f"{name}.jsonl", 40, seed),
                     registered=name in SITES)
    fed.write_job(rounds=2, round_timeout_s=ROUND_TIMEOUT_S, local_steps=2, batch_size=4,
                  learning_rate=0.05, node_wait_s=60)
    fed.write_deployment()
    started = time.monotonic()
    with fed:
        fed.start_superlink(90)
        for name in SITES:
            fed.start_node(name)
        # Nodes that must be refused start now too, so their start-up overlaps the others'.
        fed.start_node("unregistered", max_wait_s=15)
        fed.start_node("wrong-ca", root_cert=make_ca(tmp / "other-ca").cert, max_wait_s=15)
        fed.wait_online(len(SITES), timeout_s=120)
        print(f"\nfederation up in {time.monotonic() - started:.0f} s")
        yield fed


def refused(node: Proc, timeout_s: float = 180) -> str:
    """The output of a node process that must stop on its own with an error."""
    code = node.wait(timeout_s)
    assert code is not None, f"{node.name} was not refused:\n{node.output()[-3000:]}"
    assert code != 0, node.output()[-3000:]
    return node.output()


@pytest.mark.e2e
def test_node_states_what_leaves_the_site(federation):
    for name in SITES:
        federation.nodes[name].wait_for("What leaves this site", 5)
    text = federation.nodes["alpha"].output()
    assert "LoRA adapter updates only" in text
    assert "epsilon = 8 at delta = 0.0001" in text
    assert "training loss of each round: sent" in text
    assert "site-policy=" in text and "--auth-supernode-private-key" in text


@pytest.mark.e2e
def test_unregistered_node_is_refused(federation):
    assert "Failed to activate SuperNode" in refused(federation.nodes["unregistered"])


@pytest.mark.e2e
def test_node_with_another_ca_is_refused(federation):
    assert "CERTIFICATE_VERIFY_FAILED" in refused(federation.nodes["wrong-ca"])


@pytest.mark.e2e
def test_two_rounds_finish_although_a_node_dies_mid_round(federation):
    coordinator = federation.start_coordinator()
    coordinator.wait_for("[round 1/2] training at 3 nodes", 240)
    federation.nodes["gamma"].kill_group(signal.SIGKILL)  # the machine is gone, mid-round
    killed_at = coordinator.seconds()
    code = coordinator.wait(360)
    output = coordinator.output()
    print("\n" + coordinator.output(timed=True))
    print(f"\nrun took {coordinator.seconds():.0f} s (gamma killed at {killed_at:.0f} s)")
    assert code == 0, output[-6000:]
    assert "finished:completed" in output

    report = json.loads((federation.out / "report.json").read_text())
    rounds = {r["round"]: r for r in report["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    assert all(rounds[r]["aggregated"] for r in (1, 2))
    assert set(rounds[1]["participants"]) >= {"alpha", "beta"}
    assert rounds[2]["participants"] == ["alpha", "beta"]
    assert any(rounds[r]["failures"] or rounds[r]["evaluation_failures"] for r in (1, 2))
    assert (federation.out / "adapter" / "adapter_config.json").is_file()
    for name in ("alpha", "beta"):
        ledger = SiteLedger(federation.ledger(name))
        assert [e["round"] for e in ledger.adapter_updates()] == [1, 2]
    # the SuperLink's state is on disk (runs, registered nodes survive a restart)
    assert federation.deployment().database.is_file()

    # the release gate of the deployed run: the ledgers collected from alpha and beta are
    # audited against the coordinator's record (gamma, killed, is unverified if the record has
    # a reply of it); a site that took part whose ledger was not collected refuses the release,
    # and a forced one names it
    gate = release_findings(federation.out,
                            {name: federation.ledger(name) for name in ("alpha", "beta")})
    assert [a.name for a in gate.audits] == ["alpha", "beta"] and all(a.ok for a in gate.audits)
    assert all(f.startswith("gamma: not independently verified") for f in gate.findings)
    alpha_only = {"alpha": federation.ledger("alpha")}
    with pytest.raises(ReleaseRefused, match="beta: not independently verified"):
        export_adapter(federation.out, federation.out.parent / "release", ledgers=alpha_only)
    gate = export_adapter(federation.out, federation.out.parent / "release",
                          "beta's ledger follows", ledgers=alpha_only)
    assert "beta" in [r.site for r in gate.unverified]
    assert ("beta: not independently verified: its ledger was not collected (pass --ledger "
            "beta=PATH)") in gate.findings
    assert all(record.heads for record in site_records(RunReport.read(
        federation.out / "report.json").rounds).values())
