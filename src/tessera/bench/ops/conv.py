"""Family `conv`: tessera.ops.conv2d against torch eager (oneDNN) and Inductor on ResNet-50's
convolutions at batch 1 (NCHW float32, with a bias: inference with batch norm folded in):
the 7x7/2 stem, 3x3 and 1x1 layers of each stage, a strided 3x3 and the strided 1x1
downsample. Reports GFLOPS. Goal: conv2d >= 1.0x torch eager."""

from __future__ import annotations

from tessera.bench.cases import op_case
from tessera.bench.runner import Case

# name: (in channels, out channels, kernel, stride, padding, input size)
LAYERS = {
    "stem_7x7s2_3x64_224": (3, 64, 7, 2, 3, 224),
    "3x3_64_56": (64, 64, 3, 1, 1, 56),
    "1x1_256x64_56": (256, 64, 1, 1, 0, 56),
    "3x3s2_128_56": (128, 128, 3, 2, 1, 56),
    "3x3_256_14": (256, 256, 3, 1, 1, 14),
    "3x3_512_7": (512, 512, 3, 1, 1, 7),
    "1x1s2_1024x2048_14": (1024, 2048, 1, 2, 0, 14),
}
QUICK = ("3x3_64_56", "3x3_256_14")


def cases(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    out = []
    for name, (cin, cout, k, s, p, size) in LAYERS.items():
        if quick and name not in QUICK:
            continue
        gen = torch.Generator().manual_seed(cin * cout)
        x = torch.randn(1, cin, size, size, generator=gen)
        w = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
        b = torch.randn(cout, generator=gen)
        o = (size + 2 * p - k) // s + 1
        out.append(op_case(f"conv2d_{name}", O.conv2d, torch.nn.functional.conv2d,
                           (x, w, b, s, p), quick, flops=2 * cout * o * o * cin * k * k,
                           atol=1e-4, rtol=1e-4))
    return out
