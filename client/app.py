"""The hospital node as a Flower ClientApp: a thin shell around ``client.node.SiteNode``.

The site policy file is found from the node's config (``site-policy``, set by the hospital
when it starts its SuperNode); in a simulation a resolver maps each virtual node to its site.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.common.protocol import arrayrecord_to_state, state_to_arrayrecord
from privatune.common.protocol import ADAPTER_KEY, REQUEST_KEY, EvaluateRequest, TrainRequest

PolicyResolver = Callable[[Context], Path]


def policy_from_node_config(context: Context) -> Path:
    """Deployment: the hospital passes ``--node-config "site-policy='/path/hospital.yaml'"``."""
    try:
        return Path(str(context.node_config["site-policy"]))
    except KeyError as err:
        raise ValueError("this SuperNode was started without node config 'site-policy' "
                         "(the path of the hospital's site policy file)") from err


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
        content = outcome.reply.to_record()
        if outcome.reply.accepted:
            content[ADAPTER_KEY] = state_to_arrayrecord(outcome.state)
        return Message(content=content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        node = node_for(context)
        request = EvaluateRequest.from_record(message.content[REQUEST_KEY])
        reply = node.evaluate(request, arrayrecord_to_state(message.content[ADAPTER_KEY]))
        return Message(content=reply.to_record(), reply_to=message)

    return app


app = make_client_app()
