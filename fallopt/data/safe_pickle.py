"""Load pickles that may come from anywhere without letting them run code.

`pickle.load` executes whatever callables a file names. The lab's files hold only numpy
arrays, lists, dicts and numbers, so we allow exactly the globals those need and refuse the
rest: a hostile or corrupt file becomes a `DataError`, never code execution.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from fallopt.errors import DataError

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.dtypes", "UInt8DType"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how Python 2 pickles of numpy arrays store their bytes
}
_ALLOWED_DTYPE_CLASSES = "numpy.dtypes"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # numpy 2 pickles name their dtype classes, e.g. numpy.dtypes.Float32DType.
        if (module, name) in _ALLOWED or (
            module == _ALLOWED_DTYPE_CLASSES and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: only numpy arrays and plain containers "
            "are allowed"
        )


def load(path: Path, expected: str) -> Any:
    """Unpickle `path` allowing only numpy arrays and plain containers.

    Args:
        path: the pickle file.
        expected: a description of the expected format, quoted in errors.

    Raises:
        DataError: the file is missing, unreadable, truncated, not a pickle, or names a
            global outside the allow list.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected {expected})")
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a safe pickle of arrays ({e}); expected {expected}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise DataError(
            f"{path}: not a readable pickle, perhaps truncated ({type(e).__name__}: {e}); "
            f"expected {expected}"
        ) from None
