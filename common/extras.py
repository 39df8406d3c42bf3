"""The optional parts of privatune, each an extra of the package, and one clear error when a
command needs one that is not installed.

A hospital's node needs none of them (``pip install privatune``). The coordinator draws its
report (``report``) and tracks its rounds (``tracking``); a researcher simulates a federation
on one machine (``simulation``: Flower's Ray engine and clinosim's hospitals).
"""

from __future__ import annotations

import importlib.util

# the modules each extra of pyproject.toml brings: checked, never imported, here
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "simulation": ("ray", "clinosim"),
    "report": ("matplotlib",),
    "tracking": ("tensorboard",),
    "mlflow": ("mlflow",),
}


class MissingExtraError(ValueError):
    """A command needs an extra of the package that this installation lacks."""


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def has_extra(extra: str) -> bool:
    return not missing_modules(extra)


def require_extra(extra: str, needed_for: str) -> None:
    """Stop, before any work, with what to install when ``extra`` is missing."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{needed_for} needs the optional extra '{extra}' (missing: {', '.join(missing)}): "
            f"pip install 'privatune[{extra}]', or pip install -e '.[{extra}]' in a checkout")
