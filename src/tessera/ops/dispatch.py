"""Eager calls: each op's public function, generated with the op's own signature so that
Python binds the arguments, does one type test per tensor argument and calls the
implementation directly when every tensor is a torch tensor. Numpy arrays and tessera
tensors are wrapped zero-copy on the way in and the result is given back in the kind of
the first tensor argument.

While a profile is active (runtime/profiling.py) every call is an "op" event with its
tensors' shapes and dtypes, around the kernels it launches; otherwise the cost is one test
of the global `_prof` that the profiler flips in every entry point's globals."""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tessera.errors import DeviceError, DtypeError
from tessera.ops import _fastpath
from tessera.ops.device import device_of, on_device
from tessera.ops.registry import Arg, OpDef
from tessera.runtime import profiling
from tessera.runtime.tensor import Tensor as TesseraTensor
from tessera.runtime.tensor import as_tensor

__all__ = ["eager_function", "to_torch"]

_T = torch.Tensor
_ENVS: list[dict[str, Any]] = []  # globals of every entry point: `_prof` is flipped there


def eager_function(d: OpDef) -> Callable[..., Any]:
    """The public function of op `d`."""
    env: dict[str, Any] = {"_T": _T, "_impl": d.impl, "_op": d, "_foreign": _foreign,
                           "_all_torch": _all_torch}
    params, call, fast = [], [], []
    for a in d.args:
        if a.kwarg_only and "*" not in params:
            params.append("*")
        if a.default is Arg.REQUIRED:
            params.append(a.name)
        else:
            env[f"_default_{a.name}"] = a.default
            params.append(f"{a.name}=_default_{a.name}")
        call.append(f"{a.name}={a.name}" if a.kwarg_only else a.name)
        if a.type == "Tensor":
            fast.append(f"type({a.name}) is _T")
        elif a.type == "Optional[Tensor]":
            fast.append(f"({a.name} is None or type({a.name}) is _T)")
        elif a.is_tensor:
            fast.append(f"_all_torch({a.name})")
    names = ", ".join(a.name for a in d.args)
    native = []
    if d.fast:
        _fastpath.bind(env)
        expr = re.sub(r"@(\w+)", lambda m: str(_fastpath.table(m.group(1))), d.fast)
        native = [f"        _r = {expr}", "        if _r is not None:", "            return _r"]
    body = [f"    if {' and '.join(fast) or 'True'}:",
            *native,
            f"        return _impl({', '.join(call)})",
            f"    return _foreign(_op, ({names}{',' if len(d.args) == 1 else ''}))"]
    source = "\n".join([  # the entry point, and its body unprofiled for a profiled call
        f"def {d.name}({', '.join(params)}):",
        "    if _prof:",
        f"        return _profiled(_op, _unprofiled, {', '.join(call)})",
        *body,
        f"def _unprofiled({', '.join(params)}):",
        *body])
    env["_profiled"] = _profiled
    exec(compile(source, f"<tessera op {d.name}>", "exec"), env)
    with _envs_lock:
        _ENVS.append(env)
        env["_prof"] = profiling.active is not None
    fn = env[d.name]
    fn.__doc__ = d.impl.__doc__
    fn.__qualname__ = fn.__name__ = d.name
    fn.__module__ = d.impl.__module__
    fn.__wrapped__ = d.impl  # inspect.signature shows the implementation's
    fn.op = d
    return fn


_envs_lock = threading.Lock()


def _profile(session: profiling.Session | None) -> None:
    with _envs_lock:
        for env in _ENVS:
            env["_prof"] = session is not None


profiling.subscribe(_profile)


