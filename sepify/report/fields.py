"""What every per-layer row of a report says of its conv, declared once (torch-free: a saved audit re-plans
without it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sepify.vocab import SkipReason

__all__ = ["LayerFields", "tuples_as_lists"]


@dataclass(frozen=True)
class LayerFields:
    """What every per-layer row says of its conv (:meth:`sepify.planning.choice.Geometry.report_fields`).

    ``input_size``/``output_size`` are the spatial sizes (``(L,)``, ``(H, W)`` or ``(D, H, W)``) at the first
    call (None if never called); ``calls`` counts the calls on the example inputs. ``kind`` is ``conv1d`` ...
    ``conv3d`` or ``conv_transpose1d`` ... ``conv_transpose3d``.
    """

    name: str
    skip_reason: SkipReason | None
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    bias: bool
    calls: int
    input_size: tuple[int, ...] | None
    output_size: tuple[int, ...] | None

    def _fields_dict(self, first: tuple[str, ...]) -> dict[str, Any]:
        """Every field as JSON-ready values, ``first`` leading (CSV columns and JSON keys keep that order)."""
        d = tuples_as_lists(dataclasses.asdict(self))
        d["skip_reason"] = self.skip_reason.value if self.skip_reason else None
        return {**{k: d.pop(k) for k in first}, **d}


def tuples_as_lists(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no tuples: shapes, strides and sizes become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
