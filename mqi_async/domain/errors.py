"""Named failures: every error a user can meet has a code, a kind and a sentence saying what to do.

MqiError(code, detail)
 ├── ConfigError                  bad config file or environment override
 ├── IllegalTransitionError       a bug: a status change the tables forbid
 ├── DatabaseError                damaged or locked database
 ├── IngestError                  a case's files are broken (permanent for that case)
 ├── TransientError               may succeed later; retried with backoff
 │    └── HostUnavailableError    the host cannot be reached; its beams pause
 └── PermanentError               retrying cannot help
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FailureKind(StrEnum):
    TRANSIENT = "transient"  # retry with backoff, counts against retry.max_attempts
    PERMANENT = "permanent"  # fail now
    PAUSE = "pause"  # host-level; beams wait without using attempts


@dataclass(frozen=True, slots=True)
class FailureInfo:
    kind: FailureKind
    advice: str


_T, _P, _H = FailureKind.TRANSIENT, FailureKind.PERMANENT, FailureKind.PAUSE

#: code -> what kind of failure it is and what the user should do about it.
FAILURES: dict[str, FailureInfo] = {
    # ingest and plan resolution
    "missing_rtplan": FailureInfo(
        _P, "Put the RTPLAN (.dcm, Modality RTPLAN) in the case folder, then retry."
    ),
    "rtplan_parse_failed": FailureInfo(
        _P, "The RTPLAN file is not readable DICOM; re-export it from the TPS, then retry."
    ),
    "not_ion_plan": FailureInfo(
        _P, "The plan has no proton (ion) beams; only RT Ion Plans can be simulated."
    ),
    "zero_expected_beams": FailureInfo(
        _P, "The RTPLAN has no treatment beams (only setup beams); check the export."
    ),
    "missing_deliveries": FailureInfo(
        _P, "No delivery folder (PlanInfo.txt or *.ptn) was found; check the log transfer."
    ),
    "planinfo_invalid": FailureInfo(
        _P, "A PlanInfo.txt is unreadable or lacks a required key; re-send the delivery logs."
    ),
    "patient_id_mismatch": FailureInfo(
        _P,
        "A delivery's DICOM_PATIENT_ID differs from the RTPLAN's PatientID; the logs belong to another patient.",
    ),
    "unresolved_folders": FailureInfo(
        _P,
        "Some delivery folders match no RTPLAN beam; check DICOM_BEAM_NUMBER in PlanInfo.txt, then retry.",
    ),
    "duplicate_beam_delivery": FailureInfo(
        _P, "A fraction holds the same beam twice; remove the interrupted delivery, then retry."
    ),
    "missing_delivery_timestamp": FailureInfo(
        _P, "A delivery has no TCSC_IRRAD_DATETIME and its folder name is not a timestamp."
    ),
    "no_reference_fraction": FailureInfo(
        _P, "No fraction could serve as the reference; check that the deliveries match the plan."
    ),
    "beam_count_mismatch": FailureInfo(
        _P, "The reference fraction's beams do not match the plan's treatment beams."
    ),
    "unknown_machine": FailureInfo(
        _P,
        "TreatmentMachineName names neither gantry 1 nor gantry 2 (e.g. G1, GTR2); fix the plan.",
    ),
    # local tools
    "tool_missing": FailureInfo(
        _P, "A configured tool does not exist or is not executable; fix `tools:` in the config."
    ),
    "interpreter_failed": FailureInfo(
        _T, "The interpreter exited non-zero; its log in the case's work folder says why."
    ),
    "interpreter_timeout": FailureInfo(
        _T, "The interpreter ran past tools.interpreter_timeout_seconds; raise it for large cases."
    ),
    "interpreter_no_output": FailureInfo(
        _P, "The interpreter wrote no CSV files; check the delivery logs and its log."
    ),
    "dose_conversion_failed": FailureInfo(
        _T, "Converting raw dose to RT Dose failed; see the beam's log."
    ),
    "dicom_invalid": FailureInfo(
        _T, "MOQUI's DICOM output is not a valid RT Dose; see the beam's log."
    ),
    "postprocess_failed": FailureInfo(
        _T, "The post-processing command failed; the dose is still valid. See its log."
    ),
    # hosts and transfers
    "host_unreachable": FailureInfo(
        _H, "The GPU host does not answer; its beams wait and resume when it is back."
    ),
    "host_key_mismatch": FailureInfo(
        _H, "The host key differs from known_hosts; verify the server, then update known_hosts."
    ),
    "auth_failed": FailureInfo(
        _H, "SSH login was refused; check username and client_keys for this host."
    ),
    "transfer_failed": FailureInfo(
        _T, "A file transfer broke off; it resumes on the next attempt."
    ),
    "transfer_verify_failed": FailureInfo(
        _T, "A transferred file's size or SHA-256 did not match; it is sent again."
    ),
    "disk_full": FailureInfo(
        _T, "A disk is full (local or remote); free space, the beam is retried."
    ),
    "remote_command_failed": FailureInfo(
        _T, "A command on the host failed; see the log line for its stderr."
    ),
    "remote_timeout": FailureInfo(
        _T, "A command on the host did not answer in time; it is retried."
    ),
    # MOQUI runs (moqui_exit_<N> and moqui_signal_<NAME> are built by run_failure_code)
    "moqui_exit": FailureInfo(_T, "MOQUI exited non-zero; the beam's moqui.log says why."),
    "moqui_signal": FailureInfo(_T, "MOQUI was killed by a signal; the beam's moqui.log says why."),
    "missing_output": FailureInfo(
        _T, "MOQUI exited 0 but wrote no dose file; see the beam's moqui.log."
    ),
    "short_output": FailureInfo(
        _T, "A dose file is smaller than the phantom grid needs; MOQUI could not write it fully."
    ),
    "run_timeout": FailureInfo(
        _T, "MOQUI ran past runs.timeout_seconds and was killed; raise it for large beams."
    ),
    "run_lost": FailureInfo(
        _T, "The MOQUI process vanished without an exit code (host reboot?); the beam is retried."
    ),
    "launch_failed": FailureInfo(
        _T, "MOQUI could not be started on the host; check moqui_command."
    ),
    "slurm_timeout": FailureInfo(
        _T, "The Slurm job ran past its time_limit (TIMEOUT); raise time_limit for large beams."
    ),
    "slurm_cancelled": FailureInfo(
        _T, "The Slurm job was cancelled outside the service (scancel or an admin); it is retried."
    ),
    "slurm_node_fail": FailureInfo(
        _T, "The cluster node failed (NODE_FAIL); the beam is retried on another node."
    ),
    "slurm_preempted": FailureInfo(
        _T, "A higher-priority job preempted the beam (PREEMPTED); it is retried."
    ),
    "slurm_out_of_memory": FailureInfo(
        _T, "The job ran out of memory (OUT_OF_MEMORY); ask for more memory in sbatch_args."
    ),
    "slurm_boot_fail": FailureInfo(
        _T, "The node could not boot for the job (BOOT_FAIL); it is retried."
    ),
    "slurm_deadline": FailureInfo(
        _T, "The job missed its Slurm deadline (DEADLINE); it is retried."
    ),
    "moqui_input_invalid": FailureInfo(
        _P, "MOQUI rejected moqui_tps.in; this is a service bug, please report it."
    ),
    # operator and service
    "cancelled": FailureInfo(
        _P, "Cancelled by an operator; `mqi-async retry CASE_ID` starts it again."
    ),
    "retries_exhausted": FailureInfo(
        _P, "Every attempt failed; fix the cause in the last error, then `mqi-async retry CASE_ID`."
    ),
    "internal_error": FailureInfo(
        _P, "An unexpected error; the service log has the traceback. Please report it."
    ),
    "database_damaged": FailureInfo(
        _P, "The database failed its integrity check; restore a backup or move it aside."
    ),
    "already_running": FailureInfo(
        _P, "Another mqi-async service uses this database; stop it first."
    ),
    # exactly-once and service health
    "converter_output_ambiguous": FailureInfo(
        _T, "The raw_to_dicom converter must write exactly one .dcm into {output_dir}; fix it."
    ),
    "database_unwritable": FailureInfo(
        _H, "The database cannot be written (disk full or read-only); free space, it resumes."
    ),
    "case_claimed_elsewhere": FailureInfo(
        _P,
        "Another mqi-async service (named in the error) runs this case on this host; run one "
        "service per scan folder, or delete its claim file if that service is gone, then retry.",
    ),
    "kill_pending": FailureInfo(
        _H, "A kill could not reach the host; it is sent again when the host is back."
    ),
    # privacy and hostile input
    "case_key_unreadable": FailureInfo(
        _P,
        "The file `<database>.key` that names cases on hosts is unreadable or damaged;"
        " restore it with the database (without it the service cannot find old remote folders).",
    ),
    "invalid_beam_name": FailureInfo(
        _P,
        "A plan field that becomes a file name (BeamName, …) holds a path separator, `..`, a"
        " control or non-ASCII character, or is too long; fix it in the TPS, re-export, retry.",
    ),
    "rtplan_too_large": FailureInfo(
        _P,
        "The RTPLAN is larger than `ingest.max_rtplan_mb`; check the export (a plan is"
        " rarely above a few MiB) or raise the limit, then retry.",
    ),
    "symlink_outside_scan": FailureInfo(
        _P,
        "The case folder (or a file in it) is a symbolic link that leaves the scan directory;"
        " links are never followed there. Copy the data into the scan directory instead.",
    ),
    "folder_name_not_utf8": FailureInfo(
        _P,
        "A folder name in the scan directory is not valid UTF-8 (a name from another code"
        " page); it is skipped. Rename it to UTF-8 (e.g. `convmv -f cp1252 -t utf8`).",
    ),
    "folder_unreadable": FailureInfo(
        _P,
        "A folder in the scan directory cannot be listed by the service's user; it is"
        " skipped. Give that user read and execute permission on it.",
    ),
    "ssh_negotiation_failed": FailureInfo(
        _H,
        "The SSH client and server share no key-exchange, cipher or host-key algorithm;"
        " update the server's OpenSSH or its allowed algorithms.",
    ),
    # what a run of the public MOQUI fork (jokh38/moqui_v2) showed
    "csv_format_unsupported": FailureInfo(
        _P,
        "An interpreter CSV is not rows of time_ms,x_mm,y_mm,count, so MOQUI would misread "
        "it; check the interpreter's version and output, then retry the case.",
    ),
    "zero_histories": FailureInfo(
        _P,
        "moqui.ParticlesPerHistory times every spot's log count truncates to 0 histories, so "
        "MOQUI would score nothing; raise ParticlesPerHistory, then retry the case.",
    ),
    "empty_dose": FailureInfo(
        _P,
        "MOQUI exited 0 but its dose is all zeros (no particle was transported); check "
        "ParticlesPerHistory and the beam's log CSVs, then retry the case.",
    ),
    "nonfinite_dose": FailureInfo(
        _P,
        "MOQUI's dose holds NaN or Inf values; check the beam's moqui.log and the geometry, "
        "then retry the case.",
    ),
    "moqui_transport_nan": FailureInfo(
        _T,
        "MOQUI stopped in particle transport on a NaN track (exit 1); the beam is retried "
        "(a RandomSeed below -1 gives each attempt a new seed). If it keeps failing, check "
        "the spot positions in the log CSVs.",
    ),
    "moqui_absolute_path_unsupported": FailureInfo(
        _P,
        "This MOQUI build aborts with UseAbsolutePath true ('Log Dir is not provided'); set "
        "moqui.UseAbsolutePath: false, then retry the case.",
    ),
    # dose checks (gamma)
    "dose_unreadable": FailureInfo(
        _P, "A dose file is not a readable DICOM RT Dose with pixel data; re-export it."
    ),
    "frame_of_reference_mismatch": FailureInfo(
        _P,
        "The two doses are in different frames of reference (FrameOfReferenceUID); they "
        "cannot be compared point by point.",
    ),
    "grids_do_not_overlap": FailureInfo(
        _P, "No reference point above the cutoff lies inside the evaluated dose grid."
    ),
    "unsupported_orientation": FailureInfo(
        _P,
        "Only axial dose grids (ImageOrientationPatient along the patient x and y axes) are "
        "supported.",
    ),
    "reference_dose_zero": FailureInfo(
        _P, "The reference dose has no point above the lower cutoff; nothing can be evaluated."
    ),
    "gamma_failed": FailureInfo(
        _T, "The gamma computation failed or its worker died; it is retried."
    ),
    "dose_grids_differ": FailureInfo(
        _P,
        "The beam doses are on different grids or frames of reference and cannot be summed "
        "for the plan; compare the beams one by one.",
    ),
    "dose_check_off": FailureInfo(_P, "Dose checks are switched off (qa.reference: none)."),
    "unknown_case": FailureInfo(
        _P, "No treatment case has this ID; `mqi-async status` lists the cases."
    ),
    "report_failed": FailureInfo(
        _T,
        "The case report could not be written; it is tried again. The service log names the "
        "cause; `mqi-async report CASE_ID` rebuilds it by hand.",
    ),
    "report_timeout": FailureInfo(
        _T, "Writing the case report took too long and was stopped; it is tried again."
    ),
    "report_dose_missing": FailureInfo(
        _P,
        "A dose file the report draws is gone (cleaned up, or moved); the report names the "
        "numbers without that picture.",
    ),
    "dose_check_not_run": FailureInfo(
        _P,
        "This case finished before dose checks existed; `mqi-async retry` on a failed case "
        "runs them.",
    ),
    "no_tps_dose": FailureInfo(
        _P,
        "No planned RT Dose (Modality RTDOSE referencing this RTPLAN) was found in the case "
        "folder; export it from the TPS with the plan, or use qa.reference: planned_mc.",
    ),
    "no_delivered_dose": FailureInfo(
        _P, "The beam has no delivered dose (its MOQUI run failed or was cancelled)."
    ),
    "planned_run_failed": FailureInfo(
        _P,
        "The MOQUI run on the plan failed, so there is no planned dose to compare with; see "
        "its error, then retry the case.",
    ),
    "planned_dose_missing": FailureInfo(
        _P,
        "The planned dose files are gone (removed by retention?); retry the case to run the "
        "plan again.",
    ),
    # delivery checks (the spot record of one delivery against the plan)
    "ptn_missing": FailureInfo(
        _P, "The delivery folder holds no .ptn record; re-send that delivery's logs."
    ),
    "ptn_unreadable": FailureInfo(
        _P,
        "A .ptn record is damaged (not whole 16-byte samples) or given twice for one layer; "
        "re-send that delivery's logs, then re-run the checks.",
    ),
    "planrange_invalid": FailureInfo(
        _P,
        "PlanRange.txt lacks the LAYER_NO or DOSE1_RANGE column or has a row that does not "
        "fit it; re-send that delivery's logs.",
    ),
    "calibration_invalid": FailureInfo(
        _P,
        "The case's scv_init_G1.txt / scv_init_G2.txt lacks a key or holds a value that is "
        "not a number; fix or remove it (the configured calibration is then used).",
    ),
    "layer_count_mismatch": FailureInfo(
        _P,
        "The record holds layers the plan's beam does not have: the logs do not belong to "
        "this plan or beam. Check the delivery folder's PlanInfo.txt and the RTPLAN.",
    ),
    "delivery_plan_unreadable": FailureInfo(
        _P,
        "The plan's spot data for this beam cannot be read (no such beam, or weights and "
        "positions that do not pair); check the RTPLAN export.",
    ),
    "delivery_folder_missing": FailureInfo(
        _P, "The delivery folder is gone from the scan directory; it cannot be checked."
    ),
    "delivery_check_failed": FailureInfo(
        _T, "The delivery check failed or its worker died; it is retried."
    ),
    "delivery_check_timeout": FailureInfo(
        _T,
        "The delivery check ran longer than qa.delivery.timeout_seconds; it is retried, and "
        "a larger timeout or grid_mm helps a very large record.",
    ),
    "delivery_check_off": FailureInfo(
        _P, "Delivery checks are switched off (qa.delivery.enabled: false)."
    ),
    # notifications (notify:): what a notice names; their kind is never used to retry
    "case_failed": FailureInfo(
        _P, "A case failed; its code says why. Fix the cause, then `mqi-async retry` the case."
    ),
    "check_conditional": FailureInfo(
        _P,
        "A dose or delivery check is conditional: a physicist should review the case's "
        "verdicts (`mqi-async status`) before the next fraction.",
    ),
    "check_failed": FailureInfo(
        _P,
        "A dose or delivery check failed its criteria: a physicist must review the case "
        "(`mqi-async status`) before the next fraction.",
    ),
    "host_paused_long": FailureInfo(
        _H,
        "A GPU host has been paused longer than notify.host_paused_minutes; its error says "
        "why. Fix the host or the config; its beams resume by themselves once it answers.",
    ),
    "host_resumed": FailureInfo(_H, "The host answers again and its beams resume; nothing to do."),
    "service_unexpected_stop": FailureInfo(
        _P,
        "The service was killed, crashed or lost power without a clean stop; read its log "
        "and the system journal. Runs in flight are re-attached, nothing else to do.",
    ),
    "service_fatal_error": FailureInfo(
        _P,
        "The service is stopping on a fatal error; its log holds the traceback. systemd "
        "restarts it; if it stops again, report the traceback.",
    ),
    "notices_folded": FailureInfo(
        _P,
        "More notices came than notify.rate_limit lets through; run `mqi-async status` "
        "for the whole picture.",
    ),
    "notify_delivery_failed": FailureInfo(
        _T,
        "A notification could not be delivered after its retries; check notify.webhook / "
        "notify.email and that the receiver is up.",
    ),
}


def failure_info(code: str) -> FailureInfo:
    """The registry entry for a code; `moqui_exit_134` resolves to `moqui_exit`."""
    if code in FAILURES:
        return FAILURES[code]
    for prefix in ("moqui_exit", "moqui_signal"):
        if code.startswith(prefix + "_"):
            return FAILURES[prefix]
    return FAILURES["internal_error"]


class MqiError(Exception):
    """Base of all named failures; `str()` is `code: detail`."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail or failure_info(code).advice
        super().__init__(f"{code}: {self.detail}")

    @property
    def kind(self) -> FailureKind:
        return failure_info(self.code).kind

    @property
    def advice(self) -> str:
        return failure_info(self.code).advice


