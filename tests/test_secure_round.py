"""The secure DP-SGD round mode (issue 27): its wire codec, a site's SecAgg+ state between
stages, the node's refusals at setup, and (e2e) a tiny secure federation in process and on
Flower's simulation engine, whose ledgers carry both guarantees and pass the audit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import RecordDict
from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.client.secure_node import SecureRound, StepSpend, enforced, spend_after
from privatune.common.audit import audit_path
from privatune.common.config import ConfigError, LoraConfig, load_job_config
from privatune.common.distributed_noise import choose_parameters
from privatune.common.ledger import SiteLedger
from privatune.common.ledger_records import DECLINE, NonPrivateRelease, SecureRelease
from privatune.common.lora import (frozen_part, initial_adapter, lora_state, trained_part,
                                   update_hash)
from privatune.common.privacy import SecureStep, poisson_sample_rate
from privatune.common.protocol import SecurePlan, TrainReply, train_request
from privatune.common.run_record import read_run_record
from privatune.common.secure_aggregation import SecAggSite
from privatune.common.secure_aggregation_messages import (
    MaskedInput,
    PublicKeys,
    SecAggConfig,
    UnmaskRequest,
)
from privatune.common.secure_aggregation_coordinator import SecAggCoordinator
from privatune.common.secure_protocol import (
    KEYS,
    MASK,
    SETUP,
    UNMASK,
    SecureReply,
    SecureRequest,
)
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.report_markdown import render_markdown
from privatune.simulations.in_process import InProcessTransport
from privatune.simulations.runner import simulate_sites

from tests.conftest import write_notes, write_policy

BIG = 2**64 - 5  # a SecAgg+ id beyond Flower's signed 64-bit integers

JOB = """
seed: 3
model: {max_length: 48}
lora: {r: 2, alpha: 4, target_modules: [q_proj, v_proj]}
training: {local_steps: 3, batch_size: 24, learning_rate: 0.05, max_grad_norm: 1.0, loss_on: note}
privacy: {epsilon: 8.0, delta: 1.0e-4}
federation: {mode: secure_dpsgd, rounds: 2, min_nodes: 3, min_replies: 2, node_wait_s: 30,
             round_timeout_s: 300}
