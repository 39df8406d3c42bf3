"""A site's identity at the coordinator is its registered key, not the name it reports.

Fast checks go through the coordinator's round loop with fake transports (as in
``test_coordinator``), the deployment config and the key binding; the end-to-end check runs a
real loopback deployment (SuperLink and three authenticated SuperNodes, ``simulations/loopback``)
in which one site's policy claims another's name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.app import ConfigRecord
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from privatune.common.certs import make_ca, make_node_keys, make_server_cert
from privatune.common.config import ConfigError
from privatune.common.ledger import SiteLedger
from privatune.common.protocol import (EvaluateReply, EvaluateRequest, TrainRequest,
                                       evaluate_request, train_request)
from privatune.server.app import FlowerTransport
from privatune.server.cli import site_key_file
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.deployment import load_deployment
from privatune.server.export import export_adapter
from privatune.server.run_inputs import RunInputs
from privatune.server.site_keys import SiteKeyFile, SiteKeys
from privatune.server.transport import EvaluateResult, TrainResult
from privatune.simulations.loopback import LoopbackFederation
from tests.conftest import write_notes
from tests.test_coordinator import FakeTransport, job, update

BOUND = {1: "alpha", 2: "beta", 3: "gamma"}


# ------------------------------------------------------------------------ the round loop


class BoundTransport(FakeTransport):
    """Fake nodes bound to sites by key; node 3 (gamma's key) speaks for alpha, with its own
    loss and ledger head, in training and evaluation."""

    def __init__(self, sites: Mapping[int, str], impostor: int = 3):
        super().__init__({1: update(1, 100), 2: update(2, 300), 3: self._claiming(update(3, 600))})
        self.sites, self.impostor = dict(sites), impostor
        self.evaluated: list[dict[int, EvaluateRequest]] = []

    @staticmethod
    def _claiming(answer):
        def claim(node: int, request: TrainRequest, state) -> TrainResult:
            result = answer(node, request, state)
            reply = dataclasses.replace(result.reply, site="alpha", epsilon=7.5, ledger_seq=99,
                                        ledger_hash="forged")
            return TrainResult(node, reply, result.state)
        return claim

    def node_sites(self) -> dict[int, str]:
        return dict(self.sites)

    def evaluate(self, requests, state, timeout_s):
        self.evaluated.append(dict(requests))
        results, failures = super().evaluate(requests, state, timeout_s)
        return [EvaluateResult(r.node_id, EvaluateReply(site="alpha", num_examples=10, eval_loss=9.0,
                                                        ledger_seq=99, ledger_hash="forged"))
                if r.node_id == self.impostor else r for r in results], failures


def coordinator_of(tmp_path: Path, model_dir: Path, transport,
                   **job_args) -> tuple[Coordinator, list[str]]:
    """A coordinator over ``transport`` and the progress lines it says."""
    settings = CoordinatorSettings(job=job(**job_args), model_dir=model_dir,
                                   out_dir=tmp_path / "run", run_id="identity-run")
    lines: list[str] = []
    return Coordinator(settings, transport, progress=lines.append), lines


def test_a_node_speaking_for_another_site_is_refused_before_anything_is_recorded(tmp_path,
                                                                               tiny_model_dir):
    transport = BoundTransport(BOUND)
    coordinator, lines = coordinator_of(tmp_path, tiny_model_dir, transport)
    report = coordinator.run()

    # every request is addressed to the site the node's key is bound to
    assert {n: r.site for n, r in transport.node_requests[0].items()} == BOUND
    assert {n: r.site for n, r in transport.evaluated[0].items()} == BOUND
    training = report.rounds[1].training
    refused = ("node 3: reply refused: it claims site 'alpha', but its key is bound to site "
               "'gamma'; nothing of it is recorded")
    assert training.participants == ["alpha", "beta"] and training.aggregated
    assert refused in training.failures
    assert training.replies["alpha"].ledger_seq == -1 and "alpha" not in training.declined
    assert set(training.update_bytes) == {"alpha", "beta"}
    for evaluation in (report.rounds[0].evaluation, report.rounds[1].evaluation):
        assert refused in evaluation.evaluation_failures
        assert evaluation.site_perplexity["alpha"] == pytest.approx(7.389, abs=1e-3)  # node 1's
        assert "alpha" not in evaluation.ledger_heads  # node 1 told none; the forged one is gone
    alpha = coordinator.sites["alpha"]
    assert alpha.node_id == 1 and alpha.epsilon == pytest.approx(0.5) and not alpha.head.known
    assert set(coordinator.sites) == {"alpha", "beta"}  # gamma's key answered for no one
    assert any(line.startswith("sites are known by their registered keys: alpha = node 1, "
                               "beta = node 2, gamma = node 3") for line in lines)


def test_a_node_whose_key_is_bound_to_no_site_is_not_asked(tmp_path, tiny_model_dir):
    transport = BoundTransport({1: "alpha", 2: "beta"})
    coordinator, lines = coordinator_of(tmp_path, tiny_model_dir, transport, nodes=2)
    outcome = coordinator.train_round(1)
    assert sorted(transport.node_requests[0]) == [1, 2] and outcome.participants == ["alpha", "beta"]
    assert any("not asked: node(s) 3" in line for line in lines)


def test_without_authentication_names_are_as_reported_but_must_be_site_names(tmp_path,
                                                                            tiny_model_dir):
    def escaping(node, request, state):
        result = update(3, 50)(node, request, state)
        return TrainResult(node, dataclasses.replace(result.reply, site="../../etc"), result.state)

    transport = FakeTransport({1: update(1, 100), 2: update(2, 300), 3: escaping})
    coordinator, lines = coordinator_of(tmp_path, tiny_model_dir, transport)
    training = coordinator.run().rounds[1].training
    assert training.participants == ["alpha", "beta"]
    assert set(coordinator.sites) == {"alpha", "beta", "gamma"}  # node 3 evaluates as gamma
    assert training.failures[0].startswith("node 3: reply refused: it reports site '../../etc', "
                                           "not a site name")
    assert all(r.site == "" for r in transport.node_requests[0].values())  # unaddressed
    assert lines[0].startswith("nodes are not authenticated here: each site is known by the name")


def test_requests_carry_their_site_through_the_codec():
    train = dataclasses.replace(train_request(job(), "run", 1), site="st-mary")
    evaluate = dataclasses.replace(evaluate_request(job(), "run", 1), site="st-mary")
    assert TrainRequest.from_record(ConfigRecord(train.to_record())) == train
    assert EvaluateRequest.from_record(ConfigRecord(evaluate.to_record())) == evaluate
    assert train_request(job(), "run", 1).site == ""  # unaddressed until the coordinator binds it


# --------------------------------------------------------------- keys, config, binding


def deployment_dir(tmp_path: Path, nodes: object) -> Path:
    ca = make_ca(tmp_path / "certs")
    make_server_cert(ca, tmp_path / "certs")
    for name in ("st-mary", "city-general"):
        make_node_keys(tmp_path / "certs" / "nodes", name)
    path = tmp_path / "coordinator.yaml"
    path.write_text(yaml.safe_dump({
        "tls": {"ca_cert": "certs/ca.pem", "server_cert": "certs/superlink.pem",
                "server_key": "certs/superlink.key"},
        "nodes": {"public_keys": nodes}}))
    return path


def test_coordinator_yaml_binds_each_key_to_a_site(tmp_path):
    path = deployment_dir(tmp_path, {"st-mary": "certs/nodes/st-mary.pub",
                                     "city-general": "certs/nodes/city-general.pub"})
    keys = load_deployment(path).nodes.public_keys
    assert set(keys) == {SiteKeyFile("st-mary", tmp_path / "certs/nodes/st-mary.pub"),
                         SiteKeyFile("city-general", tmp_path / "certs/nodes/city-general.pub")}


@pytest.mark.parametrize("nodes, message", [
    (["certs/nodes/st-mary.pub"], r", line \d+: nodes\.public_keys: a list of key files does not "
                                  "say which site each key is"),
    ({"../st-mary": "certs/nodes/st-mary.pub"}, r", line \d+: nodes\.public_keys\.\.\./st-mary: "
                                                "hospital name"),
    ({"st-mary": 3}, r", line \d+: nodes\.public_keys\.st-mary: expected the path of the site's "
                     r"\.pub file"),
    ({"st-mary": "certs/nodes/st-mary.pub", "twin": "certs/nodes/st-mary.pub"},
     ": nodes.public_keys: sites 'st-mary' and 'twin' have the same public key"),
    ({"st-mary": "coordinator.yaml"}, ": nodes.public_keys.st-mary: .*not an OpenSSH public key"),
])
def test_coordinator_yaml_key_errors_name_the_file_and_key(tmp_path, nodes, message):
    path = deployment_dir(tmp_path, nodes)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + message):
        load_deployment(path)


def test_site_keys_bind_nodes_by_the_key_the_superlink_holds(tmp_path):
    pairs = {name: make_node_keys(tmp_path, name) for name in ("alpha", "beta")}
    keys = SiteKeys.from_files(SiteKeyFile(n, p.public_key) for n, p in pairs.items())
    path = keys.write(tmp_path / "site-keys.json")
    assert SiteKeys.read(path) == keys

    def node(node_id: int, pub: Path | None) -> NodeInfo:
        pem = public_key_to_bytes(load_ssh_public_key(pub.read_bytes())) if pub else b"\x01" * 32
        return NodeInfo(node_id=node_id, public_key=pem)

    nodes = [node(11, pairs["beta"].public_key), node(12, pairs["alpha"].public_key),
             node(13, None)]  # as in simulation: random bytes, no site

    class Grid:
        def get_nodes(self):
            return nodes

    assert FlowerTransport(Grid(), SiteKeys.read(path)).node_sites() == {11: "beta", 12: "alpha"}
    assert FlowerTransport(Grid()).node_sites() is None
    (tmp_path / "bad.json").write_text('{"sites": [{"site": "../x", "public_key": "00"}]}')
    with pytest.raises(ValueError, match="bad.json: hospital name '../x'"):
        SiteKeys.read(tmp_path / "bad.json")


def test_register_option_and_run_config_carry_the_binding(tmp_path):
    assert site_key_file("st-mary=keys/st-mary.pub") == SiteKeyFile(
        "st-mary", Path("keys/st-mary.pub").resolve())
    with pytest.raises(ConfigError, match="write SITE=KEY.pub"):
        site_key_file("keys/st-mary.pub")
    inputs = RunInputs(tmp_path / "job.yaml", tmp_path / "model", tmp_path / "out",
                       site_keys=tmp_path / "site-keys.json")
    assert f'site-keys = "{tmp_path / "site-keys.json"}"' in inputs.to_toml()


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_a_site_claiming_another_sites_name_is_refused_and_spends_nothing(tmp_path, tiny_model_dir):
    """Three registered sites; gamma's policy says it is alpha. Only alpha's key answers for
    alpha: gamma is addressed as gamma, declines (spending nothing) and its replies are refused;
    alpha and beta train, and alpha's own ledger passes the audit against the run's record."""
    fed = LoopbackFederation(tmp_path, tiny_model_dir)
    fed.make_certs()
    for seed, name in enumerate(("alpha", "beta", "gamma"), start=1):
        fed.add_site(name, write_notes(tmp_path / "data" / f"{name}.jsonl", 120, seed))
    policy = yaml.safe_load(fed.policies["gamma"].read_text())
    policy["site"]["name"] = "alpha"
    fed.policies["gamma"].write_text(yaml.safe_dump(policy))
    fed.write_job(rounds=1, round_timeout_s=60, local_steps=2, batch_size=4, learning_rate=0.05,
                  node_wait_s=60)
    fed.write_deployment()
    with fed:
        fed.start_superlink(90)
        for name in ("alpha", "beta", "gamma"):
            fed.start_node(name)
        fed.wait_online(3, timeout_s=120)
        coordinator = fed.start_coordinator()
        code = coordinator.wait(480)
        output = coordinator.output()
    print("\n" + coordinator.output(timed=True))
    assert code == 0, output[-6000:]

    report = json.loads((fed.out / "report.json").read_text())
    assert sorted(report["sites"]) == ["alpha", "beta"]
    refused = re.compile(r"node \d+: reply refused: it claims site 'alpha', but its key is bound "
                         r"to site 'gamma'")
    first, last = report["rounds"][0], report["rounds"][1]
    assert last["participants"] == ["alpha", "beta"] and last["aggregated"]
    assert sorted(last["epsilon"]) == sorted(last["site_perplexity"]) == ["alpha", "beta"]
    assert any(refused.match(f) for f in last["failures"]), last["failures"]
    for evaluation in (first, last):
        assert any(refused.match(f) for f in evaluation["evaluation_failures"])
    # the impostor declined what was addressed to gamma: nothing trained, no epsilon spent
    assert SiteLedger(fed.ledger("gamma")).adapter_updates() == []
    # alpha's real ledger matches every head and update the run recorded for alpha
    assert [e["round"] for e in SiteLedger(fed.ledger("alpha")).adapter_updates()] == [1]
    gate = export_adapter(fed.out, tmp_path / "release",
                          ledgers={name: fed.ledger(name) for name in ("alpha", "beta")})
    assert gate.findings == [] and all(a.ok for a in gate.audits), gate
    assert "sites are known by their registered keys" in output
