"""Tensors: a device, dtype, shape and strides over memory that Tessera or another library owns.

Strides and the storage offset count elements, as in torch. Interop is zero-copy both ways:
numpy (`__array_interface__`, `.numpy()`, `as_tensor(ndarray)`), torch (`.torch()`,
`as_tensor(torch_tensor)`) and any DLPack producer or consumer (`__dlpack__`, `from_dlpack`).
torch is imported only when a torch tensor is asked for.
"""

from __future__ import annotations

import ctypes
import operator
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from tessera.errors import DeviceError, DtypeError, ShapeError, StreamError, TesseraError
from tessera.runtime.device import Device
from tessera.runtime.device import device as _device
from tessera.runtime.dtype import as_dtype, bfloat16, float32, from_dlpack_type
from tessera.runtime.dtype import dtype as DType

__all__ = ["Tensor", "as_tensor", "contiguous_strides", "empty", "from_dlpack",
           "normalize_shape", "zeros"]

Shape = tuple[int, ...]


def normalize_shape(shape: int | Sequence[int]) -> Shape:
    """`shape` as a tuple of non-negative Python ints (a single int means a 1-d shape)."""
    try:
        dims = (operator.index(shape),) if not isinstance(shape, Sequence) else \
            tuple(operator.index(n) for n in shape)
    except TypeError:
        raise ShapeError(f"a shape is an int or a sequence of ints, not {shape!r}") from None
    if any(n < 0 for n in dims):
        raise ShapeError(f"shape {dims} has a negative dimension")
    return dims


