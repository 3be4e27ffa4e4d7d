# Two commands do all set-up on a fresh machine:
#   make demo   - the station daemon on its embedded default (synthetic microscope, 5 fields):
#                 prints what it published (or kept in its outbox when no broker answers)
#   make test   - the whole test suite (what CI runs, after make lint; installs mosquitto, chromium,
#                 chromium-driver, faketime, strace and node with apt when missing)
# Also: make test-fast (no fault injection, slow or real-data tests: a few minutes), make lint.
# The tests run on TEST_WORKERS processes (pytest-xdist; each test has its own broker, port and
# folders): most of a test's time is spent waiting on a broker, a browser or a daemon, so three
# processes finish the suite in far less time on a 2-core machine (two used the cores 64 % of the
# suite's time). TEST_WORKERS=0 runs it in one.
PY ?= python3
TEST_WORKERS ?= 3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast venv system-deps lint

$(BIN)/smearscope: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=68'  # builds the wheel offline (tests/test_wheel.py)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/smearscope

# mosquitto for the broker tests; Debian's chromium and chromium-driver for the dashboard's
# browser test (no browser is ever downloaded: these are Debian packages); faketime for the tests
# of a station started on a wrong clock, strace for those of what typed cells sync to the disk;
# node to check that every dashboard script parses (tests/test_dashboard_js_syntax.py).
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || command -v /usr/sbin/mosquitto >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null)
	@(command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1) || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)
	@(command -v faketime >/dev/null 2>&1 && command -v strace >/dev/null 2>&1) || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime strace >/dev/null)
	@command -v node >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null)

demo: venv
	$(BIN)/smearscope run --max-fields 5

test: venv system-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

test-fast: venv system-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not realdata and not faults"

lint: venv
	$(BIN)/ruff check .
