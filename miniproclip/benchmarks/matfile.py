"""MATLAB level-5 .mat files, the little that Stanford Cars and Flowers102 store their labels in, without scipy.

Mirrors scipy `scipy/io/matlab/_mio5.py` (`MatFile5Reader`, `VarReader5`) and `_mio5_params.py` (the type codes)
for what those files use: numeric arrays, char arrays, cell arrays and struct arrays, zlib-compressed or not, in
the byte order the header names. The format: a 128-byte header (text, then the byte-order mark "IM" for little
endian), then data elements, each an 8-byte tag (type, byte count; a "small" element packs both in 4 bytes and its
data in the other 4) and its data padded to 8 bytes. A variable is an miMATRIX element: array flags (class),
dimensions, name, then the data by class. Arrays come back as scipy's `loadmat(..., squeeze_me=False)` shapes
them (column-major dims); char arrays as one str per row; structs as an object array of {field: value} dicts.
Anything else (v7.3 / HDF5 files, sparse, objects, function handles) is refused in one line.
"""

import zlib

import numpy as np

from ..errors import BenchmarkError

MI_MATRIX, MI_COMPRESSED = 14, 15
MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
             16: "u1", 17: "u2", 18: "u4"}  # mi* element types -> numpy codes (16-18: UTF-8/16/32 text)
MX_CELL, MX_STRUCT, MX_CHAR = 1, 2, 4
MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}


def read_mat(path: str) -> dict:
    """{variable name: value} of a level-5 .mat file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:10] == b"MATLAB 7.3" or len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise BenchmarkError(f"{path}: not a MATLAB level-5 .mat file (v7.3/HDF5 files are not read); download the "
                             f"dataset's original file again")
    order = "<" if data[126:128] == b"IM" else ">"
    variables, offset = {}, 128
    try:
        while offset < len(data):
            mdtype, body, offset = element(data, offset, order)
            if mdtype == MI_COMPRESSED:  # a whole element, zlib-compressed
                mdtype, body, _ = element(zlib.decompress(body), 0, order)
            if mdtype != MI_MATRIX:
                raise ValueError(f"top-level element of type {mdtype}")
            name, value = matrix(body, order)
            variables[name] = value
    except (ValueError, KeyError, IndexError, zlib.error) as err:
        raise BenchmarkError(f"{path}: a .mat file this reader cannot read ({err}); download the dataset's "
                             f"original file again") from None
    return variables


def element(data: bytes, offset: int, order: str) -> tuple[int, bytes, int]:
    """(type, data, offset of the next element) of the data element at `offset`."""
    tag = int.from_bytes(data[offset:offset + 4], "little" if order == "<" else "big")
    if tag >> 16:  # small element: type in the low 16 bits, byte count in the high ones, data in the next 4 bytes
        return tag & 0xFFFF, data[offset + 4:offset + 4 + (tag >> 16)], offset + 8
    nbytes = int.from_bytes(data[offset + 4:offset + 8], "little" if order == "<" else "big")
    start = offset + 8
    padded = nbytes if tag == MI_COMPRESSED else (nbytes + 7) // 8 * 8  # compressed data is not padded
    return tag, data[start:start + nbytes], start + padded


def numbers(data: bytes, offset: int, order: str) -> tuple[np.ndarray, int]:
    """(the 1-D array of one numeric data element, offset of the next)."""
    mdtype, body, offset = element(data, offset, order)
    return np.frombuffer(body, dtype=order + MI_DTYPES[mdtype]), offset


def matrix(body: bytes, order: str) -> tuple[str, object]:
    """(name, value) of an miMATRIX element's data; an empty body (an empty cell) is an empty array."""
    if not body:
        return "", np.zeros((0, 0))
    flags, offset = numbers(body, 0, order)
    dims, offset = numbers(body, offset, order)
    raw_name, offset = numbers(body, offset, order)
    name, mxclass, shape = raw_name.tobytes().decode("ascii"), int(flags[0]) & 0xFF, tuple(int(d) for d in dims)
    if mxclass in MX_NUMERIC:  # stored in the smallest type that holds the values; the class says the real one
        real, offset = numbers(body, offset, order)
        return name, real.astype(MX_NUMERIC[mxclass]).reshape(shape, order="F")
    if mxclass == MX_CHAR:  # one str per row of the (rows, columns) char array
        grid = np.array(list(characters(body, offset, order)), dtype=object).reshape(shape, order="F")
        return name, np.array(["".join(row) for row in grid.reshape(shape[0], -1)])
    if mxclass == MX_CELL:
        return name, nested(body, offset, order, shape)
    if mxclass == MX_STRUCT:
        length, offset = numbers(body, offset, order)
        names, offset = numbers(body, offset, order)
        width = int(length[0])
        fields = [names[i:i + width].tobytes().split(b"\0")[0].decode("ascii") for i in range(0, len(names), width)]
        values = nested(body, offset, order, (int(np.prod(shape)) * len(fields),)).tolist()  # element by element
        records = np.empty(int(np.prod(shape)), dtype=object)
        for i in range(records.size):
            records[i] = dict(zip(fields, values[i * len(fields):(i + 1) * len(fields)]))
        return name, records.reshape(shape, order="F")
    raise ValueError(f"variable {name!r} of MATLAB class {mxclass} (sparse, object or function handle)")


def characters(body: bytes, offset: int, order: str) -> str:
    """A char array's characters, column-major: code units (miUINT16, scipy's for ASCII) or UTF-8/16/32 text."""
    mdtype, data, _ = element(body, offset, order)
    endian = "le" if order == "<" else "be"
    codecs = {16: "utf-8", 17: f"utf-16-{endian}", 18: f"utf-32-{endian}"}
    if mdtype in codecs:
        return data.decode(codecs[mdtype])
    return "".join(map(chr, np.frombuffer(data, dtype=order + MI_DTYPES[mdtype]).tolist()))


def nested(body: bytes, offset: int, order: str, shape: tuple) -> np.ndarray:
    """The miMATRIX elements that follow `offset`, one per entry of `shape` (column-major), as an object array."""
    out = np.empty(int(np.prod(shape)), dtype=object)
    for i in range(out.size):
        _, inner, offset = element(body, offset, order)
        out[i] = matrix(inner, order)[1]
    return out.reshape(shape, order="F")
