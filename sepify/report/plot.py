"""The audit chart (optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from sepify.errors import OutputError
from sepify.io.atomic import atomic_path

if TYPE_CHECKING:
    from sepify.planning.plan import Plan
    from sepify.report.audit import AuditReport

__all__ = ["plot_audit"]


def plot_audit(
    report: AuditReport, path: str | os.PathLike[str], plan: Plan | None = None, *, overwrite: bool = True
) -> None:
    """Per candidate: MACs saved (x) vs output error (y) at every rank; planned picks ringed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise OutputError("the audit chart needs matplotlib; pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for layer in report.candidates:
        for order, marker in (("dw-pw", "o"), ("pw-dw", "s"), ("pw-dw-pw", "^")):
            opts = sorted((o for o in layer.options if o.order == order), key=lambda o: o.rank)
            if not opts:
                continue
            xs = [(layer.macs - o.macs_after) / report.macs * 100 for o in opts]
            ys = [o.output_error if o.output_error is not None else o.weight_error for o in opts]
            ax.plot(xs, ys, marker=marker, markersize=3, linewidth=0.6, alpha=0.7)
        best = layer.best_at(1)
        if best is not None:
            err = best.output_error if best.output_error is not None else best.weight_error
            ax.annotate(layer.name, ((layer.macs - best.macs_after) / report.macs * 100, err), fontsize=6, alpha=0.8)
        if plan is not None and layer.name in plan:
            chosen = layer.option(plan[layer.name].rank, plan[layer.name].order)
            err = chosen.output_error if chosen.output_error is not None else chosen.weight_error
            saved = (layer.macs - chosen.macs_after) / report.macs * 100
            ax.scatter([saved], [err], s=80, facecolors="none", edgecolors="black", linewidths=1.2)
    ax.set_xlabel("share of the model's MACs saved by this layer (%)")
    ax.set_ylabel("layer output error ||y_r - y|| / ||y||")
    ax.set_title(
        f"sepify audit: {len(report.candidates)} candidate convs (o dw-pw, s pw-dw, ^ pw-dw-pw; rank grows leftward)"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
