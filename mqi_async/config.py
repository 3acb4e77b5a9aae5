"""The service's settings: config.yaml plus `MQI_<SECTION>__<KEY>` environment overrides, strictly checked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mqi_async.domain.delivery_log import DEFAULT_CALIBRATION, DEFAULT_MU_PER_COUNT
from mqi_async.domain.errors import ConfigError

PositiveSeconds = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
ArgvTemplate = list[str]

#: keys computed per beam; a `moqui:` entry with one of these names is an error
COMPUTED_TPS_KEYS = frozenset(
    {
        "gpuid",
        "parentdir",
        "dicomdir",
        "dicompath",
        "logfilepath",
        "outputdir",
        "beamnumbers",
        "gantrynum",
    }
)


#: `known_hosts: ignore` turns host key checks off (shown as UNVERIFIED in `status`)
IGNORE_HOST_KEYS = "ignore"
#: the most SSH channels a host may be given (`max_sessions`)
MAX_SESSIONS_CAP = 64


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSettings(_Section):
    ready_marker: str = "_CASE_READY"
    force_polling: bool = False
    rescan_seconds: PositiveSeconds = 60
    fraction_window_minutes: Annotated[float, Field(ge=0)] = 60
    #: polling interval when polling (network shares); milliseconds
    poll_delay_ms: Annotated[int, Field(ge=10, le=60_000)] = 300
    #: an RTPLAN above this size fails its case (`rtplan_too_large`); other DICOM files
    #: (CT, images) are never read past their header
    max_rtplan_mb: Annotated[int, Field(ge=1, le=4096)] = 64


class _HostBase(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    moqui_command: list[str] | str | None = None
    nvidia_smi_command: str = "nvidia-smi"
    #: GPUs this service may use on the host, by index; None = all
    gpu_indices: list[int] | None = None

    @field_validator("moqui_command")
    @classmethod
    def _argv(cls, v: list[str] | str | None) -> list[str] | None:
        # a plain string is one executable path, never a shell command line
        if isinstance(v, str):
            return [v]
        if v is not None and not v:
            raise ValueError("must not be empty")
        return v


class SimulatedHostSettings(_HostBase):
    kind: Literal["simulated"]
    gpus: Annotated[int, Field(ge=1, le=64)] = 4
    #: seconds the MOQUI simulator runs per beam
    run_seconds: Annotated[float, Field(ge=0)] = 3.0
    gpu_memory_mb: Annotated[int, Field(ge=1)] = 24576


class LocalHostSettings(_HostBase):
    kind: Literal["local"]
    remote_root: Path = Path("data/runs")


class _SshFields(_HostBase):
    address: Annotated[str, Field(min_length=1)]
    port: Port = 22
    username: str | None = None
    client_keys: list[Path] | None = None
    passphrase: SecretStr | None = None
    password: SecretStr | None = None
    #: a path, or the string "ignore" to disable host key checks (logged loudly)
    known_hosts: str | None = "~/.ssh/known_hosts"
    remote_root: Annotated[str, Field(min_length=1)]
    #: channels open at once; OpenSSH's MaxSessions defaults to 10 (MAX_SESSIONS_CAP at most)
    max_sessions: Annotated[int, Field(ge=1)] = 8
    connect_timeout_seconds: PositiveSeconds = 15
    command_timeout_seconds: PositiveSeconds = 60
    keepalive_seconds: PositiveSeconds = 15

    @field_validator("max_sessions")
    @classmethod
    def _sessions_cap(cls, v: int) -> int:
        if v > MAX_SESSIONS_CAP:
            raise ValueError(
                f"at most {MAX_SESSIONS_CAP}; keep it below the server's MaxSessions"
                " (sshd_config, default 10): a channel beyond it is refused"
            )
        return v

    @field_validator("remote_root")
    @classmethod
    def _absolute_remote_root(cls, v: str) -> str:
        if not v.startswith(("/", "~")):
            raise ValueError("must be an absolute path on the host (or start with ~)")
        return v


class SshHostSettings(_SshFields):
    kind: Literal["ssh"]


class SlurmHostSettings(_SshFields):
    kind: Literal["slurm"]
    partition: str | None = None
    gres: str | None = None
    sbatch_args: list[str] = []
    max_jobs: Annotated[int, Field(ge=1)] = 16
    time_limit: str = "02:00:00"


HostSettings = Annotated[
    SimulatedHostSettings | LocalHostSettings | SshHostSettings | SlurmHostSettings,
    Field(discriminator="kind"),
]


class ToolsSettings(_Section):
    #: argv list with {case_dir} {csv_dir}; None = the bundled simulator
    interpreter: ArgvTemplate | None = None
    interpreter_timeout_seconds: PositiveSeconds = 1800
    #: "builtin" or an argv list with {input} {output_dir}
    raw_to_dicom: Literal["builtin"] | ArgvTemplate = "builtin"
    raw_to_dicom_timeout_seconds: PositiveSeconds = 600
    #: argv list run once per completed case; {case_dir} {work_dir} {dose_dir} {case_id}
    postprocess: ArgvTemplate | None = None
    postprocess_timeout_seconds: PositiveSeconds = 1800
    #: concurrent local CPU tools; None = the CPU count
    max_concurrent: Annotated[int, Field(ge=1)] | None = None

    @field_validator("interpreter", "postprocess")
    @classmethod
    def _non_empty(cls, v: ArgvTemplate | None) -> ArgvTemplate | None:
        if v is not None and not v:
            raise ValueError("must be null or a non-empty argv list")
        return v


class GpuSettings(_Section):
    poll_seconds: PositiveSeconds = 10
    min_free_memory_mb: Annotated[int, Field(ge=0)] = 1000
    allocation: Literal["per_beam", "all_gpus"] = "per_beam"
    #: a sample older than this many poll intervals is stale: its GPUs are not free
    stale_after_polls: Annotated[float, Field(ge=1)] = 3


class RunsSettings(_Section):
    poll_seconds: PositiveSeconds = 1
    timeout_seconds: PositiveSeconds = 7200


class RetrySettings(_Section):
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    backoff_initial_seconds: Annotated[float, Field(ge=0)] = 5
    backoff_max_seconds: Annotated[float, Field(ge=0)] = 300


class UiSettings(_Section):
    refresh_hz: Annotated[float, Field(gt=0, le=30)] = 2


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    directory: Path = Path("data/logs")
    max_file_mb: Annotated[int, Field(ge=1)] = 20
    backup_count: Annotated[int, Field(ge=0)] = 5
    #: for logs shipped off the hospital's systems: case ids (patient ids) in log lines are
    #: replaced by the opaque case key the hosts see
    redact_patient_ids: bool = False

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class RetentionSettings(_Section):
    """What is deleted, and when; the scan directory never is."""

    #: a finished beam's attempt folder on its host goes once its dose is downloaded and
    #: converted; a failed attempt's folder stays this many days for diagnosis
    remote_failed_days: Annotated[float, Field(ge=0)] = 7
    #: days a finished case's folder under work_directory is kept; null keeps it forever
    work_days: Annotated[float, Field(ge=0)] | None = None
    #: how often retention looks for what to remove
    sweep_seconds: Annotated[float, Field(gt=0)] = 600


class GammaCriteriaSettings(_Section):
    """Criteria of the 3-D dose gamma (qa.gamma)."""

    dose_percent: Annotated[float, Field(gt=0)] = 3.0
    distance_mm: Annotated[float, Field(gt=0)] = 3.0
    cutoff_percent: Annotated[float, Field(ge=0, lt=100)] = 10.0
    normalisation: Literal["global", "local"] = "global"
    max_gamma: Annotated[float, Field(gt=0, le=25)] = 2.0


class DeliveryGammaSettings(_Section):
    """Criteria of the per-layer 2-D fluence gamma of the delivery check (qa.delivery_gamma)."""

    dose_percent: Annotated[float, Field(gt=0)] = 2.0
    distance_mm: Annotated[float, Field(gt=0)] = 2.0
    cutoff_percent: Annotated[float, Field(ge=0, lt=100)] = 10.0


Room = Literal["G1", "G2"]


class CalibrationSettings(_Section):
    """A room's record position calibration: mm = (raw - offset) x gain (scv_init keys)."""

    x_offset: float
    y_offset: float
    x_gain_mm: Annotated[float, Field(gt=0)]
    y_gain_mm: Annotated[float, Field(gt=0)]
    time_gain_ms: Annotated[float, Field(gt=0)]


