#!/usr/bin/env bash
# The systemd units under a real systemd: build the .debs, boot a Debian tree (debootstrap,
# cached; SUITE=bookworm by default, SUITE=trixie for Debian 13: `make test-deb-trixie`) with
# systemd-nspawn, apt-get install the packages in it, and prove there that
# sendmail-shim.socket listens as it should, that a user who may not write the queue submits
# through it, that the submission socket-activates sendmail-shim.service (sandboxed, as user
# sendmail-shim) and reaches a loopback test relay on the host, what systemd-analyze security
# says of the service, and that the first two attacks of issue 13 fail against the installed
# units (an unprivileged user writing into the maildrop; root's planted directories stopping
# the pickup for everyone else); then root's own mail and the purge.
#
# A SUITE other than the host's own release is also where the packages are built: the tree gets
# the build dependencies, packaging/build-deb.sh and lintian run in it (under systemd-nspawn,
# before it boots), so that release's debhelper, dh-python and lintian judge the packages, and
# its python3, python3-keyring and python3-dotenv run them.
#
# The container shares the host's network namespace (127.0.0.1 is the host's: the relay runs
# there, in the project venv, as in test-deb.sh); nothing is installed on the host but the tools
# (debootstrap, systemd-container). The base tree is cached in $SHIM_TEST_CACHE (default
# /var/cache/sendmail-shim-test), refreshed after 30 days; each run boots a throw-away copy.
#
# Every check prints PASS or FAIL; the last line is "N passed, M failed"; the exit status is
# non-zero when anything failed. A machine that cannot boot systemd in a container (not root,
# no debootstrap mirror, no nspawn, a kernel or sandbox that refuses) prints a SKIP line with
# the reason and exits 0.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CALLER_PATH=$PATH  # for `make`: the venv is the caller's business, not Debian's interpreter
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
VENV_PY="$ROOT/.venv/bin/python"
SUITE=${SUITE:-bookworm}
HOST_SUITE=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
CACHE=${SHIM_TEST_CACHE:-/var/cache/sendmail-shim-test}
BASE="$CACHE/$SUITE"
# What the cached tree holds; a change here (or 30 days) rebuilds it. debootstrap cannot resolve
# virtual packages (python3-cryptography's python3-cffi-backend-api-*): apt installs the rest.
BOOTSTRAP_PACKAGES=systemd,systemd-sysv,dbus
APT_PACKAGES="python3 python3-keyring python3-dotenv"
# Building in the tree: build-deb.sh's tools and lintian (apt-get build-dep adds debian/control's
# Build-Depends; build-deb.sh installs any added since).
BUILD_PACKAGES=''
[ "$SUITE" = "$HOST_SUITE" ] || BUILD_PACKAGES="git dpkg-dev lintian"
RECIPE="1 $SUITE minbase $BOOTSTRAP_PACKAGES $APT_PACKAGES${BUILD_PACKAGES:+ $BUILD_PACKAGES build-dep}"
DEBS="$ROOT/dist"
LOGIN=alice@163.test
PASSWORD="test-Auth-Code-$$"
SPOOL=/var/spool/sendmail-shim
SOCKET=/run/sendmail-shim/submit.sock
CONF=/etc/sendmail-shim/sendmail-shim.env
TOKEN=$(date +%s)-$$
PASSED=0 FAILED=0
WORK='' RUN='' CT='' RELAY_PID='' NSPAWN_PID='' LEADER='' BOOTS=0

# shellcheck source=packaging/test-lib.sh
source "$ROOT/packaging/test-lib.sh"
# skip REASON [EVIDENCE]: this machine cannot run the test; not a failure of the project.
skip() {
    echo "SKIP: systemd units not tested on Debian $SUITE: $1"
    [ -z "${2:-}" ] || sed 's/^/    /' <<<"$2"
    exit 0
}
indent() { sed "s/^/    ${1:-}/"; }
elapsed() { echo "$(( $(date +%s) - START ))s"; }

