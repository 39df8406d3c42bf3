"""The model as a generative model: the task cut from a note, greedy decoding, the libraries'
scores, and what a site releases of them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.config import ConfigError, load_job_config
from privatune.common.generation import (NO_MARKER, NOTHING_AFTER, NOTHING_BEFORE, GenerationTask,
                                         generate_completions, generation_tasks, is_generation_round,
                                         judged_pairs, score_completions, split_at_marker)
from privatune.common.ledger import SiteLedger
from privatune.common.ledger_records import NON_PRIVATE
from privatune.common.config import LoraConfig
from privatune.common.lora import attach_seeded_lora, initial_adapter, load_base_model, lora_state
from privatune.common.protocol import EvaluateReply, EvaluateRequest
from privatune.server.coordinator import site_generation_scores

NOTE = ("Subjective: 70-year-old with cough.\nObjective: T 38.9 C, HR 104.\n"
        "Assessment: 1. Pneumonia.\nPlan: start antibiotics.")
LORA = LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))


# ------------------------------------------------------------------------------ the task


def test_note_is_split_at_the_marker_which_ends_the_prompt():
    split = split_at_marker(NOTE)
    assert split.task == GenerationTask(
        prompt="Subjective: 70-year-old with cough.\nObjective: T 38.9 C, HR 104.\nAssessment:",
        reference="1. Pneumonia.\nPlan: start antibiotics.")
    # only the first occurrence splits; the rest stays in the reference
    twice = split_at_marker("History. Assessment: a. Assessment: b.")
    assert twice.task == GenerationTask("History. Assessment:", "a. Assessment: b.")


@pytest.mark.parametrize("text, reason", [
    ("Subjective: cough.\nObjective: T 38.9 C.\nPlan: rest.", NO_MARKER),  # absent
    ("Assessment: pneumonia. Plan: antibiotics.", NOTHING_BEFORE),  # at the very start
    ("  \n Assessment: pneumonia.", NOTHING_BEFORE),  # only whitespace before it
    ("Subjective: cough. Assessment:   \n", NOTHING_AFTER),  # nothing to predict
    ("Subjective: cough. assessment: pneumonia.", NO_MARKER),  # the marker is case-sensitive
])
def test_note_without_a_usable_marker_is_skipped_with_its_reason(text, reason):
    split = split_at_marker(text)
    assert split.task is None and split.skipped == reason


def test_records_become_tasks_and_the_skipped_are_counted():
    pairs = [("", NOTE),  # a note: split
             ("Summarise: chest pain.", " Likely angina. "),  # prompt + completion: as given
             ("", "Discharge summary without any heading."),  # no marker
             ("", "Assessment: only an assessment."),  # marker at the start
             ("Question?", "   ")]  # a prompt with nothing to predict
    tasks = generation_tasks(pairs, "Assessment:")
    assert tasks.tasks == [split_at_marker(NOTE).task,
                           GenerationTask("Summarise: chest pain.", "Likely angina.")]
    assert tasks.skipped == {NO_MARKER: 1, NOTHING_BEFORE: 1, NOTHING_AFTER: 1}
    assert tasks.records == 5
    assert tasks.describe() == ("2 of 5 records; skipped 1 without the marker, 1 with nothing "
                                "before the marker, 1 with nothing after the marker")
    other = generation_tasks([("", "Findings: x. Impression: y.")], "Impression:")
    assert other.tasks == [GenerationTask("Findings: x. Impression:", "y.")]


def test_generation_rounds_are_round_0_every_kth_and_the_last():
    assert [r for r in range(8) if is_generation_round(r, 7, 3)] == [0, 3, 6, 7]
    assert [r for r in range(4) if is_generation_round(r, 3, 1)] == [0, 1, 2, 3]
    assert not any(is_generation_round(r, 3, 0) for r in range(4))


# ------------------------------------------------------------------------------ the scores


def test_scores_come_from_the_libraries_on_hand_checkable_pairs():
    same = score_completions(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same.rouge_l == pytest.approx(1.0)
    assert same.bleu == pytest.approx(100.0) and same.chrf == pytest.approx(100.0)
    assert same.examples == 1
    # longest common subsequence 6 of 6 predicted and 7 reference words: F1 = 2*1*(6/7)/(1+6/7)
    shorter = score_completions(["the cat sat on the mat"], ["the cat sat on the mat today"])
    assert shorter.rouge_l == pytest.approx(12 / 13)
    nothing = score_completions([""], ["the cat sat on the mat"])
    assert nothing.rouge_l == 0.0 and nothing.bleu == 0.0 and nothing.chrf == 0.0
    # ROUGE-L is the mean over examples
    mixed = score_completions(["the cat sat on the mat", ""], ["the cat sat on the mat"] * 2)
    assert mixed.rouge_l == pytest.approx(0.5) and mixed.examples == 2
    with pytest.raises(ValueError, match="no completions"):
        score_completions([], [])


def test_greedy_completions_fit_the_length_and_leave_the_model_as_it_was(tiny_model_dir):
    base, tokenizer = load_base_model(tiny_model_dir)
    model = attach_seeded_lora(base, LORA, seed=0)
    model.train()
    long_prompt = "History of cough and fever. " * 400 + "Assessment:"
    prompts = [long_prompt, "Patient admitted with asthma. Assessment:"]
    calls = []
    original = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        assert not torch.is_grad_enabled() and not model.training
        return original(**kwargs)

    model.generate = spy  # type: ignore[method-assign]
    first = generate_completions(model, tokenizer, prompts, max_length=48, max_new_tokens=8)
    assert model.training  # restored
    assert len(first.texts) == 2 and all(isinstance(text, str) for text in first.texts)
    assert 0 <= first.cut_off <= 2
    ids = calls[0]["input_ids"]
    # the prompt is cut from its start to max_length - max_new_tokens (bos included)
    assert ids.shape[1] == 48 - 8
    assert calls[0]["generation_config"].max_new_tokens == 8
    assert calls[0]["generation_config"].do_sample is False
    # greedy: the same text again, one prompt at a time or batched
    assert generate_completions(model, tokenizer, prompts, 48, 8, batch_size=1) == first
    with pytest.raises(ValueError, match="no room for a prompt"):
        generate_completions(model, tokenizer, prompts, max_length=48, max_new_tokens=47)


def test_completions_that_use_every_new_token_without_an_end_are_counted_cut_off(tiny_model_dir):
    base, tokenizer = load_base_model(tiny_model_dir)
    eos, pad, word = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.encode("a")[-1]
    new_tokens: list[list[int]] = []

    def generate(input_ids, **_kwargs):  # the prompt, then the given new tokens
        return torch.cat([input_ids, torch.tensor(new_tokens)], dim=1)

    base.generate = generate  # type: ignore[method-assign]
    # all 4 new tokens and no end of text: cut off; an end at the last token: not
    new_tokens[:] = [[word] * 4, [word, eos, pad, pad], [word, word, word, eos]]
    assert generate_completions(base, tokenizer, ["x"] * 3, 48, 4).cut_off == 1
    # a batch shorter than max_new_tokens: every row ended
    new_tokens[:] = [[word, eos]]
    assert generate_completions(base, tokenizer, ["x"], 48, 4).cut_off == 0


# ------------------------------------------------------------------------- at a site


def evaluate_request(generation: bool = True, max_examples: int = 5) -> EvaluateRequest:
    return EvaluateRequest(run_id="run-1", round=1, max_length=48, batch_size=8, lora_r=LORA.r,
                           lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj",
                           generation=generation, marker="Assessment:", max_new_tokens=6,
                           max_examples=max_examples)


def with_release(policy_path, **release):
    """The policy's release section; these small sites allow metrics over 3 held-out notes."""
    policy = yaml.safe_load(policy_path.read_text())
    policy["release"] = {"min_records": 3, **release}
    policy_path.write_text(yaml.safe_dump(policy))
    return policy_path


