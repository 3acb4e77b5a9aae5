"""Pure scheduling rules: which GPUs are free, which to lease, retry backoff, MOQUI progress."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from mqi_async.domain.errors import FailureKind, failure_info
from mqi_async.domain.gpus import ComputeApp, GpuInfo, GpuSample
from mqi_async.domain.moqui_log import has_end_marker


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuPolicy:
    min_free_memory_mb: int
    #: a sample older than this is stale: nothing on it counts as free
    max_sample_age_s: float
    #: "per_beam" or "all_gpus"
    allocation: str
    #: GPU indices the service may use (None = all)
    allowed_indices: frozenset[int] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuChoice:
    """GPUs to lease for one beam, in index order."""

    host: str
    gpus: tuple[GpuInfo, ...]

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(g.uuid for g in self.gpus)


def free_gpus(
    sample: GpuSample,
    *,
    leased: frozenset[str],
    policy: GpuPolicy,
    age_s: float,
    released_since: frozenset[str] = frozenset(),
    own_pids: Mapping[str, frozenset[int]] | None = None,
) -> list[GpuInfo]:
    """GPUs of a sample that a new beam may use now.

    A GPU is free when no lease holds it, its sample is fresh, it has enough free memory,
    and no foreign compute process runs on it. `own_pids` are the processes seen on each GPU
    while one of our beams held it: after the release they are known to have ended, so a
    sample still showing them (and their memory) does not make the GPU wait for the next
    poll. In `all_gpus` mode the host must really be idle: a GPU in `released_since` (freed
    after this sample was taken) does not count (docs/domain.md §2.1, the serial multi-GPU
    gate). `age_s` comes from a monotonic clock, so a wall-clock jump neither revives a stale
    sample nor ages a fresh one.
    """
    if age_s > policy.max_sample_age_s:
        return []
    own = own_pids or {}
    apps_on: dict[str, list[ComputeApp]] = {}
    for app in sample.apps:
        apps_on.setdefault(app.gpu_uuid, []).append(app)
    out = []
    for g in sample.gpus:
        if policy.allowed_indices is not None and g.index not in policy.allowed_indices:
            continue
        if g.uuid in leased:
            continue
        mine = own.get(g.uuid, frozenset())
        apps = apps_on.get(g.uuid, [])
        if any(a.pid not in mine for a in apps):
            continue
        if policy.allocation == "all_gpus" and (apps or g.uuid in released_since):
            continue
        memory_free_mb = g.memory_free_mb + sum(a.used_memory_mb for a in apps)
        if memory_free_mb < policy.min_free_memory_mb:
            continue
        out.append(g)
    return sorted(out, key=lambda g: g.index)


def choose_gpus(
    sample: GpuSample,
    *,
    leased: frozenset[str],
    policy: GpuPolicy,
    age_s: float,
    released_since: frozenset[str] = frozenset(),
    own_pids: Mapping[str, frozenset[int]] | None = None,
) -> GpuChoice | None:
    """The GPUs one beam gets on this host, or None when it must wait."""
    free = free_gpus(
        sample,
        leased=leased,
        policy=policy,
        age_s=age_s,
        released_since=released_since,
        own_pids=own_pids,
    )
    if not free:
        return None
    if policy.allocation == "all_gpus":
        usable = [
            g
            for g in sample.gpus
            if policy.allowed_indices is None or g.index in policy.allowed_indices
        ]
        # serial multi-GPU: only when the whole host is idle in nvidia-smi and unleased
        if len(free) != len(usable):
            return None
        return GpuChoice(host=sample.host, gpus=tuple(free))
    return GpuChoice(host=sample.host, gpus=(free[0],))


def backoff_s(
    failures: int, *, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter in [0.5, 1.0] of the step, capped at max_s."""
    if failures <= 0 or initial_s <= 0:
        return 0.0
    step = min(max_s, initial_s * 2.0 ** (failures - 1))
    jitter = (rng or random.Random()).uniform(0.5, 1.0)
    return step * jitter


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryDecision:
    retry: bool
    not_before: datetime | None
    #: the code the beam fails with when `retry` is False
    final_code: str


def decide_retry(
    code: str,
    *,
    attempts_used: int,
    max_attempts: int,
    now: datetime,
    initial_s: float,
    max_s: float,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Retry a transient failure with backoff while attempts remain; fail otherwise."""
    kind = failure_info(code).kind
    if kind == FailureKind.PERMANENT:
        return RetryDecision(retry=False, not_before=None, final_code=code)
    if attempts_used >= max_attempts:
        return RetryDecision(retry=False, not_before=None, final_code=code)
    delay = backoff_s(attempts_used, initial_s=initial_s, max_s=max_s, rng=rng)
    return RetryDecision(retry=True, not_before=now + timedelta(seconds=delay), final_code=code)


_BATCHES = re.compile(r"with (\d+) batches")
_BATCH = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")

#: beam progress (0-100) reached at each phase, before MOQUI reports its own
RUN_PROGRESS_START = 20
RUN_PROGRESS_END = 90


def run_progress(log_tail: str, previous: int) -> int:
    """Progress from MOQUI's log lines; never goes backwards."""
    best = previous
    total = 0
    for m in _BATCHES.finditer(log_tail):
        total = int(m.group(1))
    for m in _BATCH.finditer(log_tail):
        done, of = int(m.group(1)), int(m.group(2)) or total
        if of > 0:
            span = RUN_PROGRESS_END - RUN_PROGRESS_START
            best = max(best, RUN_PROGRESS_START + int(span * min(done, of) / of))
    if has_end_marker(log_tail):
        best = max(best, RUN_PROGRESS_END)
    return min(best, RUN_PROGRESS_END)


def pick_host_order(samples: Sequence[GpuSample]) -> list[GpuSample]:
    """Hosts with the most free memory first, so load spreads over several hosts."""
    return sorted(samples, key=lambda s: -sum(g.memory_free_mb for g in s.gpus))
