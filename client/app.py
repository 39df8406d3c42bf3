"""The hospital node as a Flower ClientApp: a thin shell around ``client.node.SiteNode``.

The site policy file is found from the node's config (``site-policy``, set by the hospital
when it starts its SuperNode); in a simulation a resolver maps each virtual node to its site.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.lora import arrayrecord_to_state, state_to_arrayrecord
from privatune.common.protocol import (ADAPTER_KEY, METRICS_KEY, REQUEST_KEY, STATUS_KEY, EvaluateRequest,
                             TrainRequest)

PolicyResolver = Callable[[Context], Path]


def policy_from_node_config(context: Context) -> Path:
    """Deployment: the hospital passes ``--node-config "site-policy='/path/hospital.yaml'"``."""
    try:
        return Path(str(context.node_config["site-policy"]))
    except KeyError as err:
        raise ValueError("this SuperNode was started without node config 'site-policy' "
                         "(the path of the hospital's site policy file)") from err


def _metrics(values: dict[str, float | int | None]) -> MetricRecord:
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def make_client_app(resolve_policy: PolicyResolver = policy_from_node_config) -> ClientApp:
    """A ClientApp whose nodes are the sites the resolver names (one SiteNode per policy file)."""
    app = ClientApp()
    nodes: dict[Path, SiteNode] = {}

    def node_for(context: Context) -> SiteNode:
        path = resolve_policy(context).resolve()
        if path not in nodes:
            nodes[path] = SiteNode(load_site_policy(path))
        return nodes[path]

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = node_for(context)
        request = TrainRequest.from_record(message.content[REQUEST_KEY])
        outcome = node.train(request, arrayrecord_to_state(message.content[ADAPTER_KEY]))
        reply = outcome.reply
        content = RecordDict({
            STATUS_KEY: ConfigRecord({"site": reply.site, "accepted": reply.accepted,
                                      "reason": reply.reason}),
            METRICS_KEY: _metrics({"num_examples": reply.num_examples, "epsilon": reply.epsilon,
                                   "delta": reply.delta, "epsilon_budget": reply.epsilon_budget,
                                   "noise_multiplier": reply.noise_multiplier,
                                   "train_loss": reply.train_loss}),
        })
        if reply.accepted:
            content[ADAPTER_KEY] = state_to_arrayrecord(outcome.state)
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        node = node_for(context)
        request = EvaluateRequest.from_record(message.content[REQUEST_KEY])
        reply = node.evaluate(request, arrayrecord_to_state(message.content[ADAPTER_KEY]))
        content = RecordDict({
            STATUS_KEY: ConfigRecord({"site": reply.site}),
            METRICS_KEY: _metrics({"num_examples": reply.num_examples,
                                   "eval_loss": reply.eval_loss}),
        })
        return Message(content=content, reply_to=message)

    return app


app = make_client_app()
