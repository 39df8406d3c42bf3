"""The release gate: a model leaves the coordinator only if every site's audit passes.

Exporting a run with a site over budget or a broken ledger is refused unless forced with a
reason; every export, forced or not, with its reason and the audit findings, is recorded in the
run's hash-chained ``releases.jsonl`` before it is put in place.

The gate audits every site ledger it has: those under the run directory (a simulation keeps
them in ``sites/<site>/``) and those the privacy officer collected from the hospitals of a
deployed run (``ledgers``, ``--ledger SITE=PATH``), each against the coordinator's record of
the run (``common.run_record``: the heads the site reported, the updates received, its
reported spend). The gate opens only on that evidence: a site the coordinator recorded whose
ledger is not there, a ledger of a site the record does not name, and a run directory with no
record at all (nothing ties its ledgers to this run: another run's would pass) are each a
finding, so the export needs ``--force`` with a reason, and the model card names what was not
verified, never "pass".

Two forms leave through the gate: the LoRA adapter in PEFT format (``export_adapter``), and a
standalone Hugging Face model with the adapter merged into the base weights, the tokenizer and
a model card (``export_merged``). Either is the final round's adapter (default), the best
round's (``which="best"``: lowest central held-out perplexity, see ``server.overfitting``) or a
given round's checkpoint. The export is assembled in a staging directory beside the
destination and renamed into place, so the destination is either absent or complete; an
existing destination is replaced only when asked to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from privatune.common.audit import SiteAudit, audit_in_run, audit_site
from privatune.common.ledger import SiteLedger
from privatune.common.ledger_records import TypedEntry
from privatune.common.run_record import SiteRecord, latest_checkpoint
from privatune.server.overfitting import METRIC_NAMES, best_round, overfitting_flags
from privatune.server.report import RunReport
from privatune.server.rounds import RoundRecord, site_records

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT = "report.json"


class ReleaseRefused(RuntimeError):
    """The run failed its privacy audit and the export was not forced."""


@dataclass(frozen=True)
class ExportSource:
    """The adapter an export takes: its directory, its round and how it was chosen."""

    adapter: Path
    round: int | None  # None: a final adapter of a run without report or checkpoints
    label: str  # e.g. "final round 3", "best round 2 (central held-out perplexity 12.31)"


def _checkpoint_adapter(run_dir: Path, number: int) -> Path:
    return run_dir / "checkpoints" / f"round_{number:03d}" / "adapter"


def _round_history(run_dir: Path) -> list[RoundRecord]:
    """The run's rounds: from report.json, else from the newest checkpoint (an unfinished run)."""
    if (run_dir / REPORT).is_file():
        return RunReport.read(run_dir / REPORT).rounds
    from privatune.server.checkpoints import CheckpointState

    latest = latest_checkpoint(run_dir)
    return CheckpointState.read(latest).rounds if latest is not None else []


def select_adapter(run_dir: Path, which: str = "final") -> ExportSource:
    """The adapter ``which`` names: ``final``, ``best`` or a round number."""
    run_dir = Path(run_dir)
    if which == "final":
        adapter = run_dir / "adapter"
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir}: no final adapter (expected {adapter}/{ADAPTER_CONFIG}; "
                                    "an unfinished run has only checkpoints: use --round N)")
        rounds = _round_history(run_dir) if (run_dir / REPORT).is_file() else []
        number = rounds[-1].round if rounds else None
        return ExportSource(adapter, number, "final round" + (f" {number}" if number is not None else ""))
    if which == "best":
        rounds = _round_history(run_dir)
        best = best_round(rounds)
        if best is None:
            raise ValueError(f"{run_dir}: no trained round was evaluated on held-out data, so there "
                             "is no best round; export the final round or --round N")
        source = ExportSource(_checkpoint_adapter(run_dir, best.round), best.round,
                              f"best round {best.round} ({METRIC_NAMES[best.metric]} "
                              f"{best.perplexity:.2f})")
    else:
        try:
            number = int(which)
        except ValueError:
            raise ValueError(f"--round {which!r}: expected final, best or a round number") from None
        source = ExportSource(_checkpoint_adapter(run_dir, number), number, f"round {number}")
    if not (source.adapter / ADAPTER_CONFIG).is_file():
        saved = sorted(p.parent.parent.name.removeprefix("round_").lstrip("0") or "0"
                       for p in (run_dir / "checkpoints").glob(f"round_*/adapter/{ADAPTER_CONFIG}"))
        raise FileNotFoundError(f"{run_dir}: no checkpoint adapter of round {source.round} "
                                f"({source.adapter}); rounds with a checkpoint: "
                                f"{', '.join(saved) or 'none'}")
    return source


