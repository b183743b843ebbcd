"""Run an unmodified PyTorch script written for a GPU on this machine (`tessera run`).

    with Migration() as m:          # or: python -m tessera.tools.migrate script.py [args]
        ...GPU code...
    print(m.report.summary())

While a `Migration` is installed, requests for CUDA go to the CPU and to Tessera:

- device arguments: `device="cuda"` / `torch.device("cuda:1")` / an int ordinal in any torch
  function, `Tensor.to("cuda")`, `.cuda()` (tensors and modules), `torch.set_default_device`
  become the CPU (a TorchFunctionMode: the torch API boundary, so factories, `.to` and
  `Module.to` are all seen); `pin_memory()` and `record_stream()` do nothing (CPU memory);
- `torch.compile` without a backend compiles with backend="tessera" (`mode=`/`options=` are
  inductor's and are dropped, said so); an explicit backend is kept and reported;
- `torch.cuda`: `is_available()` is True for the script (so it takes the path it was written
  for, which then lands here) while torch's and Tessera's own code still see the truth;
  `device_count()` 1, `synchronize` is `tessera.synchronize`, seeds and RNG states are the
  CPU generator's (it now makes the "cuda" tensors), `Event(enable_timing=True)` and
  `Stream` are Tessera's events on the inline default stream (torch's CPU ops run in order on
  the calling thread, so every stream is that one), memory statistics are the process's
  resident memory (VmRSS, and VmHWM as the peak), device name/properties are the CPU's;
- `torch.autocast("cuda")` / `torch.cuda.amp.autocast()` / GradScaler run on the CPU
  (an autocast without a dtype takes the CPU's bfloat16);
- `init_process_group("nccl")` (or no backend) and `new_group(backend="nccl")` use the
  "tessera" collectives backend; `device_id=` is dropped; DistributedDataParallel on a CPU
  module drops `device_ids`/`output_device`.

A CUDA API with no CPU meaning (raw stream handles, CUDA graphs, IPC, capability numbers,
...) raises a `MigrationError` naming it and the script's line, and is listed in the
summary. The report also counts what fell back: ops the tessera backend ran through torch
(its "no lowering" warnings), native plans that fell back node by node, dynamo graph breaks.
The mode is per thread (torch keeps the mode stack per thread): threads the script starts
itself do not see the device redirection. Everything is undone on exit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch.overrides import TorchFunctionMode

from tessera.errors import TesseraError
from tessera.runtime.stream import Event, Stream, current_stream, synchronize
from tessera.runtime.stream import stream as use_stream
from tessera.tools.script import run_as_main, script_path

__all__ = ["Migration", "MigrationError", "MigrationReport", "main", "run_script"]


class MigrationError(TesseraError, RuntimeError):
    """A CUDA API with no CPU counterpart was called, or migration was misused."""


# --------------------------------------------------------------------------- the report


@dataclass
class MigrationReport:
    """What a migration did: counts per kind of redirection, choices of the script it kept,
    what fell back to torch, and the CUDA APIs it could not map (with the first call site)."""

    redirected: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    unsupported: Counter[str] = field(default_factory=Counter)
    sites: dict[str, str] = field(default_factory=dict)

    def summary(self, prefix: str = "") -> str:
        """The report as text, one line per kind with its count."""
        lines = [f"{prefix}tessera run: what was migrated"]
        sections = (("redirected", self.redirected), ("kept as written", self.kept),
                    ("fell back", self.fallbacks),
                    ("unsupported (raised MigrationError)", self.unsupported))
        for title, counts in sections:
            if not counts:
                continue
            lines.append(f"{prefix}  {title}:")
            for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                site = f"  (first at {self.sites[kind]})" if kind in self.sites else ""
                lines.append(f"{prefix}    {n:6d}  {kind}{site}")
        if len(lines) == 1:
            lines.append(f"{prefix}  nothing: the script made no CUDA request")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON-ready)."""
        return {"redirected": dict(self.redirected), "kept": dict(self.kept),
                "fallbacks": dict(self.fallbacks), "unsupported": dict(self.unsupported),
                "sites": dict(self.sites)}


# --------------------------------------------------------------------------- call sites

_OWN_PACKAGES = ("torch", "tessera")