class ConfigError(MqiError):
    """The config is invalid; `problems` holds one line per key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("config_invalid", "; ".join(problems))


class IllegalTransitionError(MqiError):
    def __init__(self, what: str, current: str, new: str) -> None:
        super().__init__("internal_error", f"illegal {what} transition {current} -> {new}")


class DatabaseError(MqiError):
    pass


class IngestError(MqiError):
    """A case's input is broken; the case fails with this code."""


class TransientError(MqiError):
    pass


class HostUnavailableError(TransientError):
    """The host cannot be reached (or refuses us); callers pause, never hang."""

    def __init__(self, host: str, code: str = "host_unreachable", detail: str = "") -> None:
        self.host = host
        super().__init__(code, f"host {host}: {detail or failure_info(code).advice}")


class PermanentError(MqiError):
    pass


def run_failure_code(exit_code: int | None, signal_name: str | None = None) -> str:
    """Name a failed MOQUI exit: `moqui_exit_134`, `moqui_signal_KILL`."""
    if signal_name:
        return f"moqui_signal_{signal_name.removeprefix('SIG')}"
    return f"moqui_exit_{exit_code}"


def format_error(code: str, detail: str = "") -> str:
    """The text stored in `error` columns: the code first, then a human sentence."""
    return f"{code}: {detail or failure_info(code).advice}"
