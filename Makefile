# The README's commands. Every target that touches the kernel runs as root.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test unit kernel lint bench soak clean

setup:
	scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup lint
	$(PYTEST) tests/unit -q
	$(PYTEST) tests/kernel -q -m kernel

unit: setup
	$(PYTEST) tests/unit -q

kernel: setup
	$(PYTEST) tests/kernel -q -m kernel

lint: setup
	$(VENV)/bin/ruff check monitor tests bench scripts
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run.py

soak: setup
	$(PY) bench/soak.py

clean:
	-$(PY) -m monitor lab down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
