"""The coordinator as a Flower ServerApp: Flower's Grid as the transport of ``Coordinator``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from privatune.common.config import load_job_config
from privatune.common.lora import arrayrecord_to_state, state_to_arrayrecord
from privatune.common.protocol import (ADAPTER_KEY, EVALUATE, METRICS_KEY, REQUEST_KEY, STATUS_KEY, TRAIN,
                             EvaluateReply, EvaluateRequest, TrainReply, TrainRequest)
from privatune.server.coordinator import Coordinator, CoordinatorSettings, TrainResult
from privatune.server.report import write_report


class FlowerTransport:
    """Sends requests through a Flower Grid and turns replies and silences into results."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def _exchange(self, node_ids: Sequence[int], kind: str, request: Mapping,
                  state: Mapping[str, torch.Tensor], timeout_s: float) -> tuple[list[Message], list[str]]:
        adapter = state_to_arrayrecord(state)
        messages = [Message(content=RecordDict({ADAPTER_KEY: adapter,
                                                REQUEST_KEY: ConfigRecord(dict(request))}),
                            dst_node_id=node_id, message_type=kind)
                    for node_id in node_ids]
        message_ids = list(self.grid.push_messages(messages))
        destination = dict(zip(message_ids, node_ids))
        deadline = time.monotonic() + timeout_s
        good, failures, answered = [], [], set()
        while len(answered) < len(message_ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([m for m in message_ids if m not in answered]):
                message_id = reply.metadata.reply_to_message_id
                answered.add(message_id)
                # an error reply may come from the SuperLink (node unavailable), not the node:
                # name the node the request went to
                node = destination.get(message_id, reply.metadata.src_node_id)
                if reply.has_error():
                    failures.append(f"node {node}: {reply.error.reason}")
                else:
                    good.append(reply)
            if len(answered) < len(message_ids):
                time.sleep(0.2)
        failures += [f"node {destination[m]}: no reply within {timeout_s:g} s" for m in message_ids
                     if m not in answered]
        return good, failures

    def train(self, node_ids: Sequence[int], request: TrainRequest,
              state: Mapping[str, torch.Tensor], timeout_s: float) -> tuple[list[TrainResult], list[str]]:
        replies, failures = self._exchange(node_ids, TRAIN, request.to_record(), state, timeout_s)
        results = []
        for reply in replies:
            status, metrics = reply.content[STATUS_KEY], reply.content[METRICS_KEY]
            train_reply = TrainReply(
                site=str(status["site"]), accepted=bool(status["accepted"]),
                reason=str(status["reason"]), num_examples=int(metrics.get("num_examples", 0)),
                epsilon=float(metrics.get("epsilon", 0.0)), delta=float(metrics.get("delta", 0.0)),
                epsilon_budget=float(metrics.get("epsilon_budget", 0.0)),
                noise_multiplier=float(metrics.get("noise_multiplier", 0.0)),
                train_loss=metrics.get("train_loss"))
            adapter = (arrayrecord_to_state(reply.content[ADAPTER_KEY])
                       if train_reply.accepted else {})
            results.append(TrainResult(reply.metadata.src_node_id, train_reply, adapter))
        return results, failures

    def evaluate(self, node_ids: Sequence[int], request: EvaluateRequest,
                 state: Mapping[str, torch.Tensor], timeout_s: float) -> tuple[list[EvaluateReply], list[str]]:
        replies, failures = self._exchange(node_ids, EVALUATE, request.to_record(), state, timeout_s)
        return [EvaluateReply(site=str(r.content[STATUS_KEY]["site"]),
                              num_examples=int(r.content[METRICS_KEY].get("num_examples", 0)),
                              eval_loss=r.content[METRICS_KEY].get("eval_loss"))
                for r in replies], failures


SettingsResolver = Callable[[Context], CoordinatorSettings]


def settings_from_run_config(context: Context) -> CoordinatorSettings:
    """Deployment: the job file, model, output dir and evaluation set come from the run config."""
    config = context.run_config
    job = load_job_config(str(config["job-config"]))
    central = str(config.get("central-eval", ""))
    return CoordinatorSettings(job=job, model_dir=Path(str(config["model-dir"])),
                               out_dir=Path(str(config["out-dir"])),
                               run_id=str(context.run_id),
                               central_eval=Path(central) if central else None)


def make_server_app(resolve_settings: SettingsResolver = settings_from_run_config,
                    on_summary: Callable[[dict], None] | None = None,
                    progress: Callable[[str], None] = print) -> ServerApp:
    """A ServerApp that runs the federation and writes the report (or hands it to a caller)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = resolve_settings(context)
        summary = Coordinator(settings, FlowerTransport(grid), progress).run()
        if on_summary is not None:
            on_summary(summary)
        else:
            write_report(summary, settings.out_dir)

    return app


app = make_server_app()