def _default_calibration() -> dict[Room, CalibrationSettings]:
    return {
        "G1": CalibrationSettings(**DEFAULT_CALIBRATION["G1"].as_fields()),
        "G2": CalibrationSettings(**DEFAULT_CALIBRATION["G2"].as_fields()),
    }


def _default_mu_per_count() -> dict[Room, float]:
    return {"G1": DEFAULT_MU_PER_COUNT["G1"], "G2": DEFAULT_MU_PER_COUNT["G2"]}


class DeliveryCheckSettings(_Section):
    """How each delivery's spot record is read and judged against the plan (qa.delivery)."""

    #: false: deliveries are not checked (each is `skipped`, reason delivery_check_off)
    enabled: bool = True
    #: used where the case ships no scv_init_G1.txt / scv_init_G2.txt
    calibration: dict[Room, CalibrationSettings] = Field(default_factory=_default_calibration)
    #: MU per dose monitor count (after the range factor), by room
    mu_per_count: dict[Room, Annotated[float, Field(gt=0)]] = Field(
        default_factory=_default_mu_per_count
    )
    #: the fluence maps' grid spacing
    grid_mm: Annotated[float, Field(gt=0, le=5)] = 1.0
    #: spot FWHM where the plan gives no ScanningSpotSize
    default_spot_fwhm_mm: Annotated[float, Field(gt=0, le=50)] = 8.0
    #: a layer whose spots lie further than this from the plan on average is named
    position_tolerance_mm: Annotated[float, Field(gt=0)] = 1.0
    #: a layer whose meterset differs more than this is named
    meterset_tolerance_percent: Annotated[float, Field(gt=0)] = 2.0
    #: one delivery's check must finish within this (a stuck check is stopped and retried)
    timeout_seconds: PositiveSeconds = 300

    @field_validator("calibration", mode="after")
    @classmethod
    def _calibration_per_room(
        cls, v: dict[Room, CalibrationSettings]
    ) -> dict[Room, CalibrationSettings]:
        # a room given in the config replaces that room only; the other keeps its default
        return {**_default_calibration(), **v}

    @field_validator("mu_per_count", mode="after")
    @classmethod
    def _mu_per_room(cls, v: dict[Room, float]) -> dict[Room, float]:
        return {**_default_mu_per_count(), **v}


