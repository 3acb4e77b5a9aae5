"""Verified, resumable SFTP transfers: each file goes to `name.part`, is checked, then renamed."""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import logging
import os
import posixpath
import shutil
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from mqi_async.domain.errors import HostUnavailableError, MqiError, TransientError
from mqi_async.domain.jobs import ProgressCallback, TransferReport
from mqi_async.hpc.jobs import check_text, chunks, quote_path, sh_command
from mqi_async.hpc.ssh import SFTP_MAX_BLOCK_SIZE, SshPool

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
#: files sent or fetched at once over the shared SFTP session
DEFAULT_PARALLEL_FILES = 4
#: -1 = the server's own limit (255 KiB for OpenSSH); never above SFTP_MAX_BLOCK_SIZE
DEFAULT_BLOCK_SIZE = -1
#: the slowest rate a transfer may crawl at before it counts as stuck (bytes/s)
MIN_RATE_BPS = 1_000_000
_BASE_TIMEOUT_S = 60.0
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: the mode of every file uploaded to a host (folders are made 0700 under `umask 077`)
PRIVATE_FILE_MODE = 0o600
_HEX = frozenset("0123456789abcdef")
# openssl uses the CPU's SHA instructions (about 6x coreutils' sha256sum); it is used when it
# is there and gives the right answer for empty input, else sha256sum
_SHA_PRELUDE = f"""\
if [ "$(printf '' | openssl dgst -sha256 -r 2>/dev/null | cut -c1-64)" = {_EMPTY_SHA256} ]; then
  mqi_sha() {{ openssl dgst -sha256 -r; }}
else
  mqi_sha() {{ sha256sum; }}
fi
"""


def transfer_timeout_s(size_bytes: int) -> float:
    """The deadline for moving one file: generous, but never unbounded."""
    return _BASE_TIMEOUT_S + size_bytes / MIN_RATE_BPS


def sha256_file(path: Path) -> str:
    """SHA-256 of a local file; blocking, so callers run it in a thread."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sftp_path(path: str) -> str:
    """A host path for SFTP, where relative paths start in the login's home directory."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


def _join(directory: str, rel: str) -> str:
    if not rel:
        return directory
    return directory.rstrip("/") + "/" + rel if directory != "/" else "/" + rel


def check_block_size(block_size: int) -> None:
    """-1 (the server's limit) or at most 255 KiB: larger writes kill OpenSSH's sftp-server."""
    if block_size != -1 and not 0 < block_size <= SFTP_MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be -1 or 1..{SFTP_MAX_BLOCK_SIZE}, not {block_size}")


def check_relative(rel: str) -> None:
    """A file name inside a transfer: relative, no `..`, no empty parts."""
    check_text(rel, "file name")
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a plain relative file name: {rel!r}")


@dataclass(frozen=True, slots=True)
class _LocalFile:
    rel: str
    path: Path
    size: int


