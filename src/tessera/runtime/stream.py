"""Streams and events: ordered queues of work on a device, and points in them (CUDA-like).

A `Stream` runs the callables submitted to it one after another, in submission order, on its
own worker thread, so `submit` returns at once. An `Event` marks a point in a stream: it
completes when all work submitted before it has run, can make other streams wait for that
point, and can time the work between two points.

Default stream. Each device has one, and it is the current stream unless
`with tessera.stream(s)` says otherwise. On the CPU it runs work inline on the calling thread:
eager ops are small and frequent, and handing each one to a worker thread and back costs tens
of microseconds, more than many ops take. Like CUDA's per-thread default stream it does not
synchronize implicitly with other streams; order work across streams with events or
`wait_stream`.

Device queues. On a device with command queues (OpenCL) a stream is one in-order queue:
kernels and copies are enqueued on it and run on the device in order; events are markers
in the queue, timed by the device's clock; `wait_event` makes the device wait, not the
host. Host callables submitted to such a stream run on the caller's thread once the queue
has drained.

Errors. An exception raised by work on a stream is kept and raised at the stream's next sync
point (`Stream.synchronize`, `Event.synchronize` of an event recorded after the failing work,
`tessera.synchronize`, `Stream.close`): the original exception object with its original
traceback, plus a note (Python 3.11+) naming the stream, the file:line that submitted the work
and how many later items were skipped. Later work on that stream is skipped until then, since
it may read data the failed work never wrote; once raised, the error is cleared and the stream
runs work again. Event marks and waits are never skipped, so ordering between streams holds.
A failure does not spread to streams that wait on the failed one. On the default stream work
runs inline, so its errors raise from `submit` itself.

Threads. Any number of threads may submit to one stream. A stream's worker thread starts on
its first submit and ends once the stream is closed or garbage-collected and its queue is
empty; at interpreter exit queued work is finished first, as `concurrent.futures` does.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tessera.errors import StreamError
from tessera.runtime.device import Device
from tessera.runtime.device import device as _get_device

__all__ = ["Event", "Stream", "current_stream", "stream", "synchronize"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep


def _user_site() -> str:
    """file:line of the innermost caller outside the tessera package: where the user asked."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return "<unknown>" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


@dataclass(eq=False)
class _Work:
    """One queued item. Bookkeeping items (event marks, waits) have `user=False` and are never
    skipped after a failure, so that ordering between streams still holds."""

    fn: Callable[..., object]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    site: str
    user: bool = True


@dataclass(eq=False)
class _Failure:
    """The first exception raised by work on a stream, kept until a sync point raises it."""

    exc: BaseException
    site: str
    seq: int = 0
    skipped: int = 0


