"""`python -m mqi_async.report --request FILE`: build one case's report.

FILE (or stdin) holds `report.model.ReportSettings` as JSON. Prints one JSON line last: the
report's paths and verdict, or `{"ok": false, "code", "detail"}`. The service runs this as a
local tool, so plotting never touches its event loop.
"""

from __future__ import annotations

import asyncio
import json
import sys

from mqi_async.domain.errors import MqiError
from mqi_async.report.build import build_report
from mqi_async.report.model import ReportSettings


def _answer(document: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    try:
        if args[:1] == ["--request"] and len(args) == 2:
            with open(args[1], encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = sys.stdin.read()
        settings = ReportSettings.from_json(json.loads(text))
        built = asyncio.run(build_report(settings))
    except MqiError as exc:
        _answer({"ok": False, "code": exc.code, "detail": exc.detail})
        return 2
    except (ValueError, KeyError, OSError) as exc:
        _answer({"ok": False, "code": "internal_error", "detail": f"bad request: {exc}"})
        return 2
    _answer({"ok": True, **built.to_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
