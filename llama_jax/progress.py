"""Progress bars for long command-line work (conversion, planning), on stderr.

    source = progress.Reading(source, desc="hf -> orbax")   # a bar over the bytes read
    ...
    source.close()
    for layout in progress.steps(layouts, "compiling"):      # a bar over a list's items

Bars draw only where stderr is a terminal (tqdm's disable=None): in a log file each redraw
would be a line, so there they stay silent and the tool's own summary lines remain.
"""

from __future__ import annotations

import math
import sys

import numpy as np


def bar(total: float, desc: str, unit: str = "B"):
    """A tqdm bar on stderr, drawn only on a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                disable=None, file=sys.stderr, dynamic_ncols=True)


def steps(items, desc: str):
    """`items` with a bar advancing per item (none for a single item: nothing to watch)."""
    if len(items) < 2:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, disable=None, file=sys.stderr, dynamic_ncols=True)


class Reading:
    """A checkpoint source (convert_checkpoint's readers: names, shape(n), dtype(n), get(n),
    config, carried) whose get() advances a bar by the bytes of each tensor it returns."""

    def __init__(self, source, desc: str):
        self._source = source
        total = sum(math.prod(source.shape(n)) * np.dtype(source.dtype(n)).itemsize
                    for n in source.names)
        self._bar = bar(total, desc)

    def get(self, name: str):
        array = self._source.get(name)
        self._bar.update(array.nbytes)
        return array

    def close(self) -> None:
        self._bar.close()

    def __getattr__(self, name):  # names, shape, dtype, config, carried: the source's own
        return getattr(self._source, name)
