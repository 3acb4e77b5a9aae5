"""Detached runs as pure POSIX-sh script builders and output parsers, shared by ssh and local hosts."""

from __future__ import annotations

import base64
import binascii
import math
import re
import shlex
from collections.abc import Iterable, Sequence

from mqi_async.domain.jobs import JobSpec, JobState, JobStatus

#: files a job keeps in its attempt directory
LOG_FILE = "moqui.log"
PGID_FILE = "pgid"
EXIT_FILE = "exit_code"
#: made (mkdir is atomic) by the one wrapper that runs the command, or by a fence
CLAIM_DIR = "claim"
#: inside CLAIM_DIR: the folder was fenced, so no wrapper may ever start in it
FENCE_FILE = "fenced"
#: bytes of the log each poll returns per job
LOG_TAIL_BYTES = 4096
#: a single `sh -c` argument may not exceed 128 KiB on Linux (MAX_ARG_STRLEN); stay well below
MAX_SCRIPT_CHARS = 64_000
#: embedded job files must leave room for the rest of the launch script
MAX_EMBEDDED_FILE_CHARS = 48_000
#: seconds the launcher waits for the wrapper to record its process group
LAUNCH_WAIT_S = 10

_RECORD = "MQIJOB"
_NOW = "MQINOW"
_FENCED = "MQIFENCED"
#: every remote script starts with this: files and folders the service (and MOQUI, which
#: inherits it) makes on a host are 0600/0700 whatever the login umask is
PRIVATE_UMASK = "umask 077"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BOOT_ID = "cat /proc/sys/kernel/random/boot_id 2>/dev/null"

#: Shared by the detached-run wrapper and the Slurm batch script: wait for the background
#: child `$mqi_child` (a trapped signal interrupts `wait` with rc > 128 while the child still
#: runs), then write its status, and the signal name for rc > 128, to `exit_code` atomically.
WAIT_AND_RECORD_EXIT = """\
rc=126
if [ -n "$mqi_child" ]; then
  while :; do
    wait "$mqi_child"; rc=$?
    [ "$rc" -gt 128 ] && kill -0 "$mqi_child" 2>/dev/null || break
  done
fi
sig=
if [ "$rc" -gt 128 ]; then sig=$(kill -l "$rc" 2>/dev/null) || sig=; fi
cd -- "$d" && printf '%s\\n%s\\n' "$rc" "$sig" > exit_code.tmp && mv -f exit_code.tmp exit_code
"""

# Runs as the session leader made by setsid, so its pid is the process-group id. Only the
# wrapper that makes the claim folder runs the command, so two launches of one attempt (a
# retry after a lost reply) start it once. It records its process-group id (with the boot id,
# so a pgid reused after a reboot is never mistaken for the job, and the host's start time),
# runs the command in the background and waits, because a trapped TERM must not stop the
# wrapper before it writes the exit status. Signals show as 128+N, plus the name.
_WRAPPER = """\
d=$1; c=$2; shift 2
cd -- "$d" || exit 126
mkdir CLAIM 2>/dev/null || exit 0
printf '%s\\n%s\\n%s\\n' "$$" "$(BOOT_ID)" "$(date +%s)" > pgid.tmp && mv -f pgid.tmp pgid
trap 'mqi_term=1' TERM INT HUP
ENV_EXPORTS
mqi_child=
cd -- "$c" && { "$@" & mqi_child=$!; }
""" + (WAIT_AND_RECORD_EXIT)

# Liveness of a process group: kill -0 says yes for zombies too, which an init that reaps
# slowly keeps around, so a group whose members `ps` lists are all zombies counts as gone.
# When ps is missing or lists none of the group, kill -0 alone decides (never a false loss).
# Needs $procs from _PROCS.
_PROCS = "procs=$(ps -e -o pgid= -o stat= 2>/dev/null) || procs="
_GROUP_ALIVE = """\
grp_alive() {
  kill -0 -"$1" 2>/dev/null || return 1
  [ -n "$procs" ] || return 0
  printf '%s\\n' "$procs" | awk -v g="$1" \
    '$1 == g { n++; if ($2 !~ /^Z/) live++ } END { exit !(n == 0 || live > 0) }'
}
"""


