"""`python -m mqi_async` is the same program as `mqi-async`."""

from mqi_async.cli import main

raise SystemExit(main())