def contiguous_strides(shape: Shape) -> Shape:
    """Row-major (C order) element strides for `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def element_span(shape: Shape, strides: Shape) -> tuple[int, int]:
    """Lowest and highest element index reached, relative to element 0 (numel > 0)."""
    lo = sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if s > 0)
    return lo, hi


class Tensor:
    """A strided view of device memory. Make one with `empty`, `zeros` or `as_tensor`.

    `owner` keeps the memory alive: a `Block` from the device allocator, or a foreign object
    (numpy array, torch tensor, consumed DLPack capsule). `base` and `extent` are the address
    and byte size of the whole storage, against which views are bounds-checked.
    """

    __slots__ = ("__weakref__", "_base", "_device", "_dtype", "_extent", "_numel", "_offset",
                 "_owner", "_readonly", "_shape", "_strides")

    def __init__(self, owner: object, base: int, extent: int, shape: Shape, strides: Shape,
                 offset: int, dtype: DType, device: Device, readonly: bool = False):
        self._owner = owner
        self._base = base
        self._extent = extent
        self._shape = shape
        self._strides = strides
        self._offset = offset
        self._dtype = dtype
        self._device = device
        self._readonly = readonly
        numel = 1
        for n in shape:
            numel *= n
        self._numel = numel

    # --- facts -------------------------------------------------------------------------------

    @property
    def shape(self) -> Shape:
        return self._shape

    @property
    def strides(self) -> Shape:
        """Strides in elements (not bytes, unlike numpy)."""
        return self._strides

    def stride(self, dim: int | None = None) -> Shape | int:
        """All strides in elements, or the stride of dimension `dim` (torch style)."""
        return self._strides if dim is None else self._strides[dim]

    @property
    def dtype(self) -> DType:
        return self._dtype

    @property
    def device(self) -> Device:
        return self._device

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return self._numel

    @property
    def nbytes(self) -> int:
        """Bytes of the elements (numel * itemsize), not of the whole storage."""
        return self._numel * self._dtype.itemsize

    @property
    def storage_nbytes(self) -> int:
        """Bytes of the whole storage this tensor views."""
        return self._extent

    @property
    def owner(self) -> object:
        """What keeps the memory alive: a `Block` or a foreign array/tensor/capsule holder."""
        return self._owner

    @property
    def readonly(self) -> bool:
        """True for memory a producer marked read-only (e.g. `np.broadcast_to` results)."""
        return self._readonly

    def storage_offset(self) -> int:
        """Offset of element 0 from the start of the storage, in elements."""
        return self._offset

    def data_ptr(self) -> int:
        """Address of element 0."""
        return self._base + self._offset * self._dtype.itemsize

    def is_contiguous(self) -> bool:
        """Row-major contiguous (strides of size-1 dimensions do not matter, as in torch)."""
        if self._numel == 0:
            return True
        expected = 1
        for n, s in zip(reversed(self._shape), reversed(self._strides), strict=True):
            if n != 1:
                if s != expected:
                    return False
                expected *= n
        return True

    def __len__(self) -> int:
        if not self._shape:
            raise ShapeError("len() of a 0-d tensor", hint="use .shape or .numel")
        return self._shape[0]

    def __repr__(self) -> str:
        return (f"tessera.Tensor(shape={self._shape}, dtype={self._dtype!r}, "
                f"device={self._device.name!r})")

    # --- views and copies --------------------------------------------------------------------

    def as_strided(self, shape: int | Sequence[int], strides: Sequence[int],
                   offset: int | None = None) -> Tensor:
        """A view of the same storage; `offset` (elements from the storage start) defaults to
        this tensor's. ShapeError if any element would fall outside the storage."""
        dims = normalize_shape(shape)
        try:
            steps = tuple(operator.index(s) for s in strides)
            off = self._offset if offset is None else operator.index(offset)
        except TypeError:
            raise ShapeError(f"as_strided: strides {strides!r} and offset {offset!r} must be "
                             "ints") from None
        if len(steps) != len(dims):
            raise ShapeError(f"as_strided: {len(dims)} dims in shape {dims} but {len(steps)} "
                             f"strides {steps}")
        itemsize = self._dtype.itemsize
        lo, hi = element_span(dims, steps) if 0 not in dims else (0, -1)
        if off < 0 or off + lo < 0 or (off + hi + 1) * itemsize > self._extent:
            raise ShapeError(
                f"as_strided(shape={dims}, strides={steps}, offset={off}) reaches elements "
                f"{off + lo}..{off + hi}, outside the storage of {self._extent // itemsize} "
                f"{self._dtype.name} elements", where=repr(self))
        return Tensor(self._owner, self._base, self._extent, dims, steps, off, self._dtype,
                      self._device, self._readonly)

    def clone(self) -> Tensor:
        """A contiguous copy in new memory on the same device."""
        if not self._device.is_host:
            return self.to("cpu").to(self._device) if not self.is_contiguous() else \
                self._device_copy()
        out = empty(self._shape, dtype=self._dtype, device=self._device)
        np.copyto(out.numpy(view_bfloat16_as_uint16=True),
                  self.numpy(view_bfloat16_as_uint16=True))
        return out

    def _device_copy(self) -> Tensor:
        out = empty(self._shape, dtype=self._dtype, device=self._device)
        self._device.copy(out.data_ptr(), self.data_ptr(), self.nbytes)
        return out

    # --- devices -----------------------------------------------------------------------------

    def to(self, device: str | Device) -> Tensor:
        """This tensor on `device`: itself if it is there already, else a contiguous copy
        (host <-> device copies wait for the data; device-side copies are queued)."""
        dev = _device(device)
        if dev == self._device:
            return self
        if not self._device.is_host:  # device -> host (then, if asked, on to another device)
            host = self._read_host()
            return host if dev.is_host else host.to(dev)
        out = empty(self._shape, dtype=self._dtype, device=dev)
        data = np.ascontiguousarray(self.numpy(view_bfloat16_as_uint16=True))
        out._device.write(out.data_ptr(), data.reshape(-1).view(np.uint8))
        return out

    def cpu(self) -> Tensor:
        """`self.to("cpu")`."""
        return self.to("cpu")

    def _read_host(self) -> Tensor:
        """A contiguous host copy of a device tensor (reads the span its elements cover)."""
        out = empty(self._shape, dtype=self._dtype, device="cpu")
        if not self._numel:
            return out
        itemsize = self._dtype.itemsize
        lo, hi = element_span(self._shape, self._strides)
        raw = self._device.read(self.data_ptr() + lo * itemsize, (hi - lo + 1) * itemsize)
        bits = np.dtype(self._dtype.numpy or np.uint16)
        src = np.lib.stride_tricks.as_strided(
            raw.view(bits)[-lo:], self._shape, tuple(st * itemsize for st in self._strides))
        np.copyto(out.numpy(view_bfloat16_as_uint16=True), src)
        return out

    def _host_only(self, what: str) -> DeviceError:
        return DeviceError(f"{what} of a tensor on {self._device.name}: its memory is on the "
                           "device, not readable by the host", where=repr(self),
                           hint="copy it first: t.cpu() (or t.to('cpu'))")

    # --- numpy -------------------------------------------------------------------------------

    def _array_interface(self, np_dtype: np.dtype) -> dict[str, Any]:
        if not self._device.is_host:
            raise self._host_only("numpy view")
        itemsize = self._dtype.itemsize
        return {
            "version": 3,
            "shape": self._shape,
            "typestr": np_dtype.str,
            "data": (self.data_ptr(), self._readonly),
            "strides": None if self.is_contiguous() else
            tuple(s * itemsize for s in self._strides),
        }

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's zero-copy protocol: `np.asarray(t)` shares memory and keeps `t` alive."""
        if self._dtype.numpy is None:
            raise _no_numpy_bf16()
        return self._array_interface(self._dtype.numpy)

    def numpy(self, *, view_bfloat16_as_uint16: bool = False) -> np.ndarray:
        """A numpy array sharing this tensor's memory. numpy has no bfloat16: a bfloat16
        tensor raises DtypeError unless `view_bfloat16_as_uint16` asks for the raw bits."""
        np_dtype = self._dtype.numpy
        if np_dtype is None:
            if not view_bfloat16_as_uint16:
                raise _no_numpy_bf16()
            np_dtype = np.dtype(np.uint16)
        return np.asarray(_ArrayInterface(self, self._array_interface(np_dtype)))

    # --- torch and DLPack --------------------------------------------------------------------

    def torch(self) -> Any:
        """A torch tensor sharing this tensor's memory (via DLPack)."""
        if any(s < 0 for s in self._strides):
            raise ShapeError(f"torch tensors cannot have negative strides {self._strides}",
                             where=repr(self), hint="call .clone() first, or use .numpy()")
        if not self._device.is_host:
            raise self._host_only("a torch view")
        import torch

        return torch.from_dlpack(self)

    def __dlpack_device__(self) -> tuple[int, int]:
        if not self._device.is_host:
            raise self._host_only("DLPack export")
        return _DL_DEVICE_TYPES[self._device.type], self._device.index

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: tuple[int, int] | None = None, copy: bool | None = None) -> Any:
        """Export as a DLPack capsule: versioned if `max_version` >= (1, 0) allows it, else the
        legacy one; zero-copy unless `copy=True`.

        numpy's C exporter builds the capsule over a view of this tensor (bfloat16 goes out
        as uint16 and is relabelled), so the deleter and capsule destructor are C code that
        keeps a pending exception intact; ctypes callbacks in Python cannot, and would turn
        an exception raised while a consumer tensor dies into a SystemError.
        """
        if stream is not None and stream != -1:
            raise StreamError(f"a {self._device.type} tensor is exported without a stream, "
                              f"got stream={stream!r}", hint="pass stream=None")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise DeviceError(f"cannot export a tensor on {self._device.name} to DLPack device "
                              f"{tuple(dl_device)}", hint="copy the tensor to that device first")
        array = (self.clone() if copy else self).numpy(view_bfloat16_as_uint16=True)
        if max_version is None:
            capsule = array.__dlpack__()
        else:
            try:
                capsule = array.__dlpack__(max_version=tuple(max_version))
            except TypeError:  # numpy < 2.1 makes only legacy capsules
                capsule = array.__dlpack__()
        if self._dtype is bfloat16:
            _managed(capsule)[1].dl_tensor.dtype = _DLDataType(*bfloat16.dlpack)
        return capsule


