# The targets the README names are the ones CI runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv proto test lint typecheck demo screenshots bench-hitless bench-controller-upgrade bench-dispatch bench-verify clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench-hitless: $(STAMP)
	$(BIN)/python bench/hitless.py

bench-controller-upgrade: $(STAMP)
	$(BIN)/python bench/controller_upgrade.py

bench-dispatch: $(STAMP)
	$(BIN)/python bench/dispatch.py

bench-verify: $(STAMP)
	$(BIN)/python bench/verify.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The web console's screenshots in docs/screenshots/, from its tests in a real browser.
screenshots: $(STAMP)
	HITLESS_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -q tests/test_web_browser.py
