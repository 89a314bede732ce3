# Shared by packaging/test-deb.sh and packaging/test-units.sh (sourced, not run): the PASS/FAIL
# reporting and the loopback test relay. The caller sets ROOT, VENV_PY, CALLER_PATH, WORK, LOGIN,
# PASSWORD, PASSED=0 and FAILED=0 first; start_relay sets RELAY_PID.

pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
# check DESCRIPTION COMMAND...: PASS when the command succeeds; its output is shown on failure.
check() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$what"; else fail "$what"; [ -z "$out" ] || sed 's/^/    /' <<<"$out"; fi
}
summary() { echo "$PASSED passed, $FAILED failed"; }
abort() { echo "$(basename "$0"): $*" >&2; fail "$*"; exit 1; }

# The project's test relay (implicit TLS + AUTH + 163's sender rule) on 127.0.0.1, from the venv.
start_relay() {
    if ! "$VENV_PY" -c 'import aiosmtpd, pytest_localserver, trustme' 2>/dev/null; then
        PATH=$CALLER_PATH make -C "$ROOT" -s .venv/.installed >/dev/null \
            || abort "cannot set up the project venv (the relay runs in it)"
    fi
    mkdir -m 0755 "$WORK/relay"
    "$VENV_PY" "$ROOT/packaging/test-relay.py" serve "$WORK/relay" "$LOGIN" "$PASSWORD" \
        >"$WORK/relay.log" 2>&1 &
    RELAY_PID=$!
    local _
    for _ in $(seq 100); do [ -s "$WORK/relay/port" ] && break; sleep 0.1; done
    [ -s "$WORK/relay/port" ] || { cat "$WORK/relay.log"; abort "the test relay did not start"; }
    chmod 0644 "$WORK/relay/relay-ca.pem"
}
