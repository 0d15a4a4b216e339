# One virtual environment for everything. torch comes first, from the pinned CPU wheel:
# an unpinned requirement would pull a multi-GB CUDA build (docs/architecture.md, "Installing").
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modular-installed
DS_CPU_OPS := $(VENV)/.deepspeed-cpu-ops-built
GCIDE := /usr/share/dictd/gcide.dict.dz

.PHONY: setup test lint demo gpu-check
setup: $(STAMP) $(DS_CPU_OPS)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[all,bench,dev]'
	touch $@

# DeepSpeed compiles its CPU all-reduce kernel (shared memory, ~35 s on 2 cores) the first time a
# run starts: compiled here, with the install, not inside the first `modular train` or `make demo`;
# kept in the environment (torch's default, ~/.cache/torch_extensions, is shared by all
# environments, which then recompile it in turn).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
$(DS_CPU_OPS): $(STAMP)
	$(PY) -c "import deepspeed; from deepspeed.accelerator import get_accelerator; \
		op = get_accelerator().create_op_builder('ShareMemCommBuilder'); \
		op is None or not deepspeed.ops.__compatible_ops__.get(op.NAME) or op.load()"
	touch $@

# The demo's real data: the GCIDE dictionary (Debian package dict-gcide) and apt's package index
# (the `software` task; lz4cat reads it where apt stores it lz4-compressed).
$(GCIDE):
	apt-get install -y -q dict-gcide || sudo apt-get install -y -q dict-gcide

.PHONY: apt-index
apt-index:
	@ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || apt-get update -q || sudo apt-get update -q
	@command -v lz4cat >/dev/null || apt-get install -y -q lz4 || sudo apt-get install -y -q lz4

# The AdaMerging benchmark's other task set (benchmarks/adamerging.py): WordNet, FOLDOC, fortunes.
.PHONY: bench-data
bench-data: apt-index $(GCIDE)
	dpkg -s wordnet-base dict-foldoc fortunes >/dev/null 2>&1 || apt-get install -y -q wordnet-base dict-foldoc fortunes || \
		sudo apt-get install -y -q wordnet-base dict-foldoc fortunes

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check modular moe merging finetune tests benchmarks examples

demo: setup apt-index $(GCIDE)
	HF_HUB_OFFLINE=1 $(VENV)/bin/modular demo

# On a CUDA machine: install the GPU extras (DeepSpeed, megablocks + grouped_gemm) over a CUDA build
# of torch, run the gpu-marked tests and a short bf16 experts benchmark, and say what was checked.
GPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
gpu-check:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || \
		$(PY) -m pip install -q torch==2.13.0 --index-url $(GPU_TORCH_INDEX)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[all,bench,dev,megablocks]'
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'make gpu-check needs a CUDA machine'; print('gpu-check on', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
	@echo "== gpu-marked tests: modular experts on CUDA bf16 without host syncs, megablocks vs eager, 1-bit Adam and AdaMoE on CUDA"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu -rs -p no:cacheprovider
	@echo "== experts, bf16 forward+backward: modular vs grouped_mm vs megablocks, same routing, with 50% null picks"
	$(PY) benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 16384 --hidden 2048 --ffn 4096 --repeats 20
	@if [ -f benchmarks/adamerging_memory.py ]; then echo "== AdaMerging step time"; $(PY) benchmarks/adamerging_memory.py; \
		else echo "== AdaMerging step time: skipped (benchmarks/adamerging_memory.py not in this tree)"; fi
	@echo "gpu-check done: gpu tests, experts benchmark (JSON above); record the output in benchmarks/RESULTS.md"
