"""The `device` fixture: kernel-language tests that take it run once on the CPU and once on
the first OpenCL device (skipped, with the reason, only where no OpenCL device exists and
none is required: tests/conftest.py's `opencl_device`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import tessera


class Target:
    """A device to launch test kernels on, given host (torch or numpy) tensors: on the CPU
    they are passed as they are; elsewhere each goes to the device (one copy per distinct
    tensor, so arguments that are one tensor stay one) and every tensor comes back into
    the host original after the launch, so tests check the same objects either way."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def launch(self, kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
        if self.name == "cpu":
            kernel[grid](*args, **kwargs)
            return
        moved: dict[int, tuple[Any, Any]] = {}

        def to_device(x: Any) -> Any:
            if not isinstance(x, (torch.Tensor, np.ndarray)):
                return x
            if id(x) not in moved:
                moved[id(x)] = (x, tessera.as_tensor(x).to(self.name))
            return moved[id(x)][1]

        kernel[grid](*map(to_device, args), **{k: to_device(v) for k, v in kwargs.items()})
        for host, dev in moved.values():
            back = dev.cpu()
            if isinstance(host, np.ndarray):
                np.copyto(host, back.numpy())
            else:
                host.copy_(back.torch())


@pytest.fixture(params=["cpu", "opencl"])
def device(request: pytest.FixtureRequest) -> Target:
    if request.param == "opencl":  # skips without a device, or fails where one is required
        request.getfixturevalue("opencl_device")
    return Target(request.param)


@pytest.fixture
def opencl_target(opencl_device: Any) -> Target:
    """The OpenCL target alone, for tests whose CPU twin is written apart (other limits)."""
    return Target("opencl")