def _internal(depth: int) -> bool:
    """True if the function `depth` frames up was called from torch's or Tessera's own code:
    those callers get the real torch.cuda, so torch's internals keep working."""
    name = sys._getframe(depth + 1).f_globals.get("__name__", "")
    return name.split(".", 1)[0] in _OWN_PACKAGES


def _user_site() -> str:
    """file:line of the innermost frame outside torch and Tessera: the script's line."""
    frame = sys._getframe(1)
    while frame is not None and \
            frame.f_globals.get("__name__", "").split(".", 1)[0] in _OWN_PACKAGES:
        frame = frame.f_back
    return "<unknown>" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _is_cuda(device: Any) -> bool:
    """A CUDA device request: "cuda", "cuda:N", torch.device("cuda"), or an int ordinal."""
    if isinstance(device, str):
        return device.split(":", 1)[0].strip() == "cuda"
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_for(report: MigrationReport, device: Any, kind: str) -> Any:
    """"cpu" for a CUDA device request (counted under `kind`), else `device` unchanged."""
    if not _is_cuda(device):
        return device
    report.redirected[kind] += 1
    return "cpu"


# --------------------------------------------------------------------------- device mode

_DEVICE = "cuda device arguments -> cpu (factories, .to, Module.to)"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __init__(self, report: MigrationReport):
        super().__init__()
        self.report = report

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _METHODS:  # one set lookup on the path every other call takes
            if func is torch.Tensor.to:
                if len(args) > 1 and _is_cuda(args[1]):
                    args = (args[0], _cpu_for(self.report, args[1], _DEVICE), *args[2:])
            else:
                self.report.redirected[_METHODS[func]] += 1
                if func is torch.Tensor.record_stream:
                    return None
                rest = {k: v for k, v in kwargs.items()
                        if k in ("non_blocking", "memory_format")}
                return args[0].to(**rest) if rest else args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _cpu_for(self.report, kwargs["device"], _DEVICE)}
        return func(*args, **kwargs)


# Tensor methods the mode looks at (besides device= arguments), and what each becomes
_METHODS: dict[Any, str] = {
    torch.Tensor.to: _DEVICE,
    torch.Tensor.cuda: "Tensor.cuda() -> stays on the cpu",
    torch.Tensor.pin_memory: "pin_memory() -> no-op (cpu memory)",
    torch.Tensor.record_stream: "record_stream() -> no-op (one inline stream)",
}


# --------------------------------------------------------------------------- torch.cuda


class CpuStream(Stream):
    """What `torch.cuda.Stream()` becomes: torch's CPU ops run in order on the calling thread,
    so every stream is the inline default stream; waits and events between them hold."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        _note("torch.cuda.Stream -> the inline cpu stream")
        inline = current_stream("cpu")
        self.device, self.name, self._worker = inline.device, "cuda stream (inline)", None
        self.queue = None
        self.priority = priority

    @property
    def cuda_stream(self) -> int:
        raise _unsupported("torch.cuda.Stream.cuda_stream",
                           "a raw cudaStream_t handle exists only on a GPU; pass the stream "
                           "object itself (its work runs inline, in order)")


class CpuEvent(Event):
    """What `torch.cuda.Event()` becomes: a Tessera event; recorded on the inline stream it
    stamps the time at once, so `elapsed_time` is the CPU time between two records."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False,
                 interprocess: bool = False):
        if interprocess:
            raise _unsupported("torch.cuda.Event(interprocess=True)",
                               "events shared between processes need CUDA IPC; synchronize "
                               "ranks with torch.distributed.barrier() instead")
        _note("torch.cuda.Event -> tessera.Event")
        super().__init__(enable_timing=enable_timing)

    def ipc_handle(self) -> Any:
        raise _unsupported("torch.cuda.Event.ipc_handle", "CUDA IPC does not exist on the "
                           "CPU; synchronize ranks with torch.distributed.barrier()")


@dataclass(frozen=True)
class CpuProperties:
    """What `torch.cuda.get_device_properties()` becomes: the CPU's."""

    name: str
    total_memory: int
    multi_processor_count: int
    is_integrated: bool = True
    type: str = "cpu"


# the active migration's report, where the module-level stand-ins record what they did
_active: list[MigrationReport] = []