# in_ct COMMAND...: run in the booted container (its namespaces and root; a clean environment).
in_ct() {
    nsenter --target "$LEADER" --all --root --wd -- \
        /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$@"
}
# as_user USER COMMAND...: in the container, as USER, with the environment cron or PHP would give.
as_user() {
    local user=$1
    shift
    in_ct timeout 90 runuser -u "$user" -- /usr/bin/env -i PATH=/usr/bin:/bin LANG=C.UTF-8 HOME=/nonexistent "$@"
}
# send_as USER TEXT RCPT: USER sends a message whose subject is TEXT with /usr/sbin/sendmail -i.
send_as() { printf 'Subject: %s\n\n%s\n' "$2" "sent by $1" | as_user "$1" /usr/sbin/sendmail -i "$3"; }
set_password() { printf '%s\n' "$PASSWORD" | in_ct sendmail-shim --set-password; }
relay_wait() { "$VENV_PY" "$ROOT/packaging/test-relay.py" wait "$WORK/relay" "$@"; }
json() { /usr/bin/python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)[sys.argv[1]]))' "$1"; }
journal() { in_ct journalctl --no-pager -o short-precise "$@"; }

# ---- the machine ------------------------------------------------------------------------------
preflight() {
    [ "$(id -u)" = 0 ] || skip "not root (booting a container needs root)"
    [ -r /etc/debian_version ] && command -v apt-get >/dev/null || skip "not a Debian machine"
    command -v nsenter >/dev/null || skip "no nsenter (util-linux)"
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}"
        local out
        out=$(apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1) \
            || out=$(apt-get update -qq 2>&1 && apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1) \
            || skip "cannot install ${missing[*]}" "$out"
    fi
    [ -e "/usr/share/debootstrap/scripts/$SUITE" ] \
        || skip "this debootstrap ($(dpkg-query -W -f='${Version}' debootstrap)) does not know $SUITE"
}

# The Debian mirror apt uses here (debootstrap takes the same one).
mirror() {
    local site
    site=$(apt-get indextargets --format '$(SITE) $(RELEASE)' 2>/dev/null | awk -v s="$SUITE" '$2 == s {print $1; exit}')
    echo "${site:-http://deb.debian.org/debian}"
}

# The cached base tree: debootstrap --variant=minbase, systemd, dbus, Debian's python3 and the
# packages' dependencies; rebuilt when RECIPE changes or after 30 days.
base_tree() {
    if [ -f "$BASE/.sendmail-shim-test" ] && [ "$(cat "$BASE/.sendmail-shim-test")" = "$RECIPE" ] \
        && [ -n "$(find "$BASE/.sendmail-shim-test" -mtime -30)" ]; then
        echo "base tree: cached $BASE"
        return
    fi
    local new="$BASE.new" site
    site=$(mirror)
    echo "base tree: debootstrap $SUITE from $site into $BASE (cached for later runs)"
    rm -rf --one-file-system "$new"
    if ! debootstrap --variant=minbase --include="$BOOTSTRAP_PACKAGES" "$SUITE" "$new" "$site" \
        >"$WORK/debootstrap.log" 2>&1; then
        local log
        log=$(tail -n 15 "$WORK/debootstrap.log"; [ ! -f "$new/debootstrap/debootstrap.log" ] \
            || grep -iE 'error|fail' "$new/debootstrap/debootstrap.log" | tail -n 10)
        rm -rf --one-file-system "$new"
        skip "debootstrap $SUITE from $site failed" "$log"
    fi
    in_new_tree "apt-get install $APT_PACKAGES" "apt-get install -y -qq --no-install-recommends $APT_PACKAGES"
    if [ -n "$BUILD_PACKAGES" ]; then
        mkdir -p "$new/root/build-deps"
        cp -r "$ROOT/packaging/debian" "$new/root/build-deps/debian"
        in_new_tree "installing the build dependencies" "apt-get install -y -qq --no-install-recommends $BUILD_PACKAGES &&
            cd /root/build-deps && apt-get build-dep -y -qq --no-install-recommends ./"
        rm -rf "$new/root/build-deps"
    fi
    chroot "$new" apt-get clean
    rm -f "$new/etc/hostname" "$new/etc/machine-id"
    : >"$new/etc/machine-id"  # empty: systemd makes a fresh one per boot, no first-boot units
    echo "$RECIPE" >"$new/.sendmail-shim-test"
    rm -rf --one-file-system "$BASE"
    mv "$new" "$BASE"
}

# in_new_tree WHAT SCRIPT: run the sh SCRIPT in base_tree's $new; when it fails, drop $new and SKIP.
in_new_tree() {
    if ! chroot "$new" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -c "$2" >"$WORK/apt.log" 2>&1; then
        local log
        log=$(tail -n 20 "$WORK/apt.log")
        rm -rf --one-file-system "$new"
        skip "$1 in the new tree failed" "$log"
    fi
}

