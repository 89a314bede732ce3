# `make test` and `make demo` set up what they need: Debian packages (when root), the venv, pip.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Debian's interpreter and libraries: the .deb runs on them, so CI runs the end-to-end tests on them too.
APT_PACKAGES := python3 python3-venv python3-keyring python3-dotenv python3-oauthlib ca-certificates \
  php-cli php-mbstring libphp-phpmailer php-symfony-mailer php-swiftmailer git git-email libmailtools-perl mailutils mutt swaks \
  pflogsumm

.PHONY: test lint test-venv test-debian test-pythons demo apt-deps clean

include packaging/deb.mk

test: lint test-venv test-debian

# ruff (its settings are in pyproject.toml): pyflakes, pycodestyle and bugbear over all the Python.
lint: $(VENV)/.installed
	$(VPY) -m ruff check sendmail_shim tests bench packaging

test-venv: $(VENV)/.installed
	$(VPY) -m pytest -q

# The end-to-end tests again, with the shim run by /usr/bin/python3 and Debian's python3-keyring
# and python3-dotenv (the relay and pytest still come from the venv).
test-debian: $(VENV)/.installed apt-deps
	SHIM_PYTHON=/usr/bin/python3 $(VPY) -m pytest -q -m e2e

# The suite on every other Python 3.11-3.13 this machine has (on PATH, or kept by pyenv, whose
# shims fail unless a version is selected), each in its own venv with the keyring and python-dotenv
# that the distribution shipping that Python has; the venv of `make test` has the newest from PyPI
# and test-debian Debian 12's own.
TEST_PYTHONS := 3.11 3.12 3.13
# Debian 12 ships keyring 23.9.3 and python-dotenv 0.21.0, Ubuntu 24.04 24.3.1 and 1.0.1, Debian 13
# 25.6.0 and 1.0.1: https://packages.debian.org/src:python-keyring,
# https://packages.ubuntu.com/source/noble/python-keyring, https://packages.ubuntu.com/noble/python3-dotenv
# and the trees of make test-units / test-deb-trixie (apt-cache policy python3-dotenv).
PINS_3.11 := 'keyring>=23.9,<24' 'python-dotenv>=0.21,<0.22'
PINS_3.12 := 'keyring>=24,<25' 'python-dotenv>=1.0,<1.1'
PINS_3.13 := 'keyring>=25,<26' 'python-dotenv>=1.0,<1.1'
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)

test-pythons: $(VENV)/.installed
	@mine=$$($(VPY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); status=0; \
	for v in $(TEST_PYTHONS); do \
	  if [ $$v = $$mine ]; then echo "python$$v: tested by make test ($(VENV))"; continue; fi; \
	  py=''; \
	  for c in $$(command -v python$$v) $$(ls -d $(PYENV_ROOT)/versions/$$v.*/bin/python$$v 2>/dev/null | sort -rV); do \
	    if $$c -c '' 2>/dev/null; then py=$$c; break; fi; \
	  done; \
	  if [ -z "$$py" ]; then echo "SKIP python$$v: not found"; continue; fi; \
	  echo "python$$v: $$py in .venv-$$v"; \
	  $(MAKE) --no-print-directory .venv-$$v/.installed PY=$$py && .venv-$$v/bin/python -m pytest -q -m 'not slow' \
	    || { echo "FAIL python$$v"; status=1; }; \
	done; exit $$status

# (Makefile: a change of the pins above reinstalls)
.venv-%/.installed: setup.cfg pyproject.toml Makefile
	test -x .venv-$*/bin/python || $(PY) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q -e '.[test]' $(PINS_$*)
	touch $@

demo: $(VENV)/.installed
	$(VPY) -m tests.demo

apt-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing Debian packages: $$missing (run: sudo apt-get install $$missing)"; exit 1; fi; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	$(MAKE) apt-deps
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .venv-3.* build dist *.egg-info .pytest_cache

# sendmail-shim against msmtp on this machine (installs msmtp from Debian when root); the table goes
# to bench/results/. bench-smoke: tiny counts, only proves the script still works (CI).
.PHONY: bench bench-smoke
bench: $(VENV)/.installed apt-deps
	$(VPY) bench/run.py

bench-smoke: $(VENV)/.installed apt-deps
	$(VPY) bench/run.py --smoke

# Translations (needs Debian's gettext): re-extract the messages from the source into the
# template, merge it into each catalog, compile the catalogs. The .mo files are committed, so a
# clean clone, pip install and the Debian build need no gettext; tests/test_i18n.py fails when a
# message has no translation or a .mo is older than its .po.
.PHONY: po
po:
	xgettext --language=Python --keyword=_ --from-code=UTF-8 --no-wrap --sort-by-file \
		--package-name=sendmail-shim --msgid-bugs-address= -o po/sendmail-shim.pot sendmail_shim/*.py
	for po in po/*.po; do \
		lang=$$(basename $$po .po); \
		msgmerge --quiet --update --no-wrap --backup=none $$po po/sendmail-shim.pot && \
		mkdir -p sendmail_shim/locale/$$lang/LC_MESSAGES && \
		msgfmt --check --statistics -o sendmail_shim/locale/$$lang/LC_MESSAGES/sendmail-shim.mo $$po || exit 1; \
	done
