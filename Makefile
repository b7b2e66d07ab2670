# A fresh clone needs only `make test` and `make demo`: each bootstraps .venv itself.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: test demo bench venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision must be a matching pair (see README)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,onnx]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/bgd demo

bench: $(STAMP)
	$(PY) -m benchmarks.em_speed
	$(PY) benchmarks/decode_speed.py
	$(PY) benchmarks/digits.py
	$(PY) benchmarks/distributed.py
	$(PY) -m benchmarks.objective --end
	$(PY) -m benchmarks.budget
	$(PY) -m benchmarks.inference --lean
	$(PY) -m benchmarks.container

clean:
	rm -rf $(VENV) runs .pytest_cache
