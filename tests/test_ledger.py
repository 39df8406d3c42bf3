"""The site ledger: hash chain, tamper detection, torn-write recovery, recomputed epsilon, a
write that fails."""

import errno
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from privatune.common.ledger import GENESIS_HASH, LedgerError, SiteLedger, entry_hash, read_entries
from privatune.common.ledger_records import (ADAPTER_UPDATE, NON_PRIVATE, ROLLBACK_ACKNOWLEDGED,
                                             AdapterRelease, NonPrivateRelease,
                                             RollbackAcknowledgement, record_of)
from privatune.common.privacy import MechanismStep, prv_epsilon


def make_ledger(path, rounds=3):
    ledger = SiteLedger(path)
    for r in range(1, rounds + 1):
        ledger.append(ADAPTER_UPDATE, {"run_id": "run", "round": r, "noise_multiplier": 0.9,
                                       "sample_rate": 0.05, "steps": 20, "epsilon": 0.0,
                                       "delta": 1e-5})
        ledger.append(NON_PRIVATE, {"run_id": "run", "round": r, "release": "train_metrics",
                                    "values": {"num_examples": 100}})
    return ledger


def lines_of(path):
    return path.read_text().splitlines(keepends=True)


def test_reopened_ledger_recomputes_the_same_epsilon(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = make_ledger(path)
    reopened = SiteLedger(path)
    assert len(reopened.entries) == 6
    expected = prv_epsilon([MechanismStep(0.9, 0.05, 20)] * 3, 1e-5)  # the default accountant
    assert reopened.epsilon(1e-5) == pytest.approx(expected)
    assert ledger.epsilon(1e-5) == pytest.approx(expected)
    assert [e["private"] for e in reopened.entries] == [True, False] * 3


ENVELOPE = ("seq", "kind", "private", "time", "prev_hash", "hash")


def test_a_release_is_one_type_that_writes_and_reads_the_same_entry(tmp_path):
    """What the node writes through AdapterRelease is the entry the ledger always held (its
    bytes depend only on its keys and values), and an older entry with fewer fields reads too."""
    ledger = make_ledger(tmp_path / "old.jsonl", rounds=1)  # written as a dict, as before
    old = ledger.adapter_updates()[0]
    release = AdapterRelease.from_entry(old)
    assert release.run_id == "run" and release.accountant is None and release.withheld is None
    assert release.fields() == {k: v for k, v in old.items() if k not in ENVELOPE}
    assert release.step == MechanismStep(0.9, 0.05, 20)

    sent = AdapterRelease(noise_multiplier=0.9, sample_rate=0.05, steps=20, epsilon=1.5,
                          delta=1e-5, run_id="run", round=1, privacy_unit="patient",
                          patient_sampling="window", max_grad_norm=1.0, accountant="opacus-prv",
                          frozen_a_sha256="a" * 64, update_sha256="b" * 64)
    as_dict = SiteLedger(tmp_path / "dict.jsonl")
    as_dict.append(ADAPTER_UPDATE, sent.fields())
    typed = SiteLedger(tmp_path / "typed.jsonl")
    typed.append_record(sent)
    strip = [{k: v for k, v in e.items() if k not in ("time", "hash")}
             for e in (as_dict.entries[0], typed.entries[0])]
    assert strip[0] == strip[1] and typed.releases("run") == [sent] and typed.releases("other") == []
    assert typed.mechanism_history() == [MechanismStep(0.9, 0.05, 20)]


def written_both_ways(tmp_path, monkeypatch, kind, fields, record) -> tuple[bytes, bytes]:
    """The ledger's bytes after one entry appended as a dict (as before the types) and as the
    typed record, at one fixed time."""
    monkeypatch.setattr(time, "strftime", lambda *_: "2026-01-01T00:00:00Z")
    SiteLedger(tmp_path / "dict.jsonl").append(kind, fields)
    SiteLedger(tmp_path / "typed.jsonl").append_record(record)
    return (tmp_path / "dict.jsonl").read_bytes(), (tmp_path / "typed.jsonl").read_bytes()


# the non-private entries as the node writes them: a reply's metrics, a declined train or
# evaluate request, a resend, a rollback decline (``client.rollback``)
NON_PRIVATE_ENTRIES = [
    {"run_id": "run", "round": 1, "release": "train_metrics",
     "values": {"num_examples": 100, "train_loss": 2.5}},
    {"run_id": "run", "round": 1, "release": "evaluate_metrics", "values": {}},
    {"run_id": "run", "round": 2, "release": "decline", "reason": "over the cap"},
    {"run_id": "run", "round": 2, "release": "decline", "request": "evaluate",
     "reason": "too few records"},
    {"run_id": "run", "round": 2, "release": "resend", "update_sha256": "b" * 64},
    {"run_id": "run", "round": 3, "release": "ledger_rollback", "reason": "lost releases",
     "reported_seq": 4, "reported_hash": "c" * 64, "reported_epsilon": 1.5,
     "reported_delta": 1e-5, "recovered_releases": ["d" * 64]},
]


@pytest.mark.parametrize("fields", NON_PRIVATE_ENTRIES,
                         ids=lambda f: f["release"] + ("-" + f["request"] if "request" in f else ""))
def test_a_non_private_release_is_one_type_that_writes_the_same_bytes(tmp_path, monkeypatch,
                                                                       fields):
    typed = NonPrivateRelease(**fields)
    as_dict, as_type = written_both_ways(tmp_path, monkeypatch, NON_PRIVATE, fields, typed)
    assert as_type == as_dict  # the fields it does not use stay absent, never null
    (read,) = SiteLedger(tmp_path / "typed.jsonl").records()
    assert read == typed and read.fields() == fields


ACKNOWLEDGEMENT = {"run_id": "run", "detected_at": 3, "reported_seq": 4,
                   "reported_hash": "c" * 64, "reported_epsilon": 1.5, "reported_delta": 1e-5,
                   "recovered_releases": ["d" * 64], "note": "the releases ... are lost"}


def test_a_rollback_acknowledgement_is_one_type_that_writes_the_same_bytes(tmp_path, monkeypatch):
    typed = RollbackAcknowledgement(**ACKNOWLEDGEMENT)
    as_dict, as_type = written_both_ways(tmp_path, monkeypatch, ROLLBACK_ACKNOWLEDGED,
                                         ACKNOWLEDGEMENT, typed)
    assert as_type == as_dict
    ledger = SiteLedger(tmp_path / "typed.jsonl")
    assert ledger.records() == [typed] and ledger.floor().epsilon == 1.5


def test_older_entries_read_with_the_fields_they_lack_as_none(tmp_path):
    """A rollback decline and an acknowledgement written before kept releases were listed in
    them, and a bare non-private entry, read; the floor is the latest acknowledgement's."""
    ledger = make_ledger(tmp_path / "ledger.jsonl", rounds=1)
    older = {key: value for key, value in ACKNOWLEDGEMENT.items() if key != "recovered_releases"}
    ledger.append(NON_PRIVATE, {key: value for key, value in NON_PRIVATE_ENTRIES[-1].items()
                                if key != "recovered_releases"})
    ledger.append(ROLLBACK_ACKNOWLEDGED, older)
    ledger.append(ROLLBACK_ACKNOWLEDGED, {**older, "reported_epsilon": 2.5})
    ledger.append(NON_PRIVATE, {"release": "after-crash"})
    records = SiteLedger(tmp_path / "ledger.jsonl").records()
    assert [type(r) for r in records] == [AdapterRelease, NonPrivateRelease, NonPrivateRelease,
                                          RollbackAcknowledgement, RollbackAcknowledgement,
                                          NonPrivateRelease]
    assert records[2].recovered_releases is None and records[2].reported_epsilon == 1.5
    assert records[3].recovered_releases is None and records[3].floor.epsilon == 1.5
    assert records[-1] == NonPrivateRelease(release="after-crash")
    assert SiteLedger(tmp_path / "ledger.jsonl").floor().epsilon == 2.5


def test_an_entry_of_an_unknown_kind_reads_as_a_non_private_release():
    """The ledger marks only adapter updates private: whatever else it holds left the site
    uncovered by DP, and the audit lists it so."""
    entry = {"seq": 1, "kind": "something_new", "private": False, "release": "x", "round": 2}
    assert record_of(entry) == NonPrivateRelease(release="x", round=2)


def test_changed_line_is_located(tmp_path):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path)
    lines = lines_of(path)
    entry = json.loads(lines[2])
    entry["noise_multiplier"] = 5.0
    lines[2] = json.dumps(entry, sort_keys=True) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(LedgerError, match="line 3: content does not match its hash"):
        read_entries(path)


