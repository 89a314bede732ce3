# Debian packages (packaging/debian/): included by the Makefile.
#   make deb       build sendmail-shim and sendmail-shim-mta into dist/
#   make deb-lint  build, then lintian (fails on errors)
#   make test-deb  build, lint, install on this machine, deliver to a loopback relay, purge,
#                  restore the previous MTA (root only; see packaging/test-deb.sh)
#   make test-units build, boot a Debian 12 container under systemd-nspawn, install there and
#                  prove the systemd units and the submission service (root only; SKIPs where
#                  systemd cannot boot; see packaging/test-units.sh)
#   make test-deb-trixie the same in Debian 13, where the packages are also built and linted
#                  (Debian 13's debhelper, lintian, python3, python3-keyring, python3-dotenv)
.PHONY: deb deb-lint test-deb test-units test-deb-trixie

deb:
	bash packaging/build-deb.sh

deb-lint: deb
	lintian --allow-root --fail-on error --info dist/sendmail-shim_*.changes

test-deb:
	bash packaging/test-deb.sh

test-units:
	bash packaging/test-units.sh

test-deb-trixie:
	SUITE=trixie bash packaging/test-units.sh
