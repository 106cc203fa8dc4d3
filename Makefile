# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := $(VENV)/.test-tools

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first (a local wheel on CI machines): pyproject's range is then satisfied, no CUDA build is pulled.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# promtool (Debian's prometheus package) and docker-compose validate deploy/ offline; the tests need them. The wheel
# of the SGLang pinned by the `gpu` extra (not installed: it needs CUDA) holds the request and response schemas
# that tests/integration/rollout_node/test_sglang_contract.py holds the client and serve-engine to.
$(TOOLS): $(STAMP)
	command -v promtool >/dev/null && command -v docker-compose >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq prometheus docker-compose >/dev/null)
	rm -rf $(VENV)/sglang-wheel
	$(BIN)/python -m pip download -q --no-deps --dest $(VENV)/sglang-wheel "$$($(BIN)/python -c \
		"import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu'][0])")"
	touch $(TOOLS)

demo: $(STAMP)
	$(BIN)/slipstream up --config configs/demo.toml

test: $(STAMP) $(TOOLS)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .

bench: $(STAMP)
	$(BIN)/slipstream bench bus

clean:
	rm -rf $(VENV) runs
