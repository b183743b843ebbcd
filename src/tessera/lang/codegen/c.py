"""The C dialect: the grid becomes an OpenMP parallel loop over programs, inner loops ask
for SIMD, and the math library is pasted in so the source alone decides the binary."""

from __future__ import annotations

from tessera.lang.codegen import MATH_HEADER, TILE_HEADER
from tessera.lang.codegen.cstyle import ENTRY, INT_DIVMOD, CStylePrinter
from tessera.lang.ir import Function
from tessera.runtime import dtype as dt
from tessera.runtime.cpu.device import cpu_features

__all__ = ["ENTRY", "CPrinter"]

# Launches that move fewer elements than this run on the calling thread: below it, waking
# the other threads costs more than they save (and a busy machine makes that far worse).
PARALLEL_GRAIN = 32768

_PRELUDE = r"""#include <stdint.h>
#include <stdbool.h>
#include <math.h>
#include <string.h>
#include <omp.h>

""" + INT_DIVMOD + "\n"

class CPrinter(CStylePrinter):
    """Prints a kernel as `void tessera_kernel(grid0, grid1, grid2, params...)`."""

    def __init__(self, fn: Function, restrict: bool = True):
        if "avx512f" in cpu_features():  # 32 registers of 16 floats
            self.vector_lanes, self.vector_registers = 16, 32
        super().__init__(fn)
        self.restrict = restrict

    def simd(self, clauses: str = "") -> str:
        return f"#pragma omp simd {clauses}".rstrip()

    def vector_type(self) -> str:
        return "tsr_fv"

    def vload(self, address: str) -> str:
        return f"tsr_vload({address})"

    def vstore(self, address: str, value: str) -> str:
        return f"tsr_vstore({address}, {value});"

    def tile_step(self, acc: str, mr: int, nv: int, a: str, b: str) -> str:
        return f"TSR_TILE_STEP({acc}, {mr}, {nv}, {a}, {b});"

    def unroll(self, n: int) -> str:
        return f"#pragma GCC unroll {n}"

    def int64_literal(self, value: int) -> str:
        return f"INT64_C({value})"

    def pointer_type(self, d: dt.dtype, writes: bool, restrict: bool) -> str:
        return f"{'' if writes else 'const '}{d.c_type} *{'restrict ' if restrict else ''}"

    # a big tile: per-thread storage, so no worker thread's stack overflows
    large_tile_storage = "static _Thread_local "
    prefetch_builtin = "__builtin_prefetch"

    def source(self) -> str:
        params, unpack, call = [], [], []
        for p in self.fn.params:
            self.names[p.id] = f"a_{p.attrs['name']}"
            for ctype, name in self.params(p, self.restrict):
                slot = "void *" if "*" in ctype else "double" if ctype == "float" else "int64_t"
                unpack.append(f"    {slot} {name}; memcpy(&{name}, tsr_args + "
                              f"{8 * len(call)}, 8);")
                call.append(f"({ctype.replace('restrict', '').strip()}){name}")
                params.append(f"{ctype}{'' if ctype.endswith(' ') else ' '}{name}")
        self.depth = 1
        self.block(self.fn.body)
        head = ["int64_t tsr_grid0", "int64_t tsr_grid1", "int64_t tsr_grid2", *params]
        args = ", ".join(["tsr_grid0", "tsr_grid1", "tsr_grid2",
                          *(name for p in self.fn.params for _, name in self.params(p, False))])
        loop = f"for (int64_t p = 0; p < tsr_n; p++) tsr_program(p, {args});"
        return "\n".join([
            _PRELUDE, f"#define TSR_VL {self.vector_lanes}", TILE_HEADER.read_text(),
            MATH_HEADER.read_text(),
            f"/* kernel {self.fn.name}, from {self.fn.loc} */",
            "/* one program; not inlined, so the parallel and the serial loop share one copy */",
            f"static __attribute__((noinline)) void tsr_program(int64_t tsr_pid, "
            f"{', '.join(head)}) {{",
            "    const int64_t tsr_pid0 = tsr_pid % tsr_grid0;",
            "    const int64_t tsr_pid1 = (tsr_pid / tsr_grid0) % tsr_grid1;",
            "    const int64_t tsr_pid2 = tsr_pid / (tsr_grid0 * tsr_grid1);",
            "    (void)tsr_pid1; (void)tsr_pid2;",
            *self.lines,
            "}",
            "",
            f"static void tsr_run({', '.join(head)}) {{",
            "    const int64_t tsr_n = tsr_grid0 * tsr_grid1 * tsr_grid2;",
            f"    if (tsr_n < 2 || tsr_n * {self.work()} < {PARALLEL_GRAIN}) {{  /* no OpenMP "
            "region at all: even a one-thread one costs ~0.7 us */",
            f"        {loop}",
            "        return;",
            "    }",
            "    /* 8 chunks per thread, dealt round-robin: balanced when programs differ in",
            "       work (causal attention), yet each thread's programs stay mostly adjacent */",
            "    const int64_t tsr_chunk = tsr_n / (8 * omp_get_max_threads()) + 1;",
            "    #pragma omp parallel for schedule(static, tsr_chunk)",
            f"    {loop}",
            "}",
            "",
            "/* Launch ABI: the grid, then each parameter in an 8-byte slot (pointers, int64,",
            "   bool as int64, float as double), packed by the Python launcher. */",
            f"void {ENTRY}(int64_t tsr_grid0, int64_t tsr_grid1, int64_t tsr_grid2, "
            "const char *tsr_args) {",
            *unpack,
            "    (void)tsr_args;",
            f"    tsr_run({', '.join(['tsr_grid0', 'tsr_grid1', 'tsr_grid2', *call])});",
            "}",
            ""])
