"""Fast launchers: straight-line Python, generated per kernel signature seen, that checks
torch tensor arguments against one compiled specialization and calls it directly.

The general launch path (jit.Kernel.launch) binds arguments, classifies each one, builds
the cache key and checks aliasing, about 5 us for a few tensors. Once a launch has
succeeded with torch tensors, this module writes a function with the kernel's own
signature (so Python binds the arguments) whose guards re-check exactly what selected
that specialization: tensor type, dtype, rank, unit stride, specialized sizes, scalar
kinds and constexpr values, plus the per-launch safety checks (contiguous outputs, no
output aliasing another argument). Any guard that fails returns False and the general
path takes over; it is never a different answer, only a slower one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from tessera.runtime.cpu.launch import launcher

__all__ = ["make_fast_launcher"]


def make_fast_launcher(kernel: Any, values: dict[str, Any], compiled: Any,
                       span: Callable[..., tuple[int, int]]) -> Callable[..., bool] | None:
    """A function `fast(grid, *args, **kwargs) -> bool` that launches `compiled` when the
    arguments match those of `values` in everything that chose it, or None if this
    signature is not one it handles (non-torch tensors, callable grids, odd names)."""
    env: dict[str, Any] = {"_tsr_call": launcher(), "_tsr_address": compiled.address,
                           "_tsr_span": span}
    params, checks, flat, tensors = [], [], [], []
    for p in inspect.signature(kernel.fn).parameters.values():
        name, v = p.name, values[p.name]
        if name.startswith("_tsr_") or name == "self":
            return None
        if p.default is not p.empty:
            env[f"_tsr_default_{name}"] = p.default
            params.append(f"{name}=_tsr_default_{name}")
        else:
            params.append(name)
        if p.kind is p.KEYWORD_ONLY and "*" not in params[:-1]:
            params.insert(-1, "*")
        if name in kernel.constexprs:
            env[f"_tsr_const_{name}"] = v
            checks.append(f"if type({name}) is not {type(v).__name__} or "
                          f"{name} != _tsr_const_{name}: return False"
                          if type(v) in (int, float, bool, str) else
                          f"if {name} is not _tsr_const_{name}: return False")
        elif type(v).__module__ == "torch" and type(v).__name__ == "Tensor":
            env["_tsr_Tensor"] = type(v)
            env[f"_tsr_dtype_{name}"] = v.dtype
            whole = kernel._whole.get(name, ())
            checks += [
                f"if type({name}) is not _tsr_Tensor or {name}.dtype is not "
                f"_tsr_dtype_{name} or not {name}.is_cpu: return False",
                f"{name}_st = {name}.stride()",
                f"{name}_sh = {name}.shape",
                f"if len({name}_st) != {v.dim()}"
                + (f" or ({name}_st[-1] == 1) != {v.dim() > 0 and v.stride()[-1] == 1}"
                   if v.dim() else "")
                + "".join(f" or {name}_sh[{d}] != {v.shape[d]}" for d in sorted(whole))
                + ": return False",
                f"{name}_p = {name}.data_ptr()"]
            flat += [f"{name}_p", f"*{name}_sh", f"*{name}_st"]
            tensors.append((name, v.element_size(), name in compiled.writes))
        elif type(v) in (int, float, bool):
            bound = f" or not -{2**63} <= {name} < {2**63}" if type(v) is int else ""
            checks.append(f"if type({name}) is not {type(v).__name__}{bound}: return False")
            flat.append(f"int({name})" if type(v) is bool else name)
        else:
            return None  # numpy or tessera tensors, numpy scalars: the general path
    checks += _alias_checks(tensors)
    source = "\n    ".join([
        f"def fast(_tsr_grid, {', '.join(params)}):",
        *checks,
        "if type(_tsr_grid) is not tuple or not 1 <= len(_tsr_grid) <= 3: return False",
        "_tsr_g = _tsr_grid + (1, 1)",
        "if type(_tsr_g[0]) is not int or type(_tsr_g[1]) is not int or "
        "type(_tsr_g[2]) is not int or min(_tsr_g[:3]) < 0: return False",
        f"_tsr_call(_tsr_address, _tsr_g[0], _tsr_g[1], _tsr_g[2], {', '.join(flat)})",
        "return True"])
    exec(compile(source, f"<tessera fast launcher of {kernel.__name__}>", "exec"), env)
    return env["fast"]


def _alias_checks(tensors: list[tuple[str, int, bool]]) -> list[str]:
    """Outputs must be contiguous (no two elements share memory) and must not overlap any
    other tensor argument (the specialization was compiled with `restrict`)."""
    if not any(w for _, _, w in tensors):
        return []
    lines = []
    for name, size, written in tensors:
        if written:
            lines.append(f"if not {name}.is_contiguous(): return False")
            lines.append(f"{name}_lo = {name}_p; {name}_hi = {name}_p + {name}.numel() * {size}")
        else:
            lines.append(f"{name}_lo, {name}_hi = ({name}_p, {name}_p + {name}.numel() * "
                         f"{size}) if {name}.is_contiguous() else "
                         f"_tsr_span({name}_p, {name}_sh, {name}_st, {size})")
    for name, _, written in tensors:
        if written:
            for other, _, _ in tensors:
                if other != name:
                    lines.append(f"if {other}_lo < {name}_hi and {name}_lo < {other}_hi and "
                                 f"{other}_lo != {other}_hi: return False")
    return lines
