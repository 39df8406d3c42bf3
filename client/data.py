"""Reading a hospital's private records into training text, and splitting them.

Two inputs are supported: JSONL files the site prepared itself, and FHIR R4 Bulk Data
exports (NDJSON, plain or gzip-compressed ``.ndjson.gz`` as bulk-data clients save them), which
is what an EHR hands out. Every bad input raises `DataError` naming the file and line, so a
data steward can fix the record without guessing.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from privatune.common.config import os_reason

FORMATS = ("auto", "jsonl", "fhir")

# FHIR R4 `Reference.reference` to a Patient, relative or absolute, with optional version.
_PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
# XHTML elements that start a new line when narrative is flattened to text.
_BLOCK_TAGS = frozenset({"br", "div", "p", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                         "table", "ul", "ol", "pre", "blockquote"})
_MARKUP_CONTENT_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# XHTML elements whose content is code or styling, never narrative text.
_HIDDEN_TAGS = frozenset({"script", "style"})
_NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the 1-based line."""


@dataclass(frozen=True)
class Record:
    """One training example: the loss is computed on `completion` only."""

    prompt: str
    completion: str
    patient_id: str | None
    source: str


def load_records(path: str | Path, fmt: str = "auto") -> list[Record]:
    """Load every record at `path` as JSONL or a FHIR Bulk NDJSON export (file or directory)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    _check_exists(path)
    if fmt == "auto":
        fmt = _detect_format(path)
    if fmt == "jsonl":
        return _load_jsonl(path)
    return _load_fhir(path)


def collapse_duplicates(records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """Keep the first of each group of exact duplicates (same prompt, completion and patient).

    Two copies of one record are one person's data: counted as two privacy units they would
    halve that person's record-level guarantee. Returns (kept, dropped copies).
    """
    seen: set[tuple[str, str, str | None]] = set()
    kept: list[Record] = []
    dropped: list[Record] = []
    for record in records:
        key = (record.prompt, record.completion, record.patient_id)
        (dropped if key in seen else kept).append(record)
        seen.add(key)
    return kept, dropped


def split_records(records: Sequence[Record], heldout_fraction: float,
                  seed: int) -> tuple[list[Record], list[Record]]:
    """Split into (train, held-out), whole patients, with ``heldout_fraction`` of the records
    held out as nearly as whole patients allow.

    The units are a patient's records, or, without a patient id, the records of one text. They
    are taken in an order fixed by hashing the seed and the unit, so the split survives
    reordering and reloading; a unit is held out when that brings the held-out record count
    closer to the target (on a tie too), so the count ends within half of one unit's records
    of it. Both lists come back in a canonical order (by hash, then source).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction}")
    units: dict[bytes, list[Record]] = defaultdict(list)
    for record in records:
        key = (f"patient\0{record.patient_id}" if record.patient_id is not None
               else f"text\0{record.prompt}\0{record.completion}")
        units[hashlib.sha256(f"{seed}\0{key}".encode()).digest()].append(record)
    target = heldout_fraction * len(records)
    train: list[tuple[bytes, Record]] = []
    heldout: list[tuple[bytes, Record]] = []
    for digest in sorted(units):
        group = units[digest]
        closer = len(heldout) + len(group) / 2 <= target
        (heldout if closer else train).extend((digest, record) for record in group)
    for side, chosen in (("training", train), ("held-out", heldout)):
        if not chosen:
            raise ValueError(f"splitting {len(records)} records with heldout_fraction={heldout_fraction} "
                             f"(seed {seed}) leaves the {side} split empty; add data or change the fraction")
    return _canonical(train), _canonical(heldout)


def _canonical(keyed: list[tuple[bytes, Record]]) -> list[Record]:
    return [record for _, record in sorted(keyed, key=lambda item: (item[0], item[1].source))]


def _check_exists(path: Path) -> None:
    """DataError unless ``path`` exists; a symbolic link loop is named as one, not as missing."""
    try:
        path.stat()
    except FileNotFoundError as err:
        dangling = " (a symbolic link to nothing)" if path.is_symlink() else ""
        raise DataError(f"{path}: no such file or directory{dangling}") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({os_reason(err)})") from err


