"""Periodic host readers: the nvidia-smi poller and the batched job-status poller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mqi_async.domain.errors import HostUnavailableError, MqiError
from mqi_async.domain.gpus import GpuSample
from mqi_async.domain.jobs import JobHandle, JobState, JobStatus
from mqi_async.domain.slurm import queue_line
from mqi_async.engine.ports import Host, Store

log = logging.getLogger(__name__)


class GpuPoller:
    """Samples one host's GPUs every `interval_s`, or at once when asked (after a release)."""

    def __init__(
        self,
        host: Host,
        *,
        store: Store,
        interval_s: float,
        on_sample: Callable[[GpuSample, float], None],
        on_host_error: Callable[[str, MqiError], None],
    ) -> None:
        self._host = host
        self._store = store
        self._interval_s = interval_s
        self._on_sample = on_sample
        self._on_host_error = on_host_error
        self._now = asyncio.Event()
        self._sampled = asyncio.Condition()
        self.samples_taken = 0
        self.last_error: str | None = None

    def poll_now(self) -> None:
        self._now.set()

    async def poll_now_and_wait(self, timeout_s: float = 30.0) -> None:
        """Ask for a sample now and wait until one (or a failure) has come in."""
        async with self._sampled:
            seen = self.samples_taken
            self._now.set()
            async with asyncio.timeout(timeout_s):
                await self._sampled.wait_for(lambda: self.samples_taken > seen)

    async def run(self) -> None:
        # every host is sampled, also a scheduler's (an empty sample): a good sample is what
        # tells the engine a paused host is back
        while True:
            self._now.clear()
            # stamped before the poll: the sample shows the host at or after this moment
            polled_at = asyncio.get_running_loop().time()
            try:
                sample = await self._host.sample_gpus()
            except MqiError as exc:
                self.last_error = str(exc)
                self._on_host_error(self._host.name, exc)
            else:
                self.last_error = None
                self._on_sample(sample, polled_at)
                await self._store.record_gpu_sample(sample)
                if not self._host.leases_gpus:
                    await self._record_queue()
            async with self._sampled:
                self.samples_taken += 1
                self._sampled.notify_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._now.wait()

    async def _record_queue(self) -> None:
        try:
            queue = await self._host.queue_summary()
        except MqiError as exc:
            # the panel shows the last good view; a failing host shows up in its state
            log.debug("queue of %s not read: %s", self._host.name, exc)
            return
        await self._store.record_host_detail(self._host.name, queue_line(queue) if queue else None)


#: consecutive polls that must find a job without exit file and process before it is lost
LOST_AFTER_POLLS = 2


@dataclass(slots=True)
class _Watch:
    handle: JobHandle
    future: asyncio.Future[JobStatus]
    on_tail: Callable[[str], Awaitable[None]]
    give_up: Callable[[JobStatus], bool] | None = None
    lost_polls: int = 0


class JobMonitor:
    """One batched poll per host per tick for all of its running jobs."""

    def __init__(
        self,
        host: Host,
        *,
        interval_s: float,
        on_host_error: Callable[[str, MqiError], None],
    ) -> None:
        self._host = host
        self._interval_s = interval_s
        self._on_host_error = on_host_error
        self._watches: dict[str, _Watch] = {}
        self._wake = asyncio.Event()

    async def wait_exit(
        self,
        handle: JobHandle,
        on_tail: Callable[[str], Awaitable[None]],
        *,
        give_up: Callable[[JobStatus], bool] | None = None,
    ) -> JobStatus:
        """Resolve when the job has exited, is lost (on two polls running), or when `give_up`
        says so of a fresh reading of a live job; raises HostUnavailableError if the host goes.

        Every verdict rests on a reading of the host: nothing resolves on elapsed time alone.
        """
        fut: asyncio.Future[JobStatus] = asyncio.get_running_loop().create_future()
        self._watches[handle.job_dir] = _Watch(handle, fut, on_tail, give_up)
        self._wake.set()
        try:
            return await fut
        finally:
            self._watches.pop(handle.job_dir, None)

    async def run(self) -> None:
        while True:
            if not self._watches:
                self._wake.clear()
                await self._wake.wait()
            watches = list(self._watches.values())
            started = asyncio.get_running_loop().time()
            try:
                statuses = await self._host.poll_jobs([w.handle for w in watches])
            except HostUnavailableError as exc:
                self._on_host_error(self._host.name, exc)
                for w in watches:
                    if not w.future.done():
                        w.future.set_exception(exc)
            except MqiError as exc:
                # a failed poll is retried next tick; the jobs keep running remotely
                log.warning(
                    "job poll on %s failed: %s",
                    self._host.name,
                    exc,
                    extra={"host": self._host.name},
                )
            else:
                for w in watches:
                    st = statuses.get(w.handle.job_dir)
                    if st is None or w.future.done():
                        continue
                    if st.log_tail:
                        try:
                            await w.on_tail(st.log_tail)
                        except (OSError, MqiError) as exc:
                            # progress is a nicety; it never stops the poll of the others
                            log.debug("progress update for %s failed: %s", w.handle.job_dir, exc)
                    w.lost_polls = w.lost_polls + 1 if st.state == JobState.LOST else 0
                    if (
                        st.state == JobState.EXITED
                        or w.lost_polls >= LOST_AFTER_POLLS
                        or st.state != JobState.LOST
                        and w.give_up is not None
                        and w.give_up(st)
                    ):
                        w.future.set_result(st)
            # a fixed cadence: the poll's own time counts against the interval
            elapsed = asyncio.get_running_loop().time() - started
            await asyncio.sleep(max(0.0, self._interval_s - elapsed))
