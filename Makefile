# The two commands of the README. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU wheel on these machines; the package's range accepts it.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/fedfsd demo

test: $(STAMP)
	# Two worker processes; a module (or the netbed modules together) is one unit (tests/conftest.py);
	# the slowest tests are listed, to keep the suite well under CI's 30-minute aim.
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder --durations=15

lint: $(STAMP)
	$(BIN)/ruff check fedfsd tests experiments
	$(BIN)/ruff format --check fedfsd tests experiments
	$(BIN)/mypy  # over fedfsd/, configured in pyproject.toml [tool.mypy]

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=fedfsd/proto --pyi_out=fedfsd/proto protos/fedfsd/v1/*.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info