class QaSettings(_Section):
    """The dose checks: what the delivered dose is compared with, and the verdict thresholds."""

    reference: Literal["planned_mc", "tps_dose", "none"] = "planned_mc"
    gamma: GammaCriteriaSettings = GammaCriteriaSettings()
    delivery_gamma: DeliveryGammaSettings = DeliveryGammaSettings()
    delivery: DeliveryCheckSettings = DeliveryCheckSettings()
    #: passed at or above this gamma pass rate (percent)
    pass_percent: Annotated[float, Field(ge=0, le=100)] = 95.0
    #: conditional at or above this, else failed
    conditional_percent: Annotated[float, Field(ge=0, le=100)] = 80.0
    #: a PDF and an HTML report per case when its checks finish
    report: bool = True

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> QaSettings:
        if self.conditional_percent > self.pass_percent:
            raise ValueError("conditional_percent must not exceed pass_percent")
        return self


class NotifyRateLimitSettings(_Section):
    """At most `max_messages` per `per_minutes` on each channel; the rest in one digest."""

    max_messages: Annotated[int, Field(ge=1)] = 10
    per_minutes: Annotated[float, Field(gt=0)] = 60


class WebhookSettings(_Section):
    """A JSON POST per message (Slack, Mattermost and Teams show its `text`)."""

    #: a secret: incoming-webhook URLs carry their token (masked by check-config)
    url: SecretStr
    timeout_seconds: PositiveSeconds = 10
    #: extra request headers, e.g. Authorization (masked by check-config)
    headers: dict[str, SecretStr] = {}

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


