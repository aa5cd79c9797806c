# Everything a fresh clone needs: `make demo` and `make test` install what they use.
SHELL := /bin/bash
# The functions' own Python (Lambda's python3.13) where this machine has one that runs, so that the suite
# and the bench run on the version the functions run on (infra/bundle.py looks in the same places);
# else python3.
RUNTIME_PYTHON := $(shell for p in "$$AMI_JANITOR_RUNTIME_PYTHON" python3.13 \
	$$(ls -r $(HOME)/.pyenv/versions/3.13.*/bin/python3.13 2>/dev/null); do [ -n "$$p" ] && \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null && { command -v "$$p"; break; }; done)
PYTHON ?= $(or $(RUNTIME_PYTHON),python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROPERTY_TESTS := $(wildcard tests/*/test_*properties.py)
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test unit lint fuzz bench synth publish-org-code deploy-org clean

$(STAMP): pyproject.toml requirements.txt
	@echo "install: creating $(VENV) (once per clone, about 3 minutes)"
	$(PYTHON) -m venv $(VENV)
	@echo "install: upgrading pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "install: ami-janitor with its emulator and development tools (the longest step)"
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	@echo "install: done"
	touch $(STAMP)

install: $(STAMP)

node_modules/.installed: package.json package-lock.json
	@echo "install: the pinned CDK CLI (npm ci)"
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: install
	$(VENV)/bin/ami-janitor demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	PYTHONPATH=$(CURDIR)/lambdas $(VENV)/bin/lint-imports --no-cache --no-logo

unit: install
	$(PY) -m pytest tests/unit

test: install lint
	$(PY) -m pytest -n 2 tests

fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -n 2 $(PROPERTY_TESTS)

bench: install
	$(PY) bench/bench.py

synth: install node_modules/.installed
	npx cdk synth --quiet

# With `organization` in the policy (README, "Deploy to an organization"): the functions' code in the
# code bucket of every managed region, for the StackSet's member stacks (after the code bucket stacks).
publish-org-code: install
	PYTHONPATH=$(CURDIR)/lambdas:$(CURDIR) $(PY) -m infra.publish_code

# The three steps in their order: code buckets, code, StackSet.
deploy-org: synth
	npx cdk deploy --require-approval broadening 'AmiJanitorCode-*'
	$(MAKE) publish-org-code
	npx cdk deploy --require-approval broadening AmiJanitorOrg

clean:
	rm -rf cdk.out build .pytest_cache .mypy_cache .ruff_cache
