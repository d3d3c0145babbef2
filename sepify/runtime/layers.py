"""One conv, or a separable pair, as a small ONNX graph: what a deployment runtime would run for that layer.

Built node by node with ``onnx.helper`` (milliseconds, no tracing): a conv is
a ``Conv`` (or ``ConvTranspose``) node, preceded by a ``Pad`` node for
``padding_mode`` other than zeros and for TensorFlow's dynamic "SAME" padding
(computed for the fixed input shape); a pair is its children in order, in
its layout (rank-major: ``rank`` depthwise convs, concatenated or summed).
With a :class:`~sepify.runtime.context.LayerContext` the layer's neighbours in
the model (zero padding before, activation after) are built around it, so
the runtime fuses them as it will in the exported model. The weights are
initializers in float32. :mod:`sepify.runtime.runners` times these graphs in
onnxruntime and OpenVINO, so that per-layer speed is judged where the model
will run. ``onnx`` is imported on first use (the ``onnx`` extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from sepify.core.functional import ConvLayer, SameConv2d, is_transposed, pad_amounts, same_pad_amounts
from sepify.core.modules import SeparableConv
from sepify.runtime.context import Activation, LayerContext

__all__ = ["layer_graph", "OPSET"]

OPSET = 19  # Pad's "wrap" mode (circular padding) needs 19
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def layer_graph(
    module: ConvLayer | SeparableConv, input_shape: tuple[int, ...], context: LayerContext | None = None
) -> Any:
    """An ``onnx.ModelProto`` computing ``module`` on a float32 input (``x``, output ``y``).

    ``input_shape`` is the shape the conv sees; with a ``context`` that pads,
    the graph's input is the unpadded tensor (``context.input_shape``).

    Examples:
        >>> import torch
        >>> from sepify.runtime.context import Activation
        >>> conv = torch.nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        >>> graph = layer_graph(conv, (1, 4, 8, 8))
        >>> [node.op_type for node in graph.graph.node]
        ['Pad', 'Conv']
        >>> pair = SeparableConv.from_conv(torch.nn.Conv2d(4, 8, 3), rank=2).in_layout("rank-major")
        >>> around = LayerContext(pad=(1, 1, 1, 1), activation=Activation("relu"))
        >>> [node.op_type for node in layer_graph(pair, (1, 4, 10, 10), around).graph.node]
        ['Pad', 'Conv', 'Conv', 'Concat', 'Conv', 'Relu']
    """
    from onnx import TensorProto, helper

    context = context or LayerContext()
    graph = _Graph()
    shape = list(input_shape)
    current = "x"
    if context.pad:
        current = graph.pad(current, context.pad, len(shape), "constant", "ctx")
    if isinstance(module, SeparableConv) and module.layout == "rank-major":
        current, shape = _rank_major(module, current, shape, graph)
    else:
        convs = module.convs if isinstance(module, SeparableConv) else (module,)
        for i, conv in enumerate(convs):
            current, shape = _conv_nodes(conv, current, shape, f"c{i}", graph)
    if context.activation is not None:
        current = _activation(context.activation, current, len(shape) - 2, graph)
    assert graph.nodes[-1].output[0] == current  # the last node computes the layer's output: name it y
    graph.nodes[-1].output[0] = "y"
    model = helper.make_graph(
        graph.nodes,
        "sepify_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(context.input_shape(tuple(input_shape))))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        graph.initializers,
    )
    return helper.make_model(model, opset_imports=[helper.make_opsetid("", OPSET)])


class _Graph:
    """Nodes and initializers being collected; every node has one fresh output name."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def pad(self, x: str, amounts: tuple[int, ...] | list[int], rank: int, mode: str, prefix: str) -> str:
        """A ``Pad`` node on ``x`` (a tensor of ``rank`` dimensions) for amounts in ``F.pad`` order (last dimension
        first, begin and end for each); ONNX lists every dimension's begin, then every dimension's end."""
        begins, ends = list(amounts[::2][::-1]), list(amounts[1::2][::-1])
        lead = [0] * (rank - len(begins))
        pads = self.constant(np.array([*lead, *begins, *lead, *ends], dtype=np.int64), f"{prefix}.pads")
        return self.node("Pad", [x, pads], mode=mode)

    def constant(self, value: np.ndarray | Tensor, name: str) -> str:
        from onnx import numpy_helper

        array = value if isinstance(value, np.ndarray) else _array(value)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name


