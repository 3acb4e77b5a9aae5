"""Host-side case claims: one service per case on a host, whatever database each one uses.

Two services pointed at the same scan folder and the same host would otherwise both run every
case. The first to upload a case's inputs to a host writes a claim file there (created with
noclobber, so exactly one writer wins); every other service finds it and stops with
`case_claimed_elsewhere`. The file's name is a hash of the case folder's path, so neither the
patient ID nor the folder names appear under `remote_root`.
"""

from __future__ import annotations

import hashlib

#: folder under remote_root that holds the claim files
CLAIMS_DIR = ".mqi-claims"
_OWNER = "MQIOWNER"

# $1 remote root ("~/" allowed), $2 claim key, $3 owner line. Prints `MQIOWNER <owner>` with the
# owner on file after the attempt, ours when we won.
_SCRIPT = """\
umask 077
root=$1
case $root in "~") root=$HOME;; "~/"*) root=$HOME/${root#"~/"};; esac
dir=$root/CLAIMS
mkdir -p -- "$dir" || exit 3
f=$dir/$2
if ! [ -s "$f" ]; then (set -C; printf '%s\\n' "$3" > "$f") 2>/dev/null; fi
printf 'MARK %s\\n' "$(sed -n 1p "$f")"
"""


def claim_key(case_path: str) -> str:
    """The claim file's name for a case folder (stable across services and restarts)."""
    return hashlib.sha256(case_path.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def claim_argv(remote_root: str, key: str, owner: str) -> list[str]:
    """The command that claims `key` for `owner` unless someone holds it already."""
    if "\n" in owner or "\0" in owner:
        raise ValueError("an owner is one line")
    script = _SCRIPT.replace("CLAIMS", CLAIMS_DIR).replace("MARK", _OWNER)
    return ["/bin/sh", "-c", script, "mqi-claim", remote_root, key, owner]


def parse_owner(stdout: str) -> str | None:
    """The owner line on file, as `claim_argv` printed it; None when the output is cut off."""
    for line in stdout.splitlines():
        head, _, rest = line.partition(" ")
        if head == _OWNER and rest.strip():
            return rest.strip()
    return None


def same_owner(on_file: str, ours: str) -> bool:
    """Owners are compared by their first word, the service id (the rest is for people)."""
    return on_file.split(" ", 1)[0] == ours.split(" ", 1)[0]