secure: {sample_rate: 0.08, min_contributions: 3, max_records_per_site: 256}
evaluation: {every_k_rounds: 0}
simulation: {cpus_per_node: 1, local_only_baseline: false}
tracking: none
"""


def _plan(stage: str = SETUP, step: int = 0, t: int = 3) -> SecurePlan:
    return SecurePlan(stage=stage, step=step, noise_multiplier=3.0, sample_rate=0.08,
                      min_contributions=t, max_sites=3, max_records_per_site=256, max_bits=32,
                      sensitivity_inflation=1e-3, public_seed=3)


def _job(tmp_path: Path, *overrides: str):
    (tmp_path / "job.yaml").write_text(JOB)
    return load_job_config(tmp_path / "job.yaml", overrides)


# ------------------------------------------------------------------------------ codec


def test_every_stage_round_trips_through_flower_records_with_ids_beyond_int64(tmp_path):
    request = train_request(_job(tmp_path), "run-1", 1)
    config = SecAggConfig.create(round_id=5, site_ids=[1, 7, BIG], threshold=2, modulus_bits=20,
                                 vector_length=4)
    sent = SecureRequest(request, _plan(KEYS), config)
    received = SecureRequest.from_content(RecordDict(dict(sent.to_content())))
    assert received == sent and max(received.secagg.site_ids) == BIG
    unmask = SecureRequest(request, _plan(UNMASK), UnmaskRequest(5, (1, BIG), (7,)))
    assert SecureRequest.from_content(unmask.to_content()) == unmask
    reply = SecureReply(MASK, TrainReply(site="north", accepted=True), MaskedInput(5, BIG, b"\x01\x02"))
    assert SecureReply.from_content(MASK, reply.to_content()) == reply
    declined = SecureReply(KEYS, TrainReply(site="north", accepted=False, reason="no"))
    assert SecureReply.from_content(KEYS, declined.to_content()) == declined


def test_malformed_stage_records_are_refused_by_name(tmp_path):
    request = train_request(_job(tmp_path), "run-1", 1)
    with pytest.raises(ValueError, match="carries SecAggConfig"):
        SecureRequest(request, _plan(KEYS))
    content = SecureRequest(request, _plan(KEYS), SecAggConfig.create(
        round_id=1, site_ids=[1, 2, 3], threshold=2, modulus_bits=8, vector_length=2)).to_content()
    del content["secagg"]
    with pytest.raises(ValueError, match="without its SecAgg"):
        SecureRequest.from_content(content)
    accepted = SecureReply(KEYS, TrainReply(site="north", accepted=True),
                           PublicKeys(1, 2, b"a", b"b")).to_content()
    accepted["secagg"]["site_id"] = "two"
    with pytest.raises(ValueError, match="site_id"):
        SecureReply.from_content(KEYS, accepted)


def test_a_site_saved_between_stages_masks_and_unmasks_as_if_it_never_left():
    config = SecAggConfig.create(round_id=7, site_ids=[3, BIG, 9, 11], threshold=3,
                                 modulus_bits=20, vector_length=5)

    def reloaded(sites):
        return {i: SecAggSite.from_state(config, s.to_state()) for i, s in sites.items()}

    sites = reloaded({i: SecAggSite(i, config) for i in config.site_ids})
    coordinator = SecAggCoordinator(config)
    directory = coordinator.receive_public_keys([s.public_keys() for s in sites.values()])
    sites = reloaded(sites)
    deliveries = coordinator.receive_encrypted_shares(
        [sites[i].share_keys(directory) for i in directory.site_ids])
    sites = reloaded(sites)
    vectors = {i: np.arange(5, dtype=np.uint64) * (k + 1) for k, i in enumerate(config.site_ids)}
    unmask = coordinator.receive_masked_inputs(
        [sites[i].masked_input(d, vectors[i]) for i, d in deliveries.items() if i != 9])
    sites = reloaded(sites)
    result = coordinator.receive_unmask_shares([sites[i].unmask(unmask) for i in unmask.survivors])
    assert result.dropped == (9,)
    assert np.array_equal(result.total, sum(vectors[i] for i in result.contributors) % (1 << 20))


def test_config_names_the_secure_keys(tmp_path):
    with pytest.raises(ConfigError, match="secure.min_contributions"):
        _job(tmp_path, "secure.min_contributions=4")
    with pytest.raises(ConfigError, match="secure.min_contributions"):
        _job(tmp_path, "secure.min_contributions=0", "federation.min_nodes=1",
             "federation.min_replies=1")
    with pytest.raises(ConfigError, match="federation.mode"):
        _job(tmp_path, "federation.mode=pooled")
    assert _job(tmp_path, "secure.min_contributions=0").secure.threshold(3) == 2


# ------------------------------------------------------------------------------ node refusals


@pytest.fixture
def north(tmp_path, tiny_model_dir):
    data = write_notes(tmp_path / "data" / "north.jsonl", 60, 11)
    return write_policy(tmp_path / "sites" / "north", "north", data, tiny_model_dir)


def _setup(policy: Path, tiny_model_dir, plan: SecurePlan, job) -> tuple[TrainReply, bytes | None]:
    node = SiteNode(load_site_policy(policy))
    adapter = lora_state(initial_adapter(tiny_model_dir, LoraConfig(
        r=2, alpha=4, target_modules=("q_proj", "v_proj")), 3))
    reply, session = SecureRound(node).answer(1, SecureRequest(
        train_request(job, "run-1", 1), plan), adapter, None)
    return reply.reply, session


def _declines(policy: Path) -> list[str]:
    return [r.reason for r in SiteLedger(load_site_policy(policy).ledger_path).records()
            if isinstance(r, NonPrivateRelease) and r.release == DECLINE]


def test_the_node_declines_a_threshold_below_its_policys(north, tiny_model_dir, tmp_path):
    reply, session = _setup(north, tiny_model_dir, _plan(t=2), _job(tmp_path))
    assert not reply.accepted and "threshold t = 2" in reply.reason and session is None
    assert _declines(north) == [reply.reason]


def test_the_node_declines_a_round_over_its_cap_on_the_fallback(north, tiny_model_dir,
                                                                tmp_path):
    policy = yaml.safe_load(north.read_text())
    policy["privacy"]["epsilon_cap"] = 1.0
    north.write_text(yaml.safe_dump(policy))
    plan = dataclasses.replace(_plan(), noise_multiplier=2.0)  # (a) 0.53, (b) 1.58 after 3 steps
    reply, session = _setup(north, tiny_model_dir, plan, _job(tmp_path))
    assert not reply.accepted and "over its cap of 1" in reply.reason
    assert "fallback guarantee" in reply.reason and session is None
    assert _declines(north) == [reply.reason]
    policy["secure_aggregation"] = {"trust": True}  # the aggregate guarantee fits the cap
    north.write_text(yaml.safe_dump(policy))
    reply, session = _setup(north, tiny_model_dir, plan, _job(tmp_path))
    assert reply.accepted and session is not None


def test_a_steps_spend_is_each_guarantee_as_the_ledger_composes_it(north):
    """``spend_after`` composes (a) and (b) and takes the enforced figure from the one the
    policy enforces while every secure release was made under its trust; once the ledger holds
    both (the policy's trust changed), the enforced figure counts each by its own."""
    params = choose_parameters(512, min_contributions=3, max_sites=3, clip=1.0,
                               max_records_per_site=256, noise_multiplier=3.0)
    step = SecureStep(3.0, 0.08, 1, params.scaled_clip, params.padded_dimension, 3)
    policy = load_site_policy(north)

    def node(trust: bool) -> SiteNode:
        return SiteNode(dataclasses.replace(policy, secure_aggregation=dataclasses.replace(
            policy.secure_aggregation, trust=trust)))

    def composed(site: SiteNode, guarantee: str, then: SecureStep) -> float:
        return site.ledger.epsilon(policy.privacy.delta, policy.privacy.accountant_name,
                                   then=[then], guarantee=guarantee)

    for trusted in (False, False, True, True):
        site = node(trusted)
        spend = spend_after(site, step)
        assert spend == StepSpend(composed(site, "enforced", enforced(site, step)),
                                  composed(site, "aggregate", step),
                                  composed(site, "fallback", step.fallback()))
        site.ledger.append_record(SecureRelease(
            run_id="run-1", round=1, step=len(site.ledger.secure_releases()),
            privacy_unit="record", noise_multiplier=3.0, sample_rate=0.08, steps=1,
            max_grad_norm=1.0, scaled_clip=params.scaled_clip, dimension=params.padded_dimension,
            min_contributions=3, max_sites=3, trusted=trusted,
            accountant=policy.privacy.accountant_name, epsilon=spend.enforced,
            aggregate_epsilon=spend.aggregate, fallback_epsilon=spend.fallback,
            delta=policy.privacy.delta))
    assert spend.aggregate < spend.enforced < spend.fallback  # (b), (b), (a), then this (a)


def test_a_stage_without_a_setup_is_declined(north, tiny_model_dir, tmp_path):
    node = SiteNode(load_site_policy(north))
    config = SecAggConfig.create(round_id=1, site_ids=[1, 2, 3], threshold=3, modulus_bits=8,
                                 vector_length=2)
    reply, session = SecureRound(node).answer(1, SecureRequest(
        train_request(_job(tmp_path), "run-1", 1), _plan(KEYS), config), None, None)
    assert not reply.reply.accepted and "no secure round was set up" in reply.reply.reason
    assert session is None


# ------------------------------------------------------------------------------ end to end


def _federation(root: Path, tiny_model_dir) -> list[Path]:
    return [write_policy(root / "sites" / name, name,
                         write_notes(root / "data" / f"{name}.jsonl", count, seed), tiny_model_dir)
            for name, count, seed in (("north", 100, 11), ("south", 120, 12), ("east", 90, 13))]


def _check_secure_ledgers(root: Path, job) -> None:
    steps = job.federation.rounds * job.training.local_steps
    for audit in audit_path(root):
        assert audit.ok, (audit.name, audit.problems)
        releases = SiteLedger(audit.path).secure_releases()
        assert len(releases) == steps
        last = releases[-1]
        assert not last.trusted and last.epsilon == last.fallback_epsilon
        assert 0 < last.aggregate_epsilon < last.fallback_epsilon <= job.privacy.epsilon
        assert all(r.contribution_sha256 for r in releases)


@pytest.mark.e2e
def test_a_secure_federation_in_process_and_on_flowers_engine(tmp_path, tiny_model_dir):
    job = _job(tmp_path)
    inline = tmp_path / "inline"
    nodes = [SiteNode(load_site_policy(p)) for p in _federation(inline, tiny_model_dir)]
    settings = CoordinatorSettings(job=job, model_dir=tiny_model_dir, out_dir=inline / "run",
                                   run_id="inline", resume=False,
                                   sites=tuple(n.name for n in nodes))
    report = Coordinator(settings, InProcessTransport(nodes), progress=lambda _: None).run()
    for record in report.rounds[1:]:
        assert record.training.aggregated and record.training.participants == \
            ["east", "north", "south"] and not record.training.failures
    assert (inline / "run" / "checkpoints" / "round_002" / "adam.safetensors").is_file()
    traffic = render_markdown(report).split("## Traffic")[1]
    assert "Secure DP-SGD: no site sends an update of its own" in traffic
    assert "Aggregation `fedavg`" not in traffic
    _check_secure_ledgers(inline, job)
    # the coordinator's record: every masked input of every step, which each ledger lists
    records = read_run_record(inline / "run" / "checkpoints" / "round_002" / "state.json")
    steps = job.federation.rounds * job.training.local_steps
    assert all(len({u.sha256 for u in r.received}) == steps for r in records.values())
    assert all(a.ok for a in audit_path(inline, records)), [a.problems for a in audit_path(
        inline, records)]

    # on Flower's engine, with each site's local-only baseline as the demo runs them
    engine = tmp_path / "engine"
    job = _job(tmp_path, "simulation.local_only_baseline=true")
    policies = _federation(engine, tiny_model_dir)
    report = simulate_sites(job, tiny_model_dir, policies, None, engine / "run",
                            progress=lambda _: None)
    assert all(r.training.aggregated for r in report.rounds[1:])
    _check_secure_ledgers(engine, job)
    for path in policies:
        node = SiteNode(load_site_policy(path))
        site = report.sites[node.name]
        # released where the site releases its held-out figures (east's 18 are too few)
        assert (site.local_only_perplexity is None) == (site.final_perplexity is None)
        # alone, the site draws about what it draws a secure step (q of its records), not the
        # union's batch, with local DP-SGD's own noise
        alone = SiteLedger(engine / "run" / "baselines" / node.name / "ledger.jsonl").releases()
        assert len(alone) == job.federation.rounds
        units = len(node.train_units)
        drawn = poisson_sample_rate(units, round(job.secure.sample_rate * units))
        assert all(r.sample_rate == pytest.approx(drawn) for r in alone)
        assert drawn < job.training.batch_size / units / 2
    assert report.sites["north"].local_only_perplexity is not None


def test_plan_shows_each_sites_sigma_and_both_guarantees(tmp_path):
    from privatune.common.plan import plan_secure_site, render_secure_table

    job = _job(tmp_path)
    plan = plan_secure_site("north", 100, job, trained_parameters=512)
    assert plan.min_contributions == 3
    assert plan.share_noise_multiplier == pytest.approx(plan.noise_multiplier / 3 ** 0.5)
    # calibrated on the fallback: its last round is the budget, the aggregate far below it
    assert plan.fallback_epsilon_per_round[-1] == pytest.approx(8.0, rel=0.01)
    assert plan.fallback_epsilon_per_round[-1] <= 8.0
    assert plan.aggregate_epsilon_per_round[-1] < plan.fallback_epsilon_per_round[0]
    # the rule plan_site applies, on a union step: min_nodes shares of noise over the union batch
    assert plan.noise_to_signal == pytest.approx(
        plan.share_noise_multiplier * (3 * 512) ** 0.5 / job.training.batch_size)
    assert plan.noise_to_signal < 1 and not any("union step's noise" in w for w in plan.warnings)
    table = render_secure_table([plan])
    assert "(a) eps r2" in table and "(b) eps r2" in table and "| north | 100 |" in table
    assert f"| {plan.noise_to_signal:.2f} |" in table
    many = plan_secure_site("north", 100, job, trained_parameters=4096)
    assert many.noise_to_signal > 1 and any("union step's noise" in w for w in many.warnings)


class _Dropping(InProcessTransport):
    """In process, but the nodes in ``gone`` stop answering at the masking stage of ``step``
    (after sharing their keys) and for the rest of the run."""

    def __init__(self, nodes, gone: set[int], step: int):
        super().__init__(nodes)
        self.gone, self.step, self.dropped = gone, step, False

    def secure(self, requests, state, timeout_s):
        stage = next(iter(requests.values())).plan if requests else None
        if stage is not None and stage.stage == MASK and stage.step == self.step:
            self.dropped = True
        if not self.dropped:
            return super().secure(requests, state, timeout_s)
        kept = {n: r for n, r in requests.items() if n not in self.gone}
        results, failures = super().secure(kept, state, timeout_s)
        return results, failures + [f"node {n}: no reply within {timeout_s:g} s"
                                    for n in requests if n in self.gone]


def _dropout_run(root: Path, tiny_model_dir, gone: set[int]):
    job = _job(root, "federation.min_nodes=4", "federation.rounds=1")
    policies = _federation(root, tiny_model_dir) + [write_policy(
        root / "sites" / "west", "west", write_notes(root / "data" / "west.jsonl", 80, 14),
        tiny_model_dir)]
    nodes = [SiteNode(load_site_policy(p)) for p in policies]
    settings = CoordinatorSettings(job=job, model_dir=tiny_model_dir, out_dir=root / "run",
                                   run_id="drop", resume=False, sites=tuple(n.name for n in nodes))
    report = Coordinator(settings, _Dropping(nodes, gone, step=1),
                         progress=lambda _: None).run()
    return report.rounds[1].training, {n.name: SiteLedger(n.policy.ledger_path)
                                       for n in nodes}


def test_a_site_that_drops_after_sharing_its_keys_is_recovered(tmp_path, tiny_model_dir):
    training, ledgers = _dropout_run(tmp_path, tiny_model_dir, gone={4})
    assert training.aggregated and not any("released nothing" in f for f in training.failures)
    assert training.participants == ["east", "north", "south", "west"]  # west gave step 0
    assert [r.step for r in ledgers["west"].secure_releases()] == [0]
    assert [r.step for r in ledgers["north"].secure_releases()] == [0, 1, 2]


def test_a_step_with_fewer_than_t_contributions_releases_nothing(tmp_path, tiny_model_dir):
    training, ledgers = _dropout_run(tmp_path, tiny_model_dir, gone={3, 4})
    assert training.aggregated  # step 0 was released
    refused = [f for f in training.failures if "step 1 released nothing" in f]
    assert refused and "below" in refused[0]
    assert [r.step for r in ledgers["north"].secure_releases()] == [0, 1]  # it sent step 1



def test_fewer_than_t_sites_after_the_setup_ask_for_no_step(tmp_path, tiny_model_dir):
    """A site declining the setup (its policy wants t >= 4) leaves two of three, below t = 3:
    the round stops before any step's keys, nothing is released, the adapter stays."""
    policies = _federation(tmp_path, tiny_model_dir)
    policy = yaml.safe_load(policies[0].read_text())
    policy["secure_aggregation"] = {"min_contributions": 4}
    policies[0].write_text(yaml.safe_dump(policy))
    nodes = [SiteNode(load_site_policy(p)) for p in policies]
    settings = CoordinatorSettings(job=_job(tmp_path, "federation.rounds=1"),
                                   model_dir=tiny_model_dir, out_dir=tmp_path / "run",
                                   run_id="few", resume=False, sites=tuple(n.name for n in nodes),
                                   evaluate_each_round=False)
    coordinator = Coordinator(settings, InProcessTransport(nodes), progress=lambda _: None)
    before = coordinator.global_state
    training = coordinator.train_round(1)
    assert not training.aggregated and "threshold t = 3" in training.declined["north"]
    assert training.failures == ["step 0 released nothing: 2 sites in the round, below t = 3; "
                                 "the round stops there"]
    assert coordinator.global_state is before
    assert not any(SiteLedger(n.policy.ledger_path).secure_releases() for n in nodes)


class _OtherA(InProcessTransport):
    """In process, but node ``node`` gets another lora_A with the masking stage of ``step``."""

    def __init__(self, nodes, node: int, step: int):
        super().__init__(nodes)
        self.node, self.step = node, step

    def secure(self, requests, state, timeout_s):
        plan = next(iter(requests.values())).plan
        if (plan.stage, plan.step) != (MASK, self.step) or self.node not in requests:
            return super().secure(requests, state, timeout_s)
        other = {n: t + 0.01 if "lora_A" in n else t for n, t in state.items()}
        results, failures = super().secure(
            {n: r for n, r in requests.items() if n != self.node}, state, timeout_s)
        changed, more = super().secure({self.node: requests[self.node]}, other, timeout_s)
        return results + changed, failures + more


def test_ffa_pins_lora_a_in_secure_mode(tmp_path, tiny_model_dir):
    """Under ffa a secure round's contributions, sum and Adam step cover B alone; each step's
    release records the A it was computed against, and a site given another A (at a step's
    masking stage, or at a later round's setup) declines and says why."""
    job = _job(tmp_path, "federation.aggregation=ffa", "federation.rounds=1",
               "training.local_steps=2")
    policies = _federation(tmp_path, tiny_model_dir)
    nodes = [SiteNode(load_site_policy(p)) for p in policies]
    settings = CoordinatorSettings(job=job, model_dir=tiny_model_dir, out_dir=tmp_path / "run",
                                   run_id="ffa", resume=False, sites=tuple(n.name for n in nodes),
                                   evaluate_each_round=False)
    coordinator = Coordinator(settings, _OtherA(nodes, node=1, step=1), progress=lambda _: None)
    training = coordinator.train_round(1)
    start = lora_state(initial_adapter(tiny_model_dir, job.lora, job.seed))
    frozen = update_hash(frozen_part(start, "ffa"))

    assert training.aggregated and any("step 1 released nothing" in f for f in training.failures)
    final = coordinator.global_state
    assert all(torch.equal(final[n], t) for n, t in frozen_part(start, "ffa").items())
    assert all(not torch.equal(final[n], t) for n, t in trained_part(start, "ffa").items())
    north, *others = (SiteLedger(n.policy.ledger_path) for n in nodes)
    assert [(r.step, r.frozen_a_sha256) for r in north.secure_releases()] == [(0, frozen)]
    assert [(r.step, r.frozen_a_sha256) for r in others[0].secure_releases()] == [
        (0, frozen), (1, frozen)]
    assert "frozen lora_A factors differ" in _declines(policies[0])[-1]

    later = SecureRequest(train_request(_job(tmp_path, "federation.aggregation=ffa"), "ffa", 2),
                          _plan())
    other = {n: t + 0.01 if "lora_A" in n else t for n, t in final.items()}
    reply, session = SecureRound(nodes[0]).answer(1, later, other, None)
    assert not reply.reply.accepted and "frozen lora_A factors differ" in reply.reply.reason
    assert session is None
    assert SecureRound(nodes[0]).answer(1, later, final, None)[0].reply.accepted
