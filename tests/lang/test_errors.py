"""Every bad kernel or launch raises a Tessera error that names the kernel's file:line and
quotes the offending source line; never a segfault, a hang or a plain Python exception.

Kernels live at module level (the frontend reads their source). The offending line of
each kernel carries a `# <tag>` marker; `_line(kernel, tag)` finds it, so the tests do
not depend on line numbers.

Compile-time errors are provoked with `kernel.source(...)` (it traces and compiles but
never runs the kernel), so that a missing check cannot turn into a crash of the test
process.
"""

# ruff: noqa: F841, B007, RUF059  (the kernels below are wrong on purpose)
from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch

import tessera
import tessera.lang as tl
from tessera.lang import KernelError, KernelSyntaxError, KernelTypeError, LaunchError

FILE = os.path.realpath(__file__)


def helper(x):
    return x


# ---------------------------------------------------------------------------------------
# unsupported Python constructs
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_try(x, out, BLOCK: tl.constexpr):
    try:  # <try>
        out[0:BLOCK] = x[0:BLOCK]
    except Exception:
        pass


@tl.kernel
def k_with(x, out, BLOCK: tl.constexpr):
    with open("f"):  # <with>
        out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_lambda(x, out, BLOCK: tl.constexpr):
    f = lambda v: v + 1  # <lambda>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_listcomp(x, out, BLOCK: tl.constexpr):
    vals = [v for v in range(3)]  # <listcomp>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_nested_def(x, out, BLOCK: tl.constexpr):
    def inner(v):  # <nested_def>
        return v
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_return_value(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK]
    return 1  # <return_value>


