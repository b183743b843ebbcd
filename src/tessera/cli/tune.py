"""`tessera tune`: tune template parameters and kernel tiles for this machine; show,
export and import what is recorded."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tessera.cli import Json, console, fmt_blocking

tune_app = typer.Typer(no_args_is_help=True,
                       help="Tune template parameters and kernel tiles for this machine; "
                            "show, export and import what is recorded.")


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


Strategy = Annotated[str, typer.Option(
    help="exhaustive: every candidate tile; random: a seeded sample; model: the ones an "
         "analytic cost model ranks best.")]
Timeout = Annotated[float, typer.Option(help="Seconds each search may take (about).")]


def _print_tile_result(result: Any) -> None:
    """One search: every trial (model estimate, median, ratio to the default), then the
    outcome."""
    from tessera.tune.search import TuneResult
    r: TuneResult = result
    default = next(t for t in r.trials if t.tile == r.target.default)
    table = Table(title=f"{r.target.label}  [dim]{r.target.key}[/]  ({r.strategy}, "
                        f"{r.seconds:.1f} s)", title_justify="left")
    for column in ("BM x BN", "model us", "median us", "vs default", "note"):
        table.add_column(column, justify="left" if column == "note" else "right")
    for t in r.trials:
        note = t.error or ("default" if t.tile == r.target.default else
                           "" if t.median_s is not None else "not tried")
        ratio = (f"{default.median_s / t.median_s:.2f}x" if t.median_s and default.median_s
                 else "-")
        table.add_row(f"{t.tile[0]} x {t.tile[1]}", f"{t.model_s * 1e6:.1f}",
                      "-" if t.median_s is None else f"{t.median_s * 1e6:.1f}", ratio, note,
                      style="bold green" if r.recorded and t.tile == r.best else
                      "red" if t.error else None)
    console.print(table)
    console.print(("[green]" if r.recorded else "") + r.note)


def _report(results: list[Any], skipped: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"results": [{"key": r.target.key, "recorded": r.recorded,
                                       "note": r.note, **r.record()} for r in results],
                          "skipped": skipped}, indent=2))
        return
    for r in results:
        _print_tile_result(r)
    for line in skipped:
        console.print(f"[yellow]skipped[/] {line}")


@tune_app.command("op")
def tune_op(
    name: Annotated[str, typer.Argument(help="The op: softmax, log_softmax, layer_norm, "
                                             "rms_norm, sum, mean, amax, amin, var.")],
    spec: Annotated[str, typer.Argument(help="Input shape and dtype, e.g. 4096x1024 or "
                                             "8x128x768:bfloat16 (float32 by default).")],
    strategy: Strategy = "model",
    timeout: Timeout = 30.0,
    as_json: Json = False,
) -> None:
    """Search the tile of an op's row kernel at one shape; record it if it beats the
    default beyond noise (every later compile of that op and shape class uses it)."""
    from tessera.tools.tuning import parse_spec
    from tessera.tools.tuning import tune_op as tune

    shape, dtype = parse_spec(spec)
    status = Console(stderr=True).status(f"tuning {name} {spec}")
    with status:
        result = tune(name, shape, dtype, strategy, timeout, progress=status.update)
    _report([result], [], as_json)


@tune_app.command("graph", context_settings={"allow_extra_args": True,
                                             "ignore_unknown_options": True})
def tune_graph(
    ctx: typer.Context,
    script: Annotated[str, typer.Argument(help="A Python script that compiles models with "
                                               "the tessera backend; its arguments follow.")],
    strategy: Strategy = "model",
    timeout: Timeout = 30.0,
    as_json: Json = False,
) -> None:
    """Run SCRIPT, then search the tile of every generated kernel (fused groups, row ops)
    of the graphs it compiled; record the tiles that beat the default beyond noise."""
    from tessera.tools.tuning import tune_graph as tune

    status = Console(stderr=True).status(f"running {script}")
    with status:
        results, skipped = tune(script, ctx.args, strategy, timeout, progress=status.update)
    _report(results, skipped, as_json)


@tune_app.command("export")
def tune_export(file: Annotated[str, typer.Argument(help="The JSON file to write.")]) -> None:
    """Write this machine's records (with its fingerprint) to one JSON file."""
    from tessera.tune import export_records

    console.print(f"exported {export_records(file)} records to {file}")


@tune_app.command("import")
def tune_import(
    file: Annotated[str, typer.Argument(help="A file written by `tessera tune export`.")],
    force: Annotated[bool, typer.Option(
        help="Import another machine's records when its ISA features and core count match "
             "this one's.")] = False,
) -> None:
    """Store the records of an exported file here (all or none: a corrupted file or one
    from another machine imports nothing)."""
    from tessera.tune import import_records

    console.print(f"imported {import_records(file, force)} records from {file}")


def _print_tiles(records: list[dict[str, Any]]) -> None:
    table = Table(title="kernel tiles", title_justify="left")
    for column in ("kernel", "shape", "dtype", "tile", "default", "speedup", "recorded",
                   "what"):
        table.add_column(column, justify="right" if column == "speedup" else "left")
    for r in records:
        kernel, shape, dtype = r["key"].split("|")
        v = r["value"]
        table.add_row(kernel, shape, dtype, " x ".join(map(str, v["tile"])),
                      " x ".join(map(str, v.get("default", ["?"]))),
                      f"{v['speedup']:.2f}x" if "speedup" in v else "-", r["recorded_at"],
                      v.get("label", "") + (f" (from {v['imported_from']})"
                                            if "imported_from" in v else ""))
    console.print(table)


def _print_autotuned(records: list[dict[str, Any]]) -> None:
    table = Table(title="@tl.autotune winners", title_justify="left")
    for column in ("kernel", "tuning key", "best", "median us (every config)", "recorded"):
        table.add_column(column)
    for r in records:
        kernel, _, key = r["key"].partition("|")
        v = r["value"]
        times = ", ".join(f"{' '.join(f'{k}={x}' for k, x in c.items())}: {t * 1e6:.1f}"
                          for c, t in v.get("timings", []))
        table.add_row(kernel, key, " ".join(f"{k}={x}" for k, x in v.get("best", {}).items()),
                      times, r["recorded_at"])
    console.print(table)


@tune_app.command("show")
def tune_show(as_json: Json = False) -> None:
    """What the knowledge base holds for this machine (GEMM blocking, kernel tiles,
    @tl.autotune winners)."""
    from tessera.lang.autotune import KIND as AUTOTUNE
    from tessera.runtime import knowledge
    from tessera.templates.gemm.tuning import KEY, KIND

    records = knowledge.records()
    if as_json:
        print(json.dumps({"machine": knowledge.machine(), "records": records}, indent=2))
        return
    if not records:
        console.print("no tuning records for this machine (`tessera tune gemm`, `tessera "
                      "tune op` and `tessera tune graph` make them)")
    tiles = [r for r in records if r["kind"] == knowledge.TILE]
    autotuned = [r for r in records if r["kind"] == AUTOTUNE]
    for record in records:
        if record in tiles or record in autotuned:
            continue
        console.print(f"[bold]{record['kind']} {record['key']}[/]  "
                      f"recorded {record['recorded_at']}")
        if (record["kind"], record["key"]) == (KIND, KEY):
            _print_gemm_record(record["value"])
        else:
            console.print_json(data=record["value"])
    if tiles:
        _print_tiles(tiles)
    if autotuned:
        _print_autotuned(autotuned)
