"""``sepify plan``: plan again from a saved audit, without the model (and without torch: under a second)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sepify.cli import options as o
from sepify.cli.app import app, errors_as_exit_codes
from sepify.cli.groups import command
from sepify.cli.output import print_lines, wrote
from sepify.cli.preflight import check_run
from sepify.report.render import plan_summary

__all__ = ["plan"]

EXAMPLES = [
    ("audit once, keep the measurements", "sepify audit model.pt --trust-pickle --audit-out audit.json"),
    ("then try budgets in a second each", "sepify plan audit.json --max-mac-ratio 0.6 -o plan.json"),
    ("and convert with the plan you like", "sepify convert model.pt --trust-pickle --plan plan.json"),
]

AuditArg = Annotated[
    Path, typer.Argument(metavar="AUDIT", help="What sepify audit --audit-out wrote.", show_default=False)
]
PlanOutOpt = Annotated[
    Path | None,
    typer.Option("-o", "--output", metavar="FILE", help="Write the plan, for convert --plan.",
                 rich_help_panel=o.COMMON, show_default=False),
]  # fmt: skip


@command(app, epilog=o.epilog(EXAMPLES))
def plan(audit: AuditArg, budget: o.BudgetOptions, run: o.RunOptions, output: PlanOutOpt = None) -> None:
    """Plan under a budget from a saved audit, without the model.

    e.g. [bold]sepify plan audit.json --max-mac-ratio 0.6 -o plan.json[/]
    """
    with errors_as_exit_codes(run.debug):
        wanted = budget.budget()
        if wanted is None:
            raise typer.BadParameter("a plan needs a budget, e.g. --max-mac-ratio 0.5", param_hint="budget")
        check_run({"AUDIT": audit}, {"-o": output}, force=run.force)
        from sepify.report.audit import AuditReport

        report = AuditReport.from_json(audit)
        chosen = report.plan(**wanted.as_dict())
        print_lines("\n".join(plan_summary(chosen)[: 1 if run.quiet else None]))
        if output is not None:
            chosen.to_json(output, overwrite=run.force)
            wrote(output)
