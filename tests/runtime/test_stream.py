"""Streams and events: order, asynchrony, waits across streams, timing, errors and threads."""

from __future__ import annotations

import gc
import inspect
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable

import pytest

import tessera
from tessera.errors import DeviceError, StreamError
from tessera.runtime.stream import Event, Stream, current_stream, stream, synchronize

# The "thread" method ends the whole process on a timeout: a deadlocked worker would
# otherwise keep the interpreter from exiting, since queued work is finished at exit.
pytestmark = pytest.mark.timeout(20, method="thread")

BLOCKED_S = 0.1  # how long to watch for something that must not happen
DELAY_S = 0.03  # the controlled delay timed with events


@pytest.fixture
def gate() -> Callable[[], threading.Event]:
    """Makes threading.Events that work blocks on; all are opened at teardown, so a failing
    test never leaves a worker stuck (which would hang the interpreter's exit)."""
    made: list[threading.Event] = []

    def make() -> threading.Event:
        made.append(threading.Event())
        return made[-1]

    yield make
    for g in made:
        g.set()


def start_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def assert_blocked(t: threading.Thread) -> None:
    t.join(BLOCKED_S)
    assert t.is_alive(), "returned although the work it waits for cannot have run"


def finish(t: threading.Thread) -> None:
    t.join(10)
    assert not t.is_alive()


