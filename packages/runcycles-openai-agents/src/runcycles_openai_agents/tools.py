"""Tool estimate policy: what each tool call holds, in which unit, under which action kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from runcycles import Unit

__all__ = ["ToolEstimateConfig", "ToolEstimateMap", "ToolRiskConfig", "ToolRiskMap"]


@dataclass(frozen=True)
class ToolEstimateConfig:
    """What one tool call holds.

    Attributes:
        estimate: Amount held per call, in ``unit`` (0: no reservation at all).
        action_kind: The reservation's action kind (default ``"tool.call"``).
        unit: Unit of ``estimate`` (default: the map's ``default_unit``).
    """

    estimate: int
    action_kind: str = "tool.call"
    unit: Unit | str | None = None


@dataclass(frozen=True)
class ToolEstimateMap:
    """Estimate per tool name; tools missing from ``mapping`` hold ``default_estimate``.

    Attributes:
        mapping: Tool name to an ``int`` (in ``default_unit``) or a :class:`ToolEstimateConfig`.
        default_estimate: What an unmapped tool holds (0: unmapped tools are not metered).
        default_unit: Unit of ``int`` values (default ``RISK_POINTS``).
    """

    mapping: Mapping[str, int | ToolEstimateConfig] = field(default_factory=dict)
    default_estimate: int = 1
    default_unit: Unit | str = Unit.RISK_POINTS

    def lookup(self, tool: str) -> ToolEstimateConfig:
        """Return the estimate, unit and action kind of one call of ``tool``."""
        entry = self.mapping.get(tool, self.default_estimate)
        if not isinstance(entry, ToolEstimateConfig):
            entry = ToolEstimateConfig(entry)
        if isinstance(entry.estimate, bool) or not isinstance(entry.estimate, int):
            raise TypeError(f"tool estimate of {tool!r} must be an int, got {entry.estimate!r}")
        return ToolEstimateConfig(
            entry.estimate, entry.action_kind, entry.unit or self.default_unit
        )


def ToolRiskConfig(
    risk_points: int, action_kind: str = "tool.call", unit: Unit | str | None = None
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
