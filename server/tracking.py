"""Experiment tracking: every round's figures, written as the run goes, for TensorBoard or MLflow.

The job config's ``tracking`` key picks where they go:

- ``tensorboard`` (default): event files under ``<run dir>/tensorboard``; watch them with
  ``tensorboard --logdir <run dir>/tensorboard``.
- ``mlflow``: a local MLflow store, ``<run dir>/mlflow/mlflow.db`` (SQLite; MLflow 3 refuses a
  plain ``mlruns`` folder by default), one MLflow run per privatune run, the job config as its
  parameters. MLflow is an optional extra (``pip install 'privatune[mlflow]'``) imported only
  here and only when chosen. Browse with
  ``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow/mlflow.db``.
- ``none``: nothing.

The coordinator calls ``RunTracker.log(rounds)`` with the whole round history after each
round's checkpoint; a tracker writes the rounds it has not written yet. That makes it
resume-safe: a restarted coordinator hands it the restored history, TensorBoard's writer starts
with ``purge_step=0`` (TensorBoard drops what an earlier process wrote and reads the history
written again, so each round shows once), and MLflow continues the MLflow run of the same
privatune run, skipping the rounds it already holds.

What is logged: every number of a round record (``round_scalars``), so a figure added to
``RoundRecord`` (for example generation scores) is tracked without touching this module; the
tags of the known ones are in ``TAGS``, lists of sites and failures become counts
(``COUNTED``), and anything else numeric is logged under its report.json key path. Tracking
is a by-product: if writing fails mid-run, the run goes on and says that tracking stopped.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from privatune.common.config import ConfigError
from privatune.common.extras import MissingExtraError, require_extra
from privatune.common.run_record import flat_config
from privatune.server.rounds import RoundRecord

TRACKERS = ("tensorboard", "mlflow", "none")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"
MLFLOW_EXPERIMENT = "privatune"
RUN_ID_TAG = "privatune.run_id"

# report.json keys of a round -> their tag (nested keys, e.g. a site, are appended with "/")
TAGS = {
    "global_perplexity": "perplexity/central",
    "federated_perplexity": "perplexity/federated",
    "site_perplexity": "perplexity/site",
    "epsilon": "epsilon",
    "train_loss": "loss/train_mean",
    "aggregated": "training/aggregated",
    "bytes_sent": "bytes/sent",
    "bytes_received": "bytes/received",
}
# keys whose value is a list or a mapping of texts: logged as how many there are
COUNTED = {
    "participants": "sites/participants",
    "declined": "sites/declined",
    "failures": "sites/failures",
    "evaluation_failures": "sites/evaluation_failures",
}
_SKIPPED = {"round"}  # the step, not a figure


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """Every finite number of a round record, by tag (see ``TAGS`` and ``COUNTED``)."""
    scalars: dict[str, float] = {}
    for key, value in record.to_json().items():
        if key in _SKIPPED:
            continue
        if key in COUNTED:
            if isinstance(value, (list, tuple, dict)):
                scalars[COUNTED[key]] = float(len(value))
            continue
        _flatten(TAGS.get(key, key), value, scalars)
    return scalars


def _flatten(tag: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        out[tag] = float(value)
    elif isinstance(value, (int, float)):
        if math.isfinite(value):
            out[tag] = float(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{tag}/{key}", item, out)
    # texts, lists (e.g. sample completions) and None carry no scalar


class RunTracker:
    """Writes the rounds of one run somewhere; this base class writes nothing (``none``).

    A backend implements ``_start`` (open, given the history already in hand; return the
    rounds the store already holds), ``_write`` (one round's scalars) and ``_close``.
    """

    name = "none"

    def __init__(self, out_dir: Path, run_id: str, config: Mapping[str, Any],
                 progress: Callable[[str], None] = print):
        self.out_dir, self.run_id, self.config, self.progress = Path(out_dir), run_id, config, progress
        self._written: set[int] | None = None  # rounds in the store; None until opened
        self._failed = False

    def log(self, rounds: Sequence[RoundRecord]) -> None:
        """Write every round of ``rounds`` not yet written (after each round's checkpoint)."""
        if self._failed:
            return
        try:
            if self._written is None:
                self._written = set(self._start(rounds))
            for record in sorted(rounds, key=lambda r: r.round):
                if record.round not in self._written:
                    self._write(record.round, round_scalars(record))
                    self._written.add(record.round)
            self._flush()
        except Exception as err:  # noqa: BLE001 - any backend fault; the federation goes on
            self._failed = True
            self.progress(f"tracking ({self.name}) failed and is off for the rest of this run: "
                          f"{type(err).__name__}: {err}")

    def close(self) -> None:
        if self._written is not None and not self._failed:
            try:
                self._close()
            except Exception as err:  # noqa: BLE001
                self.progress(f"tracking ({self.name}): closing failed: {err}")
        self._written = None

    # -- backend ---------------------------------------------------------------------------
    def _start(self, rounds: Sequence[RoundRecord]) -> set[int]:
        return {r.round for r in rounds}  # nothing is written: pretend all is

    def _write(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def _flush(self) -> None:
        pass

    def _close(self) -> None:
        pass


class TensorBoardTracker(RunTracker):
    """Event files under ``<out>/tensorboard``, flushed after every round."""

    name = "tensorboard"

    @property
    def log_dir(self) -> Path:
        return self.out_dir / TENSORBOARD_DIR

    def _start(self, rounds: Sequence[RoundRecord]) -> set[int]:
        from torch.utils.tensorboard import SummaryWriter

        earlier = any(self.log_dir.glob("events.out.tfevents.*"))
        # After a restart, purge_step=0 makes TensorBoard drop the events an earlier process
        # wrote; the whole history is then written again below, so each round shows once.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=0 if earlier else None)
        self.writer.add_text("run/config", "```json\n" + json.dumps(self.config, indent=2,
                                                                      default=str) + "\n```", 0)
        self.writer.add_text("run/id", self.run_id, 0)
        return set()

    def _write(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def _flush(self) -> None:
        self.writer.flush()

    def _close(self) -> None:
        self.writer.close()


_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


class MlflowTracker(RunTracker):
    """A local MLflow store under ``<out>/mlflow``; one MLflow run per privatune run."""

    name = "mlflow"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.out_dir / MLFLOW_DIR / 'mlflow.db').resolve()}"

    def _start(self, rounds: Sequence[RoundRecord]) -> set[int]:
        from mlflow.tracking import MlflowClient

        (self.out_dir / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(
                             MLFLOW_EXPERIMENT,
                             artifact_location=(self.out_dir / MLFLOW_DIR / "artifacts")
                             .resolve().as_uri()))
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{_quoted(self.run_id)}'",
            max_results=1)
        if found:  # a restarted coordinator: continue the same MLflow run
            self.mlflow_run_id = found[0].info.run_id
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
            return {int(m.step) for m in self.client.get_metric_history(self.mlflow_run_id, "round")}
        run = self.client.create_run(experiment_id, run_name=self.run_id,
                                     tags={RUN_ID_TAG: self.run_id})
        self.mlflow_run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(key, str(value)[:6000]) for key, value in flat_config(self.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.mlflow_run_id, params=params[start:start + 100])
        return set()

    def _write(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # "round" last: it marks the round as written (what a resumed tracker reads back)
        metrics = [Metric(_MLFLOW_KEY.sub("_", tag), value, now, step)
                   for tag, value in scalars.items()] + [Metric("round", float(step), now, step)]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.mlflow_run_id, metrics=metrics[start:start + 1000])

    def _close(self) -> None:
        self.client.set_terminated(self.mlflow_run_id)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def check_tracking(kind: str) -> None:
    """Stop with a clear error if the tracker ``kind`` cannot run here (before any work starts)."""
    if kind not in TRACKERS:
        raise ConfigError(f"tracking: {kind!r} is not one of {', '.join(TRACKERS)}")
    extra = {"tensorboard": "tracking", "mlflow": "mlflow"}.get(kind)
    try:
        if extra:
            require_extra(extra, f"tracking: {kind}")
    except MissingExtraError as err:
        raise ConfigError(f"{err}; or set tracking: none") from None


def open_tracker(kind: str, out_dir: Path, run_id: str, config: Mapping[str, Any],
                 progress: Callable[[str], None] = print) -> RunTracker:
    """The tracker ``kind`` names (the job config's ``tracking``), checked to be usable now,
    before any round runs; it opens its store at the first ``log``."""
    check_tracking(kind)
    backend = {"none": RunTracker, "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}[kind]
    return backend(out_dir, run_id, config, progress)