def busy(seconds: float = DELAY_S) -> None:
    """Spin on the clock events use, so the delay is at least `seconds` on that clock."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def fail_value() -> None:
    raise ValueError("bad value")


def fail_key() -> None:
    raise KeyError("missing")


def stream_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tessera stream")}


def test_work_runs_in_submission_order():
    assert tessera.Stream is Stream and tessera.synchronize is synchronize
    s, out = Stream(), []
    for i in range(2000):
        s.submit(out.append, i)
    s.synchronize()
    assert out == list(range(2000))


def test_many_threads_submit_to_one_stream():
    s, out = Stream(), []
    n_threads, n = 8, 300
    barrier = threading.Barrier(n_threads)

    def producer(k: int) -> None:
        barrier.wait()
        for i in range(n):
            s.submit(out.append, (k, i))

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.synchronize()
    assert len(out) == n_threads * n
    for k in range(n_threads):
        assert [i for owner, i in out if owner == k] == list(range(n))


def test_submit_returns_before_the_work_runs(gate):
    g, s, ran_on = gate(), Stream(), []
    assert s.query()
    s.submit(g.wait)  # would never return if submit ran the work
    s.submit(lambda: ran_on.append(threading.get_ident()))
    assert not s.query() and ran_on == []
    g.set()
    s.synchronize()
    assert s.query()
    assert len(ran_on) == 1 and ran_on[0] != threading.get_ident()


def test_default_stream_runs_work_inline_on_the_caller():
    d = current_stream()
    assert d is current_stream("cpu") is current_stream(tessera.device("cpu"))
    assert "default" in repr(d)
    ran_on = []
    d.submit(lambda: ran_on.append(threading.get_ident()))
    assert ran_on == [threading.get_ident()]  # already ran, on this thread
    assert d.query()
    d.synchronize()
    with pytest.raises(ZeroDivisionError):  # inline work raises from submit itself
        d.submit(lambda: 1 / 0)
    assert d.record_event().query()
    assert not any("default" in t.name for t in stream_threads())


def test_wait_event_orders_work_across_streams(gate):
    g, a, b, out, b_ran = gate(), Stream(), Stream(), [], threading.Event()
    a.submit(g.wait)
    a.submit(out.append, "a")
    ev = a.record_event()
    b.wait_event(ev)  # returns at once: the waiting is b's worker's job
    b.submit(out.append, "b")
    b.submit(b_ran.set)
    assert not ev.query() and not b.query()
    assert not b_ran.wait(BLOCKED_S)
    g.set()
    b.synchronize()
    assert out == ["a", "b"] and ev.query()


def test_event_wait_on_the_default_stream_blocks_the_caller(gate):
    g, a, out = gate(), Stream(), []
    a.submit(g.wait)
    a.submit(out.append, "a")
    ev = a.record_event()

    def caller() -> None:
        ev.wait()  # the current stream of this thread is the inline default stream
        out.append("caller")

    t = start_thread(caller)
    assert_blocked(t)
    g.set()
    finish(t)
    assert out == ["a", "caller"]


def test_wait_stream_waits_only_for_work_submitted_so_far(gate):
    g1, g2, a, b, out, b_ran = gate(), gate(), Stream(), Stream(), [], threading.Event()
    a.submit(g1.wait)
    a.submit(out.append, "a")
    b.wait_stream(a)
    a.submit(g2.wait)  # after the wait_stream: b must not wait for it
    a.submit(out.append, "a2")
    b.submit(out.append, "b")
    b.submit(b_ran.set)
    assert not b_ran.wait(BLOCKED_S)
    g1.set()
    b.synchronize()
    assert out == ["a", "b"]
    g2.set()
    a.synchronize()
    assert out == ["a", "b", "a2"]


def test_event_query_and_recording_again(gate):
    g, s, b, b_ran = gate(), Stream(), Stream(), threading.Event()
    ev = Event()
    assert ev.query() and "unrecorded" in repr(ev)
    ev.synchronize()  # never recorded: returns at once, as in CUDA
    s.submit(g.wait)
    assert ev.record(s) is ev
    assert not ev.query() and "pending" in repr(ev)
    b.wait_event(ev)
    b.submit(b_ran.set)
    ev.record(Stream())  # moves the event to an idle stream: complete now...
    assert ev.query()
    assert not b_ran.wait(BLOCKED_S)  # ...but b still waits for the point it saw
    g.set()
    b.synchronize()
    assert b_ran.is_set()


@pytest.mark.parametrize("where", ["idle stream", "busy stream", "default stream"])
def test_elapsed_time_covers_the_work_between_events(gate, where):
    g = gate()
    start, end = Event(enable_timing=True), Event(enable_timing=True)
    if where == "default stream":
        start.record()
        busy()
        end.record()
    else:
        s = Stream()
        if where == "busy stream":  # the marks are stamped by the worker, not when recorded
            s.submit(g.wait)
        start.record(s)
        s.submit(busy)
        end.record(s)
        g.set()
        end.synchronize()
    ms = start.elapsed_time(end)
    assert DELAY_S * 1e3 <= ms < DELAY_S * 1e3 + 2000
    assert -ms == pytest.approx(end.elapsed_time(start))


def test_elapsed_time_misuse(gate):
    g = gate()

    def timed() -> Event:
        return Event(enable_timing=True).record()

    pending_stream = Stream()
    pending_stream.submit(g.wait)
    cases = [
        (lambda: Event().record().elapsed_time(timed()), "start event was created without timing"),
        (lambda: timed().elapsed_time(Event().record()), "end event was created without timing"),
        (lambda: Event(enable_timing=True).elapsed_time(timed()), "start event was never recorded"),
        (lambda: timed().elapsed_time(Event(enable_timing=True)), "end event was never recorded"),
        (lambda: timed().elapsed_time(Event(enable_timing=True).record(pending_stream)),
         "end event has not completed"),
        (lambda: timed().elapsed_time("end"), "expected a tessera.Event"),
    ]
    for call, match in cases:
        with pytest.raises(StreamError, match=match) as info:
            call()
        assert info.value.hint


def test_error_is_raised_at_sync_with_its_original_traceback():
    raised: list[Exception] = []

    def failing_user_function() -> None:
        raised.append(KeyError("boom"))
        raise raised[-1]

    s, out = Stream(name="worker-a"), []
    line = inspect.currentframe().f_lineno + 1
    s.submit(failing_user_function)
    with pytest.raises(KeyError) as info:
        s.synchronize()
    assert info.value is raised[0]
    text = "".join(traceback.format_exception(info.value))
    assert "in failing_user_function" in text and "raise raised[-1]" in text
    if sys.version_info >= (3, 11):
        (note,) = info.value.__notes__
        assert "'worker-a'" in note and f"{__file__}:{line}" in note
    s.synchronize()  # raised once, then cleared: the stream works again
    s.submit(out.append, 1)
    s.synchronize()
    assert out == [1]


def test_work_after_a_failure_is_skipped_until_the_error_is_raised():
    s, out = Stream(), []
    s.submit(out.append, 0)
    s.submit(fail_value)
    s.submit(out.append, 1)
    s.submit(out.append, 2)
    with pytest.raises(ValueError, match="bad value") as info:
        s.synchronize()
    assert out == [0]
    if sys.version_info >= (3, 11):
        assert "2 later work items were skipped" in info.value.__notes__[0]
    s.submit(out.append, 3)
    s.synchronize()
    assert out == [0, 3]


def test_event_synchronize_raises_errors_from_work_before_it(gate):
    g, s = gate(), Stream()
    s.submit(g.wait)
    before = s.record_event(Event(enable_timing=True))
    s.submit(fail_value)
    after = s.record_event(Event(enable_timing=True))  # marks are not skipped after a failure
    g.set()
    before.synchronize()  # the failure came after this event
    with pytest.raises(ValueError):
        after.synchronize()
    assert before.elapsed_time(after) >= 0
    s.synchronize()  # already raised
    before.synchronize()


def test_waits_queued_after_a_failure_still_hold(gate):
    g, s, other = gate(), Stream(), Stream()
    other.submit(g.wait)
    s.submit(fail_value)
    s.wait_event(other.record_event())  # later work on s must still come after other's

    raised: list[BaseException] = []

    def sync() -> None:
        try:
            s.synchronize()
        except ValueError as exc:
            raised.append(exc)

    t = start_thread(sync)
    assert_blocked(t)
    g.set()
    finish(t)
    assert len(raised) == 1


def test_tessera_synchronize_waits_for_every_stream(gate):
    g, out = gate(), []
    streams = [Stream() for _ in range(3)]
    for i, s in enumerate(streams):
        s.submit(g.wait)
        s.submit(out.append, i)
    dropped = Stream()
    dropped.submit(g.wait)
    dropped.submit(out.append, "dropped")
    del dropped  # its queued work still belongs to the device
    gc.collect()
    t = start_thread(tessera.synchronize)
    assert_blocked(t)
    g.set()
    finish(t)
    assert sorted(map(str, out)) == ["0", "1", "2", "dropped"]
    tessera.device("cpu").synchronize()


def test_tessera_synchronize_raises_one_error_and_keeps_the_others():
    a, b = Stream(), Stream()
    a.submit(fail_value)
    b.submit(fail_key)
    seen = []
    for _ in range(2):
        with pytest.raises((ValueError, KeyError)) as info:
            synchronize("cpu")
        seen.append(info.type)
    assert set(seen) == {ValueError, KeyError}
    synchronize()
    a.synchronize()
    b.synchronize()


def test_stream_context_nests_and_is_per_thread(gate):
    default, a, b = current_stream(), Stream(), Stream()
    with stream(a) as entered:
        assert entered is a and current_stream() is a
        with stream(b):
            assert current_stream() is b is current_stream("cpu")
        assert current_stream() is a
        seen = []
        finish(start_thread(lambda: seen.append(current_stream())))
        assert seen == [default]
    assert current_stream() is default
    with pytest.raises(RuntimeError, match="inside"), stream(a):
        raise RuntimeError("inside")
    assert current_stream() is default


def test_events_default_to_the_current_stream(gate):
    g, s, other, other_ran = gate(), Stream(), Stream(), threading.Event()
    s.submit(g.wait)
    with stream(s):
        ev = Event().record()
    assert not ev.query()
    with stream(other):
        ev.wait()
        current_stream().submit(other_ran.set)
    assert not other_ran.wait(BLOCKED_S)
    g.set()
    other.synchronize()
    assert ev.query() and other_ran.is_set()


def _closed_stream() -> Stream:
    s = Stream()
    s.close()
    return s


@pytest.mark.parametrize("call, match", [
    (lambda: Stream().submit(42), "submit needs a callable"),
    (lambda: stream("cpu"), "expected a tessera.Stream"),
    (lambda: Stream().wait_event("event"), "expected a tessera.Event"),
    (lambda: Stream().wait_stream(Event()), "expected a tessera.Stream"),
    (lambda: Stream().record_event(3), "expected a tessera.Event"),
    (lambda: Event().record(stream=3), "expected a tessera.Stream"),
    (lambda: Event().wait(stream="cpu"), "expected a tessera.Stream"),
    (lambda: current_stream().close(), "default stream of cpu cannot be closed"),
    (lambda: _closed_stream().submit(print), "is closed"),
    (lambda: _closed_stream().record_event(), "is closed"),
], ids=["submit", "stream", "wait_event", "wait_stream", "record_event", "Event.record",
        "Event.wait", "close default", "submit closed", "record closed"])
def test_misuse_raises_stream_error(call, match):
    with pytest.raises(StreamError, match=match) as info:
        call()
    assert info.value.hint


def test_bad_device_is_a_device_error():
    with pytest.raises(DeviceError):
        Stream("gpu")
    with pytest.raises(DeviceError):
        synchronize("cpu:7")


def test_synchronizing_a_stream_from_its_own_work_raises_instead_of_deadlocking():
    s = Stream()
    s.submit(s.synchronize)
    with pytest.raises(StreamError, match="same stream") as info:
        s.synchronize()
    assert info.value.hint


def test_close_finishes_queued_work_then_refuses_more(gate):
    g, s, out = gate(), Stream(), []
    s.submit(g.wait)
    s.submit(out.append, 1)
    t = start_thread(s.close)
    assert_blocked(t)
    g.set()
    finish(t)
    assert out == [1] and s.query()
    s.close()  # idempotent
    failing = Stream()
    failing.submit(fail_value)
    with pytest.raises(ValueError):
        failing.close()  # close is a sync point
    with pytest.raises(StreamError, match="closed"):
        failing.submit(print)


def test_worker_threads_start_lazily_and_end_with_their_streams():
    baseline = stream_threads()
    lazy = Stream()
    lazy.record_event()
    lazy.synchronize()
    assert stream_threads() == baseline  # nothing submitted, no thread
    closed = [Stream() for _ in range(3)]
    dropped = [Stream() for _ in range(3)]
    for s in closed + dropped:
        s.submit(busy, 0.01)
    new = stream_threads() - baseline
    assert len(new) == 6
    for s in closed:
        s.close()
    del dropped, s
    gc.collect()
    for t in new:
        t.join(5)
    assert not any(t.is_alive() for t in new)


def test_collecting_a_stream_while_its_worker_lock_is_held_does_not_deadlock():
    """A collection can run inside any locked section and finalize a Stream caught in a
    reference cycle; its finalizer closes the worker, which takes that same lock."""
    s = Stream()
    s.cycle = s
    s.submit(int)
    s.synchronize()
    worker = s._worker
    del s
    with worker._lock:
        gc.collect()
    worker.join()  # the finalizer ran and closed the worker, so its thread ended


def test_dropping_a_stream_with_an_unraised_error_warns():
    s = Stream(name="dropped-with-error")
    s.submit(fail_value)
    (thread,) = [t for t in stream_threads() if "'dropped-with-error'" in t.name]
    with pytest.warns(RuntimeWarning, match="'dropped-with-error'.*no sync point raised"):
        del s
        gc.collect()
        thread.join(5)
    assert not thread.is_alive()


def test_queued_work_finishes_at_interpreter_exit():
    code = (
        "import os, time, tessera\n"
        "s = tessera.Stream()\n"
        "s.submit(time.sleep, 0.2)\n"
        "s.submit(os.write, 1, b'kept\\n')\n"  # one write: lines from two threads stay whole
        "d = tessera.Stream()\n"
        "d.submit(time.sleep, 0.2)\n"
        "d.submit(os.write, 1, b'dropped\\n')\n"
        "del d\n"
        "tessera.Stream(name='failing').submit(int, 'x')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=15)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["dropped", "kept"]
    assert "'failing'" in done.stderr and "ValueError" in done.stderr
