# vsup: make demo (the daemon supervising a real TP=2 vLLM, with a reload), make test (everything).
PY        ?= python3.11
VENV      := .venv
VSUP_CACHE ?= $(HOME)/.cache/vsup
export VSUP_CACHE
PYTEST_ARGS ?=

.PHONY: venv vllm demo lint test test-instances test-fast bench bench-quick bench-deps clean-venv

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,metrics]'
	touch $@

# The real vLLM (CPU build) in its own venv and the three tiny models, cached in $(VSUP_CACHE);
# then vLLM 0.8.5 for the V0-engine tests and V0-readable copies of the models (about 10 min and
# 6.3 GB the first time, 0.1 s cached: scripts/setup_vllm_v0.sh).
vllm:
	scripts/setup_vllm.sh --models
	scripts/setup_vllm_v0.sh --models

demo: venv vllm
	$(VENV)/bin/python scripts/demo.py

# Lint, format check and type check (configured in pyproject.toml); 13 s cold, 1.5 s cached.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	@# ruff and mypy insist that a suppression names its code; this, that it also says why.
	@if grep -rnE --include='*.py' '# (noqa: [A-Z0-9, ]+|type: ignore\[[a-z0-9, -]+\]) *$$' supervisor tests bench scripts; \
	then echo "a # noqa / # type: ignore above names its code but not why (say it after the code)"; exit 1; fi

# The whole suite, real-vLLM tests included (they fail, never skip, when vLLM cannot run), after
# `lint` (first, so a finding fails in seconds rather than after the vLLM setup).
test: venv lint vllm
	$(VENV)/bin/python -m pytest -p no:cacheprovider -ra --durations=30 $(PYTEST_ARGS) tests

# Only the test with two real TP=2 servers under two vsup instances (issue 18; part of `make
# test` too, about 2 minutes), for a quick look at that one.
test-instances: venv vllm
	$(VENV)/bin/python -m pytest -p no:cacheprovider -ra -m two_servers tests

# Unit tests only (no real vLLM), for quick iteration.
test-fast: venv
	$(VENV)/bin/python -m pytest -p no:cacheprovider -q -m 'not vllm' tests

# Debian packages the bench runs beside the peers' venvs: HAProxy (in front of each peer), nginx
# and wrk (the proxy's overhead, bench/bench_proxy.py). Installed when missing.
bench-deps:
	@missing=""; for t in haproxy nginx wrk; do command -v $$t >/dev/null || [ -x /usr/sbin/$$t ] || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then echo "installing haproxy nginx wrk (missing:$$missing)"; \
	apt-get install -y -q haproxy nginx wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q haproxy nginx wrk >/dev/null; }; fi

bench: venv vllm bench-deps
	$(VENV)/bin/python bench/run.py

bench-quick: venv vllm bench-deps
	$(VENV)/bin/python bench/run.py --quick

clean-venv:
	rm -rf $(VENV)

-include mk/*.mk
