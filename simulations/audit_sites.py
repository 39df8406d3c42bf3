"""The audit's hospitals: their records, split into training and held-out privacy units the
way the membership game needs them, with the canaries planted at one site."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import TensorDataset

from privatune.client.data import Record, load_records, split_records
from privatune.client.node import privacy_units
from privatune.common.config import JobConfig
from privatune.common.examples import encode_pairs
from privatune.simulations.canaries import CANARY_SOURCE, Canary, plant_canaries


@dataclass(frozen=True)
class AuditSite:
    """A hospital's records for the audit: a JSONL file or FHIR export, in the node's formats."""

    name: str
    data: Path
    format: str = "auto"


@dataclass
class SiteSplit:
    """One site's privacy units (training, held out, training minus canaries) and, once the
    tokenizer is known, their encoded tensors."""

    name: str
    train_records: list[Record]  # the node trains on these (canaries included) ...
    heldout_records: list[Record]  # ... and is evaluated on these
    train_units: list[tuple[str, str]]
    heldout_units: list[tuple[str, str]]
    member_units: list[tuple[str, str]]  # training units that are not canaries
    train: TensorDataset | None = None
    members: TensorDataset | None = None
    heldout: TensorDataset | None = None


def membership_records(records: Sequence[Record], unit: str) -> list[Record]:
    """A site's records as the membership game needs them.

    Under the record unit, membership is per record, so members and non-members must be
    exchangeable records: the split is keyed on the record, not the patient. (The node's
    patient-keyed split puts a handful of patients, often with many near-identical notes, on
    the held-out side; measured on the simulated hospitals, that alone moved the attack's AUC
    to 0.3 or 0.58 before any training.) Under the patient unit the patient split stays.
    """
    if unit == "record":
        return [replace(record, patient_id=None) for record in records]
    return list(records)


def site_with_most_heldout(job: JobConfig, sites: Sequence[AuditSite]) -> str:
    """The default canary site: the membership attack needs non-members, so the most of them."""
    sizes = {}
    for site in sites:
        records = membership_records(load_records(site.data, site.format), job.privacy.unit)
        _, heldout = split_records(records, job.data.heldout_fraction, job.seed)
        sizes[site.name] = len(privacy_units(heldout, job.privacy.unit))
    return max(sizes, key=lambda name: sizes[name])


def prepare_sites(job: JobConfig, sites: Sequence[AuditSite], canary_site: str,
                  canaries: Sequence[Canary]) -> list[SiteSplit]:
    """Every site's split as `membership_records` says; canaries go into ``canary_site``'s
    training side only."""
    names = [s.name for s in sites]
    if canary_site not in names:
        raise ValueError(f"canary site {canary_site!r} is not one of the sites ({', '.join(names)})")
    splits = []
    for site in sites:
        records = membership_records(load_records(site.data, site.format), job.privacy.unit)
        if site.name == canary_site:
            train, heldout = plant_canaries(records, canaries, job.data.heldout_fraction, job.seed)
        else:
            train, heldout = split_records(records, job.data.heldout_fraction, job.seed)
        clean_train = [r for r in train if not r.source.startswith(CANARY_SOURCE)]
        unit = job.privacy.unit
        splits.append(SiteSplit(site.name, train, heldout, privacy_units(train, unit),
                                privacy_units(heldout, unit), privacy_units(clean_train, unit)))
    return splits


def encode_sites(splits: Sequence[SiteSplit], tokenizer: Any, max_length: int) -> None:
    """Encode every split's training, member and held-out units, in place."""
    for split in splits:
        split.train = encode_pairs(tokenizer, split.train_units, max_length)
        split.heldout = encode_pairs(tokenizer, split.heldout_units, max_length)
        split.members = encode_pairs(tokenizer, split.member_units, max_length)
