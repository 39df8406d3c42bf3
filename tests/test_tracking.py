"""Experiment tracking: TensorBoard event files after every round (read back with TensorBoard's
own reader), each round once after a resume, MLflow as an option, and clear errors."""

from __future__ import annotations

import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from privatune.common import extras
from privatune.common.config import ConfigError, load_job_config
from privatune.server import tracking
from privatune.server.rounds import RoundEvaluation, RoundRecord, RoundTraining
from privatune.server.tracking import open_tracker, round_scalars
from tests.test_coordinator import (Crash, FakeTransport, coordinator, crash_in_round, decline,
                                    update)


def scalars(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def record(number: int, central: float, loss: float | None = None) -> RoundRecord:
    training = (RoundTraining(participants=["alpha", "beta"], declined={"gamma": "over budget"},
                              aggregated=True, train_loss=loss, bytes_sent=3000, bytes_received=2000)
                if number else None)
    return RoundRecord(round=number, training=training,
                       evaluation=RoundEvaluation(global_perplexity=central, federated_perplexity=central + 1,
                                                  site_perplexity={"alpha": central - 1, "beta": None}),
                       epsilon={"alpha": 0.5 * number, "beta": 0.4 * number} if number else None)


def test_round_scalars_take_every_number_of_the_record():
    values = round_scalars(record(2, 20.0, loss=2.5))
    assert values == {
        "perplexity/central": 20.0, "perplexity/federated": 21.0, "perplexity/site/alpha": 19.0,
        "sites/participants": 2.0, "sites/declined": 1.0, "sites/failures": 0.0,
        "sites/evaluation_failures": 0.0, "training/aggregated": 1.0, "loss/train_mean": 2.5,
        "bytes/sent": 3000.0, "bytes/received": 2000.0, "epsilon/alpha": 1.0, "epsilon/beta": 0.8}


def test_coordinator_writes_tensorboard_events_every_round(tmp_path, tiny_model_dir):
    transport = FakeTransport({1: update(1, 100), 2: update(2, 300), 3: decline("over budget")})
    coord = coordinator(tmp_path, tiny_model_dir, transport, rounds=2)
    logged = []
    original = coord.tracker.log

    def log_and_read(rounds):  # the files are current after each round's hook
        original(rounds)
        logged.append(steps(scalars(tmp_path / "run" / "tensorboard"), "sites/participants"))

    coord.tracker.log = log_and_read
    coord.run()
    assert logged == [[0, 1], [0, 1, 2]]
    events = scalars(tmp_path / "run" / "tensorboard")
    tags = set(events.Tags()["scalars"])
    assert {"perplexity/federated", "perplexity/site/alpha", "perplexity/site/gamma", "epsilon/alpha",
            "epsilon/gamma", "sites/participants", "sites/declined", "loss/train_mean",
            "bytes/sent", "bytes/received"} <= tags
    assert [e.value for e in events.Scalars("sites/participants")] == [0.0, 2.0, 2.0]
    assert [e.value for e in events.Scalars("sites/declined")] == [1.0, 1.0]
    assert [e.value for e in events.Scalars("epsilon/alpha")] == [0.5, 1.0]


def test_resumed_run_shows_each_round_once(tmp_path, tiny_model_dir):
    behaviours = {1: update(1, 100), 2: update(2, 300), 3: update(3, 50)}
    transport = crash_in_round(FakeTransport(behaviours), 3)
    with pytest.raises(Crash):
        coordinator(tmp_path, tiny_model_dir, transport, rounds=3).run()
    log_dir = tmp_path / "run" / "tensorboard"
    assert steps(scalars(log_dir), "epsilon/alpha") == [1, 2]
    time.sleep(1.1)  # event files are named by the second they were opened: keep them in order
    coordinator(tmp_path, tiny_model_dir, FakeTransport(behaviours), rounds=3).run()
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    events = scalars(log_dir)
    assert steps(events, "epsilon/alpha") == [1, 2, 3]
    assert steps(events, "sites/participants") == [0, 1, 2, 3]


def test_tracking_key_in_the_job_config(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("tracking: mlflow\n")
    assert load_job_config(config).tracking == "mlflow"
    assert load_job_config(tmp_path / "job.yaml", ["tracking=none"]).tracking == "none"
    config.write_text("seed: 1\ntracking: wandb\n")
    with pytest.raises(ConfigError, match="line 2: tracking: 'wandb' is not one of tensorboard, mlflow, none"):
        load_job_config(config)


def test_none_writes_nothing(tmp_path):
    tracker = open_tracker("none", tmp_path, "r", {})
    tracker.log([record(0, 30.0), record(1, 25.0, 2.0)])
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def _without_extras(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(extras.EXTRA_MODULES, name, ("privatune_no_such_module",))


def test_mlflow_without_the_extra_fails_naming_it(tmp_path, monkeypatch):
    _without_extras(monkeypatch, "mlflow", "tracking")
    with pytest.raises(ConfigError, match=r"pip install 'privatune\[mlflow\]'"):
        open_tracker("mlflow", tmp_path, "r", {})
    with pytest.raises(ConfigError, match=r"tracking: tensorboard needs .*privatune\[tracking\]"):
        open_tracker("tensorboard", tmp_path, "r", {})


def test_simulate_stops_before_any_work_when_the_tracker_is_missing(tmp_path, monkeypatch, capsys):
    from privatune.common.cli import main

    _without_extras(monkeypatch, "mlflow")
    config = tmp_path / "job.yaml"
    config.write_text("tracking: mlflow\n")
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "pip install 'privatune[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_failing_tracker_does_not_stop_the_run(tmp_path):
    said = []

    class Broken(tracking.RunTracker):
        name = "broken"

        def _start(self, rounds):
            return set()

        def _write(self, step, values):
            raise OSError("disk full")

    tracker = Broken(tmp_path, "r", {}, progress=said.append)
    tracker.log([record(0, 30.0)])
    tracker.log([record(0, 30.0), record(1, 25.0, 2.0)])
    tracker.close()
    assert said == ["tracking (broken) failed and is off for the rest of this run: OSError: disk full"]


def test_mlflow_logs_rounds_to_a_local_store_and_resumes_without_duplicates(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    history = [record(0, 30.0), record(1, 25.0, 2.0), record(2, 22.0, 1.8)]
    config = {"seed": 3, "lora": {"r": 8}, "tracking": "mlflow"}
    first = open_tracker("mlflow", tmp_path, "run-7", config, progress=print)
    first.log(history[:2])  # then the coordinator "crashes"
    again = open_tracker("mlflow", tmp_path, "run-7", config, progress=print)
    again.log(history)
    again.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("privatune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-7" and run.data.params["lora.r"] == "8"
    assert run.info.status == "FINISHED"
    central = client.get_metric_history(run.info.run_id, "perplexity/central")
    assert sorted((m.step, m.value) for m in central) == [(0, 30.0), (1, 25.0), (2, 22.0)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "epsilon/alpha")] == [0.5, 1.0]
