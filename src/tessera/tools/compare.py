"""Accuracy comparison: a model compiled by Tessera against eager PyTorch, node by node.

    result = tessera.tools.compare(model, (x,))    # or a torch.compile'd model
    result.report()                                # a table; result.first_bad names the node

The compiled graph runs through the graph interpreter, so every node's outputs can be
seen, and the aten FX graph the backend was given runs through torch's FX interpreter
(Tessera's own custom ops, e.g. fused_moe, through their torch references): eager's value
of every FX node. Every IR Value knows the FX value it equals (`Value.origin`, kept when
patterns and fusion replace the nodes that compute it), so each node's outputs are
checked against eager's: max abs error, max rel error (relative to the reference's largest
magnitude: elementwise ratios are unbounded where values cross zero), cosine similarity,
shape and dtype. A value is within tolerance when max_abs <= atol + rtol * max|ref| and its
cosine similarity is at least `cosine` (integers and bools: equal); tolerances fit the
dtype (`TOLERANCES`; looser for weight-quantized graphs) unless given.

`dump=` writes every node's compiled outputs (one torch.save file per graph and an
index.json naming node, op, source line, shape and dtype); `compare_dumps(a, b)` compares
two dumps (two machines, two versions) by the FX value each entry holds. `watching`
compares every graph the tessera backend compiles on its first call (`tessera compare
script.py`)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.errors import TesseraError

__all__ = ["QUANTIZED", "TOLERANCES", "CompareError", "Comparison", "Row", "Tolerance",
           "compare", "compare_compiled", "compare_dumps", "start_dump", "tolerance",
           "watching"]

DUMP_FORMAT = 1
_INDEX = "index.json"


class CompareError(TesseraError):
    """Input the comparison cannot take: not a module, a model that ran no Tessera graph,
    a directory that is no dump, two dumps of different models."""


@dataclass(frozen=True)
class Tolerance:
    """Within tolerance: max_abs <= atol + rtol * max|ref| and cosine >= `cosine`."""

    rtol: float
    atol: float
    cosine: float


TOLERANCES = {torch.float64: Tolerance(1e-9, 1e-12, 1 - 1e-12),
              torch.float32: Tolerance(1e-4, 1e-6, 1 - 1e-6),
              torch.float16: Tolerance(4e-3, 1e-5, 1 - 1e-4),
              torch.bfloat16: Tolerance(3e-2, 1e-5, 1 - 1e-3)}
QUANTIZED = {"int8": Tolerance(5e-2, 1e-4, 0.999), "int4": Tolerance(0.25, 1e-3, 0.98)}
EXACT = Tolerance(0.0, 0.0, -1.0)  # integers and bools: equal (no cosine condition)


def tolerance(dtype: torch.dtype, quantize: str | None = None) -> Tolerance:
    """The default tolerance of a value of `dtype` (in a graph quantized to `quantize`,
    floats get the quantization's, unless their dtype's is looser)."""
    if not dtype.is_floating_point:
        return EXACT
    base = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    q = QUANTIZED.get(quantize) if quantize else None
    if q is None:
        return base
    return Tolerance(max(base.rtol, q.rtol), max(base.atol, q.atol),
                     min(base.cosine, q.cosine))


@dataclass
class Row:
    """One output of one compiled node against its reference. `ok`: None where there is
    nothing to compare with (a value a pattern made inside its replacement)."""

    graph: int
    node: int
    op: str
    value: str
    origin: str  # the FX value compared against ("" if none)
    where: str  # "file:line: code" of the user's source, "" if unknown
    shape: tuple[Any, ...] | None = None
    dtype: str = ""
    ref_shape: tuple[Any, ...] | None = None
    ref_dtype: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    ok: bool | None = None
    note: str = ""

    @property
    def file(self) -> str:
        return _split_where(self.where)[0]

    @property
    def line(self) -> int | None:
        return _split_where(self.where)[1]

    @property
    def code(self) -> str:
        return _split_where(self.where)[2]

    def describe(self) -> str:
        """One paragraph naming the value, its op, shapes, errors and source line."""
        text = (f"graph {self.graph} node {self.node} ({self.op}) output %{self.value}"
                + (f" (eager {self.origin})" if self.origin else "")
                + f": {self.dtype}{list(self.shape or ())}")
        if self.ref_shape is not None and (self.ref_shape != self.shape
                                           or self.ref_dtype != self.dtype):
            text += f" vs reference {self.ref_dtype}{list(self.ref_shape)}"
        if self.max_abs is not None:
            text += (f"; max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}, "
                     f"cosine {self.cosine:.6f}")
        if self.note:
            text += f"; {self.note}"
        if self.where:
            text += f"\n  at {self.file}:{self.line}\n    {self.code}"
        return text


_WHERE = re.compile(r"^(.*?):(\d+): ?(.*)$", re.DOTALL)


def _split_where(where: str) -> tuple[str, int | None, str]:
    m = _WHERE.match(where)
    return (m[1], int(m[2]), m[3]) if m else (where, None, "")


@dataclass
class Comparison:
    """The rows of a comparison, in execution order (graphs in the order they ran)."""

    rows: list[Row]
    what: str = "tessera vs eager"
    graphs: list[Any] = field(default_factory=list, repr=False)  # the Executables compared

    @property
    def bad(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    @property
    def ok(self) -> bool:
        """Every compared value within tolerance."""
        return not self.bad

    @property
    def first_bad(self) -> Row | None:
        """The first value out of tolerance, or None."""
        return next((r for r in self.rows if r.ok is False), None)

    def summary(self) -> str:
        compared = sum(r.ok is not None for r in self.rows)
        graphs = len({r.graph for r in self.rows})
        head = (f"{self.what}: {compared} values of {graphs} graph(s) compared, "
                f"{len(self.bad)} out of tolerance")
        first = self.first_bad
        return head if first is None else f"{head}; first:\n{first.describe()}"

    def __str__(self) -> str:
        return self.summary()

    def table(self, limit: int | None = 40) -> Any:
        """A rich Table of the rows: all of them, or (beyond `limit`) those out of
        tolerance and then the largest relative errors, in graph order."""
        from rich.table import Table

        rows = [r for r in self.rows if r.ok is not None]
        if limit is not None and len(rows) > limit:
            keep = set(map(id, self.bad[:limit]))
            rest = sorted((r for r in rows if r.ok), key=lambda r: -(r.max_rel or 0.0))
            keep.update(map(id, rest[:max(0, limit - len(keep))]))
            rows = [r for r in rows if id(r) in keep]
        shown = "" if len(rows) == sum(r.ok is not None for r in self.rows) else \
            f" ({len(rows)} shown)"
        t = Table(title=f"{self.what}{shown}", title_justify="left")
        several = len({r.graph for r in self.rows}) > 1
        columns = ["graph"] * several + ["node", "op", "shape", "max abs", "max rel",
                                         "cosine", "", "source"]
        for c in columns:
            t.add_column(c, justify="right" if c in ("graph", "node", "max abs", "max rel",
                                                     "cosine") else "left")
        for r in rows:
            t.add_row(*[str(r.graph)] * several, str(r.node), r.op, _shape(r),
                      _num(r.max_abs), _num(r.max_rel),
                      "-" if r.cosine is None else f"{r.cosine:.6f}",
                      "ok" if r.ok else "BAD" if r.note == _OUT else f"BAD: {r.note}",
                      f"{Path(r.file).name}:{r.line}" if r.where else "",
                      style=None if r.ok else "bold red")
        return t

    def report(self, console: Any = None, limit: int | None = 40) -> None:
        """Print the table and the summary (with the first bad value's source line)."""
        from rich.console import Console
        console = console or Console()
        console.print(self.table(limit))
        console.print(self.summary(), markup=False, highlight=False, soft_wrap=True)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


_SHORT = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
          "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "u8"}


def _shape(r: Row) -> str:
    """"f32 2x8x64", with the reference's where it differs."""
    def one(dtype: str, shape: tuple[Any, ...] | None) -> str:
        return f"{_SHORT.get(dtype, dtype)} {'x'.join(map(str, shape or ())) or 'scalar'}"
    text = one(r.dtype, r.shape)
    other = one(r.ref_dtype, r.ref_shape)
    return text if r.ref_shape is None or other == text else f"{text} vs {other}"


# -- metrics --------------------------------------------------------------------------------
_OUT = "out of tolerance"


def _check(row: Row, got: Any, ref: Any, tol: Tolerance) -> None:
    """Fill row's shapes, dtypes, errors and verdict for `got` against `ref`."""
    got, ref = _tensor(got), _tensor(ref)
    row.shape, row.dtype = tuple(got.shape), str(got.dtype).removeprefix("torch.")
    row.ref_shape, row.ref_dtype = tuple(ref.shape), str(ref.dtype).removeprefix("torch.")
    if got.shape != ref.shape:
        row.ok, row.note = False, "shape differs"
        return
    a, b = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    nan_a, nan_b = a.isnan(), b.isnan()
    diff = torch.where((a == b) | (nan_a & nan_b), 0.0, (a - b).abs())
    diff = torch.where(nan_a != nan_b, math.inf, diff).nan_to_num(nan=math.inf)
    finite = b[b.isfinite()].abs()
    scale = finite.max().item() if finite.numel() else 0.0
    row.max_abs = diff.max().item() if diff.numel() else 0.0
    row.max_rel = row.max_abs / scale if scale > 0 else (0.0 if row.max_abs == 0 else math.inf)
    a0 = a.nan_to_num(0.0, 0.0, 0.0).flatten()
    b0 = b.nan_to_num(0.0, 0.0, 0.0).flatten()
    na, nb = a0.norm().item(), b0.norm().item()
    row.cosine = 1.0 if na == nb == 0 else 0.0 if na == 0 or nb == 0 else \
        min(1.0, (a0 @ b0).item() / (na * nb))
    row.ok = row.max_abs <= tol.atol + tol.rtol * scale and row.cosine >= tol.cosine
    if got.dtype != ref.dtype:
        row.ok, row.note = False, "dtype differs"
    elif not row.ok:
        row.note = _OUT


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _tolerance(dtype: torch.dtype, quantize: str | None, rtol: float | None,
               atol: float | None, cosine: float | None) -> Tolerance:
    t = tolerance(dtype, quantize)
    if t is EXACT:
        return t
    return Tolerance(t.rtol if rtol is None else rtol, t.atol if atol is None else atol,
                     t.cosine if cosine is None else cosine)


# -- capturing the backend's graphs -----------------------------------------------------------
@contextlib.contextmanager
def watching(on_first_call: Callable[[Any, tuple[Any, ...]], None]) -> Iterator[None]:
    """While inside, call `on_first_call(compiled, args)` before the first call of every
    graph the tessera backend compiled (compiled: the backend's function, see
    tessera.graph.backend.HOOKS; args: the call's aten inputs)."""
    from tessera.graph.backend import HOOKS

    seen: set[int] = set()

    def hook(compiled: Any, args: tuple[Any, ...]) -> None:
        if id(compiled) not in seen:
            seen.add(id(compiled))
            on_first_call(compiled, args)

    HOOKS.append(hook)
    try:
        yield
    finally:
        HOOKS.remove(hook)


def _fresh(compiled: Any, args: Sequence[Any]) -> list[Any]:
    """The arguments with the graph's own inputs copied (a graph may write an input: eager
    and the interpreter each get their own); frozen parameters as they are."""
    own = set(compiled.inputs)
    return [a.clone() if i in own and isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)]


