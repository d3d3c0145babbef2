"""The audit chart (optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from sepify.errors import OutputError
from sepify.io.atomic import atomic_path
from sepify.report.render import shorten

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sepify.planning.choice import Option
    from sepify.planning.plan import Plan
    from sepify.report.audit import AuditReport

__all__ = ["plot_audit", "audit_figure"]


_COLORS = {"dw-pw": "#1f77b4", "pw-dw": "#ff7f0e", "pw-dw-pw": "#2ca02c"}
_MAX_ROWS = 60


def _error(option: Option) -> float:
    return option.output_error if option.output_error is not None else option.weight_error


def plot_audit(
    report: AuditReport, path: str | os.PathLike[str], plan: Plan | None = None, *, overwrite: bool = True
) -> None:
    """Write :func:`audit_figure` as a PNG to ``path`` (atomically)."""
    import matplotlib.pyplot as plt

    fig = audit_figure(report, plan)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def audit_figure(report: AuditReport, plan: Plan | None = None) -> Figure:
    """One row per candidate conv, largest first: where its MACs go and what slimming it costs.

    Left: the conv's share of the model's MACs (grey) and the share the plan saves there (coloured by the
    structure it picked). Right: the layer's own output error at rank 1 in its best order (open circle) and at the
    plan's pick (filled, same colour). At most 60 rows (the largest convs); savings are never negative here (a pair
    larger than its conv is not a saving, and the planner never picks one).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.artist import Artist
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise OutputError("the audit chart needs matplotlib; pip install matplotlib") from e
    layers = sorted(report.candidates, key=lambda layer: -layer.macs)[:_MAX_ROWS]
    height = max(2.5, 0.28 * len(layers) + 1.6)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, height), dpi=110, sharey=True, width_ratios=(3, 2))
    rows = range(len(layers))
    left.barh(rows, [100 * layer.mac_share for layer in layers], color="#d0d0d0", label="the conv")
    for i, layer in enumerate(layers):
        rank1 = layer.best_at(1)
        if rank1 is not None:
            right.scatter(_error(rank1), i, s=30, facecolors="none", edgecolors="#555555", linewidths=1.0, zorder=3)
        pick = plan.layers.get(layer.name) if plan is not None else None
        if pick is None:
            continue
        chosen = layer.option(pick.rank, pick.order)
        saved = max(0.0, (layer.macs - chosen.macs_after) / report.macs * 100)
        left.barh(i, saved, color=_COLORS[pick.order], height=0.5)
        left.annotate(
            f"{pick.rank} {pick.order}", (100 * layer.mac_share, i), xytext=(3, 0), textcoords="offset points",
            va="center", fontsize=7,
        )  # fmt: skip
        right.scatter(_error(chosen), i, s=30, color=_COLORS[pick.order], zorder=4)
    left.set_yticks(list(rows), [shorten(layer.name, 28) for layer in layers], fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("share of the model's MACs (%)")
    right.set_xlabel("layer output error ||y_r - y|| / ||y||")
    right.set_xlim(0, max(1.0, *(right.get_xlim()[1:])))
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    handles: list[Artist] = [Patch(color="#d0d0d0", label="MACs of the conv")]
    handles += [Patch(color=c, label=f"saved by the plan: {o}") for o, c in _COLORS.items()] if plan else []
    handles += [Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="#555555", label="rank 1")]
    handles += [Line2D([], [], marker="o", linestyle="", color="#777777", label="the plan's pick")] if plan else []
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    title = f"sepify audit: {len(report.candidates)} candidate convs, {100 * sum(x.mac_share for x in report.candidates):.0f}% of the MACs"
    if plan is not None:
        title += f"; plan: {len(plan)} convs, MACs {plan.meta.get('mac_ratio', float('nan')):.2f}x"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if height < 6 else 0.03, 1, 1))
    return fig
