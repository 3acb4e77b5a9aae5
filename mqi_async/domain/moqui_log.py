"""What MOQUI's log says: end markers (hints for progress only) and messages that name a failure.

A run is judged on its exit file and its outputs; these lines never decide success. Builds
differ: the public fork prints `Time taken by MC engine:`, the clinic's build
`Total execution time:`.
"""

from __future__ import annotations

#: the line each build prints as it ends normally
END_MARKERS: tuple[str, ...] = ("Time taken by MC engine:", "Total execution time:")

#: log text -> failure code, for a run that exited non-zero; the first match wins
FAILURE_MESSAGES: tuple[tuple[str, str], ...] = (
    # mqi::assert_track (mqi_track.hpp) printf()s these on stdout, then exit(1)
    ("There is nan in track direction", "moqui_transport_nan"),
    ("There is all-zeros in track direction", "moqui_transport_nan"),
    # the public fork reads DicomPath into the DICOM dir and then logFilePath over it
    ("Log Dir is not provided", "moqui_absolute_path_unsupported"),
)


def has_end_marker(log_tail: str) -> bool:
    """Whether the log shows a normal end, in either build's words."""
    return any(marker in log_tail for marker in END_MARKERS)


def failure_code_from_log(log_tail: str) -> str | None:
    """The named failure a non-zero exit's log points to, or None to name it by exit status."""
    for text, code in FAILURE_MESSAGES:
        if text in log_tail:
            return code
    return None