class _Progress:
    """Sums per-file byte counts into one (done, total) callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self._callback = callback
        self._per_file: dict[str, int] = {}

    def add(self, n: int) -> None:
        self.done += n
        if self._callback is not None and n:
            self._callback(self.done, self.total)

    def file(self, rel: str, done: int) -> None:
        delta = done - self._per_file.get(rel, 0)
        self._per_file[rel] = done
        self.add(delta)

    def handler(self, rel: str) -> Callable[[bytes, bytes, int, int], None]:
        def on_progress(_src: bytes, _dst: bytes, done: int, _total: int) -> None:
            self.file(rel, done)

        return on_progress


def _scan(local_dir: Path) -> list[_LocalFile]:
    """Every regular file under local_dir with its size; blocking."""
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir} is not a directory")
    found: list[_LocalFile] = []
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            if not path.is_file() or name.endswith(PART_SUFFIX):
                continue
            rel = path.relative_to(local_dir).as_posix()
            found.append(_LocalFile(rel, path, path.stat().st_size))
    return found


def _hash_records(stdout: str, tag: str) -> dict[int, list[str]]:
    records: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == tag and fields[1].isdigit():
            digest = fields[-1]
            if len(digest) == 64 and set(digest) <= _HEX:
                records[int(fields[1])] = fields[2:]
    return records


def _survey_script(remote_dir: str, rels: Sequence[str], dirs: Sequence[str]) -> str:
    """mkdir the directories; print `MQIHASH <i> <size> <sha256>` per existing file."""
    mk = " ".join(quote_path(d) for d in dirs)
    words = " ".join(quote_path(_join(remote_dir, r)) for r in rels)
    lines = [f"mkdir -p -- {mk} || exit 3"] if dirs else []
    lines.append(_SHA_PRELUDE)
    if rels:
        lines += [
            "i=0",
            f"for f in {words}; do",
            '  if [ -f "$f" ]; then',
            '    s=$(wc -c < "$f") && h=$(mqi_sha < "$f") && printf "MQIHASH %s %s %s\\n" '
            '"$i" $s "${h%% *}"',
            "  fi",
            "  i=$((i+1))",
            "done",
        ]
    return "\n".join(lines) + "\n"


async def _survey(
    pool: SshPool, remote_dir: str, rels: Sequence[str], dirs: Sequence[str], hash_bytes: int
) -> dict[int, tuple[int, str]]:
    """Remote (size, sha256) of the files that exist, by index into rels.

    hash_bytes (how much the host may have to hash) only sizes the deadline.
    """
    found: dict[int, tuple[int, str]] = {}
    offset = 0
    dir_parts = chunks(dirs) or [[]]
    rel_parts = chunks(rels) or [[]]
    for n in range(max(len(dir_parts), len(rel_parts))):
        part_dirs = dir_parts[n] if n < len(dir_parts) else []
        part_rels = rel_parts[n] if n < len(rel_parts) else []
        if not part_dirs and not part_rels:
            continue
        result = await pool.run(
            sh_command(_survey_script(remote_dir, part_rels, part_dirs)),
            timeout_s=transfer_timeout_s(hash_bytes // 10),
        )
        if not result.ok:
            raise TransientError(
                "remote_command_failed",
                f"host {pool.name}: cannot prepare {remote_dir}: {result.stderr.strip()[-500:]}",
            )
        for i, fields in _hash_records(result.stdout, "MQIHASH").items():
            if len(fields) == 2 and fields[0].isdigit() and i < len(part_rels):
                found[offset + i] = (int(fields[0]), fields[1])
        offset += len(part_rels)
    return found


async def _remote_digest(pool: SshPool, path: str, timeout_s: float) -> tuple[int, str] | None:
    script = (
        _SHA_PRELUDE + f"f={quote_path(path)}\n"
        '[ -f "$f" ] || exit 0\n'
        's=$(wc -c < "$f") && h=$(mqi_sha < "$f") && printf "MQIHASH 0 %s %s\\n" $s "${h%% *}"\n'
    )
    result = await pool.run(sh_command(script), timeout_s=timeout_s)
    fields = _hash_records(result.stdout, "MQIHASH").get(0)
    if not result.ok or fields is None or len(fields) != 2 or not fields[0].isdigit():
        return None
    return int(fields[0]), fields[1]


async def _free_bytes(sftp: asyncssh.SFTPClient, path: str) -> int | None:
    try:
        attrs = await sftp.statvfs(sftp_path(path))
    except (asyncssh.SFTPOpUnsupported, asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure):
        return None
    return attrs.bavail * (attrs.frsize or attrs.bsize)


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The most telling error of a failed parallel transfer: host down, then named errors."""
    flat: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                flat.append(e)

    walk(group)
    for kind in (HostUnavailableError, MqiError):
        for e in flat:
            if isinstance(e, kind):
                return e
    return flat[0] if flat else group


