"""Tessera demo: a fused operator written once in Python, compiled to C for this CPU,
checked against PyTorch and timed beside it.

    make demo        (or: .venv/bin/python examples/demo.py)

Grows with the project; today it shows the runtime and the kernel language.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.syntax import Syntax

import tessera
import tessera.lang as tl
from tessera.kernels import flash_attention

console = Console()


@tl.kernel
def bias_gelu(x, bias, out, BM: tl.constexpr, BN: tl.constexpr):
    """out = gelu(x + bias): one pass over memory, no intermediate tensor."""
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    out[i:i + BM, j:j + BN] = tl.gelu(x[i:i + BM, j:j + BN] + bias[j:j + BN][None, :])


def _median_ms(fn: Callable[[], object], repeat: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    props = tessera.device("cpu").properties()
    console.rule("[bold]1. the device")
    console.print(f"{props['model']}: {props['cores']} cores, ISA {' '.join(props['isa'])}; "
                  f"measured {props['peak_gflops_fp32']:.0f} GFLOPS fp32, "
                  f"{props['copy_bandwidth_gbs']:.1f} GB/s copy")

    console.rule("[bold]2. a fused kernel in Python, compiled to C")
    m, n = 4096, 4096
    x, bias, out = torch.randn(m, n), torch.randn(n), torch.empty(m, n)
    grid = (tl.cdiv(m, 8), tl.cdiv(n, 512))
    t0 = time.perf_counter()
    bias_gelu[grid](x, bias, out, BM=8, BN=512)
    console.print(f"first launch (trace, generate C, compile or load from cache): "
                  f"{1e3 * (time.perf_counter() - t0):.0f} ms")
    source = bias_gelu.source(x, bias, out, BM=8, BN=512)
    body = source[source.index("static void tsr_run"):source.index("/* Launch ABI")]
    console.print(Syntax("\n".join(body.splitlines()[:16]) + "\n    ...", "c"))

    console.rule("[bold]3. checked against PyTorch, timed beside it")
    want = F.gelu(x + bias)
    err = (out - want).abs().max().item()
    ours = _median_ms(lambda: bias_gelu[grid](x, bias, out, BM=8, BN=512))
    theirs = _median_ms(lambda: F.gelu(x + bias))
    console.print(f"bias+GELU {m}x{n}: max |error| vs torch {err:.1e}; tessera {ours:.2f} ms, "
                  f"torch eager {theirs:.2f} ms ({theirs / ours:.2f}x)")

    q, k, v = (torch.randn(1, 8, 512, 64) for _ in range(3))
    got = flash_attention(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    err_attn = (got - want).abs().max().item()
    console.print(f"FlashAttention (causal, 8 heads, 512 tokens, 25 lines of tl): "
                  f"max |error| vs torch SDPA {err_attn:.1e}")
    console.print("tables from interleaved runs: [bold]tessera bench lang[/bold]")
    if err > 1e-5 or err_attn > 1e-4:
        raise SystemExit("results differ from torch")


if __name__ == "__main__":
    main()
