"""The C toolchain and compile cache: build once, load fast, never load a bad artifact."""

from __future__ import annotations

import ctypes
import json
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tessera.errors import CacheError, CompileError, TesseraError, ToolchainError
from tessera.runtime import toolchain
from tessera.runtime.cache import ArtifactCache, default_cache
from tessera.runtime.toolchain import compile_c


def unique_source(body: str = "int f(int x) { return x * 3 + 1; }") -> str:
    """A source no other test (or earlier run) has compiled, so it really gets built."""
    return f"/* {uuid.uuid4()} */\n{body}\n"


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def fake_cc(tmp_path: Path, body: str) -> str:
    """A compiler wrapper script around gcc; `body` runs first with "$@" available."""
    script = tmp_path / "cc-wrapper"
    script.write_text(f"#!/bin/sh\n{body}\nexec gcc \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_compile_load_call():
    mod = compile_c(unique_source(), name="triple")
    f = mod.function("f", ctypes.c_int, [ctypes.c_int])
    assert f(5) == 16
    assert mod.built
    assert mod.path.is_file() and mod.source_path.read_text().endswith("return x * 3 + 1; }\n")


def test_same_source_is_built_once_per_process_and_machine():
    src = unique_source()
    first = compile_c(src)
    assert compile_c(src) is first
    out = run_python(f"""
        from tessera.runtime.toolchain import compile_c
        m = compile_c({src!r})
        print(m.built, m.path)
    """)
    built, path = out.split()
    assert built == "False" and path == str(first.path)


def test_key_covers_flags_and_env_cflags(monkeypatch):
    src = unique_source()
    base = compile_c(src)
    assert compile_c(src, flags=["-DEXTRA=1"]).key != base.key
    monkeypatch.setenv("TESSERA_CFLAGS", "-O2")
    tuned = compile_c(src)
    assert tuned.key != base.key and "-O2" in tuned.flags


def test_pointer_arguments_write_through():
    src = unique_source("void scale(float *x, long n, float a) { for (long i = 0; i < n; i++) "
                        "x[i] *= a; }")
    fn = compile_c(src).function("scale", None, [ctypes.c_void_p, ctypes.c_long, ctypes.c_float])
    buf = (ctypes.c_float * 7)(*range(7))
    fn(ctypes.addressof(buf), 7, 2.0)
    assert list(buf) == [2.0 * i for i in range(7)]


def test_compile_error_names_saved_source():
    src = unique_source("int broken( { return 0; }")
    with pytest.raises(CompileError) as info:
        compile_c(src, name="broken kernel", where="model.py:12")
    err = info.value
    assert isinstance(err, TesseraError)
    saved = Path(err.source_path)
    assert saved.read_text() == src
    assert str(saved) in str(err) and "model.py:12" in str(err)
    assert "error" in err.compiler_output and str(saved) in err.compiler_output
    key = saved.stem.rsplit("-", 1)[1]  # other workers may be building beside this one
    assert not list((default_cache().base / "tmp").glob(f"{key}-*")), \
        "temp build dirs must not leak"


def test_missing_symbol_is_a_toolchain_error():
    mod = compile_c(unique_source())
    with pytest.raises(ToolchainError, match="no function 'g'"):
        mod.function("g")


def test_unrunnable_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(ToolchainError, match=r"\$CC"):
        compile_c(unique_source())


def test_portable_flags_when_native_is_refused(tmp_path, monkeypatch):
    cc = fake_cc(tmp_path, textwrap.dedent("""
        for a in "$@"; do
          if [ "$a" = "-march=native" ]; then
            echo "error: unrecognized command-line option '-march=native'" >&2; exit 1
          fi
        done"""))
    monkeypatch.setenv("CC", cc)
    mod = compile_c(unique_source())
    assert "-march=native" not in mod.flags
    assert mod.function("f", ctypes.c_int, [ctypes.c_int])(1) == 4


def test_concurrent_processes_build_once(tmp_path):
    log = tmp_path / "compiles.log"
    cc = fake_cc(tmp_path, f'case "$*" in *--version*) ;; *) echo run >> {log}; sleep 1;; esac')
    src = unique_source()
    code = f"""
        import ctypes, sys, time
        from tessera.runtime.toolchain import compile_c
        while time.time() < float(sys.argv[1]): pass
        m = compile_c({src!r})
        print(m.built, m.path, m.function("f", ctypes.c_int, [ctypes.c_int])(2))
    """
    import time
    start = str(time.time() + 2.0)
    env = {**os.environ, "CC": cc}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), start], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    rows = [o[0].split() for o in outs]
    assert sorted(r[0] for r in rows) == ["False", "True"]
    assert rows[0][1] == rows[1][1] and rows[0][2] == rows[1][2] == "7"
    assert log.read_text().count("run") == 1


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_manifest", "bad_manifest"])
def test_damaged_entry_is_rebuilt(damage):
    src = unique_source()
    # Built in another process: damaging a library this process has mapped would SIGBUS it.
    entry = Path(run_python(f"""
        from tessera.runtime.toolchain import compile_c
        print(compile_c({src!r}).entry)
    """).strip())
    so = entry / "module.so"
    if damage == "truncate":
        so.write_bytes(so.read_bytes()[:100])
    elif damage == "flip_byte":
        data = bytearray(so.read_bytes())
        data[len(data) // 2] ^= 0xFF
        so.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text("{not json")
    out = run_python(f"""
        import ctypes
        from tessera.runtime.toolchain import compile_c
        m = compile_c({src!r})
        print(m.built, m.function("f", ctypes.c_int, [ctypes.c_int])(3))
    """)
    assert out.split() == ["True", "10"]


def test_lookup_rejects_entry_with_wrong_key(tmp_path):
    cache = ArtifactCache(tmp_path)

    def build(tmp: Path) -> dict:
        (tmp / "a.txt").write_text("hello")
        return {}

    entry, built = cache.get_or_build("things", "ab" * 32, build)
    assert built and cache.lookup("things", "ab" * 32) == entry
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["key"] = "cd" * 32
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert cache.lookup("things", "ab" * 32) is None
    assert cache.get_or_build("things", "ab" * 32, build)[1]


def test_failed_build_leaves_no_entry(tmp_path):
    cache = ArtifactCache(tmp_path)

    def build(tmp: Path) -> dict:
        (tmp / "half").write_text("x")
        raise RuntimeError("builder died")

    with pytest.raises(RuntimeError):
        cache.get_or_build("things", "ef" * 32, build)
    assert cache.lookup("things", "ef" * 32) is None
    assert not list((cache.base / "tmp").iterdir())


def test_unusable_cache_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CacheError, match="TESSERA_CACHE_DIR"):
        compile_c(unique_source())