def _rank_major(pair: SeparableConv, x: str, shape: list[int], graph: _Graph) -> tuple[str, list[int]]:
    """A pair in the rank-major layout, as ``SeparableConv`` runs it: dw-pw as ``rank`` depthwise convs
    concatenated and one pointwise conv; pw-dw as one pointwise conv, split, ``rank`` depthwise convs summed."""
    from onnx import helper

    dw, pw, r = pair.conv_dw, pair.conv_pw, pair.rank
    if pair.order == "dw-pw":
        cin = dw.groups
        taps = dw.weight.view(cin, r, 1, *dw.weight.shape[2:])
        parts = []
        for k in range(r):
            part, out_shape = _conv_nodes(dw, x, shape, f"dw{k}", graph, weight=taps[:, k], bias=None)
            parts.append(part)
        z = graph.node("Concat", parts, axis=1)
        mix = pw.weight.view(pw.out_channels, cin, r).transpose(1, 2).reshape(pw.weight.shape)
        return _conv_nodes(pw, z, [out_shape[0], cin * r, *out_shape[2:]], "pw", graph, weight=mix)
    cout = dw.out_channels
    rows = pw.weight.view(cout, r, *pw.weight.shape[1:]).transpose(0, 1).reshape(pw.weight.shape)
    u, u_shape = _conv_nodes(pw, x, shape, "pw", graph, weight=rows, bias=None)
    split = graph.constant(np.array([cout] * r, dtype=np.int64), "split")
    chunks = [f"u{k}" for k in range(r)]
    graph.nodes.append(helper.make_node("Split", [u, split], chunks, axis=1))
    y = None
    for k in range(r):
        bias = dw.bias if k == 0 else None
        part, out_shape = _conv_nodes(
            dw, chunks[k], [u_shape[0], cout, *u_shape[2:]], f"dw{k}", graph, weight=dw.weight[:, k : k + 1], bias=bias
        )
        y = part if y is None else graph.node("Add", [y, part])
    assert y is not None
    return y, out_shape


def _activation(activation: Activation, x: str, dims: int, graph: _Graph) -> str:
    """The activation's ONNX nodes after ``x`` (a tensor with ``dims`` spatial dimensions)."""
    kind, args = activation.kind, activation.args
    if kind == "clip":
        low = graph.constant(np.array(args[0], dtype=np.float32), "clip.min")
        high = graph.constant(np.array(args[1], dtype=np.float32), "clip.max")
        return graph.node("Clip", [x, low, high])
    if kind == "leaky_relu":
        return graph.node("LeakyRelu", [x], alpha=args[0])
    if kind == "silu":
        return graph.node("Mul", [x, graph.node("Sigmoid", [x])])
    if kind == "hardsigmoid":  # PyTorch's hardsigmoid is relu6(x + 3) / 6
        return graph.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if kind == "prelu":
        assert activation.weight is not None
        slope = _array(activation.weight).reshape(-1, *[1] * dims)  # one slope per channel, or one for all
        return graph.node("PRelu", [x, graph.constant(slope, "slope")])
    ops = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}
    return graph.node(ops[kind], [x])


def _array(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _conv_nodes(
    conv: ConvLayer,
    x: str,
    shape: list[int],
    prefix: str,
    graph: _Graph,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None | str = "own",
) -> tuple[str, list[int]]:
    """``conv``'s nodes reading ``x`` (of ``shape``), optionally with another ``weight`` (and ``bias``: None for
    none); return the output's name and shape."""
    dims = len(conv.kernel_size)
    weight = conv.weight if weight is None else weight
    bias = conv.bias if isinstance(bias, str) else bias
    inputs = [x, graph.constant(weight, f"{prefix}.w")]
    if bias is not None:
        inputs.append(graph.constant(bias, f"{prefix}.b"))
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
        y = graph.node("ConvTranspose", inputs, **attrs)
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
        inputs[0] = graph.pad(x, amounts, len(shape), mode, prefix)
        attrs["pads"] = [0] * (2 * dims)
    else:
        attrs["pads"] = [*begins, *ends]
    y = graph.node("Conv", inputs, **attrs)
    sizes = [n + b + e for n, b, e in zip(spatial, begins, ends)]
    out = [(n - d * (k - 1) - 1) // s + 1 for n, s, d, k in zip(sizes, conv.stride, conv.dilation, conv.kernel_size)]
    return y, [shape[0], int(weight.shape[0]), *out]