async def _parallel(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run jobs at most `limit` at a time; the first failure cancels the rest and is raised."""
    if not jobs:
        return
    slots = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with slots:
            await job()

    try:
        async with asyncio.TaskGroup() as tg:
            for job in jobs:
                tg.create_task(one(job))
    except BaseExceptionGroup as group:
        raise first_error(group) from group


async def upload_tree(
    pool: SshPool,
    local_dir: Path,
    remote_dir: str,
    *,
    progress: ProgressCallback | None = None,
    max_parallel: int = DEFAULT_PARALLEL_FILES,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> TransferReport:
    """Upload every regular file under local_dir to remote_dir, verified and atomic per file.

    Files already on the host with the right SHA-256 are skipped, so an interrupted upload
    resumes where it stopped. Each file is written to `<name>.part`, its size and SHA-256 are
    checked with one remote hash run (the local hash is computed while it uploads), and only
    then is it renamed into place.

    Raises:
        HostUnavailableError: the host is down or the connection broke.
        TransientError: `disk_full`, `transfer_failed`, `transfer_verify_failed`,
            `remote_command_failed`, `remote_timeout`.
    """
    check_text(remote_dir, "remote_dir")
    check_block_size(block_size)
    try:
        files = await asyncio.to_thread(_scan, local_dir)
    except OSError as exc:
        raise TransientError("transfer_failed", f"cannot read {local_dir}: {exc}") from exc
    for f in files:
        check_relative(f.rel)
    dirs = sorted({remote_dir} | {_join(remote_dir, posixpath.dirname(f.rel)) for f in files})
    total = sum(f.size for f in files)
    remote = await _survey(pool, remote_dir, [f.rel for f in files], dirs, total)
    digests: dict[str, str] = {}
    # only a file of the right size on the host can be skipped; only those are hashed first
    maybe_done = {i: f for i, f in enumerate(files) if remote.get(i, (-1, ""))[0] == f.size}
    try:
        for f in maybe_done.values():
            digests[f.rel] = await asyncio.to_thread(sha256_file, f.path)
    except OSError as exc:
        raise TransientError("transfer_failed", f"cannot read {local_dir}: {exc}") from exc
    todo = [
        f
        for i, f in enumerate(files)
        if i not in maybe_done or remote[i] != (f.size, digests[f.rel])
    ]
    need = sum(f.size for f in todo)
    meter = _Progress(total, progress)
    meter.add(total - need)
    if todo:
        async with asyncio.timeout(_BASE_TIMEOUT_S), pool.sftp() as sftp:
            free = await _free_bytes(sftp, remote_dir)
        if free is not None and free < need:
            raise TransientError(
                "disk_full",
                f"host {pool.name}: {remote_dir} has {free} bytes free, {need} are needed",
            )

    async def send(f: _LocalFile) -> None:
        digests[f.rel] = await _upload_file(pool, f, _join(remote_dir, f.rel), meter, block_size)

    await _parallel([functools.partial(send, f) for f in todo], max(1, max_parallel))
    log.info(
        "host %s: uploaded %d files (%d bytes) to %s, %d already there",
        pool.name,
        len(todo),
        need,
        remote_dir,
        len(files) - len(todo),
    )
    return TransferReport(
        files_sent=len(todo),
        files_skipped=len(files) - len(todo),
        bytes_sent=need,
        sha256={f.rel: digests[f.rel] for f in files},
    )


async def _upload_file(
    pool: SshPool, f: _LocalFile, final: str, meter: _Progress, block_size: int
) -> str:
    """Send one file to `<final>.part`, verify it, rename it; returns its SHA-256."""
    part = final + PART_SUFFIX
    limit_s = transfer_timeout_s(f.size)
    try:
        async with asyncio.timeout(limit_s), asyncio.TaskGroup() as tg:
            # hashing the source in a thread while it uploads hides the hash's cost
            local_hash = tg.create_task(_hash_source(f.path))
            async with pool.sftp() as sftp:
                await _put(pool, sftp, f, part, meter, block_size)
                got = await _remote_digest(pool, part, limit_s)
                digest = await local_hash
                if got != (f.size, digest):
                    await _remove_quietly(sftp, part)
                    raise TransientError(
                        "transfer_verify_failed",
                        f"host {pool.name}: {final} arrived as {got}, expected "
                        f"{f.size} bytes with sha256 {digest}",
                    )
                try:
                    await sftp.posix_rename(sftp_path(part), sftp_path(final))
                except asyncssh.SFTPConnectionLost:
                    raise
                except asyncssh.SFTPError as exc:
                    raise TransientError(
                        "transfer_failed", f"host {pool.name}: cannot rename {part}: {exc.reason}"
                    ) from exc
    except TimeoutError as exc:
        raise TransientError(
            "transfer_failed", f"host {pool.name}: {final} did not finish in {limit_s:.0f} s"
        ) from exc
    except BaseExceptionGroup as group:
        raise first_error(group) from group
    return digest


async def _hash_source(path: Path) -> str:
    try:
        return await asyncio.to_thread(sha256_file, path)
    except OSError as exc:
        raise TransientError("transfer_failed", f"cannot read {path}: {exc}") from exc


async def _put(
    pool: SshPool,
    sftp: asyncssh.SFTPClient,
    f: _LocalFile,
    part: str,
    meter: _Progress,
    block_size: int,
) -> None:
    try:
        await sftp.put(
            str(f.path),
            sftp_path(part),
            block_size=block_size,
            sparse=False,
            progress_handler=meter.handler(f.rel),
        )
        # sftp-server creates files under the login umask (often 022); patient data is 0600
        await sftp.chmod(sftp_path(part), PRIVATE_FILE_MODE)
    except (asyncssh.SFTPNoSpaceOnFilesystem, asyncssh.SFTPQuotaExceeded) as exc:
        raise TransientError("disk_full", f"host {pool.name}: no space for {part}") from exc
    except asyncssh.SFTPConnectionLost:
        raise
    except asyncssh.SFTPError as exc:
        # OpenSSH's sftp-server reports ENOSPC as a plain "Failure"; ask the filesystem
        free = await _free_bytes(sftp, posixpath.dirname(part) or "/")
        if free is not None and free < f.size:
            raise TransientError("disk_full", f"host {pool.name}: no space for {part}") from exc
        raise TransientError(
            "transfer_failed", f"host {pool.name}: writing {part}: {exc.reason}"
        ) from exc
    except ConnectionError:
        raise
    except OSError as exc:
        raise TransientError("transfer_failed", f"cannot read {f.path}: {exc}") from exc


async def _remove_quietly(sftp: asyncssh.SFTPClient, path: str) -> None:
    try:
        await sftp.remove(sftp_path(path))
    except asyncssh.SFTPError as exc:
        if isinstance(exc, asyncssh.SFTPConnectionLost):
            raise
        log.debug("could not remove %s: %s", path, exc)


def _local_state(path: Path) -> tuple[int, str] | None:
    """(size, sha256) of a local file, or None when missing; blocking."""
    try:
        if not path.is_file():
            return None
        return path.stat().st_size, sha256_file(path)
    except FileNotFoundError:
        return None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("could not remove %s: %s", path, exc)


def _local_error(exc: OSError, path: Path) -> TransientError:
    if exc.errno in _DISK_FULL_ERRNOS:
        return TransientError("disk_full", f"local disk full writing {path}")
    return TransientError("transfer_failed", f"cannot write {path}: {exc}")


async def download_files(
    pool: SshPool,
    remote_dir: str,
    names: Sequence[str],
    local_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    max_parallel: int = DEFAULT_PARALLEL_FILES,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> TransferReport:
    """Download named files of remote_dir into local_dir, verified and atomic per file.

    The remote SHA-256 of every file comes from one remote hash run, which works while the
    files download; each local `.part` is hashed and renamed only when both hashes and the
    size match. Files already present locally with the right hash are skipped.

    Raises:
        HostUnavailableError: the host is down or the connection broke.
        TransientError: `disk_full` (local ENOSPC), `transfer_failed` (also a missing remote
            file), `transfer_verify_failed`, `remote_command_failed`, `remote_timeout`.
    """
    check_text(remote_dir, "remote_dir")
    check_block_size(block_size)
    for name in names:
        check_relative(name)
    unique = list(dict.fromkeys(names))
    try:
        async with asyncio.TaskGroup() as tg:
            # sizes are unknown until stat; the deadline allows hashing 10 GiB
            survey = tg.create_task(_survey(pool, remote_dir, unique, [], 10 * 2**30))
            return await _download(
                pool, remote_dir, unique, local_dir, survey, progress, max_parallel, block_size
            )
    except BaseExceptionGroup as group:
        raise first_error(group) from group


async def _remote_sizes(pool: SshPool, paths: Sequence[str]) -> dict[int, int]:
    """Sizes of the regular files among paths, by index; missing ones are left out."""
    sizes: dict[int, int] = {}
    async with asyncio.timeout(_BASE_TIMEOUT_S), pool.sftp() as sftp:
        for i, path in enumerate(paths):
            try:
                attrs = await sftp.stat(sftp_path(path))
            except asyncssh.SFTPNoSuchFile:
                continue
            except asyncssh.SFTPConnectionLost:
                raise
            except asyncssh.SFTPError as exc:
                raise TransientError(
                    "transfer_failed", f"host {pool.name}: cannot stat {path}: {exc.reason}"
                ) from exc
            if attrs.permissions is not None and stat.S_ISREG(attrs.permissions):
                sizes[i] = attrs.size or 0
    return sizes


async def _download(
    pool: SshPool,
    remote_dir: str,
    unique: list[str],
    local_dir: Path,
    survey: asyncio.Task[dict[int, tuple[int, str]]],
    progress: ProgressCallback | None,
    max_parallel: int,
    block_size: int,
) -> TransferReport:
    sizes = await _remote_sizes(pool, [_join(remote_dir, n) for n in unique])
    missing = [n for i, n in enumerate(unique) if i not in sizes]
    if missing:
        raise TransientError(
            "transfer_failed",
            f"host {pool.name}: missing in {remote_dir}: {', '.join(missing[:5])}",
        )
    try:
        local_sizes = await asyncio.to_thread(
            lambda: [
                p.stat().st_size if p.is_file() else -1 for p in (local_dir / n for n in unique)
            ]
        )
        maybe_done = [i for i in range(len(unique)) if local_sizes[i] == sizes[i]]
        local = {
            i: await asyncio.to_thread(_local_state, local_dir / unique[i]) for i in maybe_done
        }
    except OSError as exc:
        raise TransientError("transfer_failed", f"cannot read {local_dir}: {exc}") from exc
    remote = await survey if maybe_done else {}
    todo = [i for i in range(len(unique)) if i not in local or local[i] != remote.get(i)]
    total = sum(sizes.values())
    need = sum(sizes[i] for i in todo)
    meter = _Progress(total, progress)
    meter.add(total - need)
    if todo:
        try:
            await asyncio.to_thread(local_dir.mkdir, parents=True, exist_ok=True)
            free = (await asyncio.to_thread(shutil.disk_usage, local_dir)).free
        except OSError as exc:
            raise _local_error(exc, local_dir) from exc
        if free < need:
            raise TransientError(
                "disk_full", f"local disk: {local_dir} has {free} bytes free, {need} are needed"
            )

    async def fetch(i: int) -> None:
        await _download_file(
            pool,
            _join(remote_dir, unique[i]),
            local_dir / unique[i],
            sizes[i],
            functools.partial(_expected, survey, i),
            meter,
            block_size,
        )

    await _parallel([functools.partial(fetch, i) for i in todo], max(1, max_parallel))
    remote = await survey
    log.info(
        "host %s: downloaded %d files (%d bytes) from %s, %d already here",
        pool.name,
        len(todo),
        need,
        remote_dir,
        len(unique) - len(todo),
    )
    return TransferReport(
        files_sent=len(todo),
        files_skipped=len(unique) - len(todo),
        bytes_sent=need,
        sha256={n: remote[i][1] for i, n in enumerate(unique) if i in remote},
    )


async def _expected(
    survey: asyncio.Task[dict[int, tuple[int, str]]], i: int
) -> tuple[int, str] | None:
    return (await survey).get(i)


async def _download_file(
    pool: SshPool,
    source: str,
    target: Path,
    size: int,
    expected: Callable[[], Awaitable[tuple[int, str] | None]],
    meter: _Progress,
    block_size: int,
) -> None:
    part = target.with_name(target.name + PART_SUFFIX)
    limit_s = transfer_timeout_s(size)
    renamed = False
    try:
        async with asyncio.timeout(limit_s):
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            async with pool.sftp() as sftp:
                try:
                    await sftp.get(
                        sftp_path(source),
                        str(part),
                        block_size=block_size,
                        sparse=False,
                        progress_handler=meter.handler(target.name),
                    )
                except asyncssh.SFTPConnectionLost:
                    raise
                except asyncssh.SFTPError as exc:
                    raise TransientError(
                        "transfer_failed", f"host {pool.name}: reading {source}: {exc.reason}"
                    ) from exc
            got = await asyncio.to_thread(_local_state, part)
            want = await expected()
            if want is None or got != want:
                raise TransientError(
                    "transfer_verify_failed",
                    f"host {pool.name}: {source} arrived as {got}, the host has {want}",
                )
            await asyncio.to_thread(os.replace, part, target)
            renamed = True
    except TimeoutError as exc:
        raise TransientError(
            "transfer_failed", f"host {pool.name}: {source} did not finish in {limit_s:.0f} s"
        ) from exc
    except OSError as exc:
        raise _local_error(exc, target) from exc
    finally:
        if not renamed:
            # never leave a partial file that a later step could mistake for output
            await asyncio.shield(asyncio.to_thread(_unlink_quietly, part))
