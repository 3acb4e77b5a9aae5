"""GPUs as nvidia-smi reports them: value types, and parsers of the two queries (domain.md §4.1-4.2)."""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

#: the inventory query; the 9th field (clocks.gr) is optional in parsing
INVENTORY_QUERY = (
    "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,"
    "temperature.gpu,utilization.gpu,clocks.gr"
)
#: the compute-apps query: which processes use which GPU
COMPUTE_APPS_QUERY = "--query-compute-apps=pid,gpu_uuid,process_name,used_memory"
CSV_FORMAT = "--format=csv,noheader,nounits"


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuInfo:
    """One GPU row of the inventory query."""

    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_used_mb: int
    memory_free_mb: int
    temperature_c: int
    utilization_pct: int
    clock_mhz: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeApp:
    """One process using a GPU (compute-apps query)."""

    pid: int
    gpu_uuid: str
    process_name: str
    used_memory_mb: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSample:
    """Everything one poll of a host learned, with the time it was taken."""

    host: str
    taken_at: datetime
    gpus: tuple[GpuInfo, ...]
    apps: tuple[ComputeApp, ...] = ()
    #: rows that could not be parsed, kept for the log
    skipped_rows: tuple[str, ...] = ()


log = logging.getLogger(__name__)

#: markers the combined query prints after each nvidia-smi call, followed by its exit status
GPU_SPLIT_MARKER = "@@MQI_GPU_INVENTORY_RC"
GPU_END_MARKER = "@@MQI_GPU_APPS_RC"

_EMPTY_VALUES = frozenset(
    {"", "n/a", "[n/a]", "null", "none", "[not supported]", "[insufficient permissions]"}
)
_MIN_UUID_LEN = 10
_MAX_TEMPERATURE_C = 200


def _number(text: str) -> int | None:
    """nvidia-smi's numeric field: N/A, blank and null are 0; junk is None (row skipped)."""
    value = text.strip()
    if value.lower() in _EMPTY_VALUES:
        return 0
    # a unit may survive when someone forgets `nounits`
    for unit in (" MiB", " %", " MHz", " W", " C"):
        value = value.removesuffix(unit)
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return None


def _index(text: str) -> int | None:
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        return None
    return int(value)


def _gpu_row(line: str) -> GpuInfo | None:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) not in (8, 9):
        return None
    index = _index(fields[0])
    uuid = fields[1]
    numbers = [_number(f) for f in fields[3:]]
    if index is None or len(uuid) < _MIN_UUID_LEN or any(n is None for n in numbers):
        return None
    total, used, free, temperature, utilization, *clock = (n or 0 for n in numbers)
    if not 0 <= temperature <= _MAX_TEMPERATURE_C or not 0 <= utilization <= 100:
        return None
    if min(total, used, free) < 0:
        return None
    if used + free > 1.1 * total:
        log.warning("GPU %s reports used + free above its total memory: %s", uuid, line)
    return GpuInfo(
        index=index,
        uuid=uuid,
        name=fields[2].removeprefix("NVIDIA ").strip(),
        memory_total_mb=total,
        memory_used_mb=used,
        memory_free_mb=free,
        temperature_c=temperature,
        utilization_pct=utilization,
        clock_mhz=clock[0] if clock else 0,
    )


def parse_inventory(text: str) -> tuple[tuple[GpuInfo, ...], tuple[str, ...]]:
    """Parse the inventory query's CSV; returns (GPUs in order, rows that were skipped).

    Never raises: a row with the wrong field count, a bad index, a short UUID, an
    out-of-range value or a UUID seen before is skipped and returned for the log.
    """
    gpus: list[GpuInfo] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        gpu = _gpu_row(line)
        if gpu is None or gpu.uuid in seen:
            skipped.append(line)
            continue
        seen.add(gpu.uuid)
        gpus.append(gpu)
    return tuple(gpus), tuple(skipped)


