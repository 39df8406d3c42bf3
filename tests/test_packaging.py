"""The wheel installs one namespace, ``privatune``, and its command runs from a fresh environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERIC_NAMES = ("common", "client", "server", "simulations")


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    # a fresh environment sees only what is installed in it: no PYTHONPATH from the caller
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_wheel_installs_only_the_privatune_namespace(tmp_path):
    source = tmp_path / "source"  # built from a copy: setuptools' build/ stays out of the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", tmp_path / "dist", source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("privatune-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"privatune", wheel.name.split("-py3")[0] + ".dist-info"}

    # a hospital's `pip install privatune` brings no simulator, plotting or tracking packages
    metadata = next(zipfile.ZipFile(wheel).read(name).decode() for name in zipfile.ZipFile(wheel).namelist()
                    if name.endswith(".dist-info/METADATA"))
    required = [line for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert [line for line in required for name in ("simulation", "clinosim", "matplotlib", "tensorboard")
            if name in line] == []
    assert any(line.startswith("Requires-Dist: flwr") for line in required)

    # A fresh environment with the wheel; the project's own environment only lends the
    # dependencies (a bare path line in a .pth: its editable install of privatune stays off).
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    _run(venv / "bin" / "pip", "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    site_packages = Path(_run(venv / "bin" / "python", "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                              cwd=tmp_path).stdout.strip())
    installed = {p.name for p in site_packages.iterdir()}
    assert not installed & set(GENERIC_NAMES), installed
    (site_packages / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    probe = ("import importlib.util, privatune.server.app, privatune.client.app, privatune.common;"
             "import privatune.common.ledger as ledger;"
             f"assert ledger.__file__.startswith({str(site_packages)!r}), ledger.__file__;"
             f"assert all(importlib.util.find_spec(n) is None for n in {GENERIC_NAMES!r})")
    _run(venv / "bin" / "python", "-c", probe, cwd=tmp_path)
    help_text = _run(venv / "bin" / "privatune", "--help", cwd=tmp_path).stdout
    assert "node" in help_text and "coordinator" in help_text and "simulate" in help_text
