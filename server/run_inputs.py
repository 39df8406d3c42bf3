"""What a deployed run is submitted with: the run-config keys of the ServerApp.

``[tool.flwr.app.config]`` in ``pyproject.toml`` names them (``job-config``, ``model-dir``,
``out-dir``, ``central-eval``, ``site-keys``); here they are resolved to absolute paths from
the job config, ``coordinator.yaml`` and the command line, and written in
``flwr run --run-config`` syntax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from privatune.common.config import JobConfig
from privatune.server.deployment import CoordinatorDeployment, Progress, say


@dataclass(frozen=True)
class RunInputs:
    """The run-config keys of ``[tool.flwr.app.config]``, as absolute paths."""

    job_config: Path
    model_dir: Path
    out_dir: Path
    central_eval: Path | None = None
    # which site each hospital key is (server.site_keys), written when the keys are registered
    site_keys: Path | None = None

    def to_toml(self) -> str:
        values = {"job-config": self.job_config, "model-dir": self.model_dir,
                  "out-dir": self.out_dir,
                  "central-eval": self.central_eval if self.central_eval else "",
                  "site-keys": self.site_keys if self.site_keys else ""}
        return "".join(f"{key} = {json.dumps(str(value) if value else '')}\n"
                       for key, value in values.items())


def base_model_dir(deployment: CoordinatorDeployment, job: JobConfig,
                   progress: Progress = say) -> Path:
    """``run.model_dir`` if set, else the job's ``model.base``: the builtin demo model (built
    once from public text and cached; this imports torch) or a local Hugging Face model."""
    if deployment.run.model_dir:
        return deployment.resolve(deployment.run.model_dir)
    from privatune.common.model_source import resolve_base_model  # imports torch

    return resolve_base_model(job.model, job.seed, progress)


def run_inputs(deployment: CoordinatorDeployment, job_config: Path, model_dir: Path,
               out_dir: Path | None = None) -> RunInputs:
    """The run's inputs; ``out_dir`` (``--out``) overrides ``run.out_dir``."""
    run = deployment.run
    return RunInputs(job_config=job_config.resolve(), model_dir=model_dir.resolve(),
                     out_dir=out_dir.resolve() if out_dir else deployment.resolve(run.out_dir),
                     central_eval=deployment.resolve(run.central_eval) if run.central_eval else None)
