"""The cyclic garbage collector around prefork's own imports.

Importing builds tens of thousands of objects (classes, functions, dataclasses'
generated methods) and frees none: a collection run meanwhile finds nothing, and costs
10-15% of the import, which lies on the path of every start. After the imports, the
first collections would traverse every one of those objects again (2-5 ms of a start),
and each worker's collections would touch their pages (copying them on write).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused(freeze: bool = False) -> Iterator[None]:
    """No collection while the block runs; the caller's setting is restored after.

    ``freeze``: the objects made meanwhile (and all others) go to the permanent
    generation, which collections skip: for a master, whose imports stay for its life
    (the worker spawner freezes again before each fork). Not for a library host, whose
    objects are its own business."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if collecting:
            gc.enable()
