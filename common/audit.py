"""``privatune audit``: check, from files alone, what every site released and what it cost.

For each site ledger: verify the hash chain (naming the first broken entry), recompute epsilon
from the recorded mechanism history with an independent implementation of the method each
entry names (``dp-accounting``'s RDP for Opacus' RDP, ``dp-accounting``'s PLD for Opacus' PRV)
and flag disagreements over 1%, show the looser RDP bound of the same history beside it (never
below the PRV figure), and list every non-private release. An entry keeps the accountant it
was written with: a ledger whose site changed accountant is never reinterpreted.

The audit is linear in the ledger's length. RDP composes by adding curves over the orders, so
the independent RDP curve of every prefix is a running sum: ``dp-accounting`` computes the
curve of each distinct (noise multiplier, sampling rate) once, each release adds ``steps``
times it, and its own RDP-to-epsilon conversion gives every release's epsilon. The same
arithmetic in the same order as composing the whole prefix anew, so the figures are the same.
PLD is a side figure: it is computed for the whole history with the steps summed per distinct
mechanism (composition allows it, see ``privacy.merged``) and, for a ledger of at most
``PLD_PER_RELEASE_LIMIT`` releases, for every prefix too.

Given the coordinator's record of a run (``common.run_record``: the ledger heads each site's
replies carried and the updates received from it), the audit also checks the ledger against
it: a ledger that lacks a reported head lost its tail or was rewritten (even re-chained
consistently), an update the coordinator received that no adapter update lists is a hidden
release, and a spend below what the site reported is an under-count. A site that lies
consistently to the coordinator and in its ledger is beyond what this can see.

A ledger audits "ok" only when all of it is accounted: a torn last line (no newline, and it
does not parse or chain; a complete one that chains is counted), a ``<ledger>.torn-*`` side file
the node set aside, an adapter update whose mechanism or epsilon is missing, NaN, infinite or
out of range, and an epsilon cap that is not a finite positive number are each a problem.

Secure DP-SGD releases (``SecureRelease``, issue 27) carry two guarantees, (a) from the aggregate
noise of at least t shares and (b) from the site's own share alone, and the site's cap holds the
one its policy enforces. PRV and PLD have no Skellam mechanism, so from a site's first secure
release on its history is composed by RDP on the integer orders of
``distributed_noise_accounting`` (``SecureRdp``), each guarantee recomputed after every private
release. What is independent of the node, said plainly:

* the Gaussian steps' RDP: ``dp-accounting``'s, not Opacus';
* the conversion to epsilon: ``dp-accounting``'s;
* the Skellam steps' RDP: the audit's own implementation (``common.audit_skellam``), written
  from the mathematics (the Skellam bound of Agarwal, Kairouz and Liu, the rounding's norms,
  joint convexity, the binomial expansion of the subsampling, with each entry's ``subsampling``
  bound) and not from the node's ``skellam_step_rdp``. The two differ in one free parameter,
  the rounding's failure probability, which the audit optimises continuously and the node on a
  grid: the audit's curve is at or below the node's (measured over 252 mechanisms: by up to
  3e-3 of it at orders under 72, up to 12% at high orders of small noise, where the best
  probability is off the node's grid) and its epsilon within 9.2e-5 of the node's, far inside
  the 1% that is flagged (``tests/test_audit_skellam.py``). What stays shared is the meaning of
  a ledger entry (noise multiplier, scaled clip, padded dimension, rate, bound) and the orders,
  ``distributed_noise_accounting.ORDERS``. Both rest on the same published bounds and on the
  mirrored-pair lemma behind "binomial-mirrored" (proved in that module's docstring and
  checked numerically), so an error
  in those, rather than in their coding, would be in both.
* a lower bound independent of both: ``dp-accounting``'s exact RDP of the subsampled Gaussian
  at the same noise multiplier (the Gaussian limit). The Skellam bound is that Gaussian RDP
  plus non-negative terms (discreteness, rounding, the subsampling bound), order by order, so
  a Skellam curve below it anywhere is a bug that under-counts, and is a problem. For large
  noise the two meet (the tests of ``distributed_noise_accounting`` and of ``audit_skellam``
  measure how close); the audit shows the Gaussian limit beside (a) so the price of
  discreteness is visible.

A site without secure releases is audited, and reported, exactly as before. The report (Markdown,
HTML, the figure) is rendered by ``common.audit_report``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privatune.common.config import read_yaml
from privatune.common.audit_skellam import secure_step_rdp
from privatune.common.distributed_noise_accounting import ORDERS
from privatune.common.ledger import LedgerError, head_problem, read_entries
from privatune.common.ledger_records import (AdapterRelease, NonPrivateRelease, Numbered,
                                             RollbackAcknowledgement, RollbackFloor, SecureRelease,
                                             entry_problem, is_adapter_update, is_secure_update,
                                             record_of)
from privatune.common.privacy import (ACCOUNTANTS, PRV, PRV_EPS_ERROR, RDP, MechanismStep,
                                      SecureStep, pld_epsilon)
from privatune.common.run_record import SiteRecord

TOLERANCE = 0.01
# Up to this many adapter updates, PLD epsilon is given for every release (each costs a PLD
# composition, tens of milliseconds); above it, for the whole history only.
PLD_PER_RELEASE_LIMIT = 64


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs through absl for each order whose series does not converge (it is
    skipped); that is expected, not news for the privacy officer."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


class IndependentRdp:
    """The running RDP curve of a mechanism history, by ``dp-accounting`` (independent of the
    node's Opacus accountant) at Opacus' orders, so that like is compared with like.

    ``add`` costs one RDP computation per distinct (noise multiplier, sampling rate) and a
    vector addition otherwise; ``epsilon`` is dp-accounting's own conversion of the curve. The
    curve is accumulated exactly as ``RdpAccountant`` composes a whole history (``steps`` times
    the per-step curve, added in order), so ``epsilon`` equals
    ``privacy.independent_rdp_epsilon`` of the same prefix.
    """

    def __init__(self) -> None:
        from opacus.accountants import RDPAccountant

        self.orders = list(RDPAccountant.DEFAULT_ALPHAS)
        self.rdp = np.zeros(len(self.orders), dtype=np.float64)
        self.empty = True
        self._per_step: dict[tuple[float, float], np.ndarray] = {}

    def _curve(self, noise_multiplier: float, sample_rate: float) -> np.ndarray:
        key = (noise_multiplier, sample_rate)
        if key not in self._per_step:
            import dp_accounting
            from dp_accounting.rdp import RdpAccountant

            accountant = RdpAccountant(orders=self.orders)
            accountant.compose(dp_accounting.PoissonSampledDpEvent(
                sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)))
            self._per_step[key] = accountant.rdp
        return self._per_step[key]

    def add(self, step: MechanismStep) -> None:
        self.rdp += step.steps * self._curve(step.noise_multiplier, step.sample_rate)
        self.empty = False

    def epsilon(self, delta: float) -> float:
        from dp_accounting.rdp import compute_epsilon

        return 0.0 if self.empty else float(compute_epsilon(self.orders, self.rdp, delta)[0])


def _gaussian_curve(noise_multiplier: float, sample_rate: float,
                    orders: list[float]) -> np.ndarray:
    """``dp-accounting``'s RDP of one Poisson-subsampled Gaussian step, per order."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(orders=orders)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)))
    return accountant.rdp


# the guarantees a secure site's history is recomputed for, and the lower bounds of (a) and (b)
SECURE_CURVES = ("enforced", "aggregate", "fallback", "aggregate_limit", "fallback_limit")


class SecureRdp:
    """The running RDP curves, on the integer ``ORDERS``, of a history holding secure steps:
    one per guarantee (``enforced``, ``aggregate``, ``fallback``) and the Gaussian limits of
    (a) and (b), each secure step read as a Gaussian step of its noise.

    A Gaussian step adds ``dp-accounting``'s curve to all five; a secure step adds the audit's
    own Skellam curve (``audit_skellam.secure_step_rdp``) of its (a) or (b) mechanism to
    those, and ``dp-accounting``'s Gaussian curve at the same noise to the limits. Each
    distinct mechanism is computed once, and the Gaussian steps only once a secure step comes
    (a site without any costs nothing here).
    """

    def __init__(self) -> None:
        self.orders = [float(a) for a in ORDERS]
        self.curves = {name: np.zeros(len(ORDERS)) for name in SECURE_CURVES}
        self._gaussian: dict[tuple[float, float], np.ndarray] = {}
        self._skellam: dict[SecureStep, np.ndarray] = {}
        self._before_secure: list[MechanismStep] | None = []  # None once a secure step came

    def gaussian(self, noise_multiplier: float, sample_rate: float) -> np.ndarray:
        key = (noise_multiplier, sample_rate)
        if key not in self._gaussian:
            self._gaussian[key] = _gaussian_curve(noise_multiplier, sample_rate, self.orders)
        return self._gaussian[key]

    def skellam(self, step: SecureStep) -> np.ndarray:
        key = dataclasses.replace(step, steps=1)
        if key not in self._skellam:
            self._skellam[key] = secure_step_rdp(step.noise_multiplier, step.scaled_clip,
                                                 step.dimension, step.sample_rate, ORDERS,
                                                 step.subsampling)
        return self._skellam[key]

    def add(self, step: MechanismStep) -> None:
        if self._before_secure is not None:
            self._before_secure.append(step)
            return
        curve = step.steps * self.gaussian(step.noise_multiplier, step.sample_rate)
        for name in SECURE_CURVES:
            self.curves[name] = self.curves[name] + curve

    def add_secure(self, release: SecureRelease) -> None:
        if self._before_secure is not None:
            earlier, self._before_secure = self._before_secure, None
            for step in earlier:
                self.add(step)
        for name in ("aggregate", "fallback"):
            step = release.mechanism(name)
            self.curves[name] = self.curves[name] + step.steps * self.skellam(step)
            self.curves[f"{name}_limit"] = self.curves[f"{name}_limit"] + step.steps * (
                self.gaussian(step.noise_multiplier, step.sample_rate))
        enforced = release.mechanism("enforced")
        self.curves["enforced"] = self.curves["enforced"] + enforced.steps * self.skellam(enforced)

    def below_limit(self) -> list[str]:
        """The guarantees whose curve is below its Gaussian limit at some order (beyond float
        rounding): an under-count by the Skellam accounting."""
        return [name for name in ("aggregate", "fallback")
                if np.any(self.curves[name] < self.curves[f"{name}_limit"] * (1 - 1e-9) - 1e-12)]

    def epsilon(self, name: str, delta: float) -> float:
        from dp_accounting.rdp import compute_epsilon

        return float(compute_epsilon(self.orders, self.curves[name], delta)[0])


@dataclass(frozen=True)
class SecureAuditRow:
    """One secure release as the audit checked it: its entry's number, the release, and the
    site's guarantees after it recomputed (``SecureRdp``), with the Gaussian limit of (a) beside
    them, each including the floor of the acknowledged rollback before it."""

    seq: int
    release: SecureRelease
    enforced_epsilon: float
    aggregate_epsilon: float
    fallback_epsilon: float
    aggregate_limit_epsilon: float  # (a) with each Skellam step read as a Gaussian: a lower bound
    floor_epsilon: float


@dataclass(frozen=True)
class AuditRow:
    """One adapter release as the audit checked it: its entry's number, the release, and the
    site's epsilon after it recomputed independently, each figure including the floor of the
    acknowledged rollback before it (``floor_epsilon``). PLD is None where it is computed for
    the whole history only; the recomputed figure is then None too for a PRV release."""

    seq: int
    release: AdapterRelease
    recomputed_epsilon: float | None  # by the independent implementation of ``accountant``
    rdp_epsilon: float  # the looser RDP bound of the same history
    pld_epsilon: float | None
    floor_epsilon: float

    @property
    def accountant(self) -> str:
        """The release's accountant; an entry that names none was written under RDP."""
        return self.release.accountant or RDP

    @property
    def recorded_epsilon(self) -> float:
        """The node's own figure, by ``accountant``."""
        return float(self.release.epsilon)


@dataclass
class SiteAudit:
    name: str
    path: Path
    chain_error: str | None = None
    rounds: list[AuditRow] = field(default_factory=list)
    non_private: list[Numbered[NonPrivateRelease]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    delta: float | None = None
    budget: float | None = None
    accountant: str = PRV
    recorded_epsilon: float = 0.0  # by the node's accountant (the headline)
    recomputed_epsilon: float = 0.0  # the independent figure of the same method
    rdp_epsilon: float = 0.0  # the looser RDP bound of the same history, beside it
    pld_epsilon: float | None = 0.0  # None with secure releases: PLD cannot compose Skellam
    # acknowledged rollbacks: each carries a floor (the spend the site had reported) that the
    # epsilon figures after it include, at delta plus the floor's delta
    rollbacks: list[Numbered[RollbackAcknowledgement]] = field(default_factory=list)
    # secure DP-SGD releases; with any, the figures above are the enforced guarantee's, by RDP
    secure_rounds: list[SecureAuditRow] = field(default_factory=list)
    aggregate_epsilon: float | None = None  # guarantee (a), recomputed; None without secure
    fallback_epsilon: float | None = None  # guarantee (b), recomputed
    aggregate_limit_epsilon: float | None = None  # (a)'s Gaussian limit, a lower bound

    @property
    def ok(self) -> bool:
        return self.chain_error is None and not self.problems


def _entries_until_break(path: Path) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """All verified entries, the chain error (the entries after it are not trusted) and the
    torn last line, if any."""
    try:
        entries, torn = read_entries(path)
        return entries, None, torn
    except LedgerError as err:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [json.loads(line) for line in lines[: err.line - 1]], str(err), None


def _tail_problems(path: Path, torn: str | None) -> list[str]:
    """A torn last line and the side files the node set aside: releases the ledger may miss."""
    side_files = sorted(path.parent.glob(glob.escape(path.name) + ".torn-*"))
    problems = [f"{aside}: a torn last line the node set aside from the ledger; it is not "
                "counted, review it" for aside in side_files]
    if torn is not None:
        problems.insert(0, f"{path}: the last line has no newline and does not parse or chain "
                           f"(a torn write or appended garbage); it is not counted: {torn[:80]!r}")
    return problems


def _budget_problem(result: SiteAudit) -> str | None:
    """Why the spend is not within the cap; a NaN or infinite cap holds any spend, so it is one."""
    budget = result.budget
    if budget is None:
        return None
    if not (math.isfinite(budget) and budget > 0):
        return f"the budget (privacy.epsilon_cap) {budget!r} is not a finite positive number"
    # The node spends up to its cap by its own accountant; the independent figure may sit
    # within the same 1% agreement band above it without being a breach.
    if (result.recorded_epsilon > budget * (1 + 1e-9)
            or result.recomputed_epsilon > budget * (1 + TOLERANCE)):
        return (f"epsilon {result.recorded_epsilon:.4f} (recomputed "
                f"{result.recomputed_epsilon:.4f}) is over the budget {budget:g}")
    return None


def record_problems(entries: list[dict[str, Any]], record: SiteRecord,
                    ledger_epsilon: float) -> list[str]:
    """Where verified ``entries`` (a ledger accounting ``ledger_epsilon``) fall short of the
    coordinator's record of the site: a reported head they lack, a received update they do not
    list, a reported spend above theirs."""
    problems = []
    missing = [(h, p) for h in record.heads if (p := head_problem(entries, h.head))]
    if missing:
        head, problem = missing[0]
        later = f" (and {len(missing) - 1} later reported heads)" if len(missing) > 1 else ""
        problems.append(f"the ledger does not hold the head the site reported in "
                        f"{head.describe()}: {problem}{later}")
    # from the JSON, not AdapterRelease: an update whose mechanism cannot be accounted (the
    # audit's own problem) still lists the update it sent
    listed = {e.get("update_sha256") for e in entries if is_adapter_update(e)}
    listed |= {e.get("contribution_sha256") for e in entries if is_secure_update(e)}
    problems += [f"the coordinator received an update from this site in round {u.round} "
                 f"(sha256 {u.sha256[:16]}...) that the ledger does not list"
                 for u in record.received if u.sha256 not in listed]
    if record.epsilon > ledger_epsilon * (1 + TOLERANCE) + 1e-9:
        problems.append(f"the site reported epsilon {record.epsilon:.4f} to the coordinator, but "
                        f"its ledger accounts only {ledger_epsilon:.4f}")
    return problems


def audit_ledger(path: Path, name: str | None = None, budget: float | None = None,
                 record: SiteRecord | None = None) -> SiteAudit:
    """Audit one site's ledger file, against the coordinator's record of the site if given."""
    result = SiteAudit(name=name or path.parent.name, path=path, budget=budget)
    if not path.is_file():
        result.chain_error = f"{path}: ledger file is missing"
        return result
    entries, result.chain_error, torn = _entries_until_break(path)
    result.problems += _tail_problems(path, torn)
    releases = sum(map(is_adapter_update, entries))
    per_release_pld = releases <= PLD_PER_RELEASE_LIMIT
    rdp = IndependentRdp()
    secure = SecureRdp()  # every private release, composed on the integer orders
    history: list[MechanismStep] = []
    floor = RollbackFloor()
    last_floor = 0.0  # the floor inside the figures of the last private release
    with _quiet_absl():
        for entry in entries:
            seq = entry["seq"]
            problem = entry_problem(entry)
            if problem:
                private = is_adapter_update(entry) or is_secure_update(entry)
                what = "release" if private else "acknowledgement"
                result.problems.append(f"line {seq}: {problem}; the audit cannot account this "
                                       f"{what}, and stops here")
                break
            typed = record_of(entry)
            if isinstance(typed, RollbackAcknowledgement):
                floor = typed.floor
                result.rollbacks.append(Numbered(seq, typed))
                continue
            if isinstance(typed, NonPrivateRelease):
                result.non_private.append(Numbered(seq, typed))
                continue
            if isinstance(typed, AdapterRelease):
                step = typed.step
                rdp.add(step)
                secure.add(step)
                history.append(step)
            delta = float(typed.delta)
            if result.delta is not None and delta != result.delta:
                result.problems.append(f"line {seq}: delta changed from "
                                       f"{result.delta:g} to {delta:g}")
            result.delta = delta
            accountant = typed.accountant or RDP
            if accountant not in ACCOUNTANTS:
                result.problems.append(f"line {seq}: unknown accountant {accountant!r}; "
                                       "the audit cannot check this release, and stops here")
                break
            last_floor = floor.epsilon
            if isinstance(typed, SecureRelease):
                secure.add_secure(typed)
                row = SecureAuditRow(
                    seq, typed, *(floor.epsilon + secure.epsilon(name, delta) for name in
                                  ("enforced", "aggregate", "fallback", "aggregate_limit")),
                    floor.epsilon)
                _check_secure_row(result, row, secure)
                result.secure_rounds.append(row)
                continue
            if result.secure_rounds:  # from the first secure release on, all of it by RDP
                enforced = floor.epsilon + secure.epsilon("enforced", delta)
                row = AuditRow(seq, typed, enforced, enforced, None, floor.epsilon)
            else:
                rdp_eps = floor.epsilon + rdp.epsilon(delta)
                final = len(result.rounds) + 1 == releases
                pld_eps = (floor.epsilon + pld_epsilon(history, delta)
                           if per_release_pld or final else None)
                row = AuditRow(seq, typed, rdp_eps if accountant == RDP else pld_eps, rdp_eps,
                               pld_eps, floor.epsilon)
            _check_row(result, row)
            result.rounds.append(row)
    if result.rounds and not result.secure_rounds:
        last = result.rounds[-1]
        if last.pld_epsilon is None:  # PLD of the whole history only
            whole = last.floor_epsilon + pld_epsilon(history, float(result.delta))
            last = dataclasses.replace(
                last, pld_epsilon=whole,
                recomputed_epsilon=whole if last.accountant == PRV else last.recomputed_epsilon)
            result.rounds[-1] = last
            _check_row(result, last)
        result.accountant = last.accountant
        result.recorded_epsilon = last.recorded_epsilon
        result.recomputed_epsilon = last.recomputed_epsilon
        result.rdp_epsilon = last.rdp_epsilon
        result.pld_epsilon = last.pld_epsilon
    if result.secure_rounds:
        _secure_headline(result, secure, last_floor)
    # an acknowledgement after the last release raises the site's figures by its floor too
    later = floor.epsilon - last_floor
    result.recorded_epsilon += later
    result.recomputed_epsilon += later
    result.rdp_epsilon += later
    for name in ("pld_epsilon", "aggregate_epsilon", "fallback_epsilon",
                 "aggregate_limit_epsilon"):
        if getattr(result, name) is not None:
            setattr(result, name, getattr(result, name) + later)
    if record is not None:
        result.problems += record_problems(entries, record, result.recorded_epsilon)
    budget_problem = _budget_problem(result)
    if budget_problem:
        result.problems.append(budget_problem)
    return result


def _secure_headline(result: SiteAudit, secure: SecureRdp, floor_epsilon: float) -> None:
    """A site with secure releases: its figures are the enforced guarantee's, by RDP (the
    recorded one the last private release's), with (a), (b) and (a)'s Gaussian limit beside."""
    delta = float(result.delta)
    last_secure = result.secure_rounds[-1]
    last_adapter = result.rounds[-1] if result.rounds else None
    if last_adapter is not None and last_adapter.seq > last_secure.seq:
        result.recorded_epsilon = last_adapter.recorded_epsilon
    else:
        result.recorded_epsilon = float(last_secure.release.epsilon)
    result.accountant = RDP
    result.recomputed_epsilon = result.rdp_epsilon = (
        floor_epsilon + secure.epsilon("enforced", delta))
    result.pld_epsilon = None
    result.aggregate_epsilon = floor_epsilon + secure.epsilon("aggregate", delta)
    result.fallback_epsilon = floor_epsilon + secure.epsilon("fallback", delta)
    result.aggregate_limit_epsilon = floor_epsilon + secure.epsilon("aggregate_limit", delta)


def _disagrees(recorded: float, recomputed: float) -> bool:
    return abs(recorded - recomputed) > TOLERANCE * max(recomputed, 1e-12)


def _check_secure_row(result: SiteAudit, row: SecureAuditRow, secure: SecureRdp) -> None:
    """Each figure the node recorded for a secure release (the enforced one, (a) and (b))
    against the audit's (1%), and the Skellam curves never below their Gaussian limits."""
    release = row.release
    for what, recorded, recomputed in (
            ("epsilon", release.epsilon, row.enforced_epsilon),
            ("aggregate_epsilon (a)", release.aggregate_epsilon, row.aggregate_epsilon),
            ("fallback_epsilon (b)", release.fallback_epsilon, row.fallback_epsilon)):
        if _disagrees(float(recorded), recomputed):
            result.problems.append(f"line {row.seq}: recorded {what} {recorded:.4f} differs from "
                                   f"the recomputed {recomputed:.4f} by more than 1%")
    for name in secure.below_limit():
        result.problems.append(f"line {row.seq}: the Skellam RDP of guarantee {name} is below "
                               "dp-accounting's RDP of the Gaussian at the same noise, a lower "
                               "bound it cannot go under: its accounting under-counts")


def _check_row(result: SiteAudit, row: AuditRow) -> None:
    """The recorded figure against the independent one of its own method (RDP against
    dp-accounting's RDP, PRV against dp-accounting's PLD: like with like, 1%), and the looser
    bounds never below the tighter ones."""
    seq, recorded, recomputed = row.seq, row.recorded_epsilon, row.recomputed_epsilon
    if recomputed is not None and _disagrees(recorded, recomputed):
        method = "" if row.accountant == RDP else " (PRV, recomputed as dp-accounting's PLD)"
        result.problems.append(f"line {seq}: recorded epsilon {recorded:.4f} differs from the "
                               f"recomputed {recomputed:.4f} by more than 1%{method}")
    if row.accountant == PRV and row.rdp_epsilon < recorded - PRV_EPS_ERROR - 1e-9:
        result.problems.append(f"line {seq}: the RDP bound {row.rdp_epsilon:.4f} is below the "
                               f"recorded PRV epsilon {recorded:.4f}")
    if row.pld_epsilon is not None and row.pld_epsilon > row.rdp_epsilon * (1 + 1e-9):
        result.problems.append(f"line {seq}: PLD epsilon above RDP epsilon")


def _site_budget(site_dir: Path) -> float | None:
    """The epsilon cap from the site's own policy file, when it sits next to the ledger.

    Read with the config reader (no YAML alias expansion); any fault is a ValueError naming
    the file, which the audit reports as a problem.
    """
    policy = site_dir / "policy.yaml"
    if not policy.is_file():
        return None
    data, _ = read_yaml(policy)
    privacy = data.get("privacy")
    if privacy is None:
        return None
    if not isinstance(privacy, dict):
        raise ValueError(f"{policy}: privacy is {type(privacy).__name__}, not a section of keys")
    cap = privacy.get("epsilon_cap")
    if cap is None:
        return None
    try:
        return float(cap)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{policy}: privacy.epsilon_cap is {cap!r}, not a number") from err


def audit_site(ledger: Path, name: str | None = None,
               record: SiteRecord | None = None) -> SiteAudit:
    """Audit a ledger against the cap in the policy beside it (else the cap the site reported
    to the coordinator) and the coordinator's record; an unreadable cap is a problem."""
    name = name or ledger.parent.name
    try:
        budget = _site_budget(ledger.parent)
    except ValueError as err:
        result = audit_ledger(ledger, name, record=record)
        result.problems.append(str(err))
        return result
    if budget is None and record is not None:
        budget = record.epsilon_budget
    return audit_ledger(ledger, name, budget, record)


def audit_in_run(ledger: Path, site: str, records: dict[str, SiteRecord]) -> SiteAudit:
    """Audit a ledger as site ``site``'s in a run the coordinator recorded (``records``): a
    site the record does not name is a problem, since nothing ties its ledger to this run
    (another run's ledger would pass every other check)."""
    result = audit_site(ledger, site, records.get(site))
    if site not in records:
        result.problems.append(f"the run's record has no site {site!r} (it has "
                               f"{', '.join(records) or 'none'}): this ledger cannot be checked "
                               "as this run's, and may be another run's")
    return result


def audit_path(path: Path, records: dict[str, SiteRecord] | None = None,
               name: str | None = None) -> list[SiteAudit]:
    """Audit a single ledger file (as site ``name``, by default its folder's name) or every
    ``sites/<site>/ledger.jsonl`` of a run directory; given the run's ``records``, each as a
    ledger of that run (``audit_in_run``), else on its own."""
    def audit(ledger: Path, site: str) -> SiteAudit:
        return audit_site(ledger, site) if records is None else audit_in_run(ledger, site, records)

    if path.is_file():
        return [audit(path, name or path.parent.name)]
    site_dirs = sorted(p for p in (path / "sites").glob("*") if p.is_dir())
    if not site_dirs:
        raise FileNotFoundError(f"{path}: neither a ledger file nor a run directory with sites/")
    return [audit(d / "ledger.jsonl", d.name) for d in site_dirs]
