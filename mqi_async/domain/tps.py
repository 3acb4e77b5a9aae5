"""MOQUI's `moqui_tps.in`: rendering it safely, reading it the way MOQUI does, and what it implies."""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

TpsValue = str | int | float | bool

#: the keys the service computes per beam, in the order they head every rendered file
COMPUTED_KEY_ORDER: tuple[str, ...] = (
    "GPUID",
    "ParentDir",
    "DicomDir",
    "DicomPath",
    "logFilePath",
    "OutputDir",
    "BeamNumbers",
    "GantryNum",
)

#: every key some MOQUI build reads (formats.md §1.3), lower-cased; the last five exist
#: only in the clinic's private build
KNOWN_KEYS: frozenset[str] = frozenset(
    k.lower()
    for k in (
        *COMPUTED_KEY_ORDER,
        "RandomSeed",
        "UseAbsolutePath",
        "TotalThreads",
        "MaxHistoriesPerBatch",
        "BeamPrefix",
        "CTVolumeName",
        "UsingPhantomGeo",
        "TwoCentimeterMode",
        "PhantomDimX",
        "PhantomDimY",
        "PhantomDimZ",
        "PhantomUnitX",
        "PhantomUnitY",
        "PhantomUnitZ",
        "PhantomPositionX",
        "PhantomPositionY",
        "PhantomPositionZ",
        "SourceType",
        "SimulationType",
        "ParticlesPerHistory",
        "Scorer",
        "SupressStd",
        "ScoreToCTGrid",
        "ScoringMask",
        "SaveMap",
        "Mask",
        "ScorerMapName",
        "ScorerVoxelSize",
        "BodyContourName",
        "ReadStructure",
        "OutputFormat",
        "OverwriteResults",
        "RBE",
        "NumberOfFraction",
        "UnitWeights",
        "Machine",
        "Calibration",
        "RangeshifterDensity",
        "DensityScaling",
        "XShift",
        "YShift",
        "ZShift",
        "StoppingStatistics",
        "SaveStoppingStatistics",
        "StoppingCriteria",
        "StatROIMaskFilename",
        "StatROIStructFromRT",
        "StatROI",
        "StatThreshold",
        "NormalizeTotalHistories",
        "EnableBeamLayerMultiGpu",
        "BeamLayerMultiGpuAllowedGpuIds",
        "BeamLayerMultiGpuMaxWorkers",
        "BeamLayerMultiGpuTempRoot",
    )
)

#: keys that appear in example files but that no MOQUI build reads -> what to use instead
NEVER_READ_KEYS: dict[str, str] = {
    "verbosity": "",
    "roiname": "use BodyContourName",
}

#: scorer names MOQUI accepts (any case); anything else aborts with "Unrecognized scorer name"
SCORERS: frozenset[str] = frozenset(
    s.lower() for s in ("EnergyDeposition", "Dose", "LETd", "LETt", "Dij", "TrackLength")
)

# mqi::trim_copy's delimiter set; its "\0\\" tail is cut off by the C string literal
_TRIM = " \f\n\r\t\v"
_KEY_FORBIDDEN = re.compile(r"[\s#\x00-\x1f\x7f]")
_VALUE_FORBIDDEN = re.compile(r"[#\x00-\x08\x0a-\x1f\x7f]")
_NPOS = 2**64 - 1


class TpsParseAbort(Exception):
    """MOQUI would die reading this input: an uncaught C++ exception, so SIGABRT (exit 134)."""

    def __init__(self, what: str, *, exception_type: str = "std::out_of_range") -> None:
        self.what = what
        self.exception_type = exception_type
        super().__init__(f"{exception_type}: {what}")

    @property
    def stderr(self) -> str:
        """The two lines libstdc++ prints before aborting."""
        return (
            f"terminate called after throwing an instance of '{self.exception_type}'\n"
            f"  what():  {self.what}\n"
        )


def _trim_abort(size: int) -> TpsParseAbort:
    # trim_copy("") calls substr(npos), which libstdc++ reports with these exact words
    return TpsParseAbort(
        f"basic_string::substr: __pos (which is {_NPOS}) > this->size() (which is {size})"
    )