def _eager(gm: torch.fx.GraphModule, args: Sequence[Any]) -> dict[str, Any]:
    """Every FX node's value (by name) running `gm` eagerly; Tessera's custom ops run
    their torch references."""
    from tessera.ops import registry

    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = values[n.name] = super().run_node(n)
            return out

        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            if isinstance(target, torch._ops.OpOverload) and target.namespace == "tessera":
                return registry.get(target._opname).reference(*args, **kwargs)
            return super().call_function(target, args, kwargs)

    Recorder(gm).run(*args)
    return values


def _lookup(values: dict[str, Any], origin: str) -> Any:
    name, _, index = origin.partition("[")
    v = values.get(name)
    if v is not None and index:
        v = v[int(index.rstrip("]"))]
    return v


def compare_compiled(compiled: Any, args: Sequence[Any], *, index: int = 0,
                     rtol: float | None = None, atol: float | None = None,
                     cosine: float | None = None, dump: str | Path | None = None
                     ) -> Comparison:
    """Compare one graph the tessera backend compiled (what `watching` hands over) on
    these arguments, as graph `index`; with `dump`, add its outputs to that dump."""
    from tessera.graph.interpreter import interpret

    ex = compiled.executable(*args)
    quantize = compiled.options.get("quantize")
    tol = {"rtol": rtol, "atol": atol, "cosine": cosine}
    rows: list[Row] = []
    saved: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    with torch.no_grad():
        eager = _eager(compiled.fx, _fresh(compiled, args))
        nodes = iter(enumerate(ex.graph.nodes))

        def watch(node: Any, outs: list[Any]) -> None:
            i, _ = next(nodes)
            for v, out in zip(node.outputs, outs, strict=True):
                row = Row(index, i, node.op, v.name, v.origin, node.where)
                ref = _lookup(eager, v.origin) if v.origin else None
                if ref is None:
                    row.shape, row.dtype = tuple(v.shape), str(v.dtype).removeprefix("torch.")
                    row.note = "no eager counterpart"
                else:
                    _check(row, out, ref, _tolerance(_tensor(ref).dtype, quantize, **tol))
                rows.append(row)
                if dump is not None:
                    key = _key(row, saved)
                    saved[key] = _tensor(out).detach().clone()
                    entries.append({"key": key, "node": i, "op": node.op, "value": v.name,
                                    "where": node.where, "shape": list(saved[key].shape),
                                    "dtype": str(saved[key].dtype).removeprefix("torch.")})

        fresh = _fresh(compiled, args)
        try:
            interpret(ex.graph, [fresh[i] for i in compiled.inputs], watch=watch)
        except Exception as e:  # the node that raised is the first bad one
            i, node = next(nodes, (len(ex.graph.nodes), None))
            if node is None:
                raise
            out = node.outputs[0] if node.outputs else None
            rows.append(Row(index, i, node.op, out.name if out else "",
                            out.origin if out else "", node.where, ok=False,
                            note=f"raised {type(e).__name__}: {e}"))
    if dump is not None:
        _write_dump(Path(dump), {"graph": index, "file": f"graph{index}.pt",
                                 "fx": _fingerprint(compiled, args), "quantize": quantize,
                                 "entries": entries}, saved)
    return Comparison(rows, graphs=[ex])


