# Real-systemd tests (tests/systemd/): boots systemd 252 as PID 1 of private namespaces and
# runs deploy/vsup.service under it (see deploy/README.md, "The real-systemd harness"). Needs
# root, util-linux (unshare, nsenter), the Debian packages systemd and python3.11 (the unit's
# /opt/vsup venv is built from /usr/bin/python3.11 inside the namespace). About a minute.
# Included by the top-level Makefile (-include mk/*.mk), which defines VENV and `venv`.
VENV ?= .venv

.PHONY: test-systemd
test-systemd: venv
	$(VENV)/bin/python -m pytest -p no:cacheprovider -ra tests/systemd
