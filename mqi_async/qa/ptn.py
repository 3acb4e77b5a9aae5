"""The `.ptn` delivered scan record: big-endian uint16 samples of 8 columns, in mm and MU.

Columns: x_raw, y_raw, x_size_raw, y_size_raw, dose1, dose2, layer_no, beam_on_off. A sample
is beam-on when its flag is 1 (the form the bundled stand-ins write) or has both on bits set
(above 0xC000, the machine's form); only those deliver dose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from mqi_async.domain.delivery_log import PositionCalibration

_COLUMNS = 8
_ROW_BYTES = 2 * _COLUMNS
_BOTH_ON_BITS = 0xC000


class PtnFormatError(ValueError):
    """A record that is not whole samples of 8 big-endian uint16 values."""


@dataclass(frozen=True, slots=True)
class PtnRecord:
    """The beam-on samples of one layer's record."""

    x_mm: NDArray[np.float64]
    y_mm: NDArray[np.float64]
    #: dose monitor 1 counts of each sample (raw, before the range factor)
    dose1: NDArray[np.float64]
    #: every sample in the file, beam-on or not
    total_samples: int
    #: the layer number column's most common value among beam-on samples (None if no sample)
    layer_no: int | None

    @property
    def samples(self) -> int:
        return int(self.x_mm.size)


def read_ptn(data: bytes, calibration: PositionCalibration) -> PtnRecord:
    """Decode one record's bytes.

    Raises:
        PtnFormatError: the size is not a multiple of 16 bytes.
    """
    if len(data) % _ROW_BYTES:
        raise PtnFormatError(
            f"{len(data)} bytes is not a whole number of 16-byte samples"
            f" ({len(data) % _ROW_BYTES} bytes left over)"
        )
    rows = np.frombuffer(data, dtype=">u2").reshape(-1, _COLUMNS)
    flag = rows[:, 7]
    on = (flag == 1) | (flag > _BOTH_ON_BITS)
    kept = rows[on]
    layers = kept[:, 6]
    layer_no: int | None = None
    if layers.size:
        values, counts = np.unique(layers, return_counts=True)
        layer_no = int(values[np.argmax(counts)])
    c = calibration
    return PtnRecord(
        x_mm=(kept[:, 0].astype(np.float64) - c.x_offset) * c.x_gain_mm,
        y_mm=(kept[:, 1].astype(np.float64) - c.y_offset) * c.y_gain_mm,
        dose1=kept[:, 4].astype(np.float64),
        total_samples=int(rows.shape[0]),
        layer_no=layer_no,
    )


def encode_ptn(rows: NDArray[np.integer] | list[list[int]]) -> bytes:
    """Bytes of a record from rows of 8 values (the demo cases and tests write records)."""
    array = np.asarray(rows, dtype=np.int64).reshape(-1, _COLUMNS)
    if array.size and (array.min() < 0 or array.max() > 0xFFFF):
        raise PtnFormatError("a value does not fit an unsigned 16-bit field")
    return array.astype(">u2").tobytes()