def _fingerprint(compiled: Any, args: Sequence[Any]) -> str:
    """What identifies a graph and its inputs across machines and versions: the aten
    graph's code and the inputs' shapes, dtypes and contents (not the frozen weights')."""
    import hashlib
    h = hashlib.sha256(compiled.fx.code.encode())
    for i in compiled.inputs:
        a = args[i]
        if isinstance(a, torch.Tensor):
            h.update(f"{tuple(a.shape)}{a.dtype}".encode())
            h.update(a.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(a).encode())
    return h.hexdigest()[:16]


def _key(row: Row, taken: dict[str, Any]) -> str:
    """A dump entry's name: the FX value it holds (what another version's graph calls
    it too), else the IR value's."""
    key = row.origin or f"%{row.value}"
    base, i = key, 1
    while key in taken:
        key, i = f"{base}#{i}", i + 1
    return key


# -- the API ----------------------------------------------------------------------------------
def compare(model: torch.nn.Module, inputs: Any, *, options: dict[str, Any] | None = None,
            rtol: float | None = None, atol: float | None = None,
            cosine: float | None = None, dump: str | Path | None = None) -> Comparison:
    """Run `model` on `inputs` (a tensor or a tuple of arguments) compiled by Tessera (with
    `options`; or as it is if it is already a `torch.compile(..., backend="tessera")`
    model) and compare every node of every graph it ran against eager PyTorch, on this
    call's inputs. `rtol`, `atol`, `cosine`: tolerances for all float values instead of
    the dtype's (`TOLERANCES`). `dump`: a directory to write every node's outputs to (see
    `compare_dumps`)."""
    if not isinstance(model, torch.nn.Module):
        raise CompareError(f"compare takes a torch.nn.Module, got {type(model).__name__}",
                           hint="wrap a function in a module, or compile it with "
                                "torch.compile(fn, backend='tessera') inside a script and "
                                "run `tessera compare script.py`")
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        if options is not None:
            raise CompareError("options= applies when compare compiles the model; this one "
                               "is compiled already", hint="pass the uncompiled model")
        compiled_model = model
    else:
        compiled_model = torch.compile(model, backend="tessera", options=options or {})
    captured: list[tuple[Any, tuple[Any, ...]]] = []
    with watching(lambda c, a: captured.append((c, tuple(_fresh(c, a))))), torch.no_grad():
        compiled_model(*args)
    if not captured:
        raise CompareError(f"{type(model).__name__} ran no graph compiled by Tessera",
                           hint="a model compiled with another backend cannot be compared; "
                                "pass the uncompiled model")
    if dump is not None:
        start_dump(dump)
    result = Comparison([])
    for i, (compiled, a) in enumerate(captured):
        one = compare_compiled(compiled, a, index=i, rtol=rtol, atol=atol, cosine=cosine,
                               dump=dump)
        result.rows += one.rows
        result.graphs += one.graphs
    return result


