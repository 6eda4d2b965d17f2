"""Which trained network ships: a pure rule over the comparison rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

WINNER_RULE = (
    "highest macro-F1 on the selection split (source-held-out validation when the run has one; the test splits "
    "play no part); among the networks within {tolerance} of that best the one with the fewest parameters wins; "
    "a network whose bundle would exceed max_bundle_mb = {max_bundle_mb} is not shipped"
)


def pick_winner(
    rows: Sequence[Mapping[str, Any]],
    *,
    score: str = "selection_macro_f1",
    tolerance: float = 0.005,
    max_bundle_mb: float = 100.0,
) -> str | None:
    """The ``arch`` of the row that ships, or None when no row fits in ``max_bundle_mb``.

    Rows need ``arch``, ``score``, ``parameters`` and ``bundle_mb``. Only shippable rows compete: the best score
    among them sets the bar, and every row within ``tolerance`` of it (inclusive) is a candidate; the candidate
    with the fewest parameters wins (then the higher score, then the name, so ties are deterministic).
    """
    shippable = [r for r in rows if r["bundle_mb"] <= max_bundle_mb]
    if not shippable:
        return None
    best = max(float(r[score]) for r in shippable)
    candidates = [r for r in shippable if float(r[score]) >= best - tolerance - 1e-12]
    return str(min(candidates, key=lambda r: (r["parameters"], -float(r[score]), r["arch"]))["arch"])
