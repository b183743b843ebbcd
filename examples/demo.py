"""Tessera demo: hand PyTorch models to `torch.compile(model, backend="tessera")`, check them
against eager, and time them beside eager PyTorch and TorchInductor in one process.

    make demo        (or: .venv/bin/python examples/demo.py [--size tiny|small])

Models (random weights, built in code): an MoE decoder LM written the way Mixtral and
Qwen-MoE are (a Python loop over experts with data-dependent routing) and a BERT encoder
with a padding mask.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch._dynamo.utils import counters

import tessera
from tessera.bench.models import own_code
from tessera.bench.runner import Case, run_case
from tessera.bench.zoo import build
from tessera.graph import compiled

console = Console(width=150)
NOTES: list[str] = []  # what the compilers warned about, printed under the table


def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _max_error(got: Any, want: Any) -> float:
    return max(float((g.float() - w.float()).abs().max()) for g, w in
               zip(_leaves(got), _leaves(want), strict=True))


def _compile(model: torch.nn.Module, backend: str, args: tuple[Any, ...],
             options: dict[str, Any] | None = None) -> tuple[Callable[..., Any], float, int]:
    """The compiled model, its cold compile time (the first three calls: Tessera
    interprets the first, records the second, replays from the third) and the number of
    graphs dynamo handed to the backend."""
    graphs = counters["stats"]["unique_graphs"]
    fn = torch.compile(model, backend=backend, options=options)
    start = time.perf_counter()
    with console.status(f"compiling {type(model).__name__} with {backend}..."), \
            torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fn(*args)
    NOTES.extend(f"{type(model).__name__} ({backend}): {w.message}" for w in caught
                 if "tessera" in str(w.message) and str(w.message) not in NOTES)
    return fn, time.perf_counter() - start, counters["stats"]["unique_graphs"] - graphs


def _memory(before: set[int]) -> tuple[int, int]:
    """(arena bytes, sum of the intermediates it holds) over the graphs compiled since."""
    arena = total = 0
    for ex in compiled():
        if id(ex) in before:
            continue
        for plan in ex.plans.values():
            if plan is not None:
                arena += plan.memory.arena_bytes
                total += plan.memory.total_bytes
    return arena, total


def demo(name: str, size: str, batch: int, seq: int, table: Table,
         options: dict[str, Any] | None = None, label: str = "") -> None:
    zoo = build(name, size)
    args = zoo.inputs(batch, seq)
    model = zoo.model
    with torch.no_grad():
        want = model(*args)
    torch._dynamo.reset()
    before = {id(e) for e in compiled()}
    ours, ours_s, ours_graphs = _compile(model, "tessera", args, options)
    arena, total = _memory(before)
    # Inductor on a forward of its own: dynamo's per-code state ignores the backend (see
    # tessera.bench.models.own_code), so no reset between the compilers, and neither
    # compiler's frames leak into the other's
    inductor, inductor_s, inductor_graphs = _compile(own_code(model), "inductor", args)
    ours_now = {id(e) for e in compiled()}
    with torch.no_grad():
        err = _max_error(ours(*args), want)
        if err > (5e-2 if options else 2e-3) * max(1.0, max(float(w.abs().max())
                                                           for w in _leaves(want))):
            raise AssertionError(f"{name}: tessera's output differs from eager by {err:.3g}")
        rows = run_case("demo", Case(name, {"tessera": lambda: ours(*args),
                                            "torch_eager": lambda: model(*args),
                                            "torch_inductor": lambda: inductor(*args)}),
                        rounds=9, min_sample_s=0.02)
    if again := [e for e in compiled() if id(e) not in ours_now]:
        raise AssertionError(f"{name}: tessera compiled {len(again)} more graphs while timed "
                             "beside Inductor: it did not run the graphs it compiled")
    t = {r["impl"]: r["median_s"] for r in rows}
    table.add_row(f"{name}{label} {batch}x{seq}", f"{err:.1e}",
                  f"{t['tessera'] * 1e3:.2f} ms",
                  f"{t['torch_eager'] / t['tessera']:.2f}x",
                  f"{t['torch_inductor'] / t['tessera']:.2f}x",
                  f"{ours_s:.1f} s / {inductor_s:.1f} s",
                  f"{ours_graphs} / {inductor_graphs}",
                  f"{arena / 2**20:.2f} / {total / 2**20:.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    args = parser.parse_args()
    console.rule("[bold]Tessera: torch.compile(model, backend=\"tessera\")")
    info = tessera.device("cpu")
    console.print(f"{info}\n")
    table = Table(title="latency: median of interleaved rounds; speedup = their time / ours")
    for column in ("model (batch x seq)", "max |err| vs eager", "tessera", "vs eager",
                   "vs inductor", "compile: tessera / inductor", "graphs: tessera / inductor",
                   "arena / intermediates"):
        table.add_column(column, justify="right" if column != "model (batch x seq)" else "left")
    demo("moe_lm", args.size, 1, 32, table)
    demo("moe_lm", args.size, 1, 32, table, {"quantize": "int8"}, " int8")
    demo("bert", args.size, 1, 32, table)
    console.print(table)
    for note in dict.fromkeys(NOTES):
        console.print(f"[dim]note: {note}[/]")
    console.print("Compile times include the first three calls (Tessera interprets the first, "
                  "records the second, replays from the third). `tessera bench models` has "
                  "the full comparison.")


if __name__ == "__main__":
    main()
