#!/usr/bin/env bash
# The Debian packages, proven on this machine (root, Debian 12): build, lintian, apt-get install,
# configure for a loopback test relay (implicit TLS + AUTH + 163's sender rule), deliver as PHP
# mail(), cron, mail(1) and an unprivileged user do (through the submission service, started by
# hand as in a container: this machine runs no systemd), attacks of another local user on the
# spool, mailq, the runner as user sendmail-shim, the same package reconfigured for OAuth2 (client
# credentials) and a relay that takes only tokens (issue 14), apt-get purge (empty and non-empty
# queue), then the machine's previous MTA is put back.
#
# Every check prints PASS or FAIL; the last line is "N passed, M failed"; the exit status is
# non-zero when anything failed. Nothing leaves 127.0.0.1.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CALLER_PATH=$PATH  # for `make`: the venv is the caller's business, not Debian's interpreter
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
VENV_PY="$ROOT/.venv/bin/python"
LOGIN=alice@163.test
PASSWORD="test-Auth-Code-$$"
CLIENT_ID=sendmail-shim-deb-test
CLIENT_SECRET="test-Client-Secret-$$-$RANDOM"
SPOOL=/var/spool/sendmail-shim
CONF=/etc/sendmail-shim/sendmail-shim.env
PACKAGES=(sendmail-shim sendmail-shim-mta)
TOKEN=$(date +%s)-$$
PASSED=0 FAILED=0
WORK= RELAY_PID= OAUTH2_RELAY_PID= DAEMON_PID= MTAS_BEFORE= INSTALLED_BEFORE= SENDMAIL_BEFORE=

# shellcheck source=packaging/test-lib.sh
source "$ROOT/packaging/test-lib.sh"

installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }
# known PACKAGE: installed, or removed with its configuration files still there.
known() {
    local status
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) || return 1
    [[ -n "$status" && ! "$status" =~ ^[up]n ]]
}
installed_packages() { dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' | awk '$1 == "ii" {print $2}' | sort; }
mta_packages() {
    dpkg-query -W -f='${db:Status-Abbrev}\t${Package}\t${Provides}\n' \
        | awk -F'\t' '$1 ~ /^ii/ && $3 ~ /(^|[ ,])mail-transport-agent([ ,]|$)/ {print $2}'
}
sendmail_state() { if [ -e /usr/sbin/sendmail ]; then readlink -f /usr/sbin/sendmail; else echo absent; fi; }
as_user() { local user=$1; shift; runuser -u "$user" -- env -i PATH=/usr/bin:/bin LANG=C.UTF-8 "$@"; }
relay_wait() { "$VENV_PY" "$ROOT/packaging/test-relay.py" wait "$@"; }
# json FIELD: a field of the message JSON on stdin.
json() { /usr/bin/python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)[sys.argv[1]]))' "$1"; }

