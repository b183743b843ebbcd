"""The `tessera` command: machine report, compile cache, benchmarks; every other module of
this package adds its own commands through `register(app)` (tune, and the tools)."""

from __future__ import annotations

import importlib
import json
import pkgutil
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
console = Console()
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


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


def fmt_blocking(b: dict[str, Any]) -> str:
    return f"MR x NR {b['mr']} x {b['nr']}, MC {b['mc']}, KC {b['kc']}, NC {b['nc']}"


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
        props = dev.properties(measure=False) if dev.type == "cpu" else dev.properties()
        if dev.type == "cpu":
            props.update(measured_peaks(remeasure=remeasure))
        devices.append(props)
    from tessera.runtime import opencl
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
        "opencl": opencl.unavailable_reason() or None,  # why no OpenCL device, if none
        "cache": default_cache().info(),
        "gemm_blocking": {**asdict(blocking()),
                          "speedup": record.get("speedup") if (record := tuned_record()) else None},
        "collectives": dist_status(),
    }


@app.command()
def info(
    remeasure: Annotated[bool, typer.Option(help="Measure peak GFLOPS and bandwidth again.")]
    = False,
    as_json: Json = False,
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
    top.add_row("GEMM blocking", fmt_blocking(gemm) + (
        f"  (tuned: {gemm['speedup']:.2f}x the default)" if gemm["speedup"] else
        "  (default from the caches; `tessera tune gemm` tunes it)"))
    top.add_row("collectives", _fmt_collectives(report["collectives"]))
    if report["opencl"]:
        top.add_row("OpenCL", f"no device: {report['opencl']}")
    console.print(top)
    for dev in report["devices"]:
        table = Table(show_header=False, title=f"device {dev['name']!r}", title_justify="left")
        if dev["type"] == "opencl":
            _opencl_rows(table, dev)
            console.print(table)
            continue
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


def _opencl_rows(table: Table, dev: dict[str, Any]) -> None:
    table.add_row("model", f"{dev['model']} ({dev['kind']}, {dev['vendor']})")
    table.add_row("platform / driver", f"{dev['platform']} / {dev['driver']}")
    table.add_row("compute units", f"{dev['compute_units']} at {dev['clock_mhz']} MHz")
    table.add_row("memory", f"global {_fmt_bytes(dev['global_memory_bytes'])}, one buffer up to "
                            f"{_fmt_bytes(dev['max_buffer_bytes'])}, local "
                            f"{_fmt_bytes(dev['local_memory_bytes'])}")
    table.add_row("work-groups", f"up to {dev['max_work_group_size']} work-items; float vectors "
                                 f"of {dev['preferred_float_vector']}")
    table.add_row("fp16 / fp64", f"{'yes' if dev['fp16'] else 'no'} / "
                                 f"{'yes' if dev['fp64'] else 'no'}")


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
    device: Annotated[str, typer.Option(help="Also time Tessera on this device, e.g. "
                                             "opencl (suites lang and ops); it becomes the "
                                             "reference of the speedups.")] = "cpu",
) -> None:
    """Time Tessera against its baselines, interleaved in one process (comm: in each of its
    ranks); medians and ratios."""
    from tessera import bench as runner

    runner.run(suite, quick=quick, ranks=ranks, json_path=json_path, console=console,
               only=only, device=device)


def _register_commands() -> None:
    """Each module of this package defines `register(app)`; heavy imports stay inside the
    commands, so `tessera --help` starts fast."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}").register(app)


_register_commands()


def main() -> None:
    """Console-script entry point: Tessera errors print as messages, not tracebacks."""
    try:
        app()
    except TesseraError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {type(e).__name__}: {e}",
                                   markup=True, highlight=False)
        sys.exit(1)
