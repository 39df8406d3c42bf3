"""Hospital data ingestion: JSONL and FHIR Bulk NDJSON, errors that say where, and the split."""

import base64
import gzip
import json
import random
import re

import pytest
import torch

from privatune.client.data import DataError, Record, load_records, split_records


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def starts(path, message):
    """Regex for an error message that begins with the path, then `message` literally."""
    return "^" + re.escape(f"{path}{message}")


def jsonl(path, *objects):
    return write_lines(path, [json.dumps(obj) for obj in objects])


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def document_reference(text, patient="Patient/123", content_type="text/plain", **extra):
    return {"resourceType": "DocumentReference", "status": "current",
            "subject": {"reference": patient},
            "content": [{"attachment": {"contentType": content_type, "data": b64(text)}}], **extra}


def composition(sections, patient="Patient/p-7", title="Discharge summary"):
    return {"resourceType": "Composition", "status": "final", "title": title,
            "subject": {"reference": patient},
            "section": [{"title": heading, "text": {"status": "generated", "div": div}}
                        for heading, div in sections]}


def ndjson(path, *resources):
    return write_lines(path, [json.dumps(resource) for resource in resources])


# --- JSONL ----------------------------------------------------------------------------------

def test_jsonl_text_and_prompt_completion_records(tmp_path):
    path = tmp_path / "site.jsonl"
    write_lines(path, [
        json.dumps({"text": "Patient stable overnight.", "patient_id": "p1"}),
        "",
        json.dumps({"prompt": "Summarise: chest pain", "completion": "Likely angina."}),
        "   ",
    ])
    assert load_records(path) == [
        Record(prompt="", completion="Patient stable overnight.", patient_id="p1",
               source=f"{path}:1"),
        Record(prompt="Summarise: chest pain", completion="Likely angina.", patient_id=None,
               source=f"{path}:3"),
    ]


def test_jsonl_accepts_a_string_path_and_an_explicit_format(tmp_path):
    path = jsonl(tmp_path / "notes.txt", {"text": "note"})
    assert [r.completion for r in load_records(str(path), fmt="jsonl")] == ["note"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "line 2: malformed JSON"),
    ('["a list"]', "line 2: expected a JSON object, got list"),
    ('{"note": "x"}', "line 2: missing field 'text'"),
    ('{"prompt": "q"}', "line 2: missing field 'completion'"),
    ('{"completion": "a"}', "line 2: missing field 'prompt'"),
    ('{"text": 5}', "line 2: field 'text' must be a string, got int"),
    ('{"prompt": "q", "completion": ["a"]}', "line 2: field 'completion' must be a string, got list"),
    ('{"text": "   "}', "line 2: field 'text' is empty"),
    ('{"text": "a", "patient_id": 12}', "line 2: field 'patient_id' must be a non-empty string"),
    ('{"text": "a", "prompt": "q", "completion": "c"}', "line 2: has both 'text' and 'prompt'"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "site.jsonl", ['{"text": "fine"}', line])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert str(excinfo.value).startswith(f"{path}, {message}")