MailAddress = Annotated[str, Field(pattern=r"^[^\s@<>,]+@[^\s@<>,]+$")]


class EmailSettings(_Section):
    """SMTP with STARTTLS; the certificate is verified against the system's CAs (or ca_file)."""

    host: Annotated[str, Field(min_length=1)]
    port: Port = 587
    #: false only for a relay on this machine: without it nothing is encrypted
    starttls: bool = True
    username: str | None = None
    password: SecretStr | None = None
    sender: MailAddress
    recipients: Annotated[list[MailAddress], Field(min_length=1)]
    timeout_seconds: PositiveSeconds = 30
    #: a CA certificate (PEM, absolute path) to trust besides the system's, e.g. a hospital CA
    ca_file: Path | None = None

    @field_validator("ca_file")
    @classmethod
    def _absolute_ca(cls, v: Path | None) -> Path | None:
        if v is not None and not v.expanduser().is_absolute():
            raise ValueError("must be an absolute path")
        return v.expanduser() if v is not None else None

    @model_validator(mode="after")
    def _login_needs_tls(self) -> EmailSettings:
        if self.username is not None and not self.starttls:
            raise ValueError("a username (login) needs starttls: true")
        return self


class NotifySettings(_Section):
    """Notices to people: failed cases, conditional or failed checks, long host pauses and
    unexpected stops; never patient names (README "Notifications")."""

    enabled: bool = False
    #: how often the store is read for changes
    poll_seconds: PositiveSeconds = 5
    #: a host paused this long is announced (once per pause)
    host_paused_minutes: Annotated[float, Field(ge=0)] = 15
    #: false: a case is named by its case key only (case ids are patient ids here)
    include_patient_id: bool = False
    rate_limit: NotifyRateLimitSettings = NotifyRateLimitSettings()
    #: tries after the first failed one, per message and channel
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    retry_backoff_seconds: PositiveSeconds = 5
    #: notices waiting per channel; beyond it the oldest are folded into the next digest
    queue_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    webhook: WebhookSettings | None = None
    email: EmailSettings | None = None

    @model_validator(mode="after")
    def _a_channel(self) -> NotifySettings:
        if self.enabled and self.webhook is None and self.email is None:
            raise ValueError("enabled needs a webhook or an email section")
        return self


#: `scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`, as `python -m mqi_async.web.hash_token` prints
_SECRET_HASH = r"^scrypt\$\d{1,2}\$\d{1,2}\$\d{1,2}\$[A-Za-z0-9+/=_-]{16,}\$[A-Za-z0-9+/=_-]{16,}$"
WebName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")]


def _check_secret_hash(v: SecretStr) -> SecretStr:
    if not re.fullmatch(_SECRET_HASH, v.get_secret_value()):
        raise ValueError(
            "must be a hash made by `python -m mqi_async.web.hash_token` (scrypt$...),"
            " never the token or password itself"
        )
    return v


class WebTokenSettings(_Section):
    """An API or login token: its holder's name and the token's hash (never the token)."""

    name: WebName
    hash: SecretStr

    @field_validator("hash")
    @classmethod
    def _hashed(cls, v: SecretStr) -> SecretStr:
        return _check_secret_hash(v)


