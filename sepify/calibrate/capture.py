"""Capturing activations: a module's first input or output, the original convs' outputs
for a window of layers per pass, and the converted model's inputs to each pair, resumed
from the previous pair (``fx.Interpreter``) instead of rerun from the model input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from sepify.errors import CalibrationError
from sepify.graph.probe import describe_inputs

__all__ = ["Stop", "capture", "first_inputs", "TeacherOutputs", "StudentInputs"]


class Stop(Exception):
    """Raised by a hook to end a forward pass early once the wanted tensor is captured."""


def capture(model: nn.Module, module: nn.Module, args: tuple[Any, ...], *, output: bool) -> Tensor:
    """The input (or output) of ``module``'s first call when running ``model(*args)``; stops there."""
    found: list[Tensor] = []

    def pre_hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        found.append(inputs[0].detach())
        raise Stop

    def post_hook(_m: nn.Module, _inputs: tuple[Any, ...], out: Tensor) -> None:
        found.append(out.detach())
        raise Stop

    handle = module.register_forward_hook(post_hook) if output else module.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            model(*args)
    except Stop:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"{type(module).__name__} was not called by the model on these inputs")
    return found[0]


def first_inputs(
    model: nn.Module, args: tuple[Any, ...], modules: Sequence[nn.Module], fn: Callable[[nn.Module, Tensor], None]
) -> None:
    """Run ``model(*args)`` once without gradients, calling ``fn(module, x)`` on the first input of each of ``modules``.

    ``fn`` runs inside the forward; its own failures are re-raised after the
    forward with their traceback (a bug, not the user's input).

    Raises:
        CalibrationError: the model itself failed on ``args``.
    """
    seen: set[nn.Module] = set()
    failures: list[BaseException] = []

    def hook(m: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        if m in seen or failures:
            return  # first call only
        seen.add(m)
        try:
            fn(m, inputs[0])
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the user's forward
            failures.append(e)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(*args)
    except Exception as e:  # noqa: BLE001 - user code failing on user data
        raise CalibrationError(
            f"the model failed on the audit inputs {describe_inputs(args)} ({type(e).__name__}: {e}); "
            "pass calibration data shaped like the example inputs"
        ) from e
    finally:
        for h in handles:
            h.remove()
    if failures:
        raise failures[0]


class TeacherOutputs:
    """The original convs' outputs on every batch, captured for several layers per teacher pass.

    Targets do not change while pairs are refit, so one partial forward of the
    teacher per batch can capture the outputs of the next few layers (in
    execution order) at once; the window grows while its outputs for all
    batches fit in ``budget`` bytes (at least one layer). The teacher then runs
    about ``layers / window`` partial passes instead of one per layer (the
    captures were the larger half of refinement's time; docs/benchmarks.md).
    """

    def __init__(
        self, teacher: nn.Module, names: Sequence[str], batches: Sequence[tuple[Any, ...]], budget: int
    ) -> None:
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
                raise Stop
            found[name] = out.detach()
            used[0] += size
            if len(found) == len(names):
                raise Stop

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
        except Stop:
            pass
        finally:
            for h in handles:
                h.remove()


class StudentInputs:
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
    def for_model(
        cls, student: nn.Module, names: Sequence[str], batches: Sequence[tuple[Any, ...]], budget: int
    ) -> StudentInputs | None:
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
