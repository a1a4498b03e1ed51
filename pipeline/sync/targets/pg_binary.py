"""Target rows in PostgreSQL's binary COPY format, vectors in pgvector's binary form.

Text COPY would print and parse 768 floats per row; the binary form is the vectors' own bytes,
made for a whole batch at once by numpy.
"""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
_NULL = struct.pack(">i", -1)


def copy_data(rows: pa.Table) -> bytes:
    """The COPY ... FROM STDIN (FORMAT BINARY) stream of rows, columns in the table's order."""
    columns = [_fields(rows.column(name).combine_chunks()) for name in rows.column_names]
    count = struct.pack(">h", rows.num_columns)
    body = b"".join(count + b"".join(fields) for fields in zip(*columns, strict=True))
    return HEADER + body + TRAILER


def _fields(column: pa.Array) -> list[bytes]:
    """Each value as a length-prefixed binary field."""
    kind = column.type
    if pa.types.is_fixed_size_list(kind):
        return _vectors(column)
    values = column.to_pylist()
    if pa.types.is_string(kind):
        encoded = [None if v is None else v.encode() for v in values]
        return [_NULL if v is None else struct.pack(">i", len(v)) + v for v in encoded]
    form = {pa.int64(): ">iq", pa.int32(): ">ii", pa.bool_(): ">i?"}[kind]
    size = struct.calcsize(form) - 4
    return [_NULL if v is None else struct.pack(form, size, v) for v in values]


def _vectors(column: pa.FixedSizeListArray) -> list[bytes]:
    # pgvector's vector_recv / halfvec_recv: int16 dimensions, int16 unused, then the values big-endian.
    dim = column.type.list_size
    element = ">f2" if column.type.value_type == pa.float16() else ">f4"
    layout = np.dtype([("length", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("values", element, (dim,))])
    packed = np.zeros(len(column), layout)
    packed["length"] = 4 + dim * np.dtype(element).itemsize
    packed["dim"] = dim
    packed["values"] = column.values.to_numpy(zero_copy_only=False).reshape(len(column), dim)
    raw = packed.tobytes()
    size = layout.itemsize
    return [raw[i * size : (i + 1) * size] for i in range(len(column))]
