# Two commands for a fresh machine: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= outputs/demo

.PHONY: install demo test test-fast test-bf16 test-bf16-only bench gpu-check nnunet

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first, when missing: a bare `torch` would pull a multi-GB CUDA build on a CPU machine.
install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

demo: install
	$(BIN)/brats-synth --out data/synthetic --cases 20 --seed 0 --shape 120 120 78 --nonenhancing-share 0.25 \
	  --distractors --healthy-fraction 0.2 --quiet
	$(BIN)/brats-preprocess data=synthetic preprocess=modern
	$(BIN)/brats-train experiment=quickstart hydra.run.dir=$(RUN)/train ckpt_path=last
	$(BIN)/brats-postprocess run=$(RUN)/train overwrite=true
	$(BIN)/brats-predict ckpt_path=$(RUN)/train input=data/synthetic \
	  split_file=$(RUN)/train/split.json split_subset=test output=$(RUN)/predictions overwrite=true
	$(BIN)/brats-evaluate pred=$(RUN)/predictions truth=data/synthetic \
	  split_file=$(RUN)/train/split.json split_subset=test output=$(RUN)/evaluation overwrite=true
	$(BIN)/brats-report run=$(RUN)/train predictions=$(RUN)/predictions data_root=data/synthetic overwrite=true
	@echo "TensorBoard: $(BIN)/tensorboard --logdir $(RUN)/train/tensorboard"

# The whole suite, then the precision-sensitive tests again with `auto` forced to bf16 (see test-bf16).
test: install
	$(BIN)/ruff check brats_unet tests benchmarks
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory test-bf16-only

# The inner loop: unit tests only (no end-to-end runs), about a minute; CI runs `make test`.
test-fast: install
	$(BIN)/ruff check brats_unet tests benchmarks
	$(BIN)/pytest -q -m "not slow"

# The precision-sensitive tests (fixtures, API vs command, auto) with `auto` resolving to bf16, as on an AVX512-BF16 /
# AMX CPU, on any CPU (bf16 is emulated, slower, where the CPU lacks it); `make test` (CI) ends with it.
test-bf16: install
	$(MAKE) --no-print-directory test-bf16-only

test-bf16-only:
	BRATS_UNET_CPU_FLAGS=avx512_bf16 $(BIN)/pytest -q tests/test_api.py tests/test_ensemble.py tests/test_hardware.py

bench: install
	$(BIN)/python -m benchmarks.run_all

# nnU-Net v2 for the time-to-quality benchmark's `nnunet` arm (docs/speed.md): its dependencies without timm (whose
# torchvision does not import beside torch 2.13.0 CPU), then nnunetv2 itself with --no-deps; torch stays at 2.13.0.
NNUNET_PINS := nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
nnunet: install
	$(BIN)/pip install -q -c benchmarks/nnunet-constraints.txt -r benchmarks/nnunet-requirements.txt
	$(BIN)/pip install -q -c benchmarks/nnunet-constraints.txt --no-deps $(NNUNET_PINS)
	$(BIN)/python -c "import nnunetv2.training.nnUNetTrainer.nnUNetTrainer, torch; print('nnunetv2 ok, torch', torch.__version__)"

# On a CUDA machine, under ten minutes: gpu tests, the demo on the GPU, training throughput (paper U-Net, resenc) beside
# NVIDIA's published 27.48 img/s, deterministic vs cuDNN benchmark, full-case inference with and without TTA.
# Without CUDA it says so and exits 0. Writes benchmarks/results/gpu_check-<gpu>.json.
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)
