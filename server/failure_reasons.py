"""A failure's one line for the run report (``failure_reason``), where an error reply may carry a
whole traceback, and the full texts of the failures it shortened (``FAILURE_LOG``)."""

from __future__ import annotations

import re

from privatune.server.rounds import RoundRecord

FAILURE_LOG = "failures.log"  # beside report.json: each failure's full text, by round
FAILURE_KEYS = ("failures", "evaluation_failures")  # of a round's JSON
REASON_CHARS = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# how Flower wraps what a ClientApp raised: "<class 'ValueError'>:<'...'>" (a SuperNode), with
# Ray's whole chained traceback inside in a simulation
_RAISED = re.compile(r"<class '([^']+)'>:<'(.*)'>\s*$", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)): "
                             r"(.*\S)", re.MULTILINE)
_NODE = re.compile(r"^node \d+: ")


def failure_reason(failure: str) -> str:
    """One line for a failure the report lists, where an error reply may carry hundreds: the
    exception a node raised (the first one a chained traceback names, the cause), after the
    ``node N:`` it came from.

    Flower's simulation passes a ClientApp's exception as Ray's whole chained traceback, and
    report.json is read by people and tools that need the reason, not the frames; the full
    text goes to ``FAILURE_LOG``.
    """
    text = _ANSI.sub("", failure).strip()
    wrapped = _RAISED.search(text)
    if wrapped or "\n" in text:
        node = _NODE.match(text)
        head = text[:wrapped.start()] if wrapped else node.group(0) if node else ""
        body = wrapped.group(2) if wrapped else text
        cause = next((m for m in _EXCEPTION_LINE.finditer(body)
                      if not m.group(1).endswith("ClientAppException")), None)
        last = ([line for line in body.splitlines() if line.strip()] or [""])[-1]
        if cause is not None:
            reason = f"{cause.group(1).rsplit('.', 1)[-1]}: {cause.group(2)}"
        elif "Message: " in body:
            reason = body.rsplit("Message: ", 1)[1]
        elif wrapped:
            reason = f"{wrapped.group(1).rsplit('.', 1)[-1]}: {last}"
        else:
            reason = last
        text = head + reason.strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS - 3] + "..."


def round_failures(record: RoundRecord) -> list[tuple[str, str]]:
    """A round's failures, each with the exchange it failed in."""
    training = record.training.failures if record.training else []
    return ([("training", f) for f in training]
            + [("evaluation", f) for f in record.evaluation.evaluation_failures])


def failure_log(rounds: list[RoundRecord]) -> str:
    """The full text of every failure the report shortened, by round; empty when none was."""
    return "\n".join(f"round {record.round} ({phase}): {failure}\n" for record in rounds
                     for phase, failure in round_failures(record)
                     if failure_reason(failure) != failure)
