"""The wheel installs one namespace, ``privatune``, and its command runs from a fresh environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from privatune.common.extras import EXTRA_MODULES

REPO = Path(__file__).resolve().parents[1]
GENERIC_NAMES = ("common", "client", "server", "simulations")


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    # a fresh environment sees only what is installed in it: no PYTHONPATH from the caller
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _without_extras(purelib: Path, into: Path) -> Path:
    """A directory that lends every installed dependency except the extras' packages (and the
    project's own editable privatune): links to the project environment's site-packages."""
    extras = tuple(name for modules in EXTRA_MODULES.values() for name in modules)
    into.mkdir()
    for entry in purelib.iterdir():
        name = entry.name.lower()
        if name.startswith(extras + ("privatune", "__editable__")) or name.endswith(".pth"):
            continue
        (into / entry.name).symlink_to(entry)
    return into


def test_wheel_installs_only_the_privatune_namespace(tmp_path, make_site):
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
    lent = _without_extras(Path(sysconfig.get_paths()["purelib"]), tmp_path / "lent")
    (site_packages / "zz_dependencies.pth").write_text(f"{lent}\n")

    probe = ("import importlib.util, privatune.server.app, privatune.client.app, privatune.common;"
             "import privatune.common.ledger as ledger;"
             f"assert ledger.__file__.startswith({str(site_packages)!r}), ledger.__file__;"
             f"assert all(importlib.util.find_spec(n) is None for n in {GENERIC_NAMES!r})")
    _run(venv / "bin" / "python", "-c", probe, cwd=tmp_path)
    help_text = _run(venv / "bin" / "privatune", "--help", cwd=tmp_path).stdout
    assert "node" in help_text and "coordinator" in help_text and "simulate" in help_text

    # without any extra, a hospital's node validates its site and states what leaves it
    extras = sorted(name for modules in EXTRA_MODULES.values() for name in modules)
    _run(venv / "bin" / "python", "-c",
         f"import importlib.util; assert all(importlib.util.find_spec(n) is None for n in {extras!r})",
         cwd=tmp_path)
    checked = _run(venv / "bin" / "privatune", "node", "--site", make_site("st-mary"), "--check",
                   cwd=tmp_path).stdout
    assert "What leaves this site" in checked and "check only" in checked
