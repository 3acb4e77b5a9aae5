"""Case, beam and run statuses, and the tables of allowed transitions between them."""

from __future__ import annotations

from enum import StrEnum

from mqi_async.domain.errors import IllegalTransitionError


class CaseStatus(StrEnum):
    """Where a case stands; the values are what the database, logs and `status` show."""

    #: registered; the plan and deliveries are not resolved yet
    PENDING = "pending"
    #: a fraction window is still open; rechecked at the case's `recheck_at`
    WAITING = "waiting"
    #: the local interpreter is writing the fluence CSVs
    INTERPRETING = "interpreting"
    #: beams are being uploaded, queued, run, downloaded or converted
    PROCESSING = "processing"
    #: every beam is done; the optional post-processing command runs
    POSTPROCESSING = "postprocessing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_CASE_STATUSES


class BeamStatus(StrEnum):
    """The phase of one beam's workflow; each active phase has one idempotent step."""

    #: created; waits for the case's interpreter output
    PENDING = "pending"
    #: case inputs are being uploaded to a host
    UPLOADING = "uploading"
    #: waiting for a free GPU (never a failure)
    QUEUED = "queued"
    #: a GPU lease is held; moqui_tps.in is rendered and the job is being started
    LAUNCHING = "launching"
    #: MOQUI runs detached on the host
    RUNNING = "running"
    #: the dose files are coming back
    DOWNLOADING = "downloading"
    #: raw dose -> RT Dose, or MOQUI's own DICOM is validated
    CONVERTING = "converting"
    #: the host is unreachable; the beam resumes by itself at `resume_status`
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_BEAM_STATUSES


class RunStatus(StrEnum):
    """The outcome of one MOQUI launch (one row in `runs`)."""

    LAUNCHING = "launching"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: the process vanished without writing an exit code
    LOST = "lost"
    #: killed by the service (cancel or run timeout)
    KILLED = "killed"

    @property
    def is_terminal(self) -> bool:
        return self not in (RunStatus.LAUNCHING, RunStatus.RUNNING)


TERMINAL_CASE_STATUSES = frozenset({CaseStatus.COMPLETED, CaseStatus.FAILED, CaseStatus.CANCELLED})
TERMINAL_BEAM_STATUSES = frozenset({BeamStatus.COMPLETED, BeamStatus.FAILED, BeamStatus.CANCELLED})

#: Beam phases that move along the happy path, in order.
BEAM_PIPELINE: tuple[BeamStatus, ...] = (
    BeamStatus.PENDING,
    BeamStatus.UPLOADING,
    BeamStatus.QUEUED,
    BeamStatus.LAUNCHING,
    BeamStatus.RUNNING,
    BeamStatus.DOWNLOADING,
    BeamStatus.CONVERTING,
    BeamStatus.COMPLETED,
)
ACTIVE_BEAM_STATUSES = frozenset(BEAM_PIPELINE[:-1])

_B = BeamStatus
_C = CaseStatus


def _beam_table() -> dict[BeamStatus, frozenset[BeamStatus]]:
    table: dict[BeamStatus, set[BeamStatus]] = {s: set() for s in BeamStatus}
    for here, nxt in zip(BEAM_PIPELINE, BEAM_PIPELINE[1:], strict=False):
        table[here].add(nxt)
    for active in ACTIVE_BEAM_STATUSES:
        # any active phase can fail, be cancelled, or pause on an unreachable host
        table[active] |= {_B.FAILED, _B.CANCELLED, _B.PAUSED}
    # a failed attempt goes back to the GPU queue for a retry (new run row)
    for s in (_B.LAUNCHING, _B.RUNNING, _B.DOWNLOADING, _B.CONVERTING):
        table[s].add(_B.QUEUED)
    # an upload that must be redone (e.g. remote inputs vanished) restarts from UPLOADING
    for s in (_B.QUEUED, _B.LAUNCHING):
        table[s].add(_B.UPLOADING)
    # a paused beam resumes at the phase it was in, or is cancelled or failed
    table[_B.PAUSED] |= set(ACTIVE_BEAM_STATUSES) | {_B.FAILED, _B.CANCELLED}
    # an operator retry starts a failed or cancelled beam again
    table[_B.FAILED] |= {_B.PENDING}
    table[_B.CANCELLED] |= {_B.PENDING}
    return {k: frozenset(v) for k, v in table.items()}


def _case_table() -> dict[CaseStatus, frozenset[CaseStatus]]:
    t: dict[CaseStatus, set[CaseStatus]] = {
        _C.PENDING: {_C.WAITING, _C.INTERPRETING, _C.PROCESSING},
        _C.WAITING: {_C.PENDING, _C.INTERPRETING, _C.PROCESSING},
        _C.INTERPRETING: {_C.PROCESSING},
        _C.PROCESSING: {_C.POSTPROCESSING, _C.COMPLETED},
        _C.POSTPROCESSING: {_C.COMPLETED},
        # a new *.ptn in a completed case queues post-processing again
        _C.COMPLETED: {_C.POSTPROCESSING, _C.PENDING},
        _C.FAILED: {_C.PENDING},
        _C.CANCELLED: {_C.PENDING},
    }
    for s in (_C.PENDING, _C.WAITING, _C.INTERPRETING, _C.PROCESSING, _C.POSTPROCESSING):
        t[s] |= {_C.FAILED, _C.CANCELLED}
    return {k: frozenset(v) for k, v in t.items()}


BEAM_TRANSITIONS = _beam_table()
CASE_TRANSITIONS = _case_table()


def check_beam_transition(current: BeamStatus, new: BeamStatus) -> BeamStatus:
    """Return `new` if a beam may go there from `current`; raise otherwise."""
    if new == current or new in BEAM_TRANSITIONS[current]:
        return new
    raise IllegalTransitionError("beam", str(current), str(new))


def check_case_transition(current: CaseStatus, new: CaseStatus) -> CaseStatus:
    """Return `new` if a case may go there from `current`; raise otherwise."""
    if new == current or new in CASE_TRANSITIONS[current]:
        return new
    raise IllegalTransitionError("case", str(current), str(new))


def aggregate_case_status(beams: list[BeamStatus]) -> CaseStatus | None:
    """The one canonical rule that turns beam statuses into the case status.

    Returns None when the beams alone do not decide it (no beams yet).
    A case fails only when no beam can still make progress: siblings of a failed
    beam run to the end so their dose is not wasted.
    """
    if not beams:
        return None
    if all(b == _B.COMPLETED for b in beams):
        return _C.POSTPROCESSING
    if any(not b.is_terminal for b in beams):
        return _C.PROCESSING
    if any(b == _B.FAILED for b in beams):
        return _C.FAILED
    return _C.CANCELLED


def case_progress(beam_progress: list[float], beams: list[BeamStatus]) -> int:
    """Mean beam progress, clamped to 0..100; completed beams count as 100."""
    if not beams:
        return 0
    total = 0.0
    for status, progress in zip(beams, beam_progress, strict=True):
        total += 100.0 if status == _B.COMPLETED else min(max(progress, 0.0), 100.0)
    return int(total / len(beams))
