"""Dtypes: singletons with consistent C, DLPack, numpy and torch spellings; as_dtype parsing."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import tessera
from tessera.errors import DtypeError
from tessera.runtime import dtype as dt
from tessera.runtime.dtype import DTYPES, as_dtype

NAMES = ["float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool"]


def test_all_dtypes_are_exported_singletons():
    assert [d.name for d in DTYPES] == NAMES
    for d in DTYPES:
        assert getattr(tessera, d.name) is d is as_dtype(d.name)
        assert repr(d) == f"tessera.{d.name}"
        assert pickle.loads(pickle.dumps(d)) is d
        assert copy.deepcopy(d) is d
    assert tessera.bool is not bool and tessera.bool.name == "bool"
    with pytest.raises(AttributeError):
        tessera.float32.itemsize = 8  # frozen


@pytest.mark.parametrize("d", DTYPES, ids=NAMES)
def test_spellings_agree_with_numpy_and_torch(d):
    assert d.torch.itemsize == d.itemsize
    assert d.torch.is_floating_point == d.is_floating_point
    assert as_dtype(d.torch) is d
    if d is dt.bfloat16:
        assert d.numpy is None
    else:
        assert d.numpy.itemsize == d.itemsize
        assert as_dtype(d.numpy) is d and as_dtype(d.numpy.type) is d
    _, bits, lanes = d.dlpack
    assert bits == 8 * d.itemsize and lanes == 1
    assert dt.from_dlpack_type(*d.dlpack) is d


def test_c_and_dlpack_spellings():
    assert {d.name: d.c_type for d in DTYPES} == {
        "float32": "float", "float16": "uint16_t", "bfloat16": "uint16_t", "int8": "int8_t",
        "uint8": "uint8_t", "int32": "int32_t", "int64": "int64_t", "bool": "uint8_t"}
    assert {d.name: d.dlpack[0] for d in DTYPES} == {
        "float32": 2, "float16": 2, "bfloat16": 4, "int8": 0, "uint8": 1, "int32": 0,
        "int64": 0, "bool": 6}


@pytest.mark.parametrize("spec, expected", [
    ("f32", "float32"), ("fp32", "float32"), ("float", "float32"), ("FP16", "float16"),
    ("half", "float16"), ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
    (" i8 ", "int8"), ("u8", "uint8"), ("int", "int32"), ("long", "int64"),
    ("np.int64", "int64"), ("tessera.bool", "bool"), (np.bool_, "bool"), (bool, "bool"),
    (np.dtype("<f2"), "float16"), (torch.half, "float16"), (torch.bool, "bool"),
])
def test_as_dtype_accepts_spellings(spec, expected):
    assert as_dtype(spec).name == expected


@pytest.mark.parametrize("spec", [
    "float64", "double", "f64", "complex64", "int16", "", "f4", np.float64, float, complex,
    np.dtype(">f4"), torch.float64, torch.complex64, torch.int16, None, 3, object,
    np.dtype([("a", np.float32)]),
])
def test_as_dtype_rejects_the_rest_with_a_hint(spec):
    with pytest.raises(DtypeError) as info:
        as_dtype(spec)
    assert info.value.hint


def test_float64_hint_says_how_to_convert():
    with pytest.raises(DtypeError, match="float64") as info:
        as_dtype(np.float64)
    assert "astype(np.float32)" in info.value.hint and "bfloat16" in info.value.hint


def test_unknown_dlpack_type():
    with pytest.raises(DtypeError, match="code=2, bits=64"):
        dt.from_dlpack_type(2, 64, 1)
    with pytest.raises(DtypeError):
        dt.from_dlpack_type(2, 32, 4)  # vector lanes


def test_import_does_not_pull_in_torch():
    code = ("import sys, numpy as np, tessera, tessera.runtime.dtype as d; d.as_dtype('bf16'); "
            "t = tessera.as_tensor(np.ones(3, np.float32)); t.numpy(); tessera.zeros(2); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
