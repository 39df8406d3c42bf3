"""The PNG figures of every report (run, plan, audit, empirical audit) share one look.

matplotlib is imported only when a figure is drawn, with the file-only backend: nodes and
coordinators run headless, and commands that draw nothing should not pay for the import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from privatune.common.extras import require_extra


@contextmanager
def report_figure(path: Path, columns: int = 1, size: tuple[float, float] = (7, 4),
                  legend_location: str = "best") -> Iterator[list[Any]]:
    """Yields ``columns`` axes; on exit adds legend and grid to each and writes ``path``.

    The file is written whole or not at all (temporary name, then rename), so a crash while
    drawing never leaves a truncated PNG next to a finished report.
    """
    require_extra("report", f"drawing {path.name}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        for axis in axes[0]:
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7, loc=legend_location)
            axis.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        fig.savefig(partial, dpi=110, format="png")
        partial.replace(path)
    finally:
        plt.close(fig)