def test_jsonl_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "site.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"site\.jsonl, line 2: not valid UTF-8"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_jsonl_file(tmp_path, content):
    path = tmp_path / "site.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=starts(path, ": no records")):
        load_records(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match=starts(path, ": no such file or directory")):
        load_records(path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = jsonl(tmp_path / "site.jsonl", {"text": "x"})

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", refuse)
    with pytest.raises(DataError, match=starts(path, ": cannot read (Permission denied)")):
        load_records(path)


def test_format_detection_errors(tmp_path):
    unknown = jsonl(tmp_path / "notes.csv", {"text": "x"})
    with pytest.raises(DataError, match=starts(unknown, ": cannot tell the data format")):
        load_records(unknown)
    with pytest.raises(DataError, match=starts(unknown, ": unknown data format 'csv'")):
        load_records(unknown, fmt="csv")
    with pytest.raises(DataError, match=starts(tmp_path, ": is a directory")):
        load_records(tmp_path, fmt="jsonl")


# --- FHIR Bulk NDJSON -----------------------------------------------------------------------

def test_fhir_document_reference_notes(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    ndjson(export / "DocumentReference.ndjson",
           document_reference("Nurse note:\r\nSpO2 98%, café au lait spots.\n", "Patient/123"),
           document_reference("Absolute reference", "https://ehr.example/fhir/Patient/abc/_history/2"),
           document_reference("<p>Seen &amp; <b>discharged</b></p>", "Group/9", content_type="text/html"),
           document_reference("PDF bytes", content_type="application/pdf"),
           {"resourceType": "DocumentReference", "subject": {"reference": "Patient/1"},
            "content": [{"attachment": {"contentType": "text/plain", "url": "Binary/1"}}]},
           document_reference("withdrawn", status="entered-in-error"))
    ndjson(export / "Patient.ndjson", {"resourceType": "Patient", "id": "123"})
    (export / "manifest.json").write_text("{}")

    records = load_records(export)
    assert [(r.completion, r.patient_id) for r in records] == [
        ("Nurse note:\nSpO2 98%, café au lait spots.", "123"),
        ("Absolute reference", "abc"),
        ("Seen & discharged", None),
    ]
    assert all(r.prompt == "" for r in records)
    assert records[0].source == f"{export / 'DocumentReference.ndjson'}:1"


def test_fhir_document_reference_prefers_plain_text_of_several_formats(tmp_path):
    resource = document_reference("<div>Same note</div>", content_type="text/html")
    resource["content"].append({"attachment": {"contentType": "text/plain; charset=utf-8",
                                               "data": b64("Same note, plain")}})
    path = ndjson(tmp_path / "notes.ndjson", resource)
    assert [r.completion for r in load_records(path)] == ["Same note, plain"]


def test_fhir_composition_sections_with_titles(tmp_path):
    path = ndjson(tmp_path / "Composition.ndjson", composition([
        ("Hospital course", "<div xmlns='http://www.w3.org/1999/xhtml'>Improved on IV antibiotics "
                            "&amp; fluids.<br/>Afebrile &gt; 48&#160;h.</div>"),
        ("Plan", "<div xmlns='http://www.w3.org/1999/xhtml'><ul><li>Amoxicillin</li>"
                 "<li>Review in 7 days</li></ul></div>"),
        ("Empty", "<div xmlns='http://www.w3.org/1999/xhtml'>  </div>"),
    ]))
    [record] = load_records(path)
    assert record.completion == ("Discharge summary\n"
                                 "Hospital course: Improved on IV antibiotics & fluids.\n"
                                 "Afebrile > 48 h.\n"
                                 "Plan: Amoxicillin\nReview in 7 days")
    assert record.patient_id == "p-7"
    assert record.prompt == ""


def test_fhir_composition_nested_sections_and_type_as_title(tmp_path):
    resource = {"resourceType": "Composition", "type": {"text": "Progress note"},
                "subject": {"reference": "Patient/5"},
                "section": [{"title": "Assessment",
                             "section": [{"title": "Problem 1",
                                          "text": {"div": "<div>Pneumonia</div>"}}]}]}
    [record] = load_records(ndjson(tmp_path / "c.ndjson", resource))
    assert record.completion == "Progress note\nAssessment:\nProblem 1: Pneumonia"


def test_fhir_ignores_other_resource_types(tmp_path):
    path = ndjson(tmp_path / "mixed.ndjson",
                  {"resourceType": "Observation", "status": "final"},
                  document_reference("Only note"))
    assert [r.completion for r in load_records(path)] == ["Only note"]


@pytest.mark.parametrize("line, message", [
    ('{"resourceType": "Composition"', "line 2: malformed JSON"),
    ('"just a string"', "line 2: expected a FHIR resource (JSON object), got str"),
    ('{"id": "x"}', "line 2: missing field 'resourceType'"),
    ('{"resourceType": "DocumentReference", "content": {}}',
     "line 2: DocumentReference.content must be a list"),
    ('{"resourceType": "DocumentReference", "status": "current"}',
     "line 2: missing DocumentReference.content"),
    ('{"resourceType": "DocumentReference", "content": [{"attachment": '
     '{"contentType": "text/plain", "data": "***"}}]}', "line 2: attachment 'data' is not base64"),
    ('{"resourceType": "DocumentReference", "content": [{"attachment": '
     '{"contentType": "text/plain", "data": "' + base64.b64encode(b"\xff\xfe").decode() + '"}}]}',
     "line 2: attachment 'data' is not base64-encoded UTF-8"),
    ('{"resourceType": "Composition", "section": "x"}', "line 2: Composition.section must be a list"),
])
def test_fhir_errors_name_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "DocumentReference.ndjson",
                       [json.dumps(document_reference("fine")), line])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert str(excinfo.value).startswith(f"{path}, {message}")


def test_fhir_export_without_notes(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    ndjson(export / "Patient.ndjson", {"resourceType": "Patient", "id": "1"})
    ndjson(export / "DocumentReference.ndjson",
           {"resourceType": "DocumentReference",
            "content": [{"attachment": {"contentType": "text/plain", "url": "https://x/1"}}]})
    with pytest.raises(DataError, match=starts(export, ": the FHIR export has no clinical notes")):
        load_records(export)


def test_fhir_directory_without_ndjson_files(tmp_path):
    with pytest.raises(DataError, match=starts(tmp_path, ": no .ndjson or .ndjson.gz files")):
        load_records(tmp_path)


def gzipped(path, *resources):
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in resources).encode()))
    return path


