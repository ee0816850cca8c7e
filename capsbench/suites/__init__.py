"""Suites: parts (affine, adversarial, throughput, table1, ...) registered in ``PARTS``, run by capsbench.runner."""

import importlib

PART_MODULES = ("affine", "adversarial", "throughput", "table1", "multimnist", "capsules", "tta")


def load_parts() -> None:
    """Import the part modules so they register themselves (kept out of ``import capsbench``)."""
    for name in PART_MODULES:
        importlib.import_module(f"capsbench.suites.{name}")
