#!/usr/bin/env bash
# `make real-moqui`: build the public MOQUI fork (github.com/jokh38/moqui_v2) CPU-only from a
# local source folder and run one demo case through the real engine. Optional, not in CI.
#
#   MOQUI_SRC=/path/to/moqui_v2 make real-moqui
#
# Needs: cmake, g++, and the Debian packages libgdcm-dev and zlib1g-dev. The patches the
# build needs are in deploy/moqui_v2-cpu.patch (applied to a copy; the source stays as is).
# Variables: MOQUI_SRC (required), MOQUI_WORK (default build/real-moqui), JOBS (default 2),
# PYTHON (default .venv/bin/python).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
src=${MOQUI_SRC:-}
work=${MOQUI_WORK:-$repo/build/real-moqui}
jobs=${JOBS:-2}
python=${PYTHON:-$repo/.venv/bin/python}

say() { echo "real-moqui: $*"; }
stop() { say "stops at step $1: $2"; exit 1; }

if [ -z "$src" ]; then
    say "skipped: no source folder given. Run MOQUI_SRC=/path/to/moqui_v2 make real-moqui"
    say "(a local checkout of https://github.com/jokh38/moqui_v2, tested at b2ab427)"
    exit 0
fi
[ -f "$src/tps_env.cpp" ] && [ -f "$src/base/environments/mqi_tps_env.hpp" ] ||
    stop 0 "$src is not a moqui_v2 checkout (no tps_env.cpp, base/environments/mqi_tps_env.hpp)"

say "step 1: build tools and libraries"
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
gdcm=$(find /usr/lib /usr/local/lib /usr/share -name GDCMConfig.cmake -print -quit 2>/dev/null || true)
[ -n "$gdcm" ] || missing+=(libgdcm-dev)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
if [ ${#missing[@]} -gt 0 ]; then
    stop 1 "missing ${missing[*]}; install: sudo apt-get install cmake g++ libgdcm-dev zlib1g-dev"
fi

say "step 2: copy the source to $work/src/moqui and apply deploy/moqui_v2-cpu.patch"
# the sources include <moqui/base/...>: the tree must sit in a folder named moqui
rm -rf "$work/src" "$work/build"
mkdir -p "$work/src"
cp -a "$src" "$work/src/moqui"
rm -rf "$work/src/moqui/build" "$work/src/moqui/.git" # the fork commits a stale CMake cache
patch -d "$work/src/moqui" -p1 --forward --batch <"$here/moqui_v2-cpu.patch" ||
    stop 2 "deploy/moqui_v2-cpu.patch does not apply to this source"

say "step 3: configure (cmake -DGPU=OFF)"
cmake -S "$work/src/moqui" -B "$work/build" -DGPU=OFF -DCMAKE_BUILD_TYPE=Release \
    -DGDCM_DIR="$(dirname "$gdcm")" || stop 3 "cmake configure failed (output above)"

say "step 4: compile tps_env (CPU only, $jobs jobs)"
cmake --build "$work/build" -j "$jobs" || stop 4 "compiling failed (output above)"
[ -x "$work/build/tps_env" ] || stop 4 "no $work/build/tps_env after the build"

say "step 5: one demo case through the real engine (kind: local)"
rm -rf "$work/case"
"$python" "$here/real_moqui_case.py" --tps-env "$work/build/tps_env" --workdir "$work/case" ||
    stop 5 "the case did not complete; see $work/case/work/*/runs/*/attempt_*/moqui.log"
say "done: $work/case"
