"""Read the pickles inside feature files without running their code.

Several layouts keep part of a record as a pickle: bottom-up-attention.pytorch's ``info`` entry of
an ``.npz`` (a dict inside a 0-d object array), MMF's ``<name>_info.npy`` (likewise), MMF's LMDB
values (a pickled dict of numpy arrays) and bottom-up-attention-vqa's ``*_imgid2idx.pkl`` (a dict).
``pickle.load`` would call whatever function a crafted file names (``os.system``, say); this
module's :class:`RestrictedUnpickler` admits only the globals that numpy arrays, numpy scalars
and plain containers need, and refuses any other with an error naming the file and the global,
before anything of it runs.

Admitted globals: numpy's array reconstruction (``_reconstruct``, ``ndarray``, ``dtype``,
``scalar``, ``_frombuffer``, under both ``numpy.core`` (numpy 1) and ``numpy._core`` (numpy 2)),
the builtin containers and scalars (``dict``, ``list``, ``tuple``, ``set``, ``frozenset``,
``bytes``, ``bytearray``, ``str``, ``int``, ``float``, ``complex``, ``bool``) and
``_codecs.encode`` (how protocols 0-2 spell a ``bytes`` object). Python 2 pickles (protocol 0-2, as
the Python 2 tools wrote them) load too: their strings are read as latin-1.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from ..formats import DataFormatError

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric",
                  "numpy")
_NUMPY_NAMES = ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer")
_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "complex",
             "bool")
ALLOWED_GLOBALS = frozenset(
    [(m, n) for m in _NUMPY_MODULES for n in _NUMPY_NAMES]
    + [(m, n) for m in ("builtins", "__builtin__") for n in _BUILTINS]
    + [("_codecs", "encode")]
)


class PickleRefused(Exception):
    """A pickle asked for a global outside :data:`ALLOWED_GLOBALS` (nothing of it ran)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"{module}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits numpy arrays and plain containers only."""

    def __init__(self, file: BinaryIO):
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise PickleRefused(module, name)
        if module.startswith("numpy"):
            # numpy 2 reads numpy 1 pickles (numpy.core.*) through its compatibility modules
            return super().find_class(module, name)
        return super().find_class("builtins" if module == "__builtin__" else module, name)


def safe_load(file: BinaryIO, path: str, field: str, key: str | None = None) -> Any:
    """Unpickle one object from ``file`` with :class:`RestrictedUnpickler`.

    A refused global or a broken pickle raises :class:`DataFormatError` naming ``path``, ``key``
    and ``field`` (and, when refused, the global the pickle asked for).
    """
    try:
        return RestrictedUnpickler(file).load()
    except PickleRefused as e:
        raise DataFormatError(
            path, None, field,
            f"refused to unpickle: it asks for {e.module}.{e.name}, which is neither a numpy array nor a "
            f"plain container (a pickle that would run code; nothing of it was run)", key) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise DataFormatError(path, None, field, f"not a readable pickle: {type(e).__name__}: {e}", key) from None


def safe_loads(data: bytes, path: str, field: str, key: str | None = None) -> Any:
    """:func:`safe_load` of a bytes object."""
    return safe_load(io.BytesIO(data), path, field, key)


def read_npy(file: BinaryIO, path: str, field: str, key: str | None = None) -> np.ndarray:
    """One ``.npy`` stream (a file, or a member of an ``.npz``): a numeric array as ``np.load`` reads
    it; an object array (numpy pickles those) through :class:`RestrictedUnpickler`."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(file)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as e:
        raise DataFormatError(path, None, field, f"not a .npy array: {e}", key) from None
    if not dtype.hasobject:
        count = int(np.prod(shape, dtype=np.int64))
        data = file.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise DataFormatError(path, None, field, f"truncated .npy array: {len(data)} of "
                                  f"{count * dtype.itemsize} bytes", key)
        arr = np.frombuffer(data, dtype=dtype)
        return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
    arr = safe_load(file, path, field, key)
    if not isinstance(arr, np.ndarray):
        raise DataFormatError(path, None, field, f"expected a pickled numpy array, got {type(arr).__name__}", key)
    return arr