def test_fhir_export_with_gzipped_and_plain_ndjson(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    gzipped(export / "DocumentReference.ndjson.gz", document_reference("Zipped note", "Patient/1"),
            document_reference("Second zipped note", "Patient/2"))
    ndjson(export / "Composition.ndjson", composition([("Plan", "<div>Plain note</div>")]))
    records = load_records(export)
    assert [(r.completion, r.patient_id) for r in records] == [
        ("Discharge summary\nPlan: Plain note", "p-7"), ("Zipped note", "1"),
        ("Second zipped note", "2")]
    assert records[2].source == f"{export / 'DocumentReference.ndjson.gz'}:2"


def test_fhir_gzip_only_export_and_single_gzipped_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    path = gzipped(export / "DocumentReference.ndjson.gz", document_reference("Only zipped"))
    assert [r.completion for r in load_records(export)] == ["Only zipped"]
    assert [r.completion for r in load_records(path)] == ["Only zipped"]


def test_fhir_gzip_errors_name_the_file(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    good = gzipped(export / "a.ndjson.gz", document_reference("fine"))
    corrupt = export / "b.ndjson.gz"
    corrupt.write_bytes(b"this is not gzip data\n")
    with pytest.raises(DataError, match=starts(corrupt, ": not a valid gzip file")):
        load_records(export)
    corrupt.write_bytes(good.read_bytes()[:-12])  # truncated: the last bytes never arrived
    with pytest.raises(DataError, match=starts(corrupt, ": not a valid gzip file")):
        load_records(export)
    corrupt.write_bytes(gzip.compress(b'{"resourceType": "DocumentReference"}\n{oops\n'))
    with pytest.raises(DataError, match=starts(corrupt, ", line 1: missing DocumentReference.content")):
        load_records(export)


def test_fhir_narrative_drops_script_and_style(tmp_path):
    path = ndjson(tmp_path / "c.ndjson", composition([
        ("Course", "<div xmlns='http://www.w3.org/1999/xhtml'><style>p { color: red }</style>"
                   "<p>Improved.</p><script type='text/javascript'>if (a < b) { steal(); }</script>"
                   "<script/><p>Home <b>today</b>.</p><STYLE>.x{}</STYLE></div>")]))
    html = document_reference("<html><head><style>body{}</style><script>x()</script></head>"
                              "<body><p>Seen.</p></body></html>", content_type="text/html")
    [record, note] = load_records(ndjson(path, *[json.loads(path.read_text()), html]))
    assert record.completion == "Discharge summary\nCourse: Improved.\nHome today."
    assert note.completion == "Seen."


def test_symlink_loop_is_named_not_missing(tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    for path in (tmp_path / "a.jsonl", tmp_path / "a.jsonl" / "notes.ndjson"):
        with pytest.raises(DataError, match=starts(path, ": cannot read (a symbolic link loop")) as err:
            load_records(path)
        assert "ELOOP" in str(err.value)
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="no such file or directory .a symbolic link to nothing"):
        load_records(tmp_path / "dangling.jsonl")


@pytest.mark.parametrize("line, message", [
    ('{"text": ' + "1" * 5000 + "}", "line 1: JSON that cannot be read"),
    ("[" * 100_000 + "]" * 100_000, "line 1: JSON that cannot be read"),
])
def test_jsonl_unreadable_json_names_the_line(tmp_path, line, message):
    path = write_lines(tmp_path / "site.jsonl", [line])
    with pytest.raises(DataError, match=starts(path, ", " + message)):
        load_records(path)


def test_fhir_attachment_with_non_ascii_base64(tmp_path):
    resource = document_reference("x")
    resource["content"][0]["attachment"]["data"] = "aGk=é"
    path = ndjson(tmp_path / "d.ndjson", resource)
    with pytest.raises(DataError, match=starts(path, ", line 1: attachment 'data' is not base64")):
        load_records(path)


# --- split ----------------------------------------------------------------------------------

def make_records(patients=40, notes_each=3):
    return [Record(prompt="", completion=f"note {n} of patient {p}", patient_id=f"p{p}",
                   source=f"site.jsonl:{p * notes_each + n + 1}")
            for p in range(patients) for n in range(notes_each)]


def test_split_is_deterministic_and_independent_of_order():
    records = make_records()
    train, heldout = split_records(records, 0.25, seed=3)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert split_records(shuffled, 0.25, seed=3) == (train, heldout)
    assert sorted(train + heldout, key=lambda r: r.source) == sorted(records, key=lambda r: r.source)
    assert 0 < len(heldout) < len(records)
    assert split_records(records, 0.25, seed=4) != (train, heldout)


def test_split_never_puts_a_patient_on_both_sides():
    train, heldout = split_records(make_records(), 0.3, seed=1)
    assert {r.patient_id for r in train}.isdisjoint({r.patient_id for r in heldout})


def test_split_without_patient_ids_uses_the_text():
    records = [Record("", f"note {i}", None, f"s:{i}") for i in range(50)]
    twin = Record("", "note 7", None, "other:1")
    for seed in range(20):
        train, heldout = split_records([*records, twin], 0.5, seed=seed)
        side = heldout if twin in heldout else train
        assert records[7] in side  # the same text is one unit, on one side
        assert abs(len(heldout) - 0.5 * 51) <= 1  # records without a patient are units of their own


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_holds_out_the_share_asked_for_within_one_patient(fraction):
    """Patients of very different sizes (1 to 60 notes): the held-out share still lands within
    half of one patient's records of the target, for every seed (hashing patients to a side
    held out 5% at one demo hospital and 39% at another)."""
    rng = random.Random(0)
    sizes = [60, 44, 30, *(rng.choice([1, 1, 1, 2, 3, 8]) for _ in range(50))]
    records = [Record("", f"note {n} of patient {p}", f"p{p}", f"site.jsonl:{p}:{n}")
               for p, size in enumerate(sizes) for n in range(size)]
    target, largest = fraction * len(records), max(sizes)
    assert largest > 0.1 * len(records)  # skewed: one patient is over a tenth of the records
    for seed in range(30):
        train, heldout = split_records(records, fraction, seed=seed)
        assert abs(len(heldout) - target) <= largest / 2
        assert {r.patient_id for r in train}.isdisjoint({r.patient_id for r in heldout})
        assert split_records(records[::-1], fraction, seed=seed) == (train, heldout)
    assert split_records(records, fraction, seed=1) != split_records(records, fraction, seed=2)


def test_split_errors_when_a_side_would_be_empty():
    with pytest.raises(ValueError, match="leaves the (training|held-out) split empty"):
        split_records(make_records(patients=1), 0.5, seed=0)
    with pytest.raises(ValueError, match="heldout_fraction must be between 0 and 1"):
        split_records(make_records(), 1.0, seed=0)


# --- encoding pairs for training: what is cut when a pair is too long -----------------------

@pytest.fixture(scope="module")
def tokenizer():
    from privatune.common.base_model import train_tokenizer

    notes = [f"Patient admitted with pneumonia. Heart rate {i}. Plan: antibiotics, review in "
             f"{i % 9} days. Summarise: likely angina." for i in range(200)]
    return train_tokenizer(notes, 320, 128)


def token_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled(dataset, row):
    labels = dataset.tensors[1][row]
    return labels[labels != -100].tolist()


def test_pairs_that_fit_are_encoded_whole(tokenizer):
    from privatune.common.examples import encode_pairs

    prompt, completion = "Summarise: chest pain", "Likely angina."
    dataset = encode_pairs(tokenizer, [(prompt, completion), ("", "Plan: antibiotics")], 64)
    p, c = token_ids(tokenizer, prompt), token_ids(tokenizer, completion)
    bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]
    ids, _, mask = dataset.tensors
    assert ids[0, : mask[0].sum()].tolist() == bos + p + c + eos
    assert labelled(dataset, 0) == c + eos
    assert labelled(dataset, 1) == token_ids(tokenizer, "Plan: antibiotics") + eos
    assert (dataset.skipped, dataset.cut_prompts, dataset.cut_completions) == (0, 0, 0)


def test_a_long_prompt_is_cut_from_its_start_so_the_completion_survives(tokenizer):
    from privatune.common.examples import encode_pairs

    prompt = "Summarise: " + " ".join(f"heart rate {i}." for i in range(400))
    completion = "Likely angina."
    dataset = encode_pairs(tokenizer, [(prompt, completion)], 32)
    ids, _, mask = dataset.tensors
    c = token_ids(tokenizer, completion) + [tokenizer.eos_token_id]
    kept = 32 - 1 - len(c)
    assert mask[0].sum() == 32 and labelled(dataset, 0) == c
    assert ids[0].tolist() == [tokenizer.bos_token_id] + token_ids(tokenizer, prompt)[-kept:] + c
    assert (dataset.skipped, dataset.cut_prompts, dataset.cut_completions) == (0, 1, 0)


def test_a_long_prompt_and_completion_share_the_room(tokenizer):
    from privatune.common.examples import encode_pairs

    prompt = " ".join(f"heart rate {i}." for i in range(300))
    completion = " ".join(f"Plan: antibiotics {i}." for i in range(300))
    dataset = encode_pairs(tokenizer, [(prompt, completion)], 33)  # room for 32 after bos
    ids, _, _ = dataset.tensors
    assert labelled(dataset, 0) == token_ids(tokenizer, completion)[:16]
    assert ids[0, 1:17].tolist() == token_ids(tokenizer, prompt)[-16:]
    assert (dataset.cut_prompts, dataset.cut_completions) == (1, 1)


def test_a_huge_record_is_cut_before_it_is_tokenized(tokenizer):
    from privatune.common.examples import MAX_CHARS_PER_TOKEN, encode_pairs

    seen = []

    class Recording:
        bos_token_id, eos_token_id, pad_token_id = (tokenizer.bos_token_id,
                                                    tokenizer.eos_token_id, tokenizer.pad_token_id)

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    words = " ".join(f"heart rate {i % 97} plan antibiotics" for i in range(650_000))  # 20 M chars
    dataset = encode_pairs(Recording(), [("Summarise: " + words, "Likely angina."), ("", words)], 64)
    assert len(words) > 20_000_000 and max(seen) <= 64 * MAX_CHARS_PER_TOKEN
    completion = token_ids(tokenizer, "Likely angina.") + [tokenizer.eos_token_id]
    assert labelled(dataset, 0) == completion
    kept = 63 - len(completion)  # the same tokens as if the whole text had been tokenized:
    assert dataset.tensors[0][0, 1:1 + kept].tolist() == token_ids(tokenizer, words[-20_000:])[-kept:]
    assert labelled(dataset, 1) == token_ids(tokenizer, words[:20_000])[:63]


class CharTokenizer:
    """One token per character, no special tokens: the smallest tokenizer encode_pairs accepts."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) for c in text]}


def test_a_pair_with_nothing_to_learn_is_counted_and_adds_no_loss():
    from privatune.common.examples import encode_pairs

    dataset = encode_pairs(CharTokenizer(), [("", "a"), ("q", ""), ("", "ab"), ("long prompt", "xy")],
                           4)
    assert len(dataset) == 4  # one row per privacy unit, always
    assert [labelled(dataset, row) for row in range(4)] == [[], [], [ord("a"), ord("b")],
                                                             [ord("x"), ord("y")]]
    assert dataset.tensors[0][3].tolist() == [ord("p"), ord("t"), ord("x"), ord("y")]
    assert (dataset.skipped, dataset.cut_prompts, dataset.cut_completions) == (2, 1, 0)


# --- patient windows: a fresh window of a patient's whole text each time they are drawn -----

class WordTokenizer:
    """Token ``10 + n`` for the word ``wn``; bos 1, eos 2, pad 0: a token's id is its position."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, **kwargs):
        return {"input_ids": [10 + int(word[1:]) for word in text.split()]}


def words(count, first=0):
    return " ".join(f"w{n}" for n in range(first, first + count))


def window_labels(item):
    _, labels, mask = item
    assert labels[mask == 0].eq(-100).all()  # padding is never labelled
    return labels[labels != -100].tolist()


def test_sampled_windows_reach_every_token_of_a_long_patient_text():
    from privatune.common.examples import SampledWindows, tokenize_texts

    texts = tokenize_texts(WordTokenizer(), [words(300), words(5, first=1000)])
    dataset = SampledWindows(texts, max_length=33, seed=7)  # 32 tokens of text after bos
    assert len(dataset) == 2  # one item per patient, however long the text
    sequence = [*range(10, 310), 2]  # the words, then eos
    starts = set()
    for _ in range(3000):
        labels = window_labels(dataset[0])
        start = sequence.index(labels[0])
        assert labels == sequence[start:start + 32]  # a whole window of the text
        starts.add(start)
    assert starts == set(range(len(sequence) - 31))  # so every token was trained on, eos too
    assert window_labels(dataset[1]) == [*range(1010, 1015), 2]  # a short text is whole
    ids, _, mask = dataset[1]
    assert ids.tolist()[:7] == [1, *range(1010, 1015), 2] and mask.sum() == 7


def test_sampled_windows_are_fixed_by_the_seed_whatever_the_order_of_draws():
    from privatune.common.examples import SampledWindows, tokenize_texts

    texts = tokenize_texts(WordTokenizer(), [words(200), words(200, first=500)])

    def draws(seed, order):
        dataset = SampledWindows(texts, 17, seed)
        return {(i, k): window_labels(dataset[i]) for k in range(20) for i in order}

    assert draws(3, [0, 1]) == draws(3, [1, 0])
    assert draws(3, [0, 1]) != draws(4, [0, 1])
    first = draws(3, [0, 1])
    assert len({tuple(first[0, k]) for k in range(20)}) > 10  # each draw is a fresh window


def test_each_patient_is_at_most_one_example_of_a_poisson_batch():
    """Through Opacus' DP data loader (the trainer's): every batch draws a patient once or not at
    all, so a patient still adds at most one clipped gradient to a step."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader

    from privatune.common.examples import SampledWindows, tokenize_texts

    texts = tokenize_texts(WordTokenizer(), [words(40 + 7 * n, first=1000 * n) for n in range(12)])
    dataset = SampledWindows(texts, 9, seed=0)
    loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=4))  # 3 steps a pass
    sizes = []
    for _ in range(20):
        for _, labels, _ in loader:
            patients = [label[label != -100][0].item() // 1000 for label in labels]
            assert len(patients) == len(set(patients))
            sizes.append(len(patients))
    assert len(sizes) == 60 and max(sizes) >= 6 and sum(dataset.draws) > 3 * len(dataset)


def test_consecutive_windows_score_every_token_exactly_once():
    from privatune.common.examples import consecutive_windows, encode_pairs, tokenize_texts

    texts = tokenize_texts(WordTokenizer(), [words(70), words(3, first=500), words(16, first=900)])
    windows = consecutive_windows(texts, 17)
    per_row = [window_labels(windows[row]) for row in range(len(windows))]
    assert [len(labels) for labels in per_row] == [16, 16, 16, 16, 7, 4, 16, 1]
    assert sum(per_row, []) == [*range(10, 80), 2, *range(510, 513), 2, *range(910, 926), 2]
    # a window is encoded as encode_pairs encodes a pair without prompt: one rule
    truncated = encode_pairs(WordTokenizer(), [("", words(70))], 17)
    assert all(torch.equal(a, b[:17]) for a, b in zip(truncated[0], windows[0]))


def _reference_token_losses(logits, labels):
    from privatune.common.examples import IGNORE_INDEX

    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.float()[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape[0], -1)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_next_token_losses_and_gradients_match_cross_entropy(dtype, tolerance):
    """The blockwise loss equals F.cross_entropy on the shifted logits, value and gradient, with
    unlabelled positions at 0; more rows than one block, so block edges are crossed."""
    from privatune.common.examples import IGNORE_INDEX, next_token_losses

    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 70, 4096, generator=generator)).to(dtype)
    labels = torch.randint(0, 4096, (3, 70), generator=generator)
    labels[0, :10] = IGNORE_INDEX
    labels[2, 50:] = IGNORE_INDEX
    weights = torch.randn(3, 69, generator=generator)

    ours = logits.clone().requires_grad_()
    losses = next_token_losses(ours, labels)
    (losses * weights).sum().backward()
    theirs = logits.clone().requires_grad_()
    expected = _reference_token_losses(theirs, labels)
    (expected * weights).sum().backward()

    assert losses.shape == (3, 69) and losses.dtype == torch.float32
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-5)
    assert (losses[2, 49:] == 0).all() and (ours.grad[2, 49:] == 0).all()
    assert ours.grad.dtype == dtype and (ours.grad[:, -1] == 0).all()
    error = (ours.grad.float() - theirs.grad.float()).abs().max()
    assert error <= tolerance * theirs.grad.float().abs().max()


def test_next_token_losses_gradient_is_exact_in_float64():
    from privatune.common.examples import IGNORE_INDEX, next_token_losses

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[1, 2] = IGNORE_INDEX
    assert torch.autograd.gradcheck(lambda x: next_token_losses(x, labels), (logits,))


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (as some bring-your-own bases)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_labelled_logits_skip_the_prompt_and_keep_loss_and_gradients(tiny_model_dir):
    """The head runs only from the batch's first labelled prediction on, and the per-example
    losses and the LoRA gradients are those of the full logits; also for a model whose forward
    has no logits_to_keep."""
    from privatune.common.config import LoraConfig
    from privatune.common.examples import encode_pairs, labelled_logits, per_example_loss
    from privatune.common.lora import attach_seeded_lora, load_base_model

    base, tokenizer = load_base_model(tiny_model_dir)
    model = attach_seeded_lora(base, LoraConfig(4, 8, ("q_proj", "v_proj", "lm_head")), 0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: move it so every LoRA factor gets a gradient
            torch.nn.init.normal_(parameter, std=0.1)
    pairs = [("Patient admitted with pneumonia, heart rate 97, cough for three days.",
              " Likely pneumonia."),
             ("Fever and cough.", " Plan: antibiotics, review in five days, chest film.")]
    input_ids, labels, mask = encode_pairs(tokenizer, pairs, 64).tensors
    first_labelled = int((labels != -100).any(dim=0).nonzero()[0])
    assert first_labelled > 2  # the prompts are there to be skipped

    def losses_and_gradients(forward):
        model.zero_grad()
        per_example = forward()
        per_example.sum().backward()
        return per_example.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.requires_grad}

    full = losses_and_gradients(lambda: per_example_loss(
        model(input_ids=input_ids, attention_mask=mask).logits, labels))
    for runner in (model, _NoLogitsToKeep(model)):
        logits, cut = labelled_logits(runner, input_ids, mask, labels)
        assert logits.shape[1] == labels.shape[1] - (first_labelled - 1) == cut.shape[1]
        kept = losses_and_gradients(lambda: per_example_loss(
            *labelled_logits(runner, input_ids, mask, labels)))
        assert torch.allclose(kept[0], full[0], rtol=1e-5, atol=1e-6)
        for name, gradient in full[1].items():
            assert torch.allclose(kept[1][name], gradient, rtol=1e-4, atol=1e-6), name
