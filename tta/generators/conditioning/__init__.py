"""Conditioners shared by the generators (DESIGN.md section 3): `Conditioner`, the values they
produce bundled by route (`Conditioning`), and `ConditionedModel`, a generator's named set of them."""

from tta.generators.conditioning.base import (
    ROUTES,
    Conditioner,
    Conditioning,
    MissingInputError,
    Route,
    drop_mask,
)
from tta.generators.conditioning.owner import ConditionedModel

__all__ = ["ROUTES", "ConditionedModel", "Conditioner", "Conditioning", "MissingInputError", "Route", "drop_mask"]
