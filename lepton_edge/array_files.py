""".npy / .npz files read from their headers on, a row at a time, never unpickled.

Why not np.load: a 3.5 MB .npz of zeros decompresses to a 3.7 GB array before anything looks at its
shape, and an object array unpickles whatever the file names. Here the header is read first (shape and
dtype), an object dtype is refused, and only the rows asked for are read. Used by the export's
calibration data (compress/calibration.py) and by `run`'s array source (capture/arrays.py), which
feeds a model whose input is not an image (audio, features, tabular) one row at a time.
"""
from __future__ import annotations

import math
from typing import IO

import numpy as np

from lepton_edge.errors import BadInput

# the arrays of a .npz that hold the inputs, by name (else the first one); and the labels beside them
INPUT_NAMES = ("x", "images", "inputs", "input")
LABEL_NAMES = ("y", "labels", "targets")
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what a model input can be


def read_header(f: IO[bytes], src: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of the .npy array in stream `f`, left at its first byte of data;
    BadInput for a file that is not a numeric .npy (nothing is unpickled)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):  # (numpy's own loader knows these three)
            raise ValueError(f"format version {version}")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError:
        dtype = np.dtype(object)  # not a .npy: said as np.load's refusal of one was
        shape, fortran = (), False
    if dtype.hasobject:
        raise BadInput(f"cannot read {src}: not a numeric array file (Python objects, or not .npy at all; "
                       "nothing is unpickled)")
    if dtype.kind not in NUMERIC_KINDS or dtype.itemsize > 8:  # (a 1.5 GB void 'row' in a 1.4 MB .npz, complex,
        # strings, datetimes: none is a model input, and refused here no byte of them is allocated)
        raise BadInput(f"{src}: an array of {dtype}, not numbers a model takes (bool, integers, float16-64)")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def read_into(f: IO[bytes], out: np.ndarray, src: str) -> None:
    """Fill `out` from stream `f` a chunk at a time (one read of the whole would hold it twice)."""
    buf, pos, chunk = memoryview(out.reshape(-1).view(np.uint8)), 0, 16 << 20
    while pos < len(buf):
        data = f.read(min(chunk, len(buf) - pos))
        if not data:
            raise BadInput(f"cannot read {src}: the array is truncated ({pos} of {len(buf)} bytes)")
        buf[pos:pos + len(data)] = data
        pos += len(data)


def members(z, src: str) -> dict[str, str]:
    """A .npz's arrays: {name without .npy: member name}; BadInput when it holds none."""
    found = {n[:-4] if n.endswith(".npy") else n: n for n in z.namelist()}
    if not found:
        raise BadInput(f"{src}: the .npz holds no arrays")
    return found


def input_member(found: dict[str, str]) -> str:
    """The name of a .npz's input array: x / images / inputs / input, else the first."""
    return next((k for k in INPUT_NAMES if k in found), next(iter(found)))


def row_items(shape: tuple[int, ...]) -> int:
    """Values in one row (one input) of an array of `shape`."""
    return math.prod(shape[1:]) if shape else 1
