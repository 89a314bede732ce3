# Debian packages (packaging/debian/): included by the Makefile.
#   make deb       build sendmail-shim and sendmail-shim-mta into dist/
#   make deb-lint  build, then lintian (fails on errors)
#   make test-deb  build, lint, install on this machine, deliver to a loopback relay, purge,
#                  restore the previous MTA (root only; see packaging/test-deb.sh)
.PHONY: deb deb-lint test-deb

deb:
	bash packaging/build-deb.sh

deb-lint: deb
	lintian --allow-root --fail-on error --info dist/sendmail-shim_*.changes

test-deb:
	bash packaging/test-deb.sh
