"""Suite `models`: the zoo's models (tessera.bench.zoo, "small" size) compiled with
torch.compile(backend="tessera") against torch eager and Inductor, each at batch x seq
1x32 and 8x128 (for the CNN: that many images of seq x seq pixels) and, for the language
models, a 1-token decode step against a 256-token KV cache, and a decode loop whose cache
grows: each call one token against the next length of a cycle over 64..510 (shapes change
every step, as in generation; dynamic shapes for both compilers). The MoE LM's decode step
also runs with int8 and int4 weights (options={"quantize": ...}) against float eager.

Besides latency (outputs checked to agree first), rows carry what a compiler costs and
saves: on the 1x32 cases, the cold and warm compile time of Tessera and Inductor (each in
fresh processes: cold with empty compile caches, warm with the caches the cold one left;
time of the calls until the compiled model runs at its steady speed, minus that speed);
on every case, Tessera's planned arena and the sum of the intermediates it packs
(`memplan`), and eager's peak of live activations (every tensor torch ops return during
the forward, counted until freed). `--quick`: Tessera and eager only, 1x32 and decode,
compile time in-process (caches as they are).

Inductor compiles `own_code(model)`: the same modules and weights behind a top-level
forward with a code object of its own. Dynamo keeps state per code object whatever the
backend: a frame one backend gave up on (Inductor, at the MoE LM's graph break inside its
loop over blocks) is skipped for every backend, and the tessera-compiled model would then
run that forward eagerly with its blocks compiled one by one (17 graphs instead of 1).
Each case checks that Tessera still runs the graphs it compiled after Inductor ran.

Goals (issue 13): 1.5x eager and 1.3x Inductor at 1x32; 1.1x eager at 8x128; MoE LM decode
3x eager (int4: 6x); cold compile at most 25% of Inductor's; warm start under 1 s; arena
at most 50% of the intermediates."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import weakref
from collections.abc import Callable
from functools import cache
from typing import Any

from tessera.bench.runner import BenchError, Case

__all__ = ["cases", "compile_seconds", "own_code", "peak_activation_bytes"]

SIZE = "small"
SHAPES = ((1, 32), (8, 128))  # batch x seq
CACHE_LEN = 256  # the decode step's KV cache
GROW = range(64, 511)  # the decode loop's cache lengths, cycled
TOL = 1e-3  # float32 through a few layers, against eager
QUANT_TOL = 0.15  # relative error of a weight-only int8/int4 model's outputs


def cases(quick: bool) -> list[Case]:
    from tessera.bench import zoo

    out = []
    for name in zoo.MODELS:
        z = zoo.build(name, SIZE)
        for batch, seq in SHAPES[:1] if quick else SHAPES:
            out.append(_case(z, f"{name}_{batch}x{seq}", z.inputs(batch, seq), quick,
                             (batch, seq) if (batch, seq) == SHAPES[0] else None))
        if z.is_lm:
            out.append(_case(z, f"{name}_decode_c{CACHE_LEN}", z.decode(1, CACHE_LEN), quick,
                             None))
            out.append(_growing(z, quick))
    moe = zoo.build("moe_lm", SIZE)
    for bits in ("int8", "int4"):  # weight-only quantized, against float eager
        out.append(_case(moe, f"moe_lm_{bits}_decode_c{CACHE_LEN}", moe.decode(1, CACHE_LEN),
                         True, None, {"quantize": bits}))
    return out


def _growing(z: Any, quick: bool) -> Case:
    """One decode step per call, each against the next cache length of GROW (views of
    one buffer's prefix, contiguous), so no two nearby calls share shapes."""
    import itertools

    import torch

    from tessera.bench.zoo import param_count

    ids, keys, values = z.decode(1, GROW[-1])

    def caches(n: int) -> tuple[Any, Any]:
        shape = (*keys.shape[:3], n, keys.shape[4])
        return tuple(t.reshape(-1)[:math.prod(shape)].view(shape) for t in (keys, values))

    model = z.model
    compiled = {"tessera": torch.compile(model, backend="tessera"), "torch_eager": model}
    if not quick:
        compiled["torch_inductor"] = torch.compile(own_code(model))
    impls: dict[str, Callable[[], Any]] = {}
    for name, fn in compiled.items():
        lengths = itertools.cycle(GROW)
        impls[name] = lambda fn=fn, lengths=lengths: fn(ids, *caches(next(lengths)))

    def run(impl: Callable[[], Any]) -> Any:
        with torch.no_grad():
            return impl()

    def check() -> None:
        torch._dynamo.reset()
        for _ in range(4):  # static, then dynamic: interpreted, recorded, replayed
            outs = {k: _tensors(run(f)) for k, f in impls.items()}
            for k, got in outs.items():
                for g, w in zip(got, outs["torch_eager"], strict=True):
                    torch.testing.assert_close(g, w, atol=TOL, rtol=TOL,
                                               msg=lambda m, n=k: f"{n}: {m}")

    return Case(f"{z.name}_decode_grow", {k: (lambda f=f: run(f)) for k, f in impls.items()},
                check=check, meta={"params_m": round(param_count(model) / 1e6, 2)})


def _case(z: Any, name: str, args: tuple[Any, ...], quick: bool,
          compile_shape: tuple[int, int] | None, options: dict[str, Any] | None = None
          ) -> Case:
    """`options` (the compiler's): a quantized model is checked by its relative error
    against float eager (at most QUANT_TOL) and against no other compiler."""
    import torch

    from tessera.bench.zoo import param_count
    from tessera.graph import compiled

    model = z.model
    ours = torch.compile(model, backend="tessera", dynamic=False, options=options)
    impls: dict[str, Callable[[], Any]] = {
        "tessera": lambda: ours(*args), "torch_eager": lambda: model(*args)}
    if not quick:
        inductor = torch.compile(own_code(model), dynamic=False)
        impls["torch_inductor"] = lambda: inductor(*args)
    state: dict[str, Any] = {}

    def run(impl: Callable[[], Any]) -> Any:
        with torch.no_grad():
            return impl()

    def check() -> None:
        # a fresh dynamo: every case compiles the same forward code at another shape,
        # and dynamo stops compiling a code object after 8 versions
        torch._dynamo.reset()
        want = _tensors(run(impls["torch_eager"]))
        before = {id(e) for e in compiled()}
        start = time.perf_counter()
        got = run(impls["tessera"])
        state["first_call_s"] = time.perf_counter() - start
        state["executables"] = [e for e in compiled() if id(e) not in before]
        for impl_name, impl in impls.items():
            got = _tensors(got if impl_name == "tessera" else run(impl))
            for g, w in zip(got, want, strict=True):
                if options and options.get("quantize"):
                    error = float((g - w).norm() / w.norm())
                    assert error <= QUANT_TOL, f"{impl_name}: relative error {error:.3g}"
                    continue
                torch.testing.assert_close(g, w, atol=TOL, rtol=TOL,
                                           msg=lambda m, n=impl_name: f"{n}: {m}")
        # after the other compilers ran, Tessera still runs the graphs it compiled
        ours_now = {id(e) for e in compiled()}
        run(impls["tessera"])
        again = [e for e in compiled() if id(e) not in ours_now]
        assert not again, (f"tessera compiled {len(again)} more graphs after the other "
                           "compilers ran: dynamo state leaked between them")
        state["peak"] = peak_activation_bytes(model, args)

    def extra(impl: str, median_s: float) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if impl == "torch_eager":
            metrics["peak_act_mb"] = state["peak"] / 2**20
        if impl == "tessera":
            metrics.update(_plan_metrics(state["executables"]))
            if quick:
                metrics["compile_s"] = max(state["first_call_s"] - median_s, 0.0)
        if compile_shape is not None and not quick and impl != "torch_eager":
            backend = "tessera" if impl == "tessera" else "inductor"
            cold, warm = compile_seconds(z.name, backend, *compile_shape)
            metrics.update(compile_cold_s=cold, compile_warm_s=warm)
        return metrics

    def timed(impl: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: run(impl)

    return Case(name, {k: timed(v) for k, v in impls.items()}, check=check, extra=extra,
                meta={"params_m": round(param_count(model) / 1e6, 2)})


def own_code(model: Any) -> Any:
    """`model` (same modules, same weights) as an instance of a subclass whose forward is
    a copy of its class's with a code object of its own: dynamo's per-code state (cache
    entries, frames marked skipped, recompile counts) then differs from the original's,
    so a second compiler of the same model starts as clean as the first."""
    import copy

    cls = type(model)
    fn = cls.forward
    forward = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
    forward.__kwdefaults__, forward.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
    own = copy.copy(model)  # shares submodules, parameters and buffers
    own.__class__ = type(cls.__name__, (cls,), {"forward": forward,
                                                "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__})
    return own


def _tensors(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _plan_metrics(executables: list[Any]) -> dict[str, float]:
    """Tessera's memory plan over the case's executables (the latest plan of each): arena
    and intermediates in MiB, native launches and Python steps per call."""
    arena = total = launches = python = 0
    for ex in executables:
        plans = [p for p in ex.plans.values() if p is not None]
        if not plans:
            continue
        p = plans[-1]
        arena += p.memory.arena_bytes
        total += p.memory.total_bytes
        launches += sum(s.last - s.first for s in p.steps if s.node is None)
        python += sum(s.node is not None for s in p.steps)
    if not any(ex.plans for ex in executables):
        return {}
    return {"arena_mb": arena / 2**20, "intermediates_mb": total / 2**20,
            "launches": launches, "py_steps": python}


def peak_activation_bytes(model: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """Eager's peak of live activations over one forward: bytes of the storages torch
    ops return (parameters and inputs excluded), each counted from its op until freed."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    live: dict[int, int] = {}
    peak = [0, 0]  # current, highest

    def freed(key: int) -> None:
        peak[0] -= live.pop(key, 0)

    known = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
    if isinstance(model, torch.nn.Module):
        known |= {t.untyped_storage().data_ptr()
                  for t in (*model.parameters(), *model.buffers())}

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, a: Any = (), kw: Any = None
                               ) -> Any:
            out = func(*a, **(kw or {}))
            for t in _tensors(out):
                if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                    continue
                s = t.untyped_storage()
                key = id(s)
                if key in live or s.data_ptr() in known or s.nbytes() == 0:
                    continue
                live[key] = s.nbytes()
                peak[0] += s.nbytes()
                peak[1] = max(peak[1], peak[0])
                weakref.finalize(s, freed, key)
            return out

    with torch.no_grad(), Live():
        result = model(*args)
    del result
    return peak[1]


@cache
def compile_seconds(model: str, backend: str, batch: int, seq: int) -> tuple[float, float]:
    """(cold, warm) compile seconds of zoo `model` at batch x seq under `backend`
    ("tessera" or "inductor"): two fresh processes sharing compile caches that start
    empty."""
    with tempfile.TemporaryDirectory(prefix="tessera-bench-compile-") as d:
        env = dict(os.environ, TESSERA_CACHE_DIR=os.path.join(d, "tessera"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(d, "inductor"))
        cmd = [sys.executable, "-m", "tessera.bench.models", model, backend, str(batch),
               str(seq)]
        times = []
        for _ in range(2):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800,
                                  check=False)
            if done.returncode != 0:
                raise BenchError(f"compile-time child for {model} under {backend} failed:\n"
                                 f"{done.stderr[-2000:]}")
            times.append(json.loads(done.stdout.strip().splitlines()[-1])["compile_s"])
    return times[0], times[1]


def _child(model: str, backend: str, batch: int, seq: int) -> float:
    """In a fresh process: seconds from the first call of the compiled model until it runs
    at its steady speed (calls until then, minus that many steady calls)."""
    import warnings

    import torch

    from tessera.bench import zoo

    warnings.simplefilter("ignore")
    z = zoo.build(model, SIZE)
    args = z.inputs(batch, seq)
    f = torch.compile(z.model, backend="tessera" if backend == "tessera" else "inductor",
                      dynamic=False)
    with torch.no_grad():
        first = []
        for _ in range(3):  # Tessera records a signature on its second call
            start = time.perf_counter()
            f(*args)
            first.append(time.perf_counter() - start)
        steady = []
        for _ in range(5):
            start = time.perf_counter()
            f(*args)
            steady.append(time.perf_counter() - start)
    return max(sum(first) - len(first) * statistics.median(steady), 0.0)


if __name__ == "__main__":
    name, backend_name, b, s = sys.argv[1:5]
    print(json.dumps({"compile_s": _child(name, backend_name, int(b), int(s))}))
