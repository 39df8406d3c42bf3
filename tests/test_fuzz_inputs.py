"""Property-based fuzzing of everything a site or a coordinator hands the code as a file.

Random and mutated JSONL files, FHIR Bulk exports (plain and gzipped), site policies and job
configs must give either a valid result or our own error (DataError, ConfigError) naming the
file: never another exception, which would reach the user as a traceback.

The examples are derandomized, so a run is reproducible; set PRIVATUNE_FUZZ_EXAMPLES (and
PRIVATUNE_FUZZ_RANDOM=1 for a fresh random campaign) to search longer than the test suite does.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import typing
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from privatune.client.data import DataError, load_records
from privatune.client.policy import SitePolicy, load_site_policy
from privatune.common.config import ConfigError, JobConfig, load_job_config

FUZZ = settings(
    max_examples=int(os.environ.get("PRIVATUNE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    derandomize=not os.environ.get("PRIVATUNE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(workdir: Path, name: str) -> Path:
    """A new directory per example (hypothesis runs many examples within one test call)."""
    folder = workdir / uuid.uuid4().hex
    folder.mkdir()
    return folder / name


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (position, length to remove, bytes to insert) edits: flips, cuts and insertions."""
    for position, remove, insert in edits:
        at = position % (len(data) + 1)
        data = data[:at] + insert + data[at + remove:]
    return data


EDIT_LISTS = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 8),
                                st.sampled_from([b"", b"\x00", b"\xff", b"\n", b'"', b"{", b"}",
                                                 b"[", b"]", b",", b":", b"\\", b"&a ", b"*a",
                                                 b"!!", b"\xe9", b"- ", b"  ", b"\t", b"1e999",
                                                 b"null"])),
                      min_size=1, max_size=4)
EDITS = st.booleans().flatmap(lambda mutated: EDIT_LISTS if mutated else st.just([]))
JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                | st.text(max_size=30))
JSON = st.recursive(JSON_SCALARS, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)
# text that exercises the XHTML narrative reader: tags, entities, script and style
MARKUP = st.lists(st.sampled_from(["<div>", "</div>", "<p>", "</p>", "<br/>", "<script>", "</script>",
                                   "<style>", "</style>", "<script/>", "&amp;", "&#160;", "&bogus;",
                                   "<!--", "-->", "<![CDATA[", "]]>", "<!DOCTYPE x>", "<?pi?>",
                                   "<b a='1'>", "</b>", "<", ">", "&", "note", " ", "\n", "é"]),
                  max_size=25).map("".join) | st.text(max_size=60)


def check_data(path: Path, fmt: str = "auto") -> None:
    """load_records either gives records or raises DataError naming the file."""
    try:
        records = load_records(path, fmt)
    except DataError as err:
        assert str(path) in str(err) or str(path.parent) in str(err), str(err)
        event(f"DataError: {outcome(err, path.parent)}")
        return
    assert records and all(isinstance(r.completion, str) and r.completion for r in records)
    event("records")


def outcome(err: Exception, folder: Path) -> str:
    """The kind of an error, for hypothesis' statistics: its words after the place."""
    text = str(err).replace(str(folder), "")
    return text.split(": ", 2 if ", line" in text.split(": ")[0] else 1)[-1][:40]


# --- JSONL ------------------------------------------------------------------------------------

NOTE = st.text(min_size=1, max_size=40)
VALID_RECORD = (st.fixed_dictionaries({"text": NOTE}, optional={"patient_id": NOTE})
                | st.fixed_dictionaries({"prompt": st.text(max_size=20), "completion": NOTE},
                                        optional={"patient_id": NOTE}))
RECORD = VALID_RECORD | st.fixed_dictionaries({}, optional={
    "text": JSON_SCALARS | JSON, "prompt": JSON_SCALARS, "completion": JSON_SCALARS,
    "patient_id": JSON_SCALARS})


@FUZZ
@given(lines=st.lists(VALID_RECORD.map(json.dumps), max_size=4)
       | st.lists(RECORD.map(json.dumps) | JSON.map(json.dumps) | st.text(max_size=40), max_size=6),
       edits=EDITS, bom=st.booleans())
