"""tessera.ops on an OpenCL device: the same op definitions, data on the device, checked
against torch on the host (PoCL in CI)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from opcheck import close
from test_opinfo import COVERED, OUTSIDE, _opinfos

import tessera
import tessera.ops as O
from tessera.errors import DeviceError, TesseraError
from tessera.ops import device as ops_device


def on(dev, x):
    if isinstance(x, (list, tuple)):
        return type(x)(on(dev, v) for v in x)
    return tessera.as_tensor(x).to(dev) if isinstance(x, torch.Tensor) else x


def back(y):
    if isinstance(y, (tuple, list)):
        return type(y)(back(v) for v in y)
    return y.cpu().torch() if isinstance(y, tessera.Tensor) else y


def check_on(dev, name, *args, **kwargs):
    """Op `name` on device copies of the arguments equals its torch reference on the host."""
    got = getattr(O, name)(*(on(dev, a) for a in args),
                           **{k: on(dev, v) for k, v in kwargs.items()})
    assert all(t.device == dev for t in (got if isinstance(got, (tuple, list)) else [got])
               if isinstance(t, tessera.Tensor))
    close(back(got), O.get(name).reference(*args, **kwargs), what=f"{name} on {dev.name}")
    return got


def test_pointwise(opencl_device):
    x, y = torch.randn(37, 70), torch.randn(70)
    check_on(opencl_device, "add", x, y)  # broadcast
    check_on(opencl_device, "mul", x, 2.5)  # a Python scalar
    check_on(opencl_device, "gelu", x)
    check_on(opencl_device, "where", x > 0, x, y)
    check_on(opencl_device, "exp", x.to(torch.bfloat16))


def test_reductions_and_softmax(opencl_device):
    x = torch.randn(6, 50, 33)
    check_on(opencl_device, "sum", x, [1])
    check_on(opencl_device, "amax", x, [-1], True)
    check_on(opencl_device, "softmax", x, -1)
    check_on(opencl_device, "log_softmax", x, 1)  # a column reduction
    check_on(opencl_device, "argmax", x, -1)


def test_norms(opencl_device):
    x, w, b = torch.randn(9, 96), torch.randn(96), torch.randn(96)
    check_on(opencl_device, "layer_norm", x, [96], w, b)
    check_on(opencl_device, "rms_norm", x.to(torch.float16), [96], w.to(torch.float16))


def test_products_with_epilogues(opencl_device):
    x, w, b = torch.randn(3, 17, 40), torch.randn(24, 40), torch.randn(24)
    check_on(opencl_device, "linear", x, w, b, activation="silu")
    r = torch.randn(3, 17, 24)
    check_on(opencl_device, "matmul", x, w.t(), residual=r)  # transposed: strides honored
    check_on(opencl_device, "bmm", torch.randn(4, 9, 33), torch.randn(4, 33, 5))


def test_attention(opencl_device):
    q, k, v = torch.randn(2, 4, 19, 16), torch.randn(2, 2, 23, 16), torch.randn(2, 2, 23, 16)
    check_on(opencl_device, "scaled_dot_product_attention", q, k, v, enable_gqa=True)
    check_on(opencl_device, "scaled_dot_product_attention", q, q, q, is_causal=True)
    mask = torch.rand(2, 1, 19, 23) > 0.2
    check_on(opencl_device, "scaled_dot_product_attention", q, k, v, attn_mask=mask,
             enable_gqa=True)


def test_shape_and_index(opencl_device):
    x = torch.randn(5, 6, 7)
    check_on(opencl_device, "transpose", x, 0, 2)
    check_on(opencl_device, "cat", [x, x * 2], 1)
    table, ids = torch.randn(50, 12), torch.randint(0, 50, (4, 9))
    check_on(opencl_device, "embedding", table, ids)


def test_empty_tensors(opencl_device):
    """Empty operands (a null data pointer) launch fine: K = 0 gives zeros, as torch."""
    check_on(opencl_device, "matmul", torch.randn(5, 5, 0), torch.randn(0, 5))
    check_on(opencl_device, "add", torch.randn(0, 3), torch.randn(3))
    check_on(opencl_device, "softmax", torch.randn(4, 0), -1)


def test_results_stay_on_the_device_and_chain(opencl_device):
    x = on(opencl_device, torch.randn(8, 64))
    y = O.softmax(O.gelu(x))
    assert y.device == opencl_device
    close(back(y), torch.softmax(F.gelu(back(x)), -1))


def test_mixed_devices_are_refused(opencl_device):
    x = torch.randn(4, 4)
    with pytest.raises(DeviceError, match="on the host"):
        O.add(on(opencl_device, x), x)
    with pytest.raises(DeviceError, match="on the host"):
        O.add(on(opencl_device, x), tessera.as_tensor(x))


def test_host_only_ops(opencl_device):
    """Ops on C templates and host tables run on host copies of device data, with one
    warning per op; results come back on the device."""
    x, w = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_on(opencl_device, "conv2d", x, w, padding=[1, 1])
        check_on(opencl_device, "max_pool2d", x, [2, 2])
        check_on(opencl_device, "topk", x.reshape(18, 27), 5)
    assert {("conv2d", "its implementation"), ("topk", "its implementation")} <= \
        ops_device.round_trips().keys()
    assert sum("ran on the host" in str(w.message) for w in seen) >= 3
    assert not ops_device.runs_on_devices("conv2d") and ops_device.runs_on_devices("softmax")


def test_torch_on_the_host_is_counted_and_warned(opencl_device):
    x = on(opencl_device, torch.randn(3, 5))
    before = sum(ops_device.round_trips().values())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with ops_device.session(opencl_device, "test") as s:
            a = s.alias(x)
            y = s.adopt(torch.cumsum(a, 0))  # no Tessera kernel: torch, on host copies
    assert sum(ops_device.round_trips().values()) == before + 1
    assert any("ran on the host" in str(w.message) for w in seen)
    close(back(y), torch.cumsum(back(x), 0))


DEVICE_SAMPLES = 1  # per OpInfo (its middle one): kernels build for the CPU and the device


@pytest.mark.slow
@pytest.mark.parametrize("info", [o for o in _opinfos() if ops_device.runs_on_devices(
    COVERED[(o.name, o.variant_test_name)][0])], ids=lambda o: ".".join(
        filter(None, (o.name, o.variant_test_name))))
def test_opinfo_samples_on_opencl(opencl_device, info):
    """OpInfo's samples (a few per op) on OpenCL tensors against the OpInfo's op on the
    host, for every covered op that runs over device data (the host-only ones run their
    CPU implementation on copies: test_host_only_ops)."""
    name, adapt = COVERED[(info.name, info.variant_test_name)]
    calls = [(i, sample, call) for i, sample in enumerate(info.sample_inputs("cpu",
                                                                             torch.float32))
             if (call := adapt(sample)) is not OUTSIDE]
    stride = -(-len(calls) // DEVICE_SAMPLES)
    calls = calls[len(calls) // 2:] + calls[:len(calls) // 2]  # start from the middle one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # host round trips of host-only ops
        for i, sample, (args, kwargs) in calls[::stride]:
            want = info.op(sample.input, *sample.args, **sample.kwargs)
            try:
                got = getattr(O, name)(*on(opencl_device, args),
                                       **{k: on(opencl_device, v) for k, v in kwargs.items()})
            except TesseraError as e:
                raise AssertionError(f"{name} on OpenCL refused OpInfo sample {i} ({sample}): "
                                     f"{e}") from e
            close(back(got), tuple(want) if isinstance(want, tuple) else want, atol=1e-4,
                  rtol=1e-4, what=f"{name} sample {i} on {opencl_device.name}")