NOT_VERIFIED = "not independently verified"


@dataclass
class GateResult:
    """The gate's verdict: what is wrong or unverified (empty: open), the ledgers audited, the
    sites known only by what they reported to the coordinator, and whether the run directory
    has a record of the run at all (without one, no ledger is verified as this run's)."""

    findings: list[str] = field(default_factory=list)
    audits: list[SiteAudit] = field(default_factory=list)
    unverified: list[SiteRecord] = field(default_factory=list)
    recorded: bool = True


def release_findings(run_dir: Path, ledgers: Mapping[str, Path] | None = None) -> GateResult:
    """Every site's audit of the run (its ledger under the run directory or in ``ledgers``,
    against the coordinator's record) and what is wrong or unverified in them."""
    run_dir = Path(run_dir)
    recorded = (run_dir / REPORT).is_file() or latest_checkpoint(run_dir) is not None
    records = site_records(_round_history(run_dir))
    paths = {d.name: d / "ledger.jsonl" for d in sorted((run_dir / "sites").glob("*")) if d.is_dir()}
    for site, path in (ledgers or {}).items():
        if recorded and site not in records:
            raise ValueError(f"--ledger {site}={path}: the run's record has no site {site!r} "
                             f"(it has {', '.join(records) or 'none'})")
        paths[site] = Path(path)
    if not paths and not records:
        raise FileNotFoundError(f"{run_dir}: no site ledgers (sites/<site>/ledger.jsonl) and no "
                                "record of the sites' replies (report.json or a checkpoint)")
    gate = GateResult(audits=[audit_in_run(path, site, records) if recorded
                              else audit_site(path, site) for site, path in sorted(paths.items())],
                      unverified=[r for site, r in records.items() if site not in paths],
                      recorded=recorded)
    if not recorded:
        gate.findings.append(f"{run_dir}: no record of the run (no {REPORT}, no checkpoint), so "
                             f"the ledgers of {', '.join(sorted(paths))} cannot be checked as "
                             f"this run's (another run's would pass): {NOT_VERIFIED}")
    for audit in gate.audits:
        if audit.chain_error:
            gate.findings.append(f"{audit.name}: {audit.chain_error}")
        gate.findings += [f"{audit.name}: {problem}" for problem in audit.problems]
    for record in gate.unverified:
        gate.findings.append(f"{record.site}: {NOT_VERIFIED}: its ledger was not collected "
                             f"(pass --ledger {record.site}=PATH)")
        if record.within_budget is False:
            gate.findings.append(f"{record.site}: reported epsilon {record.epsilon:.4f} is over "
                                 f"its cap {record.epsilon_budget:g} ({NOT_VERIFIED})")
    return gate


def describe_audit(audit: SiteAudit, gate: GateResult) -> str:
    """The verdict on one audited ledger: pass only where the run's record vouches for it."""
    if not audit.ok:
        return "FAILED"
    return ("pass" if gate.recorded
            else f"sound, but {NOT_VERIFIED} as this run's (no record of the run)")


def describe_unverified(record: SiteRecord) -> str:
    """One line for a site whose ledger the gate did not have."""
    cap = "n/a" if record.epsilon_budget is None else f"{record.epsilon_budget:g}"
    return (f"{record.site}: {NOT_VERIFIED} (its ledger was not collected; it reported epsilon "
            f"{record.epsilon:.4f} of its cap {cap} by {record.accountant or 'an unnamed accountant'}"
            f"; collect it and pass --ledger {record.site}=PATH)")


def _gate(run_dir: Path, force_reason: str | None,
          ledgers: Mapping[str, Path] | None) -> GateResult:
    gate = release_findings(run_dir, ledgers)
    if gate.findings and not force_reason:
        raise ReleaseRefused("export refused: " + "; ".join(gate.findings)
                             + " (use --force --reason '...' to override; the reason is recorded)")
    return gate


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new export directory "
                              "(or pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


RELEASES = "releases.jsonl"


