"""`tessera opgen`: scaffold a new operator into a Tessera source tree, green from the start.

`generate(name, kind)` writes the op's definition and kernel (src/tessera/ops/NAME.py:
`@op` with schema, torch reference and dtypes, the kernel in the kernel language or on
the GEMM template), its tests (tests/ops/test_NAME.py, through opcheck) and its benchmark
(src/tessera/bench/ops/NAME.py, a `cases(quick)` module of `tessera bench ops`), then
regenerates docs/ops.md. The code computes a concrete example per kind (see `KINDS`) for
the user to edit. Names are checked before anything is written; the tree is then
imported afresh with the new op in a separate interpreter (which also catches names an
existing op registers at run time), and if that fails every file is put back as it was.
"""

from __future__ import annotations

import builtins
import keyword
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import ModuleType

from tessera.errors import TesseraError
from tessera.tools.opgen import pointwise, reduction, template

__all__ = ["KINDS", "Generated", "OpgenError", "generate", "tessera_tree"]

# opgen kind -> the module holding its templates: SUMMARY, OP, TEST,
# BENCH (or BENCH_BYTES for one-input ops, whose benchmark is _UNARY_BENCH), CASES (the
# pattern of the bench cases' names after the op's)
_TEMPLATES: dict[str, ModuleType] = {"pointwise": pointwise, "reduction": reduction,
                                     "template": template}
KINDS = {kind: m.SUMMARY for kind, m in _TEMPLATES.items()}  # what each kind's example computes
_MADE_BY = "tessera opgen"  # what every generated file says in its docstring
MAX_NAME = 24  # keeps every generated line within the tree's 100 columns

# the files a Tessera tree has, relative to its root, that the generated ones build on
_TREE_MARKS = ("src/tessera/ops/registry.py", "src/tessera/ops/docs.py",
               "src/tessera/bench/ops/__init__.py", "tests/ops/opcheck.py", "docs/ops.md")

_UNARY_BENCH = '''"""Benchmark of `$name` (made by `tessera opgen`)
against torch eager, its reference:
`tessera bench ops --quick --only '${name}${cases}'`."""

from __future__ import annotations

from tessera.bench.cases import torch_case
from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    torch.manual_seed(0)
    reference = O.get("$name").reference
    out: list[Case] = []
    for m, n in ((32, 384), (256, 1024) if quick else (4096, 4096)):
        x = torch.randn(m, n)
        ours = lambda x=x: O.$name(x)
        out.append(torch_case(f"${name}_{m}x{n}", ours, reference, (x,), quick,
                              bytes_moved=$bytes_moved))
    return out
'''

# Run in a fresh interpreter with the tree's src first on sys.path: import every op (the
# new one included) and print docs/ops.md as the registry renders it.
_VALIDATE = """
import sys
from pathlib import Path

import tessera

src, name = Path(sys.argv[1]).resolve(), sys.argv[2]
if Path(tessera.__file__).resolve().parent != src / "tessera":
    sys.exit(f"python imported tessera from {tessera.__file__}, not from {src}")
try:
    import tessera.ops
except ValueError as e:
    if "registered twice" not in str(e):
        raise
    sys.exit(f"twice: {e}")
from tessera.ops import docs

tessera.ops.get(name)
sys.stdout.write(docs.render())
"""


class OpgenError(TesseraError, ValueError):
    """A name, kind or tree `tessera opgen` cannot generate an op for, or a generated op
    that did not import (in which case nothing was left written)."""


@dataclass(frozen=True)
class Generated:
    """What `generate` wrote: the op's files (definition, test, benchmark), the docs page
    it regenerated, and the commands that test and benchmark the new op."""

    name: str
    kind: str
    root: Path
    files: tuple[Path, ...]
    docs: Path
    test_command: str
    bench_command: str


def tessera_tree(root: str | Path | None = None) -> Path:
    """The root of a Tessera source tree: `root` checked, or by default the tree the
    running Tessera was imported from."""
    if root is None:
        path = Path(__file__).resolve().parents[4]
        if not all((path / m).is_file() for m in _TREE_MARKS):
            raise OpgenError(f"the running Tessera ({path / 'src' / 'tessera'}) is not in a "
                             "source tree with tests and docs",
                             hint="pass --root, the directory of a Tessera checkout")
        return path
    path = Path(root).expanduser().resolve()
    missing = [m for m in _TREE_MARKS if not (path / m).is_file()]
    if missing:
        raise OpgenError(f"{path} is not a Tessera source tree: it has no {missing[0]}",
                         hint="pass --root, the directory of a Tessera checkout (the one "
                              "holding src/tessera, tests and docs)")
    return path


