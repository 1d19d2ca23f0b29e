# The container check (deploy/container/check.sh): builds the image of deploy/container/
# Containerfile with podman FROM scratch on a debootstrap root file system (no registry is
# reachable here), then runs vsup in it as PID 1, non-root, read-only root. Slow (the vLLM CPU
# build is installed into the image: ~10 min and ~2 GB the first time); not part of `make test`.
# VLLM_SPEC=none skips vLLM for a quick check of vsup's side. Needs root, podman, debootstrap.
# Included by the top-level Makefile (-include mk/*.mk).

.PHONY: test-container
test-container:
	deploy/container/check.sh
