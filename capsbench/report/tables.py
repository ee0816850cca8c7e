"""The tables a run writes, by name, with their columns: what claim preconditions may read.

The runner's own tables are declared here; each part's are registered by ``parts.base.part``
when the part module is imported (``parts.load_parts()``, which every command runs first).
"""

from __future__ import annotations

from capsbench.core.registry import Registry
from capsbench.train.convergence import RECORD_COLUMNS

TABLES: Registry[tuple[str, ...]] = Registry("run table")
TABLES.register("models")(RECORD_COLUMNS)  # how well each model was trained (train/convergence.py)
TABLES.register("clean")(("model", "accuracy", "n", "seed", "params"))  # clean accuracy on the run's test images


def known_tables() -> dict[str, tuple[str, ...]]:
    return {name: TABLES.get(name) for name in TABLES.names()}
