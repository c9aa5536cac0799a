# The two commands of the README:  `make demo`  (the main job end to end)  and  `make test`.
# Both create .venv on first use. Torch: with an NVIDIA GPU (nvidia-smi answers) the default CUDA build;
# otherwise the CPU build of torch 2.13.0 (pip picks up a local CPU wheel where the machine has one, and
# TORCH_INDEX=<url> points pip at a CPU wheel index elsewhere). An unpinned torch would pull several GB of
# CUDA packages onto a CPU-only machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
OUT    ?= out/demo
GPU_CHECK_OUT ?= out/gpu_check.json
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test test-fast setup gpu-check clean-venv bench bench-shards

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "[setup] GPU found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
	    $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	    echo "[setup] no GPU: installing the CPU build of torch==$(TORCH_VERSION)"; \
	    $(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# One CUDA GPU, a few minutes: attention backends, the fp16 teacher, host syncs, packed pretraining tokens/s and
# MFU, into one JSON (benchmarks/gpu_check.py). Without a GPU it says so and exits 0.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

demo: setup
	$(PY) launch/demo.py --out $(OUT)

# The multi-node tests need sshd and pdsh: installed quietly where we are root with apt-get (else they skip).
test: setup
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    ! { [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null 2>&1; }; then \
	    apt-get install -y -qq openssh-server pdsh >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq openssh-server pdsh >/dev/null 2>&1; } || \
	    echo "[test] could not install openssh-server and pdsh: the multi-node tests will skip"; fi
	$(PY) -m pytest -q -rs --durations=25 tests

# Everything but the tests that start ranks through the deepspeed launcher (marked `slow` by tests/conftest.py).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) benchmarks/bench_corpus.py

# mosaicml-streaming pins numpy<2.2 and transformers<5 and pulls torchvision and cloud SDKs: it is installed
# without its dependencies, next to the few it imports (the `bench` extra).
bench-shards: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m pip install -q --no-deps 'mosaicml-streaming==0.13.0'
	$(PY) benchmarks/bench_shards.py

clean-venv:
	rm -rf $(VENV)
