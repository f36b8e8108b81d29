# The README's commands. Every target that touches the kernel runs as root.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test unit kernel cluster cluster-build image lint bench soak clean

setup:
	scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup lint cluster-build
	$(PYTEST) tests/unit -q
	$(PYTEST) tests/kernel -q -m kernel --durations=25

# The real control plane of the cluster tests, built from the published Go modules and
# cached by release (tests/cluster/build.sh); a cold build prints its time.
# Without Go (exit 3) the cluster tests skip and say why.
cluster-build:
	tests/cluster/build.sh >/dev/null || [ $$? -eq 3 ]

# A real single-node control plane on loopback to try podnetmon against; Ctrl-C ends it.
cluster: setup cluster-build
	$(PY) -m tests.cluster

# The daemon's image from the Dockerfile, with buildah on an mmdebstrap'd Debian 12 (no
# registry); prints the docker-archive it wrote (scripts/image.sh).
image: setup
	scripts/image.sh

unit: setup
	$(PYTEST) tests/unit -q

kernel: setup
	$(PYTEST) tests/kernel -q -m kernel

# hadolint on the Dockerfile, checkov on the manifests and the Dockerfile: every finding
# fixed or skipped with its reason beside it (tests/unit/test_deploy.py checks the reasons).
lint: setup
	$(VENV)/bin/ruff check monitor podnetlab tests bench scripts
	$(VENV)/bin/mypy
	.tools/bin/hadolint Dockerfile
	CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE .tools/bin/checkov --quiet --compact \
	  --skip-download -d deploy --framework kubernetes
	CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE .tools/bin/checkov --quiet --compact \
	  --skip-download -f Dockerfile --framework dockerfile

bench: setup
	$(PY) bench/run.py

soak: setup
	$(PY) bench/soak.py

clean:
	-$(PY) -m monitor lab down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
