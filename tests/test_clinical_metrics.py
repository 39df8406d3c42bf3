"""Clinical accuracy metrics: hand-written notes with known answers, and real clinosim notes on
which the reference itself, as the completion, must score perfectly."""

from __future__ import annotations

import pytest

from privatune.common.clinical_metrics import (ClinicalScores, Measurement, StatusCheck,
                                               clinical_scores, judge_completion, measurements,
                                               problem_key, repeat_4gram, score_clinical,
                                               status_statements)
from privatune.common.generation import GenerationScores, score_completions, split_at_marker

PROMPT = ("Outpatient Progress note\nSubjective: follow-up of hypertension and diabetes.\n"
          "Objective: BP 165/93 mmHg, HR 93 bpm\nAssessment:")
REFERENCE = ("1. Essential (primary) hypertension: BP 165/93 mmHg — target < 140/90 mmHg — poorly "
             "controlled; Amlodipine continue.\n"
             "2. Type 2 diabetes mellitus without complications: HbA1c 8.8% — target < 7.0% — poorly "
             "controlled, Metformin continue.\n"
             "3. Obesity, unspecified: today's measurements (BP 165/93 mmHg, HR 93 /min, ALT 76.0 U/L) "
             "not condition-specific; defer Obesity, unspecified focused review to next visit.\n"
             "Plan: Continue current medications: Amlodipine, Metformin")


def test_measurements_are_parsed_as_the_notes_write_them():
    text = ("BP 142/79 mmHg, HR 96/min, T 37.6°C, SpO2 94% (RA), RR 13/min. HbA1c 11.5 %, "
            "Cr 0.88 mg/dL, PT-INR 1.3 [H], troponin I 0.641 ng/mL; fever 38.2°C")
    assert measurements(text) == [
        Measurement("BP", (142.0, 79.0)), Measurement("HR", (96.0,)),
        Measurement("temperature", (37.6,)), Measurement("SpO2", (94.0,)), Measurement("RR", (13.0,)),
        Measurement("HbA1c", (11.5,)), Measurement("creatinine", (0.88,)),
        Measurement("PT-INR", (1.3,)), Measurement("troponin I", (0.641,)),
        Measurement("temperature", (38.2,))]
    # aliases and units do not matter; targets, drugs and list numbers are no measurements
    assert measurements("HR 93 bpm") == measurements("HR 93 /min")
    assert measurements("creatinine 0.95 mg/dL") == [Measurement("creatinine", (0.95,))]
    assert measurements("ALT 76.0 U/L") == measurements("ALT 76 U/L")
    assert measurements("target < 140/90 mmHg; target < 7.0%; Vitamin K 10mg; Amlodipine 5mg; "
                        "Type 2 diabetes; 3. Obesity; Labs: HbA1c, PT-INR, K.") == []


def test_a_completion_with_the_prompts_bp_is_right():
    judgement = judge_completion(PROMPT, REFERENCE, REFERENCE)
    # BP and HR are checked (each once, however often repeated); HbA1c and ALT are not in the prompt
    assert (judgement.measurements_checked, judgement.measurements_right) == (2, 2)
    assert judgement.measurement_fidelity == 1.0
    assert judgement.status_accuracy == 1.0 and judgement.derivable_status_accuracy == 1.0


def test_an_invented_bp_is_wrong():
    completion = ("1. Essential (primary) hypertension: BP 150/80 mmHg — target < 140/90 mmHg — poorly "
                  "controlled; today's measurements (BP 150/80 mmHg, HR 93 /min, ALT 12.0 U/L)")
    judgement = judge_completion(PROMPT, REFERENCE, completion)
    assert (judgement.measurements_checked, judgement.measurements_right) == (2, 1)  # HR right
    assert judgement.measurement_fidelity == 0.5


def test_any_of_the_prompts_values_of_a_kind_is_right():
    prompt = "On admission: HR 110 bpm. At discharge: HR 80 bpm.\nAssessment:"
    assert judge_completion(prompt, "", "HR 80 /min").measurement_fidelity == 1.0
    assert judge_completion(prompt, "", "HR 81 /min").measurement_fidelity == 0.0


def test_statuses_are_matched_by_problem_name_not_list_number():
    completion = ("1. Type 2 diabetes mellitus without complications: HbA1c 7.9% — target < 7.0% — "
                  "poorly controlled, Metformin continue.\n"
                  "2. Essential hypertension: BP 165/93 mmHg — target < 140/90 mmHg — at goal.")
    judgement = judge_completion(PROMPT, REFERENCE, completion)
    assert judgement.statuses == (
        StatusCheck("Essential (primary) hypertension", "poorly controlled", "at goal", derivable=True),
        StatusCheck("Type 2 diabetes mellitus without complications", "poorly controlled",
                    "poorly controlled", derivable=False))  # HbA1c is not in the prompt
    assert judgement.status_accuracy == 0.5
    assert judgement.derivable_status_accuracy == 0.0


