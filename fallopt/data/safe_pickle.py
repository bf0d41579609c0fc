"""Load pickles that may come from anywhere without letting them run code or exhaust memory.

`pickle.load` executes whatever callables a file names. The lab's files hold only numpy
arrays, lists, dicts and numbers, so we allow exactly the globals those need and refuse the
rest: a hostile or corrupt file becomes a `DataError`, never code execution.

The allowed globals can still be abused, so a file is also held to what it can contain:

- Memory. A pickle holds its arrays' bytes, so beyond those it may make us allocate at most
  its own size plus `SLACK`, in all: `bytearray(n)`, the array numpy's `_reconstruct` makes
  before the data arrives, further references to one string. No length it declares may
  exceed what remains of the file. Unchecked, a 28-byte file allocated 2 GB.
- Sharing. A container may be referenced once. Nested lists that each hold one sublist ten
  times are a few hundred bytes of pickle but 10**depth numbers once the loader converts them
  with `np.asarray` (a "billion laughs": depth 8 took 5 s and 1 GB). Without sharing, every
  element costs an opcode, so no container holds more elements than the file has bytes.
- Dtypes. Only plain numbers and fixed-width strings: numpy segfaults on an object
  array whose pickled item list is shorter than its shape.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import math
import operator
import os
import pickle
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fallopt.errors import DataError

SLACK = 1 << 20
"""Bytes a pickle may make us allocate beyond its own size: shared names, empty arrays."""

# Dtypes whose items are raw bytes, never pointers to Python objects. (Dates would need their
# unit set on BUILD, which `_check_dtype_state` refuses; the lab's files have none.)
_PLAIN_KINDS = frozenset("biufcSUV")
# Objects a pickle may not reference twice: shared containers expand exponentially when
# converted, and a mutable one (a BUILD re-sets an array) can grow after being referenced.
_UNSHAREABLE = (list, tuple, dict, set, frozenset, bytearray, np.ndarray)


class _NdarrayName:
    """What `numpy.ndarray` stands for in a pickle: `_reconstruct`'s first argument only.

    Called directly, `numpy.ndarray(shape)` would allocate whatever shape the file names.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            "refused to call numpy.ndarray directly: arrays are rebuilt only through "
            "numpy's _reconstruct"
        )


_NDARRAY = _NdarrayName()