def quote_path(path: str) -> str:
    """Shell-quote a host path; a leading `~` becomes `"$HOME"` (quoting would keep it literal)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def quote_argv(argv: Iterable[str]) -> str:
    """One shell word per argument, so nothing in them is ever interpreted."""
    return " ".join(shlex.quote(a) for a in argv)


def check_text(value: str, what: str) -> None:
    """A NUL byte cannot travel in an argument; reject it instead of truncating silently."""
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL byte")


def sh_command(script: str) -> str:
    """The command line that runs `script` under POSIX sh, whatever the login shell is."""
    return "/bin/sh -c " + shlex.quote(f"{PRIVATE_UMASK}\n{script}")


def timed_command(argv: Sequence[str], *, timeout_s: float) -> str:
    """A command line running argv under the host's `timeout`, so it never outlives us."""
    if not argv:
        raise ValueError("empty argv")
    for a in argv:
        check_text(a, "argument")
    limit = max(1, math.ceil(timeout_s))
    return f"{PRIVATE_UMASK}; timeout -k 5 {limit} {quote_argv(argv)} </dev/null"


def chunks(items: Sequence[str], *, max_chars: int = MAX_SCRIPT_CHARS // 2) -> list[list[str]]:
    """Split items so the quoted words of each part fit in one script."""
    parts: list[list[str]] = []
    current: list[str] = []
    size = 0
    for item in items:
        n = len(shlex.quote(item)) + 1
        if current and size + n > max_chars:
            parts.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        parts.append(current)
    return parts


def launch_script(spec: JobSpec) -> str:
    """Create the attempt directory, write the job's files, start the wrapper under setsid.

    Idempotent: when the directory already has a `pgid`, nothing is started again and the
    recorded pgid is printed, so a launch retried after a crash re-attaches. The script
    prints `MQIPGID <pgid>` once the wrapper has recorded its process group.
    """
    if not spec.argv:
        raise ValueError("a job needs a command")
    check_text(spec.job_dir, "job_dir")
    for a in spec.argv:
        check_text(a, "argument")
    exports: list[str] = []
    for key, value in spec.env:
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"not a valid environment variable name: {key!r}")
        check_text(value, f"value of {key}")
        exports.append(f"export {key}={shlex.quote(value)}")
    wrapper = (
        _WRAPPER.replace("$(BOOT_ID)", f"$({_BOOT_ID})")
        .replace("ENV_EXPORTS", "\n".join(exports) or ":")
        .replace("mkdir CLAIM", f"mkdir {CLAIM_DIR}")
    )
    d = quote_path(spec.job_dir)
    cwd = quote_path(spec.cwd) if spec.cwd else '"$d"'
    lines = [
        PRIVATE_UMASK,
        f"d={d}",
        'mkdir -p -- "$d" || exit 3',
        'if [ -s "$d/pgid" ]; then printf "MQIPGID %s\\n" "$(sed -n 1p "$d/pgid")"; exit 0; fi',
        f'if [ -f "$d/{CLAIM_DIR}/{FENCE_FILE}" ]; then echo {_FENCED}; exit 5; fi',
    ]
    embedded = 0
    for name, text in spec.files:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"job file names are plain names: {name!r}")
        check_text(text, f"file {name}")
        embedded += len(text)
        # written to a temp name first, so a half-written input is never read
        tmp = shlex.quote(name + ".tmp")
        lines.append(
            f'printf %s {shlex.quote(text)} > "$d"/{tmp} && '
            f'mv -f "$d"/{tmp} "$d"/{shlex.quote(name)} || exit 3'
        )
    if embedded > MAX_EMBEDDED_FILE_CHARS:
        raise ValueError(f"job files are too large to embed ({embedded} characters)")
    lines += [
        f"setsid /bin/sh -c {shlex.quote(wrapper)} {shlex.quote(spec.name or 'mqi')} "
        f'"$d" {cwd} {quote_argv(spec.argv)} </dev/null >>"$d"/{LOG_FILE} 2>&1 &',
        "i=0",
        f'while [ ! -s "$d/pgid" ] && [ "$i" -lt {LAUNCH_WAIT_S * 20} ]; do '
        "sleep 0.05; i=$((i+1)); done",
        'if [ -s "$d/pgid" ]; then printf "MQIPGID %s\\n" "$(sed -n 1p "$d/pgid")"; exit 0; fi',
        f'echo "the wrapper did not start; see $d/{LOG_FILE}" >&2',
        "exit 4",
    ]
    return "\n".join(lines) + "\n"