# the clinical scores a site releases: shares (of checks) and the counts of checks pooled
SHARES = ("measurement_fidelity", "status_accuracy", "status_majority_share",
          "derivable_status_accuracy", "derivable_status_majority_share", "repeat_4gram")
CHECK_COUNTS = ("measurements_checked", "statuses_checked", "derivable_statuses_checked")


def metric_entries(node: SiteNode) -> list[dict]:
    return [e for e in SiteLedger(node.policy.ledger_path).entries
            if e["kind"] == NON_PRIVATE and e["release"] == "evaluate_metrics"]


def test_site_releases_its_generation_scores_as_a_non_private_release(make_site, tiny_model_dir):
    node = SiteNode(load_site_policy(with_release(make_site(records=60))))
    state = lora_state(initial_adapter(tiny_model_dir, LORA, seed=0))
    reply = node.evaluate(evaluate_request(max_examples=5), state)
    assert reply.generation_examples == 5  # the first 5 held-out notes (all have the marker)
    assert all(isinstance(v, float) for v in (reply.rouge_l, reply.bleu, reply.chrf))
    # the clinical scores of the same completions, each share in 0..1, and their counts
    assert 0.0 <= reply.repeat_4gram <= 1.0
    for share in SHARES:
        assert getattr(reply, share) is None or 0.0 <= getattr(reply, share) <= 1.0, share
    assert all(getattr(reply, count) >= 0 for count in CHECK_COUNTS)
    [entry] = metric_entries(node)
    assert entry["private"] is False
    clinical = {name: getattr(reply, name) for name in SHARES + CHECK_COUNTS}
    assert entry["values"] == {"num_examples": reply.num_examples, "eval_loss": reply.eval_loss,
                               "rouge_l": reply.rouge_l, "bleu": reply.bleu, "chrf": reply.chrf,
                               "generation_examples": 5,
                               **{k: v for k, v in clinical.items() if v is not None}}
    # the coordinator reads them back as the ClinicalScores of the site's 5 completions
    released = site_generation_scores(EvaluateReply.from_record(reply.to_record())).clinical
    assert released.completions == 5 and released.repeat_4gram == reply.repeat_4gram
    assert released.measurements_checked == reply.measurements_checked
    # not asked for: nothing generated, nothing released
    plain = node.evaluate(evaluate_request(generation=False), state)
    assert plain.rouge_l is None and plain.generation_examples is None
    assert "rouge_l" not in metric_entries(node)[-1]["values"]


