"""Progress bars for long work (base-model build, a site's local steps, evaluation, generation).

Shown only to a person at a terminal: when standard error is a file or a pipe (CI, a service's
log, Flower's node processes) the bar is off, so logs stay readable.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``items`` with a transient progress bar on a terminal, and silently elsewhere."""
    stream = sys.stderr
    quiet = not (hasattr(stream, "isatty") and stream.isatty())
    yield from tqdm(items, desc=description, total=total, leave=False, disable=quiet, file=stream,
                    dynamic_ncols=True)
