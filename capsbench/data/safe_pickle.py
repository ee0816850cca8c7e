"""A restricted unpickler for numpy-array pickles: only array reconstruction is allowed.

Unpickling runs code named by the file; a pickle that names any other global (``os.system``,
``builtins.eval``...) is refused before anything it names is looked up. Plain containers (dicts,
lists, bytes, numbers) need no global, so CIFAR-10's batch dicts read too.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from capsbench.core.errors import CapsbenchError

# numpy 1.x wrote numpy.core; numpy 2 moved it to numpy._core. Protocol 5 pickles (Python 3's
# default) rebuild contiguous arrays with _frombuffer (a buffer, a dtype, a shape: nothing else).
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("_reconstruct",),
    ("numpy._core.multiarray", "_reconstruct"): ("_reconstruct",),
    ("numpy.core.numeric", "_frombuffer"): ("_frombuffer",),
    ("numpy._core.numeric", "_frombuffer"): ("_frombuffer",),
    ("numpy", "ndarray"): ("ndarray",),
    ("numpy", "dtype"): ("dtype",),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, encoding: str = "latin1", what: str = "the MNIST pickle") -> None:
        super().__init__(file, encoding=encoding)
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise CapsbenchError(
                f"refusing pickle: it names the global '{module}.{name}', which is not numpy array "
                f"reconstruction; {self.what} is not the expected data (delete it and fetch again)"
            )
        import numpy as np

        return {"_reconstruct": _np_reconstruct, "_frombuffer": _np_frombuffer, "ndarray": lambda: np.ndarray,
                "dtype": lambda: np.dtype}[name]()  # fmt: skip


def _np_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _np_frombuffer() -> Any:
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    return _frombuffer


def safe_load_numpy_pickle(data: bytes, encoding: str = "latin1", what: str = "the MNIST pickle") -> Any:
    """Unpickle ``data`` allowing only numpy arrays (``latin1`` reads Python 2 era pickles);
    ``what`` names the file in errors."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding, what=what).load()
    except CapsbenchError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CapsbenchError(f"{what} is corrupt or truncated ({type(e).__name__}: {e})") from None
