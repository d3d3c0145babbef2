"""What a deployment runtime fuses with a conv: the zero padding before it and the activation after it.

Runtimes rewrite a conv together with its neighbours, and that changes which
kernel runs: onnxruntime folds a ``Pad`` node into the ``Conv`` after it (and a
grouped conv with padding then runs up to 16x slower than without: crepe's
second layer as a depth-multiplier pair, docs/benchmarks.md), fuses a
``Conv`` with the ``Relu`` after it, and folds a BatchNorm into the conv
before it. A layer timed alone can therefore rank a pair against its conv the
wrong way round. :class:`LayerContext` records the neighbours of one conv as
they are in the model (found by :mod:`sepify.graph.neighbours`), so that
:func:`sepify.runtime.layers.layer_graph` builds them around the layer and
the per-layer time is the one the runtime will see.

BatchNorm between the conv and its activation is not recorded: every runtime
folds it into the conv's (or the pair's last conv's) weights, so it costs the
same (nothing) on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Activation", "LayerContext", "InContext"]

# Activations a runtime may fuse into a conv, as ONNX builds them (sepify.runtime.layers).
ACTIVATIONS = ("relu", "clip", "leaky_relu", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid", "prelu")


@dataclass(frozen=True)
class Activation:
    """One activation after the conv: ``kind`` from :data:`ACTIVATIONS`, its scalar arguments (``clip``: low,
    high; ``leaky_relu``: slope) or, for ``prelu``, its per-channel slopes."""

    kind: str
    args: tuple[float, ...] = ()
    weight: Tensor | None = None

    def __call__(self, x: Tensor) -> Tensor:
        """The activation applied in PyTorch.

        >>> import torch
        >>> Activation("clip", (0.0, 6.0))(torch.tensor([-1.0, 3.0, 9.0]))
        tensor([0., 3., 6.])
        """
        if self.kind == "prelu":
            assert self.weight is not None
            return F.prelu(x, self.weight)
        if self.kind == "clip":
            return x.clamp(*self.args)
        if self.kind == "leaky_relu":
            return F.leaky_relu(x, self.args[0])
        functions: dict[str, Callable[[Tensor], Tensor]] = {
            "relu": F.relu,
            "sigmoid": torch.sigmoid,
            "tanh": torch.tanh,
            "silu": F.silu,
            "hardswish": F.hardswish,
            "hardsigmoid": F.hardsigmoid,
        }
        return functions[self.kind](x)


@dataclass(frozen=True)
class LayerContext:
    """The neighbours of one conv that a runtime fuses with it.

    ``pad``: constant zero padding applied to the conv's input just before it,
    in ``torch.nn.functional.pad`` order (last dimension first), or ``()``.
    ``activation``: the activation applied to its output (possibly through a
    BatchNorm), or None.

    Examples:
        >>> LayerContext(pad=(0, 0, 31, 32)).input_shape((2, 128, 191, 1))
        (2, 128, 128, 1)
        >>> LayerContext().input_shape((2, 128, 191, 1))
        (2, 128, 191, 1)
    """

    pad: tuple[int, ...] = ()
    activation: Activation | None = None

    def input_shape(self, conv_input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape before the padding, given the shape the conv sees."""
        return self._padded(conv_input_shape, -1)

    def conv_input_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the conv sees, given the shape before the padding (the inverse of :meth:`input_shape`)."""
        return self._padded(input_shape, 1)

    def _padded(self, shape: tuple[int, ...], sign: int) -> tuple[int, ...]:
        out = list(shape)
        for i in range(len(self.pad) // 2):  # F.pad order: last dimension first
            out[-1 - i] += sign * (self.pad[2 * i] + self.pad[2 * i + 1])
        return tuple(out)

    def describe(self) -> str:
        """``"pad + conv + relu"`` style summary, for notes and debugging."""
        parts = (["pad"] if self.pad else []) + ["conv"] + ([self.activation.kind] if self.activation else [])
        return " + ".join(parts)


class InContext(nn.Module):
    """``layer`` between its context's padding and activation, as one module (what torch.compile is given).

    >>> import torch
    >>> conv = nn.Conv2d(2, 3, 3)
    >>> InContext(conv, LayerContext((1, 1, 1, 1), Activation("relu")))(torch.randn(1, 2, 5, 5)).shape
    torch.Size([1, 3, 5, 5])
    """

    def __init__(self, layer: nn.Module, context: LayerContext) -> None:
        super().__init__()
        self.layer, self.context = layer, context

    def forward(self, x: Tensor) -> Tensor:
        if self.context.pad:
            x = F.pad(x, self.context.pad)
        x = self.layer(x)
        return self.context.activation(x) if self.context.activation is not None else x
