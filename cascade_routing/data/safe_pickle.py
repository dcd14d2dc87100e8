"""A restricted unpickler for the rational-llm-cascades result files (and nothing else).

``pickle.load`` on an untrusted file can run arbitrary code: the file names a callable (any
importable ``module.name``) and the loader calls it. :class:`RestrictedUnpickler` resolves names
only from an explicit allow-list:

- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` and ``numpy.dtype``: how
  numpy scalars (e.g. a ``float64`` confidence) are pickled;
- ``hcma.chain.ChainResponse`` (a class from an unpublished package): mapped to
  :class:`InertChainResponse`, a plain attribute holder with no behaviour;
- builtin containers pickled by reference (``builtins.set``/``frozenset``/``list``/``dict``/
  ``tuple``/``complex``/``bytearray``... no callables that touch the system).

Every other global — ``os.system``, ``subprocess.Popen``, ``builtins.eval``, ``posix.system``... — is
refused with :class:`UnsafePickleError` *before* anything is called (``find_class`` is consulted
when the name is read, and the call opcode only runs afterwards). Persistent ids are refused too.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cascade_routing.data.errors import DatasetError


class UnsafePickleError(DatasetError):
    """The pickle names something outside the allow-list; nothing from it was executed."""


class InertChainResponse:
    """Stand-in for ``hcma.chain.ChainResponse``: stores the pickled state as attributes, nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"InertChainResponse({sorted(k for k in self.__dict__ if not k.startswith('_'))})"


def _numpy_scalar() -> Any:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy", "dtype"): np.dtype,
    ("hcma.chain", "ChainResponse"): InertChainResponse,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("copyreg", "_reconstructor"): None,  # resolved below, object construction of allowed classes only
}


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if cls is not InertChainResponse or base is not object:
        raise UnsafePickleError(f"copyreg._reconstructor for {cls!r} is not allowed")
    return InertChainResponse.__new__(InertChainResponse)


ALLOWED[("copyreg", "_reconstructor")] = _reconstructor


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allow-listed objects."""

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>") -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global {module}.{name} (not in the allow-list of "
                "cascade_routing.data.safe_pickle; nothing from this file was executed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed ({pid!r})")


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; bad files raise :class:`DatasetError`."""
    p = Path(path)
    with open(p, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, source=str(p)).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # noqa: BLE001 - only allow-listed code ran; report any failure clearly
            raise DatasetError(f"{p}: corrupt or unsupported pickle: {type(err).__name__}: {err}") from None


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Like :func:`safe_load` for bytes in memory."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - only allow-listed code ran; report any failure clearly
        raise DatasetError(f"{source}: corrupt or unsupported pickle: {type(err).__name__}: {err}") from None
