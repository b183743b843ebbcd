"""tessera.compile (through torch.export), save, and load in a new process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tessera
from tessera.errors import TesseraError
from tessera.graph.ir import GraphError


class Block(torch.nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = F.gelu(self.norm(self.fc(x))) * self.scale + x
        return torch.softmax(h, dim=-1), {"total": h.sum()}


def _close(got: object, want: object) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_runs_and_keeps_the_output_structure() -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 5, 32)
    cm = tessera.compile(model, (x,))
    with torch.no_grad():
        want = model(x)
        for _ in range(3):  # interpreted, recorded, replayed
            _close(cm(x), want)
    assert [n.op for n in cm.graph.nodes if n.kind == "torch"] == []


def test_dynamic_sequence_length() -> None:
    model = Block().eval()
    seq = torch.export.Dim("seq", min=2, max=64)
    cm = tessera.compile(model, (torch.randn(1, 8, 32),), dynamic={"x": {1: seq}})
    with torch.no_grad():
        for n in (3, 9, 9, 9):
            x = torch.randn(1, n, 32)
            _close(cm(x), model(x))
    assert cm.executable.recordings == 1


_LOAD = """
import sys, torch, tessera
torch.export.export = None  # loading must not trace again
x, want = torch.load(sys.argv[2])
cm = tessera.load(sys.argv[1])
for _ in range(3):
    torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_save_and_load_in_a_new_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 4, 32)
    tessera.compile(model, (x,)).save(tmp_path / "block.tsr")
    with torch.no_grad():
        torch.save((x, model(x)), tmp_path / "io.pt")
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(_LOAD))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "block.tsr"),
                          str(tmp_path / "io.pt")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_bad_inputs(tmp_path: Path) -> None:
    model = Block().eval()
    cm = tessera.compile(model, (torch.randn(2, 3, 32),))
    with pytest.raises(TesseraError, match="takes 1 tensor inputs, got 2"):
        cm(torch.randn(2, 3, 32), torch.randn(2, 3, 32))
    with pytest.raises(TesseraError, match=r"must be a .*float32"):
        cm(torch.randn(2, 3, 32).double())
    with pytest.raises(TesseraError, match=r"takes a torch\.nn\.Module"):
        tessera.compile(lambda x: x, (torch.randn(2),))
    (tmp_path / "junk.tsr").write_bytes(b"not a model")
    with pytest.raises(TesseraError, match="is not a saved Tessera model"):
        tessera.load(tmp_path / "junk.tsr")
    path = tmp_path / "evil.tsr"
    cm.save(path)
    data = torch.load(path, weights_only=True)
    data["graph"]["nodes"][0]["fn"] = "os.system"  # a file naming code outside torch
    torch.save(data, path)
    with pytest.raises(GraphError, match="outside torch"):
        tessera.load(path)
