"""GPU leases: queued beams get free GPUs in priority-then-FIFO order; no free GPU means wait."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mqi_async.domain.gpus import GpuSample
from mqi_async.domain.scheduling import GpuPolicy, choose_gpus, pick_host_order
from mqi_async.engine.ports import Clock, Host, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """What a beam got: a host, and the leased GPUs (empty on hosts whose scheduler allocates)."""

    host: str
    gpu_uuids: tuple[str, ...]
    gpu_indices: tuple[int, ...]


@dataclass(order=True)
class _Request:
    sort_key: tuple[int, int]
    beam_id: str = field(compare=False)
    future: asyncio.Future[Grant] = field(compare=False)


class GpuScheduler:
    """Matches queued beams to free GPUs; woken by new requests, releases and samples."""

    def __init__(
        self,
        *,
        store: Store,
        hosts: Mapping[str, Host],
        policies: Mapping[str, GpuPolicy],
        clock: Clock,
        max_jobs: Mapping[str, int],
        request_sample: Callable[[str], None],
    ) -> None:
        self._store = store
        self._hosts = hosts
        self._policies = policies
        self._clock = clock
        self._max_jobs = max_jobs
        self._request_sample = request_sample
        self._samples: dict[str, GpuSample] = {}
        #: host -> monotonic time its latest sample's poll began (ages never use wall time)
        self._polled_at: dict[str, float] = {}
        #: GPU uuid -> monotonic time of its latest release
        self._released_at: dict[str, float] = {}
        self._queue: list[_Request] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        #: GPU uuid -> the beam holding it, as this process granted or adopted it
        self._holder: dict[str, str] = {}
        #: GPU uuid -> pids seen on it while one of our beams held it (ours, so not foreign)
        self._own_pids: dict[str, frozenset[int]] = {}
        #: beams currently holding a slot on a scheduler-allocated host (slurm)
        self._slots: dict[str, set[str]] = {name: set() for name in hosts}

    def on_sample(self, sample: GpuSample, polled_at: float) -> None:
        """Take a host's new sample; `polled_at` is the monotonic time its poll began."""
        seen: dict[str, set[int]] = {}
        for app in sample.apps:
            seen.setdefault(app.gpu_uuid, set()).add(app.pid)
        for g in sample.gpus:
            here = frozenset(seen.get(g.uuid, ()))
            if g.uuid in self._holder:
                # seen under our lease: our job (it has ended by the time the lease goes)
                self._own_pids[g.uuid] = self._own_pids.get(g.uuid, frozenset()) | here
                continue
            freed = self._released_at.get(g.uuid)
            if freed is not None and polled_at > freed:
                # taken after our job ended: whatever still runs there is someone else's
                self._own_pids[g.uuid] = frozenset()
            else:
                self._own_pids[g.uuid] = self._own_pids.get(g.uuid, frozenset()) & here
        self._samples[sample.host] = sample
        self._polled_at[sample.host] = polled_at
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def sample(self, host: str) -> GpuSample | None:
        return self._samples.get(host)

    def queued(self) -> list[str]:
        return [r.beam_id for r in sorted(self._queue)]

    async def acquire(self, beam_id: str, priority: int) -> Grant:
        """Wait until the beam holds GPUs; cancellation withdraws the request."""
        fut: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        req = _Request((-priority, next(self._seq)), beam_id, fut)
        self._queue.append(req)
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # granted just as we were cancelled: give the GPUs back
                await asyncio.shield(self.release(beam_id))
            raise
        finally:
            if req in self._queue:
                self._queue.remove(req)

    def adopt(self, beam_id: str, host: str, gpu_uuids: tuple[str, ...] = ()) -> None:
        """Count a beam that already holds GPUs or a slot (after a restart) against its host."""
        for uuid in gpu_uuids:
            self._holder[uuid] = beam_id
        if host in self._slots and not self._hosts[host].leases_gpus:
            self._slots[host].add(beam_id)

    async def release(self, beam_id: str) -> None:
        """Free the beam's GPUs; the next grant on them waits for a sample taken after now."""
        released = await self._store.list_leases(beam_id=beam_id)
        await self._store.release_leases(beam_id)
        now = self._clock.monotonic()
        hosts = {lease.host for lease in released}
        for lease in released:
            self._released_at[lease.uuid] = now
            self._holder.pop(lease.uuid, None)
        for name, holders in self._slots.items():
            if beam_id in holders:
                holders.discard(beam_id)
                hosts.add(name)
        for host in hosts:
            self._request_sample(host)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._grant()

    async def _grant(self) -> None:
        if not self._queue:
            return
        leases = await self._store.list_leases()
        leased = frozenset(lease.uuid for lease in leases)
        busy_hosts = {lease.host for lease in leases}
        now = self._clock.monotonic()
        for req in sorted(self._queue):
            if req.future.done():
                continue
            grant = await self._place(req.beam_id, leased, busy_hosts, now)
            if grant is None:
                # strict order: a later beam never overtakes the head of the queue
                return
            leased = leased | frozenset(grant.gpu_uuids)
            busy_hosts.add(grant.host)
            req.future.set_result(grant)

    async def _place(
        self, beam_id: str, leased: frozenset[str], busy_hosts: set[str], now: float
    ) -> Grant | None:
        gpu_samples = [
            s
            for s in self._samples.values()
            if self._hosts[s.host].leases_gpus and self._hosts[s.host].is_available()
        ]
        for sample in pick_host_order(gpu_samples):
            policy = self._policies[sample.host]
            if policy.allocation == "all_gpus" and sample.host in busy_hosts:
                continue
            polled_at = self._polled_at[sample.host]
            choice = choose_gpus(
                sample,
                leased=leased,
                policy=policy,
                age_s=now - polled_at,
                released_since=frozenset(
                    uuid for uuid, freed in self._released_at.items() if freed >= polled_at
                ),
                own_pids=self._own_pids,
            )
            if choice is None:
                continue
            if await self._store.lease_gpus(beam_id, sample.host, choice.uuids):
                for uuid in choice.uuids:
                    self._holder[uuid] = beam_id
                log.info(
                    "leased %s on %s to %s",
                    ",".join(str(g.index) for g in choice.gpus),
                    sample.host,
                    beam_id,
                    extra={"beam_id": beam_id, "host": sample.host},
                )
                return Grant(
                    host=sample.host,
                    gpu_uuids=choice.uuids,
                    gpu_indices=tuple(g.index for g in choice.gpus),
                )
        for name, host in self._hosts.items():
            if host.leases_gpus or not host.is_available():
                continue
            if len(self._slots[name]) < self._max_jobs.get(name, 1):
                self._slots[name].add(beam_id)
                return Grant(host=name, gpu_uuids=(), gpu_indices=())
        return None