def _trim(text: str) -> str:
    """mqi::trim_copy: strips the delimiter set, and throws on an empty or blank string."""
    stripped = text.strip(_TRIM)
    if not stripped:
        raise _trim_abort(0)
    return stripped


def _lines(text: str) -> list[str]:
    """mqi::file_parser::read_input_parameters: the lines MOQUI keeps, in order."""
    kept: list[str] = []
    for raw in text.split("\n"):
        if not raw:
            continue
        line = _trim(raw)  # a whitespace-only line (a lone CR too) aborts here
        if line.startswith("#"):
            continue
        comment = line.find("#")
        kept.append(line if comment < 0 else line[:comment])
    return kept


def parse_tps_input(text: str) -> dict[str, str]:
    """Read a `moqui_tps.in` text with MOQUI's `file_parser` semantics.

    The key ends at the first space and the value is the rest of the line, trimmed; `#`
    starts a comment; keys match case-insensitively and the first line wins. The result maps
    each key (spelled as its first line spells it) to its value; look keys up with
    `tps_lookup`, which is case-insensitive like MOQUI. Lines without a space match nothing
    and are left out.

    Raises TpsParseAbort where MOQUI aborts: on a whitespace-only line, and on a key MOQUI
    reads (`KNOWN_KEYS`) whose first line has an empty value. An unknown key with an empty
    value is never looked up, so MOQUI survives it; it is left out of the result.
    """
    parsed: dict[str, str] = {}
    seen: set[str] = set()
    for line in _lines(text):
        space = line.find(" ")
        if space < 0:
            continue
        key = line[:space].strip(_TRIM)
        folded = key.lower()
        if folded in seen:
            continue
        seen.add(folded)
        value = line[space + 1 :].strip(_TRIM)
        if not value:
            if folded in KNOWN_KEYS:
                raise _trim_abort(0)
            continue
        parsed[key] = value
    return parsed


def format_tps_value(value: TpsValue) -> str:
    """A config value as the renderer writes it: bools `true`/`false`, numbers via str()."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"unsupported moqui_tps.in value type {type(value).__name__}")


def tps_lookup(keys: Mapping[str, TpsValue], key: str) -> str | None:
    """The value MOQUI would see for `key` (case-insensitive, first wins), or None.

    An empty value counts as absent: the renderer omits such keys, so MOQUI uses its default.
    """
    folded = key.lower()
    for name, value in keys.items():
        if name.lower() == folded:
            text = format_tps_value(value).strip(_TRIM)
            return text or None
    return None


def moqui_int(text: str) -> int:
    """C atoi: optional sign and leading digits after leading whitespace; 0 when none."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


def moqui_float(text: str) -> float:
    """C atof for the decimal forms a config holds; 0.0 when nothing parses."""
    m = re.match(
        r"[ \t\n\v\f\r]*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|inf(?:inity)?|nan))",
        text,
        re.IGNORECASE,
    )
    return float(m.group(1)) if m else 0.0


def moqui_bool(text: str) -> bool:
    """file_parser::get_bool: `true` in any case, or a non-zero atoi."""
    return text.lower() == "true" or moqui_int(text) != 0


def _get(keys: Mapping[str, TpsValue], key: str, default: str) -> str:
    found = tps_lookup(keys, key)
    return default if found is None else found