def _note(kind: str) -> None:
    """Count a redirection in the active migration's report (if one is installed)."""
    if _active:
        _active[-1].redirected[kind] += 1


def _refuse(api: str, hint: str, *args: Any, **kwargs: Any) -> Any:
    raise _unsupported(api, hint)


def _unsupported(api: str, hint: str) -> MigrationError:
    """Record a call of an unmappable CUDA API and make the error that says so."""
    site = _user_site()
    if _active:
        _active[-1].unsupported[api] += 1
        _active[-1].sites.setdefault(api, site)
    return MigrationError(f"{api} has no CPU counterpart under tessera run", where=site,
                          hint=hint)


def _status_bytes(key: str, path: str = "/proc/self/status") -> int:
    """A `key: N kB` line of a /proc file, in bytes (0 where /proc has none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss(device: Any = None) -> int:
    return _status_bytes("VmRSS")


def _peak_rss(device: Any = None) -> int:
    return _status_bytes("VmHWM")


def _reset_peak(device: Any = None) -> None:
    """Reset the peak resident size (Linux: `echo 5 > /proc/self/clear_refs`)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _memory_stats(device: Any = None) -> dict[str, int]:
    now, peak = _rss(), _peak_rss()
    return {f"{kind}_bytes.all.{which}": value
            for kind in ("allocated", "reserved", "active")
            for which, value in (("current", now), ("peak", peak))}


def _memory_summary(device: Any = None, abbreviated: bool = False) -> str:
    return (f"cpu memory (process resident set): current {_rss() / 2**20:.1f} MiB, "
            f"peak {_peak_rss() / 2**20:.1f} MiB")


def _mem_get_info(device: Any = None) -> tuple[int, int]:
    return (_status_bytes("MemAvailable", "/proc/meminfo"),
            _status_bytes("MemTotal", "/proc/meminfo"))


def _cpu_properties(device: Any = None) -> CpuProperties:
    import tessera

    props = tessera.device("cpu").properties(measure=False)
    return CpuProperties(props["model"], _status_bytes("MemTotal", "/proc/meminfo"),
                         props["cores"])


def _cuda_stream_context(s: Any) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if s is None else use_stream(s)


def _current_stream(device: Any = None) -> Stream:
    s = current_stream("cpu")
    return s if isinstance(s, CpuStream) else _DEFAULT_STREAM


_DEFAULT_STREAM = CpuStream()