def test_a_missing_status_is_wrong_and_items_on_one_line_still_separate():
    completion = ("1. Essential (primary) hypertension: BP 165/93 mmHg — target < 140/90 mmHg — poorly "
                  "controlled; Amlodipine continue. 2. Obesity: defer review.")
    judgement = judge_completion(PROMPT, REFERENCE, completion)
    assert [check.completion for check in judgement.statuses] == ["poorly controlled", None]
    assert judgement.status_accuracy == 0.5 and judgement.derivable_status_accuracy == 1.0


def test_status_vocabulary_and_what_each_status_rests_on():
    text = ("1. Essential (primary) hypertension: BP 133/85 mmHg — target < 140/90 mmHg — high-normal, "
            "consider titration; Amlodipine continue.\n"
            "2. Atrial fibrillation and flutter: PT-INR 1.2 — target 2.0-3.0 — subtherapeutic — "
            "thrombotic risk, Apixaban continue.\n"
            "3. Disorders of lipoprotein metabolism and other lipidemias: LDL 185.0 mg/dL — target < "
            "120 mg/dL (primary prevention) — high LDL, statin under-response; Atorvastatin continue.\n"
            "4. Type 2 diabetes mellitus without complications: HbA1c 6.8% — target < 7.0% — near "
            "target, glucose 140.0 mg/dL, Metformin continue.\n"
            "5. Essential hypertension: at goal.\n"  # a repeat: the first statement counts
            "Plan: Continue current medications: Amlodipine")
    found = {key: (s.status, s.basis) for key, s in status_statements(text).items()}
    assert found == {"essential hypertension": ("high-normal", "BP"),
                     "atrial fibrillation and flutter": ("subtherapeutic", "PT-INR"),
                     "disorders of lipoprotein metabolism and other lipidemias": ("high LDL", "LDL"),
                     "type 2 diabetes mellitus without complications": ("near target", "HbA1c")}
    assert problem_key("Obesity, unspecified") == problem_key("OBESITY") == "obesity"
    assert problem_key("Essential (primary) hypertension") == "essential hypertension"


def test_a_loop_shows_as_repeated_4grams():
    loop = "1. Obesity: defer review. " * 10  # 70 words and marks, 67 4-grams, 7 distinct
    assert repeat_4gram(loop) == pytest.approx(1 - 7 / 67)
    assert repeat_4gram("Essential hypertension at goal; Amlodipine continue.") == 0.0
    assert repeat_4gram("too short") == 0.0
    assert repeat_4gram("0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.") > 0.8  # a loop without spaces
    judgement = judge_completion(PROMPT, REFERENCE, loop)
    assert judgement.repeat_4gram == pytest.approx(1 - 7 / 67)
    assert judgement.measurements_checked == 0 and judgement.status_accuracy == 0.0


def test_a_note_with_nothing_checkable_scores_none():
    prompt = "Emergency medicine Note\nChief complaint: Abdominal pain, nausea\nAssessment:"
    reference = "Encounter reason: Abdominal pain, nausea\nDisposition: Discharged home"
    judgement = judge_completion(prompt, reference, "Encounter reason: gastroenteritis, BP 120/80")
    assert judgement.measurement_fidelity is None  # the prompt gives no BP to check it against
    assert judgement.status_accuracy is None and judgement.derivable_status_accuracy is None
    scores = clinical_scores([judgement])
    assert scores == ClinicalScores(None, 0, None, 0, None, None, 0, None, 0.0, 1)
    assert clinical_scores([]).repeat_4gram is None


def test_scores_pool_checks_over_notes_with_majority_shares():
    wrong = "1. Essential hypertension: BP 120/80 mmHg — at goal"
    scores = clinical_scores([judge_completion(PROMPT, REFERENCE, REFERENCE),
                              judge_completion(PROMPT, REFERENCE, wrong)])
    assert scores.measurement_fidelity == pytest.approx(2 / 3) and scores.measurements_checked == 3
    assert scores.status_accuracy == 0.5 and scores.statuses_checked == 4
    assert scores.status_majority_share == 1.0  # every reference status is "poorly controlled"
    assert scores.derivable_status_accuracy == 0.5 and scores.derivable_statuses_checked == 2
    assert scores.derivable_status_majority_share == 1.0
    assert score_clinical([PROMPT] * 2, [REFERENCE] * 2, [REFERENCE, wrong]) == scores
    with pytest.raises(ValueError):
        score_clinical([PROMPT], [REFERENCE], [])


def test_generation_scores_carry_the_clinical_scores():
    scores = score_completions([REFERENCE], [REFERENCE], [PROMPT])
    assert scores.clinical == score_clinical([PROMPT], [REFERENCE], [REFERENCE])
    assert GenerationScores.from_json(scores.to_json()) == scores
    plain = score_completions([REFERENCE], [REFERENCE])  # callers without prompts: as before
    assert plain.clinical is None and "measurement_fidelity" not in plain.to_json()
    assert GenerationScores.from_json(plain.to_json()) == plain
    # keyed next to rouge_l; a report written before, with them nested, still reads
    assert scores.to_json()["measurement_fidelity"] == scores.clinical.measurement_fidelity
    nested = {**plain.to_json(), "clinical": scores.clinical.to_json()}
    assert GenerationScores.from_json(nested).clinical == scores.clinical


