"""A restricted unpickler for numpy-array pickles: only array reconstruction is allowed.

Unpickling runs code named by the file; a pickle that names any other global (``os.system``,
``builtins.eval``...) is refused before anything it names is looked up.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from capsbench.core.errors import CapsbenchError

# numpy 1.x wrote numpy.core; numpy 2 moved it to numpy._core.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): ("_reconstruct",),
    ("numpy._core.multiarray", "_reconstruct"): ("_reconstruct",),
    ("numpy", "ndarray"): ("ndarray",),
    ("numpy", "dtype"): ("dtype",),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise CapsbenchError(
                f"refusing pickle: it names the global '{module}.{name}', which is not numpy array "
                "reconstruction; the file is not the expected MNIST data (delete it and fetch again)"
            )
        import numpy as np

        return {"_reconstruct": _np_reconstruct, "ndarray": lambda: np.ndarray, "dtype": lambda: np.dtype}[name]()


def _np_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def safe_load_numpy_pickle(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` allowing only numpy arrays (``latin1`` reads Python 2 era pickles)."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding=encoding).load()
    except CapsbenchError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CapsbenchError(f"the MNIST pickle is corrupt or truncated ({type(e).__name__}: {e})") from None