def test_site_policy_withholds_generation_scores(make_site, tiny_model_dir, monkeypatch):
    node = SiteNode(load_site_policy(with_release(make_site(records=60), generation_scores=False)))
    assert node.policy.release.generation_scores is False
    import privatune.client.node as node_module

    def never(*_args, **_kwargs):
        raise AssertionError("a withheld score is never even computed")

    monkeypatch.setattr(node_module, "evaluate_generation", never)
    state = lora_state(initial_adapter(tiny_model_dir, LORA, seed=0))
    reply = node.evaluate(evaluate_request(), state)
    assert reply.rouge_l is None and reply.bleu is None and reply.chrf is None
    assert reply.generation_examples is None
    assert not ({"rouge_l", "bleu", "chrf", "generation_examples", *SHARES, *CHECK_COUNTS}
                & set(reply.to_record()["metrics"]))
    [entry] = metric_entries(node)
    assert set(entry["values"]) == {"num_examples", "eval_loss"}


def test_withheld_example_count_also_withholds_the_generation_count(make_site, tiny_model_dir):
    node = SiteNode(load_site_policy(with_release(make_site(records=60), example_count=False)))
    state = lora_state(initial_adapter(tiny_model_dir, LORA, seed=0))
    reply = node.evaluate(evaluate_request(max_examples=3), state)
    assert reply.rouge_l is not None and reply.generation_examples is None
    # the clinical checks pooled are counts too: withheld, their shares released
    assert reply.repeat_4gram is not None
    assert all(getattr(reply, count) is None for count in CHECK_COUNTS)
    assert not {"generation_examples", *CHECK_COUNTS} & set(metric_entries(node)[0]["values"])
    released = site_generation_scores(reply)
    assert released.examples is None and released.clinical.completions is None


