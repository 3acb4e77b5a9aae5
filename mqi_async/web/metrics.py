"""`/metrics`: one store read per scrape turned into Prometheus families (a per-scrape registry)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.domain.verdict import QaStatus
from mqi_async.store.metrics import Histogram, MetricsSnapshot

#: the Content-Type of the text format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveState:
    """What only the running service knows (not in the database)."""

    #: "running", "starting" or "stopping"
    service: str
    #: the engine's database error while writes fail, else None
    database_error: str | None
    #: each host as the engine sees it now ("connected", "paused (…)")
    hosts: Mapping[str, str]
    #: seconds since the service started
    uptime_s: float
    #: how long the store read for this scrape took
    read_s: float


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    buckets = [(_le(b), float(n)) for b, n in h.buckets] + [("+Inf", float(h.count))]
    family.add_metric(labels, buckets, h.sum_s)


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{int(bound)}.0"


class SnapshotCollector(Collector):
    """The families of one `MetricsSnapshot` and the service's live state."""

    def __init__(self, snap: MetricsSnapshot, live: LiveState) -> None:
        self._snap = snap
        self._live = live

    def collect(self) -> Iterator[Metric]:
        s, live = self._snap, self._live
        cases = GaugeMetricFamily(
            "mqi_cases", "Treatment cases by pipeline status", labels=["status"]
        )
        for status in CaseStatus:
            cases.add_metric([str(status)], s.cases_by_status.get(str(status), 0))
        yield cases

        beams = GaugeMetricFamily(
            "mqi_beams",
            "Beams by status; kind=planned are the MOQUI runs on the plan itself",
            labels=["kind", "status"],
        )
        for kind in ("treatment", "planned"):
            for beam_status in BeamStatus:
                beams.add_metric(
                    [kind, str(beam_status)], s.beams_by_status.get((kind, str(beam_status)), 0)
                )
        yield beams

        for name, doc, counts in (
            ("mqi_case_verdicts", "Treatment cases by verdict (status --json qa.status)",
             s.case_verdicts),
            ("mqi_beam_verdicts", "Treatment beams by dose-check verdict", s.beam_verdicts),
            ("mqi_delivery_verdicts", "Deliveries by delivery-check verdict", s.delivery_verdicts),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, doc, labels=["verdict"])
            for verdict in QaStatus:
                family.add_metric([str(verdict)], counts.get(str(verdict), 0))
            yield family

        runs = HistogramMetricFamily(
            "mqi_run_duration_seconds",
            "MOQUI runs (the beam's running phase) that ended, start to end, by host and outcome",
            labels=["host", "status"],
        )
        for (host, run_status), h in sorted(s.run_durations.items()):
            _histogram(runs, [host, run_status], h)
        yield runs

        whole = HistogramMetricFamily(
            "mqi_beam_duration_seconds",
            "Treatment beams that ended, registration to end, by final status",
            labels=["status"],
        )
        for ended, h in sorted(s.beam_durations.items()):
            _histogram(whole, [ended], h)
        yield whole

        queue = GaugeMetricFamily("mqi_queue_beams", "Beams waiting for a free GPU")
        queue.add_metric([], s.queued_beams)
        yield queue

        util = GaugeMetricFamily(
            "mqi_gpu_utilization_ratio",
            "GPU utilisation at the last nvidia-smi sample (0 to 1)",
            labels=["host", "gpu", "uuid"],
        )
        mem_used = GaugeMetricFamily(
            "mqi_gpu_memory_used_bytes", "GPU memory in use", labels=["host", "gpu", "uuid"]
        )
        mem_total = GaugeMetricFamily(
            "mqi_gpu_memory_total_bytes", "GPU memory", labels=["host", "gpu", "uuid"]
        )
        leased = GaugeMetricFamily(
            "mqi_gpu_leased", "1 while a beam holds the GPU's lease", labels=["host", "gpu", "uuid"]
        )
        age = GaugeMetricFamily(
            "mqi_gpu_sample_timestamp_seconds",
            "When the GPU was last sampled (Unix time)",
            labels=["host", "gpu", "uuid"],
        )
        for g in s.gpus:
            labels = [g.host, str(g.index), g.uuid]
            util.add_metric(labels, g.utilization_pct / 100.0)
            mem_used.add_metric(labels, g.memory_used_mb * 1024.0 * 1024.0)
            mem_total.add_metric(labels, g.memory_total_mb * 1024.0 * 1024.0)
            leased.add_metric(labels, 1.0 if (g.host, g.uuid) in s.leased else 0.0)
            age.add_metric(labels, g.sampled_at.timestamp())
        yield from (util, mem_used, mem_total, leased, age)

        host_names = sorted(set(live.hosts) | {h.name for h in s.hosts} | set(s.leases_by_host))
        leases = GaugeMetricFamily("mqi_gpu_leases", "GPU leases held, by host", labels=["host"])
        up = GaugeMetricFamily(
            "mqi_host_up", "1 while the engine can use the host, else 0 (paused)", labels=["host"]
        )
        stored = {h.name: h.state for h in s.hosts}
        for name in host_names:
            leases.add_metric([name], s.leases_by_host.get(name, 0))
            state = live.hosts.get(name) or stored.get(name, "")
            up.add_metric([name], 1.0 if state.startswith("connected") else 0.0)
        yield from (leases, up)

        errors = GaugeMetricFamily(
            "mqi_errors",
            "Cases and beams whose error carries a named code, by code",
            labels=["subject", "code"],
        )
        for (subject, code), n in sorted(s.errors.items()):
            errors.add_metric([subject, code], n)
        yield errors

        commands = GaugeMetricFamily(
            "mqi_commands_pending", "Operator requests the service has not handled yet"
        )
        commands.add_metric([], s.commands_pending)
        yield commands

        running = GaugeMetricFamily(
            "mqi_service_running", "1 while the service runs (not starting or stopping)"
        )
        running.add_metric([], 1.0 if live.service == "running" else 0.0)
        writable = GaugeMetricFamily(
            "mqi_database_writable", "0 while the database refuses writes (the engine waits)"
        )
        writable.add_metric([], 0.0 if live.database_error else 1.0)
        uptime = GaugeMetricFamily("mqi_uptime_seconds", "Seconds since the service started")
        uptime.add_metric([], live.uptime_s)
        read = GaugeMetricFamily(
            "mqi_metrics_read_seconds", "How long this scrape's database read took"
        )
        read.add_metric([], live.read_s)
        yield from (running, writable, uptime, read)


def render(snap: MetricsSnapshot, live: LiveState) -> bytes:
    """The text format of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap, live))
    return generate_latest(registry)
