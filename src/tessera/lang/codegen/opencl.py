"""The OpenCL C dialect: the grid becomes the NDRange, one work-item per program.

Tiles are private arrays and loops inside the work-item (local memory is not used yet:
programs never share data, so no work-group barrier is needed, and the driver picks the
work-group size). Explicit vectors are OpenCL's floatN with vloadN/vstoreN, the dot's
micro-kernel is unrolled here into fma on them, and the math library is tessera_math.cl.
"""

from __future__ import annotations

from pathlib import Path

from tessera.lang.codegen import MATH_HEADER
from tessera.lang.codegen.cstyle import ENTRY, INT_DIVMOD, CStylePrinter
from tessera.lang.ir import Function
from tessera.lang.types import TileType
from tessera.runtime import dtype as dt

__all__ = ["ENTRY", "MATH_CL", "OpenCLPrinter", "kernel_args"]

MATH_CL = Path(__file__).with_name("tessera_math.cl")
VECTOR_WIDTHS = (4, 8, 16)  # floatN types the dot micro-kernel may use


class OpenCLPrinter(CStylePrinter):
    """Prints a kernel as `__kernel void tessera_kernel(params...)`: each tensor as
    `__global T *base, long off, long n0.., long s0..` (offset, sizes and strides in
    elements), int and bool scalars as `long`, float scalars as `float`; program_id(d) is
    get_global_id(d) and num_programs(d) get_global_size(d)."""

    # pointers to tiles are private and to tensors global: a dot reads private copies
    direct_dot_operands = False

    def __init__(self, fn: Function, restrict: bool = True, vector_lanes: int = 8,
                 fp64: bool = False):
        if vector_lanes not in VECTOR_WIDTHS:
            raise ValueError(f"vector_lanes must be one of {VECTOR_WIDTHS}, not {vector_lanes}")
        self.vector_lanes = vector_lanes
        self.fp64 = fp64  # the device has doubles: the C math library (tessera_math.h) runs
        super().__init__(fn)
        self.restrict = restrict

    def simd(self, clauses: str = "") -> str:
        return ""  # a work-item's loops: the device compiler vectorizes across work-items

    def unroll(self, n: int) -> str:
        return f"#pragma unroll {n}"

    def int64_literal(self, value: int) -> str:
        return "(-9223372036854775807L - 1)" if value == -2**63 else f"{value}L"

    def pointer_type(self, d: dt.dtype, writes: bool, restrict: bool) -> str:
        return (f"__global {'' if writes else 'const '}{d.c_type} "
                f"*{'restrict ' if restrict else ''}")

    def vector_type(self) -> str:
        return f"float{self.vector_lanes}"

    def vload(self, address: str) -> str:
        return f"vload{self.vector_lanes}(0, {address})"

    def vstore(self, address: str, value: str) -> str:
        return f"vstore{self.vector_lanes}({value}, 0, {address});"

    def tile_step(self, acc: str, mr: int, nv: int, a: str, b: str) -> str:
        loads = ", ".join(f"{acc}_b{v} = {self.vload(f'{b} + {v * self.vector_lanes}')}"
                          for v in range(nv))
        steps = " ".join(f"{acc}[{r}][{v}] = fma(({self.vector_type()})({a}({r})), "
                         f"{acc}_b{v}, {acc}[{r}][{v}]);" for r in range(mr) for v in range(nv))
        return f"{{ const {self.vector_type()} {loads}; {steps} }}"

    def source(self) -> str:
        params, pointers = [], []
        for p in self.fn.params:
            self.names[p.id] = f"a_{p.attrs['name']}"
            for ctype, name in self.params(p, self.restrict):
                if "*" in ctype:
                    params += [f"{ctype}{name}_base", f"long {name}_off"]
                    pointers.append(f"    {ctype}{name} = {name}_base + {name}_off;")
                else:  # a bool kernel argument is not allowed: it comes as a long
                    params.append(f"{'long' if ctype == 'bool' else ctype} {name}")
        self.depth = 1
        self.block(self.fn.body)
        ids = [f"    const int64_t tsr_{v}{d} = get_global_{f}({d});"
               for v, f in (("pid", "id"), ("grid", "size")) for d in range(3)]
        math = [MATH_CL.read_text()] if not self.fp64 else [
            "#pragma OPENCL EXTENSION cl_khr_fp64 : enable", "#define TSR_C_MATH",
            MATH_CL.read_text(), MATH_HEADER.read_text()]
        return "\n".join([
            *math, INT_DIVMOD,
            f"/* kernel {self.fn.name}, from {self.fn.loc} */",
            f"__kernel void {ENTRY}({', '.join(params)}) {{",
            *ids, *pointers, *self.lines, "}", ""])


def kernel_args(fn: Function) -> list[tuple[str, dt.dtype | None]]:
    """How each flat launch slot (a tensor's data pointer, sizes and strides; a scalar) of
    `fn` becomes kernel arguments: ("tensor", its dtype) for a data pointer (it becomes a
    buffer and an element offset), ("long", None) for ints and bools, ("float", None)."""
    slots: list[tuple[str, dt.dtype | None]] = []
    for p in fn.params:
        if isinstance(p.type, TileType):
            slots.append(("float" if p.type.ctype == "float" else "long", None))
        else:
            slots += [("tensor", p.type.dtype), *[("long", None)] * (2 * p.type.ndim)]
    return slots