def _detect_format(path: Path) -> str:
    if path.is_dir() or path.name.endswith(_NDJSON_SUFFIXES):
        return "fhir"
    if path.suffix == ".jsonl":
        return "jsonl"
    raise DataError(f"{path}: cannot tell the data format from the name; use a .jsonl file, "
                    "a .ndjson file or a FHIR export directory, or set the format explicitly")


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each non-blank line, raising DataError on bad lines.

    A ``.gz`` file is decompressed as it is read; a corrupt or truncated one is named.
    """
    compressed = path.name.endswith(".gz")
    line_number = 0
    try:
        with (gzip.open(path, "rb") if compressed else path.open("rb")) as handle:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}, line {line_number}: not valid UTF-8 ({err.reason})") from err
                if line_number == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {line_number}: malformed JSON ({err.msg} at column "
                                    f"{err.colno})") from err
                except (ValueError, RecursionError) as err:  # a 5,000-digit number, deep nesting
                    raise DataError(f"{path}, line {line_number}: JSON that cannot be read "
                                    f"({str(err) or type(err).__name__})") from err
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        after = f" after line {line_number}" if line_number else ""
        raise DataError(f"{path}: not a valid gzip file ({err or 'truncated'}){after}; "
                        "re-download or re-compress it") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({os_reason(err)})") from err


def _load_jsonl(path: Path) -> list[Record]:
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    records = [_jsonl_record(value, f"{path}, line {line_number}", f"{path}:{line_number}")
               for line_number, value in _json_lines(path)]
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def _jsonl_record(value: Any, where: str, source: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    if "text" in value:
        if "prompt" in value or "completion" in value:
            raise DataError(f"{where}: has both 'text' and 'prompt'/'completion'; use one form")
        prompt, completion = "", _string_field(value, "text", where)
    elif "prompt" in value or "completion" in value:
        prompt = _string_field(value, "prompt", where, allow_empty=True)
        completion = _string_field(value, "completion", where)
    else:
        raise DataError(f"{where}: missing field 'text' (or 'prompt' and 'completion')")
    patient_id = value.get("patient_id")
    if patient_id is not None and (not isinstance(patient_id, str) or not patient_id):
        raise DataError(f"{where}: field 'patient_id' must be a non-empty string")
    return Record(prompt=prompt, completion=completion, patient_id=patient_id, source=source)


def _string_field(value: dict[str, Any], name: str, where: str, allow_empty: bool = False) -> str:
    if name not in value:
        raise DataError(f"{where}: missing field {name!r}")
    field = value[name]
    if not isinstance(field, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(field).__name__}")
    if not allow_empty and not field.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return field


def _load_fhir(path: Path) -> list[Record]:
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.name.endswith(_NDJSON_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no .ndjson or .ndjson.gz files in this FHIR export directory")
    else:
        files = [path]
    records: list[Record] = []
    for file in files:
        for line_number, resource in _json_lines(file):
            where = f"{file}, line {line_number}"
            try:
                note = _fhir_note(resource, where)
            except RecursionError as err:
                raise DataError(f"{where}: sections nested too deeply") from err
            if note is not None:
                text, patient_id = note
                records.append(Record(prompt="", completion=text, patient_id=patient_id,
                                      source=f"{file}:{line_number}"))
    if not records:
        raise DataError(f"{path}: the FHIR export has no clinical notes (no DocumentReference with a "
                        "text attachment and no Composition with section narrative)")
    return records


def _fhir_note(resource: Any, where: str) -> tuple[str, str | None] | None:
    """(note text, patient id) of a note-bearing resource, or None for anything else."""
    if not isinstance(resource, dict):
        raise DataError(f"{where}: expected a FHIR resource (JSON object), got {type(resource).__name__}")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise DataError(f"{where}: missing field 'resourceType'")
    if resource_type not in ("DocumentReference", "Composition"):
        return None
    if "entered-in-error" in (resource.get("status"), resource.get("docStatus")):
        return None
    text = (_document_reference_text(resource, where) if resource_type == "DocumentReference"
            else _composition_text(resource, where))
    if not text:
        return None
    return text, _patient_id(resource, where)


def _document_reference_text(resource: dict[str, Any], where: str) -> str:
    """Text of the first text attachment; several `content` entries are one document in
    different formats, so plain text is preferred and only one is taken."""
    attachments = [_object(entry, "DocumentReference.content[]", where).get("attachment")
                   for entry in _list(resource.get("content"), "DocumentReference.content", where)]
    inline = [attachment for attachment in attachments
              if isinstance(attachment, dict) and "data" in attachment and _is_text(attachment)]
    inline.sort(key=lambda attachment: _media_type(attachment) != "text/plain")
    for attachment in inline:
        text = _decode_attachment(attachment, where)
        if text:
            return text
    return ""


def _media_type(attachment: dict[str, Any]) -> str:
    content_type = attachment.get("contentType")
    return content_type.split(";")[0].strip().lower() if isinstance(content_type, str) else ""


def _is_text(attachment: dict[str, Any]) -> bool:
    media_type = _media_type(attachment)
    return media_type.startswith("text/") or media_type in _MARKUP_CONTENT_TYPES


def _decode_attachment(attachment: dict[str, Any], where: str) -> str:
    data = attachment["data"]
    if not isinstance(data, str):
        raise DataError(f"{where}: attachment 'data' must be a base64 string")
    try:
        text = base64.b64decode("".join(data.split()), validate=True).decode("utf-8")
    except ValueError as err:  # binascii.Error, UnicodeDecodeError, a non-ASCII string
        raise DataError(f"{where}: attachment 'data' is not base64-encoded UTF-8 text ({err})") from err
    if _media_type(attachment) in _MARKUP_CONTENT_TYPES:
        return _xhtml_to_text(text)
    return text.replace("\r\n", "\n").strip()


def _composition_text(resource: dict[str, Any], where: str) -> str:
    """The composition's title, then one "Section title: narrative" block per section."""
    blocks = _section_blocks(_list(resource.get("section", []), "Composition.section", where), where)
    if not blocks:
        return ""
    title = resource.get("title")
    if not isinstance(title, str) or not title.strip():
        type_ = resource.get("type")
        title = type_.get("text") if isinstance(type_, dict) else None
    heading = title.strip() if isinstance(title, str) else ""
    return "\n".join([heading, *blocks] if heading else blocks)


