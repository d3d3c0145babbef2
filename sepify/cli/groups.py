"""Commands composed from option groups: a group is a frozen dataclass whose fields are typer options.

A command's function takes a few parameters (its arguments and one object per group) instead of forty;
:func:`command` flattens the groups' fields into the signature typer reads and rebuilds the objects for each call.
A group is declared once and shared by every command that takes it (the model block, the calibration block...).

Options whose ``rich_help_panel`` is :data:`ADVANCED` are hidden from ``--help`` (which shows usage, the options
most users need and the examples, on one 80x24 screen) and listed by ``--help-all``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

import typer
from typer.models import OptionInfo

__all__ = ["command", "ADVANCED", "HelpAllOpt"]

ADVANCED = "Advanced"
F = TypeVar("F", bound=Callable[..., Any])


def _show_all(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        for param in ctx.command.params:
            param.hidden = False  # type: ignore[attr-defined]
        typer.echo(ctx.get_help(), nl=False)
        raise typer.Exit()


HelpAllOpt = Annotated[
    bool,
    typer.Option(
        "--help-all", metavar="", is_eager=True, callback=_show_all, help="Every option, the advanced ones too."
    ),
]


def _parameters(annotation: Any) -> list[inspect.Parameter] | None:
    """The typer parameters of a group class (None for a plain parameter)."""
    if not (isinstance(annotation, type) and dataclasses.is_dataclass(annotation)):
        return None
    hints = get_type_hints(annotation, include_extras=True)
    found = []
    for f in dataclasses.fields(annotation):
        hint = hints[f.name]
        info = next((a for a in get_args(hint)[1:] if isinstance(a, OptionInfo)), None) if _annotated(hint) else None
        if info is not None and info.rich_help_panel == ADVANCED:
            info.hidden = True
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default  # required: no default
        found.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hint, default=default))
    return found


def _annotated(hint: Any) -> bool:
    return get_origin(hint) is Annotated


def command(app: typer.Typer, *, epilog: str | None = None) -> Callable[[F], F]:
    """Register ``function`` on ``app``: its group-typed parameters become their fields' options.

    Examples:
        ``def convert(model: ModelArg, load: ModelOptions, out: OutputOptions) -> None`` is called with
        ``load=ModelOptions(input_shape=..., ...)`` built from ``--input-shape ...``.
    """

    def register(function: F) -> F:
        hints = get_type_hints(function, include_extras=True)
        params: list[inspect.Parameter] = []
        groups: dict[str, type] = {}
        for p in inspect.signature(function).parameters.values():
            flattened = _parameters(hints[p.name])
            if flattened is None:
                params.append(p.replace(annotation=hints[p.name]))
            else:
                groups[p.name] = hints[p.name]
                params += flattened
        names = [p.name for p in params]
        duplicated = {n for n in names if names.count(n) > 1}
        assert not duplicated, f"{function.__name__}: option groups declare {duplicated} twice"
        group_fields = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in groups.items()}
        plain = [p.name for p in inspect.signature(function).parameters.values() if p.name not in groups]

        def run(**values: Any) -> Any:
            objects = {name: groups[name](**{f: values[f] for f in fields}) for name, fields in group_fields.items()}
            return function(**{name: values[name] for name in plain}, **objects)

        ordered = sorted(params, key=lambda p: p.kind)  # positional arguments first
        run.__signature__ = inspect.Signature(ordered)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in ordered}
        run.__name__, run.__doc__ = function.__name__, function.__doc__
        app.command(epilog=epilog)(run)
        return function

    return register