# ---- safety: this script installs and purges the packages, so it must not destroy a real setup --
preflight() {
    [ "$(id -u)" = 0 ] || abort "must run as root (it installs and purges packages)"
    [ -r /etc/debian_version ] || abort "needs Debian"
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        ! known "$pkg" || abort "$pkg is installed (or not purged) here; a test would destroy its configuration: apt-get purge ${PACKAGES[*]} first"
    done
    ! getent passwd sendmail-shim >/dev/null || abort "a user sendmail-shim exists without the package; remove it first"
    [ ! -e "$SPOOL" ] || abort "$SPOOL exists without the package; move it away first"
    [ ! -e /etc/sendmail-shim ] || abort "/etc/sendmail-shim exists without the package; move it away first"
    [ -z "$(dpkg-divert --list /usr/sbin/sendmail)" ] || abort "/usr/sbin/sendmail is diverted; remove the diversion first"
    if [ -e /usr/sbin/sendmail ] && ! dpkg -S /usr/sbin/sendmail >/dev/null 2>&1; then
        abort "/usr/sbin/sendmail belongs to no package; installing would overwrite it"
    fi
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ -z "$RELAY_PID" ] || kill "$RELAY_PID" 2>/dev/null
    [ -z "$OAUTH2_RELAY_PID" ] || kill "$OAUTH2_RELAY_PID" 2>/dev/null
    stop_daemon
    if [ -n "$INSTALLED_BEFORE" ]; then
        local pkg leftovers=()
        for pkg in "${PACKAGES[@]}"; do known "$pkg" && leftovers+=("$pkg"); done
        [ ${#leftovers[@]} -eq 0 ] || apt-get purge -y -qq "${leftovers[@]}" >/dev/null 2>&1
        # preflight proved these were not there before: whatever is left is ours
        rm -rf "$SPOOL" /etc/sendmail-shim
        getent passwd sendmail-shim >/dev/null && userdel sendmail-shim
        getent group sendmail-shim >/dev/null && groupdel sendmail-shim
        restore_mta
    fi
    [ -z "$WORK" ] || rm -rf "$WORK"
    summary
    [ "$FAILED" -eq 0 ] && exit "$status"
    exit 1
}

# Reinstall what our packages displaced (an MTA, and whatever apt removed with it).
restore_mta() {
    local missing
    missing=$(comm -23 <(echo "$INSTALLED_BEFORE") <(installed_packages) | tr '\n' ' ')
    if [ -n "${missing// /}" ]; then
        echo "restoring: $missing"
        # shellcheck disable=SC2086
        apt-get install -y -qq $missing >/dev/null 2>&1 || fail "reinstalling $missing"
    fi
    if [ "$(mta_packages | tr '\n' ' ')" = "$MTAS_BEFORE" ] && [ "$(sendmail_state)" = "$SENDMAIL_BEFORE" ]; then
        pass "previous MTA state restored (${MTAS_BEFORE:-no MTA}, /usr/sbin/sendmail: $SENDMAIL_BEFORE)"
    else
        fail "MTA state: before '${MTAS_BEFORE}' $SENDMAIL_BEFORE, now '$(mta_packages | tr '\n' ' ')' $(sendmail_state)"
    fi
}

# ---- build and lint ---------------------------------------------------------------------------
build_and_lint() {
    if bash "$ROOT/packaging/build-deb.sh" >"$WORK/build.log" 2>&1; then
        pass "dpkg-buildpackage built $(cd "$ROOT/dist" && echo *.deb)"
    else
        cat "$WORK/build.log"
        abort "package build failed"
    fi
    installed lintian || apt-get install -y -qq --no-install-recommends lintian >/dev/null 2>&1
    local out status
    out=$(lintian --allow-root --fail-on error --info "$ROOT"/dist/sendmail-shim_*.changes 2>&1)
    status=$?
    [ -z "$out" ] || sed 's/^/    lintian: /' <<<"$out"
    if [ $status -eq 0 ]; then pass "lintian: no errors ($(grep -c '^W:' <<<"$out") warnings)"; else fail "lintian (exit $status)"; fi
}

# ---- install ----------------------------------------------------------------------------------
install_packages() {
    # The clients come in the same transaction: bsd-mailx needs an MTA, which is ours.
    if apt-get install -y -qq "$ROOT"/dist/sendmail-shim_*_all.deb "$ROOT"/dist/sendmail-shim-mta_*_all.deb \
        php-cli bsd-mailx >"$WORK/install.log" 2>&1; then
        pass "apt-get install ./dist/*.deb (with php-cli, bsd-mailx)"
    else
        cat "$WORK/install.log"
        abort "apt-get install failed"
    fi
    [ -z "$MTAS_BEFORE" ] || check "the previous MTA ($MTAS_BEFORE) was replaced" \
        bash -c "! dpkg-query -W -f='\${db:Status-Abbrev}' $MTAS_BEFORE 2>/dev/null | grep -q ii"
}

installed_layout() {
    check "/usr/bin/sendmail-shim starts with #!/usr/bin/python3" \
        grep -qx '#!/usr/bin/python3' <(head -n1 /usr/bin/sendmail-shim)
    local link
    for link in /usr/sbin/sendmail /usr/lib/sendmail /usr/bin/mailq /usr/bin/newaliases; do
        check "$link runs sendmail-shim" test "$(readlink -f $link)" = /usr/bin/sendmail-shim
    done
    check "newaliases exits 0 with an empty environment" env -i /usr/bin/newaliases
    check "man page sendmail-shim(8), also as sendmail(8)" \
        test -s "$(readlink -f /usr/share/man/man8/sendmail.8.gz)" -a -s /usr/share/man/man8/sendmail-shim.8.gz
    check "user sendmail-shim: system account, home $SPOOL, no login shell" \
        bash -c "getent passwd sendmail-shim | awk -F: '\$3 < 1000 && \$6 == \"$SPOOL\" && \$7 ~ /nologin|false/' | grep -q ."
    check "group sendmail-shim exists" getent group sendmail-shim
    local mode user group path
    while read -r mode user group path; do
        check "$path is $mode $user:$group" test "$(stat -c '%a %U %G' "$path")" = "$mode $user $group"
    done <<EOF
711 sendmail-shim sendmail-shim $SPOOL
700 sendmail-shim sendmail-shim $SPOOL/tmp
700 sendmail-shim sendmail-shim $SPOOL/queue
700 sendmail-shim sendmail-shim $SPOOL/failed
700 sendmail-shim sendmail-shim $SPOOL/corrupt
700 sendmail-shim sendmail-shim $SPOOL/maildrop-tmp
700 sendmail-shim sendmail-shim $SPOOL/maildrop
640 root sendmail-shim /etc/sendmail-shim/credentials
EOF
    local unit
    for unit in sendmail-shim.socket sendmail-shim.service; do
        check "$unit is enabled" \
            test -n "$(find /etc/systemd/system -path "*.wants/$unit")"
    done
    check "Debian's python3-keyring finds the keyring.backends entry point" /usr/bin/python3 -c '
from importlib.metadata import entry_points
assert "sendmail_shim.keyring_backend" in [e.value for e in entry_points(group="keyring.backends")]
import keyring.backend
assert "ShimFileKeyring" in [type(k).__name__ for k in keyring.backend.get_all_keyring()]'
}

# ---- the configuration (for the relay of start_relay, in test-lib.sh) -------------------------
configure() {
    # Appended to the shipped conffile: its own settings must parse too.
    cat >>"$CONF" <<EOF
SMTP_HOST=127.0.0.1
SMTP_PORT=$(cat "$WORK/relay/port")
SMTP_SECURITY=tls
SMTP_CA_FILE=$WORK/relay/relay-ca.pem
SMTP_USER=$LOGIN
SMTP_ALIASES=root:admin@example.test
SMTP_TIMEOUT=10
EOF
    check "sendmail-shim --set-password stores the password as root" \
        bash -c "printf '%s\n' '$PASSWORD' | sendmail-shim --set-password"
    check "the credential file is still 0640 root:sendmail-shim" \
        test "$(stat -c '%a %U %G' /etc/sendmail-shim/credentials)" = "640 root sendmail-shim"
    check "sendmail-shim --check passes (TLS verified, AUTH, sender = login)" sendmail-shim --check
}

# delivered NAME TEXT RCPT [RELAY_DIR]: the message containing TEXT reached the relay (default: the
# password relay's) from the login to RCPT.
delivered() {
    local name=$1 text=$2 rcpt=$3 message
    if ! message=$(relay_wait "${4:-$WORK/relay}" "$text" 30); then
        fail "$name: nothing reached the relay"
        return
    fi
    check "$name: delivered over TLS, envelope sender = login = AUTH user" test \
        "$(json mail_from <<<"$message") $(json login <<<"$message") $(json tls <<<"$message")" = "\"$LOGIN\" \"$LOGIN\" true"
    check "$name: to $rcpt" grep -q "\"$rcpt\"" <(json rcpt_tos <<<"$message")
}

# ---- the callers ------------------------------------------------------------------------------
php_mail() {
    local path
    path=$(php -r 'echo ini_get("sendmail_path");')
    check "php.ini's default sendmail_path is used ($path)" test "$path" = "/usr/sbin/sendmail -t -i"
    check "PHP mail() returns true" php -r \
        "exit(mail('to@example.test', 'php-$TOKEN', \"line 1\n.\nline 3\", 'From: www@example.test') ? 0 : 1);"
    delivered "PHP mail()" "php-$TOKEN" to@example.test
}

cron_mail() {
    # Debian cron: execvp("/usr/sbin/sendmail", "-FCronDaemon -i -B8BITMIME -oem root"), PATH=/usr/bin:/bin.
    check "cron's invocation exits 0" bash -c "printf '%s\n' 'From: root (Cron Daemon)' 'To: root' \
        'Subject: Cron <root@$(hostname)> echo cron-$TOKEN' 'MIME-Version: 1.0' \
        'Content-Type: text/plain; charset=UTF-8' 'Content-Transfer-Encoding: 8bit' \
        'X-Cron-Env: <SHELL=/bin/sh>' '' 'cron-$TOKEN' '.' 'after the dot' \
        | env -i PATH=/usr/bin:/bin HOME=/root SHELL=/bin/sh LOGNAME=root \
          /usr/sbin/sendmail -FCronDaemon -i -B8BITMIME -oem root"
    delivered "cron" "cron-$TOKEN" admin@example.test
}

mailx_mail() {
    check "echo test | mail -s … exits 0" bash -c "echo test | mail -s 'mailx-$TOKEN' you@example.test"
    delivered "mail(1)" "mailx-$TOKEN" you@example.test
}

# The submission service as a container runs it: started by root, it binds the socket and
# becomes user sendmail-shim.
start_daemon() {
    /usr/bin/sendmail-shim -bd >"$WORK/daemon.log" 2>&1 &
    DAEMON_PID=$!
    local i
    for i in $(seq 100); do [ -S /run/sendmail-shim/submit.sock ] && break; sleep 0.1; done
    check "sendmail-shim -bd listens on /run/sendmail-shim/submit.sock (mode 666)" \
        test "$(stat -c %a /run/sendmail-shim/submit.sock 2>/dev/null)" = 666
    # it binds the socket as root, then becomes the spool's owner
    for i in $(seq 50); do [ "$(ps -o uid= -p "$DAEMON_PID" | tr -d ' ')" = "$(id -u sendmail-shim)" ] && break; sleep 0.1; done
    check "sendmail-shim -bd runs as user sendmail-shim" \
        test "$(ps -o uid= -p "$DAEMON_PID" 2>/dev/null | tr -d ' ')" = "$(id -u sendmail-shim)"
}

stop_daemon() {
    [ -n "$DAEMON_PID" ] || return 0
    kill "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
    DAEMON_PID=
    sed 's/^/    daemon: /' "$WORK/daemon.log"
}

# as_nobody_send SUBJECT RCPT: the system's sendmail as user nobody.
as_nobody_send() {
    printf 'Subject: %s\n\n%s\n' "$1" "$1" \
        | runuser -u nobody -- env -i PATH=/usr/bin:/bin HOME=/nonexistent /usr/sbin/sendmail -i "$2"
}

refused_without_daemon() {
    as_nobody_send "refused-$TOKEN" x@example.test
    [ $? = 75 ]
}

queue_and_runner() {
    # A message that waits in the queue for mailq, and one handed over by a user without the password.
    check "sendmail -odq queues a message" bash -c \
        "printf 'Subject: queued-$TOKEN\n\nqueued\n' | /usr/sbin/sendmail -odq -i queued@example.test"
    local listing
    listing=$(env -i PATH=/usr/bin:/bin mailq 2>&1)
    check "mailq lists the queued message" grep -q 'queued@example.test' <<<"$listing"
    sed 's/^/    mailq: /' <<<"$listing"

    check "user nobody cannot read the credential file" bash -c "! runuser -u nobody -- test -r /etc/sendmail-shim/credentials"
    check "without the submission service, user nobody's message is refused with exit 75" refused_without_daemon
    start_daemon
    check "user nobody sends (exit 0)" as_nobody_send "dropped-$TOKEN" dropped@example.test
    delivered "sent by nobody through the submission service" "dropped-$TOKEN" dropped@example.test

    # Issue 13's first two attacks: another local user cannot plant anything in the spool, and
    # what root (or an older, world-writable spool) left there does not stop delivery.
    local dir
    for dir in maildrop maildrop-tmp tmp queue; do
        check "user nobody cannot create a directory in $SPOOL/$dir" \
            bash -c "! runuser -u nobody -- mkdir $SPOOL/$dir/0 2>/dev/null"
    done
    mkdir "$SPOOL/maildrop/0" "$SPOOL/maildrop-tmp/old"
    touch -d '2 hours ago' "$SPOOL/maildrop-tmp/old"
    check "with a directory in maildrop/ and an old one in maildrop-tmp/, user nobody sends (exit 0)" \
        as_nobody_send "after-attack-$TOKEN" attacked@example.test
    delivered "nobody's message after the attack" "after-attack-$TOKEN" attacked@example.test
    # root's own directories are root's to remove (the service user cannot move a directory it
    # does not own); left, they would count as held mail at purge
    rm -rf "$SPOOL/maildrop/0" "$SPOOL/maildrop-tmp/old" "$SPOOL/corrupt/0"*

    check "the runner, started by hand as user sendmail-shim, exits 0" \
        as_user sendmail-shim /usr/bin/sendmail-shim -q
    delivered "queued (-odq)" "queued-$TOKEN" queued@example.test
    check "the queue is empty after the run" grep -qx 'Mail queue is empty' <(mailq)
    stop_daemon
}

# ---- OAuth2 (issue 14): the installed package, reconfigured for a relay that takes only tokens ---
# set_conf KEY VALUE: KEY=VALUE in the system configuration, instead of KEY's line, as an admin edits it.
set_conf() { sed -i "/^$1=/d" "$CONF" && printf '%s=%s\n' "$1" "$2" >>"$CONF"; }

# root_send_tracing_imports SUBJECT RCPT: `sendmail -v` as root, the installed script run by the
# interpreter of its #! line with -v (from /: nothing of the source tree on sys.path); stderr gets
# the dialogue and, from -v, the file of every module imported.
root_send_tracing_imports() {
    printf 'Subject: %s\n\n%s\n' "$1" "$1" | (cd / && /usr/bin/python3 -v /usr/bin/sendmail-shim -v -i "$2")
}

# secrets_absent TOKENS_FILE FILE...: neither the client secret nor a token of TOKENS_FILE is in a FILE
# (the patterns reach grep through a pipe, never its argv).
secrets_absent() {
    ! grep -qF -f <(printf '%s\n' "$CLIENT_SECRET"; cat "$1") "${@:2}"
}

oauth2() {
    local dir=$WORK/oauth2 where
    launch_relay OAUTH2_RELAY_PID "$dir" serve-oauth2 "$LOGIN" "$CLIENT_ID" <<<"$CLIENT_SECRET"
    # a mail log to read (this machine has no syslog daemon), writable by root and the service
    install -m 0640 -o sendmail-shim -g sendmail-shim /dev/null "$WORK/mail.log"
    set_conf SMTP_PORT "$(cat "$dir/port")"
    set_conf SMTP_CA_FILE "$dir/relay-ca.pem"
    set_conf SMTP_AUTH xoauth2
    set_conf SMTP_OAUTH2_FLOW client_credentials
    set_conf SMTP_OAUTH2_CLIENT_ID "$CLIENT_ID"
    set_conf SMTP_OAUTH2_TOKEN_URL "$(cat "$dir/token-url")"
    set_conf SMTP_OAUTH2_SCOPE "$(cat "$dir/scope")"
    set_conf SMTP_OAUTH2_CA_FILE "$dir/relay-ca.pem"  # the identity provider's CA (the relay's too)
    set_conf SENDMAIL_SHIM_LOG_FILE "$WORK/mail.log"
    check "sendmail-shim --set-password stores the client secret as root" \
        sendmail-shim --set-password <<<"$CLIENT_SECRET"

    # First send, cold token cache: the only one that imports oauthlib.
    root_send_tracing_imports "oauth2-root-$TOKEN" oauth2-root@example.test 2>"$WORK/oauth2-root.log"
    check "root's sendmail -v exits 0 (SMTP_AUTH=xoauth2, client credentials)" test $? -eq 0
    check "the relay offers AUTH OAUTHBEARER XOAUTH2 only" grep -qx 'S: 250-AUTH OAUTHBEARER XOAUTH2' "$WORK/oauth2-root.log"
    check "the shim logs in with AUTH XOAUTH2, the token shown as ***" grep -qx 'C: AUTH XOAUTH2 \*\*\*' "$WORK/oauth2-root.log"
    delivered "root's message through the OAuth2-only relay" "oauth2-root-$TOKEN" oauth2-root@example.test "$dir"
    check "python3-oauthlib ($(dpkg-query -W -f='${Version}' python3-oauthlib 2>/dev/null)) is installed, and a dependency of sendmail-shim" \
        bash -c "dpkg -s python3-oauthlib | grep -qx 'Status: install ok installed' \
            && dpkg -s sendmail-shim | grep '^Depends:' | grep -qw python3-oauthlib"
    local dist=/usr/lib/python3/dist-packages
    where=$(grep -oE "[^ ']*/(sendmail_shim|oauthlib)/__init__\.py" "$WORK/oauth2-root.log" | sort -u | paste -sd ' ')
    check "that send imported sendmail_shim and oauthlib from $dist only (oauthlib: python3-oauthlib's file)" \
        test "$where" = "$dist/oauthlib/__init__.py $dist/sendmail_shim/__init__.py" \
        -a "$(dpkg -S "$dist/oauthlib/__init__.py" 2>/dev/null | cut -d: -f1)" = python3-oauthlib
    [ -z "$where" ] || echo "    imported: $where"

    start_daemon
    check "user nobody sends through the submission service (exit 0)" \
        as_nobody_send "oauth2-nobody-$TOKEN" oauth2-nobody@example.test
    delivered "nobody's message through the OAuth2-only relay" "oauth2-nobody-$TOKEN" oauth2-nobody@example.test "$dir"
    stop_daemon

    check "the token cache $SPOOL/tokens/$LOGIN.json is 600 sendmail-shim:sendmail-shim" \
        test "$(stat -c '%a %U %G' "$SPOOL/tokens/$LOGIN.json" 2>/dev/null)" = "600 sendmail-shim sendmail-shim"
    check "the mail log has both deliveries (status=sent)" \
        test "$(grep -c -e "to=<oauth2-root@example.test>.*status=sent" -e "to=<oauth2-nobody@example.test>.*status=sent" \
            "$WORK/mail.log")" = 2
    check "the identity provider issued an access token" test -s "$dir/access-tokens"
    # the service's output is what its journal would hold under systemd
    check "neither the client secret nor an access token is in the mail log, the service's output or root's dialogue" \
        secrets_absent "$dir/access-tokens" "$WORK/mail.log" "$WORK/daemon.log" "$WORK/oauth2-root.log"
    # The purges that follow need no relay: the password configuration is not restored.
}

# ---- purge ------------------------------------------------------------------------------------
nothing_left() {
    local what=$1 leftovers=()
    getent passwd sendmail-shim >/dev/null && leftovers+=("user sendmail-shim")
    getent group sendmail-shim >/dev/null && leftovers+=("group sendmail-shim")
    local path
    for path in /etc/sendmail-shim /usr/bin/sendmail-shim /usr/sbin/sendmail /usr/lib/sendmail \
        /usr/bin/mailq /usr/bin/newaliases /usr/lib/python3/dist-packages/sendmail_shim \
        /usr/share/doc/sendmail-shim /usr/lib/tmpfiles.d/sendmail-shim.conf /var/log/sendmail-shim \
        /usr/lib/sysusers.d/sendmail-shim.conf /usr/share/man/man8/sendmail-shim.8.gz; do
        [ ! -e "$path" ] && [ ! -L "$path" ] || leftovers+=("$path")
    done
    while IFS= read -r path; do leftovers+=("$path"); done < <(
        find /lib/systemd/system /etc/systemd/system /var/lib/systemd/deb-systemd-helper-enabled \
            /usr/lib/python3/dist-packages -name '*sendmail*shim*' 2>/dev/null)
    local pkg
    for pkg in "${PACKAGES[@]}"; do known "$pkg" && leftovers+=("dpkg entry $pkg"); done
    if [ ${#leftovers[@]} -eq 0 ]; then pass "$what"; else fail "$what: left ${leftovers[*]}"; fi
}

purge_empty() {
    check "apt-get purge (empty queue)" apt-get purge -y -qq "${PACKAGES[@]}"
    check "the spool is gone" test ! -e "$SPOOL"
    nothing_left "purge leaves no user, group, file or directory"
}

purge_nonempty() {
    check "reinstall" apt-get install -y -qq "$ROOT"/dist/sendmail-shim_*_all.deb "$ROOT"/dist/sendmail-shim-mta_*_all.deb
    check "a message is queued (no relay configured)" bash -c \
        "printf 'Subject: kept\n\nkept\n' | SENDMAIL_SHIM_SMTP_USER=$LOGIN /usr/sbin/sendmail -odq -i kept@example.test"
    local out
    out=$(apt-get purge -y -qq "${PACKAGES[@]}" 2>&1)
    check "apt-get purge (one message queued)" test $? -eq 0
    check "purge says the queue is kept" grep -q "still holds 1 undelivered message" <<<"$out"
    check "the queued message is still there" test -n "$(find $SPOOL/queue -mindepth 1 -maxdepth 1)"
    check "everything else is gone" test ! -e /etc/sendmail-shim -a ! -e /usr/bin/sendmail-shim
    # What the purge message tells the administrator to do:
    rm -r "$SPOOL" && userdel sendmail-shim
    nothing_left "after removing the kept queue as told, nothing is left"
}

main() {
    trap cleanup EXIT
    trap 'fail "interrupted"; exit 130' INT TERM
    preflight
    WORK=$(mktemp -d)
    chmod 0755 "$WORK"  # the relay's CA must be readable by the runner (user sendmail-shim)
    MTAS_BEFORE=$(mta_packages | tr '\n' ' ')
    SENDMAIL_BEFORE=$(sendmail_state)
    echo "MTA before: ${MTAS_BEFORE:-none}; /usr/sbin/sendmail: $SENDMAIL_BEFORE"
    build_and_lint
    INSTALLED_BEFORE=$(installed_packages)
    install_packages
    installed_layout
    start_relay
    configure
    php_mail
    cron_mail
    mailx_mail
    queue_and_runner
    oauth2
    purge_empty
    purge_nonempty
}

main "$@"
