"""The `distill` section: the teacher, where the student starts from, and the weighted losses it learns from.
Each loss's own keys are validated by that loss (plmscale/distill/losses/) when a recipe is loaded."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from plmscale.config.base import StrictModel


class DistillLossConfig(StrictModel):
    """One entry of `distill.losses`: a registered loss (plmscale/distill/losses/), its weight, and its own
    keys, which that loss validates."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = Field(1.0, ge=0)


class DistillConfig(StrictModel):
    """Teacher -> student: the student (the recipe's `model`, shallower and/or narrower) starts from
    `student_layers` of the teacher's layers (default: evenly spaced), sliced to its width, and learns from
    `losses` (default: the teacher's temperature-softened outputs, weight alpha, plus the hard loss)."""

    teacher: str = Field(description="a model directory written by `plmscale train`")
    student_layers: list[int] | None = None
    temperature: float | None = Field(None, gt=0, description="of the default soft loss; default 2.0")
    alpha: float | None = Field(None, ge=0, le=1, description="weight of the default soft loss; default 0.5")
    losses: list[DistillLossConfig] | None = Field(
        None, description="weighted losses, e.g. [{name: logits, temperature: 2}, {name: hidden, weight: 1}]"
    )
    teacher_cache: str | None = Field(
        None,
        description="a cache of the teacher's top-k logits (`plmscale distill-cache`), read instead of running "
        "the teacher: logits and hard losses only",
    )

    @model_validator(mode="after")
    def _losses_or_alpha(self) -> DistillConfig:
        given = [key for key in ("temperature", "alpha") if getattr(self, key) is not None]
        if self.losses is not None and given:
            raise ValueError(f"distill.{given[0]} sets the default losses; with distill.losses, weight each")
        if self.losses is not None and not self.losses:
            raise ValueError("distill.losses must not be empty")
        return self

    def loss_entries(self) -> list[tuple[str, float, dict[str, Any]]]:
        """(name, weight, the loss's own keys) of each loss, the defaults spelled out."""
        if self.losses is None:
            alpha, temperature = self.alpha if self.alpha is not None else 0.5, self.temperature or 2.0
            return [("logits", alpha, {"temperature": temperature}), ("hard", 1 - alpha, {})]
        return [(entry.name, entry.weight, dict(entry.model_extra)) for entry in self.losses]
