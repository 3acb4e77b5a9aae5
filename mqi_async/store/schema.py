"""The database schema as numbered migrations, tracked in `PRAGMA user_version`."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

import aiosqlite

from mqi_async.domain.errors import DatabaseError

log = logging.getLogger(__name__)

#: `PRAGMA application_id` of an mqi_async database ("MQIA"), to tell it from other SQLite files.
APPLICATION_ID = 0x4D514941


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One schema step: SQL that takes the database from `version - 1` to `version`.

    Steps run in order, each in its own transaction, and are never edited once released:
    a change is a new step at the end.
    """

    version: int
    description: str
    sql: str


# Timestamps are ISO-8601 UTC text with microseconds and 'Z' (columns.encode_time), so text
# order is time order. JSON columns hold compact JSON. Statuses are the StrEnum values of
# domain.model; they are checked in code (the transition tables), not by CHECK constraints,
# so that a new status never needs a table rebuild.
_V1 = f"""
PRAGMA application_id = {APPLICATION_ID};

CREATE TABLE cases (
    case_id             TEXT PRIMARY KEY,
    safe_name           TEXT NOT NULL UNIQUE,
    case_path           TEXT NOT NULL,
    room                TEXT,
    status              TEXT NOT NULL,
    progress            INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error               TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    recheck_at          TEXT,
    interpreted_at      TEXT,
    retry_count         INTEGER NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    postprocess_status  TEXT,
    postprocess_log     TEXT,
    plan_path           TEXT,
    gantry              INTEGER,
    patient_id          TEXT
);
CREATE INDEX idx_cases_status ON cases (status);
CREATE INDEX idx_cases_created ON cases (created_at);

CREATE TABLE beams (
    beam_id               TEXT PRIMARY KEY,
    case_id               TEXT NOT NULL REFERENCES cases (case_id) ON DELETE CASCADE,
    beam_index            INTEGER NOT NULL CHECK (beam_index >= 1),
    beam_number           INTEGER,
    beam_name             TEXT,
    delivery_path         TEXT,
    status                TEXT NOT NULL,
    resume_status         TEXT,
    progress              INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error                 TEXT,
    attempts              INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    host                  TEXT,
    gpu_uuids             TEXT NOT NULL DEFAULT '[]',
    not_before_at         TEXT,
    transfer_done_bytes   INTEGER NOT NULL DEFAULT 0 CHECK (transfer_done_bytes >= 0),
    transfer_total_bytes  INTEGER NOT NULL DEFAULT 0 CHECK (transfer_total_bytes >= 0),
    outputs               TEXT NOT NULL DEFAULT '[]',
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL,
    -- this unique index also serves every "beams of a case" lookup
    UNIQUE (case_id, beam_index)
);
CREATE INDEX idx_beams_status ON beams (status);

CREATE TABLE deliveries (
    delivery_id           TEXT PRIMARY KEY,
    case_id               TEXT NOT NULL REFERENCES cases (case_id) ON DELETE CASCADE,
    beam_id               TEXT REFERENCES beams (beam_id) ON DELETE SET NULL,
    delivery_path         TEXT NOT NULL,
    delivered_at          TEXT,
    fraction_index        INTEGER,
    raw_beam_number       INTEGER,
    treatment_beam_index  INTEGER,
    is_reference          INTEGER NOT NULL DEFAULT 0 CHECK (is_reference IN (0, 1))
);
CREATE INDEX idx_deliveries_case ON deliveries (case_id);
CREATE INDEX idx_deliveries_beam ON deliveries (beam_id);

CREATE TABLE runs (
    run_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    beam_id     TEXT NOT NULL REFERENCES beams (beam_id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL CHECK (attempt >= 1),
    host        TEXT NOT NULL,
    gpu_uuids   TEXT NOT NULL DEFAULT '[]',
    job_dir     TEXT NOT NULL,
    job_id      TEXT,
    status      TEXT NOT NULL,
    exit_code   INTEGER,
    signal      TEXT,
    error       TEXT,
    started_at  TEXT NOT NULL,
    ended_at    TEXT,
    -- this unique index also serves every "runs of a beam" lookup
    UNIQUE (beam_id, attempt)
);
CREATE INDEX idx_runs_status ON runs (status);

-- the latest nvidia-smi sample of each host; a poll replaces that host's rows
CREATE TABLE gpus (
    host                 TEXT NOT NULL,
    uuid                 TEXT NOT NULL,
    gpu_index            INTEGER NOT NULL,
    name                 TEXT NOT NULL,
    memory_total_mb      INTEGER NOT NULL,
    memory_used_mb       INTEGER NOT NULL,
    memory_free_mb       INTEGER NOT NULL,
    temperature_c        INTEGER NOT NULL,
    utilization_pct      INTEGER NOT NULL,
    clock_mhz            INTEGER NOT NULL DEFAULT 0,
    has_foreign_process  INTEGER NOT NULL DEFAULT 0 CHECK (has_foreign_process IN (0, 1)),
    sampled_at           TEXT NOT NULL,
    PRIMARY KEY (host, uuid)
);

-- no foreign key to gpus: a poll replaces sample rows, a lease must outlive that
CREATE TABLE leases (
    host       TEXT NOT NULL,
    uuid       TEXT NOT NULL,
    beam_id    TEXT NOT NULL REFERENCES beams (beam_id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL CHECK (attempt >= 1),
    leased_at  TEXT NOT NULL,
    PRIMARY KEY (host, uuid)
);
CREATE INDEX idx_leases_owner ON leases (beam_id);

-- no foreign keys: the audit log outlives anything it mentions
CREATE TABLE events (
    event_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    at        TEXT NOT NULL,
    case_id   TEXT,
    beam_id   TEXT,
    kind      TEXT NOT NULL,
    message   TEXT NOT NULL,
    data      TEXT
);
CREATE INDEX idx_events_case ON events (case_id, event_id);
CREATE INDEX idx_events_beam ON events (beam_id, event_id);
CREATE TRIGGER events_append_only BEFORE UPDATE ON events
BEGIN
    SELECT RAISE (ABORT, 'events are append-only');
END;

CREATE TABLE commands (
    command_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_at  TEXT NOT NULL,
    kind          TEXT NOT NULL,
    case_id       TEXT NOT NULL,
    payload       TEXT NOT NULL DEFAULT '{{}}',
    status        TEXT NOT NULL DEFAULT 'pending',
    done_at       TEXT,
    result        TEXT
);
CREATE INDEX idx_commands_status ON commands (status, command_id);
"""