def _profiled(d: OpDef, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` (op `d`'s unprofiled entry point) as one "op" event with the shapes and
    dtypes of its tensor arguments and results."""
    session = profiling.active
    if session is None:
        return fn(*args, **kwargs)
    t0 = profiling.now()
    out = fn(*args, **kwargs)
    t1 = profiling.now()
    values = [*args, *kwargs.values()]
    inputs = profiling.describe(x for v in values
                                for x in (v if isinstance(v, (list, tuple)) else (v,)))
    outs = out if isinstance(out, (list, tuple)) else (out,)
    named = {**dict(zip((a.name for a in d.args if not a.kwarg_only), args,
                          strict=True)), **kwargs}
    session.record("op", d.name, t0, t1, {
        "inputs": inputs, "outputs": profiling.describe(outs),
        "params": profiling.scalars(named)})
    return out


def _all_torch(xs: Any) -> bool:
    return type(xs) in (list, tuple) and all(type(x) is _T for x in xs)


def to_torch(x: Any, op: str, arg: str) -> tuple[torch.Tensor, str | None]:
    """(a CPU torch tensor sharing x's memory, the kind x was: "torch", "numpy",
    "tessera", or None for a Python number made into a 0-dim tensor)."""
    if isinstance(x, _T):
        if not x.is_cpu:
            raise DeviceError(f"{op}: argument {arg!r} is on {x.device}; tessera.ops runs on "
                              "the CPU", hint="move it with .cpu(), or compile the model for "
                                              "the device")
        return x, "torch"
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            raise DtypeError(f"{op}: argument {arg!r} has non-native byte order {x.dtype}",
                             hint="convert with x.astype(x.dtype.newbyteorder('='))")
        with warnings.catch_warnings():  # read-only arrays: inputs are never written
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.from_numpy(x), "numpy"
            except TypeError as e:
                raise DtypeError(f"{op}: argument {arg!r} has dtype {x.dtype}, which torch "
                                 "cannot hold", hint="use a float, int or bool array") from e
    if isinstance(x, TesseraTensor):
        return x.torch(), "tessera"
    if isinstance(x, (bool, int, float, np.number, np.bool_)):
        return torch.tensor(x), None
    raise DtypeError(f"{op}: argument {arg!r} must be a tensor (torch, numpy or tessera), "
                     f"got {type(x).__name__}")


def _foreign(d: OpDef, values: tuple[Any, ...]) -> Any:
    """The general path: convert every tensor argument, run, convert the result back;
    tessera tensors on a device run the op there (ops/device.py)."""
    dev = device_of(x for v in values for x in (v if isinstance(v, (list, tuple)) else (v,)))
    if dev is not None:
        pairs = list(zip(d.args, values, strict=True))
        return on_device(d.name, d.impl, dev, [v for a, v in pairs if not a.kwarg_only],
                         {a.name: v for a, v in pairs if a.kwarg_only})
    kind = None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for a, v in zip(d.args, values, strict=True):
        if a.is_tensor and v is not None:
            if a.type.startswith("List"):
                if not isinstance(v, (list, tuple)):
                    raise DtypeError(f"{d.name}: argument {a.name!r} must be a list of "
                                     f"tensors, got {type(v).__name__}")
                pairs = [to_torch(x, d.name, f"{a.name}[{i}]") for i, x in enumerate(v)]
                v = [t for t, _ in pairs]
                kind = kind or next((k for _, k in pairs if k), None)
            else:
                v, k = to_torch(v, d.name, a.name)
                kind = kind or k
        if a.kwarg_only:
            kwargs[a.name] = v
        else:
            args.append(v)
    return _give_back(d.impl(*args, **kwargs), kind, d.name)


def _give_back(out: Any, kind: str | None, op: str) -> Any:
    if isinstance(out, (tuple, list)):
        return type(out)(_give_back(o, kind, op) for o in out)
    if not isinstance(out, _T) or kind in ("torch", None):
        return out
    if kind == "tessera":
        return as_tensor(out)
    if out.dtype == torch.bfloat16:
        raise DtypeError(f"{op}: the result is bfloat16, which numpy cannot hold",
                         hint="pass torch tensors to get a bfloat16 result")
    return out.numpy()