class _ArrayInterface:
    """What `numpy()` hands to numpy: the interface dict, and the tensor to keep alive."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, tensor: Tensor, interface: dict[str, Any]):
        self.tensor = tensor
        self.__array_interface__ = interface


def _no_numpy_bf16() -> DtypeError:
    return DtypeError("numpy has no bfloat16 dtype",
                      hint="use t.torch(), or t.numpy(view_bfloat16_as_uint16=True) for the "
                           "raw bits")


# --- construction ----------------------------------------------------------------------------

def empty(shape: int | Sequence[int], dtype: DType | str = float32,
          device: str | Device | None = "cpu") -> Tensor:
    """An uninitialized contiguous tensor from the device's caching allocator."""
    dims, dt, dev = normalize_shape(shape), as_dtype(dtype), _device(device)
    nbytes = dt.itemsize
    for n in dims:
        nbytes *= n
    block = dev.allocator.allocate(nbytes)
    return Tensor(block, block.ptr, nbytes, dims, contiguous_strides(dims), 0, dt, dev)


def zeros(shape: int | Sequence[int], dtype: DType | str = float32,
          device: str | Device | None = "cpu") -> Tensor:
    """A contiguous tensor of zeros (all-zero bytes are zero in every Tessera dtype)."""
    t = empty(shape, dtype, device)
    if t.device.is_host:
        ctypes.memset(t.data_ptr(), 0, t.nbytes)
    else:
        t.device.fill(t.data_ptr(), t.nbytes)
    return t


