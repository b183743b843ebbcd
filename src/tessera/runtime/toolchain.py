"""The C toolchain: find a compiler, choose flags for this CPU, compile to a shared library
through the artifact cache, and load it.

OpenMP: one runtime per process. When torch is installed, modules link torch's bundled
`libgomp.so.1` (same soname as the system's), so whichever is loaded first serves both and
symbol versions are checked against the older library at link time. See
docs/design/threading.md for the measurements behind this choice.

Profiling: every symbol looked up is named for the profiler (module name, and the symbol
unless it is the kernel language's entry); a compile or cache lookup while a profile is
active is a "compile" event saying whether the cache had it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tessera.errors import CompileError, ToolchainError
from tessera.runtime import profiling
from tessera.runtime.cache import default_cache
from tessera.runtime.cpu.device import cpu_features

__all__ = ["Compiler", "Module", "compile_c", "compile_extension", "compiler", "openmp_flags"]

_BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-fno-math-errno",
               "-Werror=implicit-function-declaration", "-Werror=return-type")
# C++ (the eager ops' fast path, against torch's headers).
_CXX_FLAGS = ("-O2", "-fPIC", "-shared", "-x", "c++", "-std=c++17", "-Werror=return-type")
# Portable ISA flags used when the compiler does not understand -march=native.
_ISA_FLAGS = {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c", "avx512f": "-mavx512f",
              "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl"}


@dataclass(frozen=True)
class Compiler:
    """A C compiler: its command, family (gcc/clang/cc) and full version banner."""

    command: tuple[str, ...]
    family: str
    version: str

    @property
    def identity(self) -> str:
        """What, besides source and flags, decides the compiled bytes."""
        return f"{' '.join(self.command)}\n{self.version}"


def _probe_compiler(command: tuple[str, ...]) -> Compiler | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    banner = out.strip()
    family = "clang" if "clang" in banner else "gcc" if ("gcc" in banner or "GCC" in banner) \
        else "cc"
    return Compiler(command, family, banner)


@functools.lru_cache(maxsize=8)
def _find_compiler(env: str | None, cxx: bool = False) -> Compiler:
    var, lang = ("CXX", "C++") if cxx else ("CC", "C")
    if env:
        found = _probe_compiler(tuple(shlex.split(env)))
        if found is None:
            raise ToolchainError(f"the {lang} compiler named by ${var} ({env!r}) does not run",
                                 hint=f"point {var} at a working gcc or clang, or unset it")
        return found
    names = ("g++", "clang++", "c++") if cxx else ("gcc", "clang", "cc")
    for name in names:
        found = _probe_compiler((name,))
        if found is not None:
            return found
    raise ToolchainError(f"no {lang} compiler found (tried ${var}, {', '.join(names)})",
                         hint=f"install one, e.g. `apt-get install {'g++' if cxx else 'gcc'}`,"
                              f" or set {var}")


def compiler(cxx: bool = False) -> Compiler:
    """The compiler Tessera uses: `$CC` if set, else the first of gcc, clang, cc (for C++:
    `$CXX`, else g++, clang++, c++)."""
    return _find_compiler(os.environ.get("CXX" if cxx else "CC") or None, cxx)


def _native_flags() -> list[str]:
    return ["-march=native", "-mtune=native"]


def _portable_flags() -> list[str]:
    return [flag for feat, flag in _ISA_FLAGS.items() if feat in cpu_features()]


@functools.cache
def _torch_libgomp() -> Path | None:
    """torch's bundled libgomp, found without importing torch (None if absent)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libgomp.so.1"
    return lib if lib.is_file() else None


def openmp_flags(cc: Compiler | None = None) -> list[str]:
    """Flags for an OpenMP module that shares one OpenMP runtime with torch."""
    cc = cc or compiler()
    flags = ["-fopenmp"]
    gomp = _torch_libgomp()
    if gomp is not None and cc.family == "gcc":
        # Listed before gcc's implicit -lgomp, torch's copy resolves the GOMP symbols; the
        # rpath makes a module loaded before torch load that same file.
        flags += [str(gomp), f"-Wl,-rpath,{gomp.parent}"]
    return flags


class Module:
    """A compiled shared library, loaded. Get typed entry points with `function()`."""

    def __init__(self, name: str, key: str, entry: Path, built: bool, flags: list[str]):
        self.name = name
        self.key = key
        self.entry = entry
        self.path = entry / "module.so"
        self.source_path = entry / "source.c"
        self.built = built
        self.flags = flags
        try:
            self._lib = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise ToolchainError(f"cannot load compiled module {name!r}: {e}",
                                 where=str(self.path),
                                 hint="run `tessera cache clear` and retry; if it persists, "
                                      "report it with the output of `tessera info`") from e

    def function(self, symbol: str, restype: Any = None, argtypes: Sequence[Any] = ()) -> Any:
        """A new ctypes foreign function for `symbol` with the given C signature."""
        try:
            fn = self._lib[symbol]
        except AttributeError:
            raise ToolchainError(f"module {self.name!r} has no function {symbol!r}",
                                 where=str(self.source_path),
                                 hint="check the name and that it is not `static`") from None
        fn.restype = restype
        fn.argtypes = list(argtypes)
        address = ctypes.cast(fn, ctypes.c_void_p).value
        if address:
            profiling.name_kernel(address, self.name if symbol == _KERNEL_ENTRY
                                  else f"{self.name}:{symbol}")
        return fn

    @property
    def source(self) -> str:
        return self.source_path.read_text()

    def __repr__(self) -> str:
        return f"<tessera Module {self.name!r} {self.key[:12]} at {self.path}>"


