"""A .npy/.npz file as a source: one row (one input) a frame.

Why: a model whose input is not an image (audio [1,16000], features [1,128], a feature map of 64
channels) is exported from a .npy/.npz of its inputs (`export --calib x.npy`), and `run` had no way to
feed the bundle it made: every source gives camera frames. This source gives the file's rows, read a row
at a time from the array's header on (lepton_edge/array_files.py: nothing unpickled, a .npz member
decompressed only as far as it is read), so a file of a million rows costs one row of memory. For an
image model a row is a frame ([H,W] or [H,W,C], BGR as OpenCV gives); for any other, the runtime takes it
as the model's input, as the export took the same file's rows.
"""
from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np

from lepton_edge import array_files as af
from lepton_edge.capture.base import Frame, Source, SourceOptions, SourceState
from lepton_edge.capture.registry import register_source
from lepton_edge.errors import BadInput

SUFFIXES = (".npy", ".npz")
# One row's size at most (a header can claim [2, 10**12]), checked before a row is allocated: 256 MiB, a
# model input's own ceiling (runtime.MAX_INPUT_VALUES float32 values)
MAX_ROW_BYTES = 1 << 28


@register_source
class ArrayFile(Source):
    """The rows of a .npy, or of a .npz's input array (x / images / inputs / input, else its first)."""

    kind = "arrays"
    claim_order = 40  # a path ending .npy/.npz; before images (50) and the video-file fallback (90)

    def __init__(self, spec: str, stream, shape: tuple[int, ...], dtype: np.dtype, owner=None, policy=None):
        super().__init__(spec, policy)
        self._stream, self._owner = stream, owner
        self.shape, self.dtype = shape, dtype
        self.rows = shape[0] if shape else 1
        self._row_shape = shape[1:] if shape else ()
        self._i = 0
        self._set_state(SourceState.STREAMING)

    @classmethod
    def claims(cls, spec: str) -> bool:
        p = Path(spec)
        return p.suffix.lower() in SUFFIXES and p.is_file()

    @classmethod
    def from_spec(cls, spec: str, options: SourceOptions) -> ArrayFile:
        p = Path(spec)
        stream = owner = None
        try:
            if p.suffix.lower() == ".npz":
                owner = zipfile.ZipFile(p)
                found = af.members(owner, spec)
                stream = owner.open(found[af.input_member(found)])
            else:
                stream = open(p, "rb")  # noqa: SIM115 (closed by close())
            shape, fortran, dtype = af.read_header(stream, spec)
            if fortran and len(shape) > 1:
                raise BadInput(f"{spec}: a Fortran-order array cannot be read a row at a time: save it with np.save "
                               "from a C-order array (np.ascontiguousarray)")
            if af.row_items(shape) * dtype.itemsize > MAX_ROW_BYTES:
                raise BadInput(f"{spec}: rows of {list(shape[1:])} {dtype} are too large to be one input "
                               f"(at most {MAX_ROW_BYTES >> 20} MiB)")
        except Exception as e:  # (a zip's own errors too: bad CRC, encrypted, an unknown method, a broken stream)
            for f in (stream, owner):
                if f is not None:
                    f.close()
            if isinstance(e, BadInput):
                raise
            raise BadInput(f"cannot read {spec}: {_why(e)}") from None
        return cls(spec, stream, shape, dtype, owner, options.policy)

    def read(self, timeout: float | None = None) -> Frame | None:
        if self._i < self.rows and not self.closed:
            t0 = time.perf_counter()
            row = np.empty(self._row_shape, self.dtype)
            try:
                af.read_into(self._stream, row, f"row {self._i}")
            except Exception as e:  # truncated, or a zip member's stream broken (bad CRC, bad deflate data):
                # the rows before it were real, the rest is not there (`run` puts the spec before this)
                self.failure = str(e) if isinstance(e, BadInput) else f"cannot read row {self._i}: {_why(e)}"
                self._set_state(SourceState.FAILED, self.failure)
                return None
            self._i += 1
            self.grabbed += 1
            self.decoded += 1
            return self._frame(row, t0)
        self._set_state(SourceState.ENDED, f"{self.captured} row(s) read")
        return None

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self._row_shape

    def close(self) -> None:
        for f in (self._stream, self._owner):
            if f is not None:
                f.close()
        super().close()


def _why(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
