# Enclave runtime: venv, test, run, zipapp, smoke, bench, lint.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
TEST_STAMP := $(VENV)/.installed-requirements-test

.PHONY: venv tools test run zipapp smoke bench lint check-deploy clean

# The venv is a real prerequisite: it is rebuilt when requirements.txt changes.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# Test-only dependencies (botocore drives the fake KMS as a real AWS client); the runtime's own
# requirements.txt and the zipapp are unaffected.
$(TEST_STAMP): requirements-test.txt $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-test.txt
	touch $(TEST_STAMP)

# socat, openssl and curl are needed by the tests of the host scripts.
tools:
	@scripts/ensure-tools.sh

test: $(STAMP) $(TEST_STAMP) tools
	$(PY) -m tests.run

# SECRETS=kms (default): sealed under the fake KMS, opened with a dev-shim recipient document
# (the production path except the NSM); SECRETS=channel: the plaintext delivery.
SECRETS ?= kms
run: $(STAMP) tools
	scripts/start-local.sh --secrets $(SECRETS)

zipapp:
	$(PYTHON) scripts/build_zipapp.py dist/enclave.pyz
	$(PYTHON) scripts/build_zipapp.py --host dist/enclave-host.pyz

smoke: $(STAMP) tools
	scripts/smoke.sh

bench: $(STAMP) zipapp
	@scripts/ensure-tools.sh wrk || echo "wrk unavailable: using the pure-Python load generator"
	$(PY) -m bench.run

lint: $(STAMP)
	$(PY) -m compileall -q enclave tests bench scripts
	bash -n scripts/*.sh
	@if command -v shellcheck >/dev/null; then shellcheck scripts/*.sh; else echo "shellcheck not installed: skipped"; fi

# The parent automation in deploy/ (docs/OPERATIONS.md): shellcheck on its scripts, the units,
# allocator and allow-list (deploy/check.py, with systemd-analyze verify where installed), and
# no drift between deploy/egress-routes.json, the generated files and the Containerfile.
check-deploy:
	@scripts/ensure-tools.sh shellcheck
	shellcheck deploy/*.sh scripts/enclave-logs.sh
	$(PYTHON) deploy/check.py --systemd
	$(PYTHON) deploy/generate.py --check --containerfile Containerfile

clean:
	rm -rf dist build bench/results.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
