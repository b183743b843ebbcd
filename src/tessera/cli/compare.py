"""`tessera compare`: every graph a script compiles with the tessera backend against eager,
node by node, on its first call's inputs; or two saved dumps against each other."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tessera.cli import console


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True,
                                  "ignore_unknown_options": True})(compare)


def compare(
    script: Annotated[str | None, typer.Argument(help="The Python script to run; the "
                                                      "arguments after it are its own.")]
    = None,
    args: Annotated[list[str] | None, typer.Argument(help="The script's arguments.")]
    = None,
    dumps: Annotated[tuple[str, str] | None, typer.Option(
        "--dumps", help="Compare two dumps, A against the reference B, instead of running "
                        "a script.")] = None,
    dump: Annotated[str | None, typer.Option(
        help="Write every node's outputs to this directory (a dump: see --dumps).")]
    = None,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance for floats "
                                                    "(default: by dtype).")] = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance for floats.")]
    = None,
    cosine: Annotated[float | None, typer.Option(help="Least cosine similarity for "
                                                      "floats.")] = None,
    rows: Annotated[int, typer.Option(help="Rows per table (the values out of tolerance "
                                           "first, then the largest errors); 0: all.")]
    = 40,
    strict: Annotated[bool, typer.Option(help="With --dumps: refuse dumps of graphs with "
                                              "other aten code or inputs.")] = True,
) -> None:
    """Run SCRIPT and compare every torch.compile(..., backend="tessera") graph it calls
    against eager PyTorch on its first call's inputs: per node max abs/rel error and cosine
    similarity, and the first node out of tolerance with its source line. Exit code 1 if
    any value is out of tolerance."""
    from tessera.tools.compare import CompareError, compare_dumps

    tol = {"rtol": rtol, "atol": atol, "cosine": cosine}
    limit = rows or None
    if dumps is not None:
        if script is not None:
            raise CompareError("give a script or --dumps A B, not both")
        result = compare_dumps(*dumps, strict=strict, **tol)
        result.report(console, limit)
        raise typer.Exit(0 if result.ok else 1)
    if script is None:
        raise CompareError("no script to run", hint="tessera compare script.py [args] "
                                                         "or tessera compare --dumps A B")
    results = _run(Path(script), list(args or []), tol, dump, limit)
    if not results:
        raise CompareError(f"{script} called no graph compiled with "
                                "torch.compile(..., backend='tessera')")
    bad = [r for r in results if not r.ok]
    console.print(f"{len(results)} compiled graph(s) compared, "
                  f"{len(bad)} with values out of tolerance")
    raise typer.Exit(1 if bad else 0)


def _run(script: Path, args: list[str], tol: dict[str, Any], dump: str | None,
         limit: int | None) -> list[Any]:
    """Run the script as __main__; compare each compiled graph at its first call and
    print its report."""
    from tessera.tools.compare import CompareError, compare_compiled, start_dump, watching
    from tessera.tools.script import run_as_main

    if dump is not None:
        start_dump(dump)
    results: list[Any] = []

    def check(compiled: Any, call_args: tuple[Any, ...]) -> None:
        n = len(results)
        result = compare_compiled(compiled, call_args, index=n, dump=dump, **tol)
        result.what = f"compiled graph {n} vs eager"
        result.report(console, limit)
        results.append(result)

    with watching(check):
        code = run_as_main(script, args, command="compare", error=CompareError)[1]
    if code:
        raise CompareError(f"{script} exited with status {code}", where="tessera compare")
    return results
