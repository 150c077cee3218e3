# The two commands a user needs: `make demo` and `make test`. Both set up whatever is missing first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tad-installed

.PHONY: setup demo test test-fast dashboard clean

$(STAMP): pyproject.toml requirements.lock scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/tad fetch --model smollm2-135m-instruct --model gemma3-270m

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	scripts/setup_browser.sh
	TAD_REQUIRE_ALL=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not gemma and not browser"

dashboard: setup
	$(BIN)/tad dashboard

clean:
	rm -rf $(VENV)