def test_info_and_clear(tmp_path):
    cache = ArtifactCache(tmp_path)
    cache.get_or_build("things", "12" * 32, lambda tmp: (tmp / "x").write_bytes(b"1234") or {})
    info = cache.info()
    assert info["kinds"]["things"]["entries"] == 1 and info["total_bytes"] > 4
    assert cache.clear() == info["total_bytes"]
    assert cache.info()["kinds"] == {}


def count_libgomp() -> str:
    return ("sum(1 for l in open('/proc/self/maps') if 'libgomp' in l and 'r-xp' in l)")


@pytest.mark.parametrize("torch_first", [True, False])
def test_one_openmp_runtime_beside_torch(torch_first):
    if toolchain._torch_libgomp() is None:
        pytest.fail("torch with its bundled libgomp is a test dependency")
    src = unique_source("#include <omp.h>\nint threads(void) { int n = 0;\n"
                        "#pragma omp parallel\n{\n#pragma omp atomic\nn++;\n}\nreturn n; }")
    load = f"from tessera.runtime.toolchain import compile_c; import ctypes\n" \
           f"n = compile_c({src!r}, openmp=True).function('threads', ctypes.c_int)()\n"
    code = ("import torch\n" + load) if torch_first else (load + "import torch\n")
    code += "torch.ones(1 << 16).sum()\n"
    code += f"print(n, {count_libgomp()})"
    threads, libs = run_python(code).split()
    assert int(threads) == len(os.sched_getaffinity(0))
    assert libs == "1"


def test_threads_compile_concurrently():
    from concurrent.futures import ThreadPoolExecutor

    shared = unique_source()
    sources = [shared] * 4 + [unique_source(f"int f(int x) {{ return x + {i}; }}")
                              for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        modules = list(pool.map(compile_c, sources))
    assert len({id(m) for m in modules[:4]}) == 1
    assert modules[0].function("f", ctypes.c_int, [ctypes.c_int])(2) == 7
    for i, m in enumerate(modules[4:]):
        assert m.function("f", ctypes.c_int, [ctypes.c_int])(10) == 10 + i