# Real clinosim notes (hospital-1 of default_hospitals(1, 0, 120)), verbatim.
CLINOSIM_NOTES = (
    "Outpatient Progress note\nSubjective: 57-year-old male patient presenting for Diabetic retinopathy "
    "screening, fundoscopy. Follow-up of chronic conditions: Essential (primary) hypertension, Type 2 "
    "diabetes mellitus without complications, Hyperlipidemia, unspecified.\nObjective: BP 131/88 mmHg, "
    "HR 77 bpm\nAssessment: 1. Essential (primary) hypertension: BP 131/88 mmHg — target < 140/90 mmHg "
    "— high-normal, consider titration; Amlodipine continue.\n2. Type 2 diabetes mellitus without "
    "complications: HbA1c 8.8% — target < 7.0% — poorly controlled, Metformin continue.\n3. Disorders of "
    "lipoprotein metabolism and other lipidemias: today's measurements (BP 131/88 mmHg, HR 77 /min, ALT "
    "58.0 U/L, AST 79.0 U/L) not condition-specific; defer Disorders of lipoprotein metabolism and other "
    "lipidemias focused review to next visit.\n4. Obesity, unspecified: today's measurements (BP 131/88 "
    "mmHg, HR 77 /min, ALT 58.0 U/L, AST 79.0 U/L) not condition-specific; defer Obesity, unspecified "
    "focused review to next visit.\nPlan: Continue current medications: Amlodipine, Candesartan, "
    "Metformin, Atorvastatin\nNext visit: in 30 days (planned).",
    "Outpatient Progress note\nSubjective: 62-year-old female patient presenting for Anticoagulation "
    "management, INR check. Follow-up of chronic conditions: Unspecified atrial fibrillation, "
    "Overweight.\nObjective: BP 123/67 mmHg, HR 95 bpm\nAssessment: 1. Atrial fibrillation and flutter: "
    "PT-INR 2.4 — target 2.0-3.0 — within therapeutic range, Warfarin continue.\n2. Overweight: today's "
    "measurements (BP 123/67 mmHg, HR 95 /min, PT-INR 2.4) not condition-specific; defer Overweight "
    "focused review to next visit.\nPlan: Continue current medications: Warfarin\nToday's prescription: "
    "Warfarin 3mg\nNext visit: in 60 days (planned).",
    "Outpatient Progress note\nSubjective: 42-year-old female patient presenting for COPD management, "
    "pulmonary function review. Follow-up of chronic conditions: Chronic obstructive pulmonary disease, "
    "unspecified.\nObjective: BP 103/75 mmHg, HR 81 bpm, RR 22 /min, SpO2 94%\nAssessment: 1. Other "
    "chronic obstructive pulmonary disease: SpO2 94%, Tiotropium inhalation continue; CAT / mMRC symptom "
    "review.\n2. Hypoxemia: SpO2 94%, oxygenation review needed.\nPlan: Continue current medications: "
    "Tiotropium, Salbutamol\nToday's prescription: Tiotropium 18mcg\nNext visit: in 60 days (planned).",
    "Emergency medicine Note\nChief complaint: Palpitations, dyspnea, chest tightness, anxiety\nHistory "
    "of present illness: Onset 3 day(s) ago: Palpitations, dyspnea, chest tightness, anxiety, "
    "progressively worsening.\nTriage details: Triage level: ESI Level 3. Arrival mode: walk-in.\n"
    "Physical exam: Alert and oriented, in visible distress\nED workup: Labs: troponin, glucose. "
    "Imaging: chest X-ray. Medications: Lorazepam 0.5mg. Abnormal: glucose 100.0 mg/dL [H]\nAssessment: "
    "Encounter reason: Palpitations, dyspnea, chest tightness, anxiety\nDisposition: Discharged home "
    "(ESI level 3, Palpitations, dyspnea, chest tightness, anxiety)",
)


def test_the_reference_itself_scores_perfectly_on_real_clinosim_notes():
    tasks = [split_at_marker(note).task for note in CLINOSIM_NOTES]
    judgements = [judge_completion(t.prompt, t.reference, t.reference) for t in tasks]
    for judgement in judgements:
        assert judgement.measurement_fidelity in (1.0, None)
        assert judgement.status_accuracy in (1.0, None)
    scores = clinical_scores(judgements)
    # BP and HR of the first two notes, SpO2 of the third; the ED reference states none
    assert (scores.measurement_fidelity, scores.measurements_checked) == (1.0, 5)
    # hypertension (from the prompt's BP), diabetes (HbA1c) and atrial fibrillation (PT-INR)
    assert (scores.status_accuracy, scores.statuses_checked) == (1.0, 3)
    assert (scores.derivable_status_accuracy, scores.derivable_statuses_checked) == (1.0, 1)
    assert scores.status_majority_share == pytest.approx(1 / 3)