_V2 = """
ALTER TABLE cases ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
CREATE INDEX idx_cases_queue ON cases (priority DESC, created_at);
"""

_V3 = """
ALTER TABLE beams ADD COLUMN gpu_indices TEXT NOT NULL DEFAULT '[]';
ALTER TABLE beams ADD COLUMN attempts_base INTEGER NOT NULL DEFAULT 0 CHECK (attempts_base >= 0);
"""

_V4 = """
CREATE TABLE hosts (
    name        TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    error       TEXT,
    updated_at  TEXT NOT NULL
);
"""

_V5 = """
ALTER TABLE hosts ADD COLUMN detail TEXT;
"""

_V6 = """
CREATE TABLE skipped_folders (
    path    TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT '',
    since   TEXT NOT NULL
);
"""

# Every delivery gets a check: rows of an older database start pending and are checked too.
_V7 = """
ALTER TABLE deliveries ADD COLUMN qa_status TEXT NOT NULL DEFAULT 'pending';
ALTER TABLE deliveries ADD COLUMN qa_reason TEXT;
ALTER TABLE deliveries ADD COLUMN qa_result TEXT;
ALTER TABLE deliveries ADD COLUMN qa_detail_path TEXT;
ALTER TABLE deliveries ADD COLUMN qa_checked_at TEXT;
ALTER TABLE deliveries ADD COLUMN qa_attempts INTEGER NOT NULL DEFAULT 0;
CREATE INDEX idx_deliveries_qa ON deliveries (qa_status);
"""

