"""Clinical accuracy of generated note completions, beside ROUGE-L.

ROUGE-L rewards a completion for the reference's wording; it barely notices a wrong number or a
wrong verdict, which is what matters in a note. These metrics judge each (prompt, reference,
completion) triple of the generation task (a note split at ``Assessment:``) on what the
completion asserts:

* measurement fidelity: the measurements the completion states that the prompt also gives (BP,
  HR, RR, SpO2, temperature, and labs such as HbA1c, Cr, glucose, ALT/AST) carry the prompt's
  value. A measurement the prompt does not give cannot be checked from the note and is left
  out.
* status accuracy: every problem for which the reference states a control status ("poorly
  controlled", "at goal", ...) gets the same status in the completion, the problem matched by
  name (the list number is free). ``derivable`` statuses are those that follow from a
  measurement the prompt gives (in clinosim's notes hypertension from the prompt's BP); the
  others rest on results only the reference shows (HbA1c, LDL, PT-INR), which a model can
  only guess. Each comes with its majority share: the accuracy of always answering the most
  common status.
* repeated 4-grams: the share of a completion's word 4-grams that repeat an earlier one, so
  degenerate loops show.

The vocabulary is clinosim's (English): its notes' measurement names, and the control statuses
of its outpatient assessment (``control_status`` in its narrative phrase table: blood pressure,
HbA1c, LDL and INR verdicts). Pure Python, so sites and the coordinator can score without a
model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Measurement names as the notes write them -> the kind they measure (aliases share a kind).
_MEASUREMENT_KINDS: dict[str, str] = {
    "hr": "HR", "heart rate": "HR", "pulse": "HR",
    "rr": "RR", "respiratory rate": "RR",
    "spo2": "SpO2",
    "hba1c": "HbA1c",
    "cr": "creatinine", "creatinine": "creatinine",
    "egfr": "eGFR", "bun": "BUN",
    "glucose": "glucose",
    "alt": "ALT", "ast": "AST", "total bilirubin": "total bilirubin", "albumin": "albumin",
    "tsh": "TSH",
    "ldl": "LDL", "hdl": "HDL", "tc": "TC", "tg": "TG",
    "pt-inr": "PT-INR", "inr": "PT-INR",
    "na": "Na", "k": "K", "ca": "Ca", "hco3": "HCO3",
    "crp": "CRP", "pct": "PCT", "wbc": "WBC", "hb": "Hb", "plt": "Plt",
    "bnp": "BNP", "troponin i": "troponin I", "lactate": "lactate",
    "pao2": "PaO2", "paco2": "PaCO2", "ph": "pH",
}
_NUMBER = r"\d+(?:\.\d+)?"
_NAMES = "|".join(re.escape(name) for name in sorted(_MEASUREMENT_KINDS, key=len, reverse=True))
# One scan, left to right: a blood pressure, a temperature (any number in °C, e.g. "T 37.6°C",
# "fever 38.2°C"), or a named value ("HR 93 bpm", "HbA1c 11.5 %", "PT-INR 1.3"). A name must
# stand alone ("Hb" is not the start of "HbA1c"); "Vitamin K 10mg" is a drug, not potassium.
_MEASUREMENT = re.compile(
    rf"(?<![\w-])(?:BP|blood pressure)\s*:?\s*(?P<systolic>\d{{2,3}})\s*/\s*(?P<diastolic>\d{{2,3}})"
    rf"|(?P<temperature>{_NUMBER})\s*°\s*C\b"
    rf"|(?<![\w-])(?<!vitamin )(?P<name>{_NAMES})(?![\w-])\s*:?\s*(?P<value>{_NUMBER})",
    re.IGNORECASE)

# The control statuses clinosim writes (surface form -> status); the first one in an item is
# its status. "high-normal, consider titration" is reported as "high-normal", and so on.
_STATUSES: tuple[tuple[str, str], ...] = (
    ("poorly controlled", r"poorly[ -]controlled"),
    ("high-normal", r"high[ -]normal"),
    ("at goal", r"at goal"),
    ("near target", r"near target"),
    ("high LDL", r"high LDL"),
    ("borderline", r"borderline"),
    ("elevated", r"elevated"),
    ("within therapeutic range", r"within (?:the )?therapeutic range"),
    ("subtherapeutic", r"sub-?therapeutic"),
    ("supratherapeutic", r"supra-?therapeutic"),
)
_STATUS = re.compile("|".join(rf"\b({pattern})\b" for _, pattern in _STATUSES), re.IGNORECASE)
# A problem list item starts a line or follows whitespace as "N. " (so items a model runs
# together on one line still separate), and reads "<problem name>: <body>".
_ITEM_BREAK = re.compile(r"\n|\s(?=\d{1,2}\.\s)")
_ITEM = re.compile(r"^\s*(?:\d{1,2}\.\s*)?(?P<name>[^:]+?)\s*:\s*(?P<body>.+)$", re.DOTALL)


@dataclass(frozen=True)
class Measurement:
    """A stated measurement: its kind ("BP", "HR", "creatinine", ...) and its value (BP as
    (systolic, diastolic)), so 76.0 and 76, or "HR 93 bpm" and "HR 93 /min", are the same."""

    kind: str
    value: tuple[float, ...]


def measurements(text: str) -> list[Measurement]:
    """Every measurement ``text`` states, in order."""
    found: list[Measurement] = []
    for match in _MEASUREMENT.finditer(text):
        if match["systolic"]:
            found.append(Measurement("BP", (float(match["systolic"]), float(match["diastolic"]))))
        elif match["temperature"]:
            found.append(Measurement("temperature", (float(match["temperature"]),)))
        else:
            found.append(Measurement(_MEASUREMENT_KINDS[match["name"].lower()], (float(match["value"]),)))
    return found


def problem_key(name: str) -> str:
    """A problem name as matched between reference and completion: case, punctuation,
    parenthesised qualifiers and "unspecified" do not count ("Essential (primary)
    hypertension" is "essential hypertension")."""
    name = re.sub(r"\([^)]*\)", " ", name.casefold())
    words = re.sub(r"[^\w]+", " ", name).split()
    return " ".join(word for word in words if word != "unspecified")


@dataclass(frozen=True)
class StatusStatement:
    """A problem's control status as a text states it, and the kind of measurement stated just
    before it (what the status rests on: BP for hypertension), if any."""

    problem: str  # as written
    status: str  # one of the statuses above, e.g. "poorly controlled"
    basis: str | None  # a Measurement kind


def status_statements(text: str) -> dict[str, StatusStatement]:
    """The control status of each problem ``text`` states one for, by ``problem_key``; where a
    problem is stated twice (a loop), its first statement counts."""
    statements: dict[str, StatusStatement] = {}
    for chunk in _ITEM_BREAK.split(text):
        item = _ITEM.match(chunk)
        if item is None:
            continue
        body = item["body"]
        found = _STATUS.search(body)
        key = problem_key(item["name"])
        if found is None or not key or key in statements:
            continue
        status = next(name for (name, _), said in zip(_STATUSES, found.groups()) if said)
        before = measurements(body[:found.start()])
        statements[key] = StatusStatement(item["name"].strip(), status,
                                          before[-1].kind if before else None)
    return statements


_TOKEN = re.compile(r"\w+|[^\w\s]")  # words and punctuation marks: "0.0.0.0" is a loop too


def repeat_4gram(text: str) -> float:
    """1 - distinct/total 4-grams of words and punctuation marks: 0 for text without repeats
    (or under 4 tokens), near 1 for a loop, spaced ("review. review.") or not ("0.0.0.0")."""
    words = _TOKEN.findall(text)
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class StatusCheck:
    """One reference status and what the completion said for the same problem (None: nothing)."""

    problem: str
    reference: str
    completion: str | None
    derivable: bool  # the status follows from a measurement the prompt gives

    @property
    def correct(self) -> bool:
        return self.completion == self.reference


@dataclass(frozen=True)
class ClinicalJudgement:
    """What one completion got right: the distinct measurements it states that the prompt also
    gives (a value repeated by a loop counts once), and the reference's statuses."""

    measurements_checked: int
    measurements_right: int
    statuses: tuple[StatusCheck, ...]
    repeat_4gram: float

    @property
    def measurement_fidelity(self) -> float | None:
        return self.measurements_right / self.measurements_checked if self.measurements_checked else None

    @property
    def status_accuracy(self) -> float | None:
        return _share_correct(self.statuses)

    @property
    def derivable_status_accuracy(self) -> float | None:
        return _share_correct([s for s in self.statuses if s.derivable])


def judge_completion(prompt: str, reference: str, completion: str) -> ClinicalJudgement:
    """Judge one completion of ``prompt`` against the prompt's measurements and the
    reference's statuses. Where the prompt states a kind more than once (admission and
    discharge vitals), any of its values counts as right."""
    given: dict[str, set[tuple[float, ...]]] = {}
    for measurement in measurements(prompt):
        given.setdefault(measurement.kind, set()).add(measurement.value)
    checked = [m for m in set(measurements(completion)) if m.kind in given]
    stated = status_statements(completion)
    statuses = []
    for key, expected in status_statements(reference).items():
        said = stated.get(key)
        statuses.append(StatusCheck(expected.problem, expected.status,
                                    said.status if said else None,
                                    derivable=expected.basis in given))
    return ClinicalJudgement(measurements_checked=len(checked),
                             measurements_right=sum(m.value in given[m.kind] for m in checked),
                             statuses=tuple(statuses), repeat_4gram=repeat_4gram(completion))


@dataclass(frozen=True)
class ClinicalScores:
    """Clinical accuracy over many completions. Fidelity and accuracies pool every check over
    all notes (so the counts are their denominators); None where nothing was checkable. The
    majority shares are the accuracies of always answering the most common reference status,
    the baseline an accuracy has to beat. The counts are None where a site withholds them with
    its example counts (``release.example_count``): they tell how many notes it holds."""

    measurement_fidelity: float | None
    measurements_checked: int | None
    status_accuracy: float | None
    statuses_checked: int | None
    status_majority_share: float | None
    derivable_status_accuracy: float | None
    derivable_statuses_checked: int | None
    derivable_status_majority_share: float | None
    repeat_4gram: float | None  # mean over completions
    completions: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClinicalScores:
        def number(name: str) -> float | None:
            return None if data.get(name) is None else float(data[name])

        def count(name: str) -> int | None:
            return None if data.get(name) is None else int(data[name])

        return cls(measurement_fidelity=number("measurement_fidelity"),
                   measurements_checked=count("measurements_checked"),
                   status_accuracy=number("status_accuracy"),
                   statuses_checked=count("statuses_checked"),
                   status_majority_share=number("status_majority_share"),
                   derivable_status_accuracy=number("derivable_status_accuracy"),
                   derivable_statuses_checked=count("derivable_statuses_checked"),
                   derivable_status_majority_share=number("derivable_status_majority_share"),
                   repeat_4gram=number("repeat_4gram"), completions=count("completions"))


def clinical_scores(judgements: Iterable[ClinicalJudgement]) -> ClinicalScores:
    """The judgements of many completions, pooled."""
    judgements = list(judgements)
    checked = sum(j.measurements_checked for j in judgements)
    statuses = [s for j in judgements for s in j.statuses]
    derivable = [s for s in statuses if s.derivable]
    return ClinicalScores(
        measurement_fidelity=sum(j.measurements_right for j in judgements) / checked if checked else None,
        measurements_checked=checked,
        status_accuracy=_share_correct(statuses), statuses_checked=len(statuses),
        status_majority_share=_majority_share(statuses),
        derivable_status_accuracy=_share_correct(derivable), derivable_statuses_checked=len(derivable),
        derivable_status_majority_share=_majority_share(derivable),
        repeat_4gram=sum(j.repeat_4gram for j in judgements) / len(judgements) if judgements else None,
        completions=len(judgements))


def score_clinical(prompts: Sequence[str], references: Sequence[str],
                   completions: Sequence[str]) -> ClinicalScores:
    """Judge every (prompt, reference, completion) triple and pool the judgements."""
    if not len(prompts) == len(references) == len(completions):
        raise ValueError(f"{len(prompts)} prompts, {len(references)} references and "
                         f"{len(completions)} completions")
    return clinical_scores(judge_completion(p, r, c) for p, r, c in zip(prompts, references, completions))


def _share_correct(checks: Sequence[StatusCheck]) -> float | None:
    return sum(c.correct for c in checks) / len(checks) if checks else None


def _majority_share(checks: Sequence[StatusCheck]) -> float | None:
    if not checks:
        return None
    return Counter(c.reference for c in checks).most_common(1)[0][1] / len(checks)
