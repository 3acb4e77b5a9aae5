"""Where a case's files live, locally under work_directory and remotely under remote_root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mqi_async.domain.records import BeamRow, CaseRow


@dataclass(frozen=True, slots=True)
class CaseDirs:
    """Local folders of one case (the scan directory itself is never written)."""

    root: Path

    @classmethod
    def of(cls, work_directory: Path, case: CaseRow) -> CaseDirs:
        return cls(work_directory / case.safe_name)

    @property
    def csv(self) -> Path:
        """Interpreter output: plan/ (the RTPLAN) and log/ (fluence CSVs per beam)."""
        return self.root / "csv"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def dose(self) -> Path:
        return self.root / "dose"

    def beam_stem(self, beam: BeamRow) -> str:
        return f"beam_{beam.beam_index}"

    def attempt(self, beam: BeamRow, attempt: int) -> Path:
        return self.root / "runs" / self.beam_stem(beam) / f"attempt_{attempt}"


@dataclass(frozen=True, slots=True)
class RemoteDirs:
    """Folders on a host: remote_root/<key>/inputs and remote_root/<key>/<beam>/<attempt>.

    `<key>` is the case's opaque key (domain.privacy.case_key), never its id: other users of
    a host see folder names and command lines.
    """

    case_root: PurePosixPath
    beam_stem: str

    @classmethod
    def of(cls, remote_root: str, case_key: str, beam: BeamRow) -> RemoteDirs:
        return cls(PurePosixPath(remote_root) / case_key, f"beam_{beam.beam_index}")

    @property
    def inputs(self) -> str:
        return str(self.case_root / "inputs")

    @property
    def plan(self) -> str:
        return str(self.case_root / "inputs" / "plan")

    @property
    def logs(self) -> str:
        return str(self.case_root / "inputs" / "log")

    def attempt(self, attempt: int, token: str) -> str:
        """`<attempt>-<token>`: the token keeps a new database from adopting an old run's folder."""
        return str(self.case_root / self.beam_stem / f"{attempt}-{token}")