@dataclass(frozen=True)
class ModelExport(TypedEntry):
    """An export's entry in the run's hash-chained ``releases.jsonl``: where the model went,
    whether the gate was forced and why, the ledgers it audited and the sites it could not
    verify, and the adapter released (its round, how it was chosen, its weights' SHA-256).

    Every field is written, None as null (a round-less final adapter, an adapter without its
    weights file), as it always was; an older entry reads with the fields it lacks (``round``
    to ``adapter_sha256`` before merged exports, ``audited`` and ``unverified`` before the
    deployed gate, ``recorded`` before run records) as None.
    """

    KIND: ClassVar[str] = "model_export"

    destination: str
    forced: bool
    reason: str  # the --reason of a forced export, else ""
    findings: list[str]
    audited: dict[str, str] | None = None  # site: the ledger file audited
    unverified: list[str] | None = None  # sites whose ledger was not collected
    recorded: bool | None = None  # whether the run directory has a record of the run
    round: int | None = None
    which: str | None = None  # final, best or a round number, as asked
    merged: bool | None = None
    adapter: str | None = None
    adapter_sha256: str | None = None

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _release(run_dir: Path, out_dir: Path, overwrite: bool, source: ExportSource, which: str,
             merged: bool, gate: GateResult, force_reason: str | None, build) -> None:
    """Build the export in a staging directory, record it, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        build(staging)
        weights = source.adapter / ADAPTER_WEIGHTS
        # recorded before it is put in place: a crash can over-count a release, never hide one
        SiteLedger(run_dir / RELEASES).append_record(ModelExport(
            destination=str(out_dir.resolve()), forced=bool(gate.findings),
            reason=force_reason or "", findings=gate.findings,
            audited={a.name: str(a.path.resolve()) for a in gate.audits},
            unverified=[r.site for r in gate.unverified], recorded=gate.recorded,
            round=source.round, which=which, merged=merged, adapter=str(source.adapter.resolve()),
            adapter_sha256=_sha256(weights) if weights.is_file() else None))
        previous = None
        if out_dir.exists():  # only with overwrite (checked before)
            previous = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.previous-"))
            previous.rmdir()
            out_dir.rename(previous)
        staging.rename(out_dir)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def export_adapter(run_dir: Path, out_dir: Path, force_reason: str | None = None,
                   which: str = "final", overwrite: bool = False,
                   ledgers: Mapping[str, Path] | None = None) -> GateResult:
    """Copy the run's adapter (final, best or a round's) to ``out_dir`` after the audit gate
    (with the sites' ``ledgers`` collected from a deployment); return the gate's verdict (its
    findings are non-empty only for a forced export)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    source = select_adapter(run_dir, which)
    gate = _gate(run_dir, force_reason, ledgers)
    _check_destination(out_dir, overwrite)

    def build(staging: Path) -> None:
        shutil.copytree(source.adapter, staging, dirs_exist_ok=True)

    _release(run_dir, out_dir, overwrite, source, which, False, gate, force_reason, build)
    return gate


def export_merged(run_dir: Path, out_dir: Path, force_reason: str | None = None,
                  which: str = "final", overwrite: bool = False,
                  base_model: Path | None = None,
                  ledgers: Mapping[str, Path] | None = None) -> GateResult:
    """Write a standalone Hugging Face model to ``out_dir`` after the audit gate: the run's
    adapter (final, best or a round's) merged into the base weights, the tokenizer and a model
    card (README.md) with the privacy and evaluation figures. Return the gate's verdict."""
    from privatune.common.lora import merged_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / REPORT).is_file():
        raise FileNotFoundError(f"{run_dir}: no {REPORT}; a merged export needs the run's report "
                                "(the base model, the job and the evaluation figures for its card)")
    report = RunReport.read(run_dir / REPORT)
    base = Path(base_model) if base_model else Path(report.base_model)
    _check_base_model(base, report.base_model)
    source = select_adapter(run_dir, which)
    gate = _gate(run_dir, force_reason, ledgers)
    _check_destination(out_dir, overwrite)

    def build(staging: Path) -> None:
        model, tokenizer = merged_model(base, source.adapter)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = model_card(report, gate, source, base, force_reason)
        (staging / "README.md").write_text(card, encoding="utf-8")

    _release(run_dir, out_dir, overwrite, source, which, True, gate, force_reason, build)
    return gate


