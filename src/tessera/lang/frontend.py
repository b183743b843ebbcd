"""Python AST -> tile IR, for one specialization of a kernel (argument dtypes, ranks and
constexpr values fixed). Python-level values (constexprs, tuples, modules) are evaluated
as Python while building; everything else becomes IR through the `Builder`."""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from tessera.errors import DtypeError, TesseraError
from tessera.lang import core
from tessera.lang.errors import KernelSyntaxError
from tessera.lang.ir import Block, Function, Loc, Op
from tessera.lang.semantic import Builder
from tessera.lang.types import TensorType, TileType, promote
from tessera.runtime import dtype as dt

__all__ = ["parse_kernel", "trace"]

_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv",
           ast.FloorDiv: "floordiv", ast.Mod: "mod", ast.Pow: "pow", ast.BitAnd: "and",
           ast.BitOr: "or", ast.BitXor: "xor", ast.LShift: "lshift", ast.RShift: "rshift"}
_CMPOPS = {ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge", ast.Eq: "eq",
           ast.NotEq: "ne"}
_CMP_NAMES = {ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}
_PY_BIN = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "truediv": lambda a, b: a / b, "floordiv": lambda a, b: a // b,
           "mod": lambda a, b: a % b, "pow": lambda a, b: a ** b, "and": lambda a, b: a & b,
           "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b, "lshift": lambda a, b: a << b,
           "rshift": lambda a, b: a >> b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
           "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "eq": lambda a, b: a == b,
           "ne": lambda a, b: a != b}
_METHODS = {"sum", "max", "min", "mean", "argmax", "argmin", "to"}
_PURE_PY = {builtins.min, builtins.max, builtins.abs, builtins.int, builtins.float,
            builtins.bool, builtins.len}