# boot: start systemd in the copy $CT and wait until it is up; sets NSPAWN_PID and LEADER.
boot() {
    BOOTS=$((BOOTS + 1))
    local log="$RUN/boot-$BOOTS.log" _ state
    systemd-nspawn --boot --directory="$CT" --machine="shim-units-$$" --register=no --keep-unit \
        --console=read-only --link-journal=no </dev/null >"$log" 2>&1 &
    NSPAWN_PID=$! LEADER=''
    for _ in $(seq 300); do
        kill -0 "$NSPAWN_PID" 2>/dev/null || break
        LEADER=$(pgrep -P "$NSPAWN_PID" -x systemd | head -n1)
        [ -n "$LEADER" ] && [ -S "/proc/$LEADER/root/run/systemd/private" ] && break
        LEADER=''
        sleep 0.1
    done
    if [ -z "$LEADER" ]; then
        kill "$NSPAWN_PID" 2>/dev/null; wait "$NSPAWN_PID" 2>/dev/null
        NSPAWN_PID=''
        skip "systemd-nspawn --boot did not start systemd in a Debian $SUITE tree" "$(tail -n 30 "$log")"
    fi
    state=$(timeout 120 nsenter --target "$LEADER" --all --root --wd -- \
        /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin systemctl is-system-running --wait 2>&1)
    case $state in
        running) ;;
        degraded) echo "    the container's systemd is degraded:"; in_ct systemctl --failed --no-pager --plain | indent ;;
        *) local evidence
           evidence=$(tail -n 30 "$log"; echo "systemctl is-system-running: $state";
                      in_ct systemctl list-jobs --no-pager 2>&1 | head -n 20)
           skip "systemd in the container did not finish booting in 120 s" "$evidence" ;;
    esac
    echo "booted systemd $(in_ct systemctl --version | awk 'NR == 1 {print $2}') in $CT (boot $BOOTS: $state; $(elapsed) since the start)"
}

poweroff() {
    [ -n "$NSPAWN_PID" ] || return 0
    kill -TERM "$NSPAWN_PID" 2>/dev/null  # nspawn asks the container's systemd to power off
    local _ started=$SECONDS
    for _ in $(seq 300); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        echo "    the container did not power off in 30 s: killed"
        kill -KILL "$NSPAWN_PID" 2>/dev/null
        [ -z "$LEADER" ] || kill -KILL "$LEADER" 2>/dev/null
    fi
    wait "$NSPAWN_PID" 2>/dev/null
    echo "powered the container off in $((SECONDS - started)) s"
    NSPAWN_PID='' LEADER=''
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ -z "$RELAY_PID" ] || kill "$RELAY_PID" 2>/dev/null
    poweroff
    if [ -n "$RUN" ]; then
        if [ -n "${SHIM_TEST_KEEP:-}" ]; then echo "kept $RUN"; else rm -rf --one-file-system "$RUN"; fi
    fi
    [ -z "$WORK" ] || rm -rf "$WORK"
    summary
    [ "$FAILED" -eq 0 ] && exit "$status"
    exit 1
}

# ---- build ------------------------------------------------------------------------------------
build() {
    if bash "$ROOT/packaging/build-deb.sh" >"$WORK/build.log" 2>&1; then
        pass "dpkg-buildpackage built $(cd "$ROOT/dist" && echo *.deb)"
    else
        indent <"$WORK/build.log"
        abort "package build failed (packaging/build-deb.sh)"
    fi
}

# In the tree's copy, before it boots: build-deb.sh on a copy of the checkout, then lintian, as
# `make deb-lint` does on the host (the packages stay in the copy: $DEBS).
build_in_tree() {
    local src="$CT/root/src"
    mkdir -p "$src"
    tar -C "$ROOT" --exclude='./.venv*' --exclude=./dist --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./.pytest_cache --exclude=./.hypothesis -cf - . | tar -xf - -C "$src"
    DEBS="$src/dist"
    if in_tree build.log bash /root/src/packaging/build-deb.sh; then
        pass "dpkg-buildpackage in Debian $SUITE built $(cd "$DEBS" && echo *.deb)"
    else
        indent <"$CT/root/build.log"
        abort "package build in Debian $SUITE failed (packaging/build-deb.sh)"
    fi
    local lintian
    lintian=$(chroot "$CT" dpkg-query -W -f='${Version}' lintian)
    if in_tree lintian.log sh -c 'lintian --allow-root --fail-on error --info /root/src/dist/sendmail-shim_*.changes'; then
        pass "lintian $lintian (Debian $SUITE) finds no error"
    else
        fail "lintian $lintian (Debian $SUITE) finds errors"
    fi
    indent "lintian: " <"$CT/root/lintian.log"
}
# in_tree LOG COMMAND...: in the copy $CT, not booted (systemd-nspawn: /proc, /dev and the host's
# network), its output in $CT/root/LOG (nspawn's own notes, on failure, after it).
in_tree() {
    local log=$1
    shift
    systemd-nspawn --quiet --register=no --keep-unit --directory="$CT" --setenv=LC_ALL=C.UTF-8 \
        -- sh -c '"$@" >"/root/$0" 2>&1' "$log" "$@" </dev/null >"$WORK/nspawn.log" 2>&1 && return
    local status=$?
    cat "$WORK/nspawn.log" >>"$CT/root/$log"
    return $status
}