def as_tensor(obj: Any, dtype: DType | str | None = None) -> Tensor:
    """A Tensor over `obj`'s memory: zero-copy for numpy arrays, CPU torch tensors, DLPack
    producers and `__array_interface__` objects; Python lists and scalars are copied (floats
    become float32 unless `dtype` says otherwise). A zero-copy source is never converted:
    a `dtype` that differs from its own raises DtypeError."""
    want = None if dtype is None else as_dtype(dtype)
    torch = sys.modules.get("torch")
    if isinstance(obj, Tensor):
        t = obj
    elif torch is not None and isinstance(obj, torch.Tensor):
        t = _from_torch(obj, torch)
    elif isinstance(obj, np.ndarray):
        t = _from_numpy(obj)
    elif hasattr(obj, "__dlpack__"):
        t = from_dlpack(obj)
    elif hasattr(obj, "__array_interface__") or hasattr(obj, "__array_struct__"):
        t = _from_numpy(np.asarray(obj))
    else:
        return _copy_from_python(obj, want)
    if want is not None and t.dtype is not want:
        raise DtypeError(f"{type(obj).__name__} holds {t.dtype.name}, not {want.name}; "
                         "as_tensor shares memory and never converts",
                         hint="convert in the source library first, or leave dtype=None")
    return t


def _wrap_foreign(owner: object, data: int, shape: Shape, strides: Shape, dt: DType,
                  readonly: bool) -> Tensor:
    """A tensor over foreign memory whose storage is exactly the span of its elements."""
    numel = 1
    for n in shape:
        numel *= n
    lo, hi = element_span(shape, strides) if numel else (0, -1)
    return Tensor(owner, data + lo * dt.itemsize, (hi - lo + 1) * dt.itemsize, shape, strides,
                  -lo, dt, _device("cpu"), readonly)


def _from_numpy(a: np.ndarray) -> Tensor:
    dt = as_dtype(a.dtype)
    strides = []
    for n, s in zip(a.shape, a.strides, strict=True):
        if n > 1 and s % a.itemsize:
            raise ShapeError(f"numpy byte strides {a.strides} are not multiples of the "
                             f"itemsize {a.itemsize}", hint="pass np.ascontiguousarray(a)")
        strides.append(s // a.itemsize)
    data = a.__array_interface__["data"][0]
    return _wrap_foreign(a, data, a.shape, tuple(strides), dt, not a.flags.writeable)


def _from_torch(t: Any, torch: Any) -> Tensor:
    if t.device.type != "cpu":
        raise DeviceError(f"torch tensor on {t.device} cannot be shared with the Tessera CPU "
                          "device", hint="move it first with t.cpu()")
    if t.layout != torch.strided:
        raise ShapeError(f"torch tensor with layout {t.layout} is not strided",
                         hint="convert it with t.to_dense()")
    dt = as_dtype(t.dtype)
    if t.is_neg():
        raise TesseraError("torch tensor has its lazy negation bit set; its memory does not "
                           "hold its values", hint="call t.resolve_neg() first")
    storage = t.untyped_storage()
    return Tensor(t, storage.data_ptr(), storage.nbytes(), tuple(t.shape), tuple(t.stride()),
                  t.storage_offset(), dt, _device("cpu"))


def _copy_from_python(obj: Any, want: DType | None) -> Tensor:
    """Copy a list, scalar or other array-like into new memory."""
    try:
        if want is bfloat16:
            a = _bf16_bits(np.asarray(obj, dtype=np.float32))
        else:
            a = np.asarray(obj, dtype=None if want is None else want.numpy)
    except OverflowError as err:
        raise DtypeError(f"value out of range for {want!r}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ShapeError(f"cannot make a tensor from {type(obj).__name__}: {err}",
                         hint="pass a (nested) list of numbers of equal lengths, a number, "
                              "or an array") from None
    if want is None:
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        want = as_dtype(a.dtype)
    out = empty(a.shape, dtype=want)
    np.copyto(out.numpy(view_bfloat16_as_uint16=True), a)
    return out


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of float32 values, rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(a), np.uint32(0x7FC0), rounded).astype(np.uint16)


# --- DLPack (https://dmlc.github.io/dlpack/latest/) -----------------------------------------

_DL_CPU = 1
_DL_DEVICE_TYPES = {"cpu": _DL_CPU}
_FLAG_READ_ONLY = 1 << 0


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _DLTensor)]


