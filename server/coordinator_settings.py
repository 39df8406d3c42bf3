"""What one coordinator run is given: the job, the base model, the output directory, the run
id, the coordinator's own held-out notes, and whether it resumes and evaluates each round."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from privatune.common.config import JobConfig


@dataclass(frozen=True)
class CoordinatorSettings:
    job: JobConfig
    model_dir: Path
    out_dir: Path
    run_id: str
    central_eval: Path | None = None
    # continue the run of the newest checkpoint in out_dir (after a crash), if it is this job's
    # (common.run_record.resume_refusal); False: a new run, refused where checkpoints exist
    resume: bool = True
    # the sites the job runs with, where known before it starts (a simulation's): recorded in
    # the checkpoints, and a checkpoint of other sites is not resumed
    sites: tuple[str, ...] = ()
    # False: only the final adapter is evaluated (a site's local-only model, whose base is the
    # federation's round 0 and whose rounds nobody reads)
    evaluate_each_round: bool = True
