"""The site ledger: hash chain, tamper detection, torn-write recovery, recomputed epsilon."""

import json
import logging

import pytest

from privatune.common.ledger import (ADAPTER_UPDATE, GENESIS_HASH, NON_PRIVATE, LedgerError,
                                     SiteLedger, entry_hash, read_entries)
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
