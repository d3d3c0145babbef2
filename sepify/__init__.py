"""sepify: rewrite a trained model's Conv2d layers into depthwise + pointwise pairs.

Typical use::

    import torch, sepify
    from torchvision.models import resnet18

    result = sepify.convert(resnet18().eval(), torch.randn(1, 3, 224, 224), rank=1)
    print(result.report)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from sepify.audit import AuditLayer, AuditOption, AuditReport, BudgetError, audit
from sepify.convert import ConversionResult, convert
from sepify.errors import ConfigError, InputShapeError, SepifyError, SepifyWarning, TraceError
from sepify.model_io import ModelLoadError, ModelSaveError, load
from sepify.modules import SeparableConv2d
from sepify.plan import LayerPlan, Plan
from sepify.report import ConversionReport, LayerReport, SkipReason, format_count
from sepify.tracing import register_leaf_module

try:
    __version__ = version("sepify")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "convert",
    "audit",
    "AuditReport",
    "AuditLayer",
    "AuditOption",
    "BudgetError",
    "load",
    "ConversionResult",
    "ConversionReport",
    "LayerReport",
    "SkipReason",
    "SeparableConv2d",
    "Plan",
    "LayerPlan",
    "register_leaf_module",
    "format_count",
    "SepifyError",
    "ConfigError",
    "InputShapeError",
    "TraceError",
    "ModelLoadError",
    "ModelSaveError",
    "SepifyWarning",
]
