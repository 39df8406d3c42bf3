"""The app bundle (FAB) that ``flwr run`` packs, the SuperLink stores and every node runs.

``flwr run`` packs every ``.json``, ``.jsonl``, ``.yaml``, ``.md`` and ``.toml`` under the
app directory into the bundle; packing a staged copy that holds only ``pyproject.toml`` and
the apps' Python sources guarantees no data file, ledger, key or run output in the checkout
can ever travel with it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from privatune.server.deployment import CoordinatorDeployment, DeploymentError

APP_PACKAGES = ("common", "client", "server")
"""What the ServerApp and ClientApp import; nothing else goes into the app bundle."""

LEFT_OUT = (Path("common") / "base_model.py",)
"""Sources neither app imports: the demo model builder runs only where a run is set up."""


def project_dir(configured: str = "", deployment: CoordinatorDeployment | None = None) -> Path:
    """The privatune source checkout (``pyproject.toml`` with ``[tool.flwr.app]``)."""
    path = (deployment.resolve(configured) if deployment and configured
            else Path(__file__).resolve().parents[1])
    if not (path / "pyproject.toml").is_file():
        raise DeploymentError(f"{path}: no pyproject.toml; set run.app_dir to a privatune "
                              "source checkout (flwr run packs the app from there)")
    return path


def stage_app(source: Path, dest: Path) -> Path:
    """Copy only ``pyproject.toml`` and the apps' Python sources into ``dest`` (emptied
    first), the sources under ``privatune/<package>/``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(source / "pyproject.toml", dest / "pyproject.toml")
    for package in APP_PACKAGES:
        for file in sorted((source / package).rglob("*.py")):
            if "__pycache__" in file.parts or file.relative_to(source) in LEFT_OUT:
                continue
            # staged as the installed namespace, so the components `privatune.server.app:app`
            # and `privatune.client.app:app` import from the bundle as they do from a wheel
            target = dest / "privatune" / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
    return dest