class _Nvtx:
    """torch.cuda.nvtx ranges as torch profiler ranges (record_function)."""

    def __init__(self) -> None:
        self.stack: list[Any] = []

    def range_push(self, msg: str) -> int:
        rf = torch.autograd.profiler.record_function(msg)
        rf.__enter__()
        self.stack.append(rf)
        return len(self.stack) - 1

    def range_pop(self) -> int:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)
        return len(self.stack)

    @staticmethod
    def range(msg: str, *args: Any, **kwargs: Any) -> Any:
        return torch.autograd.profiler.record_function(msg.format(*args, **kwargs))

    @staticmethod
    def mark(msg: str) -> None:
        return None


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _cuda_equivalents() -> dict[str, tuple[str, Callable[..., Any]]]:
    """torch.cuda name -> (what it becomes, the stand-in)."""
    import tessera

    def seed(s: int) -> None:
        torch.manual_seed(s)

    return {
        "is_available": ("True for the script", lambda: True),
        "is_initialized": ("True for the script", lambda: True),
        "device_count": ("1 (the cpu)", lambda: 1),
        "current_device": ("0 (the cpu)", lambda: 0),
        "set_device": ("no-op (one cpu device)", _no_op),
        "init": ("no-op", _no_op),
        "ipc_collect": ("no-op", _no_op),
        "set_sync_debug_mode": ("no-op", _no_op),
        "set_stream": ("no-op (one inline stream)", _no_op),
        "set_per_process_memory_fraction": ("no-op", _no_op),
        "synchronize": ("tessera.synchronize()", lambda device=None: synchronize("cpu")),
        "manual_seed": ("torch.manual_seed (cpu generator)", seed),
        "manual_seed_all": ("torch.manual_seed (cpu generator)", seed),
        "seed": ("torch.seed (cpu generator)", lambda: torch.seed()),
        "seed_all": ("torch.seed (cpu generator)", lambda: torch.seed()),
        "initial_seed": ("torch.initial_seed (cpu generator)", torch.initial_seed),
        "get_rng_state": ("cpu generator state", lambda device="cuda": torch.get_rng_state()),
        "set_rng_state": ("cpu generator state",
                          lambda state, device="cuda": torch.set_rng_state(state)),
        "get_rng_state_all": ("cpu generator state", lambda: [torch.get_rng_state()]),
        "set_rng_state_all": ("cpu generator state",
                              lambda states: torch.set_rng_state(states[0])),
        "device": ("no-op context (one cpu device)", lambda device: contextlib.nullcontext()),
        "device_of": ("no-op context (one cpu device)", lambda obj: contextlib.nullcontext()),
        "stream": ("the inline cpu stream", _cuda_stream_context),
        "current_stream": ("the inline cpu stream", _current_stream),
        "default_stream": ("the inline cpu stream", lambda device=None: _DEFAULT_STREAM),
        "empty_cache": ("tessera.empty_cache()", lambda: tessera.empty_cache()),
        "memory_allocated": ("process resident memory", _rss),
        "memory_reserved": ("process resident memory", _rss),
        "max_memory_allocated": ("peak process resident memory", _peak_rss),
        "max_memory_reserved": ("peak process resident memory", _peak_rss),
        "reset_peak_memory_stats": ("peak resident memory reset", _reset_peak),
        "reset_max_memory_allocated": ("peak resident memory reset", _reset_peak),
        "reset_accumulated_memory_stats": ("no-op", _no_op),
        "memory_stats": ("process resident memory", _memory_stats),
        "memory_summary": ("process resident memory", _memory_summary),
        "mem_get_info": ("system memory (/proc/meminfo)", _mem_get_info),
        "get_device_name": ("the cpu's model name",
                            lambda device=None: _cpu_properties().name),
        "get_device_properties": ("the cpu's properties", _cpu_properties),
        "is_bf16_supported": ("True (cpu bfloat16)", lambda including_emulation=True: True),
        "is_tf32_supported": ("False (no tf32 on the cpu)", lambda: False),
        "is_current_stream_capturing": ("False (no CUDA graph capture)", lambda: False),
        "get_arch_list": ("[] (no CUDA architectures)", lambda: []),
        "get_sync_debug_mode": ("0", lambda: 0),
        "memory_cached": ("process resident memory", _rss),
        "max_memory_cached": ("peak process resident memory", _peak_rss),
        "reset_max_memory_cached": ("peak resident memory reset", _reset_peak),
    }


_UNSUPPORTED_HINTS = {
    "get_device_capability": "a compute capability is a GPU's; test for the feature you need "
                             "(e.g. torch.cuda.is_bf16_supported()) instead",
    "CUDAGraph": "CUDA graphs capture GPU launches; torch.compile(model) (backend tessera) "
                 "already replays a recorded plan natively",
    "graph": "CUDA graphs capture GPU launches; torch.compile(model) (backend tessera) "
             "already replays a recorded plan natively",
    "make_graphed_callables": "CUDA graphs capture GPU launches; use torch.compile(model)",
    "ExternalStream": "a stream made from a raw cudaStream_t exists only on a GPU; use "
                      "torch.cuda.Stream()",
}
_UNSUPPORTED_CLASSES = ("CUDAGraph", "graph", "ExternalStream", "MemPool", "GreenContext",
                        "CUDAPluggableAllocator")


def _unsupported_names(mapped: set[str]) -> list[str]:
    """torch.cuda's own public functions and GPU-only classes that have no stand-in."""
    names = []
    for name in dir(torch.cuda):
        obj = getattr(torch.cuda, name)
        if name.startswith("_") or name in mapped:
            continue
        own = getattr(obj, "__module__", "") or ""
        if (callable(obj) and not isinstance(obj, type) and own.startswith("torch.cuda")) \
                or name in _UNSUPPORTED_CLASSES:
            names.append(name)
    return names


# --------------------------------------------------------------------------- fallbacks

_NO_LOWERING = re.compile(r"^tessera: no lowering for (.*?): these run through torch")
_COUNTED = re.compile(r"^(.*?)(?: \(x(\d+)\))?$")


