"""The C-style printer shared by every C-family target (C now, OpenCL C next).

Tile ops become loop nests over their static shapes. Elementwise ops and loads used once
are inlined into their consumer's loop nest (fusion: no intermediate is materialized);
everything else is materialized into a stack array. Each loop nest that touches memory
is printed twice: an unmasked copy for blocks entirely in bounds and a masked one for the
edges (mask elimination). Dialects override the hooks at the bottom.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter

from tessera.lang.ir import Block, Function, Op
from tessera.lang.types import COMPUTE, TensorType, TileType
from tessera.runtime import dtype as dt

__all__ = ["ENTRY", "INT_DIVMOD", "CStylePrinter"]

ENTRY = "tessera_kernel"  # the entry point every dialect prints

_INLINE = frozenset({"unary", "binary", "where", "cast", "arange", "full", "reshape", "trans",
                     "load", "const"})
_ALWAYS_INLINE = frozenset({"const", "full", "arange"})
_BIN_C = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "and": "&", "or": "|",
          "xor": "^", "lshift": "<<", "rshift": ">>", "lt": "<", "le": "<=", "gt": ">",
          "ge": ">=", "eq": "==", "ne": "!="}
REDUCE_STREAMS = 4  # independent accumulators per long row reduction
STACK_TILE_BYTES = 64 << 10  # larger tiles live in thread-local storage, not on the stack
_IDENTITY = {"sum": lambda t: "0", "max": lambda t: _LIMITS[t][0],
             "min": lambda t: _LIMITS[t][1]}  # a reduction's start, by C type
LOOP_GUESS = 16  # trips assumed for a loop whose trip count is known only at run time
_LIMITS = {"int32_t": ("INT32_MIN", "INT32_MAX"), "int64_t": ("INT64_MIN", "INT64_MAX"),
           "bool": ("0", "1"), "float": ("-INFINITY", "INFINITY")}


# Integer // and % for the int32/int64 compute types: valid C and OpenCL C, pasted into both
# dialects' preludes.
INT_DIVMOD = ("/* Python's // and % on integers (floor semantics). x // 0 and x % 0 give 0 in "
              "kernels. */\n" + r"""#define TSR_INT_DIVMOD(T, U, S) \
static inline T tsr_floordiv_##S(T a, T b) { \
    if (b == 0) return 0; \
    if (b == -1) return (T)((U)0 - (U)a); \
    T q = a / b; return q - ((a % b != 0) & ((a < 0) != (b < 0))); } \
static inline T tsr_mod_##S(T a, T b) { \
    if (b == 0 || b == -1) return 0; \
    T r = a % b; return r + ((r != 0) & ((r < 0) != (b < 0))) * b; }