class _Worker:
    """The queue and thread behind a Stream. Kept apart from the Stream so that the thread
    holds no reference to it, and a Stream nobody uses any more can be collected."""

    def __init__(self, label: str):
        self.label = label
        # Re-entrant: a garbage collection inside a locked section may finalize this worker's
        # Stream on the same thread, and the finalizer calls close().
        self._lock = threading.RLock()
        self._has_work = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._items: deque[_Work] = deque()
        self._submitted = 0  # sequence number of the last item queued
        self._done = 0  # ... and of the last item finished (items finish in order)
        self._error: _Failure | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def put(self, work: _Work) -> None:
        with self._lock:
            self._put(work)

    def _put(self, work: _Work) -> None:
        self._check_open()
        self._items.append(work)
        self._submitted += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"tessera {self.label}",
                                            daemon=True)
            self._thread.start()
        self._has_work.notify()

    def _check_open(self) -> None:
        if self._closed:
            raise StreamError(f"{self.label} is closed",
                              hint="create a new tessera.Stream() for more work")

    def mark(self, record: _Record, timing: bool) -> None:
        """Point `record` at the end of the queue; if `timing`, stamp it when the worker gets
        there (at once if the queue is idle, which needs no trip through the worker)."""
        with self._lock:
            self._check_open()
            if timing and self._done < self._submitted:
                self._put(_Work(record.stamp, (), {}, _user_site(), user=False))
            elif timing:
                record.stamp()
            record.seq = self._submitted

    def reached(self, seq: int) -> bool:
        with self._lock:
            return self._done >= seq

    def idle(self) -> bool:
        with self._lock:
            return self._done == self._submitted

    def wait_for(self, seq: int | None = None) -> int:
        """Block until item `seq` (default: the last one queued now) has finished; return it."""
        with self._lock:
            target = self._submitted if seq is None else seq
            if self._done < target:
                if threading.current_thread() is self._thread:
                    raise StreamError(
                        f"work running on {self.label} waited for later work on the same "
                        "stream, which cannot start until it returns",
                        hint="synchronize a stream from outside its own work")
                self._progress.wait_for(lambda: self._done >= target)
            return target

    def raise_error(self, upto: int) -> None:
        """Raise the pending error if it came from item `upto` or earlier, and clear it."""
        with self._lock:
            failure = self._error
            if failure is None or failure.seq > upto:
                return
            self._error = None
        note = f"tessera: raised by work submitted to {self.label} at {failure.site}"
        if failure.skipped:
            n = failure.skipped
            note += f"; {n} later work item{'s were' if n > 1 else ' was'} skipped"
        if hasattr(failure.exc, "add_note"):  # Python 3.11+
            failure.exc.add_note(note)
        raise failure.exc

    def close(self) -> None:
        """Take no more work; the thread exits once the queue is empty. Does not block."""
        with self._lock:
            self._closed = True
            self._has_work.notify()

    def join(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._items and not self._closed:
                    self._has_work.wait()
                if not self._items:
                    break
                work = self._items.popleft()
                skip = False
                if work.user and self._error is not None:
                    self._error.skipped += 1
                    skip = True
            failure = None
            if not skip:
                try:
                    work.fn(*work.args, **work.kwargs)
                except BaseException as exc:  # kept for the next sync point, never lost
                    failure = _Failure(exc, work.site)
            with self._lock:
                self._done += 1
                if failure is not None:
                    failure.seq = self._done
                    self._error = failure
                self._progress.notify_all()
            del work, failure  # drop the work's arguments before waiting for more
        unraised = self._error
        if unraised is not None:
            warnings.warn(f"{self.label} ended with an error no sync point raised: "
                          f"{unraised.exc!r} from work submitted at {unraised.site}; "
                          "synchronize a stream before dropping it", RuntimeWarning,
                          stacklevel=1)


class _Record:
    """One recording of an Event: a point in one worker's queue. `worker` is None on the
    inline default stream, where recording completes at once."""

    __slots__ = ("seq", "time", "worker")

    def __init__(self, worker: _Worker | None):
        self.worker = worker
        self.seq = 0
        self.time: float | None = None

    def done(self) -> bool:
        return self.worker is None or self.worker.reached(self.seq)

    def wait(self) -> None:
        if self.worker is not None:
            self.worker.wait_for(self.seq)

    def stamp(self) -> None:
        self.time = time.perf_counter()


# Every worker of each device, for tessera.synchronize and for finishing work at exit. A
# worker lives while its Stream does or while its thread runs, so one whose Stream was
# collected with work still queued is waited for too.
_workers: dict[Device, weakref.WeakSet[_Worker]] = {}
_defaults: dict[Device, Stream] = {}
_queues: dict[Device, weakref.WeakSet[Any]] = {}  # native queues (OpenCL) of each device
_registry_lock = threading.Lock()


class Stream:
    """An ordered queue of work on `device`, run asynchronously by the stream's own thread."""

    _ids = itertools.count(1)

    def __init__(self, device: str | Device = "cpu", name: str | None = None):
        self.device = _get_device(device)
        self.name = name if name is not None else f"stream-{next(Stream._ids)}"
        self.queue = self.device.new_queue()
        self._worker: _Worker | None = None
        if self.queue is not None:
            with _registry_lock:
                _queues.setdefault(self.device, weakref.WeakSet()).add(self.queue)
            return
        self._worker = _Worker(f"stream {self.name!r} on {self.device.name}")
        weakref.finalize(self, self._worker.close)
        with _registry_lock:
            _workers.setdefault(self.device, weakref.WeakSet()).add(self._worker)

    @classmethod
    def _inline(cls, device: Device) -> Stream:
        """The default stream of `device`: its default queue, or, with none (the CPU), no
        worker either: work runs on the caller's thread."""
        self = cls.__new__(cls)
        self.device, self.name, self._worker = device, "default", None
        self.queue = getattr(device, "default_queue", None)
        if self.queue is not None:  # (the caller holds _registry_lock)
            _queues.setdefault(device, weakref.WeakSet()).add(self.queue)
        return self

    def submit(self, fn: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
        """Queue `fn(*args, **kwargs)` after all work submitted so far and return at once
        (the default stream runs it now)."""
        if not callable(fn):
            raise StreamError(f"submit needs a callable, got {type(fn).__name__} {fn!r}",
                              hint="pass the function, then its arguments: s.submit(f, x, y)")
        if self._worker is None:
            if self.queue is not None:  # host work after the device work queued so far
                self.queue.finish()
            fn(*args, **kwargs)
        else:
            self._worker.put(_Work(fn, args, kwargs, _user_site()))

    def synchronize(self) -> None:
        """Wait until all work submitted so far has run, then raise any error it raised."""
        if self.queue is not None:
            self.queue.finish()
        elif self._worker is not None:
            self._worker.raise_error(self._worker.wait_for())

    def query(self) -> bool:
        """True if all submitted work has run. Never raises the stream's pending error."""
        if self.queue is not None:
            return self.queue.marker().done()
        return self._worker is None or self._worker.idle()

    def record_event(self, event: Event | None = None) -> Event:
        """Record `event` (a new one if None) at the end of the work submitted so far."""
        event = Event() if event is None else _as_event(event)
        if self.queue is not None:  # a marker in the queue, timed by the device's clock
            event._record = self.queue.marker()
            return event
        record = _Record(self._worker)
        if self._worker is not None:
            self._worker.mark(record, event.enable_timing)
        elif event.enable_timing:
            record.stamp()
        event._record = record
        return event

    def wait_event(self, event: Event) -> None:
        """Make work submitted from now on wait until `event` completes. Returns at once, except
        on the default stream, where it blocks the caller. A never-recorded event is complete."""
        record = _as_event(event)._record
        if record is None or record.done():
            return
        if self.queue is not None:
            if getattr(record, "event", None) is not None and \
                    record.event.context == self.queue.cl_queue.context:
                self.queue.wait_for(record)  # the device orders it: no host wait
            else:
                record.wait()
        elif self._worker is None:
            record.wait()
        else:
            self._worker.put(_Work(record.wait, (), {}, _user_site(), user=False))

    def wait_stream(self, other: Stream) -> None:
        """Make work submitted from now on wait for all work submitted to `other` so far."""
        self.wait_event(_as_stream(other).record_event())

    def close(self) -> None:
        """Finish the queued work, stop the worker thread and raise any pending error; later
        submits raise StreamError. Dropping the last reference closes without waiting."""
        if self._worker is None and (self.queue is None or _defaults.get(self.device) is self):
            raise StreamError(f"the default stream of {self.device.name} cannot be closed",
                              hint="close streams you created with tessera.Stream()")
        if self.queue is not None:
            self.synchronize()
            return
        try:
            self.synchronize()
        finally:
            self._worker.close()
            self._worker.join()

    def __repr__(self) -> str:
        return f"Stream(device={self.device.name!r}, name={self.name!r})"


class Event:
    """A point in a stream's work. Recording again moves it, as in CUDA; waits queued before
    keep the point they saw."""

    def __init__(self, enable_timing: bool = False):
        self.enable_timing = enable_timing
        self._record: _Record | None = None

    def record(self, stream: Stream | None = None) -> Event:
        """Mark the end of the work submitted so far to `stream` (default: the current one)."""
        return _stream_or_current(stream).record_event(self)

    def wait(self, stream: Stream | None = None) -> None:
        """Make later work on `stream` (default: the current one) wait for this event."""
        _stream_or_current(stream).wait_event(self)

    def query(self) -> bool:
        """True once all work before the recorded point has run, or if never recorded."""
        return self._record is None or self._record.done()

    def synchronize(self) -> None:
        """Block until the event completes and raise the recording stream's pending error if
        it came from work before the event. A never-recorded event returns at once (CUDA)."""
        record = self._record
        if isinstance(record, _Record):
            if record.worker is not None:
                record.worker.raise_error(record.worker.wait_for(record.seq))
        elif record is not None:  # a device queue's marker
            record.wait()

    def elapsed_time(self, end: Event) -> float:
        """Milliseconds from this event to `end`; both need enable_timing=True and must have
        been recorded and completed."""
        records = []
        for role, event in (("start", self), ("end", _as_event(end))):
            record = event._record
            if not event.enable_timing:
                raise StreamError(f"elapsed_time: the {role} event was created without timing",
                                  hint="create both events as tessera.Event(enable_timing=True)")
            if record is None:
                raise StreamError(f"elapsed_time: the {role} event was never recorded",
                                  hint=f"call {role}.record(stream) first")
            if not record.done() or record.time is None:
                raise StreamError(f"elapsed_time: the {role} event has not completed yet",
                                  hint=f"call {role}.synchronize() first")
            records.append(record.time)
        return (records[1] - records[0]) * 1e3

    def __repr__(self) -> str:
        state = "unrecorded" if self._record is None else "done" if self.query() else "pending"
        return f"Event(enable_timing={self.enable_timing}, {state})"


class _Local(threading.local):
    """Per-thread stack of streams made current by `with tessera.stream(s)`."""

    def __init__(self) -> None:
        self.stack: list[Stream] = []


_local = _Local()


def current_stream(device: str | Device | None = None) -> Stream:
    """The calling thread's current stream for `device` (None: for any device): that of the
    innermost `with tessera.stream(s)`, else the device's default stream."""
    stack = _local.stack
    if device is None and stack:
        return stack[-1]
    dev = _get_device(device)
    for s in reversed(stack):
        if s.device == dev:
            return s
    default = _defaults.get(dev)
    if default is None:
        with _registry_lock:
            default = _defaults.setdefault(dev, Stream._inline(dev))
    return default


def stream(s: Stream) -> contextlib.AbstractContextManager[Stream]:
    """Make `s` the calling thread's current stream inside a `with` block; blocks nest."""
    return _made_current(_as_stream(s))


@contextlib.contextmanager
def _made_current(s: Stream) -> Iterator[Stream]:
    stack = _local.stack
    stack.append(s)
    try:
        yield s
    finally:
        stack.pop()


def synchronize(device: str | Device | None = None) -> None:
    """Wait for all work on every stream of `device` (default: the CPU), then raise the first
    pending error found; other streams' errors stay pending for their next sync point."""
    dev = _get_device(device)
    with _registry_lock:
        workers = list(_workers.get(dev, ()))
        queues = list(_queues.get(dev, ()))
    for q in queues:
        q.finish()
    reached = [(worker, worker.wait_for()) for worker in workers]
    for worker, seq in reached:
        worker.raise_error(seq)


@atexit.register
def _finish_at_exit() -> None:
    """Let every worker finish its queued work before the interpreter goes away."""
    with _registry_lock:
        workers = [w for ws in _workers.values() for w in ws]
    for worker in workers:
        worker.close()
    for worker in workers:
        worker.join()


def _as_stream(s: object) -> Stream:
    if not isinstance(s, Stream):
        raise StreamError(f"expected a tessera.Stream, got {type(s).__name__} {s!r}",
                          hint="create one with tessera.Stream(), or use current_stream()")
    return s


def _as_event(e: object) -> Event:
    if not isinstance(e, Event):
        raise StreamError(f"expected a tessera.Event, got {type(e).__name__} {e!r}",
                          hint="create one with tessera.Event() or stream.record_event()")
    return e


def _stream_or_current(s: Stream | None) -> Stream:
    return current_stream() if s is None else _as_stream(s)