@tl.kernel
def k_return_early(x, out, n, BLOCK: tl.constexpr):
    if n > 0:
        return  # <return_early>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_while_else(x, out, BLOCK: tl.constexpr):
    k = 0
    while k < 3:  # <while_else>
        k += 1
    else:
        k = 0
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_for_else(x, out, BLOCK: tl.constexpr):
    for k in range(3):  # <for_else>
        pass
    else:
        pass
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_call_python(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = helper(x[0:BLOCK])  # <call_python>


@tl.kernel
def k_call_print(x, out, BLOCK: tl.constexpr):
    print(x[0:BLOCK])  # <call_print>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_slice_step(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:2 * BLOCK:2]  # <slice_step>


@tl.kernel
def k_slice_runtime_size(x, out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[0:BLOCK] = x[i:n]  # <slice_runtime_size>


@tl.kernel
def k_slice_open(x, out, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[0:BLOCK] = x[i:]  # <slice_open>


@tl.kernel
def k_slice_negative(x, out, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[0:BLOCK] = x[i + BLOCK:i]  # <slice_negative>


@tl.kernel
def k_undefined(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + undefined_name  # <undefined>  # noqa: F821


@tl.kernel
def k_break(x, out, BLOCK: tl.constexpr):
    for k in range(3):
        break  # <break>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_assert(x, out, BLOCK: tl.constexpr):
    assert BLOCK > 0  # <assert>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_fstring(x, out, BLOCK: tl.constexpr):
    s = f"{BLOCK}"  # <fstring>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_matmul(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] @ x[0:BLOCK]  # <matmul>


@tl.kernel
def k_assign_attr(x, out, BLOCK: tl.constexpr):
    x.foo = 1  # <assign_attr>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_assign_tile(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK]
    t[0:4] = 1.0  # <assign_tile>
    out[0:BLOCK] = t


@tl.kernel
def k_in(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK]
    c = t in t  # <in>
    out[0:BLOCK] = t


SYNTAX_CASES = [
    (k_try, "try"),
    (k_with, "with"),
    (k_lambda, "lambda"),
    (k_listcomp, "listcomp"),
    (k_nested_def, "nested_def"),
    (k_return_value, "return_value"),
    (k_while_else, "while_else"),
    (k_for_else, "for_else"),
    (k_call_python, "call_python"),
    (k_call_print, "call_print"),
    (k_slice_step, "slice_step"),
    (k_slice_open, "slice_open"),
    (k_slice_negative, "slice_negative"),
    (k_undefined, "undefined"),
    (k_break, "break"),
    (k_assert, "assert"),
    (k_fstring, "fstring"),
    (k_assign_attr, "assign_attr"),
    (k_assign_tile, "assign_tile"),
    (k_in, "in"),
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _line(kernel: tl.Kernel, tag: str) -> tuple[int, str]:
    """(file line, code text) of the line of `kernel` marked `# <tag>`."""
    lines, first = inspect.getsourcelines(kernel.fn)
    for offset, text in enumerate(lines):
        if f"# <{tag}>" in text:
            return first + offset, text.split("#")[0].strip()
    raise AssertionError(f"no marker {tag!r} in {kernel.fn.__name__}")


def _check_where(err: BaseException, kernel: tl.Kernel, tag: str) -> None:
    line, code = _line(kernel, tag)
    msg = str(err)
    assert f"{FILE}:{line}" in msg or f"{os.path.basename(FILE)}:{line}" in msg, \
        f"message does not name line {line}:\n{msg}"
    assert code in msg, f"message does not quote {code!r}:\n{msg}"


def _f32(n: int = 16) -> torch.Tensor:
    return torch.zeros(n)


def _compile_error(exc: type[BaseException], kernel: tl.Kernel, tag: str, *args,
                   **kwargs) -> BaseException:
    """Trace+compile (never run) `kernel`; it must raise `exc` pointing at `tag`."""
    with pytest.raises(exc) as info:
        kernel.source(*args, **kwargs)
    assert isinstance(info.value, tessera.TesseraError)
    _check_where(info.value, kernel, tag)
    return info.value


# ---------------------------------------------------------------------------------------
# tests: unsupported syntax
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,tag", SYNTAX_CASES, ids=[t for _, t in SYNTAX_CASES])
def test_unsupported_syntax(kernel, tag):
    _compile_error(KernelSyntaxError, kernel, tag, _f32(), _f32(), BLOCK=16)


def test_slice_with_runtime_size():
    _compile_error(KernelSyntaxError, k_slice_runtime_size, "slice_runtime_size",
                   _f32(), _f32(), 16, BLOCK=16)


def test_early_return():
    _compile_error(KernelSyntaxError, k_return_early, "return_early", _f32(), _f32(), 3,
                   BLOCK=16)


def test_error_also_raised_by_launch_and_every_time():
    """Launching raises the same error as tracing, and a failed trace is not cached."""
    for _ in range(2):
        with pytest.raises(KernelSyntaxError) as info:
            k_try[(1,)](_f32(), _f32(), BLOCK=16)
        _check_where(info.value, k_try, "try")


def test_undefined_name_message_names_it():
    err = _compile_error(KernelSyntaxError, k_undefined, "undefined", _f32(), _f32(),
                         BLOCK=16)
    assert "undefined_name" in str(err)


def test_error_messages_have_no_python_traceback_noise():
    err = _compile_error(KernelSyntaxError, k_call_python, "call_python", _f32(), _f32(),
                         BLOCK=16)
    assert "helper" in str(err)


# ---------------------------------------------------------------------------------------
# types and shapes
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_bcast_mismatch(x, out):
    a = x[0:4]
    b = x[0:8]
    out[0:8] = a + b  # <bcast>


@tl.kernel
def k_bcast_mismatch_where(x, out):
    a = x[0:4]
    b = x[0:8]
    out[0:8] = tl.where(b > 0, a, b)  # <bcast_where>


@tl.kernel
def k_floordiv_float(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] // 2.0  # <floordiv>


@tl.kernel
def k_mod_float(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] % 3  # <mod>


@tl.kernel
def k_and_float(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] & x[0:BLOCK]  # <and>


@tl.kernel
def k_xor_float(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] ^ 1  # <xor>


@tl.kernel
def k_shift_float(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] << 1  # <shift>


@tl.kernel
def k_invert_float(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = ~x[0:BLOCK]  # <invert>


@tl.kernel
def k_tile_if(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK]
    if t > 0:  # <tile_if>
        t = t + 1
    out[0:BLOCK] = t


@tl.kernel
def k_tile_while(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK]
    while t > 0:  # <tile_while>
        t = t - 1
    out[0:BLOCK] = t


@tl.kernel
def k_tile_and(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK]
    m = (t > 0) and (t < 1)  # <tile_and>
    out[0:BLOCK] = t


@tl.kernel
def k_tile_not(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK]
    out[0:BLOCK] = not t  # <tile_not>


@tl.kernel
def k_loop_shape(x, out, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,))
    for k in range(4):  # <loop_shape_for>
        acc = tl.zeros((BLOCK, 2))  # <loop_shape>
        y = k + 1
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_while_shape(x, out, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,))
    k = 0
    while k < 4:  # <while_shape_while>
        acc = acc[:, None] + x[0:BLOCK][None, :]  # <while_shape>
        k += 1
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_if_shape(x, out, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,))
    if n > 0:  # <if_shape_if>
        acc = tl.zeros((BLOCK, 2))  # <if_shape>
        y = n + 1
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_big_zeros(x, out):
    t = tl.zeros((512, 1024))  # <big_zeros>
    out[0:1] = tl.sum(t)


@tl.kernel
def k_big_load(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK]  # <big_load>


@tl.kernel
def k_big_int64(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK] * 2  # <big_int64>
    out[0:BLOCK] = t + tl.sum(t)


@tl.kernel
def k_big_broadcast(x, out, BLOCK: tl.constexpr):
    a = x[0:BLOCK]
    t = a[:, None] + a[None, :]  # <big_broadcast>
    out[0:BLOCK] = tl.sum(t, axis=0) + tl.sum(t, axis=1)


@tl.kernel
def k_big_arange(x, out, BLOCK: tl.constexpr):
    a = tl.arange(0, BLOCK)  # <big_arange>
    b = a * 3
    out[0:BLOCK] = b + tl.sum(b)


@tl.kernel
def k_arange_runtime(x, out, n, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + tl.arange(0, n)  # <arange_rt>


@tl.kernel
def k_arange_float(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + tl.arange(0, BLOCK / 1)  # <arange_float>


@tl.kernel
def k_arange_empty(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + tl.arange(BLOCK, BLOCK)  # <arange_empty>


@tl.kernel
def k_zeros_runtime(x, out, n, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + tl.zeros((n,))  # <zeros_rt>


@tl.kernel
def k_rank_too_few(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK]  # <rank_few>


@tl.kernel
def k_rank_too_many(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0, 0:BLOCK, 0]  # <rank_many>


@tl.kernel
def k_float_index(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[1.5, 0:BLOCK]  # <float_index>


@tl.kernel
def k_store_shape(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:2 * BLOCK]  # <store_shape>


@tl.kernel
def k_tensor_as_value(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x + 1  # <tensor_value>


@tl.kernel
def k_load_other_runtime(x, out, v, BLOCK: tl.constexpr):
    out[0:BLOCK] = tl.load(x[0:BLOCK], other=v)  # <other_rt>


@tl.kernel
def k_load_unknown_kw(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = tl.load(x[0:BLOCK], mask=True)  # <load_kw>


@tl.kernel
def k_reduce_axis(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = tl.sum(x[0:BLOCK], axis=1)  # <reduce_axis>


@tl.kernel
def k_reduce_scalar(x, out, BLOCK: tl.constexpr):
    out[0:1] = tl.max(tl.program_id(0))  # <reduce_scalar>


@tl.kernel
def k_program_id_axis(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + tl.program_id(3)  # <pid_axis>


@tl.kernel
def k_tile_index_int(x, out, BLOCK: tl.constexpr):
    t = x[0:BLOCK]
    out[0:1] = t[0]  # <tile_index>


@tl.kernel
def k_gelu_bad(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = tl.gelu(x[0:BLOCK], approximate="fast")  # <gelu_bad>


@tl.kernel
def k_bad_builtin_args(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = tl.where(x[0:BLOCK] > 0, x[0:BLOCK])  # <where_args>


@tl.kernel
def k_const_div_zero(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + BLOCK // 0  # <const_div0>


@tl.kernel
def k_full_runtime(x, out, v, BLOCK: tl.constexpr):
    out[0:BLOCK] = tl.full((BLOCK,), v)  # <full_rt>


@tl.kernel
def k_cast_bad_dtype(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = tl.cast(x[0:BLOCK], "float99")  # <cast_bad>


@tl.kernel
def k_to_bad_dtype(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK].to("float99")  # <to_bad>


@tl.kernel
def k_to_no_dtype(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK].to()  # <to_none>


@tl.kernel
def k_method_bad_kw(x, out, BLOCK: tl.constexpr):
    out[0:1] = x[0:BLOCK].sum(dim=0)  # <method_kw>


@tl.kernel
def k_shape_out_of_range(x, out, BLOCK: tl.constexpr):
    n = x.shape[1]  # <shape_index>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_python_builtin_fails(x, out, BLOCK: tl.constexpr):
    m = max(BLOCK)  # <py_builtin>
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_range_bad_kw(x, out, BLOCK: tl.constexpr):
    for k in range(0, 4, step=1):  # <range_kw>
        pass
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_static_range_runtime(x, out, n, BLOCK: tl.constexpr):
    for k in tl.static_range(n):  # <static_rt>
        pass
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_range_step_zero(x, out, BLOCK: tl.constexpr):
    for k in range(0, 4, 0):  # <range_step0>
        pass
    out[0:BLOCK] = x[0:BLOCK]


@tl.kernel
def k_int_too_big(x, out, BLOCK: tl.constexpr):
    out[0:BLOCK] = x[0:BLOCK] + 2**70  # <int_too_big>


@tl.kernel
def k_unpack(x, out, BLOCK: tl.constexpr):
    a, b = x.shape  # <unpack>
    out[0:BLOCK] = x[0:BLOCK]


def test_matmul_of_1d_tiles():
    _compile_error(KernelError, k_matmul, "matmul", _f32(), _f32(), BLOCK=16)


def test_broadcast_mismatch():
    err = _compile_error(KernelTypeError, k_bcast_mismatch, "bcast", _f32(8), _f32(8))
    assert "(4,)" in str(err) and "(8,)" in str(err)


def test_broadcast_mismatch_in_where():
    _compile_error(KernelTypeError, k_bcast_mismatch_where, "bcast_where", _f32(8), _f32(8))


@pytest.mark.parametrize("kernel,tag", [(k_floordiv_float, "floordiv"),
                                        (k_mod_float, "mod"),
                                        (k_and_float, "and"),
                                        (k_xor_float, "xor"),
                                        (k_shift_float, "shift"),
                                        (k_invert_float, "invert")],
                         ids=["floordiv", "mod", "and", "xor", "lshift", "invert"])
def test_integer_only_ops_on_floats(kernel, tag):
    _compile_error(KernelTypeError, kernel, tag, _f32(), _f32(), BLOCK=16)


@pytest.mark.parametrize("kernel,tag", [(k_tile_if, "tile_if"), (k_tile_while, "tile_while"),
                                        (k_tile_and, "tile_and"), (k_tile_not, "tile_not")],
                         ids=["if", "while", "and", "not"])
def test_tile_as_condition(kernel, tag):
    _compile_error(KernelError, kernel, tag, _f32(), _f32(), BLOCK=16)


def test_loop_carried_shape_change_for():
    """The error names the assignment that changes the shape (or the loop header), not
    whatever statement happens to end the loop body."""
    with pytest.raises(KernelTypeError) as info:
        k_loop_shape.source(_f32(), _f32(), BLOCK=16)
    msg = str(info.value)
    assert "acc" in msg
    ok = [_line(k_loop_shape, t) for t in ("loop_shape", "loop_shape_for")]
    assert any(f"{FILE}:{line}" in msg and code in msg for line, code in ok), msg


def test_loop_carried_shape_change_while():
    with pytest.raises(KernelTypeError) as info:
        k_while_shape.source(_f32(), _f32(), BLOCK=16)
    msg = str(info.value)
    ok = [_line(k_while_shape, t) for t in ("while_shape", "while_shape_while")]
    assert any(f"{FILE}:{line}" in msg and code in msg for line, code in ok), msg


def test_branch_shape_change():
    with pytest.raises(KernelTypeError) as info:
        k_if_shape.source(_f32(), _f32(), 3, BLOCK=16)
    msg = str(info.value)
    ok = [_line(k_if_shape, t) for t in ("if_shape", "if_shape_if")]
    assert any(f"{FILE}:{line}" in msg and code in msg for line, code in ok), msg


def test_too_large_tile_zeros():
    err = _compile_error(KernelTypeError, k_big_zeros, "big_zeros", _f32(), _f32())
    assert "KiB" in str(err) or "large" in str(err)


def test_too_large_tile_load():
    _compile_error(KernelTypeError, k_big_load, "big_load", _f32(), _f32(), BLOCK=1 << 19)


def test_too_large_int64_tile():
    """300000 int64 elements are 2.4 MB, over the 1 MiB limit (the check must count the
    element size, not assume 4 bytes)."""
    x = torch.zeros(16, dtype=torch.int64)
    _compile_error(KernelTypeError, k_big_int64, "big_int64", x, x.clone(), BLOCK=300_000)


def test_too_large_tile_from_broadcasting():
    """(2048,) x (2048,) broadcast to a 16 MiB tile: without the check it is put on the
    worker's stack and the launch segfaults."""
    _compile_error(KernelTypeError, k_big_broadcast, "big_broadcast", _f32(), _f32(),
                   BLOCK=2048)


def test_too_large_arange():
    x = torch.zeros(16, dtype=torch.int32)
    _compile_error(KernelTypeError, k_big_arange, "big_arange", x, x.clone(),
                   BLOCK=1 << 19)


def test_arange_runtime_bounds():
    _compile_error(KernelError, k_arange_runtime, "arange_rt", _f32(), _f32(), 16, BLOCK=16)


def test_arange_float_bounds():
    _compile_error(KernelError, k_arange_float, "arange_float", _f32(), _f32(), BLOCK=16)


def test_arange_empty():
    _compile_error(KernelError, k_arange_empty, "arange_empty", _f32(), _f32(), BLOCK=16)


def test_zeros_runtime_shape():
    _compile_error(KernelError, k_zeros_runtime, "zeros_rt", _f32(), _f32(), 16, BLOCK=16)


def test_wrong_number_of_indices():
    err = _compile_error(KernelSyntaxError, k_rank_too_few, "rank_few",
                         torch.zeros(16, 16), _f32(), BLOCK=16)
    assert "rank-2" in str(err)
    _compile_error(KernelSyntaxError, k_rank_too_many, "rank_many", torch.zeros(4, 16),
                   _f32(), BLOCK=16)


def test_float_tensor_index():
    _compile_error(KernelError, k_float_index, "float_index", torch.zeros(4, 16), _f32(),
                   BLOCK=16)


def test_store_shape_mismatch():
    _compile_error(KernelTypeError, k_store_shape, "store_shape", _f32(32), _f32(),
                   BLOCK=16)


def test_tensor_used_as_value():
    _compile_error(KernelTypeError, k_tensor_as_value, "tensor_value", _f32(), _f32(),
                   BLOCK=16)


def test_load_other_must_be_constant():
    _compile_error(KernelTypeError, k_load_other_runtime, "other_rt", _f32(), _f32(), 1.5,
                   BLOCK=16)


def test_load_unknown_keyword():
    _compile_error(KernelSyntaxError, k_load_unknown_kw, "load_kw", _f32(), _f32(),
                   BLOCK=16)


def test_reduce_axis_out_of_range():
    _compile_error(KernelTypeError, k_reduce_axis, "reduce_axis", _f32(), _f32(), BLOCK=16)


def test_reduce_scalar():
    _compile_error(KernelTypeError, k_reduce_scalar, "reduce_scalar", _f32(), _f32(),
                   BLOCK=16)


def test_program_id_axis():
    _compile_error(KernelError, k_program_id_axis, "pid_axis", _f32(), _f32(), BLOCK=16)


def test_tile_indexed_with_integer():
    _compile_error(KernelSyntaxError, k_tile_index_int, "tile_index", _f32(), _f32(),
                   BLOCK=16)


def test_gelu_bad_approximate():
    _compile_error(KernelError, k_gelu_bad, "gelu_bad", _f32(), _f32(), BLOCK=16)


def test_builtin_wrong_arguments():
    _compile_error(KernelError, k_bad_builtin_args, "where_args", _f32(), _f32(), BLOCK=16)


def test_compile_time_division_by_zero():
    _compile_error(KernelError, k_const_div_zero, "const_div0", _f32(), _f32(), BLOCK=16)


def test_full_needs_constant():
    _compile_error(KernelError, k_full_runtime, "full_rt", _f32(), _f32(), 2.0, BLOCK=16)


def test_cast_to_unknown_dtype():
    _compile_error(KernelError, k_cast_bad_dtype, "cast_bad", _f32(), _f32(), BLOCK=16)


def test_to_unknown_dtype():
    """`.to(bad)` must report the kernel line like `tl.cast(x, bad)` does."""
    _compile_error(KernelError, k_to_bad_dtype, "to_bad", _f32(), _f32(), BLOCK=16)


def test_to_without_dtype():
    _compile_error(KernelError, k_to_no_dtype, "to_none", _f32(), _f32(), BLOCK=16)


def test_method_with_unknown_keyword():
    _compile_error(KernelError, k_method_bad_kw, "method_kw", _f32(), _f32(), BLOCK=16)


def test_shape_index_out_of_range():
    _compile_error(KernelError, k_shape_out_of_range, "shape_index", _f32(), _f32(),
                   BLOCK=16)


def test_compile_time_python_builtin_failure():
    _compile_error(KernelError, k_python_builtin_fails, "py_builtin", _f32(), _f32(),
                   BLOCK=16)


def test_range_unknown_keyword():
    _compile_error(KernelError, k_range_bad_kw, "range_kw", _f32(), _f32(), BLOCK=16)


def test_static_range_runtime_bound():
    _compile_error(KernelError, k_static_range_runtime, "static_rt", _f32(), _f32(), 4,
                   BLOCK=16)


def test_range_step_zero():
    _compile_error(KernelError, k_range_step_zero, "range_step0", _f32(), _f32(), BLOCK=16)


def test_integer_constant_too_large():
    """2**70 fits no kernel dtype: an error, not a silently truncated C literal."""
    x = torch.zeros(16, dtype=torch.int64)
    _compile_error(KernelError, k_int_too_big, "int_too_big", x, x.clone(), BLOCK=16)


def test_unpack_mismatch():
    _compile_error(KernelSyntaxError, k_unpack, "unpack", _f32(), _f32(), BLOCK=16)


# ---------------------------------------------------------------------------------------
# kernels Tessera cannot read
# ---------------------------------------------------------------------------------------

def test_kernel_without_source():
    ns: dict = {}
    exec("def f(x, out):\n    out[0:4] = x[0:4]\n", ns)
    k = tl.kernel(ns["f"])
    with pytest.raises(KernelSyntaxError):
        k[(1,)](_f32(), _f32())


LAMBDA_KERNEL = tl.kernel(
    lambda x, out: None)


def test_kernel_from_lambda():
    with pytest.raises(KernelError):
        LAMBDA_KERNEL[(1,)](_f32(), _f32())


def test_star_args_kernel():
    def f(x, *rest):
        pass
    with pytest.raises(LaunchError):
        tl.kernel(f)


# ---------------------------------------------------------------------------------------
# launch errors
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_copy(x, out, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = x[i:i + BLOCK]


def _launch_error(grid, *args, **kwargs) -> LaunchError:
    with pytest.raises(LaunchError) as info:
        k_copy[grid](*args, **kwargs)
    msg = str(info.value)
    first = k_copy.fn.__code__.co_firstlineno
    assert any(f"{FILE}:{line}" in msg for line in (first, first + 1)), msg
    return info.value


def test_call_without_grid():
    with pytest.raises(LaunchError) as info:
        k_copy(_f32(), _f32(), BLOCK=16)
    assert "grid" in str(info.value)
    assert FILE in str(info.value)


def test_too_many_arguments():
    _launch_error((1,), _f32(), _f32(), 16, 3)


def test_unknown_keyword():
    err = _launch_error((1,), _f32(), _f32(), BLOCK=16, BLOKC=3)
    assert "BLOKC" in str(err)


def test_missing_argument():
    err = _launch_error((1,), _f32(), BLOCK=16)
    assert "out" in str(err)


def test_missing_constexpr():
    err = _launch_error((1,), _f32(), _f32())
    assert "BLOCK" in str(err)


def test_duplicate_argument():
    _launch_error((1,), _f32(), _f32(), 16, BLOCK=16)


@pytest.mark.parametrize("bad", ["a string", [1.0, 2.0], None, object(), (1, 2)],
                         ids=["str", "list", "None", "object", "tuple"])
def test_unsupported_argument_type(bad):
    err = _launch_error((1,), bad, _f32(), BLOCK=16)
    assert "'x'" in str(err)


@pytest.mark.parametrize("bad", [torch.zeros(4, dtype=torch.complex64),
                                 torch.zeros(4, dtype=torch.float64),
                                 torch.zeros(4, dtype=torch.int16),
                                 np.zeros(4, np.float64),
                                 np.zeros(4, np.complex64)],
                         ids=["torch-complex64", "torch-float64", "torch-int16",
                              "numpy-float64", "numpy-complex64"])
def test_unsupported_dtype(bad):
    err = _launch_error((1,), bad, _f32(4), BLOCK=16)
    assert "'x'" in str(err)


def test_bad_constexpr_type():
    _launch_error((1,), _f32(), _f32(), BLOCK=[16])
    _launch_error((1,), _f32(), _f32(), BLOCK=_f32())


def test_int_argument_too_large():
    @tl.kernel
    def k_scalar(x, out, n):
        out[0:4] = x[0:4] + n
    with pytest.raises(LaunchError):
        k_scalar[(1,)](_f32(), _f32(), 2**64)


@pytest.mark.parametrize("grid", [(-1,), (1, -2), (1.0,), (2.5,), 2.5, (1, 1, 1, 1), (),
                                  "abc", None, (True,), (1, None)],
                         ids=["neg", "neg-axis1", "float-int", "float", "bare-float",
                              "4-axes", "empty", "str", "None", "bool", "None-axis"])
def test_bad_grid(grid):
    _launch_error(grid, _f32(), _f32(), BLOCK=16)


def test_bad_grid_from_callable():
    _launch_error(lambda meta: (-1,), _f32(), _f32(), BLOCK=16)
    _launch_error(lambda meta: (1, 1, 1, 1), _f32(), _f32(), BLOCK=16)


def test_store_into_readonly_numpy():
    out = np.broadcast_to(np.zeros(1, np.float32), (16,))
    err = _launch_error((1,), np.zeros(16, np.float32), out, BLOCK=16)
    assert "'out'" in str(err)
    assert not out.any()


def test_store_into_readonly_numpy_flag():
    out = np.zeros(16, np.float32)
    out.flags.writeable = False
    _launch_error((1,), np.ones(16, np.float32), out, BLOCK=16)
    assert not out.any()


def test_store_into_expanded_torch():
    base = torch.zeros(1)
    out = base.expand(16)
    err = _launch_error((1,), _f32(), out, BLOCK=16)
    assert "'out'" in str(err)


def test_store_into_expanded_torch_2d():
    base = torch.zeros(1, 8)
    out = base.expand(4, 8)

    @tl.kernel
    def k2(x, out, BM: tl.constexpr, BN: tl.constexpr):
        out[0:BM, 0:BN] = x[0:BM, 0:BN]
    with pytest.raises(LaunchError):
        k2[(1,)](torch.ones(4, 8), out, BM=4, BN=8)
    assert not base.any()


def test_reading_readonly_is_fine():
    """Read-only or expanded *inputs* are allowed."""
    x = np.broadcast_to(np.ones(1, np.float32), (16,))
    out = np.zeros(16, np.float32)
    k_copy[(1,)](x, out, BLOCK=16)
    assert (out == 1).all()
    tout = torch.zeros(16)
    k_copy[(1,)](torch.ones(1).expand(16), tout, BLOCK=16)
    assert (tout == 1).all()


@pytest.mark.parametrize("fn", [tl.exp, tl.sqrt, tl.program_id, tl.arange, tl.zeros,
                                tl.where, tl.sum, tl.load, tl.maximum],
                         ids=lambda f: repr(f))
def test_builtin_outside_kernel(fn):
    with pytest.raises(KernelError) as info:
        fn(1.0)
    assert "kernel" in str(info.value)


def test_exp_outside_kernel_on_tensor():
    with pytest.raises(KernelError):
        tl.exp(torch.zeros(3))


def test_cdiv_outside_kernel_works():
    assert tl.cdiv(10, 3) == 4
    assert tl.cdiv(9, 3) == 3
    assert tl.cdiv(0, 3) == 0
