# Airlock: one entry point for people and CI. `make serve` and `make test` do all set-up first.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-stamp
LISTEN ?= 127.0.0.1:50051
# onnxruntime >= 1.32 writes telemetry under $HOME at import unless told not to.
export ORT_DISABLE_TELEMETRY := 1
PYTEST_ARGS ?=
# Two pytest-xdist workers: the tests that use the Docker engine run one at a time on one of
# them (one xdist group, tests/conftest.py ENGINE_GROUP), the unit tests on the other meanwhile.
# XDIST= runs them all in one process, as before.
XDIST ?= -n 2 --dist loadgroup

.PHONY: help setup venv docker image serve test bench corpus soak unit integration adversarial \
        protos check-protos check-seccomp check-host lint typecheck check clean audit

help:
	@echo "make serve   - set everything up, then run the broker on $(LISTEN)"
	@echo "make test    - set everything up, then run the whole test suite"
	@echo "make setup   - .venv with the project, the Docker engine, the sandbox image"
	@echo "make image   - (re)build the sandbox image if its inputs changed"
	@echo "make bench   - Airlock against the unsafe in-process baseline (BENCH_ARGS=--quick)"
	@echo "make corpus  - every scikit-learn estimator skl2onnx converts, through a broker: converted or why"
	@echo "make soak    - mixed benign and hostile jobs for SOAK_MINUTES (30); leak report"
	@echo "make check   - lint, type-check, verify generated stubs, scan the host for deserializers and archive readers"
	@echo "make audit   - the host's and the image's versions against the version gates"

$(STAMP): pyproject.toml host-requirements.txt scripts/setup-venv.sh
	scripts/setup-venv.sh
	@touch $@

# The project's own bytecode, as pip writes it when it installs the client: the CLI then starts
# without compiling itself each time where Python writes none (PYTHONDONTWRITEBYTECODE). An
# optimization only: a tree it cannot write to is left as it is.
venv: $(STAMP)
	@$(PY) -m compileall -q clients service sandbox protos >/dev/null || true

docker:
	scripts/ensure-docker.sh

image: venv docker
	scripts/build-image.sh

setup: venv docker image

serve: setup
	.venv/bin/airlock-broker serve --listen $(LISTEN)

test: setup check
	$(PY) -m pytest $(XDIST) tests $(PYTEST_ARGS)

# AUDIT_ARGS: e.g. --image airlock-x-sandbox:latest, --config airlock.toml, --json
AUDIT_ARGS ?=
audit: venv docker
	$(PY) -m airlock_broker.ops.version_audit $(AUDIT_ARGS)

BENCH_ARGS ?=
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

# CORPUS_ARGS: e.g. --server HOST:PORT, --image airlock-x-sandbox:latest, --json corpus.json
CORPUS_ARGS ?=
corpus: setup
	$(PY) -m bench.corpus $(CORPUS_ARGS)

SOAK_MINUTES ?= 30
soak: setup
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

unit: venv
	$(PY) -m pytest $(XDIST) tests/unit $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

adversarial: setup
	$(PY) -m pytest tests/adversarial $(PYTEST_ARGS)

protos: venv
	scripts/gen-protos.sh

check-protos: venv
	scripts/gen-protos.sh
	git diff --exit-code -- protos/ || (echo "generated stubs are stale: run 'make protos' and commit" >&2; exit 1)

lint: venv
	.venv/bin/ruff check service clients sandbox tests bench

typecheck: venv
	.venv/bin/mypy service/airlock_broker clients/airlock_client sandbox/airlock_sandbox

check-seccomp: venv
	$(PY) scripts/gen-seccomp-profile.py --check

# The host never deserializes an artifact nor opens an archive (DESIGN §1.1): a static scan.
check-host: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_host_never_deserializes.py

check: lint typecheck check-protos check-seccomp check-host

clean:
	rm -rf .venv build .pytest_cache .mypy_cache .ruff_cache
