"""The release gate: a model leaves the coordinator only if every site's audit passes.

Exporting a run with a site over budget or a broken ledger is refused unless forced with a
reason; the forced export, its reason and the audit findings are recorded in the run's
hash-chained ``releases.jsonl``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from privatune.common.audit import audit_path
from privatune.common.ledger import SiteLedger


class ReleaseRefused(RuntimeError):
    """The run failed its privacy audit and the export was not forced."""


def export_adapter(run_dir: Path, out_dir: Path, force_reason: str | None = None) -> list[str]:
    """Copy the run's final adapter to ``out_dir`` after the audit gate; return the findings."""
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no final adapter (expected {adapter}/adapter_config.json)")
    findings = []
    for audit in audit_path(run_dir):
        if audit.chain_error:
            findings.append(f"{audit.name}: {audit.chain_error}")
        findings += [f"{audit.name}: {problem}" for problem in audit.problems]
    if findings and not force_reason:
        raise ReleaseRefused("export refused: " + "; ".join(findings)
                             + " (use --force --reason '...' to override; the reason is recorded)")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new export directory")
    shutil.copytree(adapter, out_dir)
    SiteLedger(run_dir / "releases.jsonl").append("model_export", {
        "destination": str(out_dir.resolve()), "forced": bool(findings),
        "reason": force_reason or "", "findings": findings})
    return findings