def _section_blocks(sections: list[Any], where: str) -> list[str]:
    blocks: list[str] = []
    for section in sections:
        section = _object(section, "Composition.section[]", where)
        narrative = section.get("text")
        div = narrative.get("div") if isinstance(narrative, dict) else None
        body = _xhtml_to_text(div) if isinstance(div, str) else ""
        title = section.get("title")
        heading = title.strip() if isinstance(title, str) else ""
        if body:
            blocks.append(f"{heading}: {body}" if heading else body)
        nested = _section_blocks(_list(section.get("section", []), "Composition.section[].section", where),
                                 where)
        if nested and heading and not body:
            blocks.append(f"{heading}:")
        blocks.extend(nested)
    return blocks


def _patient_id(resource: dict[str, Any], where: str) -> str | None:
    subject = resource.get("subject")
    if subject is None:
        return None
    reference = _object(subject, f"{resource['resourceType']}.subject", where).get("reference")
    if not isinstance(reference, str):
        return None
    match = _PATIENT_REFERENCE.search(reference)
    return match.group(1) if match else None


def _list(value: Any, name: str, where: str) -> list[Any]:
    if value is None:
        raise DataError(f"{where}: missing {name}")
    if not isinstance(value, list):
        raise DataError(f"{where}: {name} must be a list")
    return value


def _object(value: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: {name} must be a JSON object")
    return value


class _NarrativeText(HTMLParser):
    """Collects the text of an XHTML narrative; entities are unescaped by the parser.

    The content of ``<script>`` and ``<style>`` is code, not narrative: it is dropped.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0  # depth inside script/style elements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HIDDEN_TAGS:  # <script/> holds nothing and closes itself
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self.hidden = max(self.hidden - 1, 0)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _xhtml_to_text(markup: str) -> str:
    parser = _NarrativeText()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)
