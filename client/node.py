"""The hospital node's logic, free of Flower: policy checks, DP training, ledger, evaluation.

Order of a train round: check the request against the site policy and the ledger's
cumulative epsilon (decline with a reason if it would go over), train with DP-SGD, write the
release to the ledger (fsync'ed) and only then hand the update back for sending. A crash
between the ledger write and the send therefore over-counts, never under-counts. A ledger
write that fails (disk full) turns the reply into a decline: nothing leaves the site without
its entry, and nothing is kept for re-sending.

Every reply carries the ledger's head after the node's entry for it; the coordinator sends the
head it last got back with each train request. A ledger that lacks that head (restored from an
old backup, cut or rewritten) has lost releases: the node declines every round until an
operator acknowledges the rollback (``client.rollback``), which records the spend the
coordinator held as a floor under the site's epsilon
(``common.ledger_records.RollbackFloor``).
The node holds two more pieces of evidence of its own (``client.site_state``): the head
recorded beside the ledger, and the releases it kept; a ledger that lacks its recorded head, or
does not list a kept release, stops it the same way, and the acknowledgement then counts the
kept releases' spend too and lists them again. A resend is only ever of an update the ledger
lists.

One node process at a time answers for a site: from the budget check to the ledger append it
holds the site's lock, and a request that finds it held is declined (``SiteBusy``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from privatune.common.process_heap import importing_libraries

# a node process's first import of torch, transformers, PEFT and Opacus (a virtual node's
# too: Ray's worker imports this module when it receives the ClientApp)
with importing_libraries():
    import torch
    from torch.utils.data import Dataset, TensorDataset

    from privatune.client.data import (DataError, Record, collapse_duplicates, load_records,
                                       split_records)
    from privatune.common.shared_model import adapter_model
    from privatune.client.policy import (SitePolicy, check_delta, physical_batch_size,
                                         request_violation)
    from privatune.client.request_checks import (adapter_problem, check_frozen_factors,
                                                 runs_taken_part)
    from privatune.client.rollback import rollback_decline
    from privatune.client.site_state import SiteBusy, listed_updates
    from privatune.client.trainer import DPNotAppliedError, DPTrainSettings, train_dp_round
    from privatune.common.examples import (SampledWindows, TokenizedTexts, consecutive_windows,
                                           encode_pairs, evaluate_loss, tokenize_texts)
    from privatune.common.generation import (GenerationTasks, evaluate_generation, generation_tasks,
                                             judged_pairs)
    from privatune.common.hardware import resolve_hardware
    from privatune.common.ledger import NO_HEAD, LedgerHead, LedgerWriteError, SiteLedger
    from privatune.common.ledger_records import (DECLINE, EVALUATE_METRICS, RESEND, AdapterRelease,
                                                 NonPrivateRelease)
    from privatune.common.config import LoraConfig
    from privatune.common.lora import (load_lora_state, lora_state, train_factors,
                                       trained_part, update_hash)
    from privatune.common.privacy import (MechanismStep, epsilon_of, poisson_sample_rate,
                                          run_noise_multiplier)
    from privatune.common.protocol import (EvaluateReply, EvaluateRequest, TrainReply,
                                           TrainRequest, requested_lora)

log = logging.getLogger(__name__)


def privacy_units(records: Sequence[Record], unit: str, loss_marker: str = "",
                  judged_only: bool = False) -> list[tuple[str, str]]:
    """One (prompt, completion) example per privacy unit: a record (its note split at
    ``loss_marker`` for the loss, as judged; with ``judged_only``, only the records that are
    judged), or all of a patient's text."""
    if unit == "record":
        return judged_pairs([(r.prompt, r.completion) for r in records], loss_marker, judged_only)
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        if record.patient_id is None:
            raise ValueError(f"{record.source}: privacy unit is 'patient' but the record has no "
                             "patient id")
        by_patient[record.patient_id].append(record)
    return [("", "\n\n".join(r.prompt + r.completion for r in group))
            for _, group in sorted(by_patient.items())]


def _own_records(policy: SitePolicy) -> tuple[list[Record], list[Record]]:
    """The policy's data file, exact duplicates collapsed (or refused, as the policy says);
    returns the records and the duplicates collapsed."""
    records, duplicates = collapse_duplicates(load_records(policy.data_path, policy.site.format))
    if duplicates and policy.site.duplicates == "refuse":
        raise DataError(f"{policy.data_path}: {len(duplicates)} exact duplicate records "
                        f"(the first at {duplicates[0].source}); this site's policy "
                        "(site.duplicates: refuse) does not collapse them")
    return records, duplicates


