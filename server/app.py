"""The coordinator as a Flower ServerApp: Flower's Grid as the transport of ``Coordinator``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from privatune.common.config import load_job_config
from privatune.common.protocol import arrayrecord_to_state, state_to_arrayrecord
from privatune.common.protocol import (ADAPTER_KEY, EVALUATE, REQUEST_KEY, TRAIN, EvaluateReply,
                                       EvaluateRequest, TrainReply, TrainRequest)
from privatune.server.coordinator import Coordinator
from privatune.server.coordinator_settings import CoordinatorSettings
from privatune.server.report import RunReport
from privatune.server.report_files import write_report
from privatune.server.site_keys import SiteKeys
from privatune.common.secure_protocol import SECURE, SecureReply, SecureRequest
from privatune.server.transport import EvaluateResult, SecureResult, TrainResult


class FlowerTransport:
    """Sends requests through a Flower Grid and turns replies and silences into results.

    With ``site_keys`` (a deployment, where every node authenticated with a registered key) each
    node is the site its key is bound to; without (simulation) nodes are not told apart.
    """

    def __init__(self, grid: Grid, site_keys: SiteKeys | None = None):
        self.grid, self.site_keys = grid, site_keys

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def node_sites(self) -> dict[int, str] | None:
        """The site each connected node authenticated as, from the key the SuperLink holds for
        it; None without site keys."""
        return None if self.site_keys is None else self.site_keys.sites_of(self.grid.get_nodes())

    def _exchange(self, requests: Mapping[int, TrainRequest | EvaluateRequest], kind: str,
                  state: Mapping[str, torch.Tensor],
                  timeout_s: float) -> tuple[list[tuple[int, Message]], list[str]]:
        """Send each node its request and the adapter; good replies by node, and failures."""
        adapter = state_to_arrayrecord(state)
        return self._send({node_id: RecordDict({ADAPTER_KEY: adapter,
                                                REQUEST_KEY: ConfigRecord(request.to_record())})
                           for node_id, request in requests.items()}, kind, timeout_s)

    def _send(self, contents: Mapping[int, RecordDict], kind: str,
              timeout_s: float) -> tuple[list[tuple[int, Message]], list[str]]:
        """Send each node its content; good replies by node, and failures.

        Every reply is attributed to the node its request went to (through the request's message
        id, which the Grid assigns while sending): an error reply may come from the SuperLink
        (node unavailable) rather than from the node, with the SuperLink as its source.
        """
        messages = [Message(content=content, dst_node_id=node_id, message_type=kind)
                    for node_id, content in contents.items()]
        replies = list(self.grid.send_and_receive(messages, timeout=timeout_s))
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        good, failures, answered = [], [], set()
        for reply in replies:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                failures.append(f"node {node}: {reply.error.reason}")
            else:
                good.append((node, reply))
        failures += [f"node {node}: no reply within {timeout_s:g} s" for node in contents
                     if node not in answered]
        return good, failures

    def secure(self, requests: Mapping[int, SecureRequest], state: Mapping[str, torch.Tensor] | None,
               timeout_s: float) -> tuple[list[SecureResult], list[str]]:
        """One stage of a secure round at each node (message type ``train.secure``), the
        adapter beside it where given."""
        adapter = None if state is None else state_to_arrayrecord(state)
        contents = {}
        for node_id, request in requests.items():
            content = request.to_content()
            if adapter is not None:
                content[ADAPTER_KEY] = adapter
            contents[node_id] = content
        replies, failures = self._send(contents, SECURE, timeout_s)
        results = []
        for node, message in replies:
            try:
                answer = SecureReply.from_content(requests[node].plan.stage, message.content)
            except (ValueError, KeyError) as err:
                failures.append(f"node {node}: malformed reply: {err}")
                continue
            results.append(SecureResult(node, answer.reply, answer.secagg))
        return results, failures

    def train(self, requests: Mapping[int, TrainRequest], state: Mapping[str, torch.Tensor],
              timeout_s: float) -> tuple[list[TrainResult], list[str]]:
        """Each node's own request (it carries that site's ledger head) and the adapter."""
        replies, failures = self._exchange(requests, TRAIN, state, timeout_s)
        results = []
        for node, message in replies:
            try:
                reply = TrainReply.from_record(message.content)
                adapter = _adapter(message.content) if reply.accepted else {}
            except ValueError as err:
                failures.append(f"node {node}: malformed reply: {err}")
                continue
            results.append(TrainResult(node, reply, adapter))
        return results, failures

    def evaluate(self, requests: Mapping[int, EvaluateRequest], state: Mapping[str, torch.Tensor],
                 timeout_s: float) -> tuple[list[EvaluateResult], list[str]]:
        """Each node's own request (addressed to its site) and the adapter."""
        replies, failures = self._exchange(requests, EVALUATE, state, timeout_s)
        results = []
        for node, message in replies:
            try:
                results.append(EvaluateResult(node, EvaluateReply.from_record(message.content)))
            except ValueError as err:
                failures.append(f"node {node}: malformed reply: {err}")
        return results, failures


def _adapter(content: RecordDict) -> dict[str, torch.Tensor]:
    """The update an accepted train reply carries; an error if it has none."""
    record = content.get(ADAPTER_KEY)
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"an accepted update without its adapter (no ArrayRecord {ADAPTER_KEY!r})")
    return arrayrecord_to_state(record)


SettingsResolver = Callable[[Context], CoordinatorSettings]


def site_keys_from_run_config(context: Context) -> SiteKeys | None:
    """Deployment: which site each key is (run config ``site-keys``, written by ``privatune
    coordinator``); None where it is not given (simulation, a run submitted by hand)."""
    path = str(context.run_config.get("site-keys", ""))
    return SiteKeys.read(Path(path)) if path else None


def settings_from_run_config(context: Context) -> CoordinatorSettings:
    """Deployment: the job file, model, output dir and evaluation set come from the run config."""
    config = context.run_config
    job = load_job_config(str(config["job-config"]))
    central = str(config.get("central-eval", ""))
    keys = site_keys_from_run_config(context)  # the run's sites, recorded in its checkpoints
    return CoordinatorSettings(job=job, model_dir=Path(str(config["model-dir"])),
                               out_dir=Path(str(config["out-dir"])),
                               run_id=str(context.run_id),
                               central_eval=Path(central) if central else None,
                               sites=() if keys is None else tuple(k.site for k in keys.keys))


def make_server_app(resolve_settings: SettingsResolver = settings_from_run_config,
                    on_summary: Callable[[RunReport], None] | None = None,
                    progress: Callable[[str], None] = print) -> ServerApp:
    """A ServerApp that runs the federation and writes the report (or hands it to a caller)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = resolve_settings(context)
        transport = FlowerTransport(grid, site_keys_from_run_config(context))
        summary = Coordinator(settings, transport, progress).run()
        if on_summary is not None:
            on_summary(summary)
        else:
            write_report(summary, settings.out_dir)

    return app


app = make_server_app()
