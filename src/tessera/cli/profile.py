"""`tessera profile script.py [args]`: run a script inside `tessera.profile()`, print the
top kernels and ops against this device's roofline, and write a Chrome trace and a
roofline plot (see tessera.tools.profiler)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tessera.cli import console

_WIDTH = 110  # the tables' columns fit in this many

# options may follow the script (unknown ones go to it; after `--` everything does)
_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def register(app: typer.Typer) -> None:
    app.command("profile", context_settings=_SETTINGS)(profile)


def profile(
    script: Annotated[str, typer.Argument(help="The Python script to run.")],
    args: Annotated[list[str] | None, typer.Argument(help="The script's own arguments.")]
    = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write a Chrome-trace JSON "
                                             "(open it in ui.perfetto.dev).")] = None,
    roofline: Annotated[Path | None, typer.Option("--roofline", help="Draw the roofline "
                                                  "plot (.png or .svg; needs matplotlib).")]
    = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Rows per table.")] = 15,
) -> None:
    """Profile a script: every kernel launch, op, compiled-graph call, compile, memory event
    and collective, timed; the tables, then the files asked for."""
    from tessera.tools.profiler import profile_script

    p, code = profile_script(script, args or [])
    wide = Console(width=max(console.width, _WIDTH))  # rows stay whole on narrow terminals
    for table in p.tables(top):
        wide.print(table)
    roof = p.peaks()
    console.print(f"roofline: {roof.gflops:.1f} GFLOPS fp32, {roof.gbs:.1f} GB/s (ridge at "
                  f"{roof.ridge:.1f} flop/byte); {len(p.events)} events in "
                  f"{p.wall_ns / 1e6:.1f} ms")
    if out is not None:
        console.print(f"trace: {p.export_chrome_trace(out)}")
    if roofline is not None:
        console.print(f"roofline plot: {p.roofline(roofline, top)}")
    if code:
        raise typer.Exit(code)