def _plain_dtype(dtype: Any) -> np.dtype:
    """`dtype` if its items are plain bytes, else refused."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.kind not in _PLAIN_KINDS
        or dtype.hasobject
        or dtype.fields is not None
        or dtype.subdtype is not None
    ):
        raise pickle.UnpicklingError(
            f"refused dtype {dtype!r:.80}: only numbers and fixed-width strings are "
            "allowed (numpy crashes on object arrays pickled inconsistently)"
        )
    return dtype


def _check_array_state(state: Any) -> None:
    """An array's BUILD state: (version,) shape, dtype, is_fortran, raw bytes.

    numpy checks that the raw bytes fill shape x itemsize exactly, so an array holds no more
    than the file does; object dtypes would take a list of items instead, unchecked.
    """
    if not (
        isinstance(state, tuple)
        and len(state) in (4, 5)
        and isinstance(state[-1], (bytes, bytearray, str))
    ):
        raise pickle.UnpicklingError(
            "refused an array state other than (shape, dtype, is_fortran, raw bytes)"
        )
    _plain_dtype(state[-3])


def _check_dtype_state(dtype: np.dtype, state: Any) -> None:
    """A dtype's BUILD state may set its byte order and nothing else.

    Through it a pickle could give a plain dtype fields, an itemsize of 2**40, or the flag
    that says its items are Python objects.
    """
    own = _plain_dtype(dtype).__reduce__()[2]
    if not (
        isinstance(state, tuple)
        and len(state) == len(own)
        and state[1] in ("<", ">", "|", "=")
        and state[:1] + state[2:] == own[:1] + own[2:]
    ):
        raise pickle.UnpicklingError(
            f"refused to change dtype {dtype} beyond its byte order (state {state!r:.80})"
        )


def _nbytes(shape: Any, dtype: np.dtype) -> int:
    """Bytes of an array of `shape` (an int or a sequence of ints) and `dtype`."""
    dims = [shape] if isinstance(shape, int) else list(shape)
    return max(0, math.prod(operator.index(d) for d in dims)) * dtype.itemsize


class _Bounded:
    """A binary file whose reads fail rather than ask for more bytes than remain.

    A pickle declares each string's length before it, and `BufferedReader.read(n)` allocates
    n bytes before it finds the file shorter: a forged length would end in MemoryError.
    """

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file, self._left = file, size

    def read(self, n: int) -> bytes:
        """The next `n` bytes.

        Raises:
            EOFError: fewer than `n` bytes remain.
        """
        if n > self._left:
            raise EOFError(f"the pickle reads {n:,} bytes where {self._left:,} remain")
        data = self._file.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        """The next line (protocol 0 opcodes take their arguments as lines)."""
        line = self._file.readline()
        self._left -= len(line)
        return line


class _Budget:
    """Bytes a pickle makes us allocate beyond its own, refused past its size plus `SLACK`."""

    def __init__(self, size: int) -> None:
        self.size, self.limit, self.spent = size, size + SLACK, 0

    def spend(self, nbytes: int, what: str) -> None:
        """Count `nbytes` more, refusing `what` if that passes the limit."""
        self.spent += max(0, nbytes)
        if self.spent > self.limit:
            in_all = "" if self.spent == nbytes else f" ({self.spent:,} in all)"
            raise pickle.UnpicklingError(
                f"refused {what}: {nbytes:,} bytes beyond the file's own{in_all}, over the "
                f"limit of {self.limit:,} bytes (the file's size + {SLACK:,})"
            )


# A guard turns an allowed global into what the pickle gets. Guards hold the budget, not the
# unpickler: its memo holds them, and a cycle would keep the arrays alive until the next gc.
_Guard = Callable[[_Budget, Any], Any]


def _as_is(budget: _Budget, obj: Any) -> Any:
    """Globals that allocate nothing the file does not hold, or whose results are checked."""
    return obj


def _sized(budget: _Budget, make: type) -> Callable[..., Any]:
    """`bytearray(n)` and `bytes(n)` allocate n zero bytes that the file does not hold."""

    def sized(*args: Any) -> Any:
        try:
            n = operator.index(args[0])  # an index-able first argument is a size to them too
        except (IndexError, TypeError):
            pass
        else:
            budget.spend(n, f"{make.__name__}({n})")
        return make(*args)

    return sized


def _latin1(budget: _Budget, encode: Callable[..., Any]) -> Callable[..., Any]:
    """Pickles store bytes as `_codecs.encode(text, "latin1")`.

    Other codecs can grow their input ("hex" doubles it), and calls nest.
    """

    def latin1(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> Any:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError(
                f"refused _codecs.encode of a {type(text).__name__} with {encoding!r:.40}: "
                "pickles use it only to turn latin1 text into bytes"
            )
        return encode(text, encoding, errors)

    return latin1


def _reconstructing(budget: _Budget, reconstruct: Callable[..., Any]) -> Callable[..., Any]:
    """`_reconstruct(ndarray, shape, dtype)` allocates before the array's data arrives.

    numpy's own pickles ask for shape (0,); BUILD then sets the real shape and bytes.
    """

    def checked(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError(
                f"refused _reconstruct of a {type(subtype).__name__}: only numpy.ndarray"
            )
        dtype = _plain_dtype(np.dtype(dtype))
        budget.spend(_nbytes(shape, dtype), f"an empty array of shape {shape!r:.40}")
        return reconstruct(np.ndarray, shape, dtype)

    return checked


_NUMPY_CORE = ("numpy.core", "numpy._core")  # named by numpy 1.x and 2.x pickles
_GUARDS: dict[tuple[str, str], _Guard] = {
    ("numpy", "ndarray"): lambda budget, cls: _NDARRAY,
    ("numpy", "dtype"): _as_is,  # dtypes are checked where arrays use them, and on BUILD
    ("builtins", "bytearray"): _sized,
    ("builtins", "bytes"): _sized,  # empty bytes at protocol <= 2
    ("collections", "OrderedDict"): _as_is,
    ("_codecs", "encode"): _latin1,  # how Python 2 pickles of numpy arrays store their bytes
    **{(f"{core}.multiarray", "_reconstruct"): _reconstructing for core in _NUMPY_CORE},
    **{(f"{core}.multiarray", "scalar"): _as_is for core in _NUMPY_CORE},  # checks its bytes
    **{(f"{core}.numeric", "_frombuffer"): _as_is for core in _NUMPY_CORE},  # a view, no copy
}


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler, whose opcodes can be hooked, restricted as the module says.

    The C unpickler has no hook for memo references or BUILD, and is no faster on array files:
    their bytes are a few long reads.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, size: int) -> None:
        super().__init__(_Bounded(file, size), encoding="latin1")
        self._budget = _Budget(size)

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global `module.name`, guarded; any other is refused."""
        if self.proto < 3 and self.fix_imports:  # Python 2 names (__builtin__), as pickle maps
            module, name = _compat_pickle.NAME_MAPPING.get(
                (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
            )
        sys.audit("pickle.find_class", module, name)
        guard = _GUARDS.get((module, name))
        if guard is None and module == "numpy.dtypes" and name.endswith("DType"):
            guard = _as_is  # numpy 2 pickles name their dtype classes, e.g. Float32DType
        if guard is None:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: only numpy arrays and plain "
                "containers are allowed"
            )
        # getattr, unlike pickle's lookup, follows no dotted path out of the module.
        return guard(self._budget, getattr(importlib.import_module(module), name))

    def check_reference(self, obj: Any) -> None:
        """A memo reference may repeat only what cannot grow; its copies count as allocated."""
        if isinstance(obj, _UNSHAREABLE) and not (isinstance(obj, tuple) and not obj):
            raise pickle.UnpicklingError(
                f"refused a second reference to one {type(obj).__name__}: shared containers "
                "let a tiny file expand exponentially (a 'billion laughs')"
            )
        if isinstance(obj, (str, bytes, np.generic)):  # numpy copies each reference
            size = obj.nbytes if isinstance(obj, np.generic) else len(obj)
            self._budget.spend(size, f"another reference to a {type(obj).__name__}")

    def load_build(self) -> None:
        """Set an array's or a dtype's state, after checking it."""
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.ndarray):
            _check_array_state(state)
        elif isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        else:
            raise pickle.UnpicklingError(
                f"refused to set the state of a {type(inst).__name__}: only arrays and "
                "dtypes have one"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self) -> None:
        """A protocol 5 bytearray, whose length is checked before it is allocated."""
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._budget.size:
            raise EOFError(f"BYTEARRAY8 declares {n:,} bytes in a file of {self._budget.size:,}")
        data = bytearray(n)
        self.readinto(data)
        self.append(data)

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _checking_reference(get: Callable[[_Unpickler], None]) -> Callable[[_Unpickler], None]:
    def checked(unpickler: _Unpickler) -> None:
        get(unpickler)
        unpickler.check_reference(unpickler.stack[-1])

    return checked