@dataclass(frozen=True, slots=True, kw_only=True)
class TpsComputed:
    """The per-beam keys of `moqui_tps.in`; paths are absolute POSIX paths on the GPU host."""

    #: index within the visible set (CUDA_VISIBLE_DEVICES goes inline on the command line)
    gpu_id: int
    #: the interpreter's output root on the host
    parent_dir: str
    #: the folder holding the RTPLAN (and nothing else MOQUI would mistake for one)
    dicom_dir: str
    #: the interpreter's `log/` folder of per-field CSV folders
    log_dir: str
    #: created by MOQUI with a one-level mkdir: its parent must exist
    output_dir: str
    #: DICOM BeamNumber (300A,00C0) of the beam to simulate
    beam_number: int
    gantry: int

    def __post_init__(self) -> None:
        if self.gpu_id < 0:
            raise ValueError(f"gpu_id must be >= 0, not {self.gpu_id}")
        if self.beam_number < 1:
            # 0 (or nothing) would make MOQUI simulate every beam of the plan
            raise ValueError(f"beam_number must be >= 1, not {self.beam_number}")
        if self.gantry not in (1, 2):
            # MOQUI silently treats any other value as gantry 2
            raise ValueError(f"gantry must be 1 or 2, not {self.gantry}")
        for name in ("parent_dir", "dicom_dir", "log_dir", "output_dir"):
            path = getattr(self, name)
            if not path.startswith("/"):
                raise ValueError(f"{name} must be an absolute path, not {path!r}")
            if path != path.strip(_TRIM):
                raise ValueError(f"{name} must not start or end with whitespace: {path!r}")


def _check_key(key: str) -> None:
    if not key or _KEY_FORBIDDEN.search(key):
        raise ValueError(f"{key!r}: a moqui_tps.in key must be one word without '#'")


def _check_value(key: str, text: str) -> None:
    if _VALUE_FORBIDDEN.search(text):
        # MOQUI cuts a value at '#', and a line break would start a new key
        raise ValueError(f"{key}: value {text!r} holds '#', a line break or a control character")


def _relative_to(path: str, parent: str, key: str) -> str:
    rel = posixpath.relpath(posixpath.normpath(path), posixpath.normpath(parent))
    if rel == "." or rel == ".." or rel.startswith("../"):
        raise ValueError(
            f"{key}: with UseAbsolutePath false, {path!r} must lie below ParentDir {parent!r}"
        )
    return rel


def _computed_lines(static: Mapping[str, TpsValue], c: TpsComputed) -> list[tuple[str, str]]:
    absolute = moqui_bool(_get(static, "UseAbsolutePath", "0"))
    if absolute:
        dicom_dir, log_dir = c.dicom_dir, c.log_dir
    else:
        # relative mode: MOQUI joins ParentDir + "/" + value
        dicom_dir = _relative_to(c.dicom_dir, c.parent_dir, "DicomDir")
        log_dir = _relative_to(c.log_dir, c.parent_dir, "logFilePath")
    return [
        ("GPUID", str(c.gpu_id)),
        ("ParentDir", c.parent_dir),
        ("DicomDir", dicom_dir),
        # DicomPath is read only in absolute mode (SMC fork); it is always the absolute dir
        ("DicomPath", c.dicom_dir),
        ("logFilePath", log_dir),
        ("OutputDir", c.output_dir),
        ("BeamNumbers", str(c.beam_number)),
        ("GantryNum", str(c.gantry)),
    ]


def render_tps_input(static: Mapping[str, TpsValue], computed: TpsComputed) -> str:
    """The text of one beam's `moqui_tps.in`: `Key value` lines, LF only, no blank lines.

    Computed keys come first (and MOQUI's first line wins), then the static keys in the
    order given. A static key with an empty value is omitted so MOQUI uses its default.

    Raises ValueError (a bug in the caller or an unchecked config) when a static key is a
    computed one, two static keys differ only in case, a key is not one word, or a value
    holds `#`, a line break or another control character.
    """
    computed_names = {k.lower() for k in COMPUTED_KEY_ORDER}
    lines: list[str] = []
    for key, text in _computed_lines(static, computed):
        _check_value(key, text)
        lines.append(f"{key} {text}")
    seen: set[str] = set()
    for key, value in static.items():
        _check_key(key)
        folded = key.lower()
        if folded in computed_names:
            raise ValueError(f"{key}: computed per beam; it must not come from the config")
        if folded in seen:
            raise ValueError(f"{key}: given twice (keys are case-insensitive in MOQUI)")
        seen.add(folded)
        text = format_tps_value(value)
        _check_value(key, text)
        text = text.strip(_TRIM)
        if text:
            lines.append(f"{key} {text}")
    return "\n".join(lines) + "\n"


