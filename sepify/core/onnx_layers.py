"""One conv, or a separable pair, as a small ONNX graph: what a deployment runtime would run for that layer.

Built node by node with ``onnx.helper`` (milliseconds, no tracing): a conv is
a ``Conv`` (or ``ConvTranspose``) node, preceded by a ``Pad`` node for
``padding_mode`` other than zeros and for TensorFlow's dynamic "SAME" padding
(computed for the fixed input shape); a pair is its children in order. The
weights are initializers in float32. :mod:`sepify.core.backends` times these
graphs in onnxruntime, so that per-layer speed is judged where the model will
run. ``onnx`` is imported on first use (the ``onnx`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from sepify.core.functional import ConvLayer, SameConv2d, is_transposed, pad_amounts, same_pad_amounts
from sepify.core.modules import SeparableConv

__all__ = ["layer_graph", "OPSET"]

OPSET = 19  # Pad's "wrap" mode (circular padding) needs 19
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def layer_graph(module: ConvLayer | SeparableConv, input_shape: tuple[int, ...]) -> Any:
    """An ``onnx.ModelProto`` computing ``module`` on a float32 input of ``input_shape`` (input ``x``, output ``y``).

    Examples:
        >>> import torch
        >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        >>> graph = layer_graph(conv, (1, 4, 8, 8))
        >>> [node.op_type for node in graph.graph.node]
        ['Pad', 'Conv']
    """
    from onnx import TensorProto, helper

    convs = module.convs if isinstance(module, SeparableConv) else (module,)
    nodes: list[Any] = []
    initializers: list[Any] = []
    shape = list(input_shape)
    current = "x"
    for i, conv in enumerate(convs):
        out = "y" if i == len(convs) - 1 else f"h{i}"
        current, shape = _conv_nodes(conv, current, out, shape, f"c{i}", nodes, initializers)
    graph = helper.make_graph(
        nodes,
        "sepify_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _array(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _conv_nodes(
    conv: ConvLayer, x: str, y: str, shape: list[int], prefix: str, nodes: list[Any], inits: list[Any]
) -> tuple[str, list[int]]:
    """Append ``conv``'s nodes reading ``x`` and writing ``y``; return ``y`` and its shape."""
    from onnx import helper, numpy_helper

    dims = len(conv.kernel_size)
    weight = numpy_helper.from_array(_array(conv.weight), f"{prefix}.w")
    inits.append(weight)
    inputs = [x, weight.name]
    if conv.bias is not None:
        bias = numpy_helper.from_array(_array(conv.bias), f"{prefix}.b")
        inits.append(bias)
        inputs.append(bias.name)
    attrs: dict[str, Any] = {
        "kernel_shape": list(conv.kernel_size),
        "strides": list(conv.stride),
        "dilations": list(conv.dilation),
        "group": conv.groups,
    }
    spatial = shape[2:]
    if is_transposed(conv):
        attrs["pads"] = [int(p) for p in conv.padding] * 2
        attrs["output_padding"] = list(conv.output_padding)
        nodes.append(helper.make_node("ConvTranspose", inputs, [y], **attrs))
        out = [
            (n - 1) * s - 2 * int(p) + d * (k - 1) + o + 1
            for n, s, p, d, k, o in zip(
                spatial, conv.stride, conv.padding, conv.dilation, conv.kernel_size, conv.output_padding
            )
        ]
        return y, [shape[0], conv.out_channels, *out]
    if isinstance(conv, SameConv2d):
        amounts = same_pad_amounts(conv, spatial)
        mode = "constant"
    else:
        amounts = pad_amounts(conv)
        mode = _PAD_MODES.get(conv.padding_mode, "constant")
    begins, ends = amounts[::2][::-1], amounts[1::2][::-1]  # F.pad amounts run last dimension first
    if mode != "constant" or begins != ends or isinstance(conv, SameConv2d):
        pads = numpy_helper.from_array(np.array([0, 0, *begins, 0, 0, *ends], dtype=np.int64), f"{prefix}.pads")
        inits.append(pads)
        padded = f"{prefix}.padded"
        nodes.append(helper.make_node("Pad", [x, pads.name], [padded], mode=mode))
        inputs[0] = padded
        attrs["pads"] = [0] * (2 * dims)
    else:
        attrs["pads"] = [*begins, *ends]
    nodes.append(helper.make_node("Conv", inputs, [y], **attrs))
    sizes = [n + b + e for n, b, e in zip(spatial, begins, ends)]
    out = [(n - d * (k - 1) - 1) // s + 1 for n, s, d, k in zip(sizes, conv.stride, conv.dilation, conv.kernel_size)]
    return y, [shape[0], conv.out_channels, *out]