def _app_row(line: str) -> ComputeApp | None:
    raw = line.split(",")
    fields = [f.strip() for f in raw]
    if len(fields) < 4:
        return None
    pid = _index(fields[0])
    uuid = fields[1]
    memory = _number(fields[-1])
    if pid is None or len(uuid) < _MIN_UUID_LEN or memory is None or memory < 0:
        return None
    # a process name may itself contain commas: it is everything between uuid and memory
    name = ",".join(raw[2:-1]).strip()
    return ComputeApp(pid=pid, gpu_uuid=uuid, process_name=name, used_memory_mb=memory)


def parse_compute_apps(text: str) -> tuple[tuple[ComputeApp, ...], tuple[str, ...]]:
    """Parse the compute-apps query's CSV; returns (processes, rows that were skipped). Never raises."""
    apps: list[ComputeApp] = []
    skipped: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.lower().startswith("no running"):
            continue
        app = _app_row(line)
        if app is None:
            skipped.append(line)
        else:
            apps.append(app)
    return tuple(apps), tuple(skipped)


def busy_uuids(apps: Iterable[ComputeApp]) -> frozenset[str]:
    """UUIDs of GPUs with any compute process on them.

    Remote process ids say nothing about ownership, so the scheduler treats a busy GPU
    that no lease of ours holds as used by someone else (a foreign process).
    """
    return frozenset(app.gpu_uuid for app in apps)


def build_sample(host: str, taken_at: datetime, inventory_text: str, apps_text: str) -> GpuSample:
    """Parse both query outputs into one sample; unparseable rows land in `skipped_rows`."""
    gpus, bad_gpus = parse_inventory(inventory_text)
    apps, bad_apps = parse_compute_apps(apps_text)
    return GpuSample(
        host=host, taken_at=taken_at, gpus=gpus, apps=apps, skipped_rows=bad_gpus + bad_apps
    )


def gpu_query_script(nvidia_smi_argv: Sequence[str], *, timeout_s: float) -> str:
    """One POSIX-sh script running both queries, each under `timeout`, with marked exit statuses."""
    base = " ".join(shlex.quote(a) for a in nvidia_smi_argv)
    limit = f"timeout -k 2 {max(1, math.ceil(timeout_s))}"
    inventory = f"{limit} {base} {shlex.quote(INVENTORY_QUERY)} {shlex.quote(CSV_FORMAT)}"
    apps = f"{limit} {base} {shlex.quote(COMPUTE_APPS_QUERY)} {shlex.quote(CSV_FORMAT)}"
    return (
        f"{inventory} </dev/null\n"
        f"printf '\\n%s %s\\n' {GPU_SPLIT_MARKER} \"$?\"\n"
        f"{apps} </dev/null\n"
        f"printf '\\n%s %s\\n' {GPU_END_MARKER} \"$?\"\n"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuQueryOutput:
    """The combined script's stdout, split into the two queries and their exit statuses."""

    inventory_text: str
    inventory_rc: int
    apps_text: str
    apps_rc: int


def _marker_rc(line: str, marker: str) -> int | None:
    """The exit status on a marker line; None when the line is not that marker."""
    head, _, rest = line.strip().partition(" ")
    if head != marker:
        return None
    value = rest.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 6 else -1


def split_gpu_query_output(stdout: str) -> GpuQueryOutput | None:
    """Split the output of `gpu_query_script`; None when a marker is missing (cut-off output)."""
    texts: list[str] = []
    rcs: list[int] = []
    current: list[str] = []
    for line in stdout.splitlines():
        rc = _marker_rc(line, GPU_END_MARKER if rcs else GPU_SPLIT_MARKER)
        if rc is None:
            current.append(line)
            continue
        texts.append("\n".join(current))
        rcs.append(rc)
        current = []
        if len(rcs) == 2:
            return GpuQueryOutput(
                inventory_text=texts[0], inventory_rc=rcs[0], apps_text=texts[1], apps_rc=rcs[1]
            )
    return None