class WebUserSettings(_Section):
    """A person who may log in with a password (stored as its hash)."""

    name: WebName
    password_hash: SecretStr

    @field_validator("password_hash")
    @classmethod
    def _hashed(cls, v: SecretStr) -> SecretStr:
        return _check_secret_hash(v)


class WebSettings(_Section):
    """The web view and /metrics in the service's own process (README "Web view and metrics")."""

    enabled: bool = False
    #: 127.0.0.1: this machine only; 0.0.0.0 inside a container (its port published)
    bind: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Port = 8470
    #: how often open pages fetch fresh rows
    refresh_seconds: Annotated[float, Field(ge=0.5, le=3600)] = 5
    #: who may retry, cancel and re-run checks; with neither, the view is read-only
    tokens: list[WebTokenSettings] = []
    users: list[WebUserSettings] = []
    #: true: every page (not /metrics or /healthz) needs a sign-in, since case ids are
    #: patient ids; false: anyone who reaches the port sees the cases
    login_to_view: bool = False
    #: a login lasts this long
    session_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 12
    #: requests served per second at most, all clients together (the engine shares the loop);
    #: more wait their turn, and get 503 past a few seconds
    max_requests_per_second: Annotated[float, Field(gt=0, le=10_000)] = 20
    #: true behind an HTTPS reverse proxy: the session cookie is sent over HTTPS only
    cookie_secure: bool = False
    #: the origin people use behind a reverse proxy (https://mqi.hospital.example), checked
    #: against a form's Origin; empty: the Host the browser asked for
    public_origin: str = ""

    @model_validator(mode="after")
    def _unique_names(self) -> WebSettings:
        names = [t.name for t in self.tokens] + [u.name for u in self.users]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"token and user names must be unique: {', '.join(dupes)}")
        return self


def default_moqui() -> dict[str, str | int | float | bool]:
    return {
        "RandomSeed": -1932780356,
        "UseAbsolutePath": False,
        "TotalThreads": -1,
        "MaxHistoriesPerBatch": 10000000,
        "UsingPhantomGeo": True,
        "TwoCentimeterMode": False,
        "PhantomDimX": 100,
        "PhantomDimY": 100,
        "PhantomDimZ": 100,
        "PhantomUnitX": 1,
        "PhantomUnitY": 1,
        "PhantomUnitZ": 1,
        "PhantomPositionX": -50,
        "PhantomPositionY": -50,
        "PhantomPositionZ": -50,
        "Scorer": "Dose",
        "SupressStd": True,
        "ReadStructure": False,
        "BodyContourName": "External",
        "SourceType": "FluenceMap",
        "SimulationType": "perBeam",
        "ParticlesPerHistory": 1,
        "ScoreToCTGrid": True,
        "OutputFormat": "raw",
        "OverwriteResults": False,
    }


def _default_hosts() -> list[HostSettings]:
    return [SimulatedHostSettings(kind="simulated", name="sim")]