# --------------------------------------------------------------------- request and config


def test_evaluate_request_carries_the_generation_settings():
    request = evaluate_request(max_examples=7)
    assert EvaluateRequest.from_record(request.to_record()) == request
    missing = {k: v for k, v in request.to_record().items() if k != "max_new_tokens"}
    with pytest.raises(ValueError, match="lacks field 'max_new_tokens'"):
        EvaluateRequest.from_record(missing)


def test_evaluation_section_is_validated(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {max_length: 48}\nevaluation: {marker: 'Impression:', max_new_tokens: 8,"
                    " every_k_rounds: 2, max_examples: 4}\n")
    evaluation = load_job_config(path).evaluation
    assert (evaluation.marker, evaluation.max_new_tokens, evaluation.every_k_rounds,
            evaluation.max_examples) == ("Impression:", 8, 2, 4)
    with pytest.raises(ConfigError, match="evaluation.max_new_tokens .* no room for a prompt"):
        load_job_config(path, ["evaluation.max_new_tokens=47"])
    with pytest.raises(ConfigError, match="evaluation.marker must not be empty"):
        load_job_config(path, ["evaluation.marker= "])
    with pytest.raises(ConfigError, match="evaluation.max_examples"):
        load_job_config(path, ["evaluation.max_examples=0"])


# --------------------------------------------------------------------- the loss on what is judged


def test_judged_pairs_split_notes_like_the_generation_task():
    note = "Objective: BP 165/93 mmHg\nAssessment: 1. Essential hypertension: poorly controlled."
    pairs = [("", note), ("Question?", "Answer."), ("", "Imaging report\nFindings: none.")]
    assert judged_pairs(pairs, "Assessment:") == [
        ("Objective: BP 165/93 mmHg\nAssessment:", "1. Essential hypertension: poorly controlled."),
        ("Question?", "Answer."), ("", "Imaging report\nFindings: none.")]
    assert judged_pairs(pairs, "") == pairs
    # training.loss_on: judged leaves out the note the marker does not split
    assert judged_pairs(pairs, "Assessment:", only_judged=True) == \
        judged_pairs(pairs, "Assessment:")[:2]


def test_node_trains_and_evaluates_the_loss_on_the_completion(make_site, tiny_model_dir):
    """With a loss marker the labels start after the marker, the note before it is context."""
    from privatune.common.examples import IGNORE_INDEX
    from privatune.common.protocol import TrainRequest

    node = SiteNode(load_site_policy(make_site()))
    _, tokenizer = load_base_model(tiny_model_dir)
    whole = node.dataset("train", tokenizer, 128)
    judged = node.dataset("train", tokenizer, 128, loss_marker="Assessment:")
    ids, labels = judged.tensors[0][0], judged.tensors[1][0]
    learned = tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert learned.strip().startswith(node.train_units[0][1].split("Assessment:")[1].strip()[:10])
    assert (judged.tensors[1] != IGNORE_INDEX).sum() < (whole.tensors[1] != IGNORE_INDEX).sum()
    state = lora_state(initial_adapter(tiny_model_dir, LORA, seed=0))
    request = TrainRequest(run_id="run-1", round=1, planned_rounds=1, local_steps=2, batch_size=8,
                           learning_rate=0.02, max_grad_norm=1.0, max_length=48, lora_r=LORA.r,
                           lora_alpha=LORA.alpha, lora_targets="q_proj,v_proj",
                           loss_marker="Assessment:")
    assert node.train(request, state).reply.accepted
    reply = node.evaluate(dataclasses.replace(evaluate_request(generation=False),
                                              loss_marker="Assessment:"), state)
    assert reply.accepted and reply.eval_loss is not None
