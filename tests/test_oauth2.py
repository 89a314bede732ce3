"""OAuth2 logins (SMTP_AUTH=xoauth2/oauthbearer) through the real console script, against the test
IdP (tests/idp.py, oauthlib's server endpoints on HTTPS) and a relay that takes only tokens."""

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from sendmail_shim import auth, credentials, credstore
from sendmail_shim.errors import EX_CONFIG, EX_NOPERM, ConfigError, Unavailable
from tests.idp import CLIENT_ID, CLIENT_SECRET, IDP_SCOPE, idp_server  # noqa: F401 (a fixture)
from tests.relay import RELAY_LOGIN, TokenRelayHandler
from tests.localusers import SYSTEM_PYTHON, ServiceSite, accounts
from tests.shim import OUTPUTS, SHIM, SHIM_PYTHON, wait_for
from tests.test_wizard import Terminal

pytestmark = pytest.mark.e2e
MESSAGE = b"Subject: token\n\nsent with an OAuth2 token\n"


@pytest.fixture
def idp(idp_server):  # noqa: F811
    return idp_server


@pytest.fixture
def token_relay(relay_factory, idp):
    return relay_factory(handler_class=functools.partial(TokenRelayHandler, idp=idp), mechanisms=(), pipelining=True)


def oauth_shim(shim_factory, relay, idp, ca, *, flow="client_credentials", method="xoauth2", logged_in=True,
               **settings):
    """A shim logging in with tokens from `idp`: the client secret stored by --set-password, or
    (flow=refresh_token) a public client with a refresh token stored as a finished --oauth2-login
    leaves it (``logged_in``)."""
    shim = shim_factory(relay, password=CLIENT_SECRET if flow == "client_credentials" else None, **{
        "SMTP_AUTH": method, "SMTP_OAUTH2_FLOW": flow, "SMTP_OAUTH2_CLIENT_ID": CLIENT_ID,
        "SMTP_OAUTH2_TOKEN_URL": idp.token_url, "SMTP_OAUTH2_SCOPE": IDP_SCOPE, "SMTP_OAUTH2_CA_FILE": ca.ca_file,
        "SENDMAIL_SHIM_DELIVERY": "interactive", **settings})
    if flow == "refresh_token":
        idp.clients[CLIENT_ID] = None  # a public client, as a device login registers it
    if flow == "refresh_token" and logged_in:
        shim.refresh_token = idp.grant_refresh_token(CLIENT_ID, RELAY_LOGIN)
        credstore.Store(str(shim.credentials_file)).set(credentials.REFRESH_SERVICE, RELAY_LOGIN, shim.refresh_token)
    return shim


def queued(shim) -> list[str]:
    queue = shim.queue_dir / "queue"
    return sorted(os.listdir(queue)) if queue.exists() else []


def test_client_credentials_send_and_the_cached_token(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca)
    result = shim.run("-v", "-i", "bob@example.com", stdin=MESSAGE)
    shim.run("-i", "carol@example.com", stdin=MESSAGE)
    assert [m.rcpt_tos for m in token_relay.messages] == [["bob@example.com"], ["carol@example.com"]]
    assert {m.login for m in token_relay.messages} == {RELAY_LOGIN}
    assert idp.requests == ["client_credentials"]  # the second process used the cached token
    assert "AUTH XOAUTH2 ***" in result.stderr


def token_cache(spool: Path) -> Path:
    return spool / "tokens" / f"{RELAY_LOGIN}.json"


def expire_cached_token(spool: Path) -> None:
    """The cached access token expired (in place: the file keeps its owner), its rotated refresh
    token kept."""
    path = token_cache(spool)
    path.write_text(json.dumps({**json.loads(path.read_text()), "expires_at": 0}))


def test_oauthbearer_with_a_refresh_token_that_rotates(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, flow="refresh_token", method="oauthbearer")
    shim.run("-i", "bob@example.com", stdin=MESSAGE)
    assert token_relay.messages[0].login == RELAY_LOGIN
    assert idp.requests == ["refresh_token"]
    rotated = json.loads(token_cache(shim.queue_dir).read_text())["refresh_token"]
    kept, spent = rotated in idp.refresh_tokens, shim.refresh_token not in idp.refresh_tokens  # no reprs: secrets
    assert kept and spent
    expire_cached_token(shim.queue_dir)
    shim.run("-i", "carol@example.com", stdin=MESSAGE)  # refreshed with the rotated one: the stored one is spent
    assert idp.requests == ["refresh_token"] * 2 and len(token_relay.messages) == 2