# ---- in the container (the relay, start_relay in test-lib.sh, runs on the host's 127.0.0.1) ------ -------------------------------------------------------------------------
install_packages() {
    local debs=() deb out
    mkdir -p "$CT/root/units-test"
    for deb in "$DEBS"/sendmail-shim_*_all.deb "$DEBS"/sendmail-shim-mta_*_all.deb; do
        cp "$deb" "$CT/root/units-test/" && debs+=("/root/units-test/$(basename "$deb")")
    done
    # Installed under the running systemd: the maintainer scripts' sysusers, tmpfiles, enable, start.
    if ! out=$(in_ct apt-get install -y --no-install-recommends "${debs[@]}" 2>&1); then
        # a new dependency the cached tree lacks: fetch the package lists once
        in_ct apt-get update -qq >/dev/null 2>&1
        out=$(in_ct apt-get install -y --no-install-recommends "${debs[@]}" 2>&1)
    fi
    local status=$?
    grep -iE 'warn|error|fail|denied' <<<"$out" | indent "apt: "
    if [ $status -eq 0 ]; then pass "apt-get install ${debs[*]##*/} under systemd"; else indent <<<"$out"; abort "apt-get install failed"; fi
}

installed_units() {
    local mode user group path
    check "user sendmail-shim exists (sysusers)" in_ct getent passwd sendmail-shim
    while read -r mode user group path; do
        check "$path is $mode $user:$group (tmpfiles)" test "$(in_ct stat -c '%a %U %G' "$path")" = "$mode $user $group"
    done <<EOF
711 sendmail-shim sendmail-shim $SPOOL
700 sendmail-shim sendmail-shim $SPOOL/maildrop
700 sendmail-shim sendmail-shim $SPOOL/maildrop-tmp
700 sendmail-shim sendmail-shim $SPOOL/queue
EOF
    check "sendmail-shim.socket is enabled" test "$(in_ct systemctl is-enabled sendmail-shim.socket)" = enabled
    check "sendmail-shim.service is enabled" test "$(in_ct systemctl is-enabled sendmail-shim.service)" = enabled
    socket_listens "after installation"
    check "the installation started sendmail-shim.service" in_ct systemctl is-active --quiet sendmail-shim.service
}

# socket_listens WHEN: the socket unit is active, listens on $SOCKET, 0666 sendmail-shim:sendmail-shim.
socket_listens() {
    check "sendmail-shim.socket is active ($1)" in_ct systemctl is-active --quiet sendmail-shim.socket
    check "it listens on $SOCKET" test "$(in_ct systemctl show -P Listen sendmail-shim.socket)" = "$SOCKET (Stream)"
    # /proc/net/unix: flags 00010000 is __SO_ACCEPTCON (a listening socket), state 01 unconnected
    check "$SOCKET is a listening socket in the container" \
        in_ct awk -v p="$SOCKET" '$4 == "00010000" && $6 == "01" && $8 == p {found = 1} END {exit !found}' /proc/net/unix
    check "$SOCKET is 666 sendmail-shim:sendmail-shim" \
        test "$(in_ct stat -c '%F %a %U %G' "$SOCKET")" = "socket 666 sendmail-shim sendmail-shim"
    check "/run/sendmail-shim is 755" test "$(in_ct stat -c '%a' /run/sendmail-shim)" = 755
}

