"""The `mqi-async` command line: run, demo, status, retry, cancel, check-config, gamma."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mqi_async import __version__
from mqi_async.config import IGNORE_HOST_KEYS, Settings, effective_config, load_settings
from mqi_async.domain.errors import ConfigError, DatabaseError, MqiError, failure_info

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mqi-async",
        description="Log-based Monte Carlo dose checks for proton therapy, hands-off.",
    )
    p.add_argument("--version", action="version", version=f"mqi-async {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c",
            "--config",
            type=Path,
            default=Path("config.yaml"),
            help="config file (default: ./config.yaml)",
        )

    run = sub.add_parser("run", help="run the service (TUI, or JSON logs with --no-ui)")
    with_config(run)
    run.add_argument("--no-ui", action="store_true", help="headless: JSON log lines on stdout")

    demo = sub.add_parser("demo", help="run the service on a simulated GPU host with sample cases")
    demo.add_argument("--workdir", type=Path, default=None, help="folder for the demo's data")
    demo.add_argument("--cases", type=int, default=4, help="number of sample cases (default 4)")
    demo.add_argument("--beams", type=int, default=3, help="treatment beams per case (default 3)")
    demo.add_argument("--gpus", type=int, default=4, help="simulated GPUs (default 4)")
    demo.add_argument(
        "--clean",
        action="store_true",
        help="deliver every case faithfully (default: a mix of delivery errors to check)",
    )
    demo.add_argument("--no-ui", action="store_true", help="headless: JSON log lines on stdout")
    demo.add_argument(
        "--web",
        type=int,
        metavar="PORT",
        default=None,
        help="also serve the web view on http://127.0.0.1:PORT/ (sign-in token in WORKDIR/web-token)",
    )
    demo.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop when every case has finished; exit 0 only if all completed",
    )

    status = sub.add_parser("status", help="cases and beams from the database")
    with_config(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    for name, what in (
        ("retry", "retry a case"),
        ("cancel", "cancel a case"),
        ("recheck", "run a case's dose and delivery checks again (and rebuild its report)"),
    ):
        sp = sub.add_parser(name, help=f"ask the running (or next) service to {what}")
        sp.add_argument("case_id", metavar="CASE_ID")
        with_config(sp)

    report = sub.add_parser(
        "report", help="(re)build a case's report (PDF and HTML) and print their paths"
    )
    report.add_argument("case_id", metavar="CASE_ID")
    with_config(report)
    report.add_argument("--json", action="store_true", help="one JSON line: paths and verdict")

    check = sub.add_parser("check-config", help="validate the config; print it, secrets masked")
    with_config(check)

    gamma = sub.add_parser(
        "gamma",
        help="gamma index of an evaluated RT Dose against a reference RT Dose",
        description="Gamma index of EVALUATED (interpolated) against REFERENCE (its points are "
        "evaluated); both RT Dose files in one frame of reference, any grids. Exit 0 with the "
        "result, 2 with a named code when the files cannot be compared.",
    )
    gamma.add_argument("reference", metavar="REFERENCE", type=Path, help="reference RT Dose")
    gamma.add_argument("evaluated", metavar="EVALUATED", type=Path, help="evaluated RT Dose")
    gamma.add_argument(
        "--dose-percent",
        type=_positive,
        default=3.0,
        help="dose criterion, %% of the reference maximum (of the local dose with --local); default 3",
    )
    gamma.add_argument(
        "--distance-mm", type=_positive, default=3.0, help="distance criterion in mm; default 3"
    )
    gamma.add_argument(
        "--cutoff-percent",
        type=_non_negative,
        default=10.0,
        help="reference points below this %% of the reference maximum are not evaluated; default 10",
    )
    gamma.add_argument("--local", action="store_true", help="local instead of global gamma")
    gamma.add_argument(
        "--max-gamma",
        type=_positive,
        default=2.0,
        help="search radius distance-mm x max-gamma; larger gammas are reported as this; default 2",
    )
    gamma.add_argument(
        "--interp-fraction",
        type=int,
        default=10,
        help="search step distance-mm / this, as PyMedPhys's interp_fraction; default 10",
    )
    gamma.add_argument("--json", action="store_true", help="one JSON line")
    return p


def _positive(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text}")
    return value


def _gamma(args: argparse.Namespace) -> int:
    from mqi_async.qa.compare import compare_files
    from mqi_async.qa.gamma import GammaInputError, GammaOptions

    try:
        options = GammaOptions(
            dose_percent=args.dose_percent,
            distance_mm=args.distance_mm,
            cutoff_percent=args.cutoff_percent,
            local=args.local,
            max_gamma=args.max_gamma,
            interp_fraction=args.interp_fraction,
        )
        result = compare_files(args.reference, args.evaluated, options)
    except GammaInputError as exc:
        _err(f"gamma: {exc}")
        return EXIT_CONFIG
    except MqiError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    print(
        f"gamma {options.dose_percent:g} %/{options.distance_mm:g} mm "
        f"{summary['normalisation']}, cutoff {options.cutoff_percent:g} %: "
        f"pass rate {result.pass_rate_percent:.2f} % of {result.evaluated_points} points "
        f"(gamma mean {result.gamma_mean:.3f}, max {result.gamma_max:.3f}) "
        f"in {result.seconds:.1f} s"
    )
    return EXIT_OK


def _err(message: str) -> None:
    print(f"mqi-async: {message}", file=sys.stderr)


def _load(path: Path) -> Settings:
    return load_settings(path if path.exists() or path != Path("config.yaml") else None)


def _check_config(path: Path) -> int:
    from mqi_async.domain.tps import compatibility_warnings, unread_keys

    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) in {path}", file=sys.stderr)
        return EXIT_CONFIG
    print(yaml.safe_dump(effective_config(settings), sort_keys=False), end="")
    for key in unread_keys(settings.moqui):
        print(
            f"warning: moqui.{key}: MOQUI never reads this key; it has no effect", file=sys.stderr
        )
    for line in compatibility_warnings(settings.moqui):
        print(f"warning: moqui.{line}", file=sys.stderr)
    return EXIT_OK


def _status_table(cases: list[dict[str, Any]], keys: dict[str, str] | None = None) -> str:
    if not cases:
        return "no cases"
    lines = [f"{'CASE':<24} {'ROOM':<4} {'STATUS':<15} {'PROG':>4}  BEAMS  ERROR"]
    for c in cases:
        beams = c["beams"]
        done = sum(1 for b in beams if b["status"] == "completed")
        lines.append(
            f"{str(c['case_id'])[:24]:<24} {c['room'] or '-':<4} {c['status']:<15} "
            f"{c['progress']:>3}%  {done}/{len(beams):<4} {c['error'] or ''}"
        )
        if keys and c["case_id"] in keys:
            # the name hosts and notifications give the case (never its id)
            lines.append(f"  key: {keys[c['case_id']]}")
        if "qa" in c:
            qa = c["qa"]
            rate = qa.get("pass_rate_percent")
            plan_sum = f"; plan sum gamma {rate:g} %" if rate is not None else ""
            reason = f" ({qa['reason']})" if qa.get("reason") else ""
            lines.append(f"  verdict: {qa['status']}{reason}{plan_sum}")
        for b in beams:
            gpus = ",".join(b["gpus"]) if b["gpus"] else "-"
            qa = f" qa={_qa_text(b['qa'])}" if "qa" in b else ""
            lines.append(
                f"  {str(b['beam_id'])[:30]:<30} #{b['beam_number']:<3} {b['status']:<12} "
                f"{b['progress']:>3}%  host={b['host'] or '-'} gpus={gpus} "
                f"attempts={b['attempts']}{qa} {b['error'] or ''}"
            )
        lines.extend("  " + _delivery_line(d) for d in c.get("deliveries", ()))
    return "\n".join(lines)


def _qa_text(qa: dict[str, Any]) -> str:
    """`passed 99.1 %`, `pending`, or `skipped (no_tps_dose: …)`."""
    if qa.get("pass_rate_percent") is not None:
        text = f"{qa['status']} {qa['pass_rate_percent']:g} %"
    else:
        text = str(qa["status"])
    if qa.get("reason"):
        text += f" ({qa['reason']})"
    return text


def _delivery_line(d: dict[str, Any]) -> str:
    """One delivery check: `delivery <folder> fraction N beam #B: passed 99.1 % …`."""

    def num(key: str, unit: str, fmt: str = "g") -> str:
        value = d.get(key)
        return "-" if value is None else f"{value:{fmt}}{unit}"

    head = f"delivery {d['folder']} fraction {d['fraction'] or '-'} beam #{d['beam_number']}:"
    status = d["qa_status"]
    if d.get("reason"):
        return f"{head} {status} ({d['reason']})"
    if status == "pending":
        return f"{head} pending"
    found = ", ".join(d.get("deviations") or []) or "none"
    return (
        f"{head} {status} {num('pass_rate_percent', ' %')}"
        f" gamma mean {num('gamma_mean', '')} max {num('gamma_max', '')}"
        f" position max {num('max_position_error_mm', ' mm')}"
        f" meterset {num('meterset_error_percent', ' %', '+g')} deviations: {found}"
    )


def _case_keys(database: Path, case_ids: list[str]) -> dict[str, str]:
    """Each case's key (`domain.privacy.case_key`), when the database's secret exists."""
    from mqi_async.domain.privacy import SECRET_BYTES, case_key
    from mqi_async.store.secret import secret_path

    try:
        secret = secret_path(database).read_bytes()
    except OSError:
        return {}
    if len(secret) != SECRET_BYTES:
        return {}
    return {c: case_key(secret, c) for c in case_ids}


async def _status(settings: Settings, as_json: bool) -> int:
    from mqi_async.store.db import database_health, read_status_document

    doc = await read_status_document(settings.database)
    if as_json:
        # the contract's document is exactly {"cases": [...]}; host states show in the table
        print(json.dumps({"cases": doc["cases"]}, ensure_ascii=False))
        return EXIT_OK
    health = await asyncio.to_thread(database_health, settings.database)
    if health:
        print(f"database {settings.database}: {health}")
    unverified = {
        h.name for h in settings.hosts if getattr(h, "known_hosts", None) == IGNORE_HOST_KEYS
    }
    for host in doc["hosts"]:  # type: ignore[attr-defined]
        line = f"host {host['name']}: {host['state']}"
        if host["name"] in unverified:
            line += " [UNVERIFIED: host key not checked (known_hosts: ignore)]"
        print(line + (f" ({host['error']})" if host["error"] else ""))
    for folder in doc["skipped_folders"]:  # type: ignore[attr-defined]
        detail = f" ({folder['detail']})" if folder["detail"] else ""
        print(
            f"skipped folder {folder['path']}: {folder['reason']}{detail} — "
            f"{failure_info(folder['reason']).advice}"
        )
    cases: list[dict[str, Any]] = doc["cases"]  # type: ignore[assignment]
    keys = await asyncio.to_thread(_case_keys, settings.database, [c["case_id"] for c in cases])
    print(_status_table(cases, keys))
    return EXIT_OK


async def _request(settings: Settings, kind: str, case_id: str) -> int:
    from mqi_async.domain.records import CommandKind
    from mqi_async.store.db import submit_command

    command = await submit_command(settings.database, CommandKind(kind), case_id)
    if command is None:
        _err(f"unknown case {case_id!r}; `mqi-async status` lists the cases")
        return EXIT_FAILURE
    print(
        f"{kind} of case {case_id} recorded (request {command.command_id}); the service applies it"
    )
    return EXIT_OK


async def _report(settings: Settings, case_id: str, as_json: bool) -> int:
    from mqi_async.report.build import build_report
    from mqi_async.report.model import report_settings
    from mqi_async.store.files import is_missing_or_empty

    if await asyncio.to_thread(is_missing_or_empty, settings.database):
        _err(
            f"unknown_case: no database at {settings.database} yet; `mqi-async status` lists the cases"
        )
        return EXIT_FAILURE
    built = await build_report(report_settings(settings, case_id))
    if as_json:
        print(json.dumps(built.to_json()))
    else:
        print(built.pdf)
        print(built.html)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "gamma":
        return _gamma(args)
    if args.command == "demo":
        from mqi_async.demo.runner import DemoOptions, run_demo

        return run_demo(
            DemoOptions(
                workdir=args.workdir,
                cases=args.cases,
                beams=args.beams,
                gpus=args.gpus,
                headless=args.no_ui,
                exit_when_done=args.exit_when_done,
                clean=args.clean,
                web_port=args.web,
            )
        )
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            _err(f"config: {problem}")
        return EXIT_CONFIG
    try:
        if args.command == "status":
            return asyncio.run(_status(settings, args.json))
        if args.command == "report":
            return asyncio.run(_report(settings, args.case_id, args.json))
        if args.command in ("retry", "cancel", "recheck"):
            return asyncio.run(_request(settings, args.command, args.case_id))
        if args.command == "run":
            from mqi_async.service import run_service

            return run_service(settings, headless=args.no_ui)
    except DatabaseError as exc:
        _err(str(exc))
        return EXIT_CONFIG if exc.code == "already_running" else EXIT_FAILURE
    except MqiError as exc:
        _err(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_FAILURE
