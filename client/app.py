"""The hospital node as a Flower ClientApp: a thin shell around ``client.node.SiteNode``.

The site policy file is found from the node's config (``site-policy``, set by the hospital
when it starts its SuperNode); in a simulation a resolver maps each virtual node to its site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from privatune.client.node import SiteNode
from privatune.client.policy import load_site_policy
from privatune.client.secure_node import SecureRound
from privatune.common.protocol import arrayrecord_to_state, state_to_arrayrecord
from privatune.common.protocol import ADAPTER_KEY, REQUEST_KEY, EvaluateRequest, TrainRequest
from privatune.common.secure_protocol import SecureRequest

# where the node keeps its secure round's session between stages: its own runtime's state
# (Flower keeps a node's context across messages, in a fresh ClientApp process too)
SESSION_KEY = "privatune.secure-session"

PolicyResolver = Callable[[Context], Path]

# A process's site nodes, by policy file. Kept here, not in a ClientApp: Flower's Ray backend
# passes the ClientApp to its actor with every message, so each message unpickles a fresh one,
# and a node kept there would load its records, tokenize them and open its ledger again for
# each of a secure step's four stages. A node is built again when its policy file's bytes or
# its data file change, so a site's edited policy applies from the next message. Each answer
# re-reads the ledger under the site's lock (``SiteNode.answering``): a node kept here never
# counts a stale ledger.
_PROCESS_NODES: dict[Path, tuple[tuple[str, int, int], SiteNode]] = {}


def _inputs(policy_path: Path, data_path: Path) -> tuple[str, int, int]:
    """What a kept node was built from: the policy file's SHA-256, the data file's mtime and size."""
    data = data_path.stat()
    return hashlib.sha256(policy_path.read_bytes()).hexdigest(), data.st_mtime_ns, data.st_size


def process_node(policy_path: Path) -> SiteNode:
    """This process's node for the site whose policy file this is, built on first use and again
    whenever the policy file or the data file it names has changed."""
    path = policy_path.resolve()
    kept = _PROCESS_NODES.get(path)
    if kept is not None:
        try:
            if _inputs(path, kept[1].policy.data_path) == kept[0]:
                return kept[1]
        except OSError:
            pass  # a file gone: built again below, which reports it
    policy = load_site_policy(path)  # a missing or bad policy file: its own error, by line and key
    try:
        inputs = _inputs(path, policy.data_path)  # before the records are read: a later edit rebuilds
    except OSError:
        inputs = None
    node = SiteNode(policy)  # a missing data file: the node's own error
    if inputs is not None:
        _PROCESS_NODES[path] = (inputs, node)
    return node


def policy_from_node_config(context: Context) -> Path:
    """Deployment: the hospital passes ``--node-config "site-policy='/path/hospital.yaml'"``."""
    try:
        return Path(str(context.node_config["site-policy"]))
    except KeyError as err:
        raise ValueError("this SuperNode was started without node config 'site-policy' "
                         "(the path of the hospital's site policy file)") from err


def make_client_app(resolve_policy: PolicyResolver = policy_from_node_config) -> ClientApp:
    """A ClientApp whose nodes are the sites the resolver names (one SiteNode per policy file
    and process, ``process_node``)."""
    app = ClientApp()

    def node_for(context: Context) -> SiteNode:
        return process_node(resolve_policy(context))

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

    @app.train("secure")
    def secure(message: Message, context: Context) -> Message:
        node = node_for(context)
        request = SecureRequest.from_content(message.content)
        adapter = (arrayrecord_to_state(message.content[ADAPTER_KEY])
                   if ADAPTER_KEY in message.content else None)
        kept = context.state.get(SESSION_KEY)
        session = bytes(kept["session"]) if isinstance(kept, ConfigRecord) else None
        reply, session = SecureRound(node).answer(context.node_id, request, adapter, session)
        if session is None:
            context.state.pop(SESSION_KEY, None)
        else:
            context.state[SESSION_KEY] = ConfigRecord({"session": session})
        return Message(content=reply.to_content(), reply_to=message)

    return app


app = make_client_app()