def test_removed_line_is_located(tmp_path):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path)
    lines = lines_of(path)
    del lines[1]
    path.write_text("".join(lines))
    with pytest.raises(LedgerError, match="line 2: sequence number 3, expected 2"):
        read_entries(path)


def test_reordered_lines_are_located(tmp_path):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path)
    lines = lines_of(path)
    lines[3], lines[4] = lines[4], lines[3]
    path.write_text("".join(lines))
    with pytest.raises(LedgerError, match="line 4"):
        read_entries(path)


def test_torn_last_line_is_set_aside_loudly_and_ledger_stays_valid(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path, rounds=1)
    with open(path, "a") as handle:
        handle.write('{"seq": 3, "kind": "adapter_upd')  # crash mid-write
    with caplog.at_level(logging.WARNING):
        ledger = SiteLedger(path)
    assert len(ledger.entries) == 2
    (aside,) = tmp_path.glob("ledger.jsonl.torn-*")
    assert ledger.set_aside.side_file == aside
    assert aside.read_text() == '{"seq": 3, "kind": "adapter_upd'
    assert any(str(aside) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    ledger.append(NON_PRIVATE, {"release": "after-crash"})
    entries, torn = read_entries(path)
    assert torn is None and [e["seq"] for e in entries] == [1, 2, 3]


def forge(path, change):
    """Apply ``change`` to the parsed entries and re-chain every line, as a forger would."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    change(entries)
    previous = GENESIS_HASH
    with open(path, "w") as handle:
        for seq, entry in enumerate(entries, start=1):
            entry.update(seq=seq, prev_hash=previous)
            entry["hash"] = previous = entry_hash(entry)
            handle.write(json.dumps(entry, sort_keys=True) + "\n")


def test_complete_last_line_without_newline_is_kept(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path, rounds=2).append(ADAPTER_UPDATE, {
        "run_id": "run", "round": 3, "noise_multiplier": 0.9, "sample_rate": 0.05, "steps": 20,
        "epsilon": 0.0, "delta": 1e-5})
    path.write_bytes(path.read_bytes()[:-1])  # the entry reached the disk, its newline did not
    entries, torn = read_entries(path)
    assert torn is None and [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    with caplog.at_level(logging.WARNING):
        ledger = SiteLedger(path)
    assert len(ledger.entries) == 5 and ledger.set_aside is None and not caplog.records
    expected = prv_epsilon([MechanismStep(0.9, 0.05, 20)] * 3, 1e-5)  # the default accountant
    assert ledger.epsilon(1e-5) == pytest.approx(expected)
    assert path.read_bytes().endswith(b"}\n") and not list(tmp_path.glob("ledger.jsonl.torn-*"))
    ledger.append(NON_PRIVATE, {"release": "after-repair"})
    assert [e["seq"] for e in read_entries(path)[0]] == [1, 2, 3, 4, 5, 6]


def test_final_line_that_does_not_chain_is_set_aside_loudly(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path, rounds=1)
    copy = lines_of(path)[-1].rstrip("\n").encode()  # valid JSON, wrong sequence number and link
    with open(path, "ab") as handle:
        handle.write(copy)
    with caplog.at_level(logging.WARNING):
        ledger = SiteLedger(path)
    assert len(ledger.entries) == 2
    (aside,) = tmp_path.glob("ledger.jsonl.torn-*")
    assert ledger.set_aside.side_file == aside and aside.read_bytes() == copy
    assert str(aside) in ledger.set_aside.message
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in record.getMessage() and str(aside) in record.getMessage()
    assert read_entries(path) == (ledger.entries, None)


def test_torn_lines_are_never_overwritten(tmp_path):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path, rounds=1)
    for tail in (b'{"seq": 3, "ki', b'{"seq": 3, "kind": "adap'):
        with open(path, "ab") as handle:
            handle.write(tail)
        SiteLedger(path)
    assert sorted(p.read_bytes() for p in tmp_path.glob("ledger.jsonl.torn-*")) == [
        b'{"seq": 3, "ki', b'{"seq": 3, "kind": "adap']


def test_garbage_line_in_the_middle_is_a_chain_error(tmp_path):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path)
    lines = lines_of(path)
    lines[2] = "garbage\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="line 3: not valid JSON"):
        SiteLedger(path)
    assert path.read_bytes() == before and not list(tmp_path.glob("ledger.jsonl.torn-*"))


@pytest.mark.parametrize("kind, fields", [
    (ADAPTER_UPDATE, {"noise_multiplier": 0.9, "sample_rate": 0.05, "steps": 20,
                      "epsilon": float("nan"), "delta": 1e-5}),
    (ADAPTER_UPDATE, {"noise_multiplier": float("inf"), "sample_rate": 0.05, "steps": 20,
                      "epsilon": 1.0, "delta": 1e-5}),
    (ADAPTER_UPDATE, {"noise_multiplier": 0.9, "sample_rate": 1.5, "steps": 20,
                      "epsilon": 1.0, "delta": 1e-5}),
    (NON_PRIVATE, {"release": "train_metrics", "values": {"loss": float("-inf")}}),
])
def test_writer_refuses_what_it_would_not_read_back(tmp_path, kind, fields):
    path = tmp_path / "ledger.jsonl"
    ledger = make_ledger(path, rounds=1)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=str(path)):
        ledger.append(kind, fields)
    assert path.read_bytes() == before and len(ledger.entries) == 2
    with pytest.raises(ValueError):
        SiteLedger(tmp_path / "new.jsonl").append(kind, fields)
    assert not (tmp_path / "new.jsonl").exists()


@pytest.mark.parametrize("field, value", [
    ("noise_multiplier", float("nan")), ("noise_multiplier", float("inf")), ("noise_multiplier", 0),
    ("sample_rate", float("nan")), ("sample_rate", 1.5), ("steps", 0), ("steps", 2.5),
    ("delta", float("nan")), ("epsilon", float("inf")),
])
def test_forged_mechanism_in_file_is_refused(tmp_path, field, value):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path)
    forge(path, lambda entries: entries[2].update({field: value}))
    assert len(read_entries(path)[0]) == 6  # the chain itself is consistent
    with pytest.raises(LedgerError, match=f"{path}, line 3: .*{field}") as err:
        SiteLedger(path)
    assert err.value.line == 3


# ------------------------------------------------------------------ a write that fails (file size limit)

# Run in a child process whose file size limit (RLIMIT_FSIZE) ends a few bytes past the ledger:
# the kernel writes those bytes and refuses the rest (EFBIG), a real torn write as on a full disk.
LIMITED_CHILD = """
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
setup, attempt, path = sys.argv[1], sys.argv[2], sys.argv[3]
exec(setup)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 10, resource.RLIM_INFINITY))
exec(attempt)
"""


def run_limited(setup: str, attempt: str, path, tmp_path) -> dict:
    """Run ``setup``, then ``attempt`` under the size limit, in a child; its printed JSON."""
    done = subprocess.run([sys.executable, "-c", LIMITED_CHILD, setup, attempt, str(path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_failed_write_leaves_the_ledger_valid_and_the_next_append_works(tmp_path):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path, rounds=2)
    before = path.read_bytes()
    outcome = run_limited(
        "from privatune.common.ledger import LedgerWriteError, SiteLedger\n"
        "from privatune.common.ledger_records import ADAPTER_UPDATE\n"
        "ledger = SiteLedger(path)",
        "try:\n"
        "    ledger.append(ADAPTER_UPDATE, {'run_id': 'run', 'round': 3, 'noise_multiplier': 0.9,"
        " 'sample_rate': 0.05, 'steps': 20, 'epsilon': 0.0, 'delta': 1e-5})\n"
        "    print(json.dumps({'written': True}))\n"
        "except LedgerWriteError as err:\n"
        "    print(json.dumps({'error': str(err), 'errno': err.__cause__.errno,"
        " 'in_memory': len(ledger.entries)}))", path, tmp_path)
    assert outcome.get("errno") == errno.EFBIG, outcome
    assert "entry 5 could not be written" in outcome["error"] and "cut back to its 4" in outcome["error"]
    assert outcome["in_memory"] == 4
    assert path.read_bytes() == before  # no torn line: the partial bytes were cut off
    entries, torn = read_entries(path)
    assert len(entries) == 4 and torn is None
    # once there is room again, the next entry chains on as if nothing had happened
    SiteLedger(path).append(NON_PRIVATE, {"run_id": "run", "round": 3, "release": "decline"})
    entries, torn = read_entries(path)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5] and torn is None
    assert not list(tmp_path.glob("ledger.jsonl.torn-*"))


def test_node_does_not_send_an_update_its_ledger_could_not_record(make_site, tiny_model_dir,
                                                                  tmp_path):
    from privatune.client.node import SiteNode
    from privatune.client.policy import load_site_policy
    from privatune.common.config import LoraConfig
    from privatune.common.lora import initial_adapter, lora_state
    from privatune.common.protocol import TrainRequest

    policy_path = make_site()
    ledger_path = load_site_policy(policy_path).ledger_path
    lora = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    rounds = [TrainRequest(run_id="run-1", round=r, planned_rounds=2, local_steps=2, batch_size=8,
                           learning_rate=0.02, max_grad_norm=1.0, max_length=48, lora_r=2,
                           lora_alpha=4, lora_targets="q_proj,v_proj") for r in (1, 2)]
    setup = (
        "from privatune.client.node import SiteNode\n"
        "from privatune.client.policy import load_site_policy\n"
        "from privatune.common.lora import LoraConfig, initial_adapter, lora_state\n"
        "from privatune.common.protocol import TrainRequest\n"
        f"node = SiteNode(load_site_policy({str(policy_path)!r}))\n"
        f"state = lora_state(initial_adapter({str(tiny_model_dir)!r}, {lora!r}, seed=0))\n"
        f"assert node.train({rounds[0]!r}, state).reply.accepted")
    attempt = (f"outcome = node.train({rounds[1]!r}, state)\n"
               "print(json.dumps({'accepted': outcome.reply.accepted, 'reason': outcome.reply.reason,"
               " 'tensors': len(outcome.state), 'epsilon': outcome.reply.epsilon}))")
    outcome = run_limited(setup, attempt, ledger_path, tmp_path)
    assert not outcome["accepted"] and outcome["tensors"] == 0
    assert "ledger could not be written (File too large)" in outcome["reason"]
    assert "update was not sent" in outcome["reason"] and str(ledger_path) not in outcome["reason"]
    entries, torn = read_entries(ledger_path)
    assert torn is None and [e["round"] for e in entries if e["kind"] == ADAPTER_UPDATE] == [1]
    node = SiteNode(load_site_policy(policy_path))
    assert outcome["epsilon"] == pytest.approx(node.epsilon())  # the decline tells the ledger's figure
    kept = sorted(p.name for p in (ledger_path.parent / "released").iterdir())
    assert len(kept) == 2 and all("round0001" in name for name in kept)  # nothing kept to re-send
    # with room again the round is trained and released, its entry first
    again = node.train(rounds[1], lora_state(initial_adapter(tiny_model_dir, lora, seed=0)))
    assert again.reply.accepted and [e["round"] for e in node.ledger.adapter_updates()] == [1, 2]
