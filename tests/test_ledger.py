"""The site ledger: hash chain, tamper detection, torn-write recovery, recomputed epsilon."""

import json

import pytest

from privatune.common.ledger import ADAPTER_UPDATE, NON_PRIVATE, LedgerError, SiteLedger, read_entries
from privatune.common.privacy import MechanismStep, rdp_epsilon


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
    expected = rdp_epsilon([MechanismStep(0.9, 0.05, 20)] * 3, 1e-5)
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


def test_torn_last_line_is_set_aside_and_ledger_stays_valid(tmp_path):
    path = tmp_path / "ledger.jsonl"
    make_ledger(path, rounds=1)
    with open(path, "a") as handle:
        handle.write('{"seq": 3, "kind": "adapter_upd')  # crash mid-write
    ledger = SiteLedger(path)
    assert len(ledger.entries) == 2
    assert list(tmp_path.glob("ledger.jsonl.torn-*"))
    ledger.append(NON_PRIVATE, {"release": "after-crash"})
    entries, torn = read_entries(path)
    assert torn is None and [e["seq"] for e in entries] == [1, 2, 3]
