# make test   set-up (a .venv with torch, ninja, pytest, numpy), the build, zclip's own test suite against
#             fusedclip.ZClip (test-zclip-upstream), the Triton backend in Triton's interpreter
#             (test-triton-interpret), the test suite
# make bench  set-up, the build, then the benchmark
# make test-compat  the suite on the other torches users run (scripts/compat_test.sh; CI runs it after test)
# make test-sanitize  the CPU extension under ASan+UBSan (its own build), the C++-heavy CPU tests against it
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
MAX_JOBS ?= 2
SOURCES := $(wildcard csrc/*/* csrc/*.cpp csrc/*.h) setup.py pyproject.toml tools/build_config.py

.PHONY: setup build test test-zclip-upstream test-triton-interpret test-compat compat-venvs test-sanitize bench bench-note cmake-build clean

setup: $(VENV)/.installed
$(VENV)/.installed:
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "torch>=2.6" ninja pybind11 pytest numpy expecttest matplotlib cmake hypothesis
	# the frameworks tests/test_patch.py runs real training steps with (they keep the installed torch)
	# accelerate < 1.16: 1.16 computes the norm itself (vector_norm per tensor, then torch.nn.utils.clip_grads_with_norm_)
	# and no longer calls clip_grad_norm_, which patch_torch replaces; following it is open work
	$(PYTHON) -m pip install -q "accelerate<1.16" lightning
	$(PYTHON) -m pip install -q transformers timm  # tests/integration/test_frameworks.py; timm pulls torchvision
	$(PYTHON) -m pip install -q --no-deps "zclip==1.0.0"  # tests/test_zclip.py compares with it (it needs only torch)
	# the oldest CMake CMakeLists.txt declares, for tests/tooling/test_build.py's configure check
	$(PYTHON) -m pip install -q --no-deps --target $(VENV)/cmake-min "cmake==3.25.*"
	$(PYTHON) -m pip install -q --target $(VENV)/triton36 --no-deps "triton==3.6.0"
	touch $@

# Rebuilt only when a source or build file changed.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(PYTHON) -m fusedclip info
	touch $@

test: build test-zclip-upstream test-triton-interpret
	$(PYTHON) -m pytest -q -ra tests

# The Triton backend's kernels on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1 must be set before Triton
# is imported, so a pytest process of its own, which runs the cases whose ids name "triton" in these modules
# (all of tests/test_triton.py). Without a GPU or the variable, `pytest tests` skips them and says where they run.
# scripts/compat_test.sh runs the same selection on the other torches (print-TRITON_TESTS).
TRITON_TESTS := tests/test_triton.py tests/test_ops.py tests/test_agc.py tests/test_fused_extras.py \
	tests/test_zclip_fused.py tests/test_accuracy.py
test-triton-interpret: build
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -ra -k triton $(TRITON_TESTS)

print-%:
	@echo $($*)

# zclip 1.0.0's own tests (those of its published sdist; none is kept in this repository) with zclip.ZClip
# replaced by fusedclip.ZClip (tests/zclip_upstream/fusedclip_as_zclip.py, which also deselects, with the reason,
# the tests of zclip's private methods and the one that fails on zclip itself): native backend, then Triton
# under its interpreter in its own process. The sdist is downloaded once (its hash checked), unpacked afresh.
ZCLIP_DIR := build/zclip-upstream
ZCLIP_SDIST := $(ZCLIP_DIR)/zclip-1.0.0.tar.gz
ZCLIP_SHA256 := 8fd6098e4b7ba81884c2493b187cc87d527e2be5478e2c8d4d77ab85318e622f
ZCLIP_PYTEST = PYTHONPATH=tests/zclip_upstream $(PYTHON) -m pytest -q -ra -p fusedclip_as_zclip \
	-c tests/zclip_upstream/pytest.ini --rootdir $(ZCLIP_DIR)/zclip-1.0.0 $(ZCLIP_DIR)/zclip-1.0.0/tests

$(ZCLIP_SDIST): | $(VENV)/.installed
	rm -rf $(ZCLIP_DIR)/download && mkdir -p $(ZCLIP_DIR)
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: "zclip==1.0.0" -d $(ZCLIP_DIR)/download
	echo "$(ZCLIP_SHA256)  $(ZCLIP_DIR)/download/zclip-1.0.0.tar.gz" | sha256sum -c --quiet
	mv $(ZCLIP_DIR)/download/zclip-1.0.0.tar.gz $@ && rm -rf $(ZCLIP_DIR)/download

test-zclip-upstream: build $(ZCLIP_SDIST)
	rm -rf $(ZCLIP_DIR)/zclip-1.0.0
	tar -xzf $(ZCLIP_SDIST) -C $(ZCLIP_DIR)
	$(ZCLIP_PYTEST)
	TRITON_INTERPRET=1 $(ZCLIP_PYTEST) --fusedclip-backend=triton

# Each in a venv and a copy of the tree of its own under .compat/ (scripts/compat_test.sh): torch 2.6.0 on
# Python 3.10 (the PyTorch 2.6 image's torch; a CPU-only build, Triton 3.2 under its interpreter) and torch 2.11.0
# with Triton 3.6 on Python 3.12 (the GPU machine's stack; the CUDA build for sm_90).
COMPAT_TORCH ?= 2.6.0 2.11.0
test-compat:
	@for v in $(COMPAT_TORCH); do MAX_JOBS=$(MAX_JOBS) scripts/compat_test.sh $$v || exit 1; done

# Only their venvs (downloads): .ci/run makes them in the background while the default build compiles.
compat-venvs:
	@for v in $(COMPAT_TORCH); do scripts/compat_test.sh --venv-only $$v || exit 1; done
# The CPU extension built with -fsanitize=address,undefined in build-sanitize/tree (a copy of the tree: the in-place
# module is left alone), then the CPU tests that exercise the C++ with the sanitizer runtimes preloaded; fails on
# any sanitizer report. scripts/test_sanitize.sh explains the options. On 2 cores (CI's clean clone, 2026-12-02):
# the first build of the sanitized module 113 s (-O0), the tests 112 s; later builds only what changed.
test-sanitize: $(VENV)/.installed
	MAX_JOBS=$(MAX_JOBS) scripts/test_sanitize.sh $(PYTHON)

# bench-note first: it prints before the set-up and the build, which take minutes on a fresh machine.
bench: bench-note build
	$(PYTHON) -m fusedclip info
	$(PYTHON) -m fusedclip bench --targets bench/targets.py $(BENCH_ARGS)

bench-note:
	@echo "make bench: set-up and build if needed, then about 5-10 minutes on 2 cores; results in" \
	  "bench/results/local/ (git-ignored); make bench BENCH_ARGS='--out bench/results' for a run to commit"

# The CMake build of the same module (into build-cmake/fusedclip/); tests/tooling/test_build.py builds it too.
cmake-build: $(VENV)/.installed
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DPython_EXECUTABLE=$(abspath $(PYTHON))
	$(VENV)/bin/cmake --build build-cmake -j $(MAX_JOBS)

clean:
	rm -rf build build-cmake *.egg-info fusedclip/*.so $(VENV)/.built .compat/*/src
	rm -rf build build-cmake build-sanitize *.egg-info fusedclip/*.so $(VENV)/.built
