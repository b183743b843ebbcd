"""Tessera's tile kernel language: write a fused operator once, in Python, at the tile
level; get fast native code.

    import tessera.lang as tl

    @tl.kernel
    def add(x, y, out, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK
        out[i:i + BLOCK] = x[i:i + BLOCK] + y[i:i + BLOCK]

    add[(tl.cdiv(n, 1024),)](x, y, out, BLOCK=1024)

Tensors are sliced, never addressed by pointers: elements past a tensor's end are masked
on load (`other=`, default 0) and on store. See docs/lang/reference.md.
"""

from tessera.errors import CompileError
from tessera.lang.autotune import Autotuner, Config, autotune
from tessera.lang.core import *  # noqa: F403 (the builtins)
from tessera.lang.core import __all__ as _builtins
from tessera.lang.errors import KernelError, KernelSyntaxError, KernelTypeError, LaunchError
from tessera.lang.jit import Kernel, Specialization, TensorSpec, kernel
from tessera.runtime.dtype import bfloat16, bool, float16, float32, int8, int32, int64, uint8

__all__ = [*_builtins, "Autotuner", "CompileError", "Config", "Kernel", "KernelError",
           "KernelSyntaxError", "KernelTypeError", "LaunchError", "Specialization",
           "TensorSpec", "autotune", "bfloat16",
           "bool", "float16", "float32", "int8", "int32", "int64", "kernel", "uint8"]