def _check_base_model(base: Path, used: str) -> None:
    """The base model must be readable here (a directory, or a hub id in the local cache)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"base model {str(base)!r} cannot be read here (the run used "
                                f"{used!r}); point --base-model at a copy of it ({err})") from err


# ------------------------------------------------------------------------------ model card


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _round(report: RunReport, number: int | None) -> RoundRecord | None:
    return next((r for r in report.rounds if r.round == number), None)


def model_card(report: RunReport, gate: GateResult, source: ExportSource, base: Path,
               force_reason: str | None) -> str:
    """The README.md of a merged export: what the model is, what it cost each site, how it did."""
    audits, findings = gate.audits, gate.findings
    config = report.config
    privacy, federation = config.get("privacy", {}), config.get("federation", {})
    lora, training = config.get("lora", {}), config.get("training", {})
    trained = [r for r in report.rounds if r.round >= 1]
    sites = sorted(set(report.sites) | {a.name for a in audits})
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [privatune, federated-learning, differential-privacy, dp-sgd, lora]", "---", "",
             f"# privatune run {report.run_id}: {source.label}, merged", "",
             f"A causal language model: the base model `{report.base_model}` with the LoRA adapter "
             f"of {source.label} of a federated, differentially private fine-tuning run merged "
             "into its weights. It loads with `AutoModelForCausalLM.from_pretrained(<this "
             "directory>)` and `AutoTokenizer.from_pretrained(<this directory>)`; PEFT is not "
             "needed.", ""]
    if findings:
        lines += [f"**Released despite privacy audit findings** (forced; recorded reason: "
                  f"{force_reason}):", ""] + [f"- {finding}" for finding in findings] + [""]
    lines += ["## Training", "",
              f"- base model: `{report.base_model}`" + (f" (merged from `{base}`)"
                                                       if str(base) != report.base_model else ""),
              f"- rounds: {len(trained)} completed of {federation.get('rounds', 'n/a')} planned; "
              f"this model is {source.label}",
              f"- sites: {len(sites)} ({', '.join(sites) or 'none'})",
              f"- LoRA: rank {lora.get('r', 'n/a')}, alpha {lora.get('alpha', 'n/a')}, "
              f"target modules {', '.join(lora.get('target_modules', [])) or 'n/a'}",
              f"- DP-SGD at each site: {training.get('local_steps', 'n/a')} local steps per round, "
              f"expected batch size {training.get('batch_size', 'n/a')}, learning rate "
              f"{training.get('learning_rate', 'n/a')}, clipping norm "
              f"{training.get('max_grad_norm', 'n/a')}", ""]
    lines += _privacy_section(report, gate, privacy)
    lines += _evaluation_section(report, source)
    return "\n".join(lines)


def _privacy_section(report: RunReport, gate: GateResult, privacy: dict) -> list[str]:
    audits = gate.audits
    units = sorted({str(row.release.privacy_unit) for a in audits for row in a.rounds
                    if row.release.privacy_unit})
    unit = ", ".join(units) or str(privacy.get("unit", "record"))
    lines = ["## Privacy", "",
             f"Privacy unit: **{unit}** ("
             + ("all records of one patient form one DP example" if unit == "patient"
                else "each record is one DP example" if unit == "record" else "per site")
             + "). Each site trained with DP-SGD (Opacus: Poisson sampling, per-sample clipping, "
             "Gaussian noise) and its (ε, δ) covers every adapter update it sent; this model is "
             "post-processing of those updates. ε is cumulative over everything the site's "
             "ledger records (this run, and earlier runs on the same ledger), whichever round "
             "is exported.", "",
             "| site | ε (the site's accountant) | accountant | ε recomputed (dp-accounting, "
             "same method) | ε (RDP, a looser bound) | δ | ε budget | rounds taken part | audit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for audit in audits:
        accountants = sorted({r.accountant for r in audit.rounds}
                             or ({str(audit.accountant)} if getattr(audit, "accountant", None) else set()))
        summary = report.sites.get(audit.name)
        taken = ", ".join(map(str, summary.rounds_participated)) if summary else ""
        verdict = describe_audit(audit, gate)
        if not audit.ok:
            verdict += ": " + "; ".join(([audit.chain_error] if audit.chain_error else [])
                                        + audit.problems)
        lines.append(f"| {audit.name} | {_fmt(audit.recorded_epsilon, 3)} | "
                     f"{', '.join(accountants) or 'n/a'} | {_fmt(audit.recomputed_epsilon, 3)} | "
                     f"{_fmt(getattr(audit, 'rdp_epsilon', None), 3)} | "
                     f"{'n/a' if audit.delta is None else f'{audit.delta:g}'} | "
                     f"{'n/a' if audit.budget is None else f'{audit.budget:g}'} | "
                     f"{taken or '-'} | {verdict} |")
    for record in gate.unverified:
        summary = report.sites.get(record.site)
        taken = ", ".join(map(str, summary.rounds_participated)) if summary else ""
        lines.append(f"| {record.site} | {_fmt(record.epsilon, 3)} (as reported) | "
                     f"{record.accountant or 'n/a'} | n/a | n/a | "
                     f"{'n/a' if record.delta is None else f'{record.delta:g}'} | "
                     f"{'n/a' if record.epsilon_budget is None else f'{record.epsilon_budget:g}'} | "
                     f"{taken or '-'} | {NOT_VERIFIED}: ledger not collected |")
    if audits and report.rounds:
        lines += ["", "Each audited ledger was checked against the coordinator's record of the "
                  "run: it holds every ledger head the site reported and lists every update the "
                  "coordinator received from it."]
    lines += _unverified_lines(gate)
    lines += ["", "Not covered by DP: the example counts, training losses and held-out losses the "
              "sites' policies let out (listed in each site's ledger as non-private releases). "
              "The tokenizer is the base model's, never trained on private data.", ""]
    return lines


def _unverified_lines(gate: GateResult) -> list[str]:
    """The sites whose ledger the gate did not have, said in the card (a forced export only)."""
    if not gate.unverified:
        return []
    return ["", f"**{NOT_VERIFIED.capitalize()}** (released with `--force`):", "",
            *[f"- {r.site}: its ledger was not collected; its ε is as it reported it to the "
              "coordinator, checked by no one" for r in gate.unverified]]


def _evaluation_section(report: RunReport, source: ExportSource) -> list[str]:
    base, chosen = _round(report, 0), _round(report, source.round)
    final = report.rounds[-1] if report.rounds else None
    columns = [("base model (round 0)", base), (f"this model (round {source.round})", chosen)]
    if final is not None and final is not chosen:
        columns.append((f"final round ({final.round})", final))
    lines = ["## Evaluation", "",
             "Perplexity (lower is better) on held-out data: the coordinator's own held-out set "
             "(central), pooled over the sites' held-out splits (federated), and each site's.", "",
             "| | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]

    def row(label: str, get, shown=_fmt) -> None:
        lines.append(f"| {label} | " + " | ".join(
            shown(get(record)) if record is not None else "n/a" for _, record in columns) + " |")

    row("central held-out perplexity", lambda r: r.evaluation.global_perplexity)
    row("federated held-out perplexity", lambda r: r.evaluation.federated_perplexity)
    for site in sorted(report.sites):
        row(f"{site} held-out perplexity", lambda r, s=site: r.evaluation.site_perplexity.get(s))
    # any other numeric figure of the rounds' evaluation (e.g. generation scores), as recorded
    extra = sorted({key for _, r in columns if r is not None
                    for key in _numeric_figures(r.evaluation.to_json())})
    for key in extra:
        label = key.replace("global_generation.", "central generation ").replace(
            "site_generation.", "generation at ").replace(".", " ")
        row(label, lambda r, k=key: _numeric_figures(r.evaluation.to_json()).get(k),
            lambda value: "n/a" if value is None else
            str(int(value)) if value.is_integer() else f"{value:.3f}")
    local = {s: v.local_only_perplexity for s, v in report.sites.items()
             if v.local_only_perplexity is not None}
    if local:
        lines += ["", "Local-only baseline (each site training alone with the same budget), "
                  "held-out perplexity: " + ", ".join(f"{s} {v:.2f}" for s, v in local.items()) + "."]
    best, flags = best_round(report.rounds), overfitting_flags(report.rounds)
    if best is not None:
        lines += ["", f"Best round of the run: {best.round} ({METRIC_NAMES[best.metric]} "
                  f"{best.perplexity:.2f})."]
    if flags:
        lines += ["", "Possible overfitting flagged in the run:"] + [f"- {f.describe()}" for f in flags]
    return lines + [""]


_PERPLEXITY_KEYS = {"global_perplexity", "federated_perplexity", "site_perplexity"}


def _numeric_figures(data: dict, prefix: str = "") -> dict[str, float]:
    figures: dict[str, float] = {}
    for key, value in data.items():
        if not prefix and key in _PERPLEXITY_KEYS:
            continue
        if isinstance(value, dict):
            figures.update(_numeric_figures(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[f"{prefix}{key}"] = float(value)
    return figures
