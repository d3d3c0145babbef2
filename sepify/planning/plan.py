"""``Plan``: a versioned, human-readable recipe of which conv becomes which pair.

A plan maps conv qualnames to ``(rank, order)``. ``convert(..., plan=plan)``
applies one; ``sepify.load`` re-applies the plan saved next to a
``.safetensors`` file to a fresh instance of the original architecture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sepify.errors import PlanError
from sepify.io.atomic import JsonExportable
from sepify.vocab import LAYOUTS, ORDERS

__all__ = ["Plan", "LayerPlan", "PLAN_FORMAT", "PLAN_VERSION", "read_json"]

PLAN_FORMAT = "sepify.plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """What to do with one conv: its depth multiplier, order and (optionally) layout.

    ``layout`` is ``"grouped"`` or ``"rank-major"`` for pairs at rank > 1
    (see :attr:`SeparableConv.layouts`: same function, different speed);
    None runs the pair's default layout.
    """

    rank: int
    order: str
    layout: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise PlanError(f"a plan's rank must be a positive integer, got {self.rank!r}")
        if self.order not in ORDERS:
            raise PlanError(f"a plan's order must be one of {ORDERS}, got {self.order!r}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise PlanError(f"a plan's layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout is not None and self.rank == 1:
            raise PlanError(f"a plan's layout applies only at rank > 1, got layout {self.layout!r} at rank 1")


@dataclass(frozen=True)
class Plan(JsonExportable):
    """Layer qualname -> :class:`LayerPlan`; convs not listed are left alone.

    Examples:
        >>> plan = Plan({"layer1.0.conv1": LayerPlan(2, "dw-pw")})
        >>> Plan.from_json(plan.to_json()) == plan
        True
        >>> print(plan.to_json(), end="")
        {
          "format": "sepify.plan",
          "version": 1,
          "layers": {
            "layer1.0.conv1": {
              "rank": 2,
              "order": "dw-pw"
            }
          }
        }
    """

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and dict(self.layers) == dict(other.layers)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, v.rank, v.order, v.layout) for k, v in self.layers.items())))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION}
        if self.meta:
            d["meta"] = dict(self.meta)
        d["layers"] = {k: _layer_dict(v) for k, v in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> Plan:
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f'{source} is not a sepify plan (no "format": "{PLAN_FORMAT}" field)')
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"{source} is a version {data.get('version')!r} plan; this sepify reads version {PLAN_VERSION}"
            )
        layers = data.get("layers")
        if not isinstance(layers, Mapping):
            raise PlanError(f'{source} has no "layers" mapping')
        meta = data.get("meta", {})
        if not isinstance(meta, Mapping):
            raise PlanError(f'{source}: "meta" must be a mapping, got {type(meta).__name__}')
        parsed = {}
        for name, spec in layers.items():
            if not isinstance(spec, Mapping) or "rank" not in spec or "order" not in spec:
                raise PlanError(f'{source}: layer {name!r} needs a "rank" and an "order"')
            try:
                parsed[str(name)] = LayerPlan(spec["rank"], spec["order"], spec.get("layout"))
            except PlanError as e:
                raise PlanError(f"{source}: layer {name!r}: {e}") from None
        return cls(parsed, dict(meta))

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> Plan:
        """Read a plan from JSON text (a string starting with ``{``) or from a file path."""
        data, source = read_json(text_or_path, "plan")
        return cls.from_dict(data, source)

    @classmethod
    def from_json_text(cls, text: str, source: str = "plan") -> Plan:
        """Read a plan from JSON text; ``source`` names it in error messages."""
        return cls.from_dict(_parsed(text, source, "plan"), source)


def read_json(text_or_path: str | os.PathLike[str], what: str) -> tuple[Any, str]:
    """JSON text (a string starting with ``{``) or a file's, parsed, and how messages name it; one
    :class:`PlanError` sentence for anything unreadable (``what``: ``"plan"``, ``"audit"``)."""
    if isinstance(text_or_path, str) and text_or_path.lstrip().startswith("{"):
        return _parsed(text_or_path, what, what), what
    path = Path(text_or_path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PlanError(f"{path}: cannot read the {what} ({e.strerror or e}); check the path") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: is not UTF-8 text, so not a {what}; regenerate it with sepify audit") from e
    return _parsed(text, str(path), what), str(path)


def _parsed(text: str, source: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from e
    except RecursionError as e:
        raise PlanError(f"{source} is nested too deeply to be a {what}; regenerate it") from e


def _layer_dict(layer: LayerPlan) -> dict[str, Any]:
    """No layout, no key: plans without layout choices read as they always did."""
    d: dict[str, Any] = {"rank": layer.rank, "order": layer.order}
    if layer.layout is not None:
        d["layout"] = layer.layout
    return d