def test_jsonl_reader_gives_records_or_a_data_error(workdir, lines, edits, bom):
    text = "\n".join(lines)
    data = mutate(("\ufeff" if bom else "").encode() + text.encode("utf-8", "surrogatepass"), edits)
    path = fresh(workdir, "site.jsonl")
    path.write_bytes(data)
    check_data(path)


# --- FHIR Bulk NDJSON -------------------------------------------------------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


ATTACHMENT = st.fixed_dictionaries({}, optional={
    "contentType": st.sampled_from(["text/plain", "text/html", "application/xhtml+xml",
                                    "text/plain; charset=utf-8", "application/pdf", ""]) | JSON_SCALARS,
    "data": MARKUP.map(b64) | JSON_SCALARS, "url": st.text(max_size=10)})
REFERENCE = st.fixed_dictionaries({}, optional={
    "reference": st.sampled_from(["Patient/1", "Patient/a-b.c", "https://x/Patient/9/_history/2",
                                  "Group/3", "Patient/", ""]) | JSON_SCALARS})
SECTION = st.recursive(
    st.fixed_dictionaries({}, optional={"title": JSON_SCALARS,
                                        "text": st.fixed_dictionaries({}, optional={
                                            "div": MARKUP | JSON_SCALARS})}),
    lambda children: st.fixed_dictionaries({"section": st.lists(children, max_size=3) | JSON_SCALARS},
                                           optional={"title": JSON_SCALARS}), max_leaves=6)
DOCUMENT_REFERENCE = st.fixed_dictionaries({"resourceType": st.just("DocumentReference")}, optional={
    "status": st.sampled_from(["current", "entered-in-error"]) | JSON_SCALARS,
    "subject": REFERENCE | JSON_SCALARS,
    "content": st.lists(st.fixed_dictionaries({}, optional={"attachment": ATTACHMENT | JSON_SCALARS})
                        | JSON_SCALARS, max_size=3) | JSON_SCALARS})
COMPOSITION = st.fixed_dictionaries({"resourceType": st.just("Composition")}, optional={
    "status": st.sampled_from(["final", "entered-in-error"]), "title": JSON_SCALARS,
    "type": st.fixed_dictionaries({}, optional={"text": JSON_SCALARS}) | JSON_SCALARS,
    "subject": REFERENCE | JSON_SCALARS, "section": st.lists(SECTION, max_size=3) | JSON_SCALARS,
    "docStatus": JSON_SCALARS})
VALID_NOTE = (st.fixed_dictionaries({
    "resourceType": st.just("DocumentReference"),
    "subject": st.fixed_dictionaries({"reference": st.sampled_from(["Patient/1", "Patient/2"])}),
    "content": st.lists(st.fixed_dictionaries({"attachment": st.fixed_dictionaries({
        "contentType": st.sampled_from(["text/plain", "text/html"]), "data": MARKUP.map(b64)})}),
        min_size=1, max_size=2)})
    | st.fixed_dictionaries({
        "resourceType": st.just("Composition"), "title": st.text(max_size=10),
        "section": st.lists(st.fixed_dictionaries({"title": st.text(max_size=10), "text":
                                                   st.fixed_dictionaries({"div": MARKUP})}),
                            min_size=1, max_size=3)}))
RESOURCE = (VALID_NOTE | DOCUMENT_REFERENCE | COMPOSITION
            | st.fixed_dictionaries({"resourceType": JSON_SCALARS}) | JSON)


@FUZZ
@given(files=st.lists(st.tuples(st.lists(VALID_NOTE, min_size=1, max_size=3)
                                | st.lists(RESOURCE, max_size=4), EDITS, st.booleans(),
                                st.booleans()), min_size=1, max_size=3),
       whole_export=st.booleans())
def test_fhir_reader_gives_records_or_a_data_error(workdir, files, whole_export):
    export = fresh(workdir, "export")
    export.mkdir()
    for index, (resources, edits, zipped, mutate_after_zip) in enumerate(files):
        data = "".join(json.dumps(r) + "\n" for r in resources).encode("utf-8", "surrogatepass")
        if zipped:
            data = (mutate(gzip.compress(data), edits) if mutate_after_zip
                    else gzip.compress(mutate(data, edits)))
        else:
            data = mutate(data, edits)
        (export / f"Resource{index}.ndjson{'.gz' if zipped else ''}").write_bytes(data)
    check_data(export if whole_export else next(export.iterdir()))


