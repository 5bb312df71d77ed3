"""Tool estimates: the base's map, and the older guide's names for it."""

from __future__ import annotations

from collections.abc import Mapping

from runcycles import Unit
from runcycles.adapters import ToolEstimateConfig, ToolEstimateMap

__all__ = ["ToolEstimateConfig", "ToolEstimateMap", "ToolRiskConfig", "ToolRiskMap"]


def ToolRiskConfig(
    risk_points: int, action_kind: str | None = None, unit: Unit | str | None = None
) -> ToolEstimateConfig:
    """Older name of :class:`ToolEstimateConfig` (``risk_points`` is its ``estimate``)."""
    return ToolEstimateConfig(risk_points, action_kind, unit)


def ToolRiskMap(
    mapping: Mapping[str, int | ToolEstimateConfig] | None = None,
    default_risk: int = 1,
    default_unit: Unit | str = Unit.RISK_POINTS,
) -> ToolEstimateMap:
    """Older name of :class:`ToolEstimateMap` (``default_risk`` is its ``default_estimate``)."""
    return ToolEstimateMap(dict(mapping or {}), default_risk, default_unit)
