"""The QMP command families; importing this package registers every command.

Each module in this package is one family (misc, block, bitmap, transaction, job, backup,
hmp, ...) and registers its commands with ``@command`` when imported.  Modules are found by
listing the package, so a new family needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

FAMILIES: list[str] = sorted(info.name for info in pkgutil.iter_modules(__path__)
                             if not info.name.startswith("_"))

for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")
