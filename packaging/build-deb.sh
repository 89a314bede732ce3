#!/usr/bin/env bash
# Build the Debian packages sendmail-shim and sendmail-shim-mta into dist/.
#
# The working tree's files (tracked, and new ones not ignored: uncommitted work builds too) are
# copied to a temporary directory, packaging/debian/ becomes debian/ there, and
# dpkg-buildpackage -us -uc -b runs on Debian's own tools. As root, missing build dependencies
# are installed with apt-get first.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIST="$ROOT/dist"
# Debian's interpreter and tools, whatever the caller's PATH (a pyenv or venv python3 must not
# build the package).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8

need_root_for() {
    if [ "$(id -u)" != 0 ]; then
        echo "build-deb.sh: missing $1; as root this script installs it (or: sudo $2)" >&2
        exit 1
    fi
}

install_tools() {
    local missing=() pkg
    for pkg in dpkg-dev git; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    need_root_for "${missing[*]}" "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Build-Depends of debian/control, resolved by apt itself.
install_build_deps() {
    local unmet
    unmet=$(cd "$1" && dpkg-checkbuilddeps 2>&1) && return
    need_root_for "build dependencies (${unmet##*: })" "apt-get install ${unmet##*: }"
    echo "build-deb.sh: installing the build dependencies" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq --no-install-recommends "$1" >/dev/null
}

check_version() {
    local package upstream
    package=$(dpkg-parsechangelog -l "$ROOT/packaging/debian/changelog" -S Version)
    upstream=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/sendmail_shim/__init__.py")
    if [ "${package%%-*}" != "$upstream" ]; then
        echo "build-deb.sh: packaging/debian/changelog says $package, sendmail_shim says $upstream:" \
            "add a changelog entry (dch -v $upstream)" >&2
        exit 1
    fi
}

install_tools
check_version

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/sendmail-shim"
mkdir "$SRC"
# Only files that exist: a tracked file deleted in the working tree is not part of the build.
(cd "$ROOT" && git ls-files -z -co --exclude-standard -- . ':!packaging/debian' \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$SRC")
cp -r "$ROOT/packaging/debian" "$SRC/debian"
install_build_deps "$SRC"

(cd "$SRC" && dpkg-buildpackage -us -uc -b >"$WORK/build.log" 2>&1) || {
    tail -n 60 "$WORK/build.log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed (last 60 lines above)" >&2
    exit 1
}

mkdir -p "$DIST"
rm -f "$DIST"/sendmail-shim*.deb "$DIST"/sendmail-shim*.changes "$DIST"/sendmail-shim*.buildinfo
cp "$WORK"/*.deb "$WORK"/*.changes "$WORK"/*.buildinfo "$DIST/"
ls -1 "$DIST"/*.deb
