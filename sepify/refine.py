"""Closed-form, training-free refinement of separable pairs with calibration data.

Layer by layer in execution order: the pair's *inputs* come from the
partially refined student (so upstream error is corrected downstream), the
*targets* are the original layer's outputs in the teacher. The pair's last
factor is linear in its weights given its first factor, so it is refit by
ridge regression:

* dw-pw: the pointwise conv (and its bias) from the depthwise outputs, one
  regression per group;
* pw-dw: the depthwise conv (and its bias) from the unfolded pointwise
  outputs, one small regression per output channel.

Gram matrices are accumulated in float64 batch by batch. The teacher's
outputs (the targets) are captured for a window of layers per teacher pass,
and each batch's student forward resumes from the previous pair (fx
students), each up to 256 MB held: about one forward pass of each model over
the data in all, instead of one partial pass per layer. The ridge is chosen on
held-out batches, and a refit that is worse there than the SVD initialisation
is not kept. fx appears only in resuming a GraphModule student's forward;
any other student is run with hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from sepify.decompose import Factorization
from sepify.modules import SeparableConv2d

__all__ = ["refine_pairs", "refresh_batchnorm", "refit_errors", "RefineResult", "capture"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
_RIDGES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean Gram diagonal
_GRAM_BYTES = 1 << 29  # skip a refit whose Gram matrices would exceed 512 MB
_TARGET_BYTES = 1 << 28  # teacher outputs held at once for several layers (at least one layer's)
_RESUME_BYTES = 1 << 28  # student states kept to resume each batch's forward from the previous pair


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once the wanted tensor is captured."""


def capture(model: nn.Module, module: nn.Module, args: tuple[Any, ...], *, output: bool) -> Tensor:
    """The input (or output) of ``module``'s first call when running ``model(*args)``; stops there."""
    found: list[Tensor] = []

    def pre_hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        found.append(inputs[0].detach())
        raise _Stop

    def post_hook(_m: nn.Module, _inputs: tuple[Any, ...], out: Tensor) -> None:
        found.append(out.detach())
        raise _Stop

    handle = module.register_forward_hook(post_hook) if output else module.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            model(*args)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"{type(module).__name__} was not called by the model on these inputs")
    return found[0]


@dataclass(frozen=True)
class RefineResult:
    """Per layer: held-out relative error of the layer output before and after the refit."""

    layers: dict[str, tuple[float, float]]
    skipped: dict[str, str]


class _Normal:
    """Accumulates X^T X, X^T Y and ||Y||^2 for batched regressions ``(B, f) -> (B, o)``."""

    def __init__(self) -> None:
        self.gram: Tensor | None = None
        self.cross: Tensor | None = None
        self.yy: Tensor | None = None

    def add(self, x: Tensor, y: Tensor) -> None:
        """``x``: (B, M, f) features, ``y``: (B, M, o) targets, M samples per regression."""
        x, y = x.double(), y.double()
        g, c, t = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y, y.square().sum((1, 2))
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.yy = t if self.yy is None else self.yy + t

    def error(self, w: Tensor) -> float:
        """Total squared residual ||X W - Y||^2 of weights ``w`` (B, f, o)."""
        assert self.gram is not None and self.cross is not None and self.yy is not None
        quad = (w * (self.gram @ w)).sum()
        return float(quad - 2 * (w * self.cross).sum() + self.yy.sum())


def _solve(normal: _Normal, ridge: float, free_last: bool) -> Tensor | None:
    """Ridge solution by Cholesky (the regularised Gram is symmetric positive definite); None if it is not."""
    assert normal.gram is not None and normal.cross is not None
    g = normal.gram
    n = g.shape[-1]
    scale = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # (B,)
    shrink = torch.full((n,), ridge + 1e-12, dtype=g.dtype, device=g.device)
    if free_last:
        shrink[-1] = 1e-12  # never shrink the bias (a jitter keeps the factorisation defined)
    a = g + torch.diag_embed(scale[:, None] * shrink)
    factor, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        return None
    solution: Tensor = torch.cholesky_solve(normal.cross, factor)
    return solution


# -- features of each pair kind ------------------------------------------------------


def _pw_features(pair: SeparableConv2d, x: Tensor) -> tuple[Tensor, int]:
    """dw-pw: per group, pixels x (depthwise channels [+ 1]); returns (B=groups, M, f) and f."""
    z = pair.conv_dw(x)  # (N, Cin*r, H', W')
    g = pair.groups
    n, ch = z.shape[:2]
    feats = z.reshape(n, g, ch // g, -1).permute(1, 0, 3, 2).reshape(g, -1, ch // g)
    if pair.conv_pw.bias is not None:
        feats = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)
    return feats, ch // g


