"""`tessera view`: draw the graphs a script compiles, or a saved model's, before and after
fusion, as one self-contained HTML page (see tessera.tools.view)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tessera.cli import console

# options may follow the script (unknown ones go to it; after `--` everything does)
_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def register(app: typer.Typer) -> None:
    app.command("view", context_settings=_SETTINGS)(view)


def view(
    target: Annotated[str, typer.Argument(help="A Python script to run (its compiled graphs "
                                               "are drawn), or a saved model's file.")],
    args: Annotated[list[str] | None, typer.Argument(help="The script's own arguments.")]
    = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="The HTML page to write.")]
    = Path("graph.html"),
    profile: Annotated[Path | None, typer.Option("--profile", help="A Chrome trace "
                                                 "(`tessera profile --out`): per-node "
                                                 "times.")] = None,
    svg: Annotated[bool, typer.Option("--svg", help="Also write standalone SVGs of each "
                                                    "graph, before and after fusion.")]
    = False,
) -> None:
    """Draw compiled graphs: nodes with shapes, kernels and times, fused groups, the memory
    plan."""
    from tessera.tools import view as viewer

    if target.endswith(".py"):  # (its globals keep its models alive until drawn)
        source, _script = viewer.run_script(target, args or [])
    else:
        if args:
            raise typer.BadParameter(f"arguments {args} given for a saved model",
                                     param_hint="ARGS")
        source = target
    for path in viewer.view(source, out, profile=profile, svg=svg):
        console.print(f"wrote {path}")
