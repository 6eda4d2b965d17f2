"""Canonical class names and the aliases accepted when reading datasets.

The classes a *bundle* predicts come from its card, never from this module: these names only
normalise folder names and CSV labels during training so that `COVID-19/` and `COVID/` mean the same class.
"""

from __future__ import annotations

import re

# Output order of the shipped three-class model; a four-class dataset adds "Lung Opacity".
DEFAULT_CLASSES: tuple[str, ...] = ("COVID", "Normal", "Viral Pneumonia")

_ALIASES: dict[str, str] = {
    "covid": "COVID",
    "covid19": "COVID",
    "covid-19": "COVID",
    "normal": "Normal",
    "viralpneumonia": "Viral Pneumonia",
    "pneumonia-viral": "Viral Pneumonia",
    "lungopacity": "Lung Opacity",
}


class UnknownLabelError(ValueError):
    """A dataset label that matches no known class."""


def canonical_label(name: str) -> str:
    """Map a dataset label such as ``Viral_Pneumonia`` or ``COVID-19`` to its canonical class name."""
    key = re.sub(r"[\s_]+", "", name.strip().lower())
    if key in _ALIASES:
        return _ALIASES[key]
    if key.replace("-", "") in _ALIASES:
        return _ALIASES[key.replace("-", "")]
    known = ", ".join(sorted(set(_ALIASES.values())))
    raise UnknownLabelError(f"Unknown class label {name!r}; expected one of: {known}.")


def order_classes(names: set[str] | list[str]) -> list[str]:
    """Return canonical class names in a stable output order: the default classes first, others sorted."""
    found = {canonical_label(n) for n in names}
    return [c for c in DEFAULT_CLASSES if c in found] + sorted(found - set(DEFAULT_CLASSES))