def waiting_for_flock(path: Path) -> bool:
    """Whether a process waits for the flock of `path` (/proc/locks marks a waiter with ->)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as locks:
        return any("->" in line and any(f.endswith(f":{inode}") for f in line.split()) for line in locks)


def test_two_queue_runs_at_once_ask_the_idp_once(shim_factory, token_relay, idp, ca):
    """The second run waits for the first run's refresh (the IdP holds its answer until the
    second is waiting, or has asked too) and takes the token it got."""
    shim = oauth_shim(shim_factory, token_relay, idp, ca, flow="refresh_token", SENDMAIL_SHIM_DELIVERY="queue",
                      SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    for n in range(2):
        shim.run("-odq", "-i", f"r{n}@example.com", stdin=MESSAGE)
    idp.hold = threading.Event()
    run = lambda: subprocess.Popen([SHIM_PYTHON, str(SHIM), "-q"], env=shim.env, cwd=shim.home,  # noqa: E731
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = run()
    wait_for(lambda: idp.requests, what="the first run's token request")
    second = run()  # finds the first message locked, takes the second
    wait_for(lambda: len(idp.requests) > 1 or waiting_for_flock(shim.queue_dir / "tokens" / f"{RELAY_LOGIN}.lock"),
             what="the second run waiting for the first one's refresh")
    idp.hold.set()
    for proc in (first, second):
        out, err = proc.communicate(timeout=60)
        OUTPUTS.extend([out.decode(errors="replace"), err.decode(errors="replace")])
        assert proc.returncode == 0
    assert idp.requests == ["refresh_token"]
    assert sorted(m.rcpt_tos[0] for m in token_relay.messages) == ["r0@example.com", "r1@example.com"]


def test_a_runner_that_cannot_write_the_credential_file_keeps_tokens_in_the_spool(token_relay, idp, ca):
    """A system install: the credential file is root's and only readable by the service user
    (there root:sendmail-shim 0640; here the service user's 0600 in a directory of root's, which
    it cannot write either). Its -odi send caches the token and the rotated refresh token in the
    spool, owner-only, and the next refresh uses that one (the stored one is spent)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("switching to another user needs root, setpriv and /usr/bin/python3")
    idp.clients[CLIENT_ID] = None
    stored = idp.grant_refresh_token(CLIENT_ID, RELAY_LOGIN)
    base = Path(tempfile.mkdtemp(prefix="shim-tokens-", dir="/tmp"))  # traversable by other users
    base.chmod(0o755)
    try:
        with accounts("svc") as (service,):
            etc = base / "etc"
            etc.mkdir(mode=0o755)
            credential_file = etc / "credentials"
            credstore.Store(str(credential_file)).set(credentials.REFRESH_SERVICE, RELAY_LOGIN, stored)
            os.chown(credential_file, service.pw_uid, service.pw_gid)
            site = ServiceSite(base, service, token_relay, "unused", SMTP_PASSWORD_COMMAND="", SMTP_AUTH="xoauth2",
                               SMTP_OAUTH2_CLIENT_ID=CLIENT_ID, SMTP_OAUTH2_TOKEN_URL=idp.token_url,
                               SMTP_OAUTH2_SCOPE=IDP_SCOPE, SENDMAIL_SHIM_CREDENTIALS_FILE=str(credential_file),
                               SMTP_OAUTH2_CA_FILE=shutil.copy(ca.ca_file, base / "idp.pem"))
            for n in range(3):
                sent = site.send(service.pw_name, "-odi", "-i", f"r{n}@example.com", stdin=MESSAGE)
                assert sent.returncode == 0, sent.stderr.decode(errors="replace")
                if n == 1:
                    cache = token_cache(site.spool)
                    assert (cache.stat().st_uid, cache.stat().st_mode & 0o777) == (service.pw_uid, 0o600)
                    assert cache.parent.stat().st_mode & 0o777 == 0o700
                    expire_cached_token(site.spool)
            site.log_text()
            unchanged = json.loads(credential_file.read_text())[credentials.REFRESH_SERVICE][RELAY_LOGIN] == stored
            assert unchanged and stored not in idp.refresh_tokens
            assert idp.requests == ["refresh_token"] * 2  # the first send's, and the one after the expiry
            assert len(token_relay.messages) == 3
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_device_login_through_a_terminal_then_a_send(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, flow="refresh_token", logged_in=False,
                      SMTP_OAUTH2_DEVICE_URL=idp.device_url)
    term = Terminal([SHIM_PYTHON, str(SHIM), "--oauth2-login"], {**shim.env, "TERM": "dumb"})
    term.expect(f"Open {idp.url}/login in any browser, sign in as {RELAY_LOGIN} and enter the code ")
    term.expect("\n")
    idp.approve(re.search(r"enter the code (\w+)", term.seen).group(1), RELAY_LOGIN)
    term.expect(f"OAuth2 login of {RELAY_LOGIN} stored in {shim.credentials_file}")
    assert term.finish() == 0
    shim.run("-i", "bob@example.com", stdin=MESSAGE)
    assert token_relay.messages[0].login == RELAY_LOGIN
    assert idp.requests.count("refresh_token") == 0  # the send used the token the login cached


