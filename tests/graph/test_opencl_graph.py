"""torch.compile(..., options={"device": "opencl"}): graphs run on an OpenCL device, with
host tensors in and out, recorded once and replayed (PoCL in CI)."""

from __future__ import annotations

import warnings

import pytest
import torch

import tessera
from tessera.bench import zoo
from tessera.errors import DeviceError


def _flat(o):
    return [o] if isinstance(o, torch.Tensor) else [x for y in o for x in _flat(y)]


def _close(got, want, tol=1e-5):
    for g, w in zip(_flat(got), _flat(want), strict=True):
        assert g.device.type == "cpu" and g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def _last_runner():
    import tessera.graph as G
    return [ex for ex in G.compiled() if ex.runner is not None][-1].runner


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_zoo_model_records_then_replays(opencl_device, name):
    z = zoo.build(name, "tiny")
    # (through torch.export: dynamo's state for the zoo's shared forward code stays clean)
    c = tessera.compile(z.model, z.inputs(2, 8), options={"device": "opencl"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BERT's mask is built by torch
        for seed in range(3):  # new inputs each call: the replay reads them
            torch.manual_seed(seed)
            inputs = z.inputs(2, 8)
            _close(c(*inputs), z.model(*inputs))
    assert _last_runner().calls == {"record": 1, "replay": 2}


def test_shapes_get_their_own_plan_and_bad_options_are_refused(opencl_device):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                            torch.nn.Linear(32, 8), torch.nn.Softmax(-1)).eval()
    c = tessera.compile(m, (torch.randn(4, 16),), options={"device": opencl_device.name})
    with torch.no_grad():
        for rows in (4, 9, 4):
            x = torch.randn(rows, 16)
            _close(c(x), m(x))
    with pytest.raises(DeviceError, match="does not exist"):
        tessera.compile(m, (torch.randn(4, 16),), options={"device": "opencl:99"})
    with pytest.raises(DeviceError, match="unknown device type"):
        tessera.compile(m, (torch.randn(4, 16),), options={"device": "tpu"})


class _Mixed(torch.nn.Module):
    """A convolution (C template: runs on the host), a torch fallback (cumsum) and device
    ops in one graph."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).flatten(1)
        return torch.softmax(self.fc(y), -1).cumsum(-1)


def test_host_steps_rerun_in_replays(opencl_device):
    torch.manual_seed(0)
    m = _Mixed().eval()
    c = torch.compile(m, backend="tessera", options={"device": "opencl"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(3):
            x = torch.randn(2, 3, 8, 8)
            _close(c(x), m(x), tol=1e-5)
    assert _last_runner().calls == {"record": 1, "replay": 2}


def test_host_steps_read_weights_from_their_host_copies(opencl_device, monkeypatch):
    """A host step (here a convolution) gets the graph's weights from their host data, not
    by downloading them at every call: a replay reads back activations only."""
    torch.manual_seed(0)
    m = torch.nn.Conv2d(64, 64, 3).eval()  # 147 KB of weights, 4 KB of input
    x = torch.randn(1, 64, 4, 4)
    c = tessera.compile(m, (x,), options={"device": "opencl"})
    read, total = opencl_device.read, [0]

    def counting(address, nbytes):
        total[0] += nbytes
        return read(address, nbytes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        c(x)
        monkeypatch.setattr(opencl_device, "read", counting)
        _close(c(x), m(x), tol=1e-4)
    weight_bytes = m.weight.numel() * 4
    assert 0 < total[0] < weight_bytes // 4
