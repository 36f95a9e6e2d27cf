# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (the extension builds against the system libjpeg-turbo).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test bench bench-quick clean

$(VENV)/.base: pyproject.toml src/nearstore/ops/_c/jpeg_region.c src/nearstore/ops/_c/image_kernels.c
	@test -f /usr/include/jpeglib.h || { echo "libjpeg-turbo headers missing: run 'apt-get install -y libjpeg62-turbo-dev' (Debian/Ubuntu)"; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install setuptools==80.9.0 wheel
	$(PIP) install torch==2.13.0
	$(PIP) install --no-build-isolation -e '.[test,ray]'
	touch $@

# DALI (CPU pipelines) is only a benchmark baseline: best effort, the benchmark notes its absence.
$(VENV)/.dali: $(VENV)/.base
	-$(PIP) install 'nvidia-dali-cuda120==2.4.0' || echo "DALI not installed: the benchmark will skip it with a note"
	touch $@

demo: $(VENV)/.dali
	$(VENV)/bin/nearstore demo

test: $(VENV)/.base
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports --no-cache  # the layering and no import cycles (pyproject.toml's contracts)
	$(PY) -m pytest -q -m "not long"

bench: $(VENV)/.dali
	$(PY) bench/run.py --json bench/results/host.json
	$(PY) bench/nodes.py --json bench/results/nodes.json --plot docs/img/splits.png
	$(PY) bench/model.py --json bench/results/model.json
	$(PY) bench/reliability.py --json bench/results/reliability.json
	$(PY) bench/reliability.py --chaos --seconds 600 --json bench/results/chaos.json
	$(PY) bench/plan.py --json bench/results/plan.json
	$(PY) bench/engines.py --json bench/results/engines.json
	$(PY) bench/multihost.py --json bench/results/multihost.json
	$(PY) bench/train_head.py --json bench/results/train-head.json
	$(PY) bench/sweep.py --json bench/results/sweep.json

bench-quick: $(VENV)/.base
	$(PY) bench/run.py --quick --json bench/results/quick.json
	$(PY) bench/nodes.py --quick --json bench/results/nodes-quick.json
	$(PY) bench/model.py --points 100000 --json bench/results/model-quick.json
	$(PY) bench/reliability.py --quick --json bench/results/reliability-quick.json
	$(PY) bench/reliability.py --chaos --quick --json bench/results/chaos-quick.json
	$(PY) bench/plan.py --quick --json bench/results/plan-quick.json
	$(PY) bench/engines.py --quick --json bench/results/engines-quick.json
	$(PY) bench/multihost.py --quick --json bench/results/multihost-quick.json
	$(PY) bench/jobs.py --quick --json bench/results/jobs-quick.json
	$(PY) bench/train_head.py --quick --json bench/results/train-head-quick.json
	$(PY) bench/sweep.py --quick --json bench/results/sweep-quick.json

clean:
	rm -rf $(VENV) demo-out build src/*.egg-info src/nearstore/ops/*.so
