"""SQLite persistence: the one writer connection, the versioned schema and typed queries."""

from __future__ import annotations

from mqi_async.domain.records import BeamRow as BeamRow
from mqi_async.domain.records import CaseRow as CaseRow
from mqi_async.domain.records import CommandKind as CommandKind
from mqi_async.domain.records import CommandRow as CommandRow
from mqi_async.domain.records import CommandStatus as CommandStatus
from mqi_async.domain.records import DeliveryRow as DeliveryRow
from mqi_async.domain.records import LeaseRow as LeaseRow
from mqi_async.domain.records import NewBeam as NewBeam
from mqi_async.domain.records import NewCase as NewCase
from mqi_async.domain.records import NewDelivery as NewDelivery
from mqi_async.domain.records import RunRow as RunRow
from mqi_async.store.beams import beam_id_for
from mqi_async.store.db import Store, Transaction, read_status_snapshot, submit_command
from mqi_async.store.events import EventRow
from mqi_async.store.gpus import GpuRow
from mqi_async.store.schema import SCHEMA_VERSION
from mqi_async.store.snapshot import BeamSnapshot, CaseSnapshot, status_document

__all__ = [
    "SCHEMA_VERSION",
    "BeamRow",
    "BeamSnapshot",
    "CaseRow",
    "CaseSnapshot",
    "CommandKind",
    "CommandRow",
    "CommandStatus",
    "DeliveryRow",
    "EventRow",
    "GpuRow",
    "LeaseRow",
    "NewBeam",
    "NewCase",
    "NewDelivery",
    "RunRow",
    "Store",
    "Transaction",
    "beam_id_for",
    "read_status_snapshot",
    "status_document",
    "submit_command",
]
