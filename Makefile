# spect-node: the two commands of the README's quick start, and their set-up.
# `make demo` and `make test` create the virtual environment themselves on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test peers clean-demo

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

## demo: phantom NM studies -> a node (shipped model) -> DICOM SEGs at a stand-in PACS; Dice and PNG overlays under demo/
demo: $(STAMP)
	rm -rf demo
	$(BIN)/spect-node demo --out demo

## peers: the real DICOM peers the tests use (Debian packages; needs root)
peers:
	@command -v storescu >/dev/null && command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null && command -v openssl >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk dicom3tools orthanc openssl >/dev/null; }

## test: the whole suite, slow tests included
test: $(STAMP) peers
	$(BIN)/pytest -q

clean-demo:
	rm -rf demo
