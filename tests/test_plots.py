"""The shared figure helper writes a whole PNG or nothing."""

from pathlib import Path

import pytest

from privatune.common.plots import report_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_figure_is_written_whole_with_one_axis_per_column(tmp_path: Path) -> None:
    path = tmp_path / "figures" / "epsilon.png"
    with report_figure(path, columns=2) as axes:
        assert len(axes) == 2
        axes[0].plot([1, 2, 3], [0.5, 1.0, 2.0], label="site")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in path.parent.iterdir()) == ["epsilon.png"]


def test_failed_drawing_keeps_the_previous_figure(tmp_path: Path) -> None:
    path = tmp_path / "epsilon.png"
    with report_figure(path) as (axis,):
        axis.plot([1, 2], [1, 2])
    before = path.read_bytes()
    with pytest.raises(ZeroDivisionError), report_figure(path) as (axis,):
        axis.plot([1, 2], [1, 1 / 0])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epsilon.png"]