def parse_kernel(fn: Callable[..., Any]) -> tuple[ast.FunctionDef, str, int]:
    """The function's AST, its file, and the file line of the AST's line 1."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise KernelSyntaxError(f"cannot read the source of {fn.__qualname__}",
                                hint="kernels must be defined in a file, not typed into a "
                                     "REPL or built with exec") from e
    try:
        node = ast.parse(source).body[0]
    except SyntaxError:
        node = None  # e.g. a lambda in the middle of an expression
    if not isinstance(node, ast.FunctionDef):
        raise KernelSyntaxError(f"{fn.__qualname__} is not a plain function definition",
                                where=_where_defined(fn),
                                hint="define kernels with `def`, not lambda or exec")
    return node, inspect.getsourcefile(fn) or "<unknown>", fn.__code__.co_firstlineno


def _is_py(x: Any) -> bool:
    return not isinstance(x, Op)


MAX_INLINE_DEPTH = 16  # kernels calling kernels: deeper than this is surely recursion


class _Frontend(ast.NodeVisitor):
    def __init__(self, fn: Callable[..., Any], builder: Builder | None = None,
                 depth: int = 0):
        self.node, self.file, self.first = parse_kernel(fn)
        self.fn, self.depth = fn, depth
        self.lines = textwrap.dedent(inspect.getsource(fn)).splitlines()
        self.b = builder or Builder()
        self.scope: dict[str, Any] = {}
        self.globals = {**fn.__globals__, **_closure(fn)}
        self.result: Any = None  # what a kernel called from another kernel returns

    # -- helpers ----------------------------------------------------------------------------
    def at(self, node: ast.AST) -> None:
        if hasattr(node, "lineno"):
            line = self.first + node.lineno - 1
            text = self.lines[node.lineno - 1] if node.lineno <= len(self.lines) else ""
            self.b.loc = Loc(self.file, line, text)

    def syntax(self, node: ast.AST, message: str, hint: str | None = None) -> KernelSyntaxError:
        self.at(node)
        loc = self.b.loc
        return KernelSyntaxError(message, where=f"{loc}: {loc.text.strip()}" if loc else None,
                                 hint=hint)

    def lookup(self, node: ast.Name) -> Any:
        if node.id in self.scope:
            return self.scope[node.id]
        if node.id in self.globals:
            return self.globals[node.id]
        if hasattr(builtins, node.id):
            return getattr(builtins, node.id)
        raise self.syntax(node, f"name {node.id!r} is not defined")

    # -- statements -------------------------------------------------------------------------
    def body(self, stmts: list[ast.stmt]) -> None:
        for i, stmt in enumerate(stmts):
            self.at(stmt)
            if isinstance(stmt, ast.Return):
                if i != len(stmts) - 1 or stmts is not self.node.body or \
                        (stmt.value is not None and not self.depth):
                    raise self.syntax(stmt, "a launched kernel returns nothing; a kernel "
                                            "called from a kernel returns only at its end",
                                      hint="write results into an output tensor")
                if stmt.value is not None:
                    self.result = self.visit(stmt.value)
                continue
            self.visit(stmt)

    def generic_visit(self, node: ast.AST) -> Any:
        raise self.syntax(node, f"{type(node).__name__} is not supported in kernels")

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring
        self.visit(node.value)

    def visit_Pass(self, node: ast.Pass) -> None:
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        value = self.visit(node.value)
        for target in node.targets:
            self.assign(target, value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is None:
            raise self.syntax(node, "a declaration without a value is not supported")
        self.assign(node.target, self.visit(node.value))

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise self.syntax(node, f"{type(node.op).__name__}= is not supported")
        current = self.visit(ast.Name(node.target.id, ast.Load(), lineno=node.lineno)) \
            if isinstance(node.target, ast.Name) else self.visit(node.target)
        self.assign(node.target, self.binop(op, current, self.visit(node.value)))

    def assign(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.scope[target.id] = value
        elif isinstance(target, ast.Tuple):
            if not isinstance(value, tuple) or len(value) != len(target.elts):
                raise self.syntax(target, "cannot unpack this value into "
                                          f"{len(target.elts)} names")
            for t, v in zip(target.elts, value, strict=True):
                self.assign(t, v)
        elif isinstance(target, ast.Subscript):
            tensor = self.visit(target.value)
            if not (isinstance(tensor, Op) and isinstance(tensor.type, TensorType)):
                raise self.syntax(target, "only tensor slices can be assigned to",
                                  hint="tiles are values: build a new one instead")
            self.b.store(tensor, self.tensor_index(tensor, target.slice), value)
        else:
            raise self.syntax(target, f"cannot assign to {type(target).__name__}")

    def visit_For(self, node: ast.For) -> None:
        if node.orelse:
            raise self.syntax(node, "for ... else is not supported")
        if not isinstance(node.target, ast.Name):
            raise self.syntax(node.target, "loop variables must be a single name")
        it = self.visit(node.iter)
        if isinstance(it, core.static_range):
            for v in it.values:
                self.scope[node.target.id] = v
                self.body(node.body)
            return
        if not isinstance(it, core.range):
            raise self.syntax(node.iter, "loops run over range(...), tl.range(...) or "
                                         "tl.static_range(...)")
        args = list(it.args)
        if not 1 <= len(args) <= 3:
            raise self.syntax(node.iter, "range takes 1 to 3 arguments")
        start, stop, step = ([0, *args, 1] if len(args) == 1 else
                             [*args, 1] if len(args) == 2 else args)
        if _is_py(step) and step == 0:
            raise self.syntax(node.iter, "range step must not be zero")
        bounds = [self.b.cast(self.b.value(v), dt.int64) for v in (start, stop, step)]
        for hint, v in (("unroll", it.unroll), ("pipeline", it.pipeline)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise self.syntax(node.iter, f"{hint}= must be a positive compile-time int, "
                                             f"got {v!r}")
        attrs = {k: v for k, v in (("unroll", it.unroll), ("pipeline", it.pipeline)) if v}
        name = node.target.id
        self.loop(node, "for", bounds, attrs, lambda ind: self.scope.__setitem__(name, ind))

    def visit_While(self, node: ast.While) -> None:
        if node.orelse:
            raise self.syntax(node, "while ... else is not supported")
        self.loop(node, "while", [], {}, None)

    def carried(self, stmts: list[ast.stmt]) -> list[str]:
        """Names assigned in `stmts` that already hold a value: they flow around the loop."""
        names: list[str] = []
        for stmt in stmts:
            for n in ast.walk(stmt):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and \
                        n.id in self.scope and n.id not in names:
                    names.append(n.id)
        return names

    def loop(self, node: ast.For | ast.While, kind: str, operands: list[Op],
             attrs: dict[str, Any], bind_index: Callable[[Op], None] | None) -> None:
        """Build a `for` (bind_index binds its induction variable) or a `while` loop. Values
        assigned in the body flow around it; if the body widens one (an int accumulator
        that receives floats, as Python allows), the loop is built again from widened
        initial values."""
        carried = self.carried(node.body)
        inits = [self.b.value(self.scope[n]) for n in carried]
        saved = dict(self.scope)
        while True:
            blocks, yields = [], []
            for is_cond in ([True] if kind == "while" else []) + [False]:
                args = [Op("blockarg", [], v.type) for v in inits]
                leading = [Op("blockarg", [], TileType(dt.int64))] if bind_index else []
                block = Block(args=leading + args)
                self.b.push(block)
                self.scope.update(zip(carried, args, strict=True))
                if is_cond:
                    block.yields = [self.scalar_condition(node.test)]
                else:
                    if bind_index:
                        bind_index(leading[0])
                    self.body(node.body)
                    yields = [self.b.value(self.scope[n]) for n in carried]
                self.b.pop()
                self.scope = dict(saved)
                blocks.append(block)
            self.at(node)
            wider = [self.widened(n, y, i, "inside the loop")
                     for n, y, i in zip(carried, yields, inits, strict=True)]
            if all(w is i.type.dtype for w, i in zip(wider, inits, strict=True)):
                break
            inits = [self.b.cast(i, w) for i, w in zip(inits, wider, strict=True)]
        body = blocks[-1]
        self.b.push(body)
        body.yields = [self.b.cast(y, i.type.dtype) for y, i in zip(yields, inits, strict=True)]
        self.b.pop()
        op = self.b.emit(kind, [*operands, *inits], None, pure=False, **attrs)
        op.blocks = blocks
        for i, (name, init) in enumerate(zip(carried, inits, strict=True)):
            self.scope[name] = self.b.emit("result", [op], init.type, pure=False, index=i)

    def widened(self, name: str, new: Op, old: Op, where: str) -> dt.dtype:
        """The dtype a variable must have to hold both `old` and `new` (same shape)."""
        if new.shape != old.shape:
            raise self.b.error(f"{name!r} changes shape from {old.shape} to {new.shape} "
                               f"{where}", hint=f"give {name!r} its final shape first, "
                                                "e.g. with tl.zeros(...)")
        if new.type.dtype is old.type.dtype:
            return old.type.dtype
        return promote(old.type, new.type)

    def visit_If(self, node: ast.If) -> None:
        cond = self.visit(node.test)
        if _is_py(cond):  # a compile-time condition: build only the branch taken
            self.body(node.body if cond else node.orelse)
            return
        cond = self.scalar_condition(node.test, cond)
        before = dict(self.scope)
        branches = []
        for stmts in (node.body, node.orelse):
            block = Block()
            self.b.push(block)
            self.scope = dict(before)
            self.body(stmts)
            self.b.pop()
            branches.append((block, self.scope))
        names = [n for n in {**branches[0][1], **branches[1][1]}
                 if any(s.get(n) is not before.get(n) for _, s in branches)]
        results = []
        for name in names:
            if not all(name in s for _, s in branches):
                continue  # assigned in one branch only and new: local to that branch
            values = []
            for block, scope in branches:
                self.b.push(block)
                values.append(self.b.value(scope[name]))
                self.b.pop()
            self.at(node)
            dtype = self.widened(name, values[1], values[0], "between the if and else branches")
            for (block, _), v in zip(branches, values, strict=True):
                self.b.push(block)
                block.yields.append(self.b.cast(v, dtype))
                self.b.pop()
            results.append((name, TileType(dtype, values[0].shape)))
        self.scope = before
        self.at(node)
        op = self.b.emit("if", [cond], None, pure=False)
        op.blocks = [branches[0][0], branches[1][0]]
        for i, (name, type_) in enumerate(results):
            self.scope[name] = self.b.emit("result", [op], type_, pure=False, index=i)

    def scalar_condition(self, node: ast.expr, value: Any = None) -> Op:
        value = self.visit(node) if value is None else value
        value = self.b.value(value)
        if not value.type.is_scalar:
            raise self.syntax(node, f"a condition must be a scalar, not a {value.type} tile",
                              hint="use tl.where for elementwise choices")
        return self.b.cast(value, dt.bool)

    # -- expressions ------------------------------------------------------------------------
    def visit_Constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, (bool, int, float, str)) or node.value is None:
            return node.value
        raise self.syntax(node, f"constant {node.value!r} is not supported")

    def visit_Name(self, node: ast.Name) -> Any:
        return self.lookup(node)

    def visit_Tuple(self, node: ast.Tuple) -> tuple[Any, ...]:
        return tuple(self.visit(e) for e in node.elts)

    visit_List = visit_Tuple

    def visit_Attribute(self, node: ast.Attribute) -> Any:
        obj = self.visit(node.value)
        if isinstance(obj, Op):
            if node.attr == "shape":
                if isinstance(obj.type, TensorType):
                    return tuple(  # specialized sizes are compile-time ints
                        obj.type.size(i) if obj.type.size(i) is not None else
                        self.b.emit("dim", [obj], TileType(dt.int64), axis=i)
                        for i in builtins.range(obj.type.ndim))
                return obj.shape
            if node.attr == "T" and isinstance(obj.type, TileType):
                self.at(node)
                return self.b.trans(obj)
            if node.attr == "dtype":
                return obj.type.dtype
            if node.attr == "ndim":
                return obj.type.ndim if isinstance(obj.type, TensorType) else len(obj.shape)
            if node.attr in _METHODS:
                return ("method", node.attr, obj)
            raise self.syntax(node, f"tiles have no attribute {node.attr!r}")
        try:
            return getattr(obj, node.attr)
        except AttributeError:
            raise self.syntax(node, f"{obj!r} has no attribute {node.attr!r}") from None

    def binop(self, fn: str, a: Any, c: Any) -> Any:
        if _is_py(a) and _is_py(c):
            try:
                return _PY_BIN[fn](a, c)
            except Exception as e:
                raise self.b.error(f"compile-time expression failed: {e}") from None
        return self.b.binary(fn, a, c)

    def visit_BinOp(self, node: ast.BinOp) -> Any:
        a, c = self.visit(node.left), self.visit(node.right)
        self.at(node)
        if isinstance(node.op, ast.MatMult):
            return self.b.dot(a, c)
        return self.binop(_BINOPS[type(node.op)], a, c)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Any:
        x = self.visit(node.operand)
        if _is_py(x):
            return {ast.USub: lambda v: -v, ast.UAdd: lambda v: +v, ast.Not: lambda v: not v,
                    ast.Invert: lambda v: ~v}[type(node.op)](x)
        self.at(node)
        if isinstance(node.op, ast.UAdd):
            return x
        if isinstance(node.op, ast.Not) and not x.type.is_scalar:
            raise self.syntax(node, "'not' on a tile is ambiguous", hint="use ~mask")
        return self.b.unary({ast.USub: "neg", ast.Not: "not", ast.Invert: "invert"}
                            [type(node.op)], x)

    def visit_Compare(self, node: ast.Compare) -> Any:
        result, left = None, self.visit(node.left)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.visit(right_node)
            self.at(node)
            if isinstance(op, (ast.Is, ast.IsNot)) and _is_py(left) and _is_py(right):
                part = (left is right) == isinstance(op, ast.Is)
            elif type(op) not in _CMPOPS:
                raise self.syntax(node, f"'{_CMP_NAMES.get(type(op), type(op).__name__)}' "
                                        "is only supported on compile-time values")
            else:
                part = self.binop(_CMPOPS[type(op)], left, right)
            result = part if result is None else self.binop("and", result, part)
            left = right
        return result

    def visit_BoolOp(self, node: ast.BoolOp) -> Any:
        values = [self.visit(v) for v in node.values]
        if all(_is_py(v) for v in values):
            out = values[0]
            for v in values[1:]:
                out = (out and v) if isinstance(node.op, ast.And) else (out or v)
            return out
        fn = "and" if isinstance(node.op, ast.And) else "or"
        out = self.scalar_condition(node.values[0], values[0])
        for n, v in zip(node.values[1:], values[1:], strict=True):
            out = self.b.binary(fn, out, self.scalar_condition(n, v))
        return out

    def visit_IfExp(self, node: ast.IfExp) -> Any:
        cond = self.visit(node.test)
        if _is_py(cond):
            return self.visit(node.body if cond else node.orelse)
        return self.b.where(cond, self.visit(node.body), self.visit(node.orelse))

    def visit_Subscript(self, node: ast.Subscript) -> Any:
        obj = self.visit(node.value)
        if isinstance(obj, Op) and isinstance(obj.type, TensorType):
            return self.b.load(obj, self.tensor_index(obj, node.slice), 0)
        if isinstance(obj, Op):
            return self.tile_index(obj, node.slice)
        index = self.visit(node.slice)
        if isinstance(obj, tuple) and isinstance(index, int):
            if not -len(obj) <= index < len(obj):
                raise self.syntax(node, f"index {index} is out of range for {len(obj)} items")
            return obj[index]
        if isinstance(obj, dict) and _is_py(index):  # a compile-time table, e.g. of kernels
            if index not in obj:
                raise self.syntax(node, f"key {index!r} is not in this mapping")
            return obj[index]
        raise self.syntax(node, f"cannot index {type(obj).__name__} here")

    def index_items(self, node: ast.expr) -> list[ast.expr]:
        return list(node.elts) if isinstance(node, ast.Tuple) else [node]

    def tensor_index(self, tensor: Op, node: ast.expr) -> list[tuple[Op, int | None]]:
        items = self.index_items(node)
        if len(items) != tensor.type.ndim:
            raise self.syntax(node, f"a rank-{tensor.type.ndim} tensor needs "
                                    f"{tensor.type.ndim} indices, got {len(items)}",
                              hint="index every dimension, e.g. x[i, j:j + BLOCK]")
        out = []
        for d, item in enumerate(items):
            if isinstance(item, ast.Slice):
                if item.step is not None:
                    raise self.syntax(item, "slice steps are not supported",
                                      hint="pass a strided view of the tensor instead")
                whole = tensor.type.size(d)
                if item.lower is None and item.upper is None and whole is not None:
                    out.append((self.b.const(0, dt.int64), whole))  # `:` on a specialized dim
                    continue
                if item.upper is None:
                    raise self.syntax(item, "tile sizes must be known at compile time",
                                      hint="write x[0:BLOCK] with BLOCK a tl.constexpr; "
                                           "elements past the end are masked")
                start = self.visit(item.lower) if item.lower is not None else 0
                size = self.static_size(item, start, self.visit(item.upper))
                out.append((self.b.cast(self.b.value(start), dt.int64), size))
            else:
                pos = self.b.value(self.visit(item))
                if not pos.type.is_scalar or pos.type.dtype.is_floating_point:
                    raise self.syntax(item, "tensor indices must be integer scalars or slices")
                out.append((self.b.cast(pos, dt.int64), None))
        return out

    def static_size(self, node: ast.expr, start: Any, stop: Any) -> int:
        """stop - start, which must be a compile-time constant (e.g. i:i + BLOCK)."""
        (b0, o0), (b1, o1) = _affine(start), _affine(stop)
        if b0 is not b1 or not isinstance(o1 - o0, int) or o1 - o0 <= 0:
            raise self.syntax(node, "the slice's size must be a positive compile-time "
                                    "constant", hint="write start:start + BLOCK")
        return o1 - o0

    def tile_index(self, tile: Op, node: ast.expr) -> Op:
        items = self.index_items(node)
        shape, dims = [], iter(tile.shape)
        for item in items:
            if isinstance(item, ast.Constant) and item.value is None:
                shape.append(1)
            elif isinstance(item, ast.Slice) and item.lower is item.upper is item.step is None:
                shape.append(next(dims, None))
            else:
                raise self.syntax(item, "tiles can only be indexed with ':' and None",
                                  hint="load the elements you need from the tensor instead")
        if None in shape:
            raise self.syntax(node, f"too many indices for a tile of shape {tile.shape}")
        shape += list(dims)
        self.at(node)
        return self.b.reshape(tile, tuple(shape))

    def visit_Call(self, node: ast.Call) -> Any:
        fn = self.visit(node.func)
        if fn is core.load:
            return self.load_call(node)
        args = [self.visit(a) for a in node.args]
        kwargs = {k.arg: self.visit(k.value) for k in node.keywords}
        self.at(node)
        try:
            return self.call(node, fn, args, kwargs)
        except DtypeError as e:  # a bad dtype name: say where in the kernel
            raise self.b.error(e.message, hint=e.hint) from None
        except TesseraError:
            raise
        except (TypeError, ValueError, IndexError, KeyError) as e:
            name = fn[1] if isinstance(fn, tuple) else getattr(fn, "__name__", fn)
            raise self.syntax(node, f"bad call to {name}(): {e}") from None

    def call(self, node: ast.Call, fn: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if isinstance(fn, tuple) and fn[:1] == ("method",):
            _, name, obj = fn
            if name == "to":
                if len(args) + len(kwargs) != 1 or set(kwargs) - {"dtype"}:
                    raise self.syntax(node, ".to() takes one dtype, e.g. x.to(tl.float16)")
                return self.b.cast(obj, dt.as_dtype(args[0] if args else kwargs["dtype"]))
            return core._REGISTRY[name].build(self.b, obj, *args, **kwargs)
        if isinstance(fn, core.Builtin):
            return fn.build(self.b, *args, **kwargs)
        if fn is builtins.range or fn is core.range:
            return core.range(*args, **kwargs)
        if fn is core.static_range:
            if not all(isinstance(a, int) for a in args) or kwargs:
                raise self.syntax(node, "tl.static_range takes compile-time integers",
                                  hint="use range(...) for a loop with run-time bounds")
            return core.static_range(*args)
        if fn in _PURE_PY:
            return self.python_builtin(node, fn, args)
        from tessera.lang.jit import Kernel  # (jit imports this module)
        if isinstance(fn, Kernel):
            return self.inline(node, fn.fn, args, kwargs)
        raise self.syntax(node, f"cannot call {getattr(fn, '__name__', fn)!r} in a kernel",
                          hint="kernels call tl.* functions and Python's min, max, abs, "
                               "int, float, bool and len")

    def inline(self, node: ast.Call, fn: Callable[..., Any], args: list[Any],
               kwargs: dict[str, Any]) -> Any:
        """A @tl.kernel called from a kernel: its body is built in place, with the caller's
        values (tiles, tensors, constants) as its arguments; it returns what it returns."""
        if self.depth >= MAX_INLINE_DEPTH:
            raise self.syntax(node, f"kernels nest deeper than {MAX_INLINE_DEPTH} calls",
                              hint="kernels cannot call themselves recursively")
        try:
            bound = inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as e:
            raise self.syntax(node, f"bad call to {fn.__name__}(): {e}") from None
        bound.apply_defaults()
        callee = _Frontend(fn, self.b, self.depth + 1)
        callee.scope.update(bound.arguments)
        callee.body(callee.node.body)
        self.at(node)
        return callee.result

    def python_builtin(self, node: ast.Call, fn: Any, args: list[Any]) -> Any:
        if all(_is_py(a) for a in args):
            return fn(*args)
        if fn in (builtins.min, builtins.max) and len(args) == 2:
            return self.b.binary("minimum" if fn is builtins.min else "maximum", *args)
        if fn is builtins.abs and len(args) == 1:
            return self.b.unary("abs", args[0])
        if fn in (builtins.int, builtins.float, builtins.bool) and len(args) == 1:
            return self.b.cast(self.b.value(args[0]), {builtins.int: dt.int64,
                                                       builtins.float: dt.float32,
                                                       builtins.bool: dt.bool}[fn])
        raise self.syntax(node, f"{fn.__name__}() of run-time values is not supported here")

    def load_call(self, node: ast.Call) -> Op:
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Subscript):
            raise self.syntax(node, "tl.load takes one tensor slice, e.g. "
                                    "tl.load(x[i:i + BLOCK], other=0.0)")
        kwargs = {k.arg: self.visit(k.value) for k in node.keywords}
        unknown = set(kwargs) - {"other"}
        if unknown:
            raise self.syntax(node, f"tl.load got unknown arguments {sorted(unknown)}")
        sub = node.args[0]
        tensor = self.visit(sub.value)
        if not (isinstance(tensor, Op) and isinstance(tensor.type, TensorType)):
            raise self.syntax(node, "tl.load needs a slice of a tensor argument")
        self.at(node)
        return self.b.load(tensor, self.tensor_index(tensor, sub.slice), kwargs.get("other", 0))


def _affine(x: Any) -> tuple[Any, Any]:
    """(base, constant offset) with x == base + offset, for slice size inference."""
    if _is_py(x):
        return None, x
    if x.kind == "const":
        return None, x.attrs["value"]
    if x.kind == "cast" and x.type.dtype is dt.int64:
        return _affine(x.operands[0])
    if x.kind == "binary" and x.attrs["fn"] in ("add", "sub"):
        (b0, o0), (b1, o1) = _affine(x.operands[0]), _affine(x.operands[1])
        sign = 1 if x.attrs["fn"] == "add" else -1
        if b1 is None:
            return b0, o0 + sign * o1
        if b0 is None and sign == 1:
            return b1, o0 + o1
    return x, 0


def whole_slices(fn: Callable[..., Any]) -> dict[str, frozenset[int]]:
    """Dims of tensor parameters that the kernel slices whole (`x[r, :]`): launches are
    specialized on their sizes, so the tile's shape is known when the kernel compiles."""
    node, _, _ = parse_kernel(fn)
    params = {a.arg for a in node.args.args + node.args.kwonlyargs}
    dims: dict[str, set[int]] = {}
    for n in ast.walk(node):
        if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and \
                n.value.id in params:
            items = n.slice.elts if isinstance(n.slice, ast.Tuple) else [n.slice]
            for d, item in enumerate(items):
                if isinstance(item, ast.Slice) and item.lower is item.upper is item.step is None:
                    dims.setdefault(n.value.id, set()).add(d)
    return {name: frozenset(d) for name, d in dims.items()}


def _where_defined(fn: Callable[..., Any]) -> str:
    return f"{fn.__code__.co_filename}:{fn.__code__.co_firstlineno}"


def _closure(fn: Callable[..., Any]) -> dict[str, Any]:
    if not fn.__closure__:
        return {}
    return {name: cell.cell_contents for name, cell in
            zip(fn.__code__.co_freevars, fn.__closure__, strict=True)}


def trace(fn: Callable[..., Any], params: dict[str, TensorType | TileType | Any]) -> Function:
    """Build the IR of `fn` for one specialization. `params` maps each parameter to a
    TensorType, a scalar TileType, or (for constexprs) its Python value."""
    fe = _Frontend(fn)
    fe.at(fe.node)
    ops = []
    for i, (name, kind) in enumerate(params.items()):
        if isinstance(kind, (TensorType, TileType)):
            op = Op("param", [], kind, {"name": name, "index": i}, fe.b.loc)
            ops.append(op)
            fe.scope[name] = op
        else:
            fe.scope[name] = kind
    fe.body(fe.node.body)
    return Function(fn.__name__, ops, fe.b.blocks[0], Loc(fe.file, fe.first))
