"""tessera opgen: an op of each kind, generated into a copy of the tree, passes its own tests,
is ruff-clean, runs its benchmark and leaves docs/ops.md current; bad names, kinds, trees
and existing ops or files are refused with nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.tools.opgen import MAX_NAME, OpgenError, generate, tessera_tree

ROOT = Path(__file__).resolve().parents[2]
# one op per kind; the longest name opgen takes checks that no generated line grows too long
NAMES = {"pointwise": "quick_gelu_test", "reduction": "rms_" + "x" * (MAX_NAME - 4),
         "template": "linear_silu_test"}
# what the generated tests need besides the package: pytest's configuration, the test
# helpers, the docs page and the test that checks it
_TREE_FILES = ("pyproject.toml", "docs/ops.md", "tests/conftest.py", "tests/marks.py",
               "tests/ops/conftest.py", "tests/ops/opcheck.py", "tests/ops/test_registry.py")

# Runs in the copy: the generated tests and the docs check under pytest, then each
# generated benchmark's quick cases once (checked against torch, then timed).
_DRIVER = """
import importlib
import sys

import pytest

from tessera.bench.runner import run_case

code = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]])
if code:
    sys.exit(f"pytest exited with {code}")
for name in sys.argv[1].split(","):
    for case in importlib.import_module(f"tessera.bench.ops.{name}").cases(True):
        rows = run_case("ops", case, rounds=1, min_sample_s=1e-4)
        print("bench", case.name, *sorted(r["impl"] for r in rows))
