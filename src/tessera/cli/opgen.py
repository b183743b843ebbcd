"""`tessera opgen`: scaffold a new operator (definition and kernel, test, benchmark) into a
Tessera source tree, green from the start."""

from __future__ import annotations

from typing import Annotated

import typer

from tessera.cli import console


def register(app: typer.Typer) -> None:
    app.command("opgen")(opgen)


def opgen(
    name: Annotated[str, typer.Argument(help="The new op's name: a lowercase identifier, "
                                             "e.g. quick_gelu.")],
    kind: Annotated[str, typer.Option(help="pointwise (a tile kernel), reduction (a row "
                                           "reduction) or template (a GEMM-template op "
                                           "with a fused epilogue).")],
    root: Annotated[str | None, typer.Option(help="The Tessera source tree to write into "
                                                  "(default: the running Tessera's).")]
    = None,
    force: Annotated[bool, typer.Option(help="Overwrite the files of an op opgen wrote "
                                             "before.")] = False,
) -> None:
    """Scaffold a new op, green from the start: definition, kernel, test, benchmark.

    Writes src/tessera/ops/NAME.py (schema, torch reference, kernel),
    tests/ops/test_NAME.py and src/tessera/bench/ops/NAME.py, and regenerates
    docs/ops.md: a working example computation to edit. All files or none are written.
    """
    from tessera.tools.opgen import KINDS, generate

    with console.status(f"generating op {name!r} and importing the tree with it"):
        g = generate(name, kind, root=root, force=force)
    console.print(f"op [bold]{g.name}[/] ({KINDS[g.kind]}) written into {g.root}:")
    for path in (*g.files, g.docs):
        console.print(f"  {path.relative_to(g.root)}")
    console.print(f"test it:   {g.test_command}", highlight=False, soft_wrap=True)
    console.print(f"bench it:  {g.bench_command}", highlight=False, soft_wrap=True)
