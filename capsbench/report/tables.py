"""The tables a run writes, by name, with their columns: what claim preconditions may read.

Filled when ``capsbench.parts`` loads (``parts.load_parts()``, which `run` and `list claims` call
first): ``parts.base`` registers the runner's own tables (models, clean) and each part's.
"""

from __future__ import annotations

from capsbench.core.registry import Registry

TABLES: Registry[tuple[str, ...]] = Registry("run table")


def known_tables() -> dict[str, tuple[str, ...]]:
    return {name: TABLES.get(name) for name in TABLES.names()}
