"""A small PyTorch inference script written for a GPU, unchanged: run it here with

    tessera run examples/gpu_script.py --steps 20

It asks for CUDA (`.cuda()`, `device="cuda"`, `.to("cuda")`), compiles the model with
`torch.compile` (no backend: under `tessera run`, Tessera's), times it with CUDA events and
synchronizes. `--save FILE` writes the compiled model's output (tests compare it with eager).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm MLP block with a residual, the shape of a transformer's feed-forward half."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def build_model(dim: int = 64, depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(Block(dim) for _ in range(depth))).eval()


def make_inputs(batch: int = 8, dim: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, dim, generator=g).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save", default=None, help="torch.save the output here")
    args = parser.parse_args()

    assert torch.cuda.is_available(), "this script needs a GPU"
    device = torch.device("cuda")
    torch.cuda.manual_seed_all(0)
    print(f"device: {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device)")

    model = build_model().cuda()
    x = make_inputs(device=device)
    bias = torch.zeros(64, device="cuda")
    compiled = torch.compile(model)

    with torch.no_grad():
        y = compiled(x) + bias  # first call compiles
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.steps):
            y = compiled(x) + bias
        end.record()
        torch.cuda.synchronize()
    print(f"output checksum: {y.double().sum().item():.6f}")
    print(f"{start.elapsed_time(end) / args.steps:.3f} ms per step, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if args.save:
        torch.save(y.cpu(), args.save)


if __name__ == "__main__":
    main()
