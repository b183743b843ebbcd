"""The operator registry: one definition per op serving eager calls, `torch.ops.tessera.*`
and the graph compiler, so the three can never disagree.

An op is declared once with `@op(schema, ...)` on its eager implementation (a function of
CPU torch tensors). The schema is torch's (`"softmax(Tensor x, int dim=-1) -> Tensor"`):
it names the inputs, attributes and outputs, and is what `torch.library` registers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KINDS", "Arg", "OpDef", "get", "list_ops", "op"]

# What the graph compiler may do with an op of each kind.
KINDS = {
    "pointwise": "elementwise: fusable into a chain and into GEMM/conv/attention epilogues",
    "reduction": "reduces one or more dims: fusable as the last op of a pointwise chain",
    "normalization": "row statistics then a pointwise affine map",
    "contraction": "matrix products on the GEMM templates: accepts epilogues",
    "convolution": "convolutions on the GEMM templates: accepts epilogues",
    "pooling": "windowed reductions",
    "index": "gathers, scatters and copies by index",
    "shape": "concatenation, splitting and layout copies",
    "attention": "attention and positional embeddings",
    "moe": "mixture-of-experts routing and expert computation",
    "quantization": "weight quantization helpers",
}


@dataclass(frozen=True)
class Arg:
    """One schema argument: its name, type as torch prints it (`Tensor`, `Optional[Tensor]`,
    `List[Tensor]`, `List[int]`, `float`, ...), default (`Arg.REQUIRED` if none) and
    whether it is keyword-only."""

    REQUIRED = object()
    name: str
    type: str
    default: Any = REQUIRED
    kwarg_only: bool = False

    @property
    def is_tensor(self) -> bool:
        return "Tensor" in self.type


@dataclass
class OpDef:
    """Everything known about one operator."""

    name: str
    schema: str
    kind: str
    impl: Callable[..., Any]  # eager, on CPU torch tensors
    reference: Callable[..., Any]  # torch, same signature: the tests' ground truth
    meta: Callable[..., Any]  # output(s) of the right shape/dtype from fake tensors
    doc: str
    dtypes: tuple[str, ...]
    args: list[Arg]
    epilogues: tuple[str, ...] = ()  # consumers the graph compiler may fuse into this op
    implements: tuple[Any, ...] = ()  # torch callables / aten overloads this op computes
    tile: Any = None  # pointwise: a tessera.lang function of tiles, for fused kernels
    fast: str | None = None  # the native fast path's call, see `op`
    host_reads: bool | Callable[..., bool] = False  # reads data on the host: see `op`
    eager: Callable[..., Any] = field(default=None, repr=False)  # type: ignore[assignment]

    @property
    def tensor_args(self) -> list[str]:
        return [a.name for a in self.args if a.is_tensor]

    @property
    def num_outputs(self) -> int:
        """How many tensors the op returns (a tuple of them if more than one)."""
        import torch
        return len(torch._C.parse_schema(f"tessera::{self.schema}").returns)


_REGISTRY: dict[str, OpDef] = {}


def op(schema: str, *, kind: str, reference: Callable[..., Any],
       meta: Callable[..., Any] | None = None,
       dtypes: Sequence[str] = ("float32", "bfloat16", "float16"),
       epilogues: Sequence[str] = (), implements: Sequence[Any] = (),
       tile: Any = None, fast: str | None = None,
       host_reads: bool | Callable[..., bool] = False
       ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the decorated function (the eager implementation on CPU torch tensors) as
    the operator `schema` and return its public eager form, which also takes numpy arrays
    and tessera tensors and gives back the caller's kind. `meta` defaults to running
    `reference` on fake tensors (fine wherever torch's own ops can infer the shapes).
    `fast` is a Python expression over the op's parameters tried first when every tensor
    argument is a torch tensor: a call of the native fast path, `_pw(@table, ...)` or
    `_rows(@table, ...)` (see _fastpath.py), that gives the result or None. `host_reads`:
    the implementation reads tensor data back on the host (index range checks, expert
    counts), so the kernels it launches depend on data, not only on shapes: the graph
    compiler then runs it from Python at every call rather than replaying its launches;
    a function of the op's arguments (by name) says so per call, for an op with a path
    that reads nothing back."""
    if kind not in KINDS:
        raise ValueError(f"unknown op kind {kind!r}; one of {sorted(KINDS)}")

    def register(impl: Callable[..., Any]) -> Callable[..., Any]:
        from tessera.ops.dispatch import eager_function
        name, args = parse_schema(schema)
        if name in _REGISTRY:
            raise ValueError(f"op {name!r} is registered twice")
        d = OpDef(name, schema, kind, impl, reference, meta or reference,
                  (impl.__doc__ or "").strip().split("\n")[0], tuple(dtypes), args,
                  tuple(epilogues), tuple(implements), tile, fast, host_reads)
        d.eager = eager_function(d)
        _REGISTRY[name] = d
        return d.eager
    return register


def parse_schema(schema: str) -> tuple[str, list[Arg]]:
    """(name, arguments) of a torch schema string."""
    import torch
    parsed = torch._C.parse_schema(f"tessera::{schema}")
    args = []
    for a in parsed.arguments:
        default = a.default_value if a.has_default_value() else Arg.REQUIRED
        args.append(Arg(a.name, str(a.type), default, a.kwarg_only))
    return parsed.name.split("::", 1)[1], args


def get(name: str) -> OpDef:
    """The definition of op `name` (e.g. `get("softmax").reference`)."""
    from tessera.errors import TesseraError
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TesseraError(f"no operator named {name!r}",
                           hint="tessera.ops.list() names them all") from None


def list_ops(kind: str | None = None) -> list[str]:
    """Names of all registered ops (of one kind), sorted."""
    _load()
    return sorted(n for n, d in _REGISTRY.items() if kind is None or d.kind == kind)


def definitions() -> list[OpDef]:
    _load()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _load() -> None:
    import tessera.ops  # noqa: F401  (importing the package registers every op)
