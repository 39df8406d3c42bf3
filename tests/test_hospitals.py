"""Simulated hospitals: clinosim exports that the node can read, differing per site, cached."""

import dataclasses
import json
import time
from importlib.resources import files

import pytest

from privatune.client.data import load_records
from privatune.simulations.hospitals import (
    FACILITIES,
    MANIFEST_NAME,
    HospitalSpec,
    default_hospitals,
    export_is_current,
    generate_federation,
    generate_hospital_export,
)

TINY_SITES = [
    HospitalSpec(name="site-a", seed=11, patients=18, facility="clinic", season="winter"),
    HospitalSpec(name="site-b", seed=12, patients=36, facility="tertiary", season="summer"),
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Both sites generated once; site-b's directory starts out holding an older spec's export."""
    cache_dir = tmp_path_factory.mktemp("federation")
    stale = cache_dir / "site-b"
    stale.mkdir()
    (stale / "Composition.ndjson").write_text("{}\n")
    older_spec = dataclasses.replace(TINY_SITES[1], seed=99)
    (stale / MANIFEST_NAME).write_text(json.dumps({"spec": dataclasses.asdict(older_spec),
                                                   "files": {"Composition.ndjson": 3}}))
    return cache_dir, generate_federation(TINY_SITES, cache_dir)


def test_exports_are_fhir_bulk_note_exports_the_node_can_read(federation):
    cache_dir, exports = federation
    assert exports == {spec.name: cache_dir / spec.name for spec in TINY_SITES}
    for spec in TINY_SITES:
        export = exports[spec.name]
        bulk_manifest = json.loads((export / "manifest.json").read_text())
        listed = {item["url"] for item in bulk_manifest["output"]}
        assert listed <= {"Patient.ndjson", "DocumentReference.ndjson", "Composition.ndjson"}
        assert listed & {"DocumentReference.ndjson", "Composition.ndjson"}
        assert all((export / name).is_file() for name in listed)
        records = load_records(export)
        assert records
        assert all(r.completion.strip() for r in records)
        assert all(r.patient_id.startswith(f"{spec.name}-pt-") for r in records)
        assert spec.patients / 2 <= len({r.patient_id for r in records}) <= spec.patients * 2


def test_sites_differ(federation):
    _, exports = federation
    records = {name: load_records(path) for name, path in exports.items()}
    site_a, site_b = records["site-a"], records["site-b"]
    assert len(site_a) != len(site_b)
    assert {r.completion for r in site_a}.isdisjoint(r.completion for r in site_b)
    assert {r.patient_id for r in site_a}.isdisjoint(r.patient_id for r in site_b)


def test_second_call_reuses_the_cache(federation):
    cache_dir, exports = federation
    manifests = {name: (path / MANIFEST_NAME).stat().st_mtime_ns for name, path in exports.items()}
    started = time.perf_counter()
    assert generate_federation(TINY_SITES, cache_dir) == exports
    assert time.perf_counter() - started < 2.0
    assert {name: (path / MANIFEST_NAME).stat().st_mtime_ns
            for name, path in exports.items()} == manifests


def test_cache_is_stale_for_another_spec_or_damaged_data(federation, tmp_path):
    _, exports = federation
    spec, export = TINY_SITES[0], exports["site-a"]
    assert export_is_current(spec, export)
    assert not export_is_current(dataclasses.replace(spec, seed=99), export)
    assert not export_is_current(dataclasses.replace(spec, season="autumn"), export)
    assert not export_is_current(spec, tmp_path)

    copy = tmp_path / "copy"
    copy.mkdir()
    for item in export.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    assert export_is_current(spec, copy)
    data_file = next(copy.glob("*.ndjson"))
    data_file.write_bytes(data_file.read_bytes()[:-10])  # an interrupted copy
    assert not export_is_current(spec, copy)


def test_an_export_of_another_spec_is_replaced(federation):
    cache_dir, exports = federation
    assert export_is_current(TINY_SITES[1], exports["site-b"])
    assert (exports["site-b"] / "Composition.ndjson").read_text() != "{}\n"
    assert sorted(p.name for p in cache_dir.iterdir()) == ["site-a", "site-b"]  # no partial dirs


def test_worker_failures_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("precious")
    specs = [HospitalSpec(name, seed=1, patients=10) for name in ("x", "y")]
    with pytest.raises(RuntimeError, match="(?s)failed.*not a simulated hospital export"):
        generate_federation(specs, tmp_path)
    assert (tmp_path / "x" / "keep.txt").read_text() == "precious"


def test_default_hospitals_are_non_iid():
    specs = default_hospitals(4, base_seed=7, patients=100)
    assert [s.name for s in specs] == ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
    assert len({s.seed for s in specs}) == 4
    assert [s.patients for s in specs] == [60, 87, 113, 140]
    assert len({s.season for s in specs}) == 4
    assert {s.facility for s in specs} == set(FACILITIES)
    assert default_hospitals(4, base_seed=7, patients=100) == specs
    assert {s.seed for s in default_hospitals(4, base_seed=8)}.isdisjoint(s.seed for s in specs)
    assert default_hospitals(1, base_seed=0, patients=90) == [
        HospitalSpec("hospital-1", seed=1, patients=90, facility="community", season="winter")]


@pytest.mark.parametrize("fields, message", [
    ({"name": "../escape"}, "hospital name"),
    ({"patients": 0}, "patients must be positive"),
    ({"facility": "spa"}, "unknown facility 'spa'"),
    ({"season": "monsoon"}, "unknown season 'monsoon'"),
])
def test_invalid_specs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        HospitalSpec(**{"name": "h", "seed": 1, "patients": 10, **fields})


def test_an_unrelated_directory_is_never_replaced(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a simulated hospital export"):
        generate_hospital_export(HospitalSpec("h", seed=1, patients=10), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_site_names_must_be_unique(tmp_path):
    spec = HospitalSpec("same", seed=1, patients=10)
    with pytest.raises(ValueError, match="repeated: same"):
        generate_federation([spec, dataclasses.replace(spec, seed=2)], tmp_path)


def test_facility_presets_ship_with_clinosim():
    for preset in filter(None, FACILITIES.values()):
        assert (files("clinosim") / "config" / preset).is_file()
