"""Parts: the measurements a suite is made of (affine, adversarial, throughput, table1, ...). Each
module registers itself in ``parts.base.PARTS`` with ``@part``; the suites are the TOML files
in the repository's ``suites/`` folder."""

import importlib
import pkgutil


def load_parts() -> None:
    """Import every part module so it registers itself (kept out of ``import capsbench``)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
