"""`@tl.autotune`: pick the fastest of several constexpr configurations of a kernel by
timing them on the real arguments, once per tuning key, and remember the winner in
memory and in this machine's knowledge base (kind "autotune", with every config's
timing), so the next process does not tune again and `tessera tune show/export` see it.
A record made for other configs or another version of the kernel's source is never
trusted: the kernel is tuned again and the record replaced."""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tessera.errors import TesseraError
from tessera.lang.errors import LaunchError
from tessera.lang.jit import Kernel, _tensor_arg
from tessera.runtime import knowledge

__all__ = ["KIND", "Autotuner", "Config", "autotune"]

KIND = "autotune"  # the knowledge records: key "module.kernel|tuning key"


class Config:
    """One candidate: values for some of the kernel's constexpr parameters."""

    def __init__(self, **constexprs: Any):
        self.kwargs = dict(sorted(constexprs.items()))

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.kwargs == other.kwargs

    def __hash__(self) -> int:
        return hash(tuple(self.kwargs.items()))


class Autotuner:
    """A kernel with candidate configs; launch it as `k[grid](*args)` without the tuned
    constexprs. A grid callable receives them: `grid=lambda meta: (cdiv(n, meta["B"]),)`."""

    def __init__(self, kernel: Kernel, configs: Sequence[Config], key: Sequence[str],
                 restore: Sequence[str], warmup: int, rep: int):
        self.kernel, self.configs, self.key = kernel, list(configs), list(key)
        self.restore, self.warmup, self.rep = list(restore), warmup, rep
        names = set(kernel.names)
        for name in [*self.key, *self.restore,
                     *(k for c in self.configs for k in c.kwargs)]:
            if name not in names:
                raise LaunchError(f"autotune of {kernel.__name__}: {name!r} is not one of its "
                                  f"parameters {kernel.names}", where=kernel.where)
        for c in self.configs:
            bad = set(c.kwargs) - kernel.constexprs
            if bad:
                raise LaunchError(f"autotune of {kernel.__name__}: {sorted(bad)} in {c} are "
                                  "not tl.constexpr parameters", where=kernel.where)
        if not self.configs:
            raise LaunchError(f"autotune of {kernel.__name__} needs at least one config",
                              where=kernel.where)
        self.best: dict[tuple, Config] = {}
        self.timings: dict[tuple, dict[Config, float]] = {}
        self.__name__, self.__doc__ = kernel.__name__, kernel.__doc__

    def __repr__(self) -> str:
        return f"<autotuned {self.kernel!r} over {len(self.configs)} configs>"

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            config = self.config_for(grid, args, kwargs)
            self.kernel[grid](*args, **kwargs, **config.kwargs)
        return launch

    def config_for(self, grid: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Config:
        """The best config for these arguments, tuning first if they are new."""
        tuned = {k for c in self.configs for k in c.kwargs}
        given = tuned & set(kwargs)
        if given:
            raise LaunchError(f"{self.__name__} is autotuned over {sorted(tuned)}; do not "
                              f"pass {sorted(given)} yourself", where=self.kernel.where)
        first = {**kwargs, **self.configs[0].kwargs}
        values = self.kernel.bind(args, first)
        key = tuple(_key_part(values[name]) for name in self.key)
        best = self.best.get(key)
        if best is None:
            best = self.best[key] = self._load_or_tune(key, grid, args, kwargs, values)
        return best

    # -- tuning ---------------------------------------------------------------------------
    def _record_key(self, key: tuple) -> str:
        fn = self.kernel.fn
        return f"{fn.__module__}.{fn.__qualname__}|{key!r}"

    def _identity(self) -> dict[str, Any]:
        """What a record must have been made for: this source and these configs."""
        source = inspect.getsource(self.kernel.fn)
        return {"source": hashlib.sha256(source.encode()).hexdigest()[:16],
                "configs": [repr(c) for c in self.configs]}

    def _load_or_tune(self, key: tuple, grid: Any, args: Sequence[Any],
                      kwargs: dict[str, Any], values: dict[str, Any]) -> Config:
        identity = self._identity()
        record = knowledge.load(KIND, self._record_key(key))
        if record is not None and all(record.get(k) == v for k, v in identity.items()):
            try:
                best = Config(**record["best"])
                timings = {Config(**c): float(t) for c, t in record["timings"]}
            except (KeyError, TypeError, ValueError):
                best, timings = None, {}
            if best in self.configs and set(timings) <= set(self.configs):
                self.timings[key] = timings
                return best
        timings = self._tune(grid, args, kwargs, values)
        winner = min(timings, key=timings.__getitem__)
        knowledge.store(KIND, self._record_key(key), {
            **identity, "best": winner.kwargs,
            "timings": [[c.kwargs, t] for c, t in timings.items()]})
        return winner

    def _tune(self, grid: Any, args: Sequence[Any], kwargs: dict[str, Any],
              values: dict[str, Any]) -> dict[Config, float]:
        saved = [_snapshot(values[name], name) for name in self.restore]
        device = _device(values)
        timings: dict[Config, float] = {}
        errors: list[TesseraError] = []
        for config in self.configs:
            launch_kwargs = {**kwargs, **config.kwargs}
            try:
                times = []
                for i in range(self.warmup + self.rep):
                    start = time.perf_counter()
                    self.kernel.launch(grid, args, launch_kwargs)
                    if device is not None:
                        device.synchronize()  # time the kernel, not its enqueue
                    if i >= self.warmup:
                        times.append(time.perf_counter() - start)
                    for restore in saved:
                        restore()
            except TesseraError as e:  # e.g. a tile too large for this config: skip it
                errors.append(e)
                continue
            timings[config] = statistics.median(times)
        if not timings:
            raise errors[0]
        self.timings[tuple(_key_part(values[n]) for n in self.key)] = timings
        return timings


def _key_part(value: Any) -> Any:
    """What of an argument decides the best config: a tensor's dtype and shape (and its
    device, if not the host), a value."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        part = str(getattr(value, "dtype", "")), tuple(shape)
        device = getattr(value, "device", None)
        return (*part, device.name) if getattr(device, "is_host", True) is False else part
    return value


def _device(values: dict[str, Any]) -> Any:
    """The device the tensor arguments are on, None for host memory."""
    for name, v in values.items():
        arg = _tensor_arg(v, name)
        if arg is not None and arg.device is not None:
            return arg.device
    return None


def _snapshot(value: Any, name: str) -> Callable[[], None]:
    """A function that puts the bytes of tensor `value` back as they are now."""
    arg = _tensor_arg(value, name)
    if arg is None:
        raise LaunchError(f"autotune restore={name!r} names a non-tensor argument")
    lo, hi, device = arg.lo, arg.hi, arg.device
    if device is not None:  # device memory: the host cannot touch its addresses
        saved = device.read(lo, hi - lo)
        return lambda: device.write(lo, saved)
    data = ctypes.string_at(lo, hi - lo)
    return lambda: ctypes.memmove(lo, data, hi - lo)


def autotune(configs: Iterable[Config | dict[str, Any]], key: Sequence[str] = (),
             restore: Sequence[str] = (), warmup: int = 1, rep: int = 5
             ) -> Callable[[Kernel], Autotuner]:
    """Decorate a `@tl.kernel` to choose among `configs` by timing. `key` names the
    arguments whose values (tensors: dtype and shape) decide the choice; `restore` names
    tensors the kernel updates in place, put back after every timed run."""
    configs = [c if isinstance(c, Config) else Config(**c) for c in configs]

    def wrap(k: Kernel) -> Autotuner:
        if not isinstance(k, Kernel):
            raise LaunchError("@tl.autotune goes above @tl.kernel",
                              hint="@tl.autotune(configs=[...], key=[...])\n@tl.kernel\ndef ...")
        return Autotuner(k, configs, key, restore, warmup, rep)
    return wrap