def unread_keys(static: Mapping[str, TpsValue]) -> list[str]:
    """Warnings for static keys MOQUI never reads, one line each, starting with the key.

    `Verbosity` and `ROIName` appear in example files but no build reads them; any key not
    in formats.md §1.3 is ignored silently by MOQUI (a typo, most likely).
    """
    warnings: list[str] = []
    for key in static:
        folded = key.lower()
        if folded in NEVER_READ_KEYS:
            hint = NEVER_READ_KEYS[folded]
            warnings.append(f"{key}: MOQUI never reads this key" + (f"; {hint}" if hint else ""))
        elif folded not in KNOWN_KEYS:
            warnings.append(f"{key}: not a MOQUI input key; MOQUI ignores it")
    return warnings


def compatibility_warnings(static: Mapping[str, TpsValue]) -> list[str]:
    """Warnings for static keys that some MOQUI build handles badly, one line each, key first.

    What a run of the public fork (jokh38/moqui_v2) showed: `UseAbsolutePath true` aborts it,
    it ignores `OutputFormat dcm`, and it truncates each spot's count × ParticlesPerHistory
    to a whole number of histories.
    """
    warnings: list[str] = []
    absolute = tps_lookup(static, "UseAbsolutePath")
    if absolute is not None and moqui_bool(absolute):
        warnings.append(
            "UseAbsolutePath: true makes the public MOQUI fork abort with 'Log Dir is not "
            "provided' (exit 134); set it to false: the service then writes DicomDir and "
            "logFilePath relative to ParentDir, which every build reads"
        )
    if tps_lookup(static, "OutputFormat") == "dcm":
        warnings.append(
            "OutputFormat: dcm is ignored by the public MOQUI fork, which writes .raw instead; "
            "the service then converts that .raw to RT Dose itself"
        )
    pph_text = tps_lookup(static, "ParticlesPerHistory")
    if pph_text is not None:
        pph = moqui_float(pph_text)
        if pph <= 0 and pph != -1:
            warnings.append(
                f"ParticlesPerHistory: {pph_text} gives every spot 0 or fewer histories "
                "(MOQUI multiplies each log count by it); use a positive value such as 1"
            )
        elif 0 < pph < 1:
            need = math.ceil(1 / pph)
            if int(need * pph) < 1:  # float rounding: the smallest count that still yields 1
                need += 1
            warnings.append(
                f"ParticlesPerHistory: {pph_text} × a spot's log count below {need} gives 0 "
                "histories (MOQUI truncates each spot's product); a beam whose every spot "
                "does so fails before launch with zero_histories"
            )
    return warnings


