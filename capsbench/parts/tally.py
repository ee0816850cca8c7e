"""Counts that stay on the device until a part is done: the parts add 0-dim tensors batch by
batch, with no host sync, and read every count back at the end with one ``torch.stack(...).tolist()``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Counts:
    """A tally read back to the host."""

    values: dict[tuple, dict[str, int | float]]  # key -> count name -> count (int for integer tensors)
    n: dict[tuple, int]  # key -> number of examples counted
    lo: float  # smallest value seen by ``Tally.span`` (inf when it saw nothing)
    hi: float  # largest value seen by ``Tally.span`` (-inf when it saw nothing)
    spanned: int  # rows seen by ``Tally.span``
    extra: list[int | float]  # the tensors given to ``Tally.read``, in order


class Tally:
    """Named counts per key (tuples), summed over ``add`` calls, with the number of examples
    behind them; and the range of every tensor passed to ``span`` (e.g. for a [0, 1] check)."""

    def __init__(self) -> None:
        self.counts: dict[tuple, dict[str, Tensor]] = {}  # key -> name -> 0-dim device tensor
        self.n: dict[tuple, int] = {}
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.spanned = 0

    def __contains__(self, key: tuple) -> bool:
        return key in self.n

    def add(self, key: tuple, n: int, **counts: Tensor) -> None:
        """Add ``counts`` (0-dim tensors) over ``n`` more examples to ``key``."""
        into = self.counts.setdefault(key, {})
        for name, c in counts.items():
            into[name] = into[name] + c if name in into else c
        self.n[key] = self.n.get(key, 0) + n

    def put(self, key: tuple, n: int, **counts: Tensor) -> None:
        """Set ``key`` to ``counts`` over ``n`` examples, replacing what it held."""
        self.counts[key], self.n[key] = dict(counts), n

    def span(self, x: Tensor) -> None:
        """Widen the tracked range to the min and max of ``x`` (B, ...) and count its B rows."""
        lo, hi = x.min(), x.max()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.spanned += x.shape[0]

    def read(self, *extra: Tensor) -> Counts:
        """Every count, the range and the 0-dim tensors ``extra``, with one host sync."""
        keys = [(key, name) for key, per in self.counts.items() for name in per]
        ranged = [self.lo, self.hi] if self.lo is not None else []
        tensors = [self.counts[key][name] for key, name in keys] + ranged + list(extra)
        # One stack needs one dtype: float64 holds every count (< 2**53) and float32 value exactly.
        values = torch.stack([t.double() for t in tensors]).tolist() if tensors else []
        values = [v if t.is_floating_point() else int(v) for t, v in zip(tensors, values)]
        counts: dict[tuple, dict[str, int | float]] = {key: {} for key in self.counts}
        for (key, name), v in zip(keys, values):
            counts[key][name] = v
        lo, hi = values[len(keys) : len(keys) + 2] if ranged else (float("inf"), float("-inf"))
        return Counts(counts, dict(self.n), lo, hi, self.spanned, values[len(keys) + len(ranged) :])