def _refusing(opcode: str, why: str) -> Callable[[_Unpickler], None]:
    def refuse(unpickler: _Unpickler) -> None:
        raise pickle.UnpicklingError(f"refused opcode {opcode}: {why}")

    return refuse


for _get in (pickle.GET, pickle.BINGET, pickle.LONG_BINGET):
    _Unpickler.dispatch[_get[0]] = _checking_reference(_Unpickler.dispatch[_get[0]])
# Python's pickler writes neither: DUP shares an object past the memo check, and EXT opcodes
# fetch objects from copyreg's extension cache past find_class.
_Unpickler.dispatch[pickle.DUP[0]] = _refusing("DUP", "it shares an object unchecked")
for _ext in ("EXT1", "EXT2", "EXT4"):
    _Unpickler.dispatch[getattr(pickle, _ext)[0]] = _refusing(_ext, "extension registry")


def load(path: Path, expected: str) -> Any:
    """Unpickle `path` allowing only numpy arrays and plain containers, within its size.

    Args:
        path: the pickle file.
        expected: the expected format, quoted after errors ("expected a dict of ...").

    Raises:
        DataError: the file is missing, unreadable, truncated, not a pickle, names a global
            outside the allow list, references a container twice, or asks for more memory
            than its size allows (or than the machine has).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file; {expected}")
    try:
        with path.open("rb") as f:
            return _Unpickler(f, os.fstat(f.fileno()).st_size).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a safe pickle of arrays ({e}); {expected}") from None
    except MemoryError as e:
        raise DataError(f"{path}: does not fit in memory (MemoryError: {e}); {expected}") from None
    except (
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,  # the pure-Python unpickler's answer to an unknown opcode
        OverflowError,
        SyntaxError,  # numpy parses a comma-separated dtype string with ast.literal_eval
        RecursionError,
        struct.error,
        OSError,
    ) as e:
        raise DataError(
            f"{path}: not a readable pickle, perhaps truncated ({type(e).__name__}: {e}); "
            f"{expected}"
        ) from None
