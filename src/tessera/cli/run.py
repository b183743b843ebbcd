"""`tessera run script.py [args]`: run a PyTorch script written for a GPU, unmodified, on this
machine (see tessera.tools.migrate); `--nproc N` launches it under torchrun."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated

import typer

_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True,
             "allow_interspersed_args": False}  # everything after SCRIPT is the script's


def register(app: typer.Typer) -> None:
    app.command("run", context_settings=_SETTINGS)(run)


def run(
    script: Annotated[str, typer.Argument(help="The Python script to run.")],
    args: Annotated[list[str] | None, typer.Argument(help="The script's own arguments.")]
    = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1,
                                       help="Processes to launch with torchrun "
                                            "(--standalone, one node); 1 runs in this "
                                            "process.")] = 1,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write the report as "
                                                  "JSON here (per rank: NAME.rankR.json).")]
    = None,
) -> None:
    """Run a PyTorch script written for a GPU, unmodified, on this machine.

    cuda -> cpu, torch.compile -> tessera, nccl -> tessera collectives.

    Prints (stderr) what was redirected, what fell back and what could not be mapped.
    """
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "tessera.tools.migrate",
               *(["--json", json_path] if json_path else []), script, *(args or [])]
        raise typer.Exit(subprocess.call(cmd))
    from tessera.tools.migrate import run_script

    code = run_script(script, args or [], json_path=json_path)
    if code:
        raise typer.Exit(code)