def _count_fallback(report: MigrationReport, message: str) -> None:
    """Count a tessera backend warning: ops it ran through torch, or a plan run node by node."""
    m = _NO_LOWERING.match(message)
    if m:
        for item in m.group(1).split(", "):
            name, n = _COUNTED.match(item).groups()  # type: ignore[union-attr]
            report.fallbacks[f"op run through torch in a compiled graph: {name}"] += \
                int(n or 1)
    elif message.startswith("tessera: the native"):
        report.fallbacks["compiled graph ran node by node (native plan did not "
                         "reproduce the recorded run)"] += 1


def _graph_breaks() -> Counter[str]:
    if "torch._dynamo" not in sys.modules:
        return Counter()
    from torch._dynamo.utils import counters

    return Counter(counters["graph_break"])


# --------------------------------------------------------------------------- compile


_TRAINING = ("graph that needs gradients (training) run by torch: the tessera backend "
             "compiles inference graphs")


def _tessera_outside_mode(gm: torch.fx.GraphModule, example_inputs: list[Any],
                          **options: Any) -> Callable[..., Any]:
    """The "tessera" backend, its compiled graphs run with torch function modes off: dynamo
    traced the device mode into the graph already, and the executable's own tensor calls
    (strides, data pointers, outputs) need not pass through it on every call. A graph that
    needs gradients runs as dynamo traced it (torch), counted as a fallback."""
    from tessera.graph.backend import tessera

    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in example_inputs):
        if _active:
            _active[-1].fallbacks[_TRAINING] += 1
        return gm.forward
    compiled = tessera(gm, example_inputs, **options)

    @functools.wraps(compiled)
    def run(*args: Any) -> Any:
        with torch._C.DisableTorchFunction():
            return compiled(*args)

    return run


# --------------------------------------------------------------------------- migration