def _capi(name: str, restype: Any, *argtypes: Any) -> Any:
    """A private binding of a Python C-API function (setting argtypes on the shared
    `ctypes.pythonapi` would change them for every other user in the process)."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


_capsule_name = _capi("PyCapsule_GetName", ctypes.c_char_p, ctypes.py_object)
_capsule_pointer = _capi("PyCapsule_GetPointer", ctypes.c_void_p, ctypes.py_object,
                         ctypes.c_char_p)
_capsule_rename = _capi("PyCapsule_SetName", ctypes.c_int, ctypes.py_object, ctypes.c_void_p)
_PyFunc = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)  # producers' deleters, called with the GIL


def _leak(obj: Any) -> Any:
    """Never free `obj` (see _USED_NAMES)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    return obj


# The names a consumer gives the capsules it took. A capsule keeps a pointer to its name and
# may outlive this module at exit, so these buffers are never freed.
_USED_NAMES = {name: _leak(ctypes.create_string_buffer(b"used_" + name))
               for name in (b"dltensor", b"dltensor_versioned")}


def _managed(capsule: Any) -> tuple[bytes, Any]:
    """The name of an unconsumed DLPack capsule and the DLManagedTensor[Versioned] in it."""
    name = _capsule_name(capsule) if type(capsule).__name__ == "PyCapsule" else None
    if name not in _USED_NAMES:
        raise TesseraError(f"not an unconsumed DLPack capsule: {capsule!r}",
                           hint="a DLPack capsule can be consumed only once")
    struct = _DLManagedTensorVersioned if name == b"dltensor_versioned" else _DLManagedTensor
    return name, struct.from_address(_capsule_pointer(capsule, name))


class _DLPackOwner:
    """Keeps a consumed DLPack tensor alive; calls its producer's deleter when collected."""

    __slots__ = ("_deleter", "_managed")

    def __init__(self, managed: int, deleter: int | None):
        self._managed = managed
        self._deleter = deleter

    def __del__(self) -> None:
        if self._deleter and not sys.is_finalizing():
            _PyFunc(self._deleter)(self._managed)


def from_dlpack(obj: Any) -> Tensor:
    """A Tensor sharing the memory of a DLPack producer (an object with `__dlpack__`, or a
    capsule). The producer's memory is released when the Tensor and its views are gone."""
    if type(obj).__name__ != "PyCapsule":
        if not hasattr(obj, "__dlpack__"):
            raise TesseraError(f"{type(obj).__name__} does not support DLPack",
                               hint="pass an object with __dlpack__, or use as_tensor")
        if hasattr(obj, "__dlpack_device__"):
            dev_type, dev_id = obj.__dlpack_device__()
            if dev_type != _DL_CPU:
                raise DeviceError(f"DLPack device ({dev_type}, {dev_id}) is not the CPU",
                                  hint="copy the data to host memory first")
        try:
            try:
                obj = obj.__dlpack__(max_version=(1, 0))
            except TypeError:  # a producer older than DLPack 1.0
                obj = obj.__dlpack__()
        except (BufferError, TypeError, ValueError, RuntimeError) as err:
            raise TesseraError(f"{type(obj).__name__} refused to export DLPack: {err}") from err
    return _consume(obj)


def _consume(capsule: Any) -> Tensor:
    """Take ownership of a DLPack capsule. It is renamed only once everything checks out, so
    a rejected capsule still frees its tensor through its own destructor."""
    name, managed = _managed(capsule)
    readonly = False
    if isinstance(managed, _DLManagedTensorVersioned):
        if managed.version.major > 1:
            raise TesseraError(f"DLPack version {managed.version.major}."
                               f"{managed.version.minor} is newer than Tessera supports (1.x)")
        readonly = bool(managed.flags & _FLAG_READ_ONLY)
    dl = managed.dl_tensor
    if dl.device.device_type != _DL_CPU:
        raise DeviceError(f"DLPack device ({dl.device.device_type}, {dl.device.device_id}) "
                          "is not the CPU", hint="copy the data to host memory first")
    dt = from_dlpack_type(dl.dtype.code, dl.dtype.bits, dl.dtype.lanes)
    shape = tuple(dl.shape[i] for i in range(dl.ndim))
    strides = tuple(dl.strides[i] for i in range(dl.ndim)) if dl.strides else \
        contiguous_strides(shape)
    _capsule_rename(capsule, ctypes.addressof(_USED_NAMES[name]))
    owner = _DLPackOwner(ctypes.addressof(managed), managed.deleter)
    return _wrap_foreign(owner, (dl.data or 0) + dl.byte_offset, shape, strides, dt, readonly)
