"""sepify: rewrite a trained model's Conv2d layers into depthwise + pointwise pairs.

Typical use::

    import torch, sepify
    from torchvision.models import resnet18

    result = sepify.convert(resnet18().eval(), torch.randn(1, 3, 224, 224), plan=sepify.Budget(max_mac_ratio=0.6))
    print(result.report)

The package is laid out by pipeline stage (docs/development.md, "Project layout"):
``core`` (arithmetic, factorisation, the separable module), ``runtime``,
``graph`` (tracing, probing, candidates, rewriting), ``planning``,
``calibrate``, ``report``, ``io``, with :func:`convert`, :func:`audit` and
:func:`distill` orchestrating them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from sepify.errors import (
    BudgetError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    InputShapeError,
    ModelError,
    ModelLoadError,
    NothingConvertedError,
    OutputError,
    PlanError,
    SepifyError,
    SepifyWarning,
    TrainingError,
)

if TYPE_CHECKING:
    from sepify.calibrate.synthetic import synthesize_calibration
    from sepify.core.modules import (
        SeparableConv,
        SeparableConv1d,
        SeparableConv2d,
        SeparableConv3d,
        SeparableConvTranspose1d,
        SeparableConvTranspose2d,
        SeparableConvTranspose3d,
    )
    from sepify.graph.conv_kinds import register_conv
    from sepify.graph.tracing import register_leaf_module
    from sepify.options import Budget, Calibration, Distill, Selection, Timing
    from sepify.pipeline.audit import audit
    from sepify.pipeline.convert import ConversionResult, convert, load_converted
    from sepify.pipeline.deploy import Deployment, Deployments, compare_deployments, save
    from sepify.pipeline.distill import DistillResult, DistillStep, distill
    from sepify.planning.choice import Option
    from sepify.planning.plan import LayerPlan, Plan
    from sepify.report.audit import AuditLayer, AuditReport
    from sepify.report.conversion import ConversionReport, LayerReport
    from sepify.report.render import format_count
    from sepify.vocab import SkipReason

# Public names and the modules that define them, imported on first use: the
# CLI's --help and the error classes need no torch, and torch takes seconds.
_LAZY = {
    "convert": "sepify.pipeline.convert",
    "load_converted": "sepify.pipeline.load",
    "save": "sepify.pipeline.deploy",
    "compare_deployments": "sepify.pipeline.deploy",
    "Deployment": "sepify.pipeline.deploy",
    "Deployments": "sepify.pipeline.deploy",
    "ConversionResult": "sepify.pipeline.convert",
    "audit": "sepify.pipeline.audit",
    "distill": "sepify.pipeline.distill",
    "DistillResult": "sepify.pipeline.distill",
    "DistillStep": "sepify.pipeline.distill",
    "SeparableConv": "sepify.core.modules",
    "SeparableConv1d": "sepify.core.modules",
    "SeparableConv2d": "sepify.core.modules",
    "SeparableConv3d": "sepify.core.modules",
    "SeparableConvTranspose1d": "sepify.core.modules",
    "SeparableConvTranspose2d": "sepify.core.modules",
    "SeparableConvTranspose3d": "sepify.core.modules",
    "SkipReason": "sepify.vocab",
    "synthesize_calibration": "sepify.calibrate.synthetic",
    "register_leaf_module": "sepify.graph.tracing",
    "register_conv": "sepify.graph.conv_kinds",
    "Calibration": "sepify.options",
    "Distill": "sepify.options",
    "Selection": "sepify.options",
    "Timing": "sepify.options",
    "Budget": "sepify.options",
    "LayerPlan": "sepify.planning.plan",
    "Plan": "sepify.planning.plan",
    "AuditLayer": "sepify.report.audit",
    "Option": "sepify.planning.choice",
    "AuditReport": "sepify.report.audit",
    "ConversionReport": "sepify.report.conversion",
    "LayerReport": "sepify.report.conversion",
    "format_count": "sepify.report.render",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sepify' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)  # the public names, not this module's imports


try:
    __version__: str = importlib.metadata.version("sepify")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    # the pipeline
    "convert",
    "audit",
    "distill",
    "load_converted",
    "save",
    "compare_deployments",
    # options
    "Selection",
    "Calibration",
    "Distill",
    "Timing",
    "Budget",
    # results
    "ConversionResult",
    "Deployments",
    "Deployment",
    "DistillResult",
    "DistillStep",
    "ConversionReport",
    "LayerReport",
    "AuditReport",
    "AuditLayer",
    "Option",
    "SkipReason",
    "Plan",
    "LayerPlan",
    "format_count",
    # building blocks
    "SeparableConv",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
    "SeparableConvTranspose1d",
    "SeparableConvTranspose2d",
    "SeparableConvTranspose3d",
    "register_leaf_module",
    "register_conv",
    "synthesize_calibration",
    # errors (every class of sepify.errors, listed so that tools see the public names)
    "SepifyError",
    "ConfigError",
    "InputShapeError",
    "CalibrationError",
    "PlanError",
    "BudgetError",
    "ModelError",
    "ModelLoadError",
    "NothingConvertedError",
    "OutputError",
    "CheckpointError",
    "TrainingError",
    "SepifyWarning",
]
