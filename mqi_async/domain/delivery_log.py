"""The treatment machine's delivery record around the `.ptn` files: calibration, monitor ranges, names.

A delivery folder holds one `.ptn` record per energy layer, `PlanRange.txt` (the monitor range
code and energy of each layer) and `PlanInfo.txt`; the position calibration comes from the
room's `scv_init_G1.txt` / `scv_init_G2.txt` (docs/formats.md §3.1 of the clinic's documents,
summarised in the README's "Delivery check" section).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: `KEY value` names of an scv_init file that the check uses
_SCV_KEYS = ("XPOSOFFSET", "YPOSOFFSET", "XPOSGAIN", "YPOSGAIN", "TIMEGAIN")


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionCalibration:
    """Raw monitor position -> mm at isocentre: `(raw - offset) * gain`; sample spacing in ms."""

    x_offset: float
    y_offset: float
    x_gain_mm: float
    y_gain_mm: float
    time_gain_ms: float

    def as_fields(self) -> dict[str, float]:
        """The field names and values (config's `qa.delivery.calibration` uses the same)."""
        return {
            "x_offset": self.x_offset,
            "y_offset": self.y_offset,
            "x_gain_mm": self.x_gain_mm,
            "y_gain_mm": self.y_gain_mm,
            "time_gain_ms": self.time_gain_ms,
        }


#: defaults where a case ships no scv_init file: G2 as the interpreter's scv_init_G2.txt, G1 as
#: the clinic's PTN checker reads its scv_init_G1.txt
DEFAULT_CALIBRATION: dict[str, PositionCalibration] = {
    "G1": PositionCalibration(
        x_offset=16384.0,
        y_offset=16384.0,
        x_gain_mm=0.010959,
        y_gain_mm=0.0116412,
        time_gain_ms=0.0600745,
    ),
    "G2": PositionCalibration(
        x_offset=24580.0,
        y_offset=32772.0,
        x_gain_mm=0.00726,
        y_gain_mm=0.0071411,
        time_gain_ms=0.06,
    ),
}

#: MU per monitor count (dose1 x range factor), by room: the clinic's plan normalisation
#: factors (the interpreter writes plan CSV counts as MU / factor)
DEFAULT_MU_PER_COUNT: dict[str, float] = {"G1": 2.1125e-8, "G2": 2.12e-8}

#: DOSE1_RANGE code -> monitor count factor (full-scale range over the 470 nA base range)
RANGE_FACTORS: dict[int, float] = {
    2: 1.0,
    3: 140.0 / 47.0,
    4: 420.0 / 47.0,
    5: 1260.0 / 47.0,
}


class DeliveryLogError(ValueError):
    """A delivery's side files (PlanRange, scv_init) cannot be read as the format says."""


def parse_scv_init(text: str) -> PositionCalibration:
    """The calibration of an `scv_init_G*.txt`: `KEY value` lines, `#` comments.

    Raises:
        DeliveryLogError: a needed key is missing or not a number.
    """
    values: dict[str, float] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0].upper() in _SCV_KEYS:
            try:
                values[words[0].upper()] = float(words[1])
            except ValueError:
                raise DeliveryLogError(f"{words[0]} is not a number: {words[1]!r}") from None
    missing = [k for k in _SCV_KEYS if k not in values]
    if missing:
        raise DeliveryLogError(f"lacks {', '.join(missing)}")
    if values["XPOSGAIN"] == 0 or values["YPOSGAIN"] == 0 or values["TIMEGAIN"] <= 0:
        raise DeliveryLogError("a gain is zero")
    return PositionCalibration(
        x_offset=values["XPOSOFFSET"],
        y_offset=values["YPOSOFFSET"],
        x_gain_mm=values["XPOSGAIN"],
        y_gain_mm=values["YPOSGAIN"],
        time_gain_ms=values["TIMEGAIN"],
    )


def scv_init_name(room: str) -> str:
    """The calibration file of a room: `scv_init_G1.txt` or `scv_init_G2.txt`."""
    return f"scv_init_{room}.txt"


def range_factor(code: int | None) -> tuple[float, bool]:
    """(factor, known): an unknown or absent code counts 1.0, as the interpreter does."""
    if code is None or code not in RANGE_FACTORS:
        return 1.0, False
    return RANGE_FACTORS[code], True


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRangeRow:
    """One layer of PlanRange.txt."""

    layer: int
    energy_mev: float | None
    dose1_range: int | None
    ptn_name: str | None


def parse_plan_range(text: str) -> dict[int, PlanRangeRow]:
    """Layer number -> its row; columns are found by the header's names.

    Raises:
        DeliveryLogError: no header with LAYER_NO and DOSE1_RANGE, or a row that does not fit.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DeliveryLogError("is empty")
    head = [c.strip().upper() for c in lines[0].split(",")]
    try:
        layer_col, range_col = head.index("LAYER_NO"), head.index("DOSE1_RANGE")
    except ValueError:
        raise DeliveryLogError("has no LAYER_NO and DOSE1_RANGE header") from None
    energy_col = head.index("LAYER_ENERGY") if "LAYER_ENERGY" in head else None
    name_col = head.index("SCAN_OUT_FL_NM") if "SCAN_OUT_FL_NM" in head else None
    rows: dict[int, PlanRangeRow] = {}
    for number, line in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in line.split(",")]
        try:
            layer = int(cells[layer_col])
            code = int(cells[range_col]) if cells[range_col] else None
            energy = (
                float(cells[energy_col]) if energy_col is not None and cells[energy_col] else None
            )
        except (IndexError, ValueError):
            raise DeliveryLogError(f"line {number} does not fit the header") from None
        name = cells[name_col] if name_col is not None and name_col < len(cells) else None
        rows[layer] = PlanRangeRow(
            layer=layer, energy_mev=energy, dose1_range=code, ptn_name=name or None
        )
    return rows


_PTN_LAYER = re.compile(r"_(\d{1,4})\.ptn$", re.IGNORECASE)


def ptn_layer_number(name: str) -> int | None:
    """The layer number of `<room>_<patient>_<plan>_<field>_<layer>.ptn`, or None."""
    m = _PTN_LAYER.search(name)
    return int(m.group(1)) if m else None
