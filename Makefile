# One virtual environment for everything. torch comes first, from the pinned CPU wheel:
# an unpinned requirement would pull a multi-GB CUDA build (docs/architecture.md, "Installing").
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modular-installed
GCIDE := /usr/share/dictd/gcide.dict.dz

.PHONY: setup test lint demo
setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 setuptools wheel
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[all,bench,dev]'
	touch $@

# The demo's real data: the GCIDE dictionary (Debian package dict-gcide) and apt's package index
# (the `software` task; lz4cat reads it where apt stores it lz4-compressed).
$(GCIDE):
	apt-get install -y -q dict-gcide || sudo apt-get install -y -q dict-gcide

.PHONY: apt-index
apt-index:
	@ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || apt-get update -q || sudo apt-get update -q
	@command -v lz4cat >/dev/null || apt-get install -y -q lz4 || sudo apt-get install -y -q lz4

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check modular moe merging finetune tests benchmarks examples

demo: setup apt-index $(GCIDE)
	HF_HUB_OFFLINE=1 $(VENV)/bin/modular demo
