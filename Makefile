# The targets the README names are the ones CI runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv proto test lint typecheck demo screenshots bench-hitless bench-handoff-faults bench-controller-upgrade bench-dispatch bench-verify bench-fleet bench-stream clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The one place generated protobuf code comes from. tests/test_proto_fresh.py fails when
# the checked-in files differ from what this produces.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/hitless/v1/*.proto

# Two processes (tests are isolated by vhost, database, ports and tmp dirs); the test that
# restarts the broker runs alone afterwards.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not broker_restart" --durations=15
	$(BIN)/python -m pytest -q -m broker_restart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench-hitless: $(STAMP)
	$(BIN)/python bench/hitless.py

# Processes killed and hung at each step of a handoff under traffic (bench/handoff_faults.py).
bench-handoff-faults: $(STAMP)
	$(BIN)/python bench/handoff_faults.py

bench-controller-upgrade: $(STAMP)
	$(BIN)/python bench/controller_upgrade.py

bench-dispatch: $(STAMP)
	$(BIN)/python bench/dispatch.py

bench-verify: $(STAMP)
	$(BIN)/python bench/verify.py

# 100 real and 1,000 simulated gateways upgraded at once, beside the floor (bench/fleet.py).
bench-fleet: $(STAMP)
	$(BIN)/python bench/fleet.py

# Artifact downloads against raw loopback TCP, 1, 8 and 32 at once (bench/stream.py).
bench-stream: $(STAMP)
	$(BIN)/python bench/stream.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The web console's screenshots in docs/screenshots/, from its tests in a real browser.
screenshots: $(STAMP)
	HITLESS_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/test_web_browser.py
