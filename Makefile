# The one entry point for people, CI and hooks.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: install run demo test test-fast lint format bench bench-deps soak check clean image image-test real-moqui

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/mqi-async run -c $(CONFIG)

demo: install
	$(BIN)/mqi-async demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check mqi_async tests
	$(BIN)/ruff format --check mqi_async tests
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format mqi_async tests
	$(BIN)/ruff check --fix mqi_async tests

# the benchmarks measure the real OpenSSH sshd (and ssh-keygen): install them as root, like .ci/run
SSHD ?= $(shell command -v sshd || command -v /usr/sbin/sshd)
BENCH_PACKAGES := openssh-server openssh-client

bench-deps:
	@if [ -z "$(SSHD)" ] || ! command -v ssh-keygen >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "bench: installing $(BENCH_PACKAGES)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    apt-get install -y -qq --no-install-recommends $(BENCH_PACKAGES) >/dev/null; \
	  else \
	    echo "bench: needs OpenSSH's sshd and ssh-keygen; install them first, e.g." \
	      "'sudo apt-get install $(BENCH_PACKAGES)' (Debian/Ubuntu) or 'sudo dnf install openssh-server openssh-clients'" >&2; \
	    exit 2; \
	  fi; \
	fi

bench: install bench-deps
	$(BIN)/python -m pytest tests/bench -s -p no:cacheprovider -o addopts="" --timeout=1800

# 200 cases / 800 beams, random MOQUI failures, SIGKILLs and a host outage (tens of minutes)
soak: install bench-deps
	$(BIN)/python -m pytest tests/soak -s -p no:cacheprovider -o addopts="" --timeout=3600

check: lint test

# the container image (docker, or podman): a base made from Debian packages when no registry
image:
	deploy/build-image.sh

# runs the built image for real (tests/image; skipped by `make test`); `make image` first
image-test: install
	MQI_IMAGE_TEST=1 $(BIN)/python -m pytest tests/image -p no:cacheprovider -s $(PYTEST_ARGS)

# optional, not in CI: build the public MOQUI fork CPU-only from MOQUI_SRC and run one demo
# case through it (deploy/real-moqui.sh); without MOQUI_SRC it says why it skips
real-moqui: install
	MOQUI_SRC="$(MOQUI_SRC)" PYTHON="$(abspath $(BIN)/python)" deploy/real-moqui.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