class Settings(BaseSettings):
    """The whole configuration; built by `load_settings`, frozen afterwards."""

    model_config = SettingsConfigDict(
        env_prefix="MQI_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    scan_directory: Path = Path("data/incoming")
    work_directory: Path = Path("data/work")
    database: Path = Path("data/mqi.db")
    ingest: IngestSettings = IngestSettings()
    hosts: list[HostSettings] = Field(default_factory=_default_hosts)
    tools: ToolsSettings = ToolsSettings()
    gpu: GpuSettings = GpuSettings()
    runs: RunsSettings = RunsSettings()
    moqui: dict[str, str | int | float | bool] = Field(default_factory=default_moqui)
    retry: RetrySettings = RetrySettings()
    ui: UiSettings = UiSettings()
    logging: LoggingSettings = LoggingSettings()
    retention: RetentionSettings = RetentionSettings()
    qa: QaSettings = QaSettings()
    notify: NotifySettings = NotifySettings()
    web: WebSettings = WebSettings()

    #: folder of the config file; relative paths were resolved against it
    config_dir: Path = Field(default=Path("."), exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the YAML file arrives as init kwargs; environment variables override it
        return (env_settings, init_settings)

    @field_validator("hosts")
    @classmethod
    def _unique_hosts(cls, v: list[HostSettings]) -> list[HostSettings]:
        names = [h.name for h in v]
        if not v:
            raise ValueError("at least one host is needed")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"host names must be unique: {', '.join(dupes)}")
        return v

    @field_validator("moqui")
    @classmethod
    def _moqui_keys(
        cls, v: dict[str, str | int | float | bool]
    ) -> dict[str, str | int | float | bool]:
        for key, value in v.items():
            if not key or any(c.isspace() or c == "#" for c in key):
                raise ValueError(f"{key!r}: a key must be one word without '#'")
            if key.lower() in COMPUTED_TPS_KEYS:
                raise ValueError(f"{key}: computed per beam by the service; remove it")
            # MOQUI aborts on an empty value and cuts everything after '#'
            text = str(value)
            if not text.strip() or "#" in text or "\n" in text or "\r" in text:
                raise ValueError(f"{key}: value must be non-empty, one line, without '#'")
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> Settings:
        if self.retry.backoff_max_seconds < self.retry.backoff_initial_seconds:
            raise ValueError("retry.backoff_max_seconds must be >= retry.backoff_initial_seconds")
        return self

    @property
    def lock_path(self) -> Path:
        return self.database.with_name(self.database.name + ".lock")


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    skip_next_kind = False
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            skip_next_kind = True
            continue
        if skip_next_kind and item in ("simulated", "local", "ssh", "slurm"):
            # pydantic puts the discriminator tag in the location; users never wrote it
            skip_next_kind = False
            continue
        skip_next_kind = False
        parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        path = _loc_to_path(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            lines.append(f"{path}: {err['msg']}")
    return lines


def _resolve(path: Path, base: Path) -> Path:
    p = path.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _resolve_paths(s: Settings, base: Path) -> Settings:
    hosts: list[HostSettings] = []
    for h in s.hosts:
        if isinstance(h, LocalHostSettings):
            hosts.append(h.model_copy(update={"remote_root": _resolve(h.remote_root, base)}))
        elif isinstance(h, SshHostSettings | SlurmHostSettings):
            update: dict[str, Any] = {}
            if h.client_keys is not None:
                update["client_keys"] = [_resolve(k, base) for k in h.client_keys]
            if h.known_hosts not in (None, "ignore"):
                update["known_hosts"] = str(_resolve(Path(h.known_hosts), base))
            hosts.append(h.model_copy(update=update))
        else:
            hosts.append(h)
    return s.model_copy(
        update={
            "scan_directory": _resolve(s.scan_directory, base),
            "work_directory": _resolve(s.work_directory, base),
            "database": _resolve(s.database, base),
            "logging": s.logging.model_copy(
                update={"directory": _resolve(s.logging.directory, base)}
            ),
            "hosts": hosts,
            "config_dir": base,
        }
    )


def load_settings(path: Path | None) -> Settings:
    """Read, validate and resolve the config; raise ConfigError listing every problem.

    `path=None` uses the defaults (and the environment) with paths relative to the cwd.
    """
    data: Any = {}
    base = Path.cwd()
    if path is not None:
        path = path.expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read the config file ({exc.strerror})"]) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML ({exc})".replace("\n", " ")]) from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of keys"])
        base = path.resolve().parent
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc)) from exc
    except (ValueError, TypeError) as exc:
        # e.g. an environment override that is not valid JSON for a complex key
        raise ConfigError([f"environment: {exc}".replace("\n", " ")]) from exc
    return _resolve_paths(settings, base)


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "********" if value.get_secret_value() else ""
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret masked, for check-config and logs."""
    raw = settings.model_dump(mode="python", exclude={"config_dir"})
    return dict(_mask(raw))