def _pw_targets(pair: SeparableConv2d, y: Tensor) -> Tensor:
    g = pair.groups
    n, cout = y.shape[:2]
    return y.reshape(n, g, cout // g, -1).permute(1, 0, 3, 2).reshape(g, -1, cout // g)


def _dw_features(pair: SeparableConv2d, x: Tensor) -> Tensor:
    """pw-dw: per output channel, output pixels x (r * kernel taps [+ 1]); (B=Cout, M, f)."""
    conv = pair.conv_dw
    u = pair.conv_pw(x)  # (N, Cout*r, H, W)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or any(conv.padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        u = F.pad(u, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(u, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, Cout*r*K, L)
    cout = conv.out_channels
    n = cols.shape[0]
    feats = cols.reshape(n, cout, -1, cols.shape[-1]).permute(1, 0, 3, 2).reshape(cout, -1, cols.shape[1] // cout)
    if conv.bias is not None:
        feats = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1)
    return feats


def _dw_targets(y: Tensor) -> Tensor:
    n, cout = y.shape[:2]
    return y.reshape(n, cout, -1).permute(1, 0, 2).reshape(cout, -1, 1)


def _current_weights(pair: SeparableConv2d) -> Tensor:
    """The refit factor's current weights in regression layout (B, f, o)."""
    if pair.order == "dw-pw":
        w = pair.conv_pw.weight.detach()  # (Cout, Cin*r/g, 1, 1)
        g = pair.groups
        cout, f = w.shape[:2]
        w = w.reshape(g, cout // g, f).transpose(1, 2)
        if pair.conv_pw.bias is not None:
            b = pair.conv_pw.bias.detach().reshape(g, 1, cout // g)
            w = torch.cat([w, b], dim=1)
        return w.double()
    w = pair.conv_dw.weight.detach()  # (Cout, r, kh, kw)
    cout = w.shape[0]
    w = w.reshape(cout, -1, 1)
    if pair.conv_dw.bias is not None:
        w = torch.cat([w, pair.conv_dw.bias.detach().reshape(cout, 1, 1)], dim=1)
    return w.double()


def _set_weights(pair: SeparableConv2d, w: Tensor) -> None:
    with torch.no_grad():
        if pair.order == "dw-pw":
            conv = pair.conv_pw
            if conv.bias is not None:
                conv.bias.copy_(w[:, -1, :].reshape(-1))
                w = w[:, :-1, :]
            conv.weight.copy_(w.transpose(1, 2).reshape(conv.weight.shape))
        else:
            conv = pair.conv_dw
            if conv.bias is not None:
                conv.bias.copy_(w[:, -1, 0])
                w = w[:, :-1, :]
            conv.weight.copy_(w.reshape(conv.weight.shape))


def _add_to_normals(normal: _Normal, pair: SeparableConv2d, x: Tensor, y: Tensor) -> None:
    """One batch of the pair's regression: its input ``x`` and the original layer's output ``y``."""
    if pair.order == "dw-pw":
        feats, _ = _pw_features(pair, x)
        normal.add(feats, _pw_targets(pair, y))
    else:
        normal.add(_dw_features(pair, x), _dw_targets(y))


class _TeacherOutputs:
    """The original convs' outputs on every batch, captured for several layers per teacher pass.

    Targets do not change while pairs are refit, so one partial forward of the
    teacher per batch can capture the outputs of the next few layers (in
    execution order) at once; the window grows while its outputs for all
    batches fit in ``budget`` bytes (at least one layer). The teacher then runs
    about ``layers / window`` partial passes instead of one per layer: it was
    the larger half of the refit's time (resnet50: 10.5 of 18.5 s of captures).
    """

    def __init__(self, teacher: nn.Module, names: Sequence[str], batches: Sequence[tuple[Any, ...]],
                 budget: int) -> None:  # fmt: skip
        self.teacher = teacher
        self.names = list(names)
        self.batches = batches
        self.budget = budget
        self.cache: dict[str, list[Tensor]] = {}
        self.passes = 0  # teacher passes over the batches, for tests and logs

    def take(self, name: str) -> list[Tensor]:
        """``name``'s output on every batch (removed from the cache: each layer is taken once)."""
        if name not in self.cache:
            self._fill(self.names.index(name))
        return self.cache.pop(name)

    def _fill(self, start: int) -> None:
        self.passes += 1
        # the first batch sizes the window: its bytes times the number of batches must fit the budget
        first = self._outputs(self.batches[0], self.names[start:], self.budget // len(self.batches))
        out = {n: [t] for n, t in first.items()}
        for args in self.batches[1:]:
            for n, t in self._outputs(args, list(out), None).items():
                out[n].append(t)
        self.cache.update(out)

    def _outputs(self, args: tuple[Any, ...], names: list[str], budget: int | None) -> dict[str, Tensor]:
        """Outputs of ``names`` on one batch in call order, stopping early once they would pass ``budget`` bytes.

        The first name is always captured; without a budget every name must be.
        """
        found: dict[str, Tensor] = {}
        used = [0]
        modules = {id(self.teacher.get_submodule(n)): n for n in names}

        def hook(m: nn.Module, _inputs: tuple[Any, ...], out: Tensor) -> None:
            name = modules.get(id(m))
            if name is None or name in found:
                return
            size = out.numel() * out.element_size()
            if found and budget is not None and used[0] + size > budget:
                raise _Stop
            found[name] = out.detach()
            used[0] += size
            if len(found) == len(names):
                raise _Stop

        self._run(args, names, hook)
        for n in names if budget is None else names[:1]:
            if n not in found:
                raise RuntimeError(f"{n} was not called by the model on these inputs")
        return found

    def _run(self, args: tuple[Any, ...], names: list[str], hook: Callable[..., None]) -> None:
        handles = [self.teacher.get_submodule(n).register_forward_hook(hook) for n in dict.fromkeys(names)]
        try:
            with torch.no_grad():
                self.teacher(*args)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()


def _gram_bytes(pair: SeparableConv2d) -> int:
    if pair.order == "dw-pw":
        f = pair.conv_pw.in_channels // pair.groups + 1
        return pair.groups * f * f * 8
    f = (
        pair.conv_dw.in_channels
        // pair.conv_dw.out_channels
        * pair.conv_dw.kernel_size[0]
        * pair.conv_dw.kernel_size[1]
        + 1
    )
    return pair.conv_dw.out_channels * f * f * 8


def refine_pairs(
    teacher: nn.Module,
    student: nn.Module,
    pairs: Sequence[tuple[str, SeparableConv2d]],
    fit: Sequence[tuple[Any, ...]],
    heldout: Sequence[tuple[Any, ...]],
    progress: ProgressFn | None = None,
) -> RefineResult:
    """Refit each pair's last factor in ``pairs`` order (execution order); see the module docstring.

    ``teacher`` must contain the original conv at each qualname; ``student``
    contains the pair there. Both are run without gradients and restored.
    """
    results: dict[str, tuple[float, float]] = {}
    skipped: dict[str, str] = {}
    batches = [*fit, *heldout]
    wanted = [name for name, pair in pairs if _gram_bytes(pair) <= _GRAM_BYTES]
    targets = _TeacherOutputs(teacher, wanted, batches, _TARGET_BYTES)
    inputs = _StudentInputs.for_model(student, wanted, batches, _RESUME_BYTES)
    for i, (name, pair) in enumerate(pairs):
        if progress is not None:
            progress("refining layers", i, len(pairs))
        if name not in wanted:
            skipped[name] = "its regression would need more than 512 MB of Gram matrices"
            continue
        ys = targets.take(name)[::-1]  # popped in batch order, so each target is freed once used
        train, held = _Normal(), _Normal()
        with torch.no_grad():
            for k, args in enumerate(batches):
                x = inputs.get(name, k) if inputs else capture(student, pair, args, output=False)
                _add_to_normals(train if k < len(fit) else held, pair, x, ys.pop())
        assert held.yy is not None
        norm = float(held.yy.sum()) ** 0.5 or 1.0
        current = _current_weights(pair).to(train.gram.device if train.gram is not None else "cpu")
        before = max(held.error(current), 0.0) ** 0.5 / norm
        best_w, best_err = current, before
        free_last = (pair.conv_pw if pair.order == "dw-pw" else pair.conv_dw).bias is not None
        for ridge in _RIDGES:
            w = _solve(train, ridge, free_last)
            if w is None:  # not positive definite at this ridge: try a larger one
                continue
            err = max(held.error(w), 0.0) ** 0.5 / norm
            if err < best_err:
                best_w, best_err = w, err
        if best_w is not current:
            _set_weights(pair, best_w.to(pair.conv_dw.weight.dtype))
        results[name] = (before, best_err)
        logger.info("refined %s: held-out layer error %.4f -> %.4f", name, before, best_err)
    if progress is not None:
        progress("refining layers", len(pairs), len(pairs))
    return RefineResult(results, skipped)


class _StudentInputs:
    """Each pair's input on every batch, resuming the student's forward from the previous pair.

    Pairs are refit in execution order, and everything upstream of the pair
    being refit is final. So for a GraphModule student each batch's forward is
    run node by node (``fx.Interpreter``) and stopped at the pair's node; the
    values still needed downstream (the pair's input, skip connections) are
    kept, and the next pair's inputs come from resuming there: about one
    forward pass over the data in all, instead of one partial pass per pair.
    Batches whose kept values would overflow ``budget`` bytes are run from
    the start each time instead (early layers of large images). Only for
    students where every pair is a ``call_module`` node; others use
    :func:`capture`.
    """

    def __init__(self, graph_module: fx.GraphModule, batches: Sequence[tuple[Any, ...]], budget: int) -> None:
        self.interpreter = fx.Interpreter(graph_module)
        self.nodes = list(graph_module.graph.nodes)
        self.position = {n.target: i for i, n in reversed(list(enumerate(self.nodes))) if n.op == "call_module"}
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last_use[used] = i
        self.last_use = last_use
        self.batches = batches
        self.budget = budget
        self.states: list[tuple[int, dict[fx.Node, Any]] | None] = [None] * len(batches)
        self.kept = [0] * len(batches)  # bytes held per batch

    @classmethod
    def for_model(cls, student: nn.Module, names: Sequence[str], batches: Sequence[tuple[Any, ...]],
                  budget: int) -> _StudentInputs | None:  # fmt: skip
        if not isinstance(student, fx.GraphModule) or budget <= 0:
            return None
        targets = {n.target for n in student.graph.nodes if n.op == "call_module"}
        return cls(student, batches, budget) if all(name in targets for name in names) else None

    def get(self, name: str, index: int) -> Tensor:
        """The input of pair ``name`` on batch ``index``, with every pair before it as it is now."""
        stop = self.position[name]
        state = self.states[index]
        start, env = state if state is not None and state[0] <= stop else (0, {})
        interp = self.interpreter
        interp.env = env
        if start == 0:
            interp.args_iter = iter(self.batches[index])
        with torch.no_grad():
            for i in range(start, stop):
                node = self.nodes[i]
                env[node] = interp.run_node(node)
                for used in node.all_input_nodes:
                    if self.last_use[used] == i:
                        del env[used]
        args, _ = interp.fetch_args_kwargs_from_env(self.nodes[stop])
        x: Tensor = args[0]
        size = sum(v.numel() * v.element_size() for v in env.values() if isinstance(v, Tensor))
        others = sum(self.kept) - self.kept[index]
        if others + size <= self.budget:
            self.states[index], self.kept[index] = (stop, env), size
        else:
            self.states[index], self.kept[index] = None, 0
        interp.env = {}
        return x.detach()


def refresh_batchnorm(model: nn.Module, batches: Sequence[tuple[Any, ...]]) -> int:
    """Recompute every BatchNorm's running statistics on ``batches``; returns how many were refreshed.

    Each BN becomes a cumulative average (momentum None) in train mode for
    the pass; every other module keeps its mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m, m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for args in batches:
                model(*args)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(bns)


def refit_errors(
    conv: nn.Conv2d,
    x: Tensor,
    order: str,
    ranks: Sequence[int],
    ridge: float = 1e-6,
    factorization: Factorization | None = None,
) -> dict[int, float]:
    """Relative output error of the pair after a local refit of its last factor, for each rank.

    Inputs ``x`` and targets ``conv(x)`` both come from the original model, so
    this predicts what :func:`refine_pairs` can reach at each rank without
    building each pair: the first factors are nested across ranks (the top-r
    singular vectors), so one Gram matrix at the largest rank serves all of
    them. Returns {} when that Gram matrix would be too large. Pass the
    weight's ``factorization`` in ``order`` if it is already computed.
    """
    top = max(ranks)
    pair = SeparableConv2d.from_conv(conv, top, order, factorization=factorization).to(dtype=x.dtype)
    top = pair.rank
    if _gram_bytes(pair) > _GRAM_BYTES:
        return {}
    with torch.no_grad():
        y = conv._conv_forward(x, conv.weight, conv.bias)  # not conv(x): its hooks may be what called us
        normal = _Normal()
        _add_to_normals(normal, pair, x, y)
    assert normal.gram is not None and normal.cross is not None and normal.yy is not None
    total = float(normal.yy.sum())
    if total <= 0:
        return dict.fromkeys(ranks, 0.0)
    has_bias = conv.bias is not None
    n_feat = normal.gram.shape[-1] - (1 if has_bias else 0)
    per_channel = n_feat // top  # dw-pw: input channels per group; pw-dw: kernel taps
    errors = {}
    for r in sorted({min(k, top) for k in ranks}):
        if order == "dw-pw":  # feature i*R + k for input channel i, rank component k
            idx = [i * top + k for i in range(per_channel) for k in range(r)]
        else:  # feature k*K + t for rank component k, kernel tap t
            idx = list(range(r * per_channel))
        if has_bias:
            idx.append(n_feat)
        index = torch.tensor(idx)
        sub = _Normal()
        sub.gram = normal.gram[:, index][:, :, index]
        sub.cross = normal.cross[:, index]
        sub.yy = normal.yy
        w = _solve(sub, ridge, has_bias)
        if w is None:
            continue
        errors[r] = max(sub.error(w), 0.0) ** 0.5 / total**0.5
    return {k: errors[min(k, top)] for k in ranks if min(k, top) in errors}
