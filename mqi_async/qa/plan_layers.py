"""A beam's energy layers and spots from the RT Ion Plan: positions in mm, weights in MU.

A layer is a run of control points with one NominalBeamEnergy (the energy carries over where a
control point omits it); its spots are those of every control point in the run with a
non-zero ScanSpotMetersetWeights entry. MU = weight x BeamMeterset / FinalCumulativeMetersetWeight
(the fraction group's beam meterset; the weights themselves where the plan gives none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset


class PlanLayersError(ValueError):
    """The plan has no such beam, or its spot data cannot be read."""


@dataclass(frozen=True, slots=True)
class PlannedLayer:
    """One energy layer of a beam."""

    energy_mev: float
    x_mm: NDArray[np.float64]
    y_mm: NDArray[np.float64]
    mu: NDArray[np.float64]
    #: ScanningSpotSize (x, y) FWHM in mm at isocentre; None when the plan gives none
    spot_fwhm_mm: tuple[float, float] | None

    @property
    def total_mu(self) -> float:
        return float(self.mu.sum())


def read_planned_layers(path: str | os.PathLike[str], beam_number: int) -> list[PlannedLayer]:
    """The layers of the beam with this DICOM BeamNumber in the RTPLAN file at `path`.

    Raises:
        PlanLayersError: unreadable file, no such beam, or malformed spot data.
    """
    try:
        ds = pydicom.dcmread(os.fspath(path))
    except Exception as exc:  # pydicom raises many types for a broken file
        raise PlanLayersError(f"the RTPLAN cannot be read: {exc}") from exc
    return planned_layers(ds, beam_number)


def _beam_meterset(ds: Dataset, beam_number: int) -> float | None:
    for group in ds.get("FractionGroupSequence") or []:
        for ref in group.get("ReferencedBeamSequence") or []:
            if int(ref.get("ReferencedBeamNumber", -1)) == beam_number:
                value = ref.get("BeamMeterset")
                if value is not None and str(value).strip() != "" and float(value) > 0:
                    return float(value)
    return None


def planned_layers(ds: Dataset, beam_number: int) -> list[PlannedLayer]:
    """The layers of one beam of a plan dataset (see the module docstring)."""
    beam = next(
        (b for b in ds.get("IonBeamSequence") or [] if int(b.get("BeamNumber", -1)) == beam_number),
        None,
    )
    if beam is None:
        raise PlanLayersError(f"the RTPLAN has no ion beam with BeamNumber {beam_number}")
    try:
        return _layers_of(beam, _beam_meterset(ds, beam_number))
    except PlanLayersError:
        raise
    except Exception as exc:  # a malformed value surfaces lazily in pydicom
        raise PlanLayersError(f"beam {beam_number}: unreadable spot data ({exc})") from exc


def _layers_of(beam: Dataset, meterset: float | None) -> list[PlannedLayer]:
    final = beam.get("FinalCumulativeMetersetWeight")
    final_weight = float(final) if final is not None and str(final).strip() != "" else None
    scale = meterset / final_weight if meterset and final_weight else 1.0
    layers: list[PlannedLayer] = []
    energy: float | None = None
    xs: list[float] = []
    ys: list[float] = []
    ws: list[float] = []
    fwhm: tuple[float, float] | None = None

    def close() -> None:
        if energy is not None and ws:
            layers.append(
                PlannedLayer(
                    energy_mev=energy,
                    x_mm=np.asarray(xs, dtype=np.float64),
                    y_mm=np.asarray(ys, dtype=np.float64),
                    mu=np.asarray(ws, dtype=np.float64) * scale,
                    spot_fwhm_mm=fwhm,
                )
            )

    for cp in beam.get("IonControlPointSequence") or []:
        value = cp.get("NominalBeamEnergy")
        cp_energy = float(value) if value is not None and str(value).strip() != "" else energy
        if cp_energy != energy:
            close()
            energy, xs, ys, ws, fwhm = cp_energy, [], [], [], None
        size = cp.get("ScanningSpotSize")
        if size is not None and len(size) == 2 and fwhm is None:
            fwhm = (float(size[0]), float(size[1]))
        weights = cp.get("ScanSpotMetersetWeights")
        if weights is None:
            continue
        w = np.atleast_1d(np.asarray(weights, dtype=np.float64))
        positions = np.atleast_1d(np.asarray(cp.get("ScanSpotPositionMap") or [], np.float64))
        if positions.size != 2 * w.size:
            raise PlanLayersError(
                f"control point {cp.get('ControlPointIndex', '?')}: {w.size} weights but"
                f" {positions.size} position values"
            )
        keep = w > 0
        xs.extend(positions[0::2][keep].tolist())
        ys.extend(positions[1::2][keep].tolist())
        ws.extend(w[keep].tolist())
    close()
    return layers