# --- YAML: site policy and job config ---------------------------------------------------------

YAML_SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
                | st.sampled_from([".nan", ".inf", "1e-5", "1.0e-4", "yes", "~", "auto", "record",
                                   "patient", "fhir", "collapse", "q_proj"]) | st.text(max_size=12))
YAML_VALUES = st.recursive(YAML_SCALARS, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8) | st.integers(), children,
                                             max_size=3), max_leaves=8)


def sections(known: dict[str, list[str]]):
    """Mappings over the known sections and keys (plus unknown ones) with fuzzed values."""
    keys = {section: st.dictionaries(st.sampled_from(names) | st.text(max_size=6), YAML_VALUES,
                                     max_size=len(names))
                     | YAML_VALUES for section, names in known.items()}
    return st.fixed_dictionaries({}, optional=keys) | st.dictionaries(st.text(max_size=6), YAML_VALUES,
                                                                     max_size=3)


def known_keys(config: type) -> dict[str, list[str]]:
    """Every section of a config dataclass and its keys, as its loader knows them (new keys are
    fuzzed as soon as they are declared)."""
    hints = typing.get_type_hints(config)
    return {f.name: ([g.name for g in dataclasses.fields(hints[f.name])]
                     if dataclasses.is_dataclass(hints[f.name]) else [])
            for f in dataclasses.fields(config)}


POLICY = sections(known_keys(SitePolicy))
JOB = sections(known_keys(JobConfig))
VALID_POLICY = {"site": {"name": "a", "data": "notes.jsonl", "model": "model", "state_dir": "state"},
                "privacy": {"epsilon_cap": 8.0, "delta": 1.0e-5}}
REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())


def with_fuzzed_value(base: dict):
    """``base`` with one of its keys set to a random value."""
    names = sorted((section, key) for section, keys in base.items() if isinstance(keys, dict)
                   for key in keys)

    def change(choice):
        (section, key), value = choice
        data = json.loads(json.dumps(base))
        data[section][key] = value
        return data

    return st.tuples(st.sampled_from(names), YAML_VALUES).map(change)


def yaml_text(data, edits) -> bytes:
    try:
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, UnicodeEncodeError):
        text = repr(data)
    return mutate(text.encode("utf-8", "surrogatepass"), edits)


def check_config(load, path: Path) -> None:
    """The loader either gives a config or raises ConfigError naming the file (or the --set)."""
    try:
        load(path)
    except ConfigError as err:
        assert str(path) in str(err) or str(err).startswith("--set "), str(err)
        event(f"ConfigError: {outcome(err, path.parent)}")
        return
    event("valid")


@FUZZ
@given(data=st.integers(0, 5).flatmap(lambda pick: [
    st.just(VALID_POLICY), st.just(VALID_POLICY), with_fuzzed_value(VALID_POLICY),
    with_fuzzed_value(VALID_POLICY), POLICY, YAML_VALUES][pick]), edits=EDITS)
def test_site_policy_loader_gives_a_policy_or_a_config_error(workdir, data, edits):
    path = fresh(workdir, "policy.yaml")
    path.write_bytes(yaml_text(data, edits))
    check_config(load_site_policy, path)


@FUZZ
@given(data=with_fuzzed_value(DEMO) | JOB | YAML_VALUES, edits=EDITS,
       preset=st.sampled_from(["demo.yaml", "smoke.yaml", None]),
       overrides=st.lists(st.text(max_size=20) | st.sampled_from(["lora.r=16", "seed=*a", "x.y=[1",
                                                                  "privacy.delta=.nan", "lora=3"]),
                          max_size=2))
def test_job_config_loader_gives_a_job_or_a_config_error(workdir, data, edits, preset, overrides):
    path = fresh(workdir, "job.yaml")
    text = (REPO / "configs" / preset).read_bytes() if preset else yaml_text(data, [])
    path.write_bytes(mutate(text, edits))
    check_config(lambda p: load_job_config(p, overrides), path)