def test_installed_app_login_with_pkce_through_a_terminal_then_a_send(shim_factory, token_relay, idp, ca):
    """Gmail's way: no device flow; the shim prints the authorization URL (Google's, with a PKCE
    challenge), the person pastes back the address the browser ended on."""
    shim = oauth_shim(shim_factory, token_relay, idp, ca, flow="refresh_token", logged_in=False, SMTP_PROVIDER="gmail")
    term = Terminal([SHIM_PYTHON, str(SHIM), "--oauth2-login"], {**shim.env, "TERM": "dumb"})
    term.expect("paste its whole address (or the code) here:")
    url = re.search(r"^(https://accounts\.google\.com/o/oauth2/v2/auth\?\S+)$", term.seen, re.M).group(1)
    assert "code_challenge_method=S256" in url and f"login_hint={RELAY_LOGIN.replace('@', '%40')}" in url
    term.line(idp.consent(url, RELAY_LOGIN))
    term.expect(f"OAuth2 login of {RELAY_LOGIN} stored in {shim.credentials_file}")
    assert term.finish() == 0
    shim.run("-i", "bob@example.com", stdin=MESSAGE)
    assert token_relay.messages[0].login == RELAY_LOGIN and idp.requests == ["authorization_code"]


def test_revoked_refresh_token_direct_exits_77_naming_the_login_command(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, flow="refresh_token", SENDMAIL_SHIM_DELIVERY="direct")
    idp.revoke(shim.refresh_token)
    result = shim.run("-i", "bob@example.com", stdin=MESSAGE, expect_exit=EX_NOPERM)
    assert "--oauth2-login" in result.stderr and "invalid_grant" in result.stderr
    assert result.stderr.count("\n") == 1 and token_relay.messages == []


def test_revoked_refresh_token_keeps_the_message_queued(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, flow="refresh_token", SENDMAIL_SHIM_DELIVERY="queue")
    idp.revoke(shim.refresh_token)
    shim.run("-i", "bob@example.com", stdin=MESSAGE)
    shim.run("-q")
    assert len(queued(shim)) == 1 and token_relay.messages == []


def test_idp_down_queues_then_delivers_when_it_is_back(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, SENDMAIL_SHIM_DELIVERY="queue")
    idp.stop()
    shim.run("-i", "bob@example.com", stdin=MESSAGE)
    shim.run("-q")
    assert len(queued(shim)) == 1 and token_relay.messages == []
    assert any("identity provider" in line for line in shim.log_lines())
    idp.start()
    shim.run("-q")
    assert queued(shim) == [] and [m.rcpt_tos for m in token_relay.messages] == [["bob@example.com"]]


@pytest.mark.parametrize("method", ["xoauth2", "oauthbearer"])
def test_wrong_scope_is_explained(shim_factory, token_relay, idp, ca, method):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, method=method, SENDMAIL_SHIM_DELIVERY="direct",
                      SMTP_OAUTH2_SCOPE="openid profile")
    result = shim.run("-i", "bob@example.com", stdin=MESSAGE, expect_exit=EX_NOPERM)
    assert "535" in result.stderr and f"scope needed: {IDP_SCOPE}" in result.stderr
    assert "SMTP_OAUTH2_SCOPE" in result.stderr and token_relay.messages == []


def test_exchange_smtp_auth_disabled_gets_the_set_casmailbox_hint(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, SENDMAIL_SHIM_DELIVERY="direct")
    token_relay.reply_at["auth"] = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
    result = shim.run("-i", "bob@example.com", stdin=MESSAGE, expect_exit=EX_NOPERM)
    assert f"Set-CASMailbox -Identity {RELAY_LOGIN} -SmtpClientAuthenticationDisabled $false" in result.stderr
    assert "client_credentials" in result.stderr