# -- dumps ------------------------------------------------------------------------------------
def start_dump(root: str | Path) -> None:
    """Make `root` an empty dump: create it, or remove the files an earlier dump wrote
    there (only those)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if (root / _INDEX).exists():
        _, index = _read_dump(root)
        for g in index["graphs"]:
            (root / Path(g["file"]).name).unlink(missing_ok=True)
        (root / _INDEX).unlink()


def _write_dump(root: Path, graph: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Add one graph's outputs to the dump in `root`: its tensors in graph["file"], its
    entry (fingerprint, entries) in the index."""
    import tessera
    index_path = root / _INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else \
        {"format": DUMP_FORMAT, "tessera": tessera.__version__, "graphs": []}
    torch.save(tensors, root / graph["file"])
    index["graphs"] = [g for g in index["graphs"] if g["graph"] != graph["graph"]] + [graph]
    index_path.write_text(json.dumps(index, indent=1))


def _read_dump(path: str | Path) -> tuple[Path, dict[str, Any]]:
    root = Path(path)
    try:
        index = json.loads((root / _INDEX).read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"{root} is not a dump of tessera.tools.compare ({e})",
                           hint="write one with compare(model, inputs, dump=DIR) or "
                                "`tessera compare script.py --dump DIR`") from e
    if not isinstance(index, dict) or index.get("format") != DUMP_FORMAT:
        raise CompareError(f"{root / _INDEX} has dump format "
                           f"{index.get('format') if isinstance(index, dict) else None!r};"
                           f" this Tessera reads format {DUMP_FORMAT}")
    return root, index


