# Everything needed on a fresh machine: `make demo`, `make test`.
# torch from PyPI is the CUDA build (it runs on CPU too) and torchvision has no CPU-only wheel, so both come
# from the registry together. --isolated ignores local pip config that could pull a CPU-only torch wheel, which
# the PyPI torchvision cannot load against.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.13.0 torchvision==0.28.0

.PHONY: demo test venv data browser lint bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --isolated $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

# Real Fashion-MNIST from Debian (offline); optional: built-ins fall back to other sources.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "note: dataset-fashion-mnist not installed"; fi

demo: venv data
	$(BIN)/visionkit demo

# Headless Chromium opens the HTML report in tests/test_report.py (the test skips without it).
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
		|| echo "note: chromium not installed; the report's browser test will skip"; fi

# One pytest worker per core (pytest-xdist), each test file on one worker (its module fixtures are built once),
# one torch thread per worker: two workers on two cores beat one worker with two threads, whose OpenMP threads
# sit idle through the many small ops and process start-ups of the suite.
test: venv browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15 tests

lint: venv
	$(BIN)/ruff check visionkit tests benchmarks

bench: venv data
	$(BIN)/python benchmarks/fashion_mnist.py

clean:
	rm -rf $(VENV) runs
