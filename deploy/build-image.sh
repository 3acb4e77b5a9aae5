#!/usr/bin/env bash
# Build the mqi-async container image (`make image` calls this).
#
#   deploy/build-image.sh            # docker, or podman when no docker daemon answers
#
# Environment (all optional):
#   ENGINE         docker | podman (default: the first whose daemon/runtime answers)
#   IMAGE          the tag to build (default mqi-async:<version from pyproject.toml>, also tagged :latest)
#   BASE           the base image (default python:3.11-slim). When it is neither present locally nor
#                  pullable, a base is made from Debian packages (mmdebstrap -> tarball -> import)
#                  and tagged $LOCAL_BASE, so nothing needs a registry.
#   LOCAL_BASE     tag of the Debian-made base (default mqi-base:bookworm)
#   DEBIAN_SUITE   suite of that base (default bookworm: Python 3.11)
#   DEBIAN_MIRROR  its mirror (default: the first http(s) `deb.debian.org`-style URI of this
#                  machine's apt sources, else http://deb.debian.org/debian)
#   BUILD_LOG      where the build's output is kept as well (default build/image-build.log)
#
# pip inside the build uses the same index as pip on this machine: PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST (environment first, else `pip config`) are passed as
# build args; file:// locations are left out (they do not exist inside the build). The build uses
# the host's network (`--network host`) so that it reaches the same hosts as this machine, and
# pip's CA bundle (PIP_CERT / `pip config get global.cert`) goes into the build stage only.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

engine_ok() { "$1" info >/dev/null 2>&1; }

if [[ -z "${ENGINE:-}" ]]; then
    for candidate in docker podman; do
        if command -v "$candidate" >/dev/null 2>&1 && engine_ok "$candidate"; then
            ENGINE=$candidate
            break
        fi
    done
    [[ -n "${ENGINE:-}" ]] || die "no container engine answers: start the Docker daemon (systemctl start docker, or dockerd &) or install podman"
fi
engine_ok "$ENGINE" || die "'$ENGINE info' fails: is its daemon running?"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)
IMAGE=${IMAGE:-mqi-async:${version:-latest}}
BASE=${BASE:-python:3.11-slim}
LOCAL_BASE=${LOCAL_BASE:-mqi-base:bookworm}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
BUILD_LOG=${BUILD_LOG:-build/image-build.log}
mkdir -p "$(dirname "$BUILD_LOG")"

have_image() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -E '^[[:space:]]*(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?' \
        | grep -v -- '-security' | head -n1 || true)
    uri=${uri%/}
    echo "${uri:-http://deb.debian.org/debian}"
}

make_debian_base() {
    command -v mmdebstrap >/dev/null 2>&1 \
        || die "no base image and no mmdebstrap to make one: apt-get install mmdebstrap (or set BASE)"
    local mirror tarball security
    mirror=$(debian_mirror)
    security=${mirror%/debian}/debian-security
    tarball=$(mktemp -d)/base.tar
    log "making $LOCAL_BASE from Debian $DEBIAN_SUITE packages ($mirror)"
    # minbase + Python 3 with venv, CA certificates and tini (PID 1 that forwards SIGTERM and reaps);
    # no docs, man pages, locales or apt lists
    local hooks=()
    # merged /usr made by mmdebstrap's hook rather than the usrmerge package (which pulls in perl)
    [[ -d /usr/share/mmdebstrap/hooks/merged-usr ]] && hooks=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
    nice -n 10 mmdebstrap --variant=minbase "${hooks[@]}" \
        --include=python3,python3-venv,ca-certificates,tini \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$DEBIAN_SUITE" "$tarball" \
        "deb $mirror $DEBIAN_SUITE main" \
        "deb $mirror $DEBIAN_SUITE-updates main" \
        "deb $security $DEBIAN_SUITE-security main" </dev/null
    "$ENGINE" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        "$tarball" "$LOCAL_BASE" >/dev/null
    rm -rf "$(dirname "$tarball")"
    log "made $LOCAL_BASE ($("$ENGINE" image inspect -f '{{.Size}}' "$LOCAL_BASE") bytes)"
}

if have_image "$BASE"; then
    log "base: $BASE (present)"
elif timeout 60 "$ENGINE" pull "$BASE" >/dev/null 2>&1; then
    log "base: $BASE (pulled)"
else
    log "base $BASE is not here and cannot be pulled"
    have_image "$LOCAL_BASE" || make_debian_base
    BASE=$LOCAL_BASE
    log "base: $BASE (made from Debian packages)"
fi

# pip's index, as this machine's pip is configured
pip_setting() {  # env var name, pip config key
    local value=${!1:-}
    if [[ -z "$value" ]] && command -v python3 >/dev/null 2>&1; then
        value=$(python3 -m pip config get "$2" 2>/dev/null || true)
    fi
    local kept=() item
    for item in $value; do
        case "$item" in
            file:* | /*) log "pip: leaving out $1 entry $item (not reachable inside the build)" ;;
            *) kept+=("$item") ;;
        esac
    done
    echo "${kept[*]:-}"
}
build_args=(--build-arg "BASE=$BASE")
for pair in PIP_INDEX_URL:global.index-url PIP_EXTRA_INDEX_URL:global.extra-index-url PIP_TRUSTED_HOST:global.trusted-host; do
    name=${pair%%:*}
    value=$(pip_setting "$name" "${pair#*:}")
    if [[ -n "$value" ]]; then
        build_args+=(--build-arg "$name=$value")
        log "pip: $name passed to the build"
    fi
done

# pip's CA bundle (e.g. a TLS-inspecting proxy's CA): copied into the build stage only
cert=${PIP_CERT:-}
if [[ -z "$cert" ]] && command -v python3 >/dev/null 2>&1; then
    cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
fi
rm -f build/pip-ca.pem
if [[ -n "$cert" && -s "$cert" ]]; then
    mkdir -p build
    cp "$cert" build/pip-ca.pem
    log "pip: CA bundle $cert passed to the build stage"
fi

latest=${IMAGE%:*}:latest
log "building $IMAGE with $ENGINE (log: $BUILD_LOG)"
set +e
nice -n 10 "$ENGINE" build --network host "${build_args[@]}" -t "$IMAGE" -t "$latest" . 2>&1 | tee "$BUILD_LOG"
status=${PIPESTATUS[0]}
set -e
[[ $status -eq 0 ]] || die "$ENGINE build failed (exit $status); see $BUILD_LOG"

size=$("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE")
log "built $IMAGE and $latest: $((size / 1000000)) MB (base $BASE)"