def parse_launch_output(stdout: str) -> str | None:
    """The process-group id printed by `launch_script`, or None."""
    for line in stdout.splitlines():
        head, _, rest = line.partition(" ")
        pgid = rest.strip()
        if head == "MQIPGID" and pgid.isascii() and pgid.isdigit() and int(pgid) > 1:
            return pgid
    return None


def attach_script(job_dir: str, *, fence: bool = False) -> str:
    """Print the recorded pgid of a job directory (`MQIPGID <pgid>`), if any; for re-attach.

    With `fence`, a folder where no wrapper has claimed the run is closed for good (`MQIFENCED`):
    a launch whose reply was lost can then never start late, after a new attempt has begun.
    A wrapper that claimed the folder but has not yet written its pgid is waited for.
    """
    check_text(job_dir, "job_dir")
    d = quote_path(job_dir)
    found = 'if [ -s "$d/pgid" ]; then printf "MQIPGID %s\\n" "$(sed -n 1p "$d/pgid")"; exit 0; fi'
    if not fence:
        return f"d={d}\n{found}\n"
    return f"""\
d={d}
{found}
[ -d "$d" ] || mkdir -p -- "$d" || exit 3
if mkdir "$d/{CLAIM_DIR}" 2>/dev/null; then
  : > "$d/{CLAIM_DIR}/{FENCE_FILE}"; echo {_FENCED}; exit 0
fi
[ -f "$d/{CLAIM_DIR}/{FENCE_FILE}" ] && {{ echo {_FENCED}; exit 0; }}
i=0
while [ ! -s "$d/pgid" ] && [ "$i" -lt {LAUNCH_WAIT_S * 20} ]; do sleep 0.05; i=$((i+1)); done
{found}
: > "$d/{CLAIM_DIR}/{FENCE_FILE}"; echo {_FENCED}
"""


def parse_fenced(stdout: str) -> bool:
    """True when `attach_script(fence=True)` closed the folder (nothing runs there)."""
    return any(line.strip() == _FENCED for line in stdout.splitlines())


def poll_script(job_dirs: Sequence[str], *, tail_bytes: int = LOG_TAIL_BYTES) -> str:
    """One script reporting every job's exit status, liveness and log tail, one line each.

    First `MQINOW <host epoch seconds>`, then per job
    `MQIJOB <index> <exit|-> <signal|-> <alive 0|1> <pgid|-> <start epoch|-> <base64 log tail|->`.
    A process group counts as alive only on the boot that recorded it.
    """
    for d in job_dirs:
        check_text(d, "job_dir")
    words = " ".join(quote_path(d) for d in job_dirs)
    return f"""\
{_GROUP_ALIVE}{_PROCS}
boot=$({_BOOT_ID})
printf '{_NOW} %s\\n' "$(date +%s)"
i=0
for d in {words}; do
  ec=-; sig=-; alive=0; pg=-; st=-
  if [ -f "$d/{EXIT_FILE}" ]; then
    ec=$(sed -n 1p "$d/{EXIT_FILE}"); sig=$(sed -n 2p "$d/{EXIT_FILE}")
    case $ec in ''|*[!0-9]*) ec=-;; esac
    case $sig in ''|*[!A-Z0-9+]*) sig=-;; esac
  fi
  if [ -f "$d/{PGID_FILE}" ]; then
    p=$(sed -n 1p "$d/{PGID_FILE}"); b=$(sed -n 2p "$d/{PGID_FILE}")
    st=$(sed -n 3p "$d/{PGID_FILE}"); case $st in ''|*[!0-9]*) st=-;; esac
    case $p in ''|*[!0-9]*|0|1) ;; *)
      pg=$p
      if [ -z "$b" ] || [ -z "$boot" ] || [ "$b" = "$boot" ]; then
        grp_alive "$p" && alive=1
      fi;;
    esac
  fi
  t=$(tail -c {int(tail_bytes)} "$d/{LOG_FILE}" 2>/dev/null | base64 | tr -d '\\n')
  printf '{_RECORD} %s %s %s %s %s %s %s\\n' "$i" "$ec" "$sig" "$alive" "$pg" "$st" "${{t:--}}"
  i=$((i+1))
done
"""


