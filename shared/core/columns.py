"""Building Arrow arrays straight from buffers.

`pa.array(python_list)` imports pandas on first use (about 0.35 s here) to check whether the
list is a pandas object; a data tool that starts in a pipeline should not pay that. These
helpers build the same arrays from raw buffers, which is also fast.
"""

from __future__ import annotations

from array import array
from itertools import accumulate

import pyarrow as pa


def strings(values: list[str]) -> pa.Array:
    data = [v.encode("utf-8") for v in values]
    offsets = array("i", accumulate(map(len, data), initial=0))
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def int32s(values) -> pa.Array:
    buf = values if isinstance(values, array) else array("i", values)
    return pa.Array.from_buffers(pa.int32(), len(buf), [None, pa.py_buffer(buf)])


def bools(values: list[bool]) -> pa.Array:
    return pa.Array.from_buffers(pa.uint8(), len(values), [None, pa.py_buffer(bytes(values))]).cast(pa.bool_())


def lists(offsets, values: pa.Array, type: pa.DataType | None = None) -> pa.Array:
    return pa.ListArray.from_arrays(int32s(offsets), values, type=type)