_KERNEL_ENTRY = "tessera_kernel"  # lang/codegen/c.py's ENTRY (runtime cannot import lang)
_loaded: dict[str, Module] = {}
_loaded_lock = threading.Lock()


def compile_c(source: str, *, name: str = "kernel", openmp: bool = False,
              flags: Sequence[str] = (), where: str | None = None,
              cxx: bool = False) -> Module:
    """Compile C (or, with `cxx`, C++17) `source` into a shared library (once per machine)
    and load it.

    The cache key covers the source, all flags, the compiler's identity and the CPU's
    features. `where` names the user's code the source came from, for error messages.
    """
    cc = compiler(cxx)
    extra = [*flags, *shlex.split(os.environ.get("TESSERA_CFLAGS", ""))]
    if openmp:
        extra += openmp_flags(cc)
    base = _CXX_FLAGS if cxx else _BASE_FLAGS
    key = hashlib.sha256("\0".join(
        ["tessera-c-module-1", source, cc.identity, " ".join(base), " ".join(extra),
         " ".join(sorted(cpu_features()))]).encode()).hexdigest()
    module = _loaded.get(key)
    if module is not None:
        return module

    def build(tmp: Path) -> dict[str, Any]:
        return _build(cc, source, base, extra, tmp, name, key, where)

    # Builds of one key are serialized by the cache's file lock (across threads too), so
    # different kernels compile in parallel; the dict lock only keeps one Module per key.
    with profiling.span("compile", name, {"key": key[:16]}) as event:
        entry, built = default_cache().get_or_build("modules", key, build)
        event["cache"] = "miss" if built else "hit"
    flags_used = default_cache().manifest(entry)["meta"]["flags"]
    with _loaded_lock:
        return _loaded.setdefault(key, Module(name, key, entry, built, flags_used))


def compile_extension(source: str, name: str, *, cxx: bool = False,
                      flags: Sequence[str] = ()) -> ModuleType:
    """Compile C (or C++) `source` into the CPython extension module `name` (it defines
    `PyInit_<name>`) through the compile cache, and import it.

    For native code whose call cost matters (microsecond collectives, eager ops): an
    extension takes buffers through the buffer protocol with no ctypes marshalling.
    """
    include = sysconfig.get_paths()["include"]
    module = compile_c(source, name=name, flags=[f"-I{include}", *flags], cxx=cxx)
    loaded = sys.modules.get(f"tessera._ext.{name}.{module.key[:16]}")
    if loaded is not None:
        return loaded
    loader = importlib.machinery.ExtensionFileLoader(name, str(module.path))
    spec = importlib.util.spec_from_file_location(name, module.path, loader=loader)
    if spec is None:
        raise ToolchainError(f"cannot import compiled extension {name!r}", where=str(module.path))
    ext = importlib.util.module_from_spec(spec)
    loader.exec_module(ext)
    sys.modules[f"tessera._ext.{name}.{module.key[:16]}"] = ext
    return ext


def _build(cc: Compiler, source: str, base: Sequence[str], extra: list[str], tmp: Path,
           name: str, key: str, where: str | None) -> dict[str, Any]:
    """Compile into `tmp`, with native ISA flags, or explicit ones if those are refused."""
    src = tmp / "source.c"
    src.write_text(source)
    cmd, ok, output = _run_cc(cc, [*base, *_native_flags(), *extra], src)
    if not ok and "native" in output and ("unrecognized" in output or "unknown" in output):
        cmd, ok, output = _run_cc(cc, [*base, *_portable_flags(), *extra], src)
    if not ok:
        saved = str(save_failed_source(source, name, key))
        raise CompileError(f"C compilation of {name!r} failed",
                           compiler_output=output.replace(str(src), saved), source_path=saved,
                           command=shlex.join(cmd).replace(str(src), saved), where=where,
                           hint="the generated source is saved at the path above; if it came "
                                "from Tessera itself, please report it with that file")
    skip = {str(src), "-o", str(src.with_name("module.so")), "-lm"}
    flags = [a for a in cmd[len(cc.command):] if a not in skip]
    return {"name": name, "flags": flags, "compiler": cc.version.splitlines()[0]}


def _run_cc(cc: Compiler, flags: list[str], src: Path) -> tuple[list[str], bool, str]:
    """Run the compiler once: (command, success, its output)."""
    libs = [f for f in flags if f.startswith("-l")]  # after the source: --as-needed drops
    opts = [f for f in flags if not f.startswith("-l")]  # libraries named before their user
    cmd = [*cc.command, *opts, str(src), "-o", str(src.with_name("module.so")), *libs, "-lm"]
    timeout = float(os.environ.get("TESSERA_COMPILE_TIMEOUT", 600))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return cmd, False, f"the compiler timed out after {timeout:.0f} s"
    return cmd, proc.returncode == 0, proc.stderr + proc.stdout


def save_failed_source(source: str, name: str, key: str, suffix: str = ".c") -> Path:
    """Keep a failed source where the user can open it (outside the temp build dir)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    path = default_cache().base / "errors" / f"{safe}-{key[:12]}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(source)
    return path
