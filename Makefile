# A fresh clone needs only `make test` and `make demo`: each bootstraps .venv itself.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: test demo bench venv clean detectron2

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
	$(PY) -m benchmarks.kmeans_limit
	$(PY) -m benchmarks.hessian_speed
	$(PY) -m benchmarks.distill_step
	$(PY) -m benchmarks.teacher_cache
	$(PY) -m benchmarks.collect_throughput
	$(PY) -m benchmarks.permute

# detectron2 is not on PyPI: build it from source into .venv. D2_SRC is a source directory, a
# .tar.gz of one, or anything pip installs (default: the official git repository).
# setuptools: <81 because detectron2.model_zoo imports pkg_resources, >=70.1 to build wheels
# without the wheel package (--no-build-isolation uses the environment's setuptools).
D2_SRC ?= git+https://github.com/facebookresearch/detectron2.git

detectron2: $(STAMP)
	$(PY) -m pip install -q "setuptools>=70.1,<81"
	@set -e; src='$(D2_SRC)'; \
	case "$$src" in \
	  *.tar.gz|*.tgz) tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; tar xzf "$$src" -C "$$tmp"; \
	    setup=$$(find "$$tmp" -maxdepth 2 -name setup.py | head -n 1); \
	    test -n "$$setup" || { echo "D2_SRC=$$src: no setup.py in the archive" >&2; exit 1; }; \
	    src=$$(dirname "$$setup");; \
	esac; \
	echo "building detectron2 from $$src (a few minutes: it compiles its C++ ops)"; \
	$(PY) -m pip install -q --no-build-isolation "$$src"
	$(PY) -c "import detectron2; print('detectron2', detectron2.__version__, 'installed')"

clean:
	rm -rf $(VENV) runs .pytest_cache