def _check_name(name: str, root: Path) -> None:
    """Refuse a name that cannot be an op of its own module (static checks, before any
    file is written; existing ops are caught when the tree is imported)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise OpgenError(f"op name {name!r} is not a lowercase Python identifier",
                         hint="use letters, digits and underscores, starting with a "
                              "letter, e.g. my_gelu")
    if len(name) > MAX_NAME:
        raise OpgenError(f"op name {name!r} is {len(name)} characters long; at most "
                         f"{MAX_NAME}", hint="use a shorter name")
    if keyword.iskeyword(name):
        raise OpgenError(f"op name {name!r} is a Python keyword", hint=f"e.g. {name}_")
    if hasattr(builtins, name):
        raise OpgenError(f"op name {name!r} is a Python builtin, which its module could not "
                         "use then", hint=f"e.g. {name}_")
    if name in _package_names(root):
        raise OpgenError(f"op name {name!r} is already a name of the tessera.ops package",
                         where=str(root / "src/tessera/ops/__init__.py"),
                         hint="pick another name")


def _package_names(root: Path) -> set[str]:
    """The names tessera/ops/__init__.py binds (imports and assignments), which an op of
    that name would replace in the package."""
    import ast

    names: set[str] = set()
    tree = ast.parse((root / "src/tessera/ops/__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def _targets(name: str, root: Path, force: bool) -> dict[str, Path]:
    """The three files to write, checked: an existing op module must be this op's own (never
    a family module of several), and existing files are overwritten only with `force` and
    only if opgen wrote them."""
    targets = {"op": root / "src/tessera/ops" / f"{name}.py",
               "test": root / "tests/ops" / f"test_{name}.py",
               "bench": root / "src/tessera/bench/ops" / f"{name}.py"}
    # pytest imports test files by their base name (no packages): one per tree
    clashes = [p for p in (root / "tests").rglob(f"test_{name}.py") if p != targets["test"]]
    if clashes:
        raise OpgenError(f"a test module named test_{name}.py exists already, at "
                         f"{clashes[0]}; pytest would not import both",
                         hint="pick another name")
    if targets["op"].exists():
        defined = {"ops named at run time" if "{" in n else n for n in re.findall(
            r"\bop\(\s*f?[\"']([^\"'(]*)\(", targets["op"].read_text())}
        if defined != {name}:
            raise OpgenError(f"{targets['op']} is a module of tessera.ops, not op {name!r}'s "
                             f"own (it defines {', '.join(sorted(defined)) or 'no op'})",
                             hint="pick another name")
    existing = [p for p in targets.values() if p.exists()]
    if existing and not force:
        raise OpgenError(f"{existing[0]} exists already",
                         hint="pick another name, or pass --force to overwrite what "
                              "opgen wrote before")
    for p in existing:  # every file opgen writes says so in its docstring
        if _MADE_BY not in p.read_text():
            raise OpgenError(f"{p} was not written by opgen; --force overwrites only what "
                             "opgen wrote", hint="pick another name")
    return targets


def _render(name: str, kind: str) -> dict[str, str]:
    """The three files' text for op `name` of `kind`, by target ("op", "test", "bench")."""
    t = _TEMPLATES[kind]
    bench = Template(_UNARY_BENCH).substitute(name=name, bytes_moved=t.BENCH_BYTES,
                                              cases=t.CASES) \
        if hasattr(t, "BENCH_BYTES") else Template(t.BENCH).substitute(name=name, cases=t.CASES)
    return {"op": Template(t.OP).substitute(name=name),
            "test": Template(t.TEST).substitute(name=name), "bench": bench}


def generate(name: str, kind: str, *, root: str | Path | None = None,
             force: bool = False) -> Generated:
    """Write op `name` of `kind` (pointwise, reduction or template) into the Tessera tree at
    `root` (default: the running one) with its test and benchmark, and regenerate
    docs/ops.md; all of it or, on any failure, none. `force` overwrites the files of an
    op opgen wrote before."""
    if kind not in _TEMPLATES:
        raise OpgenError(f"unknown op kind {kind!r}",
                         hint=f"one of {', '.join(_TEMPLATES)}")
    tree = tessera_tree(root)
    _check_name(name, tree)
    targets = _targets(name, tree, force)
    texts = _render(name, kind)
    docs = tree / "docs/ops.md"
    saved = {p: p.read_bytes() if p.exists() else None for p in [*targets.values(), docs]}
    try:
        for key, path in targets.items():
            _write(path, texts[key].encode())
        _write(docs, _validate(tree, name).encode())
    except BaseException as e:
        for path, data in saved.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                _write(path, data)
        if isinstance(e, OSError):
            raise OpgenError(f"could not write {e.filename or tree}: {e.strerror or e}; "
                             "nothing was written", hint="check that the tree is writable "
                                                         "and its disk not full") from e
        raise
    # another tree than the running one is imported from its src
    run = "" if tree == Path(__file__).resolve().parents[4] else "PYTHONPATH=src "
    return Generated(name, kind, tree, tuple(targets.values()), docs,
                     test_command=f"cd {tree} && {run}python -m pytest tests/ops/test_{name}.py",
                     bench_command=f"cd {tree} && {run}python -m tessera bench ops --quick "
                                   f"--only '{name}{_TEMPLATES[kind].CASES}'")


def _write(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.opgen-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _validate(root: Path, name: str) -> str:
    """Import the tree with the new op in a fresh interpreter; docs/ops.md as it renders
    then. An OpgenError says why the op did not import."""
    src = root / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TESSERA_OPS_FASTPATH": "0"}  # no native fast-path build for one import
    try:
        r = subprocess.run([sys.executable, "-c", _VALIDATE, str(src), name], env=env,
                           capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise OpgenError(f"importing the tree at {root} with the new op {name!r} took over "
                         "600 s, so nothing was written",
                         hint="run `python -c 'import tessera.ops'` in the tree to see why"
                         ) from None
    if r.returncode == 0:
        return r.stdout
    said = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    if said.startswith("twice: "):
        raise OpgenError(f"{name!r} is an existing op of {root}: {said[7:]}; nothing was "
                         "written", hint="pick another name (--force replaces only an op "
                                         "opgen wrote in its own module)")
    raise OpgenError(f"the tree at {root} did not import with the new op {name!r}, so "
                     f"nothing was written: {said}",
                     hint="fix what the error names (run `python -c 'import tessera.ops'` "
                          "in the tree to see it whole), then generate again")