class Migration:
    """Installs the redirections (a context manager; `install()`/`uninstall()` also work) and
    collects a `MigrationReport`. One migration at a time per process."""

    def __init__(self) -> None:
        self.report = MigrationReport()
        self._undo: list[tuple[Any, str, Any]] = []
        self._stack: contextlib.ExitStack | None = None
        self._breaks: Counter[str] = Counter()

    # -- installing ---------------------------------------------------------------------

    def install(self) -> Migration:
        """Patch torch; raise MigrationError if a migration is already installed."""
        if _active:
            raise MigrationError("a migration is already installed in this process",
                                 where="tessera.tools.migrate.Migration.install",
                                 hint="uninstall it first, or use one `with Migration():`")
        _active.append(self.report)
        self._stack = contextlib.ExitStack()
        try:
            self._patch_cuda()
            self._patch_compile()
            self._patch_amp()
            self._patch_dist()
            self._patch_default_device()
            self._watch_warnings(self._stack)
            self._stack.enter_context(_CudaToCpu(self.report))
            self._breaks = _graph_breaks()
        except BaseException:
            self.uninstall()
            raise
        return self

    def uninstall(self) -> None:
        """Undo every patch, in reverse order; count graph breaks seen meanwhile."""
        if self._stack is None:
            return
        for reason, n in (_graph_breaks() - self._breaks).items():
            self.report.fallbacks[f"dynamo graph break: {reason[:120]}"] += n
        self._stack.close()
        self._stack = None
        while self._undo:
            owner, name, original = self._undo.pop()
            setattr(owner, name, original)
        _active.remove(self.report)

    def __enter__(self) -> Migration:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _set(self, owner: Any, name: str, value: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _for_user(self, owner: Any, name: str, kind: str | None,
                  stand_in: Callable[..., Any]) -> None:
        """Replace `owner.name` for the script's calls (counted under `kind`); torch's and
        Tessera's own calls still reach the original."""
        original = getattr(owner, name)
        report = self.report

        @functools.wraps(original)
        def patched(*args: Any, **kwargs: Any) -> Any:
            if _internal(1):
                return original(*args, **kwargs)
            if kind is not None:
                report.redirected[kind] += 1
            return stand_in(*args, **kwargs)

        self._set(owner, name, patched)

    # -- what is patched ----------------------------------------------------------------

    def _patch_cuda(self) -> None:
        table = _cuda_equivalents()
        for name, (becomes, stand_in) in table.items():
            self._for_user(torch.cuda, name, f"torch.cuda.{name} -> {becomes}", stand_in)
        for name, becomes in (("range_push", "record_function"), ("range_pop", "record_function"),
                              ("range", "record_function"), ("mark", "no-op")):
            self._for_user(torch.cuda.nvtx, name, f"torch.cuda.nvtx.{name} -> {becomes}",
                           getattr(_NVTX, name))
        self._for_user(torch.nn.Module, "cuda", "Module.cuda() -> stays on the cpu",
                       lambda module, device=None: module)
        self._set(torch.cuda, "Event", CpuEvent)  # classes stay classes (isinstance works)
        self._set(torch.cuda, "Stream", CpuStream)
        for name in _unsupported_names({*table, "Event", "Stream"}):
            hint = _UNSUPPORTED_HINTS.get(name, "remove the call, or guard it with "
                                                "`if torch.version.cuda:` (None here)")
            self._for_user(torch.cuda, name, None,
                           functools.partial(_refuse, f"torch.cuda.{name}", hint))

    def _patch_compile(self) -> None:
        original = torch.compile
        report = self.report

        @functools.wraps(original)
        def compile(model: Any = None, **kwargs: Any) -> Any:
            if "backend" in kwargs:
                backend = kwargs["backend"]
                name = backend if isinstance(backend, str) else getattr(
                    backend, "__name__", type(backend).__name__)
                if name == "tessera":
                    kwargs["backend"] = _tessera_outside_mode
                else:
                    report.kept[f"torch.compile(backend={name!r}): explicit backend"] += 1
            else:
                kwargs["backend"] = _tessera_outside_mode
                report.redirected["torch.compile -> backend='tessera'"] += 1
                for opt in ("mode", "options"):
                    if kwargs.pop(opt, None) is not None:
                        report.redirected[f"torch.compile {opt}= dropped (inductor's)"] += 1
            if model is None:
                return lambda fn: original(fn, **kwargs)
            return original(model, **kwargs)

        self._set(torch, "compile", compile)

    def _patch_amp(self) -> None:
        from torch.amp.autocast_mode import autocast
        from torch.amp.grad_scaler import GradScaler

        report = self.report
        autocast_init, scaler_init = autocast.__init__, GradScaler.__init__

        def init_autocast(self: Any, device_type: str, dtype: torch.dtype | None = None,
                          enabled: bool = True, cache_enabled: bool | None = None) -> None:
            device_type = _cpu_for(report, device_type, "autocast('cuda') -> autocast('cpu')")
            autocast_init(self, device_type, dtype, enabled, cache_enabled)

        def init_scaler(self: Any, device: str = "cuda", *args: Any, **kwargs: Any) -> None:
            device = _cpu_for(report, device, "GradScaler('cuda') -> GradScaler('cpu')")
            scaler_init(self, device, *args, **kwargs)

        self._set(autocast, "__init__", functools.wraps(autocast_init)(init_autocast))
        self._set(GradScaler, "__init__", functools.wraps(scaler_init)(init_scaler))

    def _patch_dist(self) -> None:
        if not torch.distributed.is_available():
            return
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        report = self.report

        def backend_for(backend: Any) -> Any:
            if backend is None or "nccl" in str(backend).lower():
                import tessera.dist.torch_backend  # noqa: F401  (registers "tessera")

                report.redirected[f"process group backend {backend or 'default'!r} -> "
                                  "'tessera'"] += 1
                return "tessera"
            report.kept[f"process group backend {backend!r}"] += 1
            return backend

        original_init, original_group = dist.init_process_group, dist.new_group

        @functools.wraps(original_init)
        def init_process_group(backend: Any = None, *args: Any, **kwargs: Any) -> None:
            if kwargs.pop("device_id", None) is not None:
                report.redirected["init_process_group device_id= dropped (cpu)"] += 1
            return original_init(backend_for(backend), *args, **kwargs)

        @functools.wraps(original_group)
        def new_group(*args: Any, **kwargs: Any) -> Any:
            if len(args) >= 3:  # new_group(ranks, timeout, backend, ...)
                args = (*args[:2], backend_for(args[2]), *args[3:])
            elif kwargs.get("backend") is not None:
                kwargs["backend"] = backend_for(kwargs["backend"])
            return original_group(*args, **kwargs)

        from torch.distributed import device_mesh

        original_mesh = device_mesh.init_device_mesh

        @functools.wraps(original_mesh)
        def init_device_mesh(device_type: str, *args: Any, **kwargs: Any) -> Any:
            device_type = _cpu_for(report, device_type, "init_device_mesh('cuda') -> 'cpu'")
            return original_mesh(device_type, *args, **kwargs)

        self._set(device_mesh, "init_device_mesh", init_device_mesh)
        self._set(dist, "init_process_group", init_process_group)
        self._set(dist, "new_group", new_group)
        self._for_user(dist, "is_nccl_available", "is_nccl_available -> True (tessera)",
                       lambda: True)

        ddp_init = DistributedDataParallel.__init__

        @functools.wraps(ddp_init)
        def init_ddp(self: Any, module: torch.nn.Module, device_ids: Any = None,
                     output_device: Any = None, *args: Any, **kwargs: Any) -> None:
            on_cpu = all(p.device.type == "cpu" for p in module.parameters())
            if on_cpu and (device_ids is not None or output_device is not None):
                report.redirected["DistributedDataParallel device_ids dropped (cpu module)"] \
                    += 1
                device_ids = output_device = None
            ddp_init(self, module, device_ids, output_device, *args, **kwargs)

        self._set(DistributedDataParallel, "__init__", init_ddp)

    def _patch_default_device(self) -> None:
        original = torch.set_default_device
        report = self.report

        @functools.wraps(original)
        def set_default_device(device: Any) -> None:
            original(_cpu_for(report, device, _DEVICE))

        self._set(torch, "set_default_device", set_default_device)

    def _watch_warnings(self, stack: contextlib.ExitStack) -> None:
        """Count every tessera backend warning (shown each time, not once) as it is shown."""
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("always", message="tessera: ")
        shown = warnings.showwarning
        report = self.report

        def showwarning(message: Any, category: Any, filename: str, lineno: int,
                        file: TextIO | None = None, line: str | None = None) -> None:
            _count_fallback(report, str(message))
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning


_NVTX = _Nvtx()


# --------------------------------------------------------------------------- scripts


def _rank() -> str | None:
    """This process's rank under a multi-process launch (torchrun sets RANK, WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return os.environ.get("RANK", "?") if world > 1 else None


def _write_json(report: MigrationReport, path: str) -> None:
    """The report as JSON at `path`; under a multi-process launch each rank writes its own
    file, `NAME.rankR.json`."""
    rank = _rank()
    if rank is not None:
        stem, ext = os.path.splitext(path)
        path = f"{stem}.rank{rank}{ext or '.json'}"
    with open(path, "w") as f:
        json.dump(report.as_dict(), f, indent=2)


def run_script(path: str, argv: Sequence[str] = (), *, summary: TextIO | None = None,
               json_path: str | None = None) -> int:
    """Run the script at `path` as `__main__` with `sys.argv = [path, *argv]` under a
    Migration; print the report's summary to `summary` (default stderr) at the end, also
    when the script fails, and write it as JSON to `json_path` if given. Returns the
    script's exit code."""
    script_path(path, command="run", error=MigrationError)
    migration = Migration()
    code = 1
    try:
        with migration:
            code = run_as_main(path, argv, command="run", error=MigrationError)[1]
    finally:
        rank = _rank()
        print(migration.report.summary("" if rank is None else f"[rank {rank}] "),
              file=summary or sys.stderr, flush=True)
        if json_path:
            _write_json(migration.report, json_path)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tessera.tools.migrate [--json FILE] script.py [args]` (what torchrun
    launches per rank)."""
    args = list(sys.argv[1:] if argv is None else argv)
    json_path = None
    if args[:1] == ["--json"] and len(args) > 1:
        json_path, args = args[1], args[2:]
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m tessera.tools.migrate [--json FILE] SCRIPT [ARGS...]\n"
              "       torchrun --nproc-per-node N -m tessera.tools.migrate SCRIPT [ARGS...]\n"
              "Runs a PyTorch script written for a GPU on this machine (see `tessera run`).",
              file=sys.stderr)
        return 0 if args else 2
    try:
        return run_script(args[0], args[1:], json_path=json_path)
    except TesseraError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # the canonical module, not this __main__ copy, holds the state
    from tessera.tools.migrate import main as _main

    sys.exit(_main())