TSR_INT_DIVMOD(int32_t, uint32_t, i32)
TSR_INT_DIVMOD(int64_t, uint64_t, i64)
""")


class CStylePrinter(ABC):
    """Prints one traced kernel Function as C-family source."""

    def __init__(self, fn: Function):
        self.fn = fn
        self.lines: list[str] = []
        self.depth = 1
        self.names: dict[int, str] = {}
        self.uses = Counter()
        self.user_block: dict[int, Block] = {}
        self.inline: set[int] = set()
        self.emitted: set[int] = set()  # ops whose C value is declared by now
        self.computing: set[int] = set()  # ops being printed (their operands come first)
        self.direct: set[int] = set()  # dot operands read in place (see op_dot)
        self.block_of: dict[int, Block] = {}
        self._plan(fn.body)

    # -- planning: which values are inlined --------------------------------------------------
    def _plan(self, block: Block) -> None:
        position = {op.id: i for i, op in enumerate(block.ops)}
        self.block_of.update((op.id, block) for op in block.ops)
        write_positions = []
        for i, op in enumerate(block.ops):
            if op.kind in ("store", "for", "if", "while"):
                write_positions.append(i)
            for o in op.operands:
                self.uses[o.id] += 1
            for b in op.blocks:
                for y in b.yields:
                    self.uses[y.id] += 2  # carried across a region boundary: materialize
                self._plan(b)
        for i, op in enumerate(block.ops):
            if op.kind not in _INLINE or not isinstance(op.type, TileType):
                continue
            if op.type.is_scalar and op.kind != "const":
                continue
            if op.kind in _ALWAYS_INLINE:
                self.inline.add(op.id)
                continue
            if self.uses[op.id] != 1:
                if self._reread(op, block, i, position, write_positions):
                    self.inline.add(op.id)
                continue
            user = next((u for u in block.ops if any(o is op for o in u.operands)), None)
            if user is not None and self._direct_dot_operand(op, user) and not any(
                    i < w < position[user.id] for w in write_positions):
                self.direct.add(op.id)  # the dot reads it from the tensor when in bounds
                continue
            if user is None or user.kind in ("for", "if", "while", "dot"):
                continue  # dot reads its operands M*N*K times: give it arrays
            if op.kind == "load" and any(i < w < position[user.id] for w in write_positions):
                continue  # a store lies between the load and its use
            if self._reads_inlined_load(op) and any(i < w < position[user.id]
                                                    for w in write_positions):
                continue
            self.inline.add(op.id)

    def _direct_dot_operand(self, op: Op, user: Op) -> bool:
        """A float32 load from a tensor with unit last stride, used only as A or B of a
        dot that gets the vector micro-kernel: no copy is needed for in-bounds tiles."""
        return (self.direct_dot_operands and op.kind == "load" and user.kind == "dot"
                and op in user.operands[:2]
                and op.type.dtype is dt.float32 and op.operands[0].type.unit_stride
                and self.ctype(user) == "float" and user.shape[1] % self.vector_lanes == 0)

    def _reread(self, op: Op, block: Block, i: int, position: dict[int, int],
                write_positions: list[int]) -> bool:
        """Whether a load with several users is better read again by each of them than
        copied once into a tile: true for contiguous rows that nothing writes in between
        (a read from L1 costs what a read of the copy does, and the copy pass is saved)."""
        if op.kind != "load" or not op.operands[0].type.unit_stride:
            return False
        users = [u for u in block.ops if any(o is op for o in u.operands)]
        if len(users) != self.uses[op.id] or any(u.kind in ("for", "if", "while", "dot")
                                                 for u in users):
            return False  # used from a nested block, yielded, or by a dot
        last = max(position[u.id] for u in users)
        return not any(i < w < last for w in write_positions)

    def _reads_inlined_load(self, op: Op) -> bool:
        return any(o.kind == "load" or (o.id in self.inline and self._reads_inlined_load(o))
                   for o in op.operands)

    # -- output ----------------------------------------------------------------------------
    def line(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    def pragma(self, text: str) -> None:
        """A dialect's loop hint, if it has one (an empty hint prints nothing)."""
        if text:
            self.line(text)

    def literal(self, value: object, ctype: str) -> str:
        """`value` as a constant of compute type `ctype`."""
        if ctype == "float":
            v = float(value)  # type: ignore[arg-type]
            if math.isnan(v):
                return "NAN"
            if math.isinf(v):
                return "INFINITY" if v > 0 else "(-INFINITY)"
            return f"{v!r}f"
        if ctype == "int64_t":
            return self.int64_literal(int(value))  # type: ignore[call-overload]
        return str(int(value))  # type: ignore[call-overload]

    def name(self, op: Op) -> str:
        if op.id not in self.names:
            self.names[op.id] = f"v{op.id}"
        return self.names[op.id]

    def ctype(self, op: Op) -> str:
        assert isinstance(op.type, TileType)
        return op.type.ctype

    # -- expressions -------------------------------------------------------------------------
    def expr(self, op: Op, idx: list[str], masked: bool, loads: list[Op]) -> str:
        """C expression of `op`'s element at `idx` (one index expression per dimension)."""
        if op.id not in self.inline:
            if op.type.is_scalar:
                return self.name(op)
            return f"{self.name(op)}[{self.flat(idx, op.shape)}]"
        kind, t = op.kind, self.ctype(op)
        if kind == "const":
            return self.literal(op.attrs["value"], t)
        if kind == "full":
            return self.literal(op.attrs["value"], t)
        if kind == "arange":
            return f"((int32_t)({op.attrs['start']} + {idx[0]}))"
        if kind == "reshape":
            return self.expr(op.operands[0], self.reshape_idx(op, idx), masked, loads)
        if kind == "trans":
            return self.expr(op.operands[0], idx[::-1], masked, loads)
        if kind == "load":
            loads.append(op)
            return self.load_expr(op, idx, masked)
        args = [self.expr(o, self.bcast_to(o, op.shape, idx), masked, loads) for o in op.operands]
        if kind == "cast":
            return self.cast_expr(args[0], op.operands[0].type.dtype, op.type.dtype)
        if kind == "where":
            return f"({args[0]} ? {args[1]} : {args[2]})"
        if kind == "unary":
            return self.unary_expr(op.attrs["fn"], args[0], op.operands[0].type.ctype)
        return self.binary_expr(op.attrs["fn"], args[0], args[1], op.operands[0].type.ctype)

    @staticmethod
    def flat(idx: list[str], shape: tuple[int, ...]) -> str:
        terms, stride = [], 1
        for i, s in zip(reversed(idx), reversed(shape), strict=True):
            if s != 1:
                terms.append(i if stride == 1 else f"{i} * {stride}")
            stride *= s
        return " + ".join(reversed(terms)) or "0"

    @staticmethod
    def reshape_idx(op: Op, idx: list[str]) -> list[str]:
        real = iter(i for i, s in zip(idx, op.shape, strict=True) if s != 1)
        return ["0" if s == 1 else next(real) for s in op.operands[0].shape]

    def cast_expr(self, x: str, src: dt.dtype, dst: dt.dtype) -> str:
        if dst is dt.bool:
            return f"({x} != 0)"
        if dst is dt.float16:
            return f"tsr_f16_to_f32(tsr_f32_to_f16({x}))"
        if dst is dt.bfloat16:
            return f"tsr_bf16_to_f32(tsr_f32_to_bf16({x}))"
        if dst in (dt.int8, dt.uint8):  # held in an int32, wrapped to 8 bits as torch does
            via = "(int64_t)" if src.is_floating_point else ""
            return f"((int32_t)({dst.c_type}){via}({x}))"
        return f"(({COMPUTE[dst]})({x}))"

    def unary_expr(self, fn: str, x: str, ctype: str) -> str:
        if fn == "neg":
            return f"(-{x})"
        if fn == "not" or (fn == "invert" and ctype == "bool"):
            return f"(!{x})"
        if fn == "invert":
            return f"(~{x})"
        if fn == "abs" and ctype != "float":
            return f"({x} < 0 ? -{x} : {x})"
        return f"tsr_{fn}({x})"

    def binary_expr(self, fn: str, a: str, b: str, ctype: str) -> str:
        if fn in _BIN_C:
            return f"({a} {_BIN_C[fn]} {b})"
        if fn in ("maximum", "minimum"):
            if ctype == "float":
                return f"tsr_{fn}({a}, {b})"
            return f"({a} {'>' if fn == 'maximum' else '<'} {b} ? {a} : {b})"
        if fn == "pow":
            return f"tsr_pow({a}, {b})"
        return f"tsr_{fn}_{'i64' if ctype == 'int64_t' else 'i32'}({a}, {b})"  # floordiv, mod

    # -- memory ------------------------------------------------------------------------------
    def access(self, tensor: Op, starts: list[Op], sizes: tuple, idx: list[str]
               ) -> tuple[str, list[str], list[str]]:
        """(element offset, per-element mask terms, whole-block in-bounds terms)."""
        p = self.name(tensor)
        ndim = tensor.type.ndim
        kept = iter(idx)
        offset, mask, inbounds = [], [], []
        for d, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            known = start.attrs["value"] if start.kind == "const" else None
            s = self.name(start) if start.id not in self.inline else self.expr(start, [], False, [])
            i = None if size is None else next(kept)
            pos = s if size is None else i if known == 0 else f"({s} + {i})"
            unit = d == ndim - 1 and tensor.type.unit_stride
            offset.append(pos if unit else f"{pos} * {p}_s{d}")
            if size is None:
                inbounds.append(f"(uint64_t){s} < (uint64_t){p}_n{d}")
                mask.append(inbounds[-1])
            else:
                mask.append(f"(uint64_t){pos} < (uint64_t){p}_n{d}")
                inbounds += [] if known is not None and known >= 0 else [f"{s} >= 0"]
                inbounds.append(f"{known + size if known is not None else f'{s} + {size}'}"
                                f" <= {p}_n{d}")
        return " + ".join(offset), mask, inbounds

    def load_expr(self, op: Op, idx: list[str], masked: bool) -> str:
        tensor, starts = op.operands[0], op.operands[1:]
        offset, mask, _ = self.access(tensor, starts, op.attrs["sizes"], idx)
        value = self.from_storage(f"{self.name(tensor)}[{offset}]", tensor.type.dtype)
        if not masked or not mask:
            return value
        other = self.literal(op.attrs["other"], self.ctype(op))
        return f"({' && '.join(mask)} ? {value} : {other})"

    @staticmethod
    def from_storage(x: str, d: dt.dtype) -> str:
        return {dt.float16: f"tsr_f16_to_f32({x})", dt.bfloat16: f"tsr_bf16_to_f32({x})",
                dt.bool: f"({x} != 0)"}.get(d, x)

    @staticmethod
    def to_storage(x: str, d: dt.dtype) -> str:
        return {dt.float16: f"tsr_f32_to_f16({x})", dt.bfloat16: f"tsr_f32_to_bf16({x})",
                dt.bool: f"(uint8_t)({x})"}.get(d, f"({d.c_type})({x})")

    def inbounds_of(self, loads: list[Op]) -> list[str]:
        terms: list[str] = []
        for op in loads:
            _, _, inb = self.access(op.operands[0], op.operands[1:], op.attrs["sizes"],
                                    ["0"] * len(op.shape))
            terms += [t for t in inb if t not in terms]
        return terms

    # -- loop nests --------------------------------------------------------------------------
    def nest(self, shape: tuple[int, ...], body, simd_pragma: str | None = None) -> None:
        """Emit loops over `shape`; `body(idx)` emits the innermost statements."""
        idx = [f"i{self.depth}_{d}" for d in range(len(shape))]
        opened = 0
        for d, (i, s) in enumerate(zip(idx, shape, strict=True)):
            if s == 1:
                idx[d] = "0"
                continue
            if d == len(shape) - 1 or all(x == 1 for x in shape[d + 1:]):
                self.pragma(simd_pragma or self.simd())
            self.line(f"for (int {i} = 0; {i} < {s}; {i}++) {{")
            self.depth += 1
            opened += 1
        body(idx)
        for _ in range(opened):
            self.depth -= 1
            self.line("}")

    def guarded(self, emit, extra: list[str] | None = None) -> None:
        """Print `emit(masked, loads)` unmasked for in-bounds blocks, masked otherwise.
        `extra` adds in-bounds conditions of accesses that are not loads (stores)."""
        probe: list[Op] = []
        saved = (list(self.lines), self.depth)
        emit(True, probe)  # a dry run, to learn which loads the statement reads
        self.lines, self.depth = saved
        terms = self.inbounds_of(probe)
        terms += [t for t in extra or [] if t not in terms]
        if not terms:
            emit(False, [])
            return
        self.line(f"if ({' && '.join(terms)}) {{")
        self.depth += 1
        emit(False, [])
        self.depth -= 1
        self.line("} else {")
        self.depth += 1
        emit(True, [])
        self.depth -= 1
        self.line("}")

    # -- statements --------------------------------------------------------------------------
    def block(self, block: Block) -> None:
        for op in block.ops:
            self.op(op)

    def op(self, op: Op) -> None:
        if op.id in self.inline or op.id in self.direct or op.id in self.emitted or \
                op.kind in ("param", "blockarg", "result"):
            return  # inlined, read in place, computed already (a fused reduction), or named
        self.emitted.add(op.id)
        self.computing.add(op.id)  # emitted, but its value does not exist yet
        handler = getattr(self, f"op_{op.kind}", None)
        if handler is not None:
            handler(op)
        elif op.type.is_scalar:
            self.line(f"const {self.ctype(op)} {self.name(op)} = {self.expr_root(op, [])};")
        else:
            self.materialize(op)
        self.computing.discard(op.id)

    def expr_root(self, op: Op, idx: list[str], masked: bool = True,
                  loads: list[Op] | None = None) -> str:
        """Expression of a non-inlined op computed here (inline its own definition)."""
        self.inline.add(op.id)
        try:
            return self.expr(op, idx, masked, loads if loads is not None else [])
        finally:
            self.inline.discard(op.id)

    def materialize(self, op: Op) -> None:
        """Compute a tile into its array; row reductions of it that come later in the block
        are computed in the same loop (the row is reduced while it is in registers)."""
        name = self.name(op)
        self.declare(name, op.type)
        fused = self.fusible_reductions(op)
        for red in fused:
            self.declare(self.name(red), red.type)
            self.emitted.add(red.id)

        def row(idx: list[str], masked: bool, loads: list[Op]) -> None:
            j = f"{name}_j"
            accs = []
            for red in fused:
                fn, t = red.attrs["fn"], self.ctype(red)
                acc = f"{self.name(red)}_acc"
                nan = self.accumulators(fn, t, [acc], _IDENTITY[fn](t))
                accs.append((acc, nan, self.reduction_clause(fn, [acc], nan)))
            self.pragma(self.simd(" ".join(c for _, _, c in accs)))
            self.line(f"for (int {j} = 0; {j} < {op.shape[-1]}; {j}++) {{")
            self.depth += 1
            self.line(f"{name}[{self.flat([*idx, j], op.shape)}] = "
                      f"{self.expr_root(op, [*idx, j], masked, loads)};")
            for red, (acc, nan, _) in zip(fused, accs, strict=True):
                e = self.expr(red.operands[0], [*idx, j], masked, loads)
                self.reduction_step(red.attrs["fn"], self.ctype(red), acc, nan, e)
            self.depth -= 1
            self.line("}")
            for red, (acc, nan, _) in zip(fused, accs, strict=True):
                total = f"({nan} ? NAN : {acc})" if nan else acc
                self.line(f"{self.name(red)}[{self.flat([*idx, '0'], red.shape)}] = {total};")

        def emit(masked: bool, loads: list[Op]) -> None:
            if fused:
                self.nest(op.shape[:-1], lambda idx: row(idx, masked, loads))
            else:
                self.nest(op.shape, lambda idx: self.line(
                    f"{name}[{self.flat(idx, op.shape)}] = "
                    f"{self.expr_root(op, idx, masked, loads)};"))
        self.guarded(emit)

    def fusible_reductions(self, op: Op) -> list[Op]:
        """Reductions over the last axis, later in op's block, of op itself or of an
        elementwise function of op and values that already exist."""
        block = self.block_of.get(op.id)
        if block is None or not op.shape or op.shape[-1] == 1:
            return []
        later = block.ops[block.ops.index(op) + 1:]
        return [r for r in later if r.kind == "reduce" and r.id not in self.emitted
                and r.attrs["fn"] in ("sum", "max", "min")
                and r.attrs["axes"] == (len(op.shape) - 1,)
                and r.operands[0].shape == op.shape and self.available(r.operands[0], op)]

    def available(self, e: Op, op: Op) -> bool:
        """Whether expression `e` can be evaluated where `op` is being computed."""
        if e is op or e.kind in _ALWAYS_INLINE or e.kind in ("param", "blockarg"):
            return True
        if e.id not in self.inline:
            return e.id in self.emitted and e.id not in self.computing  # computed before op
        return e.kind != "load" and all(self.available(o, op) for o in e.operands)

    def op_store(self, op: Op) -> None:
        tensor, value, starts = op.operands[0], op.operands[1], op.operands[2:]
        sizes = op.attrs["sizes"]
        shape = tuple(s for s in sizes if s is not None)
        p = self.name(tensor)

        def emit(masked: bool, loads: list[Op]) -> None:
            def body(idx: list[str]) -> None:
                offset, mask, _ = self.access(tensor, starts, sizes, idx)
                v = self.expr(value, self.bcast_to(value, shape, idx), masked, loads)
                stmt = f"{p}[{offset}] = {self.to_storage(v, tensor.type.dtype)};"
                self.line(f"if ({' && '.join(mask)}) {stmt}" if masked and mask else stmt)
            self.nest(shape, body)
        self.guarded(emit, self.access(tensor, starts, sizes, ["0"] * len(shape))[2])

    @staticmethod
    def bcast_to(value: Op, shape: tuple[int, ...], idx: list[str]) -> list[str]:
        """Index of `value` broadcast against `shape` (numpy rules: align right)."""
        lead = len(shape) - len(value.shape)
        return ["0" if s == 1 else idx[lead + d] for d, s in enumerate(value.shape)]

    def op_reduce(self, op: Op) -> None:
        src = op.operands[0]
        fn, axes, t = op.attrs["fn"], op.attrs["axes"], self.ctype(op)
        init = _IDENTITY[fn](t)
        r = self.name(op)
        self.declare(r, op.type)
        self.line(f"for (int k = 0; k < {op.type.numel}; k++) {r}[k] = {init};")
        last_reduced = len(src.shape) - 1 in axes
        outer = src.shape[:-1] if last_reduced else src.shape
        n_inner = src.shape[-1] if last_reduced else 1

        def emit(masked: bool, loads: list[Op]) -> None:
            def body(idx: list[str]) -> None:
                out_idx = ["0" if d in axes else i for d, i in enumerate(idx)]
                if last_reduced:
                    out_idx.append("0")
                dst = f"{r}[{self.flat(out_idx, op.shape)}]"
                if not last_reduced:
                    e = self.expr(src, idx, masked, loads)
                    self.line(f"{dst} = {self.combine(fn, dst, e, t)};")
                    return
                self.reduce_row(fn, t, r, init, n_inner, lambda j: self.expr(
                    src, [*idx, j], masked, loads), dst)
            self.nest(outer, body)
        self.guarded(emit)

    def reduce_row(self, fn: str, t: str, r: str, init: str, n: int, element, dst: str
                   ) -> None:
        """dst = fn(dst, element(0), ..., element(n - 1)). Long rows are split into
        REDUCE_STREAMS contiguous parts reduced side by side: independent accumulators
        hide the add latency a single chain would wait on (without reassociating floats
        the compiler could not do this itself)."""
        streams = REDUCE_STREAMS if n >= 16 * REDUCE_STREAMS else 1
        part = n // streams
        j = f"{r}_j"
        accs = [f"{r}_acc{k}" for k in range(streams)]
        nan = self.accumulators(fn, t, accs, init)

        def loop(lo: int, hi: int, accs: list[str]) -> None:
            self.pragma(self.simd(self.reduction_clause(fn, accs, nan)))
            self.line(f"for (int {j} = {lo}; {j} < {hi}; {j}++) {{")
            self.depth += 1
            for k, acc in enumerate(accs):
                self.reduction_step(fn, t, acc, nan, element(f"{j} + {k * part}" if k else j))
            self.depth -= 1
            self.line("}")
        loop(0, part, accs)
        if streams * part < n:  # the tail, into the first accumulator
            loop(streams * part, n, accs[:1])
        for acc in accs[1:]:  # NaNs are in the flag: plain compares combine the rest
            self.line(f"{accs[0]} += {acc};" if fn == "sum" else
                      f"{accs[0]} = {acc} {'>' if fn == 'max' else '<'} {accs[0]} ? {acc} : "
                      f"{accs[0]};")
        total = f"({nan} ? NAN : {accs[0]})" if nan else accs[0]
        self.line(f"{dst} = {self.combine(fn, dst, total, t)};")

    def accumulators(self, fn: str, t: str, accs: list[str], init: str) -> str | None:
        """Declare accumulators (and, for float max/min, a NaN flag, returned)."""
        for acc in accs:
            self.line(f"{t} {acc} = {init};")
        if t != "float" or fn == "sum":
            return None
        nan = f"{accs[0]}_nan"
        self.line(f"int {nan} = 0;")
        return nan

    @staticmethod
    def reduction_clause(fn: str, accs: list[str], nan: str | None) -> str:
        clause = f"reduction({ {'sum': '+'}.get(fn, fn)}:{','.join(accs)})"
        return clause + (f" reduction(|:{nan})" if nan else "")

    def reduction_step(self, fn: str, t: str, acc: str, nan: str | None, e: str) -> None:
        """acc = fn(acc, e), noting NaNs in the flag (max/min compares ignore them)."""
        if fn == "sum":
            self.line(f"{acc} += {e};")
            return
        x = f"{acc}_x"
        self.line(f"const {t} {x} = {e};")
        self.line(f"{acc} = {x} {'>' if fn == 'max' else '<'} {acc} ? {x} : {acc};")
        if nan:
            self.line(f"{nan} |= {x} != {x};")

    def op_dot(self, op: Op) -> None:
        """C = A @ B (+ acc) for tiles A [M, K], B [K, N], in C's accumulator dtype."""
        a, b = op.operands[:2]
        (m, n), k = op.shape, a.shape[1]
        acc = op.operands[2] if len(op.operands) == 3 else None
        t = self.ctype(op)
        carried = self.carried_leaf(acc, op.shape) if acc is not None else None
        if carried is not None:  # accumulate into the loop's own array, rescaled in place
            c = self.names[op.id] = self.name(carried)
            if acc is not carried:
                self.copy(c, acc, op.type)
        else:
            c = self.name(op)
            self.declare(c, op.type)
            if acc is not None:
                self.copy(c, acc, op.type)
            else:
                self.line(f"for (int k = 0; k < {m * n}; k++) {c}[k] = 0;")
        vectors = t == "float" and n % self.vector_lanes == 0 and \
            a.id not in self.inline and b.id not in self.inline
        if not vectors:
            self.dot_loops(c, t, a, b, m, n, k)
            return
        direct = [o for o in (a, b) if o.id in self.direct]
        if not direct:
            self.dot_blocks(c, (self.name(a), str(k)), (self.name(b), str(n)), m, n, k)
            return
        # interior tiles: read A and B where they are; edge tiles: masked copies first
        self.line(f"if ({' && '.join(self.inbounds_of(direct))}) {{")
        self.depth += 1
        self.dot_blocks(c, self.operand(a, k), self.operand(b, n), m, n, k)
        self.depth -= 1
        self.line("} else {")
        self.depth += 1
        for o in direct:
            self.materialize(o)
        self.dot_blocks(c, (self.name(a), str(k)), (self.name(b), str(n)), m, n, k)
        self.depth -= 1
        self.line("}")

    def operand(self, op: Op, cols: int) -> tuple[str, str]:
        """(pointer to element [0, 0], row stride) of a dot operand: its tile array, or,
        for a direct load, the tensor itself."""
        if op.id not in self.direct:
            return self.name(op), str(cols)
        tensor = op.operands[0]
        offset, _, _ = self.access(tensor, op.operands[1:], op.attrs["sizes"], ["0", "0"])
        rows = next(d for d, size in enumerate(op.attrs["sizes"]) if size is not None)
        return f"({self.name(tensor)} + {offset})", f"{self.name(tensor)}_s{rows}"

    def carried_leaf(self, acc: Op, shape: tuple[int, ...]) -> Op | None:
        """The loop-carried tile that `acc` is, or that an inlined elementwise chain turns
        into `acc` (acc * alpha[:, None]), if nothing else reads it: a dot may then update
        that tile in place, since every element depends only on itself."""
        if acc.kind == "blockarg":
            return acc if self.uses[acc.id] == 1 and acc.shape == shape else None
        if acc.id not in self.inline or acc.kind not in ("unary", "binary", "where", "cast") \
                or acc.shape != shape:
            return None
        found = [x for x in (self.carried_leaf(o, shape) for o in acc.operands) if x]
        return found[0] if len(found) == 1 else None

    def dot_blocks(self, c: str, a: tuple[str, str], b: tuple[str, str], m: int, n: int,
                   k: int) -> None:
        """C += A @ B for float tiles whose rows are whole vectors, A and B given as
        (pointer, row stride): the GEMM template's register-blocked micro-kernel (the
        dialect's `tile_step`). An MR x NR block of C lives in MR * NR / VL vector
        registers across the whole K loop; each B vector is loaded once per MR rows and
        each A element broadcast once."""
        vl = self.vector_lanes
        nv = 2 if n % (2 * vl) == 0 else 1
        budget = self.vector_registers - nv - 4  # B vectors, the A broadcast, some slack
        mr = next(r for r in (8, 6, 4, 3, 2, 1) if m % r == 0 and r * nv <= budget)
        i, j, p, r, v = (f"{c}_{x}" for x in "ijprv")
        (A, lda), (B, ldb) = a, b
        acc, tile = f"{c}_acc", f"{c} + ({i} + {r}) * {n} + {j} + {v} * {vl}"
        self.line(f"for (int {i} = 0; {i} < {m}; {i} += {mr}) "
                  f"for (int {j} = 0; {j} < {n}; {j} += {nv * vl}) {{")
        self.depth += 1
        self.line(f"{self.vector_type()} {acc}[{mr}][{nv}];")
        self.line(f"const float *{c}_ar[{mr}];  /* row pointers: no index arithmetic inside */")
        self.line(f"for (int {r} = 0; {r} < {mr}; {r}++) {{")
        self.line(f"    {c}_ar[{r}] = {A} + ({i} + {r}) * {lda};")
        self.line(f"    for (int {v} = 0; {v} < {nv}; {v}++) {acc}[{r}][{v}] = {self.vload(tile)};")
        self.line("}")
        self.line(f"const float *{c}_bp = {B} + {j};")
        self.line(f"#define {c}_A(row) {c}_ar[row][{p}]")
        self.line(f"for (int {p} = 0; {p} < {k}; {p}++, {c}_bp += {ldb})")
        self.line(f"    {self.tile_step(acc, mr, nv, f'{c}_A', f'{c}_bp')}")
        self.line(f"#undef {c}_A")
        self.line(f"for (int {r} = 0; {r} < {mr}; {r}++) for (int {v} = 0; {v} < {nv}; {v}++)")
        self.line(f"    {self.vstore(tile, f'{acc}[{r}][{v}]')}")
        self.depth -= 1
        self.line("}")

    def dot_loops(self, c: str, t: str, a: Op, b: Op, m: int, n: int, k: int) -> None:
        i, p, j = (f"{c}_{v}" for v in "ipj")
        self.line(f"for (int {i} = 0; {i} < {m}; {i}++) for (int {p} = 0; {p} < {k}; {p}++) {{")
        self.depth += 1
        self.line(f"const {t} {c}_a = {self.expr(a, [i, p], True, [])};")
        self.pragma(self.simd())
        self.line(f"for (int {j} = 0; {j} < {n}; {j}++) "
                  f"{c}[{i} * {n} + {j}] += {c}_a * {self.expr(b, [p, j], True, [])};")
        self.depth -= 1
        self.line("}")

    @staticmethod
    def combine(fn: str, a: str, b: str, ctype: str) -> str:
        if fn == "sum":
            return f"{a} + {b}"
        if ctype == "float":
            return f"tsr_{'maximum' if fn == 'max' else 'minimum'}({a}, {b})"
        return f"({b} {'>' if fn == 'max' else '<'} {a} ? {b} : {a})"

    def carried(self, op: Op, types: list[TileType]) -> list[str]:
        """The variables that carry `op`'s values (loop-carried, or out of a branch); its
        result ops, those DCE kept, name them."""
        names = [f"{self.name(op)}_{k}" for k in range(len(types))]
        for u in self.fn.body.walk():
            if u.kind == "result" and u.operands[0] is op:
                self.names[u.id] = names[u.attrs["index"]]
        return names

    def declare_carried(self, op: Op, inits: list[Op]) -> tuple[list[str], list[TileType]]:
        types = [i.type for i in inits]
        names = self.carried(op, types)
        for name, init, t in zip(names, inits, types, strict=True):
            self.declare(name, t)
            self.copy(name, init, t)
        return names, types

    def copy(self, dst: str, src: Op, type_: TileType) -> None:
        if type_.is_scalar:
            self.line(f"{dst} = {self.expr(src, [], True, [])};")
            return
        self.nest(type_.shape, lambda idx: self.line(
            f"{dst}[{self.flat(idx, type_.shape)}] = "
            f"{self.expr(src, self.bcast_to(src, type_.shape, idx), True, [])};"))

    def bind(self, args: list[Op], names: list[str]) -> None:
        for a, n in zip(args, names, strict=True):
            self.names[a.id] = n

    def update(self, names: list[str], yields: list[Op], types: list[TileType]) -> None:
        """Assign the values a block yields to the carried variables, as one parallel
        assignment: values still to be computed, or other carried variables, go through a
        temporary first; values already in their own array or local are copied directly."""
        done = [self.names.get(y.id) == n for n, y in zip(names, yields, strict=True)]
        direct = [y.id not in self.inline and y.kind != "blockarg" for y in yields]
        tmps = {}
        for n, y, t, skip, d in zip(names, yields, types, done, direct, strict=True):
            if not (skip or d):
                tmps[n] = f"{n}_next"
                self.declare(tmps[n], t)
                self.copy(tmps[n], y, t)
        for n, y, t, skip, d in zip(names, yields, types, done, direct, strict=True):
            if not skip and d:
                self.copy(n, y, t)
        for n, t in zip(names, types, strict=True):
            if n in tmps:
                self.copy_array(n, tmps[n], t)

    def declare(self, name: str, t: TileType) -> None:
        if t.is_scalar:
            self.line(f"{t.ctype} {name};")
        elif t.numel * (8 if t.ctype == "int64_t" else 4) <= STACK_TILE_BYTES:
            self.line(f"{t.ctype} {name}[{t.numel}];")
        else:  # a big tile: the dialect's storage for it (see large_tile_storage)
            self.line(f"{self.large_tile_storage}{t.ctype} {name}[{t.numel}];")

    def copy_array(self, dst: str, src: str, t: TileType) -> None:
        self.line(f"{dst} = {src};" if t.is_scalar else
                  f"for (int k = 0; k < {t.numel}; k++) {dst}[k] = {src}[k];")

    def op_for(self, op: Op) -> None:
        start, stop, step, *inits = op.operands
        body = op.blocks[0]
        names, types = self.declare_carried(op, inits)
        ind, *args = body.args
        i = self.name(ind)
        s0, s1, s2 = (self.expr(v, [], True, []) for v in (start, stop, step))
        self.line("{")
        self.depth += 1
        self.line(f"const int64_t {i}_step = {s2};")
        if op.attrs.get("unroll"):
            self.pragma(self.unroll(int(op.attrs["unroll"])))
        self.line(f"for (int64_t {i} = {s0}; {i}_step > 0 ? {i} < {s1} : "
                  f"{i}_step < 0 && {i} > {s1}; {i} += {i}_step) {{")  # step 0: no trips
        self.depth += 1
        self.bind(args, names)
        if op.attrs.get("pipeline") and self.prefetch_builtin:
            self.prefetch(body, ind, f"({i} + {int(op.attrs['pipeline'])} * {i}_step)")
        self.block(body)
        self.update(names, body.yields, types)
        self.depth -= 1
        self.line("}")
        self.depth -= 1
        self.line("}")

    def prefetch(self, body: Block, ind: Op, ahead: str) -> None:
        """Software pipelining on a CPU: ask for the cache lines the loop's loads will read
        `pipeline` iterations ahead (prefetches never fault, so no bounds are needed)."""
        for op in body.ops:
            if op.kind != "load":
                continue
            starts = [self.scalar_expr(s, {ind.id: ahead}) for s in op.operands[1:]]
            if None in starts or not any(self.depends_on(s, ind) for s in op.operands[1:]):
                continue  # an address we cannot restate, or one the loop does not move
            tensor, sizes = op.operands[0], op.attrs["sizes"]
            per_line = max(1, 64 // tensor.type.dtype.itemsize)
            idx = [f"pf{d}" for d in range(len(sizes))]
            pos = [s if n is None else f"({s} + {i})"
                   for s, n, i in zip(starts, sizes, idx, strict=True)]
            offset = " + ".join(f"{x} * {self.name(tensor)}_s{d}" for d, x in enumerate(pos))
            last = len(sizes) - 1
            loops = [f"for (int64_t {i} = 0; {i} < {n}; {i} += {per_line if d == last else 1})"
                     for d, (i, n) in enumerate(zip(idx, sizes, strict=True)) if n is not None]
            address = f"&{self.name(tensor)}[{offset}]"
            self.line(" ".join(loops) + f" {self.prefetch_builtin}({address});")

    def scalar_expr(self, op: Op, subst: dict[int, str]) -> str | None:
        """A C expression recomputing scalar `op` with some values replaced, or None if it
        depends on something that cannot be recomputed (a load, a loop result)."""
        if op.id in subst:
            return subst[op.id]
        if op.id in self.emitted or op.kind == "param" or \
                (op.kind == "blockarg" and op.id in self.names):
            return self.name(op)  # a value the C code already holds
        if op.kind == "const":
            return self.expr(op, [], False, [])
        if op.kind not in ("binary", "unary", "cast") or not op.type.is_scalar:
            return None
        args = [self.scalar_expr(o, subst) for o in op.operands]
        if None in args:
            return None
        if op.kind == "cast":
            return self.cast_expr(args[0], op.operands[0].type.dtype, op.type.dtype)
        if op.kind == "unary":
            return self.unary_expr(op.attrs["fn"], args[0], op.operands[0].type.ctype)
        return self.binary_expr(op.attrs["fn"], args[0], args[1], op.operands[0].type.ctype)

    def depends_on(self, op: Op, target: Op) -> bool:
        return op is target or any(self.depends_on(o, target) for o in op.operands)

    def op_while(self, op: Op) -> None:
        cond_block, body = op.blocks
        names, types = self.declare_carried(op, op.operands)
        self.line("for (;;) {")
        self.depth += 1
        self.bind(cond_block.args, names)
        self.block(cond_block)
        self.line(f"if (!{self.expr(cond_block.yields[0], [], True, [])}) break;")
        self.bind(body.args, names)
        self.block(body)
        self.update(names, body.yields, types)
        self.depth -= 1
        self.line("}")

    def op_if(self, op: Op) -> None:
        types = [y.type for y in op.blocks[0].yields]
        names = self.carried(op, types)
        for n, t in zip(names, types, strict=True):
            self.declare(n, t)
        self.line(f"if ({self.expr(op.operands[0], [], True, [])}) {{")
        for k, block in enumerate(op.blocks):
            self.depth += 1
            self.block(block)
            for n, y, t in zip(names, block.yields, types, strict=True):
                self.copy(n, y, t)
            self.depth -= 1
            self.line("} else {" if k == 0 else "}")

    # -- dialect hooks -----------------------------------------------------------------------
    @abstractmethod
    def simd(self, clauses: str = "") -> str:
        """The pragma asking to vectorize the next loop."""

    vector_lanes = 8  # floats in one explicit vector
    vector_registers = 16  # how many the target has (register blocking stays within them)

    @abstractmethod
    def vector_type(self) -> str:
        """The type of `vector_lanes` floats."""

    @abstractmethod
    def vload(self, address: str) -> str:
        """An expression loading a vector of floats from `address` (no alignment assumed)."""

    @abstractmethod
    def vstore(self, address: str, value: str) -> str:
        """A statement storing a vector to `address`."""

    @abstractmethod
    def tile_step(self, acc: str, mr: int, nv: int, a: str, b: str) -> str:
        """A statement: acc[r][v] += a(r) * (vector v of the floats at b), r < mr, v < nv."""

    @abstractmethod
    def unroll(self, n: int) -> str:
        """The pragma asking to unroll the next loop `n` times."""

    @abstractmethod
    def int64_literal(self, value: int) -> str:
        """An int64 constant."""

    @abstractmethod
    def pointer_type(self, d: dt.dtype, writes: bool, restrict: bool) -> str:
        """The declarator prefix of a pointer to a tensor's elements (ends in `*` or a
        space): `writes` if the kernel stores through it, `restrict` if nothing aliases."""

    large_tile_storage = ""  # qualifiers of tiles above STACK_TILE_BYTES
    prefetch_builtin: str | None = None  # a cache prefetch of an address, for `pipeline`
    direct_dot_operands = True  # dots may read in-bounds tiles in place (see op_dot)

    def op_program_id(self, op: Op) -> None:
        self.names[op.id] = f"tsr_pid{op.attrs['axis']}"  # each dialect's entry defines them

    def op_num_programs(self, op: Op) -> None:
        self.names[op.id] = f"tsr_grid{op.attrs['axis']}"

    def op_dim(self, op: Op) -> None:
        self.names[op.id] = f"{self.name(op.operands[0])}_n{op.attrs['axis']}"

    def params(self, op: Op, restrict: bool) -> list[tuple[str, str]]:
        """(C type, name) of each C parameter a kernel parameter becomes: a scalar, or a
        tensor's data pointer, sizes and strides (in elements)."""
        if isinstance(op.type, TileType):
            return [(op.type.ctype, self.name(op))]
        t: TensorType = op.type
        p = self.name(op)
        return [(self.pointer_type(t.dtype, self.fn_writes(op), restrict), p),
                *((("int64_t", f"{p}_n{d}")) for d in range(t.ndim)),
                *((("int64_t", f"{p}_s{d}")) for d in range(t.ndim))]

    def work(self, block: Block | None = None) -> int:
        """Elements one program loads, stores and computes on (loops counted as LOOP_GUESS
        trips; a dot as M*N*K): what decides whether a launch is big enough to be worth
        the threads' fork and join."""
        total = 0
        for op in (block or self.fn.body).ops:
            if op.kind in ("load", "store"):
                total += math.prod(s for s in op.attrs["sizes"] if s is not None)
            elif op.kind == "dot":
                total += op.type.numel * op.operands[0].shape[1]
            elif isinstance(op.type, TileType) and op.kind not in _ALWAYS_INLINE:
                total += op.type.numel
            for b in op.blocks:
                total += self.work(b) * (LOOP_GUESS if op.kind in ("for", "while") else 1)
        return max(total, 1)

    def fn_writes(self, tensor: Op) -> bool:
        return any(o.kind == "store" and o.operands[0] is tensor for o in self.fn.body.walk())
