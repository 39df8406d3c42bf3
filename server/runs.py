"""Submitting the ServerApp as a Flower run and following it to the end.

``flwr run`` packs the staged app bundle, sends it to the SuperLink with the run config and
returns the run id; ``flwr log --stream`` prints the run's log as it grows and ends with the
run; ``flwr ls --run-id`` tells its status (``finished:completed`` when it went well). A run
that would resume checkpoints of another run or job is refused before it is submitted.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

from privatune.common.config import load_job_config, to_dict
from privatune.common.flower_process import flower_env
from privatune.common.run_record import RunIdentity, latest_checkpoint, resume_refusal
from privatune.server.app_bundle import project_dir, stage_app
from privatune.server.deployment import CoordinatorDeployment, DeploymentError, Progress, say
from privatune.server.flwr_cli import flwr, flwr_command
from privatune.server.run_inputs import RunInputs
from privatune.server.site_keys import SiteKeys
from privatune.server.superlink import stop_process

FINISHED_OK = "finished:completed"


def check_resume(inputs: RunInputs) -> None:
    """A ``DeploymentError`` where the output directory holds checkpoints this job may not
    continue (``run_record.resume_refusal``: another job's config, other sites, a finished
    run), before anything is submitted: the ServerApp refuses them too, but only inside a
    Flower run that then fails."""
    latest = latest_checkpoint(inputs.out_dir)
    if latest is None:
        return
    job = to_dict(load_job_config(inputs.job_config))
    keys = SiteKeys.read(inputs.site_keys).keys if inputs.site_keys else ()
    sites = tuple(key.site for key in keys)
    try:
        refusal = resume_refusal(latest, RunIdentity.read(latest), job, sites)
    except ValueError as err:  # an unreadable state.json
        refusal = f"{err}; it is kept as it is: give the new run another output directory"
    if refusal:
        raise DeploymentError(refusal)


def submit_run(deployment: CoordinatorDeployment, inputs: RunInputs) -> int:
    """``flwr run <app> privatune --run-config <file>``; returns the Flower run id. A run that
    would resume checkpoints of another run or job is refused first (``check_resume``)."""
    for name, path in (("job config", inputs.job_config), ("model", inputs.model_dir)):
        if not path.exists():
            raise DeploymentError(f"{name} {path} does not exist")
    if inputs.central_eval and not inputs.central_eval.is_file():
        raise DeploymentError(f"run.central_eval: {inputs.central_eval} does not exist")
    check_resume(inputs)
    inputs.out_dir.mkdir(parents=True, exist_ok=True)
    config_file = deployment.home / "run-config.toml"
    config_file.write_text(inputs.to_toml(), encoding="utf-8")
    app = stage_app(project_dir(deployment.run.app_dir, deployment),
                    deployment.home.parent / "app-stage")
    answer: dict[str, Any] = flwr(deployment, "run", str(app),
                                  options=("--run-config", str(config_file)), timeout_s=300)
    if not answer.get("run-id"):
        raise DeploymentError(f"'flwr run' answered without a run id: {answer}")
    return int(answer["run-id"])


def run_status(deployment: CoordinatorDeployment, run_id: int) -> str:
    """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
    runs = flwr(deployment, "ls", "--run-id", str(run_id)).get("runs", [])
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


def follow_run(deployment: CoordinatorDeployment, run_id: int, progress: Progress = say,
               max_wait_s: float = 0.0, check_every_s: float = 60.0) -> str:
    """Print the run's log as it grows (``flwr log --stream``, which ends with the run) and
    return the final status. The status is also checked every ``check_every_s`` (a stream
    that broke is reopened); ``max_wait_s`` > 0 bounds the whole wait."""
    deadline = time.monotonic() + max_wait_s if max_wait_s > 0 else None
    streamer: subprocess.Popen | None = None
    reader: threading.Thread | None = None
    next_check = 0.0
    try:
        while True:
            if streamer is None or streamer.poll() is not None:
                if streamer is not None and reader is not None:
                    reader.join(timeout=5)  # show the last lines before the verdict
                    status = run_status(deployment, run_id)
                    if status.startswith("finished"):
                        return status
                    time.sleep(2)  # the stream broke while the run goes on: reopen it
                streamer, reader = _stream_log(deployment, run_id, progress)
                next_check = time.monotonic() + check_every_s
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} still running after {max_wait_s:g} s "
                                      "(run.max_wait_s); it keeps running on the SuperLink")
            if time.monotonic() > next_check:
                status = run_status(deployment, run_id)
                if status.startswith("finished"):
                    return status
                next_check = time.monotonic() + check_every_s
            time.sleep(0.5)
    finally:
        if streamer is not None and reader is not None:
            stop_process(streamer, timeout_s=5)
            reader.join(timeout=5)


def _stream_log(deployment: CoordinatorDeployment, run_id: int,
                progress: Progress) -> tuple[subprocess.Popen, threading.Thread]:
    streamer = subprocess.Popen([*flwr_command("log", str(run_id)), "--stream"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=flower_env(deployment.home), cwd=deployment.home,
                                start_new_session=True)

    def pump() -> None:
        assert streamer.stdout is not None
        for line in streamer.stdout:
            progress("  | " + line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return streamer, reader
