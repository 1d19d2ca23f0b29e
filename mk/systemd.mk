# Real-systemd tests (tests/systemd/): boots systemd 252 as PID 1 of private namespaces and
# runs deploy/vsup.service under it. Needs root, util-linux (unshare, nsenter) and the Debian
# package systemd. Included by the top-level Makefile (include mk/*.mk).
SYSTEMD_TEST_PYTEST ?= .venv/bin/pytest

.PHONY: test-systemd
test-systemd:
	$(SYSTEMD_TEST_PYTEST) tests/systemd -q
