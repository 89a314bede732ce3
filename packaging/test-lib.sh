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
start_relay() { launch_relay RELAY_PID "$WORK/relay" serve "$LOGIN" "$PASSWORD"; }

# launch_relay PID_VAR DIR MODE ARGS...: `test-relay.py MODE DIR ARGS...` in the background (its stdin
# is the caller's), its pid in PID_VAR, once it has written DIR/port.
launch_relay() {
    local pid_var=$1 dir=$2 mode=$3
    shift 3
    if ! "$VENV_PY" -c 'import aiosmtpd, pytest_localserver, trustme' 2>/dev/null; then
        PATH=$CALLER_PATH make -C "$ROOT" -s .venv/.installed >/dev/null \
            || abort "cannot set up the project venv (the relay runs in it)"
    fi
    mkdir -m 0755 "$dir"
    "$VENV_PY" "$ROOT/packaging/test-relay.py" "$mode" "$dir" "$@" >"$dir.log" 2>&1 &
    printf -v "$pid_var" %s "$!"
    local _
    for _ in $(seq 100); do [ -s "$dir/port" ] && break; sleep 0.1; done
    [ -s "$dir/port" ] || { cat "$dir.log"; abort "the test relay ($mode) did not start"; }
    chmod 0644 "$dir/relay-ca.pem"
}
