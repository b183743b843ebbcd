"""The `tessera` command: machine report, compile cache, autotuning, benchmarks."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict
from importlib import metadata
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

import tessera
from tessera.errors import TesseraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Tessera: an open, hardware-neutral compute stack for neural networks.")
cache_app = typer.Typer(no_args_is_help=True, help="Inspect or clear the compile cache.")
app.add_typer(cache_app, name="cache")
tune_app = typer.Typer(no_args_is_help=True,
                       help="Tune template parameters for this machine; show what is recorded.")
app.add_typer(tune_app, name="tune")
console = Console()
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def machine_report(remeasure: bool = False) -> dict[str, Any]:
    """Everything `tessera info` shows, as data."""
    from tessera.dist.status import status as dist_status
    from tessera.runtime import toolchain
    from tessera.runtime.cache import default_cache
    from tessera.runtime.cpu.probe import measured_peaks
    from tessera.templates.gemm import blocking
    from tessera.templates.gemm.tuning import tuned_record

    cc = toolchain.compiler()
    devices = []
    for dev in tessera.devices():
        props = dev.properties(measure=False)
        if dev.type == "cpu":
            props.update(measured_peaks(remeasure=remeasure))
        devices.append(props)
    gomp = toolchain.openmp_flags(cc)
    return {
        "tessera": tessera.__version__,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "compiler": {"command": " ".join(cc.command), "family": cc.family,
                     "version": cc.version.splitlines()[0]},
        "openmp": gomp[1] if len(gomp) > 1 else "the compiler's own runtime",
        "devices": devices,
        "cache": default_cache().info(),
        "gemm_blocking": {**asdict(blocking()),
                          "speedup": record.get("speedup") if (record := tuned_record()) else None},
        "collectives": dist_status(),
    }


@app.command()
def info(
    remeasure: Annotated[bool, typer.Option(help="Measure peak GFLOPS and bandwidth again.")]
    = False,
    as_json: _Json = False,
) -> None:
    """Devices, ISA, compiler, cache, and this machine's measured peaks."""
    report = machine_report(remeasure)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    top = Table(show_header=False, title=f"Tessera {report['tessera']}", title_justify="left")
    top.add_row("python / torch / numpy",
                f"{report['python']} / {report['torch']} / {report['numpy']}")
    top.add_row("C compiler", f"{report['compiler']['version']}  ({report['compiler']['command']})")
    top.add_row("OpenMP runtime", report["openmp"])
    cache = report["cache"]
    entries = sum(k["entries"] for k in cache["kinds"].values())
    top.add_row("compile cache", f"{cache['path']}  ({entries} entries, "
                                 f"{_fmt_bytes(cache['total_bytes'])})")
    gemm = report["gemm_blocking"]
    top.add_row("GEMM blocking", _fmt_blocking(gemm) + (
        f"  (tuned: {gemm['speedup']:.2f}x the default)" if gemm["speedup"] else
        "  (default from the caches; `tessera tune gemm` tunes it)"))
    top.add_row("collectives", _fmt_collectives(report["collectives"]))
    console.print(top)
    for dev in report["devices"]:
        table = Table(show_header=False, title=f"device {dev['name']!r}", title_justify="left")
        table.add_row("model", f"{dev['model']} ({dev['arch']})")
        table.add_row("cores", f"{dev['cores']} usable of {dev['logical_cpus']} logical CPUs")
        table.add_row("ISA", " ".join(dev["isa"]) or "(baseline)")
        table.add_row("caches", "  ".join(f"{k} {_fmt_bytes(v)}"
                                          for k, v in dev["cache_bytes"].items() if v))
        table.add_row("peak fp32 (measured)", f"{dev['peak_gflops_fp32']:.1f} GFLOPS")
        table.add_row("bandwidth (measured)", f"copy {dev['copy_bandwidth_gbs']:.1f} GB/s, "
                                              f"read {dev['read_bandwidth_gbs']:.1f} GB/s")
        table.add_row("measured at", dev["measured_at"])
        console.print(table)


def _fmt_collectives(c: dict[str, Any]) -> str:
    shm = (f"shared memory {_fmt_bytes(c['shm_free_bytes'])} free"
           if c["shm_free_bytes"] is not None else "no /dev/shm")
    direct = ("direct copies between ranks allowed" if c["direct_copies"] else
              "direct copies refused by the kernel (ptrace policy): shared-memory copies only")
    mpi = (f"mpi4py {c['mpi4py']}" if c["mpi4py"] else "no mpi4py (pip install mpi4py)")
    mpirun = c["mpirun"] or "no mpirun (apt-get install openmpi-bin libopenmpi-dev)"
    return f"{shm}; {direct}\n{mpi}; {mpirun}"


@cache_app.command("info")
def cache_info() -> None:
    """Where the compile cache is and what it holds."""
    from tessera.runtime.cache import default_cache

    report = default_cache().info()
    console.print(f"compile cache: {report['path']} (layout {report['layout']})")
    for kind, stats in report["kinds"].items():
        console.print(f"  {kind:10s} {stats['entries']:6d} entries  {_fmt_bytes(stats['bytes'])}")
    if report["failed_sources"]:
        console.print(f"  {report['failed_sources']} source(s) of failed compiles in "
                      f"{report['path']}/{report['layout']}/errors")
    console.print(f"  total      {_fmt_bytes(report['total_bytes'])}")


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached artifact (rebuilt on next use) and this cache's tuning records
    (re-tune with `tessera tune gemm`)."""
    from tessera.runtime.cache import default_cache

    cache = default_cache()
    freed = cache.clear()
    console.print(f"cleared {cache.root} ({_fmt_bytes(freed)} freed)")


_BUSY_NOISE = 1.1  # a tuning's noise (see tessera.tune.gemm) above which it was busy


def _fmt_blocking(b: dict[str, Any]) -> str:
    return f"MR x NR {b['mr']} x {b['nr']}, MC {b['mc']}, KC {b['kc']}, NC {b['nc']}"


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
    console.print(f"winner   {_fmt_blocking(record['blocking'])}: "
                  f"{' / '.join(map(str, record['gflops']['tuned']))} GFLOPS")
    console.print(f"default  {_fmt_blocking(record['default'])}: "
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
    as_json: _Json = False,
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
def tune_show(as_json: _Json = False) -> None:
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


@app.command()
def bench(
    suite: Annotated[str, typer.Argument(help="Suite to run, e.g. runtime.")],
    quick: Annotated[bool, typer.Option(help="Fewer rounds and smaller sizes.")] = False,
    json_path: Annotated[str | None, typer.Option("--json", help="Write results here.")] = None,
    ranks: Annotated[int, typer.Option(help="Processes to launch; only the comm suite uses "
                                            "it (the others run in this process).")] = 2,
    only: Annotated[str | None, typer.Option(help="Only the cases matching these "
                                                  "comma-separated patterns, e.g. "
                                                  "'softmax_*,gelu_*'.")] = None,
) -> None:
    """Time Tessera against its baselines, interleaved in one process (comm: in each of its
    ranks); medians and ratios."""
    from tessera import bench as runner

    runner.run(suite, quick=quick, ranks=ranks, json_path=json_path, console=console,
               only=only)


def main() -> None:
    """Console-script entry point: Tessera errors print as messages, not tracebacks."""
    try:
        app()
    except TesseraError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {type(e).__name__}: {e}",
                                   markup=True, highlight=False)
        sys.exit(1)