@dataclass(frozen=True)
class RoundPlan:
    """The node's answer to a train request before training: a decline reason, or the noise,
    the step it prices and the site's cumulative epsilon after it (what the ledger records when
    that step is the one that ran)."""

    reason: str
    noise_multiplier: float
    epsilon_after: float
    step: MechanismStep | None = None


@dataclass
class TrainOutcome:
    reply: TrainReply
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class SiteNode:
    """One hospital: its policy, private data splits, base model and ledger."""

    def __init__(self, policy: SitePolicy,
                 split: tuple[Sequence[Record], Sequence[Record]] | None = None):
        """``split``: (training, held-out) records already split, used as given (the empirical
        audit's membership split, its canaries repeated on the training side on purpose);
        None, the node's own: the policy's data file, duplicates collapsed, split as it says."""
        self.policy = policy
        self.duplicates: list[Record] = []
        if split is None:
            records, self.duplicates = _own_records(policy)
            split = split_records(records, policy.site.heldout_fraction, policy.site.split_seed)
        train, heldout = list(split[0]), list(split[1])
        self._records = {"train": train, "heldout": heldout}
        self.train_units = privacy_units(train, policy.privacy.unit)
        self.heldout_units = privacy_units(heldout, policy.privacy.unit)
        # generation is scored per held-out record, whatever the privacy unit
        self.heldout_pairs = [(r.prompt, r.completion) for r in heldout]
        self._tasks: dict[str, GenerationTasks] = {}
        check_delta(policy, len(self.train_units))
        self.state = policy.state
        self.ledger = SiteLedger(policy.ledger_path)
        self.hardware = resolve_hardware(policy.site.device, policy.site.dtype)
        self._encoded: dict[tuple[str, int, str, bool], TensorDataset] = {}
        self._judged_counts: dict[tuple[str, str], int] = {}
        self._tokenized: dict[str, TokenizedTexts] = {}

    @property
    def name(self) -> str:
        return self.policy.site.name

    def model_with_adapter(self, request_lora: LoraConfig):
        """The process's shared base model on this site's hardware, with the adapter attached."""
        return adapter_model(self.policy.model_dir, self.hardware, request_lora)

    def judged_problem(self, request: TrainRequest | EvaluateRequest) -> str:
        """Why this site cannot train (or score) on its judged notes only, as ``request`` asks
        (``training.loss_on: judged``), or ""."""
        if not request.judged_only:
            return ""
        if self.policy.privacy.unit != "record" or not request.loss_marker:
            return ("the request asks to train on judged notes only (training.loss_on: judged), "
                    f"which needs the record unit and a loss marker; this site's unit is "
                    f"{self.policy.privacy.unit!r} ({self.policy.source}), the request's marker "
                    f"{request.loss_marker!r}")
        split = "train" if isinstance(request, TrainRequest) else "heldout"
        if not self._judged_count(split, request.loss_marker):
            return (f"none of this site's {split} notes has the marker {request.loss_marker!r}, "
                    "and the request trains on judged notes only (training.loss_on: judged)")
        return ""

    def _judged_count(self, split: str, loss_marker: str) -> int:
        """How many of a split's records ``loss_marker`` splits (or have a prompt), counted
        once per split and marker: every request of a run asks again."""
        key = (split, loss_marker)
        if key not in self._judged_counts:
            self._judged_counts[key] = len(privacy_units(self._records[split], "record",
                                                         loss_marker, True))
        return self._judged_counts[key]

    def trained_units(self, loss_marker: str, judged_only: bool) -> int:
        """How many units a round samples from (the sampling rate's N): all, or with
        ``judged_only`` the records ``loss_marker`` splits (``training.loss_on: judged``)."""
        return self._judged_count("train", loss_marker) if judged_only else len(self.train_units)

    def dataset(self, split: str, tokenizer, max_length: int, seed: int = 0,
                loss_marker: str = "", judged_only: bool = False) -> Dataset:
        """A split as model inputs: one row per unit, cut at ``max_length``, its notes split at
        ``loss_marker`` for the loss (record unit; ``judged_only``: only the notes it splits);
        with patient windows, training draws a fresh window of a patient's text each time
        (under ``seed``) and evaluation scores all of each held-out patient's consecutive
        windows."""
        units = self.train_units if split == "train" else self.heldout_units
        windows = self.policy.privacy.patient_windows
        if windows and split not in self._tokenized:
            self._tokenized[split] = tokenize_texts(tokenizer, [prompt + completion
                                                                for prompt, completion in units])
        if windows and split == "train":
            return SampledWindows(self._tokenized[split], max_length, seed)
        key = (split, max_length, loss_marker, judged_only)
        if key not in self._encoded:
            judged = privacy_units(self._records[split], self.policy.privacy.unit, loss_marker,
                                   judged_only)
            self._encoded[key] = (consecutive_windows(self._tokenized[split], max_length) if windows
                                  else encode_pairs(tokenizer, judged, max_length))
        return self._encoded[key]

    def epsilon(self) -> float:
        """Everything this site has released, by its accountant over the whole history (plus
        the floor of an acknowledged rollback)."""
        return self.ledger.epsilon(self.policy.privacy.delta, self.policy.privacy.accountant_name)

    def delta(self) -> float:
        """The delta of ``epsilon``: the policy's, plus the floor's after a rollback."""
        return self.policy.privacy.delta + self.ledger.floor().delta

    def _run_noise_multiplier(self, request: TrainRequest, sample_rate: float) -> float:
        """The run's noise multiplier: fixed at the site's first round of the run, then reused.

        Calibrated so that the planned run keeps both the lifetime spend within the cap and
        the run's own spend within the per-run budget, whatever rounds the coordinator plans.
        """
        earlier = self.ledger.releases(request.run_id)
        if earlier:
            return float(earlier[0].noise_multiplier)
        privacy = self.policy.privacy
        floor = self.ledger.floor().epsilon
        return run_noise_multiplier(privacy.epsilon_cap - floor, privacy.run_budget - floor,
                                    privacy.delta,
                                    sample_rate, request.planned_rounds * request.local_steps,
                                    self.ledger.mechanism_history(), privacy.min_noise_multiplier,
                                    privacy.accountant_name)

    def check_request(self, request: TrainRequest) -> RoundPlan:
        """Decide a train request against the site policy and the ledger, before training."""
        privacy = self.policy.privacy
        spent = self.epsilon()
        violation = request_violation(self.policy.limits, request) or self.judged_problem(request)
        if violation:
            return RoundPlan(violation, 0.0, spent)
        run_entries = self.ledger.releases(request.run_id)
        if len(run_entries) >= privacy.max_rounds:
            return RoundPlan(f"site policy allows at most {privacy.max_rounds} rounds per run; "
                             f"this site already took part in {len(run_entries)}", 0.0, spent)
        runs = runs_taken_part(self.ledger.records())
        if request.run_id not in runs and len(runs) >= privacy.max_runs:
            return RoundPlan(f"site policy allows at most {privacy.max_runs} runs; this site "
                             f"already took part in {len(runs)}", 0.0, spent)
        units = self.trained_units(request.loss_marker, request.judged_only)
        sample_rate = poisson_sample_rate(units, request.batch_size)
        try:
            noise = self._run_noise_multiplier(request, sample_rate)
        except ValueError as err:
            return RoundPlan(f"privacy budget: {err}", 0.0, spent)
        this_round = MechanismStep(noise, sample_rate, request.local_steps)
        accountant = privacy.accountant_name
        after = self.ledger.epsilon(privacy.delta, accountant, then=[this_round])
        if after > privacy.epsilon_cap:
            return RoundPlan(f"round {request.round} would raise this site's epsilon to {after:.3f}, "
                             f"over its cap of {privacy.epsilon_cap:g} (delta={privacy.delta:g}); "
                             f"spent so far {spent:.3f}", noise, after)
        run_history = [release.step for release in run_entries]
        floor = self.ledger.floor().epsilon  # the run's lost releases may be in it: counted too
        run_after = floor + epsilon_of([*run_history, this_round], privacy.delta, accountant)
        if run_after > privacy.run_budget:
            return RoundPlan(f"round {request.round} would raise this run's epsilon to "
                             f"{run_after:.3f}, over the site's per-run budget of "
                             f"{privacy.run_budget:g}", noise, after)
        return RoundPlan("", noise, after, this_round)

    @contextmanager
    def answering(self) -> Iterator[None]:
        """This process alone answers for the site meanwhile (SiteBusy otherwise), with the
        ledger as it is on disk now: another process may have appended since."""
        with self.state.exclusive():
            self.ledger = SiteLedger(self.state.ledger_path)
            yield

    def train(self, request: TrainRequest, global_state: Mapping[str, torch.Tensor]) -> TrainOutcome:
        """One federated round at this site: policy check, DP-SGD, ledger, reply; a decline
        when the ledger cannot record what the reply would release, or another process is
        answering for this site."""
        try:
            with self.answering():
                return self._train(request, global_state)
        except SiteBusy as err:
            self.ledger = SiteLedger(self.state.ledger_path)  # as the other process left it
            return self.record_decline(request.run_id, request.round, str(err))
        except LedgerWriteError as err:
            return self.decline(_unrecorded(err, "update"))

    def record_decline(self, run_id: str, round_number: int, reason: str) -> TrainOutcome:
        """Decline a train request, its reason listed in the ledger (a non-private release)."""
        self.ledger.append_record(NonPrivateRelease(release=DECLINE, run_id=run_id,
                                                    round=round_number, reason=reason))
        return self.decline(reason)

    def recorded_rollback(self, request: TrainRequest) -> str:
        """Why this site declines a request to train while its ledger has lost releases (the
        decline written to the ledger), or "" when the ledger is sound."""
        rollback = rollback_decline(self.policy, self.ledger,
                                    LedgerHead(request.ledger_seq, request.ledger_hash),
                                    request.ledger_epsilon, request.ledger_delta)
        if rollback is None:
            return ""
        self.ledger.append_record(dataclasses.replace(rollback, run_id=request.run_id,
                                                      round=request.round))
        return rollback.reason

    def _train(self, request: TrainRequest, global_state: Mapping[str, torch.Tensor]) -> TrainOutcome:
        lost = self.recorded_rollback(request)
        if lost:
            return self.decline(lost)
        reason = self.address_problem(request.site) or adapter_problem(global_state)
        if reason:
            return self.record_decline(request.run_id, request.round, reason)
        resent = self._resend(request, global_state)
        if resent is not None:
            return resent
        plan = self.check_request(request)
        frozen = check_frozen_factors(request, global_state, self.ledger.releases(request.run_id))
        reason = plan.reason or frozen.reason or self.space_problem(global_state)
        if reason:
            return self.record_decline(request.run_id, request.round, reason)
        model, tokenizer = self.model_with_adapter(requested_lora(request))
        reason = self.load_problem(model, global_state, request.max_length)
        if reason:
            return self.record_decline(request.run_id, request.round, reason)
        train_factors(model, request.aggregation)
        # which window of each patient is drawn comes from the site's own secret too, never the
        # coordinator's choice
        dataset = self.dataset("train", tokenizer, request.max_length, secrets.randbits(63),
                               request.loss_marker, request.judged_only)
        try:
            result = train_dp_round(model, dataset, DPTrainSettings(
                noise_multiplier=plan.noise_multiplier, max_grad_norm=request.max_grad_norm,
                expected_batch_size=request.batch_size, steps=request.local_steps,
                learning_rate=request.learning_rate,
                max_physical_batch_size=physical_batch_size(self.policy.site, request),
                gradient_checkpointing=request.gradient_checkpointing,
                # the noise seed is the site's own secret: a coordinator-chosen seed could make
                # two releases share their noise and void the accounting
                seed=secrets.randbits(63)))
        except DPNotAppliedError as err:
            # nothing leaves the site, so nothing is spent; the request is what made DP fail
            log.error("%s: DP check failed: %s", self.name, err)
            return self.record_decline(request.run_id, request.round, (
                f"training failed the node's DP checks ({err}) with this request "
                f"(learning rate {request.learning_rate:g}, max_grad_norm "
                f"{request.max_grad_norm:g}); nothing was released"))
        state = trained_part(lora_state(model), request.aggregation)  # ffa: never A
        privacy = self.policy.privacy
        ran = MechanismStep(result.noise_multiplier, result.sample_rate, result.steps)
        # the plan priced this step against this same ledger (this process answers alone): one
        # accountant call per round; a step other than the planned one is priced as it ran
        epsilon = (plan.epsilon_after if ran == plan.step else
                   self.ledger.epsilon(privacy.delta, privacy.accountant_name, then=[ran]))
        mechanism = AdapterRelease(
            run_id=request.run_id, round=request.round, privacy_unit=privacy.unit,
            patient_sampling=privacy.patient_sampling if privacy.unit == "patient" else None,
            noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
            steps=result.steps, max_grad_norm=request.max_grad_norm,
            accountant=privacy.accountant_name, epsilon=epsilon, delta=privacy.delta,
            frozen_a_sha256=frozen.sha256)
        non_finite = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
        if non_finite:
            # The training ran, so its epsilon is spent whether or not the result leaves: the
            # mechanism is recorded (withheld) and the update is not sent.
            reason = (f"the update is not finite (NaN or infinity in {non_finite[0]}); it is "
                      f"withheld, and the epsilon of the training that produced it stays counted "
                      f"(learning rate {request.learning_rate:g})")
            self.ledger.append_record(dataclasses.replace(mechanism, withheld=reason))
            return self.decline(reason)
        self.ledger.append_record(dataclasses.replace(mechanism, update_sha256=update_hash(state)))
        release = self.policy.release
        count = (self.trained_units(request.loss_marker, request.judged_only)
                 if release.example_count else 1)
        loss = result.mean_loss if release.train_loss else None
        self._record_metrics(request.run_id, request.round, "train",
                             {"num_examples": count if release.example_count else None,
                              "train_loss": loss})
        outcome = TrainOutcome(TrainReply(
            site=self.name, accepted=True, num_examples=count, epsilon=epsilon,
            delta=self.delta(), epsilon_budget=privacy.epsilon_cap,
            noise_multiplier=result.noise_multiplier, train_loss=loss,
            accountant=privacy.accountant_name, **self.head_fields()), state)
        self._keep_release(request, global_state, outcome)
        return outcome

    def head_fields(self) -> dict[str, int | str]:
        """The ledger head as reply fields: taken after the reply's own entry is written."""
        head = self.ledger.head
        return {"ledger_seq": head.seq, "ledger_hash": head.hash}

    def decline(self, reason: str) -> TrainOutcome:
        privacy = self.policy.privacy
        return TrainOutcome(TrainReply(site=self.name, accepted=False, reason=reason,
                                       epsilon=self.epsilon(), delta=self.delta(),
                                       epsilon_budget=privacy.epsilon_cap,
                                       accountant=privacy.accountant_name, **self.head_fields()))

    def address_problem(self, addressed_to: str) -> str:
        """A request the coordinator addressed to another site is declined before anything is
        spent: the coordinator knows this node by its key as that site."""
        if addressed_to and addressed_to != self.name:
            return (f"the coordinator addressed this request to site {addressed_to!r}, but this "
                    f"node is {self.name!r} (site.name in {self.policy.source}); nothing was "
                    "trained or evaluated")
        return ""

    def space_problem(self, global_state: Mapping[str, torch.Tensor]) -> str:
        """Whether the state directory can hold what a round writes, checked before spending:
        the ledger entries, and the kept update (a temporary copy and the file) with its record."""
        needed = 2 * 4 * sum(t.numel() for t in global_state.values()) + 2**20
        free = self.state.free_bytes()
        if free < needed:
            return (f"this site's state directory has {free} bytes free, fewer than the "
                    f"{needed} a round writes (its ledger entries and kept update); nothing "
                    "was trained")
        return ""

    def load_problem(self, model, global_state: Mapping[str, torch.Tensor],
                      max_length: int) -> str:
        """Load the global adapter into the model, or say why it does not fit it (tensors, or a
        length beyond the model's positions)."""
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            return (f"request max_length = {max_length} exceeds this site's base model's "
                    f"{positions} positions; nothing was trained or evaluated")
        try:
            load_lora_state(model, global_state)
        except ValueError as err:
            return f"the global adapter does not fit this site's model: {err}"
        return ""

    def _keep_release(self, request: TrainRequest, global_state: Mapping[str, torch.Tensor],
                      outcome: TrainOutcome) -> None:
        """Keep the update sent for this run and round, to resend it if the reply is lost. It
        is sent whether or not it could be kept: its ledger entry is written."""
        try:
            self.state.keep(request.run_id, request.round, update_hash(global_state),
                            outcome.state, outcome.reply)
        except OSError as err:
            log.error("%s: round %d's update could not be kept for resending (%s); it is sent, "
                      "its ledger entry is written", self.name, request.round,
                      err.strerror or err)

    def _resend(self, request: TrainRequest,
                global_state: Mapping[str, torch.Tensor]) -> TrainOutcome | None:
        """The same update again when a restarted coordinator repeats a round with the same input.

        Sending an already released output again is post-processing: it costs no epsilon,
        whereas training again would spend budget on a round the site already paid for. Only an
        update the ledger lists is resent: one it does not list stopped the node before this.
        """
        kept = self.state.kept(request.run_id, request.round)
        if kept is None or kept.input_sha256 != update_hash(global_state):
            return None
        if kept.update_sha256 not in listed_updates(self.ledger.records()):
            return None
        state = self.state.update(kept)
        if state is None:
            return None
        self.ledger.append_record(NonPrivateRelease(release=RESEND, run_id=request.run_id,
                                                    round=request.round,
                                                    update_sha256=kept.update_sha256))
        reply = dataclasses.replace(kept.reply, epsilon=self.epsilon(), delta=self.delta(),
                                    **self.head_fields())
        return TrainOutcome(reply, state)

    def evaluations_answered(self, run_id: str) -> int:
        """Evaluations of a run this site answered (each has its ledger entry, even when the
        policy withheld every metric)."""
        return sum(1 for r in self.ledger.records() if isinstance(r, NonPrivateRelease)
                   and r.release == EVALUATE_METRICS and r.run_id == run_id)

    def evaluate(self, request: EvaluateRequest,
                 global_state: Mapping[str, torch.Tensor]) -> EvaluateReply:
        """Held-out loss of the global adapter on this site's data (a non-private release), or
        a decline: a ledger that lost releases, a request outside the site's limits or
        addressed to another site, one evaluation more than a run may have or a run more than
        the site takes part in (each releases an exact held-out loss), too few held-out records
        for a metric, or a ledger that cannot record it."""
        try:
            with self.answering():
                rollback = rollback_decline(self.policy, self.ledger, NO_HEAD, 0.0, 0.0)
                if rollback is not None:
                    self.ledger.append_record(dataclasses.replace(
                        rollback, run_id=request.run_id, round=request.round))
                    return EvaluateReply(site=self.name, accepted=False, reason=rollback.reason)
                reason = self._evaluation_problem(request, global_state)
                if reason:
                    return self._decline_evaluation(request, reason)
                return self._evaluate(request, global_state)
        except SiteBusy as err:
            return EvaluateReply(site=self.name, accepted=False, reason=str(err))
        except LedgerWriteError as err:
            return EvaluateReply(site=self.name, accepted=False,
                                 reason=_unrecorded(err, "evaluation"))

    def _decline_evaluation(self, request: EvaluateRequest, reason: str) -> EvaluateReply:
        """Decline an evaluate request, its reason listed in the ledger (a non-private release)."""
        self.ledger.append_record(NonPrivateRelease(release=DECLINE, request="evaluate",
                                                    run_id=request.run_id, round=request.round,
                                                    reason=reason))
        return EvaluateReply(site=self.name, accepted=False, reason=reason)

    def _evaluation_problem(self, request: EvaluateRequest,
                            global_state: Mapping[str, torch.Tensor]) -> str:
        """Why an evaluate request is declined before the model is touched, or ""."""
        reason = (request_violation(self.policy.limits, request) or self.judged_problem(request)
                  or self.address_problem(request.site) or adapter_problem(global_state))
        if reason:
            return reason
        answered = self.evaluations_answered(request.run_id)
        if answered >= self.policy.max_evaluations_per_run:
            return (f"site policy allows at most {self.policy.max_evaluations_per_run} "
                    f"evaluations per run (limits.max_evaluations_per_run); this site already "
                    f"answered {answered}")
        runs = runs_taken_part(self.ledger.records())
        max_runs = self.policy.privacy.max_runs
        if request.run_id not in runs and len(runs) >= max_runs:
            return (f"site policy allows at most {max_runs} runs (privacy.max_runs, evaluation-"
                    f"only runs included); this site already took part in {len(runs)}")
        minimum = self.policy.release.min_records
        if len(self.heldout_pairs) < minimum:
            return (f"this site's held-out split holds {len(self.heldout_pairs)} records, fewer "
                    f"than the {minimum} a released metric must cover (release.min_records)")
        return ""

    def _evaluate(self, request: EvaluateRequest,
                  global_state: Mapping[str, torch.Tensor]) -> EvaluateReply:
        model, tokenizer = self.model_with_adapter(requested_lora(request))
        reason = self.load_problem(model, global_state, request.max_length)
        if reason:
            return self._decline_evaluation(request, reason)
        dataset = self.dataset("heldout", tokenizer, request.max_length,
                               loss_marker=request.loss_marker, judged_only=request.judged_only)
        loss, _ = evaluate_loss(model, dataset, request.batch_size)
        release = self.policy.release
        scores: dict[str, float | int | None] = {}
        # withheld by the policy: not even computed, so nothing of it can leave
        if request.generation and release.generation_scores:
            scores = self._generation_scores(request, model, tokenizer)
        eval_loss = loss if release.eval_loss and math.isfinite(loss) else None
        self._record_metrics(request.run_id, request.round, "evaluate",
                             {"num_examples": len(self.heldout_units) if release.example_count
                              else None, "eval_loss": eval_loss, **scores})
        return EvaluateReply(site=self.name,
                             num_examples=len(self.heldout_units) if release.example_count else 1,
                             eval_loss=eval_loss, **scores, **self.head_fields())

    def generation_tasks(self, marker: str) -> GenerationTasks:
        """This site's held-out records as generation tasks (notes split at ``marker``)."""
        if marker not in self._tasks:
            self._tasks[marker] = generation_tasks(self.heldout_pairs, marker)
        return self._tasks[marker]

    def _generation_scores(self, request: EvaluateRequest, model,
                           tokenizer) -> dict[str, float | int | None]:
        """ROUGE-L, BLEU, chrF and the clinical scores of the adapter's greedy completions of
        the first ``max_examples`` held-out tasks, as EvaluateReply fields: aggregates only,
        never a completion or a record; none over fewer tasks than ``release.min_records``, and
        no count (of notes, or of the checks the clinical scores pool, which tell about as much)
        unless ``release.example_count``."""
        tasks = self.generation_tasks(request.marker).tasks[:request.max_examples]
        if len(tasks) < self.policy.release.min_records:  # a score over few notes tells of them
            return {}
        scores, _ = evaluate_generation(model, tokenizer, tasks, request.max_length,
                                        request.max_new_tokens, request.batch_size)
        clinical = scores.clinical  # always scored here: the tasks have prompts
        released: dict[str, float | int | None] = {
            "rouge_l": scores.rouge_l, "bleu": scores.bleu, "chrf": scores.chrf,
            "measurement_fidelity": clinical.measurement_fidelity,
            "status_accuracy": clinical.status_accuracy,
            "status_majority_share": clinical.status_majority_share,
            "derivable_status_accuracy": clinical.derivable_status_accuracy,
            "derivable_status_majority_share": clinical.derivable_status_majority_share,
            "repeat_4gram": clinical.repeat_4gram}
        if self.policy.release.example_count:
            released |= {"generation_examples": len(tasks),
                         "measurements_checked": clinical.measurements_checked,
                         "statuses_checked": clinical.statuses_checked,
                         "derivable_statuses_checked": clinical.derivable_statuses_checked}
        return released

    def _record_metrics(self, run_id: str, round_number: int, phase: str,
                        values: Mapping[str, object]) -> None:
        """The metrics a reply releases; written even when the policy withholds them all, so
        the ledger lists every request answered (evaluations per run are counted from it)."""
        released = {k: v for k, v in values.items() if v is not None}
        self.ledger.append_record(NonPrivateRelease(release=f"{phase}_metrics", run_id=run_id,
                                                    round=round_number, values=released))


def _unrecorded(err: LedgerWriteError, what: str) -> str:
    """A decline's reason when the ledger could not record a release: the cause, not the
    site's file paths."""
    log.error("%s", err)
    cause = err.__cause__
    detail = getattr(cause, "strerror", None) or str(cause or err)
    return (f"this site's ledger could not be written ({detail}), so the {what} was not sent "
            "(nothing leaves a site without its ledger entry)")