# Planned cases (MOQUI on the plan itself) and the planned-vs-delivered dose checks. Cases that
# had finished are not checked after the upgrade (their planned runs would take GPU time).
_V8 = """
ALTER TABLE cases ADD COLUMN kind TEXT NOT NULL DEFAULT 'treatment';
ALTER TABLE cases ADD COLUMN planned_case_id TEXT;
CREATE INDEX idx_cases_planned ON cases (planned_case_id);
CREATE TABLE dose_checks (
    subject_id  TEXT PRIMARY KEY,
    case_id     TEXT NOT NULL REFERENCES cases (case_id) ON DELETE CASCADE,
    beam_id     TEXT REFERENCES beams (beam_id) ON DELETE CASCADE,
    status      TEXT NOT NULL,
    reason      TEXT,
    result      TEXT,
    checked_at  TEXT NOT NULL
);
CREATE INDEX idx_dose_checks_case ON dose_checks (case_id);
INSERT INTO dose_checks (subject_id, case_id, beam_id, status, reason, result, checked_at)
    SELECT case_id, case_id, NULL, 'skipped',
           'dose_check_not_run: the case finished before dose checks existed',
           NULL, updated_at
    FROM cases WHERE status IN ('completed', 'failed', 'cancelled');
"""

# The case report (PDF and HTML) last built, and the verdict state it shows.
_V9 = """
CREATE TABLE reports (
    case_id   TEXT PRIMARY KEY REFERENCES cases (case_id) ON DELETE CASCADE,
    pdf       TEXT,
    html      TEXT,
    verdict   TEXT,
    error     TEXT,
    attempts  INTEGER NOT NULL DEFAULT 0,
    built_at  TEXT NOT NULL
);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(version=1, description="initial schema", sql=_V1),
    Migration(version=2, description="case priorities", sql=_V2),
    Migration(version=3, description="leased GPU indices and operator retry base", sql=_V3),
    Migration(version=4, description="host states for status", sql=_V4),
    Migration(version=5, description="a cluster's queue line for the dashboard", sql=_V5),
    Migration(version=6, description="folders the scan skipped, for status", sql=_V6),
    Migration(version=7, description="a delivery check per delivery", sql=_V7),
    Migration(version=8, description="planned runs and dose checks", sql=_V8),
    Migration(version=9, description="case reports", sql=_V9),
)

#: The schema version this code reads and writes.
SCHEMA_VERSION = MIGRATIONS[-1].version


async def read_version(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(
    conn: aiosqlite.Connection, *, path: str, target_version: int = SCHEMA_VERSION
) -> int:
    """Apply the missing steps up to `target_version`, each in one transaction.

    `conn` must be in autocommit mode (isolation_level=None). Returns the version reached.

    Raises:
        DatabaseError: `database_version` if the file is newer than this code;
            `internal_error` if a step fails (that step is rolled back).
    """
    current = await read_version(conn)
    if current > SCHEMA_VERSION:
        raise too_new_error(path, current)
    for step in MIGRATIONS:
        if step.version <= current or step.version > target_version:
            continue
        # BEGIN inside the script: executescript runs statements one by one, and a
        # failure leaves the transaction open for the explicit ROLLBACK below.
        script = f"BEGIN IMMEDIATE;\n{step.sql}\nPRAGMA user_version = {step.version};\nCOMMIT;"
        try:
            await conn.executescript(script)
        except sqlite3.Error as exc:
            await conn.rollback()
            raise DatabaseError(
                "internal_error",
                f"{path}: migration to schema v{step.version} ({step.description}) failed:"
                f" {exc}; the database is left at v{current}",
            ) from exc
        log.info("database %s migrated to schema v%d (%s)", path, step.version, step.description)
        current = step.version
    return current


def too_new_error(path: str, version: int) -> DatabaseError:
    return DatabaseError(
        "database_version",
        f"{path}: schema v{version} is newer than this mqi-async knows (v{SCHEMA_VERSION})"
        " — run the newer mqi-async, or restore a backup made for this version",
    )
