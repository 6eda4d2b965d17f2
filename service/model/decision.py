"""The bundle's decision rule: which class is called from the calibrated probabilities, and when.

Without a rule a bundle's label is the most probable class. With one (``card.decision``), the positive
class is called whenever its probability reaches the threshold chosen at training (an operating point,
e.g. for high sensitivity), and otherwise the most probable of the other classes. Probabilities are never
changed by the rule: it reads them.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field


class DecisionOutcome(BaseModel):
    """What the rule said for one image: the threshold applied and whether the positive class was called."""

    positive_class: str
    threshold: float
    positive: bool = Field(description="P(positive_class) >= threshold.")
    rule: str


class Decision(BaseModel):
    """card.json ``decision``: the positive class, its probability threshold, and the rule in words."""

    model_config = ConfigDict(extra="allow", frozen=True)

    positive_class: str = Field(min_length=1, description="One of the card's classes.")
    threshold: float = Field(gt=0.0, lt=1.0, description="Call the positive class when its probability >= this.")
    rule: str = Field(
        min_length=1,
        description="The rule for people, e.g. 'COVID suspected when P(COVID) >= 0.23 (chosen on "
        "source-held-out validation for sensitivity >= 0.97)'.",
    )

    @property
    def target_sensitivity(self) -> float | None:
        """The sensitivity the threshold was chosen for, where the card records it (an extra: older cards lack it,
        and /model shows the card as written)."""
        value = (self.model_extra or {}).get("target_sensitivity")
        return float(value) if value is not None else None

    def is_positive(self, probabilities: Mapping[str, float]) -> bool:
        """Whether ``probabilities`` (every class of the card) reach the threshold for the positive class."""
        return probabilities[self.positive_class] >= self.threshold

    def label(self, probabilities: Mapping[str, float]) -> str:
        """The positive class if it reaches the threshold, else the most probable of the other classes."""
        if self.is_positive(probabilities):
            return self.positive_class
        others = [name for name in probabilities if name != self.positive_class]
        return max(others, key=lambda name: probabilities[name])  # ties: the first in class order, as argmax

    def outcome(self, probabilities: Mapping[str, float]) -> DecisionOutcome:
        """The rule applied to one image's probabilities."""
        return DecisionOutcome(
            positive_class=self.positive_class,
            threshold=self.threshold,
            positive=self.is_positive(probabilities),
            rule=self.rule,
        )