def _decode_tail(text: str) -> str:
    if text == "-":
        return ""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return ""
    return raw.decode("utf-8", errors="replace")


def _epoch(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None


def _status(job_dir: str, fields: list[str], host_now: int | None) -> JobStatus | None:
    ec, sig, alive, _pgid, start, tail = fields
    log_tail = _decode_tail(tail)
    started = _epoch(start)
    run_s = float(max(0, host_now - started)) if host_now is not None and started else None
    if ec != "-":
        if not ec.isascii() or not ec.isdigit() or len(ec) > 5:
            return None
        return JobStatus(
            job_dir=job_dir,
            state=JobState.EXITED,
            exit_code=int(ec),
            signal=None if sig == "-" else sig.removeprefix("SIG"),
            log_tail=log_tail,
            run_seconds=run_s,
        )
    if alive == "1":
        return JobStatus(
            job_dir=job_dir, state=JobState.RUNNING, log_tail=log_tail, run_seconds=run_s
        )
    if alive == "0":
        return JobStatus(
            job_dir=job_dir,
            state=JobState.LOST,
            log_tail=log_tail,
            detail="no exit code and no live process group",
        )
    return None


def parse_poll_output(stdout: str, job_dirs: Sequence[str]) -> dict[str, JobStatus]:
    """Statuses by job_dir from `poll_script` output. Never raises.

    A job missing from the result (cut-off output, garbage) is unknown this tick: callers must
    not read its absence as an exit or a loss.
    """
    result: dict[str, JobStatus] = {}
    host_now: int | None = None
    for line in stdout.splitlines():
        fields = line.split(" ")
        if len(fields) == 2 and fields[0] == _NOW:
            host_now = _epoch(fields[1])
            continue
        if len(fields) != 8 or fields[0] != _RECORD:
            continue
        index = fields[1]
        if not index.isascii() or not index.isdigit() or int(index) >= len(job_dirs):
            continue
        job_dir = job_dirs[int(index)]
        status = _status(job_dir, fields[2:], host_now)
        if status is not None:
            result[job_dir] = status
    return result


def kill_script(job_dir: str, pgid: str, *, grace_s: float = 10.0) -> str:
    """Stop a job's whole process group: TERM, wait up to grace_s, then KILL.

    It acts only when the job has no exit file yet and the directory's pgid file (and boot
    id) still name this process group, so a stale handle (a job that already ended, a pgid
    reused since) never hits an unrelated group. After a KILL the wrapper is dead
    too, so the script records the exit status the wrapper could not.
    """
    check_text(job_dir, "job_dir")
    if not pgid.isascii() or not pgid.isdigit() or int(pgid) <= 1:
        raise ValueError(f"not a process-group id: {pgid!r}")
    d = quote_path(job_dir)
    ticks = max(1, math.ceil(grace_s * 10))
    return f"""\
{_GROUP_ALIVE}d={d}; pg={pgid}
[ -f "$d/{EXIT_FILE}" ] && {{ echo MQIEXITED; exit 0; }}
[ -f "$d/{PGID_FILE}" ] || exit 0
[ "$(sed -n 1p "$d/{PGID_FILE}")" = "$pg" ] || exit 0
b=$(sed -n 2p "$d/{PGID_FILE}"); boot=$({_BOOT_ID})
if [ -n "$b" ] && [ -n "$boot" ] && [ "$b" != "$boot" ]; then exit 0; fi
kill -TERM -"$pg" 2>/dev/null || exit 0
i=0
while {_PROCS}; grp_alive "$pg" && [ "$i" -lt {ticks} ]; do sleep 0.1; i=$((i+1)); done
{_PROCS}; grp_alive "$pg" || exit 0
kill -KILL -"$pg" 2>/dev/null
i=0
while {_PROCS}; grp_alive "$pg" && [ "$i" -lt 20 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -f "$d/{EXIT_FILE}" ]; then
  printf '137\\nKILL\\n' > "$d/{EXIT_FILE}.tmp" && mv -f "$d/{EXIT_FILE}.tmp" "$d/{EXIT_FILE}"
fi
"""


def kill_timeout_s(grace_s: float) -> float:
    """How long a caller should wait for `kill_script` to finish."""
    return grace_s + 10.0