def compare_dumps(a: str | Path, b: str | Path, *, rtol: float | None = None,
                  atol: float | None = None, cosine: float | None = None,
                  strict: bool = True) -> Comparison:
    """Compare dump `a` against dump `b` (the reference), entry by entry: the same FX value
    of the same graph. Entries only one dump has (another version fused them away) are
    listed as not compared. Dumps of other graphs or inputs (their aten graphs' code or
    the inputs differ) raise CompareError, unless `strict` is False (e.g. two torch
    versions: values are then matched by their FX names)."""
    (ra, ia), (rb, ib) = _read_dump(a), _read_dump(b)
    ga = {g["graph"]: g for g in ia["graphs"]}
    gb = {g["graph"]: g for g in ib["graphs"]}
    if set(ga) != set(gb):
        raise CompareError(f"dump {ra} holds graphs {sorted(ga)}, dump {rb} holds "
                           f"{sorted(gb)}: not dumps of the same model and inputs")
    differ = [g for g in sorted(ga) if ga[g]["fx"] != gb[g]["fx"]]
    if strict and differ:
        raise CompareError(f"dumps {ra} and {rb} are of different graphs or inputs "
                           f"(graph(s) {differ}: other aten code or inputs)",
                           hint="compare_dumps(..., strict=False) matches their values by "
                                "FX name anyway")
    result = Comparison([], what=f"{ra} vs {rb}")
    tol = {"rtol": rtol, "atol": atol, "cosine": cosine}
    common = 0
    for g in sorted(ga):
        ta = torch.load(ra / ga[g]["file"], weights_only=True)
        tb = torch.load(rb / gb[g]["file"], weights_only=True)
        common += len(set(ta) & set(tb))
        for e in ga[g]["entries"]:
            row = Row(g, e["node"], e["op"], e["value"], e["key"], e["where"],
                      shape=tuple(e["shape"]), dtype=e["dtype"])
            if e["key"] in tb:
                ref = tb[e["key"]]
                _check(row, ta[e["key"]], ref,
                       _tolerance(ref.dtype, ga[g]["quantize"] or gb[g]["quantize"], **tol))
            else:
                row.note = f"not in {rb}"
            result.rows.append(row)
    if common == 0:
        raise CompareError(f"dumps {ra} and {rb} share no value: not dumps of the same "
                           "model")
    return result