"""


def _copy_tree(dst: Path) -> Path:
    shutil.copytree(ROOT / "src/tessera", dst / "src/tessera",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for f in _TREE_FILES:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / f, dst / f)
    return dst


def _env(tree: Path) -> dict[str, str]:
    """The copy's sources first; this session's compile cache (kernels built once); no
    native fast-path build (the generated ops do not use it)."""
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "TESSERA_OPS_FASTPATH": "0",
            "TESSERA_TEST_CACHE": os.environ["TESSERA_CACHE_DIR"]}


def _snapshot(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _generated_files(name: str) -> list[str]:
    return [f"src/tessera/ops/{name}.py", f"tests/ops/test_{name}.py",
            f"src/tessera/bench/ops/{name}.py"]


def _generate_all(root: Path) -> str:
    """One op per kind into the tree: two through `generate`, one through the command,
    whose output is returned."""
    for kind in ("pointwise", "template"):
        g = generate(NAMES[kind], kind, root=root)
        assert [str(p.relative_to(root)) for p in g.files] == _generated_files(NAMES[kind])
    out = subprocess.run([sys.executable, "-m", "tessera", "opgen", NAMES["reduction"],
                          "--kind", "reduction", "--root", str(root)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _drive(tree: Path) -> str:
    """Run the driver (generated tests and the docs check, then the benchmarks) in the
    copy; its output."""
    tests = [f"tests/ops/test_{n}.py" for n in NAMES.values()]
    env = {k: v for k, v in _env(tree).items() if not k.startswith("PYTEST_")}
    r = subprocess.run([sys.executable, "-c", _DRIVER, ",".join(NAMES.values()), *tests,
                        "tests/ops/test_registry.py::test_docs_current"], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


@pytest.mark.slow
def test_each_kind_is_green_from_the_start(tmp_path: Path) -> None:
    """(One test, so that pytest-xdist never builds the copy twice.)"""
    tree = _copy_tree(tmp_path)
    printed = _generate_all(tree)
    name = NAMES["reduction"]
    for f in [*_generated_files(name), "docs/ops.md"]:
        assert f"  {f}\n" in printed, printed
    assert f"PYTHONPATH=src python -m pytest tests/ops/test_{name}.py" in printed
    assert f"python -m tessera bench ops --quick --only '{name}_[0-9]*x[0-9]*'" in printed

    driven = _drive(tree)
    summary = [line for line in driven.splitlines() if " passed" in line]
    assert summary and summary[-1].startswith("18 passed"), driven  # every test ran
    rows = [line.split() for line in driven.splitlines() if line.startswith("bench ")]
    cases = [f"{NAMES[k]}_{size}" for k in ("pointwise", "reduction") for size in
             ("32x384", "256x1024")] + [f"{NAMES['template']}_m8_k256_n256",
                                        f"{NAMES['template']}_m32_k1024_n1024"]
    assert sorted(r[1] for r in rows) == sorted(cases), rows
    assert all(r[2:] == ["tessera", "torch_eager"] for r in rows), rows

    files = [f for n in NAMES.values() for f in _generated_files(n)]
    r = subprocess.run([sys.executable, "-m", "ruff", "check", *files], cwd=tree,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

    # refused: an existing op's files, a family module, an op registered at run time
    name = NAMES["pointwise"]
    before = _snapshot(tree)
    with pytest.raises(OpgenError, match=r"(?s)exists already.*--force"):
        generate(name, "reduction", root=tree)
    with pytest.raises(OpgenError, match="not op 'pointwise''s own"):
        generate("pointwise", "pointwise", root=tree, force=True)
    with pytest.raises(OpgenError, match=r"'relu' is an existing op.*nothing was written"):
        generate("relu", "pointwise", root=tree)  # caught when the tree is imported
    assert _snapshot(tree) == before
    # --force: only over what opgen wrote
    bench = tree / f"src/tessera/bench/ops/{name}.py"
    bench.write_text(bench.read_text().replace("tessera opgen", "hand"))
    with pytest.raises(OpgenError, match="not written by opgen"):
        generate(name, "pointwise", root=tree, force=True)
    bench.write_bytes(before[str(bench.relative_to(tree))])
    g = generate(name, "reduction", root=tree, force=True)  # the same files, another kind
    assert f"def {name}_rows(x, out, R" in g.files[0].read_text()
    assert f"| `{name}` | `Tensor x, int dim=-1" in (tree / "docs/ops.md").read_text()


def _small_tree(root: Path) -> Path:
    """The files that make a directory a Tessera tree, for checks made before writing."""
    for f in ("src/tessera/ops/registry.py", "src/tessera/ops/docs.py",
              "src/tessera/bench/ops/__init__.py", "tests/ops/opcheck.py", "docs/ops.md",
              "src/tessera/ops/__init__.py"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / f, root / f)
    return root


@pytest.mark.parametrize(("name", "match"), [
    ("1abc", "not a lowercase Python identifier"), ("Gelu", "not a lowercase"),
    ("my-op", "not a lowercase"), ("_hidden", "not a lowercase"), ("", "not a lowercase"),
    ("x" * (MAX_NAME + 1), "characters long"), ("lambda", "Python keyword"),
    ("round", "Python builtin"),
    ("get", "already a name of the tessera.ops package"), ("list", "Python builtin"),
    ("registry", "not op 'registry''s own"),
])
def test_bad_names_refused(tmp_path: Path, name: str, match: str) -> None:
    tree = _small_tree(tmp_path)
    before = _snapshot(tree)
    with pytest.raises(OpgenError, match=match):
        generate(name, "pointwise", root=tree)
    assert _snapshot(tree) == before


def test_bad_kinds_trees_and_files_refused(tmp_path: Path) -> None:
    tree = _small_tree(tmp_path / "tree")
    with pytest.raises(OpgenError, match="unknown op kind 'elementwise'"):
        generate("fine", "elementwise", root=tree)
    with pytest.raises(OpgenError, match=r"not a Tessera source tree.*registry\.py"):
        generate("fine", "pointwise", root=tmp_path)
    (tree / "tests/graph").mkdir()
    (tree / "tests/graph/test_fine.py").write_text("")
    with pytest.raises(OpgenError, match=r"test_fine\.py exists already.*pytest"):
        generate("fine", "pointwise", root=tree)
    own = tree / "src/tessera/ops/mine.py"
    own.write_text('@op("mine(Tensor x) -> Tensor", kind="pointwise", reference=f)\n')
    with pytest.raises(OpgenError, match="not written by opgen"):
        generate("mine", "pointwise", root=tree, force=True)
    assert tessera_tree() == ROOT  # the default: the running Tessera's tree


def test_command_reports_errors_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "tessera", "opgen", "class", "--kind",
                          "pointwise", "--root", str(_small_tree(tmp_path))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "OpgenError: op name 'class' is a Python keyword" in \
        out.stderr, out.stderr


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tessera.tools.opgen as opgen

    tree = _small_tree(tmp_path)
    before = _snapshot(tree)
    write = opgen._write

    def full_disk(path: Path, data: bytes) -> None:
        if path.name.startswith("test_"):  # the second of the three files
            raise OSError(28, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(opgen, "_write", full_disk)
    with pytest.raises(OpgenError, match="No space left on device; nothing was written"):
        generate("fine", "pointwise", root=tree)
    assert _snapshot(tree) == before