configure() {
    install -m 0644 "$WORK/relay/relay-ca.pem" "$CT/etc/sendmail-shim/relay-ca.pem"
    # Appended to the shipped conffile: its own settings must parse too.
    cat >>"$CT$CONF" <<EOF
SMTP_HOST=127.0.0.1
SMTP_PORT=$(cat "$WORK/relay/port")
SMTP_SECURITY=tls
SMTP_CA_FILE=/etc/sendmail-shim/relay-ca.pem
SMTP_USER=$LOGIN
SMTP_ALIASES=root:admin@example.test
SMTP_TIMEOUT=10
EOF
    check "sendmail-shim --set-password (root, in the container)" set_password
    check "sendmail-shim --check reaches the host's relay from the container" in_ct sendmail-shim --check
}

# delivered NAME TEXT RCPT [SECONDS]: the message containing TEXT reached the relay, to RCPT.
delivered() {
    local name=$1 text=$2 rcpt=$3 message
    if ! message=$(relay_wait "$text" "${4:-30}"); then
        fail "$name: nothing reached the relay in ${4:-30} s"
        return 1
    fi
    check "$name: delivered over TLS, sender = login = AUTH user, to $rcpt" test \
        "$(json mail_from <<<"$message") $(json login <<<"$message") $(json tls <<<"$message") $(json rcpt_tos <<<"$message")" \
        = "\"$LOGIN\" \"$LOGIN\" true [\"$rcpt\"]"
}

# The service, stopped, must come back by socket activation when an unprivileged user submits.
socket_activation() {
    in_ct systemctl stop sendmail-shim.service 2>&1 | indent
    check "systemctl stop sendmail-shim.service: the service is inactive" \
        test "$(in_ct systemctl is-active sendmail-shim.service)" = inactive
    check "the socket still listens" in_ct systemctl is-active --quiet sendmail-shim.socket
    check "user nobody cannot read the credential file" \
        test "$(as_user nobody test -r /etc/sendmail-shim/credentials; echo $?)" = 1
    check "runuser -u nobody -- /usr/sbin/sendmail -i bob@example.org exits 0" send_as nobody "units-$TOKEN" bob@example.org
    check "the submission socket-activated sendmail-shim.service" in_ct systemctl is-active --quiet sendmail-shim.service
    delivered "nobody's message" "units-$TOKEN" bob@example.org
    service_ran_clean
}

service_ran_clean() {
    local pid uid
    pid=$(in_ct systemctl show -P MainPID sendmail-shim.service)
    uid=$(in_ct awk '$1 == "Uid:" {print $2}' "/proc/$pid/status" 2>/dev/null)
    check "sendmail-shim.service runs as user sendmail-shim (MainPID $pid, uid $uid)" \
        test "$uid" = "$(in_ct id -u sendmail-shim)" -a "$pid" != 0
    check "no restart, no failure (NRestarts, Result)" \
        test "$(in_ct systemctl show -P NRestarts sendmail-shim.service) $(in_ct systemctl show -P Result sendmail-shim.service)" = "0 success"
    echo "    journalctl -u sendmail-shim.service -u sendmail-shim.socket (this boot):"
    journal -b -u sendmail-shim.service -u sendmail-shim.socket | indent "  "
    local bad
    bad=$( { journal -b -u sendmail-shim.service -u sendmail-shim.socket -p warning -q; \
             journal -b -u sendmail-shim.service -q | grep -E 'Traceback|[Pp]ermission denied|Read-only file system|Operation not permitted|Bad system call|status=(deferred|bounced|refused)'; } | sort -u)
    check "the service's journal shows no error, warning or sandbox denial" test -z "$bad"
    [ -z "$bad" ] || indent <<<"$bad"
}

security() {
    local out
    if out=$(in_ct systemd-analyze security --no-pager sendmail-shim.service 2>&1); then
        pass "systemd-analyze security sendmail-shim.service: $(grep -o 'Overall exposure level.*' <<<"$out")"
    else
        fail "systemd-analyze security sendmail-shim.service"
    fi
    indent <<<"$out"
}

reboot() {
    poweroff
    boot
    socket_listens "after a reboot"
    check "sendmail-shim.service started at boot (enabled)" in_ct systemctl is-active --quiet sendmail-shim.service
}

# Issue 13, attack 1: an unprivileged user writes into the maildrop (the old 3733 directories).
attack_maildrop_write() {
    local dir out
    for dir in maildrop maildrop-tmp; do
        out=$(as_user nobody touch "$SPOOL/$dir/planted-$TOKEN" 2>&1; as_user nobody mkdir "$SPOOL/$dir/d-$TOKEN" 2>&1;
              as_user nobody ln -s /etc/shadow "$SPOOL/$dir/l-$TOKEN" 2>&1)
        check "attack 1: nobody cannot create a file, directory or symlink in $SPOOL/$dir (permission denied)" \
            test "$(grep -c 'Permission denied' <<<"$out") $(in_ct find "$SPOOL/$dir" -name "*-$TOKEN" | wc -l)" = "3 0"
        [ "$(grep -c 'Permission denied' <<<"$out")" = 3 ] || indent <<<"$out"
    done
}

