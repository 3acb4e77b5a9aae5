"""`python -m mqi_async.web.hash_token`: the hash of a web token or password for config.yaml.

    python -m mqi_async.web.hash_token --new      # a new random token, and its hash
    python -m mqi_async.web.hash_token            # reads a password (or token) without echo

Only the hash goes into `web.tokens[].hash` or `web.users[].password_hash`; keep the token
itself where its holder keeps secrets.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys

from mqi_async.web.auth import make_hash


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqi_async.web.hash_token",
        description="Hash a web token or password (scrypt) for mqi-async's config.yaml.",
    )
    parser.add_argument("--new", action="store_true", help="make a new random token")
    parser.add_argument(
        "--stdin", action="store_true", help="read the secret from standard input (one line)"
    )
    args = parser.parse_args(argv)
    if args.new:
        secret = secrets.token_urlsafe(32)
        sys.stdout.write(f"token: {secret}\n")
    elif args.stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    else:
        secret = getpass.getpass("password or token: ")
        if getpass.getpass("again: ") != secret:
            sys.stderr.write("the two entries differ\n")
            return 2
    if not secret:
        sys.stderr.write("nothing to hash\n")
        return 2
    sys.stdout.write(f"hash: {make_hash(secret)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
