"""sepify: rewrite a trained model's Conv2d layers into depthwise + pointwise pairs.

Typical use::

    import torch, sepify
    from torchvision.models import resnet18

    result = sepify.convert(resnet18().eval(), torch.randn(1, 3, 224, 224), rank=1)
    print(result.report)

The package is laid out by pipeline stage (README, "Project layout"):
``core`` (arithmetic, factorisation, the separable module), ``graph``
(tracing, probing, candidates, rewriting), ``calibrate``, ``planning``,
``report``, ``io``, with :func:`convert` and :func:`audit` orchestrating them.
"""

from __future__ import annotations

import importlib.metadata

from sepify.audit import audit
from sepify.convert import ConversionResult, convert, load_converted
from sepify.core.modules import SeparableConv2d
from sepify.errors import (
    BudgetError,
    CalibrationError,
    ConfigError,
    InputShapeError,
    ModelError,
    ModelLoadError,
    NothingConvertedError,
    OutputError,
    PlanError,
    SepifyError,
    SepifyWarning,
)
from sepify.graph.candidates import SkipReason
from sepify.graph.tracing import register_leaf_module
from sepify.options import Calibration, Distill, Selection, Timing
from sepify.planning.plan import LayerPlan, Plan
from sepify.report.audit import AuditLayer, AuditOption, AuditReport
from sepify.report.conversion import ConversionReport, LayerReport
from sepify.report.render import format_count

try:
    __version__: str = importlib.metadata.version("sepify")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    # the pipeline
    "convert",
    "audit",
    "load_converted",
    # options
    "Selection",
    "Calibration",
    "Distill",
    "Timing",
    # results
    "ConversionResult",
    "ConversionReport",
    "LayerReport",
    "AuditReport",
    "AuditLayer",
    "AuditOption",
    "SkipReason",
    "Plan",
    "LayerPlan",
    "format_count",
    # building blocks
    "SeparableConv2d",
    "register_leaf_module",
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
    "SepifyWarning",
]