def test_token_expiring_in_a_200_message_queue_run(shim_factory, relay_factory, ca, idp):
    """Tokens live 2 s. The relay ends each session after 10 messages (as providers limit a
    session), so a run logs in again and again, and takes at least 20 ms per message (200 × 20 ms
    is twice the lifetime): the run must replace its token on the way. Every login has a live
    token, every message arrives once."""
    idp.lifetime = 2
    relay = relay_factory(handler_class=functools.partial(TokenRelayHandler, idp=idp, session_limit=10,
                                                          data_seconds=0.02), mechanisms=(), pipelining=True)
    shim = oauth_shim(shim_factory, relay, idp, ca, SENDMAIL_SHIM_DELIVERY="queue",
                      SENDMAIL_SHIM_QUEUE_CONNECTIONS="1")
    for n in range(200):
        shim.run("-odq", "-i", f"r{n}@example.com", stdin=MESSAGE)
    for _run in range(5):  # a message whose session the relay ended is retried by the next run
        shim.run("-q")
        if not queued(shim):
            break
    assert sorted(m.rcpt_tos[0] for m in relay.messages) == sorted(f"r{n}@example.com" for n in range(200))
    refused, fetched = relay.handler.refused, idp.requests.count("client_credentials")  # no reprs: they hold secrets
    assert refused == 0  # every login had a live token
    assert fetched >= 2  # replaced at least once on the way


def test_a_token_is_sent_only_over_tls():
    with pytest.raises(ConfigError, match="only over TLS"):
        auth.choose("xoauth2", "XOAUTH2 PLAIN", tls=False, where="relay:25")
    with pytest.raises(Unavailable, match="XOAUTH2"):
        auth.choose("xoauth2", "PLAIN LOGIN", tls=True, where="relay:587")
    assert auth.choose("oauthbearer", "PLAIN OAUTHBEARER XOAUTH2", tls=True, where="relay:587") == "OAUTHBEARER"


@pytest.mark.parametrize("challenge, line", [
    (b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}',
     "status 400, scope needed: https://mail.google.com/"),
    (b'{"status":"invalid_token"}', "status invalid_token"),
    (b"not json\x00", "not json?"),
], ids=["gmail", "rfc7628", "garbage"])
def test_error_challenge_is_one_line(challenge, line):
    assert auth.describe_challenge(challenge) == line


def test_check_shows_the_flow_expiry_and_scopes_never_the_token(shim_factory, token_relay, idp, ca):
    shim = oauth_shim(shim_factory, token_relay, idp, ca)
    out = shim.run("--check").stdout.decode()
    assert "AUTH: XOAUTH2 accepted" in out
    assert f"OAuth2: flow client_credentials, token endpoint {idp.token_url}" in out
    assert f"scopes granted: {IDP_SCOPE}" in out and "OAuth2 access token: expires 20" in out


@pytest.mark.parametrize("setting, text", [
    ({"SMTP_OAUTH2_TOKEN_URL": "http://127.0.0.1:1/token"}, "reached only over https"),
    ({"SMTP_OAUTH2_CA_FILE": None}, "failed certificate verification"),  # the test CA is not a system CA
], ids=["http", "unverified"])
def test_the_idp_only_over_verified_https(shim_factory, token_relay, idp, ca, setting, text):
    shim = oauth_shim(shim_factory, token_relay, idp, ca, SENDMAIL_SHIM_DELIVERY="direct", **setting)
    result = shim.run("-i", "bob@example.com", stdin=MESSAGE, expect_exit=EX_CONFIG)
    assert text in result.stderr and idp.requests == [] and token_relay.messages == []


def test_client_credentials_with_a_certificate_instead_of_a_secret(shim_factory, token_relay, idp, ca, tmp_path):
    leaf = ca.ca.issue_cert("app.test", key_type=trustme.KeyType.RSA)  # Microsoft takes RSA keys
    pem = tmp_path / "app.pem"
    pem.write_bytes(leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes())
    pem.chmod(0o600)
    idp.certificates[CLIENT_ID] = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    idp.clients[CLIENT_ID] = "a secret the shim does not have"
    shim = oauth_shim(shim_factory, token_relay, idp, ca, SMTP_OAUTH2_CLIENT_CERT_FILE=str(pem))
    shim.run("-i", "bob@example.com", stdin=MESSAGE)
    assert token_relay.messages[0].login == RELAY_LOGIN and idp.requests == ["client_credentials"]
    pem.chmod(0o644)  # the key in it: refused as a loose credential file is
    other = oauth_shim(shim_factory, token_relay, idp, ca, SENDMAIL_SHIM_DELIVERY="direct",
                       SMTP_OAUTH2_CLIENT_CERT_FILE=str(pem))
    result = other.run("-i", "bob@example.com", stdin=MESSAGE, expect_exit=EX_CONFIG)
    assert "everyone can read it" in result.stderr and len(idp.requests) == 1
