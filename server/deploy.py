"""What ``privatune coordinator`` does on Flower's deployment engine, from the parts.

``serve`` runs only the SuperLink (long-lived), registering the hospitals' keys;
``coordinate`` connects to that SuperLink (or starts one for the run), registers keys,
submits the ServerApp (``privatune.server.app:app``) as a Flower run and follows it to the
end. Everything is done with Flower's own tools (``flower-superlink``, ``flwr``) as
subprocesses, so it can be repeated by hand with the commands it prints. The parts:

- ``deployment``: ``coordinator.yaml``, typed and validated;
- ``superlink``: the SuperLink process;
- ``flwr_cli``: the ``flwr`` command line and its connection file;
- ``node_registry``: hospitals' public keys and which nodes are online;
- ``app_bundle``: what ``flwr run`` may pack (sources only);
- ``run_inputs`` and ``runs``: what a run is submitted with, submitting and following it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from privatune.server.deployment import CoordinatorDeployment, DeploymentError, Progress, say
from privatune.server.flwr_cli import write_connection
from privatune.server.node_registry import register_all, registration_command, write_site_keys
from privatune.server.run_inputs import RunInputs
from privatune.server.site_keys import SiteKeyFile
from privatune.server.runs import FINISHED_OK, follow_run, submit_run
from privatune.server.superlink import is_listening, start_superlink, stop_process, superlink


def serve(deployment: CoordinatorDeployment, extra_keys: Sequence[SiteKeyFile] = (),
          progress: Progress = say) -> int:
    """Run only the SuperLink (long-lived), registering keys, until interrupted."""
    if is_listening(deployment.superlink.address):
        raise DeploymentError(f"something already listens on {deployment.superlink.address}")
    write_connection(deployment)
    process = start_superlink(deployment, progress)
    try:
        register_all(deployment, extra_keys, progress)
        progress("SuperLink ready; stop it with Ctrl-C. Register more hospitals with: "
                 + registration_command(deployment, Path("HOSPITAL.pub"))
                 + " and add each to nodes.public_keys (SITE: HOSPITAL.pub): a node takes part "
                 "in runs as the site its key is bound to there")
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process(process)


def coordinate(deployment: CoordinatorDeployment, inputs: RunInputs,
               extra_keys: Sequence[SiteKeyFile] = (), progress: Progress = say) -> int:
    """Start or connect to the SuperLink, register keys, submit the run (with which site each
    key is), follow it; 0 when the run finished as completed."""
    with superlink(deployment, progress):
        sites = register_all(deployment, extra_keys, progress)
        inputs = dataclasses.replace(inputs, site_keys=write_site_keys(deployment, sites))
        run_id = submit_run(deployment, inputs)
        progress(f"submitted run {run_id} (ServerApp privatune.server.app:app, job "
                 f"{inputs.job_config}, out {inputs.out_dir}); following its log")
        status = follow_run(deployment, run_id, progress, max_wait_s=deployment.run.max_wait_s)
        progress(f"run {run_id}: {status}")
        if status != FINISHED_OK:
            checkpoints = inputs.out_dir / "checkpoints"
            progress("the run did not complete (its log above says why)"
                     + (f"; submitting it again resumes from the last checkpoint in {checkpoints}"
                        if any(checkpoints.glob("round_*/state.json")) else ""))
            return 1
        progress(f"report: {inputs.out_dir / 'report.md'}")
        return 0
