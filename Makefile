# Two commands for a fresh machine:
#   make run    set up .venv and run the whole pipeline on the embedded default
#   make test   set up .venv and run all tests

PYTHON ?= python3
CORES ?= 2
VENV := .venv
# The torch/torchvision pair that imports beside timm on the reference machine.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test lint clean

setup: $(VENV)/.setup-done

# Re-runs only when pyproject.toml changes; an existing .venv is reused.
$(VENV)/.setup-done: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH_PINS)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results/ logs/ .snakemake/
