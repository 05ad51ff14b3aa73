"""Restricted loading of pickled ``.npy`` files (CALVIN's annotation and scene files).

CALVIN stores ``scene_info.npy`` and ``lang_annotations/auto_lang_ann.npy`` as ``np.save`` of a
Python dict, i.e. a 0-d object array whose payload is a pickle. ``np.load(allow_pickle=True)``
would execute whatever that pickle names; these helpers instead admit only the globals needed to
rebuild numpy arrays, dtypes and numpy scalars. Dicts, lists, tuples, strings and numbers are built
by pickle opcodes directly and need no global, so everything else is refused with an error naming
the file and the offending global.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.lib.format as npy_format

# numpy 1.x pickles name ``numpy.core``; numpy 2.x names ``numpy._core``. Both spell the same
# functions, which only rebuild arrays, dtypes and scalars from raw bytes.
_NUMPY_CORE_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): np._core.multiarray._reconstruct for m in _NUMPY_CORE_MODULES},
    **{(m, "scalar"): np._core.multiarray.scalar for m in _NUMPY_CORE_MODULES},
    **{(m, "_frombuffer"): np._core.numeric._frombuffer for m in _NUMPY_NUMERIC_MODULES},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "complex"): complex,
    ("__builtin__", "complex"): complex,  # protocol-2 pickles spell builtins the Python 2 way
}
ALLOWED_DESCRIPTION = "numpy arrays and dtypes, dicts, lists, tuples, strings and numbers"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles spell array bytes as latin-1 text."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed for numpy data and builtin containers."""

    def __init__(self, file: BinaryIO, where: str):
        super().__init__(file, encoding="latin1")
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"{self._where}: refusing to unpickle global '{module}.{name}' "
            f"(only {ALLOWED_DESCRIPTION} are allowed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self._where}: refusing persistent id {pid!r}")


def restricted_loads(data: bytes, where: str = "<bytes>") -> Any:
    """Unpickle ``data`` admitting only numpy arrays/dtypes/scalars and builtin containers.

    Raises ValueError naming ``where`` when the pickle names anything else or is malformed.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), where).load()
    except pickle.UnpicklingError as err:
        message = str(err)
        if not message.startswith(where):
            message = f"{where}: malformed pickle ({message})"
        raise ValueError(message) from None
    except (EOFError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{where}: malformed pickle ({type(err).__name__}: {err})") from None


def _read_npy_header(fp: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read the ``.npy`` magic and header; returns (shape, fortran_order, dtype)."""
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(fp)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(fp)
    except ValueError as err:
        raise ValueError(f"{where}: not a valid .npy file ({err})") from None
    raise ValueError(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")


def load_npy(path: str | Path, fp: BinaryIO | None = None) -> np.ndarray:
    """Load an ``.npy`` file; object arrays go through the restricted unpickler.

    Plain numeric arrays load through ``np.load(allow_pickle=False)``. ``fp`` may supply an open
    binary file (e.g. from fsspec); otherwise ``path`` is opened locally.
    """
    where = str(path)
    with (open(path, "rb") if fp is None else _no_close(fp)) as handle:
        shape, _fortran, dtype = _read_npy_header(handle, where)
        if not dtype.hasobject:
            handle.seek(0)
            try:
                return np.load(handle, allow_pickle=False)
            except ValueError as err:
                raise ValueError(f"{where}: unreadable array ({err})") from None
        payload = handle.read()
    array = restricted_loads(payload, where)
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise ValueError(f"{where}: pickled payload is not an array of shape {tuple(shape)}")
    return array


def load_pickled_dict(path: str | Path, fp: BinaryIO | None = None) -> dict:
    """Load an ``.npy`` holding ``np.save(dict)`` (a 0-d object array) and return the dict."""
    array = load_npy(path, fp)
    if array.shape != () or not isinstance(array.item(), dict):
        raise ValueError(f"{path}: expected a pickled dict, found array of shape {array.shape}")
    return array.item()


class _no_close:
    """Context manager that yields a caller-owned file without closing it."""

    def __init__(self, fp: BinaryIO):
        self._fp = fp

    def __enter__(self) -> BinaryIO:
        return self._fp

    def __exit__(self, *exc: object) -> None:
        return None
