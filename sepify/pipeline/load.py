"""``sepify.load_converted``: a converted model rebuilt from safetensors weights and its plan, without pickle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from sepify.core.cost import exact_rank
from sepify.core.functional import CONV_TYPES
from sepify.core.modules import SeparableConv
from sepify.errors import ConfigError, ModelLoadError, PlanError
from sepify.graph.conv_kinds import inherits_forward, plain_view
from sepify.graph.rewrite import replace_submodule
from sepify.io.load import load_weights_into, safetensors_metadata
from sepify.io.paths import PLAN_METADATA_KEY, plan_path
from sepify.planning.plan import Plan

__all__ = ["load_converted", "apply_planned_layout"]


def load_converted(
    model: nn.Module, weights_path: str | os.PathLike[str], plan: Plan | str | os.PathLike[str] | None = None
) -> nn.Module:
    """Rebuild a converted model from safetensors weights and its plan, without pickle.

    Args:
        model: a fresh instance of the *original* architecture (it is modified
            in place and returned; on any error it is left as it was).
        weights_path: the ``.safetensors`` file ``sepify convert --format
            safetensors`` wrote.
        plan: the plan, or its path; defaults to the plan stored in the
            weights file's metadata, else ``<name>.plan.json`` beside it.

    Raises:
        PlanError: the plan cannot be read or does not fit ``model``.
        ModelLoadError: the weights cannot be read or do not fit.

    Examples:
        After ``sepify convert torchvision.models:resnet18 --format safetensors``:

        ```python
        model = sepify.load_converted(torchvision.models.resnet18(), "resnet18.sep.safetensors")
        ```
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise ModelLoadError(f"{weights_path}: no such weights file; pass the .safetensors file sepify wrote")
    plan = _plan_of(weights_path, plan)
    pairs = {}
    for name, layer in plan.layers.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError as e:
            raise PlanError(
                f"the plan names {name!r}, which this model does not have; pass the original architecture"
            ) from e
        if not isinstance(conv, CONV_TYPES):
            raise PlanError(f"the plan names {name!r}, which is a {type(conv).__name__} here, not a convolution")
        geometry: Any = conv
        if not inherits_forward(conv):  # a known subclass converts through its plain view (same geometry)
            geometry = plain_view(conv)
            if geometry is None:
                raise PlanError(f"the plan names {name!r}, a {type(conv).__name__} sepify does not know how to convert")
        limit = exact_rank(
            geometry.in_channels, geometry.out_channels, tuple(geometry.kernel_size), geometry.groups, layer.order
        )
        if layer.rank > limit:
            raise PlanError(
                f"the plan gives {name!r} rank {layer.rank}, above its exact rank {limit} for {layer.order}; "
                "regenerate the plan for this model"
            )
        pair = SeparableConv.shaped_like(geometry, layer.rank, layer.order)
        if layer.layout is not None:
            apply_planned_layout(pair, name, layer.layout)
        pairs[name] = (conv, pair)
    for name, (_, pair) in pairs.items():
        replace_submodule(model, name, pair)
    try:
        load_weights_into(model, weights_path)
    except BaseException:
        for name, (conv, _) in pairs.items():  # leave the caller's model as it was
            replace_submodule(model, name, conv)
        raise
    return model


def _plan_of(weights_path: Path, plan: Plan | str | os.PathLike[str] | None) -> Plan:
    """The plan given, else the one in the weights' metadata, else the ``.plan.json`` beside them."""
    if isinstance(plan, Plan):
        return plan
    if plan is None:
        stored = safetensors_metadata(weights_path).get(PLAN_METADATA_KEY)
        if stored is not None:
            return Plan.from_json_text(stored, f"the plan stored in {weights_path}")
    plan_file = Path(plan) if plan is not None else plan_path(weights_path)
    if not plan_file.is_file():
        raise PlanError(
            f"{plan_file}: no such plan file, and {weights_path} stores none; pass the plan sepify wrote with it"
        )
    return Plan.from_json(plan_file)


def apply_planned_layout(pair: SeparableConv, name: str, layout: str) -> None:
    """Run ``pair`` in the layout a plan recorded for ``name``; a PlanError when the pair has no such layout."""
    try:
        pair.layout = layout
    except ConfigError as e:
        raise PlanError(f"the plan's layout for {name!r} does not fit its pair: {e}") from e