# Issue 13, attack 2: root (or a bug) leaves a directory "0" in maildrop/ and an old directory in
# maildrop-tmp/; another user's message must still be picked up and delivered.
attack_planted_directories() {
    in_ct mkdir "$SPOOL/maildrop/0" "$SPOOL/maildrop-tmp/old-$TOKEN"
    in_ct touch -d '2 hours ago' "$SPOOL/maildrop-tmp/old-$TOKEN"
    in_ct useradd --no-create-home --shell /usr/sbin/nologin carol 2>/dev/null
    local since
    since=$(in_ct date '+%Y-%m-%d %H:%M:%S')
    check "attack 2: with root's directories in maildrop/ and maildrop-tmp/, carol's sendmail exits 0" \
        send_as carol "planted-$TOKEN" carol-friend@example.org
    delivered "attack 2: carol's message" "planted-$TOKEN" carol-friend@example.org 75
    echo "    journal since the planted directories:"
    journal -u sendmail-shim.service --since "$since" | indent "  "
    echo "    the spool afterwards:"
    in_ct ls -la "$SPOOL/maildrop" "$SPOOL/maildrop-tmp" "$SPOOL/corrupt" 2>&1 | indent "  "
    in_ct mailq 2>&1 | indent "  mailq: "
    check "attack 2: the service is still running (NRestarts $(in_ct systemctl show -P NRestarts sendmail-shim.service))" \
        in_ct systemctl is-active --quiet sendmail-shim.service
}

# Root's mail: written to the queue by root's own sendmail and delivered by its background child.
root_mail() {
    check "root's /usr/sbin/sendmail -i root exits 0" send_as root "root-$TOKEN" root
    delivered "root's message (root aliased to admin@example.test)" "root-$TOKEN" admin@example.test
}

# apt-get purge removes the programs, the units, the configuration, the spool and the user.
purge() {
    # What this test put there itself: attack 2's planted directories (purge keeps a spool that
    # holds anything, as it should) and the relay's CA certificate, which no package owns.
    in_ct rm -rf "$SPOOL/maildrop/0" /etc/sendmail-shim/relay-ca.pem
    in_ct find "$SPOOL/corrupt" -mindepth 1 -delete
    local out path
    if out=$(in_ct apt-get purge -y sendmail-shim sendmail-shim-mta 2>&1); then
        pass "apt-get purge sendmail-shim sendmail-shim-mta"
    else
        fail "apt-get purge sendmail-shim sendmail-shim-mta"
        indent <<<"$out"
    fi
    for path in /usr/sbin/sendmail /usr/bin/sendmail-shim /etc/sendmail-shim "$SPOOL"; do
        check "the purge removed $path" in_ct test ! -e "$path"
    done
    check "the purge removed the user sendmail-shim" test -z "$(in_ct getent passwd sendmail-shim)"
    check "the purge removed the units" test -z "$(in_ct systemctl list-unit-files --no-legend 'sendmail-shim*')"
}

main() {
    START=$(date +%s)
    trap cleanup EXIT
    trap 'fail "interrupted"; exit 130' INT TERM
    preflight
    WORK=$(mktemp -d)
    chmod 0755 "$WORK"
    [ -n "$BUILD_PACKAGES" ] || build
    mkdir -p "$CACHE"
    exec 9>"$CACHE/lock"
    flock -w 1800 9 || abort "another test-units.sh holds $CACHE/lock"
    rm -rf --one-file-system "$CACHE"/run.*  # a killed run's copy (we hold the lock: nobody uses it)
    base_tree
    RUN=$(mktemp -d "$CACHE/run.XXXXXX")
    CT="$RUN/root"
    cp -a "$BASE" "$CT"
    [ -z "$BUILD_PACKAGES" ] || build_in_tree
    echo "shim-units" >"$CT/etc/hostname"
    boot
    start_relay
    install_packages
    installed_units
    configure
    socket_activation
    root_mail
    security
    reboot
    attack_maildrop_write
    attack_planted_directories
    purge
    echo "test-units.sh: $(elapsed) in all"
}

main "$@"
