"""Secure DP-SGD in the real deployment: a SuperLink with TLS and three authenticated hospital
SuperNodes (``privatune coordinator`` / ``privatune node``), each stage a Flower message to a
ClientApp process that keeps its SecAgg+ secrets in its own node state between messages."""

from __future__ import annotations

import json

import pytest
from privatune.common.audit import audit_site
from privatune.common.ledger import SiteLedger
from privatune.simulations.loopback import LoopbackFederation

from tests.conftest import write_notes

SITES = ("alpha", "beta", "gamma")


@pytest.mark.e2e
def test_secure_dpsgd_runs_through_the_superlink(tmp_path, tiny_model_dir):
    fed = LoopbackFederation(tmp_path, tiny_model_dir)
    fed.make_certs()
    for seed, name in enumerate(SITES, start=1):
        fed.add_site(name, write_notes(tmp_path / "data" / f"{name}.jsonl", 40, seed))
    # one secure step: each SecAgg+ stage is a message to a fresh ClientApp process (about
    # a minute a step here); several steps a round are the in-process tests' (test_secure_round)
    fed.write_job(rounds=1, round_timeout_s=120, local_steps=1, batch_size=4,
                  learning_rate=0.05, node_wait_s=60,
                  secure={"sample_rate": 0.15, "min_contributions": 3,
                          "max_records_per_site": 64})
    fed.write_deployment()
    with fed:
        fed.start_superlink(90)
        for name in SITES:
            fed.start_node(name)
        fed.wait_online(len(SITES), timeout_s=120)
        coordinator = fed.start_coordinator()
        code = coordinator.wait(400)
        output = coordinator.output()
        print("\n" + coordinator.output(timed=True))
    assert code == 0, output[-6000:]
    report = json.loads((fed.out / "report.json").read_text())
    (trained,) = [r for r in report["rounds"] if r["round"] == 1]
    assert trained["aggregated"] and trained["participants"] == sorted(SITES), trained
    for name in SITES:
        releases = SiteLedger(fed.ledger(name)).secure_releases()
        assert [(r.round, r.step) for r in releases] == [(1, 0)]
        assert all(r.aggregate_epsilon < r.fallback_epsilon == r.epsilon for r in releases)
        assert audit_site(fed.ledger(name), name).ok
