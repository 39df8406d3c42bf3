"""Which node is which site, in a round: the site a request is addressed to, the nodes that are
asked, and the replies whose site may be recorded. Where nodes authenticate, a node is the site
its key is bound to (``server.site_keys``); where they do not (a simulation), a site is known by
the name its replies report."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from privatune.common.certs import CertError, check_node_name
from privatune.server.transport import Result, Transport


def addressee(sites: Mapping[int, str] | None, node_id: int) -> str:
    """The site a request to ``node_id`` is addressed to ("": unaddressed, no authentication)."""
    return "" if sites is None else sites[node_id]


def _is_site_name(name: str) -> bool:
    """Site names end up in file names and reports: the rule of hospital key names."""
    try:
        check_node_name(name)
    except CertError:
        return False
    return True


def _shown(name: str) -> str:
    """A reported name in a failure line: quoted, escaped and cut short."""
    return repr(name[:64]) + ("..." if len(name) > 64 else "")


def addressable(transport: Transport, ids: Sequence[int], progress: Callable[[str], None]
                ) -> tuple[list[int], Mapping[int, str] | None]:
    """The nodes to ask and the site each is bound to by its key (None: nodes are not
    authenticated). A node whose key is bound to no site is not asked: whatever it answered
    could not be recorded, and a site must not spend budget on a refused reply."""
    sites = transport.node_sites()
    if sites is None:
        return list(ids), None
    unbound = [node for node in ids if node not in sites]
    if unbound:
        progress(f"  not asked: node(s) {', '.join(map(str, unbound))}, whose keys are "
                 "bound to no site (nodes.public_keys)")
    return [node for node in ids if node in sites], sites


def identified(results: Sequence[Result], sites: Mapping[int, str] | None,
               failures: list[str]) -> list[Result]:
    """The replies whose site may be recorded: a valid site name and, where nodes are bound
    to sites by key, the site bound to the node that answered. Any other reply is refused
    before anything of it is recorded (tally, ledger head, epsilon, update, metrics): a node
    speaking for another site would rewrite that site's record."""
    kept = []
    for result in results:
        node, claimed = result.node_id, result.reply.site
        if not _is_site_name(claimed):
            failures.append(f"node {node}: reply refused: it reports site {_shown(claimed)}, "
                            "not a site name (1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit)")
        elif sites is not None and claimed != sites.get(node):
            bound = f"site {sites[node]!r}" if node in sites else "no site"
            failures.append(f"node {node}: reply refused: it claims site {_shown(claimed)}, "
                            f"but its key is bound to {bound}; nothing of it is recorded")
        else:
            kept.append(result)
    return kept


def state_identity(transport: Transport, progress: Callable[[str], None]) -> None:
    """Say how this run tells sites apart."""
    sites = transport.node_sites()
    if sites is None:
        progress("nodes are not authenticated here: each site is known by the name its "
                 "replies report (two nodes reporting one name are both left out)")
        return
    bound = ", ".join(f"{site} = node {node}" for node, site in sorted(sites.items(),
                                                                  key=lambda i: i[1]))
    progress("sites are known by their registered keys: "
             + (bound or "no connected node's key is bound to a site"))
