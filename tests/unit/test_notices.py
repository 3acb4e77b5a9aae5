"""The notice rules without I/O: what two reads mean, what a message may say, the rate limit."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from mqi_async.domain.errors import FAILURES
from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.domain.notices import (
    DIGEST_LISTED,
    CaseView,
    CheckPart,
    Digest,
    HostView,
    HostWatch,
    Message,
    Naming,
    Notice,
    NoticeCode,
    RateLimit,
    Throttle,
    case_notices,
    error_code,
    render,
    render_digest,
    retry_delay_s,
)
from mqi_async.domain.privacy import case_key
from mqi_async.domain.records import DeliveryRow, DoseCheckRow
from mqi_async.domain.verdict import QaStatus
from mqi_async.notify.notifier import case_view
from mqi_async.store.snapshot import BeamSnapshot, CaseSnapshot

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SECRET = bytes(range(32))
#: a case id that is a patient id, as in the clinic
PATIENT = "12345678"

P, C, F = QaStatus.PENDING, QaStatus.CONDITIONAL, QaStatus.FAILED


def case(
    status: CaseStatus = CaseStatus.PROCESSING,
    *,
    verdict: QaStatus = P,
    beam: QaStatus = P,
    delivery: QaStatus = P,
    error: str | None = None,
) -> CaseView:
    return CaseView(
        case_id=PATIENT,
        status=status,
        error_code=error,
        verdict=verdict,
        parts=(
            CheckPart(key="beam:b1", label="beam 1", status=beam),
            CheckPart(key="delivery:d1", label="delivery 1 (fraction 1, beam 1)", status=delivery),
        ),
    )


def codes(before: CaseView | None, after: CaseView) -> list[str]:
    prev = {} if before is None else {before.case_id: before}
    return [str(n.code) for n in case_notices(prev, [after], T0)]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param(case(), case(CaseStatus.FAILED), ["case_failed"], id="becomes-failed"),
        pytest.param(None, case(CaseStatus.FAILED), ["case_failed"], id="new-and-failed"),
        pytest.param(case(CaseStatus.FAILED), case(CaseStatus.FAILED), [], id="still-failed"),
        pytest.param(case(), case(CaseStatus.COMPLETED), [], id="completed"),
        pytest.param(case(), case(CaseStatus.CANCELLED), [], id="cancelled"),
        pytest.param(case(), case(beam=C), ["check_conditional"], id="beam-conditional"),
        pytest.param(case(beam=C), case(beam=F), ["check_failed"], id="conditional-to-failed"),
        pytest.param(case(beam=F), case(beam=F), [], id="still-failed-beam"),
        pytest.param(case(), case(delivery=F), ["check_failed"], id="delivery-failed"),
        pytest.param(case(beam=C), case(beam=C, verdict=C), ["check_conditional"], id="verdict"),
        pytest.param(case(), case(beam=QaStatus.PASSED, verdict=QaStatus.PASSED), [], id="pass"),
        pytest.param(case(), case(beam=QaStatus.SKIPPED), [], id="skipped"),
        pytest.param(case(), case(beam=QaStatus.ERROR), [], id="check-error"),
        pytest.param(
            case(beam=F, verdict=F),
            case(beam=P, verdict=P),
            [],
            id="retried-checks-reset",
        ),
        pytest.param(
            case(beam=P, verdict=P),
            case(beam=F, verdict=F),
            ["check_failed"],
            id="retried-checks-fail-again",
        ),
        pytest.param(
            case(),
            case(CaseStatus.FAILED, beam=C),
            ["case_failed", "check_conditional"],
            id="both-at-once",
        ),
        pytest.param(None, case(beam=C, delivery=F, verdict=F), ["check_failed"], id="new"),
    ],
)
def test_two_reads_give_the_news(
    before: CaseView | None, after: CaseView, expected: list[str]
) -> None:
    assert codes(before, after) == expected


def test_one_check_notice_per_case_names_each_part_that_turned() -> None:
    [notice] = case_notices({PATIENT: case(beam=C)}, [case(beam=C, delivery=F, verdict=F)], T0)
    assert notice.code == NoticeCode.CHECK_FAILED
    assert notice.verdict == QaStatus.FAILED
    # the beam was conditional before: only the delivery is news
    assert notice.parts == ("delivery 1 (fraction 1, beam 1): failed",)


def test_a_case_failure_carries_its_code_never_its_detail() -> None:
    after = case(
        CaseStatus.FAILED, error=error_code("patient_id_mismatch: folder 2026 of 12345678")
    )
    [notice] = case_notices({PATIENT: case()}, [after], T0)
    assert notice.reason == "patient_id_mismatch"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("missing_rtplan: Put the RTPLAN in the case folder", "missing_rtplan"),
        ("moqui_exit_134: MOQUI exited non-zero", "moqui_exit_134"),
        ("retries_exhausted", "retries_exhausted"),
        ("Patient 12345678: something", None),
        ("", None),
        (None, None),
    ],
)
def test_error_code_is_the_head_of_a_stored_error(error: str | None, code: str | None) -> None:
    assert error_code(error) == code


def test_a_long_pause_is_told_once_and_its_end_once() -> None:
    watch = HostWatch(timedelta(minutes=15))
    paused = [HostView(name="gpu1", state="paused", error_code="host_unreachable")]
    connected = [HostView(name="gpu1", state="connected")]
    assert watch.observe(paused, T0) == []
    assert watch.observe(paused, T0 + timedelta(minutes=14, seconds=59)) == []
    [told] = watch.observe(paused, T0 + timedelta(minutes=15))
    assert (told.code, told.host, told.reason, told.minutes) == (
        NoticeCode.HOST_PAUSED,
        "gpu1",
        "host_unreachable",
        15.0,
    )
    assert watch.observe(paused, T0 + timedelta(minutes=40)) == []
    [back] = watch.observe(connected, T0 + timedelta(minutes=41))
    assert back.code == NoticeCode.HOST_RESUMED and back.minutes == 41.0
    assert watch.observe(connected, T0 + timedelta(minutes=42)) == []
    # a new pause is timed from its own start
    assert watch.observe(paused, T0 + timedelta(minutes=50)) == []
    assert watch.observe(paused, T0 + timedelta(minutes=64)) == []
    assert [n.code for n in watch.observe(paused, T0 + timedelta(minutes=65))] == [
        NoticeCode.HOST_PAUSED
    ]


def test_a_short_pause_is_not_told() -> None:
    watch = HostWatch(timedelta(minutes=15))
    assert watch.observe([HostView(name="g", state="paused")], T0) == []
    assert watch.observe([HostView(name="g", state="connected")], T0 + timedelta(minutes=5)) == []
    assert watch.observe([HostView(name="g", state="connecting")], T0 + timedelta(hours=1)) == []


# --- messages -------------------------------------------------------------------------------


def every_notice() -> list[Notice]:
    return [
        Notice(code=NoticeCode.CASE_FAILED, at=T0, case_id=PATIENT, reason="missing_rtplan"),
        Notice(
            code=NoticeCode.CHECK_CONDITIONAL,
            at=T0,
            case_id=PATIENT,
            verdict=QaStatus.PENDING,
            parts=("beam 2: conditional",),
        ),
        Notice(code=NoticeCode.CHECK_FAILED, at=T0, case_id=PATIENT, verdict=QaStatus.FAILED),
        Notice(code=NoticeCode.HOST_PAUSED, at=T0, host="gpu1", reason="auth_failed", minutes=16),
        Notice(code=NoticeCode.HOST_RESUMED, at=T0, host="gpu1", minutes=20),
        Notice(code=NoticeCode.SERVICE_UNEXPECTED_STOP, at=T0),
        Notice(code=NoticeCode.SERVICE_FATAL_ERROR, at=T0, reason="database_damaged"),
    ]


def everything_in(message: Message) -> str:
    return "\n".join([message.subject, message.text, json.dumps(message.data)])


@pytest.mark.parametrize("notice", every_notice(), ids=lambda n: str(n.code))
def test_messages_name_a_case_by_its_key_never_its_id(notice: Notice) -> None:
    message = render(notice, Naming(secret=SECRET), "mqi-host")
    text = everything_in(message)
    assert PATIENT not in text
    assert str(notice.code) in message.subject and message.data["code"] == notice.code
    # each notice says what to do: the sentence registered for its code (a failed case's own)
    told = notice.reason if notice.code == NoticeCode.CASE_FAILED else notice.code
    assert FAILURES[str(told)].advice in message.text
    if notice.case_id is not None:
        assert case_key(SECRET, PATIENT) in message.subject
        assert message.data["case_key"] == case_key(SECRET, PATIENT)
        assert "case_id" not in message.data


def test_a_failed_case_says_its_code_and_what_to_do() -> None:
    notice = every_notice()[0]
    message = render(notice, Naming(secret=SECRET), "mqi-host")
    assert "missing_rtplan" in message.text
    assert FAILURES["missing_rtplan"].advice in message.text


def test_include_patient_id_adds_the_case_id() -> None:
    message = render(every_notice()[0], Naming(secret=SECRET, include_patient_id=True), "h")
    assert PATIENT in message.subject and message.data["case_id"] == PATIENT
    assert message.data["case_key"] == case_key(SECRET, PATIENT)


def test_every_notice_code_is_a_registered_code() -> None:
    for code in NoticeCode:
        assert code in FAILURES, code
    assert "notify_delivery_failed" in FAILURES


def snapshot_of_a_patient() -> CaseSnapshot:
    """A case whose beam ids, delivery folders and path all hold the patient id."""
    beam = BeamSnapshot(
        beam_id=f"{PATIENT}_beam_1",
        beam_number=2,
        status=BeamStatus.COMPLETED,
        host="sim",
        gpus=(),
        attempts=1,
        progress=100,
        outputs=(),
        error=None,
        beam_name="Rt Lat",
        resume_status=None,
        not_before_at=None,
        transfer_done_bytes=0,
        transfer_total_bytes=0,
        qa=DoseCheckRow(case_id=PATIENT, beam_id=f"{PATIENT}_beam_1", status=QaStatus.CONDITIONAL),
    )
    delivery = DeliveryRow(
        delivery_id=f"{PATIENT}/2026_03_01_{PATIENT}",
        case_id=PATIENT,
        beam_id=beam.beam_id,
        delivery_path=f"/scan/G1/{PATIENT}/2026_03_01_{PATIENT}",
        delivered_at=T0,
        fraction_index=1,
        raw_beam_number=2,
        treatment_beam_index=0,
        is_reference=True,
        qa_status=QaStatus.FAILED,
        qa_reason=f"layer_count_mismatch: {PATIENT}",
    )
    return CaseSnapshot(
        case_id=PATIENT,
        room="G1",
        status=CaseStatus.FAILED,
        progress=100,
        error=f"patient_id_mismatch: delivery 2026_03_01_{PATIENT} names another patient",
        case_path=f"/scan/G1/{PATIENT}",
        beams=(beam,),
        priority=0,
        created_at=T0,
        updated_at=T0,
        deliveries=(delivery,),
        plan_qa=DoseCheckRow(case_id=PATIENT, beam_id=None, status=QaStatus.SKIPPED),
    )


def test_a_snapshot_becomes_messages_without_its_ids_paths_or_folders() -> None:
    view = case_view(snapshot_of_a_patient())
    assert view.error_code == "patient_id_mismatch"
    assert view.verdict == QaStatus.FAILED
    notices = case_notices({}, [view], T0)
    assert [n.code for n in notices] == [NoticeCode.CASE_FAILED, NoticeCode.CHECK_FAILED]
    assert notices[1].parts == (
        "beam 2: conditional",
        "delivery 1 (fraction 1, beam 2): failed",
    )
    for notice in notices:
        text = everything_in(render(notice, Naming(secret=SECRET), "mqi-host"))
        assert PATIENT not in text and "/scan" not in text and "Rt Lat" not in text


# --- rate limit -----------------------------------------------------------------------------


def notice(i: int) -> Notice:
    return Notice(code=NoticeCode.CASE_FAILED, at=T0, case_id=f"case{i}", reason="run_lost")


def test_a_burst_is_cut_at_the_limit_and_the_rest_is_one_digest() -> None:
    throttle = Throttle(RateLimit(max_messages=3, window_s=60))
    admitted = [throttle.admit(notice(i), now=0.0) for i in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    assert throttle.folded == 7
    assert throttle.take_digest(0.0) is None
    assert throttle.seconds_until_digest(0.0) == 60.0
    assert throttle.take_digest(59.9) is None
    digest = throttle.take_digest(60.0)
    assert digest is not None and digest.count == 7 and len(digest.notices) == 7
    assert throttle.folded == 0 and throttle.seconds_until_digest(60.0) is None
    # the digest took a slot: two more fit in this window, then folding again
    assert [throttle.admit(notice(i), now=61.0) for i in range(3)] == [True, True, False]


def test_a_folded_notice_keeps_later_ones_behind_it() -> None:
    throttle = Throttle(RateLimit(max_messages=1, window_s=10))
    assert throttle.admit(notice(1), 0.0)
    assert not throttle.admit(notice(2), 1.0)
    # the window has room again, but the digest must go first
    assert not throttle.admit(notice(3), 11.0)
    digest = throttle.take_digest(11.0)
    assert digest is not None and [n.case_id for n in digest.notices] == ["case2", "case3"]


def test_force_sends_the_digest_without_room() -> None:
    throttle = Throttle(RateLimit(max_messages=1, window_s=10))
    throttle.admit(notice(1), 0.0)
    throttle.admit(notice(2), 0.0)
    assert throttle.take_digest(0.0) is None
    digest = throttle.take_digest(0.0, force=True)
    assert digest is not None and digest.count == 1


def test_the_limit_holds_in_every_window_and_nothing_is_lost() -> None:
    """A random stream on a fake clock: at most N messages in any window, every notice sent
    alone or counted in a digest."""
    rng = random.Random(7)
    limit = RateLimit(max_messages=4, window_s=60)
    throttle = Throttle(limit)
    sent_at: list[float] = []
    delivered = 0
    now = 0.0
    total = 2000
    for i in range(total):
        now += rng.expovariate(1 / 5.0)  # one every 5 s on average, in bursts
        digest = throttle.take_digest(now)
        if digest is not None:
            sent_at.append(now)
            delivered += digest.count
        if throttle.admit(notice(i), now):
            sent_at.append(now)
            delivered += 1
    now += limit.window_s
    digest = throttle.take_digest(now)
    if digest is not None:
        sent_at.append(now)
        delivered += digest.count
    assert delivered == total
    for start in sent_at:
        in_window = [t for t in sent_at if start <= t < start + limit.window_s]
        assert len(in_window) <= limit.max_messages


def test_a_digest_says_and_k_more_and_lists_a_bounded_number() -> None:
    throttle = Throttle(RateLimit(max_messages=1, window_s=60))
    throttle.admit(notice(0), 0.0)
    for i in range(1, 51):
        throttle.admit(notice(i), 0.0)
    digest = throttle.take_digest(60.0)
    assert digest is not None and digest.count == 50 and len(digest.notices) == DIGEST_LISTED
    message = render_digest(digest, Naming(secret=SECRET), "mqi-host")
    assert "and 50 more" in message.text and "and 50 more" in message.subject
    assert message.data["count"] == 50 and message.data["codes"] == {"case_failed": DIGEST_LISTED}
    assert "30 more not listed" in message.text
    for i in range(1, 51):
        assert f"case{i}" not in everything_in(message).replace(case_key(SECRET, f"case{i}"), "")


def test_a_digest_of_one_is_that_notice() -> None:
    one = Digest(notices=(notice(1),), count=1)
    assert render_digest(one, Naming(secret=SECRET), "h") == render(
        notice(1), Naming(secret=SECRET), "h"
    )


def test_retry_delays_double_up_to_the_cap() -> None:
    delays = [retry_delay_s(a, initial_s=5, max_s=60) for a in range(1, 7)]
    assert delays == [5, 10, 20, 40, 60, 60]