@dataclass(frozen=True, slots=True, kw_only=True)
class PhantomGrid:
    """The scoring grid of a phantom run: voxel counts, sizes (mm) and lower edge (mm)."""

    nx: int
    ny: int
    nz: int
    dx: float
    dy: float
    dz: float
    #: lower edge of the grid, not a voxel centre
    x0: float
    y0: float
    z0: float

    def __post_init__(self) -> None:
        if min(self.nx, self.ny, self.nz) < 1:
            raise ValueError(f"phantom dimensions must be >= 1: {self.nx}x{self.ny}x{self.nz}")
        if min(self.dx, self.dy, self.dz) <= 0:
            raise ValueError(f"voxel sizes must be > 0: {self.dx}, {self.dy}, {self.dz}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape of the raw file: (nz, ny, nx), x fastest."""
        return (self.nz, self.ny, self.nx)

    @property
    def voxel_count(self) -> int:
        return self.nx * self.ny * self.nz

    @property
    def raw_bytes(self) -> int:
        """Size of MOQUI's headerless float64 `.raw` file."""
        return 8 * self.voxel_count

    @property
    def first_voxel_centre(self) -> tuple[float, float, float]:
        """Centre of voxel (0, 0, 0): the RT Dose ImagePositionPatient."""
        return (self.x0 + self.dx / 2, self.y0 + self.dy / 2, self.z0 + self.dz / 2)

    @property
    def frame_offsets(self) -> tuple[float, ...]:
        """GridFrameOffsetVector: each slice's z relative to the first, starting at 0."""
        return tuple(k * self.dz for k in range(self.nz))


#: TwoCentimeterMode's fixed scoring slab (formats.md §2.2); PhantomDim* are ignored
TWO_CM_SLAB = PhantomGrid(
    nx=400, ny=400, nz=3, dx=1.0, dy=1.0, dz=2.0 / 3.0, x0=-200.0, y0=-200.0, z0=-1.0
)

#: the same slab as the public fork (jokh38/moqui_v2) scores it: one 2 mm slice, z -1..+1 mm
TWO_CM_SLAB_ONE_SLICE = PhantomGrid(
    nx=400, ny=400, nz=1, dx=1.0, dy=1.0, dz=2.0, x0=-200.0, y0=-200.0, z0=-1.0
)


def uses_phantom(keys: Mapping[str, TpsValue]) -> bool:
    return moqui_bool(_get(keys, "UsingPhantomGeo", "0"))


def two_centimeter_mode(keys: Mapping[str, TpsValue]) -> bool:
    """TwoCentimeterMode; MOQUI reads it only together with UsingPhantomGeo."""
    return uses_phantom(keys) and moqui_bool(_get(keys, "TwoCentimeterMode", "0"))


def phantom_grids(keys: Mapping[str, TpsValue]) -> tuple[PhantomGrid, ...]:
    """Every grid some MOQUI build scores on for these keys, the service's default first.

    TwoCentimeterMode gives two: the clinic build's 3-slice slab and the public fork's
    1-slice one; the raw file's size tells which one a run wrote.
    """
    if two_centimeter_mode(keys):
        return (TWO_CM_SLAB, TWO_CM_SLAB_ONE_SLICE)
    return (phantom_grid(keys),)


def grid_for_size(keys: Mapping[str, TpsValue], size_bytes: int) -> PhantomGrid:
    """The grid whose raw file has size_bytes, else the default one (so its size check fails)."""
    grids = phantom_grids(keys)
    return next((g for g in grids if g.raw_bytes == size_bytes), grids[0])


def phantom_grid(keys: Mapping[str, TpsValue]) -> PhantomGrid:
    """The dose grid MOQUI scores on, from the static keys or a parsed `moqui_tps.in`.

    Uses MOQUI's reading: PhantomDim*/Unit*/Position* through atoi (so `-200.0` is -200 and
    `1.5` mm is 1), MOQUI's defaults (200 voxels, 1 mm, edge at 1 mm) for absent keys, and the
    fixed slab in TwoCentimeterMode. Raises ValueError in CT mode (the grid is the CT's) or
    for a grid with no voxels.
    """
    if not uses_phantom(keys):
        raise ValueError("UsingPhantomGeo is false: the dose grid is the CT's, not a phantom")
    if two_centimeter_mode(keys):
        return TWO_CM_SLAB

    def num(key: str, default: int) -> int:
        return moqui_int(_get(keys, key, str(default)))

    return PhantomGrid(
        nx=num("PhantomDimX", 200),
        ny=num("PhantomDimY", 200),
        nz=num("PhantomDimZ", 200),
        dx=float(num("PhantomUnitX", 1)),
        dy=float(num("PhantomUnitY", 1)),
        dz=float(num("PhantomUnitZ", 1)),
        x0=float(num("PhantomPositionX", 1)),
        y0=float(num("PhantomPositionY", 1)),
        z0=float(num("PhantomPositionZ", 1)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpectedOutput:
    """One file MOQUI writes into OutputDir for a beam."""

    name: str
    #: exact size in bytes where the format fixes it (raw data), else None
    size_bytes: int | None
    #: further sizes some MOQUI build writes (TwoCentimeterMode: 3 slices or 1)
    other_sizes: tuple[int, ...] = ()
    #: the file a build writes instead when it lacks this format (the public fork has no
    #: `OutputFormat dcm` and writes `.raw`)
    fallback: ExpectedOutput | None = None

    @property
    def is_raw(self) -> bool:
        return self.name.endswith(".raw")

    @property
    def is_dicom(self) -> bool:
        return self.name.endswith(".dcm")

    def size_ok(self, size: int) -> bool:
        return self.size_bytes is None or size == self.size_bytes or size in self.other_sizes


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputCheck:
    """What a listing of OutputDir holds of the expected outputs."""

    #: the files to fetch and convert: each expected one, or its fallback when only that exists
    found: tuple[ExpectedOutput, ...]
    missing: tuple[str, ...]
    wrong_size: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.wrong_size


def check_outputs(expected: Sequence[ExpectedOutput], listing: Mapping[str, int]) -> OutputCheck:
    """Match expected outputs against `name -> size` of the files MOQUI left in OutputDir."""
    found: list[ExpectedOutput] = []
    missing: list[str] = []
    wrong: list[str] = []
    for want in expected:
        got = want
        fallback = want.fallback
        if want.name not in listing and fallback is not None and fallback.name in listing:
            got = fallback
        if got.name not in listing:
            missing.append(want.name)
        elif not got.size_ok(listing[got.name]):
            wrong.append(got.name)
        else:
            found.append(got)
    return OutputCheck(found=tuple(found), missing=tuple(missing), wrong_size=tuple(wrong))


def scorer_name(keys: Mapping[str, TpsValue]) -> str:
    """The Scorer as typed (it goes into file names); ValueError when MOQUI would abort."""
    scorer = _get(keys, "Scorer", "EnergyDeposition")
    if scorer.lower() not in SCORERS:
        raise ValueError(f"Scorer {scorer!r}: MOQUI aborts with 'Unrecognized scorer name'")
    return scorer


def scoring_child_index(keys: Mapping[str, TpsValue], *, beamline_geometries: int = 0) -> int:
    """Where the scoring phantom sits among the world's children (the SMC fork).

    beamline_geometries counts the beam's range shifters and blocks. Phantom mode adds an
    air box before the phantom, and TwoCentimeterMode a water slab too.
    """
    if beamline_geometries < 0:
        raise ValueError("beamline_geometries must be >= 0")
    if not uses_phantom(keys):
        return beamline_geometries
    return beamline_geometries + (2 if two_centimeter_mode(keys) else 1)


def expected_outputs(
    keys: Mapping[str, TpsValue], beam_name: str, *, beamline_geometries: int = 0
) -> tuple[ExpectedOutput, ...]:
    """The files MOQUI writes for one beam: `<BeamName>_<childIndex>_<Scorer>.<ext>`.

    `keys` are the static keys (or a parsed file); beam_name is the plan's BeamName as is.
    Raw data has a known size (8·nx·ny·nz) in phantom mode (in TwoCentimeterMode either
    slab's); headers, DICOM and npz do not. OutputFormat is compared case-sensitively except
    `npz`, as MOQUI does; anything unrecognised gives raw. `dcm` falls back to the `.raw`
    the public fork writes instead.
    """
    stem = (
        f"{beam_name}_{scoring_child_index(keys, beamline_geometries=beamline_geometries)}"
        f"_{scorer_name(keys)}"
    )
    sizes = tuple(g.raw_bytes for g in phantom_grids(keys)) if uses_phantom(keys) else ()
    raw = ExpectedOutput(
        name=f"{stem}.raw",
        size_bytes=sizes[0] if sizes else None,
        other_sizes=sizes[1:],
    )
    fmt = _get(keys, "OutputFormat", "raw")
    if fmt.lower() == "npz":
        return (ExpectedOutput(name=f"{stem}.npz", size_bytes=None),)
    if fmt == "mhd":
        return (ExpectedOutput(name=f"{stem}.mhd", size_bytes=None), raw)
    if fmt == "mha":
        return (ExpectedOutput(name=f"{stem}.mha", size_bytes=None),)
    if fmt == "dcm":
        return (ExpectedOutput(name=f"{stem}.dcm", size_bytes=None, fallback=raw),)
    return (raw,)
