"""`tessera tune`: tune template parameters for this machine; show what is recorded."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tessera.cli import Json, console, fmt_blocking

tune_app = typer.Typer(no_args_is_help=True,
                       help="Tune template parameters for this machine; show what is recorded.")


def register(app: typer.Typer) -> None:
    app.add_typer(tune_app, name="tune")


_BUSY_NOISE = 1.1  # a tuning's noise (see tessera.tune.gemm) above which it was busy


def _print_gemm_record(record: dict[str, Any]) -> None:
    """The tuning trials of a GEMM blocking record as a table, then winner vs default."""
    sizes = record["sizes"]
    table = Table(title=f"GEMM blocking candidates ({'quick, ' if record['quick'] else ''}"
                        f"median GFLOPS on square sizes)", title_justify="left")
    for column in ("stage", "MR x NR", "MC", "KC", "NC", *map(str, sizes)):
        table.add_column(column, justify="left" if column == "stage" else "right")
    table.add_column("note")
    for trial in record["trials"]:
        b = trial["blocking"]
        gflops = trial["gflops"] or [None] * len(sizes)
        note = trial.get("error") or ("default" if b == record["default"] else "")
        style = "bold green" if b == record["blocking"] else None
        table.add_row(trial["stage"], f"{b['mr']} x {b['nr']}", str(b["mc"]), str(b["kc"]),
                      str(b["nc"]), *("-" if g is None else f"{g:.1f}" for g in gflops),
                      note, style=style)
    console.print(table)
    console.print(f"winner   {fmt_blocking(record['blocking'])}: "
                  f"{' / '.join(map(str, record['gflops']['tuned']))} GFLOPS")
    console.print(f"default  {fmt_blocking(record['default'])}: "
                  f"{' / '.join(map(str, record['gflops']['default']))} GFLOPS")
    console.print(f"speedup  {record['speedup']:.3f}x (geometric mean over sizes "
                  f"{', '.join(map(str, sizes))}; {record['seconds']} s of tuning)")
    if record["noise"] > _BUSY_NOISE:
        console.print(f"[yellow]warning:[/] repeated timings differed by up to "
                      f"{record['noise'] - 1:.0%}: the machine was busy, so the choice may be "
                      "noise. Re-tune when it is idle.")


@tune_app.command("gemm")
def tune_gemm(
    quick: Annotated[bool, typer.Option(help="Smaller sizes, narrower search (~15 s).")]
    = False,
    as_json: Json = False,
) -> None:
    """Find this machine's fastest GEMM blocking (MR, NR, MC, KC, NC) and record it; every
    later GEMM uses it."""
    from tessera.runtime import knowledge
    from tessera.templates.gemm.tuning import KEY, KIND
    from tessera.tune import tune_gemm as tune

    status = Console(stderr=True).status("tuning the GEMM blocking")
    with status:
        tune(quick=quick, progress=status.update)
    record = knowledge.load(KIND, KEY)
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        _print_gemm_record(record)


@tune_app.command("show")
def tune_show(as_json: Json = False) -> None:
    """What the knowledge base holds for this machine (tuned template parameters)."""
    from tessera.runtime import knowledge
    from tessera.templates.gemm.tuning import KEY, KIND

    records = knowledge.records()
    if as_json:
        print(json.dumps({"machine": knowledge.machine(), "records": records}, indent=2))
        return
    if not records:
        console.print("no tuning records for this machine (`tessera tune gemm` makes one)")
    for record in records:
        console.print(f"[bold]{record['kind']} {record['key']}[/]  "
                      f"recorded {record['recorded_at']}")
        if (record["kind"], record["key"]) == (KIND, KEY):
            _print_gemm_record(record["value"])
        else:
            console.print_json(data=record["value"])


