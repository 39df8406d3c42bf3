"""The coordinator's round loop, independent of Flower's transport.

Each round: sample available nodes (bounded wait), send the global adapter and the plan,
validate and average the accepted updates (if at least ``min_replies`` came back in time; under
``federation.aggregation: ffa`` the updates are B alone and A stays as initialised),
evaluate the merged adapter centrally and at every node (perplexity; and, at round 0, every
``evaluation.every_k_rounds`` and the last round, generation scores), and checkpoint adapter +
state.

What it is given: ``coordinator_settings`` and a ``transport``; which node is which site:
``site_addressing``; its checkpoints and resuming: ``checkpoints``; the run's report:
``report``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from privatune.common.clinical_metrics import ClinicalScores
from privatune.common.config import to_dict
from privatune.common.generation import GenerationScores, is_generation_round
from privatune.common.hardware import resolve_hardware
from privatune.common.ledger import LedgerHead
from privatune.common.lora import (load_lora_state, lora_state, read_adapter_state, save_adapter,
                                   seed_lora, trained_part, update_hash, with_update)
from privatune.common.model_source import describe_base_model
from privatune.common.shared_model import adapter_model
from privatune.common.protocol import EvaluateReply, TrainRequest, evaluate_request, train_request
from privatune.server.aggregation import (Contribution, InvalidUpdateError, aggregate,
                                         optimizer_move_bound, round_norm_bound, update_norm,
                                         validate_update, weight_problem)
from privatune.server.checkpoints import CheckpointState, SiteTally, checkpoint_to_resume
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.evaluation import CentralEvaluator
from privatune.server.report import CentralSummary, RunReport, SampleCompletions, SiteSummary
from privatune.server.rounds import RoundEvaluation, RoundRecord, RoundTraining
from privatune.common.secure_protocol import secure_noise_multiplier
from privatune.server.secure_round import SecureRoundState, secure_round
from privatune.server.secure_step import AdamState
from privatune.server.site_addressing import addressable, addressee, identified, state_identity
from privatune.server.tracking import open_tracker
from privatune.server.transport import (SecureResult, TrainResult, Transport, adapter_bytes,
                                        wait_for_nodes)

SAMPLE_COMPLETIONS = 3  # from the coordinator's own held-out set, shown in the report
ADAM_FILE = "adam.safetensors"  # a secure DP-SGD run's optimizer state, beside state.json


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else math.exp(loss)


def site_generation_scores(reply: EvaluateReply) -> GenerationScores | None:
    """The generation scores a site released, or None (not asked, withheld, no task); their
    clinical scores where the site sent them (``repeat_4gram`` is there whenever they were
    scored; a node of an earlier version sends none), over its ``generation_examples``."""
    if reply.rouge_l is None or reply.bleu is None or reply.chrf is None:
        return None
    clinical = None
    if reply.repeat_4gram is not None:
        clinical = ClinicalScores(
            measurement_fidelity=reply.measurement_fidelity,
            measurements_checked=reply.measurements_checked,
            status_accuracy=reply.status_accuracy, statuses_checked=reply.statuses_checked,
            status_majority_share=reply.status_majority_share,
            derivable_status_accuracy=reply.derivable_status_accuracy,
            derivable_statuses_checked=reply.derivable_statuses_checked,
            derivable_status_majority_share=reply.derivable_status_majority_share,
            repeat_4gram=reply.repeat_4gram, completions=reply.generation_examples)
    return GenerationScores(reply.rouge_l, reply.bleu, reply.chrf, reply.generation_examples,
                            clinical)


def _mean_train_loss(accepted: Sequence[TrainResult]) -> float | None:
    """Example-weighted mean of the training losses the participants released."""
    told = [(r.reply.train_loss, max(r.reply.num_examples, 1)) for r in accepted
            if r.reply.train_loss is not None]
    return sum(loss * n for loss, n in told) / sum(n for _, n in told) if told else None


class Coordinator:
    """Runs the rounds of one federated job and keeps the run's history."""

    def __init__(self, settings: CoordinatorSettings, transport: Transport,
                 progress: Callable[[str], None] = print):
        self.settings, self.transport, self.progress = settings, transport, progress
        job = settings.job
        resume_from = checkpoint_to_resume(settings)  # before any model is loaded
        self.hardware = resolve_hardware(job.model.device, job.model.dtype, where="model")
        with torch.random.fork_rng(devices=[]):  # PEFT's draws leave the caller's RNG alone
            model, tokenizer = self._model()
        seed_lora(model, job.seed)  # the run's start, whoever attached the adapter
        self.global_state = lora_state(model)
        self.evaluator = (CentralEvaluator(lambda: self._model()[0], tokenizer,
                                           settings.central_eval, job.model.max_length,
                                           job.training.eval_batch_size, job.evaluation.marker,
                                           job.loss_marker, job.judged_only)
                          if settings.central_eval else None)
        self.lengths = (self.evaluator.length_fit(job.evaluation.max_new_tokens)
                        if self.evaluator is not None else None)
        if self.lengths is not None:
            progress(f"lengths (coordinator's set): {self.lengths.summary()}")
        self.run_id = settings.run_id
        self.rounds: list[RoundRecord] = []
        self.sites: dict[str, SiteTally] = {}
        self.rng = random.Random(job.seed)
        # secure DP-SGD: Adam's state across rounds, and the run's aggregate noise multiplier
        self.adam: AdamState | None = None
        self._secure_noise: float | None = None
        if resume_from is not None:
            self._restore(resume_from)
        # the run's figures after each round (TensorBoard, MLflow or none); opened at first use
        self.tracker = open_tracker(job.tracking, settings.out_dir, self.run_id, to_dict(job),
                                    progress)

    def _restore(self, directory: Path) -> None:
        """Continue after a crash: adapter, round number, history and per-site totals."""
        state = CheckpointState.read(directory)
        self.run_id, self.rounds, self.sites = state.run_id, state.rounds, state.sites
        self.global_state = lora_state(self._model_with(read_adapter_state(directory / "adapter")))
        if (directory / ADAM_FILE).is_file():
            self.adam = AdamState.from_tensors(load_file(str(directory / ADAM_FILE)))
        self.rng = random.Random(f"{self.settings.job.seed}-{state.round}")
        self.progress(f"resuming run {self.run_id} after round {state.round} from {directory}")

    # -- one round -------------------------------------------------------------------------
    def _sample(self, ids: list[int]) -> list[int]:
        fed = self.settings.job.federation
        count = max(fed.min_replies, math.ceil(fed.fraction_train * len(ids)))
        return sorted(self.rng.sample(ids, min(count, len(ids))))

    def train_round(self, round_number: int) -> RoundTraining:
        fed = self.settings.job.federation
        if fed.mode == "secure_dpsgd":
            return self._secure_round(round_number)
        ids, sites = addressable(self.transport, wait_for_nodes(self.transport, fed.min_nodes,
                                                                fed.node_wait_s), self.progress)
        chosen = self._sample(ids)
        self.progress(f"[round {round_number}/{fed.rounds}] training at {len(chosen)} nodes")
        request = train_request(self.settings.job, self.run_id, round_number)
        results, failures = self.transport.train(
            {node: dataclasses.replace(self._anchored(node, request), site=addressee(sites, node))
             for node in chosen}, self.global_state, fed.round_timeout_s)
        outcome = RoundTraining(failures=list(failures))
        results = identified(results, sites, outcome.failures)
        # what the sites train and send back: under ffa only B, A staying as initialised
        trained = trained_part(self.global_state, fed.aggregation)
        fitting = self._fitting_updates(results, trained, outcome)
        accepted = self._within_norm_bound(fitting, trained, request, outcome)
        for result in accepted:
            reply, site = result.reply, self._site(result.reply.site)
            site.noise_multiplier = reply.noise_multiplier
            site.rounds.append(round_number)
            loss = f"{reply.train_loss:.3f}" if reply.train_loss is not None else "withheld"
            self.progress(f"  {reply.site}: {reply.num_examples} examples, train loss {loss}, "
                          f"epsilon {reply.epsilon:.3f} / {reply.epsilon_budget:g}")
        for failure in outcome.failures:
            self.progress(f"  no usable reply: {failure}")
        outcome.participants = sorted(r.reply.site for r in accepted)
        outcome.train_loss = _mean_train_loss(accepted)
        outcome.bytes_sent = adapter_bytes(self.global_state) * len(chosen)
        received = [r for r in results if r.reply.accepted]
        outcome.bytes_received = sum(adapter_bytes(r.state) for r in received)
        outcome.update_bytes = {r.reply.site: adapter_bytes(r.state) for r in received}
        outcome.aggregated = len(accepted) >= fed.min_replies
        if outcome.aggregated:
            self.global_state = with_update(self.global_state, aggregate(
                [Contribution(r.reply.site, r.state, r.reply.num_examples) for r in accepted], fed))
        else:
            self.progress(f"  only {len(accepted)} usable updates (< min_replies={fed.min_replies}): "
                          "the global adapter is kept unchanged this round")
        return outcome

    def _secure_round(self, round_number: int) -> RoundTraining:
        """A round of secure DP-SGD (``server.secure_round``): the global adapter and Adam's
        state move by each step that released its sum."""
        job = self.settings.job
        fed = job.federation
        ids, sites = addressable(self.transport, wait_for_nodes(self.transport, fed.min_nodes,
                                                                fed.node_wait_s), self.progress)
        chosen = self._sample(ids)
        self.progress(f"[round {round_number}/{fed.rounds}] secure DP-SGD at {len(chosen)} "
                      f"nodes, {job.training.local_steps} steps")
        request = train_request(job, self.run_id, round_number)
        if self._secure_noise is None:
            trained = trained_part(self.global_state, fed.aggregation)
            self._secure_noise = secure_noise_multiplier(job, sum(t.numel()
                                                               for t in trained.values()))
        state = SecureRoundState(self.global_state, self.adam)

        def note(result: SecureResult) -> None:
            reply, site = result.reply, self._site(result.reply.site)
            site.epsilon, site.delta, site.epsilon_budget = (reply.epsilon, reply.delta,
                                                             reply.epsilon_budget)
            site.node_id = result.node_id
            site.noise_multiplier = reply.noise_multiplier or self._secure_noise
            site.note_head(reply.ledger_seq, reply.ledger_hash)

        outcome = secure_round(
            job, self.transport, chosen,
            {node: dataclasses.replace(self._anchored(node, request), site=addressee(sites, node))
             for node in chosen}, sites, state, self._secure_noise, round_number, note,
            self.progress)
        self.global_state, self.adam = state.global_state, state.optimizer
        for name in outcome.participants:
            self._site(name).rounds.append(round_number)
        for failure in outcome.failures:
            self.progress(f"  {failure}")
        return outcome

    def _anchored(self, node_id: int, request: TrainRequest) -> TrainRequest:
        """The request for one node, with the head its site's last reply carried and the spend
        it reported (none for a node that has not answered yet)."""
        site = next((t for t in self.sites.values() if t.node_id == node_id), None)
        if site is None or not site.head.known:
            return request
        return dataclasses.replace(request, ledger_seq=site.head.seq, ledger_hash=site.head.hash,
                                   ledger_epsilon=site.epsilon, ledger_delta=site.delta or 0.0)

    def _fitting_updates(self, results: Sequence[TrainResult], trained: Mapping[str, torch.Tensor],
                         outcome: RoundTraining) -> list[TrainResult]:
        """Accepted replies whose update fits the adapter's ``trained`` part and whose weight is sane.

        Where nodes are not bound to sites by key (``identified``), two nodes claiming one site
        name in a round are both left out, since the coordinator cannot tell which one is that site.
        """
        fed = self.settings.job.federation
        claims = Counter(r.reply.site for r in results)
        fitting = []
        for result in results:
            reply = result.reply
            if claims[reply.site] > 1:
                outcome.failures.append(f"node {result.node_id}: claims site {reply.site!r}, as "
                                        "another node did this round; both replies left out")
                continue
            site = self._site(reply.site)
            site.epsilon, site.delta, site.epsilon_budget = (reply.epsilon, reply.delta,
                                                             reply.epsilon_budget)
            site.node_id = result.node_id
            site.note_head(reply.ledger_seq, reply.ledger_hash)
            outcome.replies[reply.site] = reply
            if not reply.accepted:
                outcome.declined[reply.site] = reply.reason
                self.progress(f"  {reply.site} declined: {reply.reason}")
                continue
            outcome.update_sha256[reply.site] = update_hash(result.state)  # whatever becomes of it
            problem = weight_problem(reply.num_examples, fed)
            if problem:
                outcome.failures.append(f"{reply.site}: update rejected: {problem}")
                continue
            try:
                validate_update(result.state, trained)
            except InvalidUpdateError as err:
                outcome.failures.append(f"{reply.site}: update rejected: {err}")
                continue
            fitting.append(result)
        return fitting

    def _within_norm_bound(self, results: Sequence[TrainResult], trained: Mapping[str, torch.Tensor],
                           request: TrainRequest, outcome: RoundTraining) -> list[TrainResult]:
        """The updates that move the adapter's ``trained`` part no more than the round's bound."""
        norms = [update_norm(r.state, trained) for r in results]
        bound = round_norm_bound(norms, self.settings.job.federation, optimizer_move_bound(
            trained, request.learning_rate, request.local_steps))
        kept = []
        for result, norm in zip(results, norms):
            if norm > bound:
                outcome.failures.append(f"{result.reply.site}: update rejected: it moves the "
                                        f"adapter by {norm:.3g}, over the round's bound of "
                                        f"{bound:.3g}")
            else:
                kept.append(result)
        return kept

    def evaluate(self, round_number: int) -> RoundEvaluation:
        """Central and federated perplexity of the current global adapter."""
        job = self.settings.job
        ids, sites = addressable(self.transport, sorted(self.transport.node_ids()), self.progress)
        generation = is_generation_round(round_number, job.federation.rounds,
                                         job.evaluation.every_k_rounds)
        request = evaluate_request(job, self.run_id, round_number, generation=generation)
        results, failures = self.transport.evaluate(
            {node: dataclasses.replace(request, site=addressee(sites, node)) for node in ids},
            self.global_state, job.federation.round_timeout_s)
        failures = list(failures)
        answers = [r.reply for r in identified(results, sites, failures)]
        replies = [r for r in answers if r.accepted]
        declined = {r.site: r.reason for r in answers if not r.accepted}
        for site, reason in sorted(declined.items()):
            self.progress(f"  {site} declined the evaluation: {reason}")
        site_ppl = {r.site: _perplexity(r.eval_loss) for r in replies}
        heads = {}
        for reply in replies:
            site = self._site(reply.site)
            site.perplexity[round_number] = site_ppl[reply.site]
            site.note_head(reply.ledger_seq, reply.ledger_hash)
            if reply.ledger_seq >= 0:
                heads[reply.site] = LedgerHead(reply.ledger_seq, reply.ledger_hash)
        weighted = [(r.eval_loss, r.num_examples) for r in replies if r.eval_loss is not None]
        federated = (math.exp(sum(loss * n for loss, n in weighted) / sum(n for _, n in weighted))
                     if weighted else None)
        central = self.evaluator.perplexity(self.global_state) if self.evaluator else None
        shown = ", ".join(f"{s} {p:.1f}" for s, p in sorted(site_ppl.items()) if p is not None)
        central_text = f"{central:.2f}" if central is not None else "n/a"
        self.progress(f"[round {round_number}] global perplexity {central_text}; at sites: {shown}")
        evaluation = RoundEvaluation(global_perplexity=central, federated_perplexity=federated,
                                     site_perplexity=site_ppl, evaluation_failures=list(failures),
                                     ledger_heads=dict(sorted(heads.items())),
                                     evaluation_declined=declined)
        if generation:
            self._evaluate_generation(round_number, replies, evaluation)
        return evaluation

    def _evaluate_generation(self, round_number: int, replies: Sequence[EvaluateReply],
                             evaluation: RoundEvaluation) -> None:
        """Generation scores: centrally on the coordinator's held-out set (with sample
        completions), and what each site released."""
        settings = self.settings.job.evaluation
        evaluation.site_generation = {r.site: scores for r in sorted(replies, key=lambda r: r.site)
                                      if (scores := site_generation_scores(r)) is not None}
        started = time.monotonic()
        result = (self.evaluator.generation(self.global_state, settings.max_new_tokens,
                                            settings.max_examples) if self.evaluator else None)
        seconds = time.monotonic() - started
        if result is not None:
            evaluation.global_generation, samples = result
            evaluation.samples = samples[:SAMPLE_COMPLETIONS]
        central = evaluation.global_generation
        shown = ", ".join(f"{s} {g.rouge_l:.3f}" for s, g in evaluation.site_generation.items())
        self.progress(f"[round {round_number}] generation: "
                      + (f"ROUGE-L {central.rouge_l:.3f}, BLEU {central.bleu:.1f}, "
                         f"chrF {central.chrf:.1f} on {central.examples} held-out notes, "
                         f"{central.cut_off} cut off at max_new_tokens ({seconds:.1f} s)"
                         if central else "no central score")
                      + f"; ROUGE-L at sites: {shown or 'none released'}")

    def _site(self, name: str) -> SiteTally:
        return self.sites.setdefault(name, SiteTally())

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> RunReport:
        fed = self.settings.job.federation
        wait_for_nodes(self.transport, fed.min_nodes, fed.node_wait_s)
        state_identity(self.transport, self.progress)
        each_round = self.settings.evaluate_each_round
        if not self.rounds:
            self.progress(f"run {self.run_id}: {fed.rounds} rounds"
                          + ("; evaluating the base model" if each_round else ""))
            self.rounds.append(RoundRecord(round=0, evaluation=(self.evaluate(0) if each_round
                                                                else RoundEvaluation())))
        for round_number in range(len(self.rounds), fed.rounds + 1):
            training = self.train_round(round_number)
            evaluation = (self.evaluate(round_number)
                          if each_round or round_number == fed.rounds else RoundEvaluation())
            self.rounds.append(RoundRecord(
                round=round_number, evaluation=evaluation, training=training,
                epsilon={s: v.epsilon for s, v in sorted(self.sites.items())}))
            self.checkpoint(round_number)
            self.tracker.log(self.rounds)
        self.tracker.close()
        save_adapter(self._model_with(self.global_state), self.settings.out_dir / "adapter")
        return self.summary()

    def _model(self) -> tuple[PeftModel, PreTrainedTokenizerBase]:
        """The coordinator's model: the process's one base on its hardware, with the job's LoRA
        (common.shared_model), shared with any node this process also serves (a local-only
        baseline's), so a worker holds one copy of the base weights, not two. Its adapter holds
        whatever the last user loaded: every use loads the state it means first."""
        return adapter_model(self.settings.model_dir, self.hardware, self.settings.job.lora)

    def _model_with(self, state: Mapping[str, torch.Tensor]):
        model, _ = self._model()
        load_lora_state(model, state)
        return model

    def checkpoint(self, round_number: int) -> Path:
        """Adapter (PEFT format) and coordinator state after a completed round."""
        directory = self.settings.out_dir / "checkpoints" / f"round_{round_number:03d}"
        save_adapter(self._model_with(self.global_state), directory / "adapter")
        if self.adam is not None:  # before state.json, which marks the checkpoint complete
            save_file(self.adam.to_tensors(), str(directory / ADAM_FILE))
        CheckpointState(run_id=self.run_id, round=round_number, rounds=self.rounds,
                        sites=self.sites, config=to_dict(self.settings.job),
                        job_sites=self.settings.sites).write(directory)
        return directory

    def summary(self) -> RunReport:
        """The run's results, as the report is built from them."""
        first, last = self.rounds[0], self.rounds[-1]
        sites = {
            name: SiteSummary(base_perplexity=tally.perplexity.get(0),
                              final_perplexity=tally.perplexity.get(last.round),
                              epsilon=tally.epsilon, delta=tally.delta,
                              epsilon_budget=tally.epsilon_budget,
                              noise_multiplier=tally.noise_multiplier,
                              rounds_participated=list(tally.rounds),
                              base_generation=first.evaluation.site_generation.get(name),
                              final_generation=last.evaluation.site_generation.get(name))
            for name, tally in sorted(self.sites.items())}
        return RunReport(run_id=self.run_id, config=to_dict(self.settings.job),
                         base_model=str(self.settings.model_dir),
                         base_model_description=describe_base_model(self.settings.model_dir),
                         central=self._central_summary(first, last),
                         rounds=list(self.rounds), sites=sites)

    def _central_summary(self, first: RoundRecord, last: RoundRecord) -> CentralSummary:
        """The global model on the coordinator's held-out set: base (round 0) and final."""
        central = CentralSummary(base_perplexity=first.evaluation.global_perplexity,
                                 final_perplexity=last.evaluation.global_perplexity,
                                 base_generation=first.evaluation.global_generation,
                                 final_generation=last.evaluation.global_generation)
        if self.evaluator is not None and self.settings.job.evaluation.every_k_rounds > 0:
            central.generation_tasks = len(self.evaluator.tasks.tasks)
            central.generation_skipped = dict(self.evaluator.tasks.skipped)
        central.lengths = self.lengths
        central.samples = [SampleCompletions(base.prompt, base.reference, base.completion,
                                             final.completion)
                           for base, final in zip(first.evaluation.samples, last.evaluation.samples)]
        return central
