"""OAuth2 access tokens for SMTP_AUTH=xoauth2/oauthbearer, got by the shim itself, headless.

Flows (SMTP_OAUTH2_FLOW): ``client_credentials`` (app-only; the client secret is what
``--set-password`` stored, or a certificate, SMTP_OAUTH2_CLIENT_CERT_FILE) and ``refresh_token``
(the refresh token ``--oauth2-login`` stored). The identity provider (IdP) is reached only over
verified HTTPS, without following redirects. An access token is cached with its expiry in the
spool (`tokens`: the queue runner's, also where the credential file is read-only to it; not read
by whoever may not read the credentials), with the refresh token the IdP rotated, which wins over
the stored one it replaced. So a queue run or a burst of ``-odb`` calls asks the IdP once per
token lifetime, one process at a time (the others take its answer); a token about to expire is
replaced before use.

oauthlib (Debian's python3-oauthlib) builds the token requests and reads the answers (its
errors name the RFC 6749 error codes); it is imported only when a new token is needed.
"""

import json
import os
import threading
import time
from contextlib import nullcontext
from typing import NamedTuple

from . import credentials, credstore, providers, tokens
from .errors import ConfigError, PolicyError, ShimError, TempFail
from .i18n import _, localize
from .secret import Secret

REFRESH_MARGIN = 300.0  # seconds before expiry a token is replaced (at most half its lifetime)
_MAX_ANSWER = 1 << 20
_TEXT_CHARS = 160


class IdP(NamedTuple):
    """An identity provider's endpoints and the scopes SMTP needs there; ``{tenant}`` is
    SMTP_OAUTH2_TENANT."""

    token_url: str
    device_url: str | None  # device authorization (RFC 8628), for --oauth2-login
    authorize_url: str | None  # authorization code with PKCE, for --oauth2-login where there is no device flow
    scope: str  # delegated (refresh_token flow)
    app_scope: str | None  # app-only (client_credentials flow)
    tenant: str | None = None  # default SMTP_OAUTH2_TENANT


# The IdPs of the presets' families. Sources:
# - Microsoft: https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
#   (delegated scope https://outlook.office.com/SMTP.Send; app-only https://outlook.office365.com/.default with
#   the SMTP.SendAsApp permission; authorization code, device code and client credentials flows on the v2.0
#   endpoints https://login.microsoftonline.com/{tenant}/oauth2/v2.0/{authorize,devicecode,token});
#   offline_access asks for a refresh token.
# - Google: https://developers.google.com/workspace/gmail/imap/xoauth2-protocol (scope https://mail.google.com/
#   for SMTP) and https://developers.google.com/identity/protocols/oauth2/native-app (installed apps:
#   authorization code with PKCE, https://accounts.google.com/o/oauth2/v2/auth and
#   https://oauth2.googleapis.com/token; Google's device flow does not grant Gmail scopes).
_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/"
IDPS = {
    "microsoft": IdP(_MICROSOFT + "token", _MICROSOFT + "devicecode", _MICROSOFT + "authorize",
                     "https://outlook.office.com/SMTP.Send offline_access", "https://outlook.office365.com/.default",
                     tenant="organizations"),
    "gmail": IdP("https://oauth2.googleapis.com/token", None, "https://accounts.google.com/o/oauth2/v2/auth",
                 "https://mail.google.com/", None),
}


class Endpoints(NamedTuple):
    token_url: str
    device_url: str | None
    authorize_url: str | None
    scope: str


class Token(NamedTuple):
    access: Secret
    expires_at: float  # time.time() clock
    lifetime: float  # expires_in as issued
    scope: str  # as granted

    def fresh(self, now: float) -> bool:
        return self.expires_at - now > min(REFRESH_MARGIN, self.lifetime / 2)


def endpoints(config) -> Endpoints:
    """Where to ask and for what: SMTP_OAUTH2_* settings over the provider family's IdP."""
    family = providers.PRESETS[config.provider].family if config.provider in providers.PRESETS else None
    idp = IDPS.get(family)
    app_only = config.oauth2_flow == "client_credentials"
    tenant = config.oauth2_tenant or (idp.tenant if idp else None)
    if idp and not config.oauth2_token_url and (not tenant or (app_only and tenant == idp.tenant)):
        raise ConfigError(_("SMTP_OAUTH2_TENANT is not set"),
                          _("set it to the directory (tenant) id of the application's registration"))
    fill = lambda url: url.replace("{tenant}", tenant or "") if url else None  # noqa: E731
    token_url = config.oauth2_token_url or (fill(idp.token_url) if idp else None)
    if not token_url:
        raise ConfigError(_("SMTP_OAUTH2_TOKEN_URL is not set (provider {provider} has no default)").format(
            provider=config.provider))
    scope = config.oauth2_scope or (idp and (idp.app_scope if app_only else idp.scope))
    if not scope:
        raise ConfigError(_("SMTP_OAUTH2_SCOPE is not set (provider {provider} has no default)").format(
            provider=config.provider))
    return Endpoints(token_url, config.oauth2_device_url or (fill(idp.device_url) if idp else None),
                     fill(idp.authorize_url) if idp else None, scope)


class TokenSource:
    """The runner's source of what AUTH sends, shaped like its password source: called on each
    connection's AUTH, it returns a token that outlives the refresh margin, replacing it in the
    middle of a long run; a failure to get one is remembered for the run."""

    def __init__(self, config, environ=None):
        self.config, self.environ = config, environ
        self._error: ShimError | None = None

    def __call__(self) -> Secret:
        if self._error is None:
            try:
                return access_token(self.config, self.environ)
            except ShimError as exc:
                self._error = exc
        raise self._error


_lock = threading.Lock()  # one IdP request at a time in this process (a queue run's workers)
_memo: dict[tuple, Token] = {}


def access_token(config, environ=None, *, now=time.time) -> Secret:
    """A fresh access token for ``config.user``: from this process's memory, else the token
    cache, else the IdP."""
    key = _key(config)
    with _lock:
        token = _memo.get(key)
        if token is None or not token.fresh(now()):
            token = cached(config, environ)
            if token is None or not token.fresh(now()):
                token = _renew(config, environ, now)
            _memo[key] = token
        return token.access


def cached(config, environ=None) -> Token | None:
    """The cached token (fresh or not), None when there is none or it cannot be read here."""
    cache = _cache(config, environ)
    return _token_of(config, cache.read()) if cache else None


def _renew(config, environ, now) -> Token:
    """A token from the IdP, under the login's lock: a process that waited for it takes the
    token the one before it got."""
    cache = _cache(config, environ)
    with cache.locked() if cache else nullcontext() as writer:
        record = cache.read() if cache else {}
        token = _token_of(config, record)
        if token is not None and token.fresh(now()):
            return token
        token, newest, stored = _fetch(config, environ, now(), record)
        _keep(config, writer, token, newest, stored, environ)
        return token


def _cache(config, environ) -> tokens.Cache | None:
    """The login's token cache; None for a caller who may not read the credentials (privilege
    separation: nor may it read what they got)."""
    if not config.user or not credentials.readable(config, environ):
        return None
    return tokens.Cache(config.queue_dir, config.user)


def _token_of(config, record: dict) -> Token | None:
    try:
        if record.get("for") != _settings_digest(config):  # got for another IdP, client or scope
            return None
        return Token(Secret(record["access_token"]), float(record["expires_at"]), float(record["lifetime"]),
                     str(record.get("scope", "")))
    except (ValueError, KeyError, TypeError):  # a cache is worth nothing when in doubt
        return None


def _keep(config, writer, token: Token, newest: Secret | None, stored: Secret | None, environ) -> None:
    """Cache `token`, and the refresh token `newest` when the IdP rotated `stored` (the one in
    the credential store). A caller who cannot keep the cache stores a rotated one back there
    if it may."""
    record = {"access_token": token.access.reveal(), "expires_at": token.expires_at,
              "lifetime": token.lifetime, "scope": token.scope, "for": _settings_digest(config)}
    rotated = newest is not None and stored is not None and newest.reveal() != stored.reveal()
    if rotated:
        record.update(refresh_token=newest.reveal(), replaces=_digest(stored.reveal()))
    if writer is not None and writer.write(record):
        return
    if rotated:
        try:
            credentials.set_refresh_token(config, newest, environ)
        except ShimError:
            pass  # nowhere to keep it: the next process refreshes with the stored one, if the IdP still takes it


def _rotated(config, record: dict, stored: Secret) -> Secret | None:
    """The cache's refresh token, if it is the rotation of `stored` (a new --oauth2-login wins)."""
    if record.get("for") == _settings_digest(config) and record.get("replaces") == _digest(stored.reveal()):
        newest = record.get("refresh_token")
        return Secret(newest) if isinstance(newest, str) and newest else None
    return None


def _key(config) -> tuple:
    return (config.user, config.oauth2_flow, config.oauth2_client_id, config.oauth2_token_url,
            config.oauth2_scope, config.oauth2_tenant, config.provider, config.oauth2_client_cert_file)


def _settings_digest(config) -> str:
    """What the cached token was got for: a changed IdP, client or scope needs another."""
    return _digest(repr(_key(config)))


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fetch(config, environ, now: float, record: dict) -> tuple[Token, Secret | None, Secret | None]:
    """A new token from the IdP, by SMTP_OAUTH2_FLOW; with the refresh token to use from now on
    and the stored one (None for client credentials)."""
    from oauthlib.oauth2 import BackendApplicationClient

    where = endpoints(config)
    client_id = _client_id(config)
    if config.oauth2_flow == "client_credentials":
        proof = (client_assertion(config, where.token_url, now) if config.oauth2_client_cert_file
                 else {"client_secret": credentials.get_secret(config, environ).reveal()})
        form = BackendApplicationClient(client_id).prepare_request_body(
            scope=where.scope, include_client_id=True, **proof)
        return token_request(config, where, form, now)[0], None, None
    stored = credentials.get_refresh_token(config, environ)
    refresh = _rotated(config, record, stored) or stored
    try:
        token, rotated = _refresh(config, where, client_id, refresh, environ, now)
    except PolicyError:
        again = credentials.get_refresh_token(config, environ)
        if again.reveal() in (refresh.reveal(), stored.reveal()):
            raise
        stored = refresh = again  # logged in again (or stored back by another process) meanwhile
        token, rotated = _refresh(config, where, client_id, refresh, environ, now)
    return token, rotated or refresh, stored


def _refresh(config, where: Endpoints, client_id: str, refresh: Secret, environ, now: float):
    from oauthlib.oauth2 import Client

    form = Client(client_id).prepare_refresh_body(
        refresh_token=refresh.reveal(), scope=where.scope, client_id=client_id, **_client_secret(config, environ))
    return token_request(config, where, form, now)


def client_assertion(config, token_url: str, now: float) -> dict:
    """The certificate credential instead of a client secret: a JWT (RFC 7523 private_key_jwt)
    for the token endpoint, PS256-signed with the key in SMTP_OAUTH2_CLIENT_CERT_FILE (checked
    like the credential file) and naming its certificate by SHA-256 thumbprint; valid 10 minutes.
    Format: https://learn.microsoft.com/en-us/entra/identity-platform/certificate-credentials"""
    import uuid
    from base64 import urlsafe_b64encode

    from cryptography import x509  # Debian's python3-oauthlib depends on python3-cryptography
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    path = config.oauth2_client_cert_file
    b64 = lambda data: urlsafe_b64encode(data).rstrip(b"=").decode("ascii")  # noqa: E731
    try:
        credstore.check_file(path, os.stat(path), credstore.service_gid())
        with open(path, "rb") as stream:
            pem = stream.read()
        certificate = x509.load_pem_x509_certificate(pem)
        key = serialization.load_pem_private_key(pem, password=None)
    except OSError as exc:
        raise ConfigError(_("cannot read SMTP_OAUTH2_CLIENT_CERT_FILE {path}: {reason}").format(
            path=path, reason=exc.strerror)) from None
    except ValueError:  # the message may quote the PEM
        raise ConfigError(_("SMTP_OAUTH2_CLIENT_CERT_FILE {path}: expected a PEM certificate and its unencrypted "
                            "private key").format(path=path)) from None
    header = {"alg": "PS256", "typ": "JWT", "x5t#S256": b64(certificate.fingerprint(hashes.SHA256()))}
    claims = {"aud": token_url, "iss": _client_id(config), "sub": _client_id(config), "jti": str(uuid.uuid4()),
              "nbf": int(now), "iat": int(now), "exp": int(now) + 600}
    signed = ".".join(b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
    signature = key.sign(signed.encode("ascii"), padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    return {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": f"{signed}.{b64(signature)}"}


def _client_id(config) -> str:
    if not config.oauth2_client_id:
        raise ConfigError(_("SMTP_OAUTH2_CLIENT_ID is not set"),
                          _("register an application with the provider and set its client id"))
    return config.oauth2_client_id


def _client_secret(config, environ) -> dict:
    """A confidential client's secret (Google's installed apps have one too), when stored."""
    try:
        return {"client_secret": credentials.get_secret(config, environ).reveal()}
    except ConfigError:
        return {}


def token_request(config, where: Endpoints, form: str, now: float) -> tuple[Token, Secret | None]:
    """POST ``form`` to the token endpoint: the token, and the refresh token when one came."""
    from oauthlib.oauth2.rfc6749 import errors, parameters

    status, body = post(config, where.token_url, form)
    if status >= 500 or status == 429:
        raise TempFail(_("the identity provider answered HTTP {status}").format(status=status))
    try:
        params = parameters.parse_token_response(body.decode("utf-8", "replace"), scope=where.scope)
    except Warning as changed:  # granted other scopes than asked (Microsoft always does): --check shows them
        params = changed.token
    except errors.OAuth2Error as exc:
        raise refusal(config, exc.error, exc.description) from None
    except ValueError:
        raise TempFail(_("the identity provider answered HTTP {status} without a token").format(
            status=status)) from None
    lifetime = float(params.get("expires_in") or 3600)
    refresh = params.get("refresh_token")
    granted = params.get("scope") or where.scope  # oauthlib gives a list
    granted = granted if isinstance(granted, str) else " ".join(granted)
    token = Token(Secret(params["access_token"]), now + lifetime, lifetime, granted)
    return token, Secret(refresh) if refresh else None


def refusal(config, error: str, description: str | None) -> ShimError:
    """The error for an RFC 6749 §5.2 error answer; its ``oauth2_error`` is the error code."""
    exc = _refusal(config, error, _printable(f"{error}: {description}" if description else error))
    exc.oauth2_error = error
    return exc


def _refusal(config, error: str, said: str) -> ShimError:
    if error in ("temporarily_unavailable", "server_error", "slow_down"):
        return TempFail(_("the identity provider cannot answer now ({said})").format(said=said))
    if error == "invalid_scope":
        return ConfigError(_("the identity provider refused the scope ({said})").format(said=said),
                           _("check SMTP_OAUTH2_SCOPE"))
    if error in ("invalid_client", "unauthorized_client"):
        return PolicyError(_("the identity provider refused the client ({said})").format(said=said),
                           _("check SMTP_OAUTH2_CLIENT_ID and the client secret (sendmail-shim --set-password)"))
    if error == "invalid_grant" and config.oauth2_flow == "refresh_token":
        return PolicyError(_("the OAuth2 login of {user} is no longer valid ({said})").format(
            user=config.user, said=said), _("log in again: sendmail-shim --oauth2-login"))
    return PolicyError(_("the identity provider refused the token request ({said})").format(said=said))


def post(config, url: str, form: str) -> tuple[int, bytes]:
    """One HTTPS POST of a form to the IdP, certificate verified (SMTP_OAUTH2_CA_FILE, else the
    system CAs), no redirects; the status and at most 1 MiB of the answer."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(_("{url}: the identity provider is reached only over https").format(url=url))
    try:
        context = ssl.create_default_context(cafile=config.oauth2_ca_file)
    except OSError as exc:
        raise ConfigError(_("cannot read SMTP_OAUTH2_CA_FILE {path}: {reason}").format(
            path=config.oauth2_ca_file, reason=exc.strerror)) from None
    connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=config.timeout, context=context)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target or "/", body=form.encode("ascii"), headers={
            "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read(_MAX_ANSWER)
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(_("the identity provider {host} failed certificate verification: {reason}").format(
            host=parts.hostname, reason=exc.verify_message), _("set SMTP_OAUTH2_CA_FILE for a private CA")) from None
    except (OSError, http.client.HTTPException) as exc:
        raise TempFail(_("cannot reach the identity provider {host}: {reason}").format(
            host=parts.hostname, reason=_printable(str(exc) or type(exc).__name__))) from None
    finally:
        connection.close()


def _printable(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= _TEXT_CHARS else text[: _TEXT_CHARS - 1] + "…"


# -- --oauth2-login: a person is there once, the refresh token stays ---------------------------------

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Where the browser goes after the consent of an installed-app login: nothing listens there (a
# headless server has no browser), the person copies the address the browser shows.
REDIRECT_URI = "http://127.0.0.1:1/"


def login(config, stdin, out, environ=None, *, sleep=time.sleep) -> str:
    """``--oauth2-login``: the device flow (RFC 8628) where the IdP has one, else the
    authorization code flow with PKCE (RFC 7636; Google's installed apps); the refresh token is
    stored and the access token cached. Returns where the refresh token went."""
    if config.auth == "password" or config.oauth2_flow != "refresh_token":
        raise ConfigError(_("--oauth2-login is for SMTP_AUTH=xoauth2 or oauthbearer with "
                            "SMTP_OAUTH2_FLOW=refresh_token"),
                          _("with client_credentials, store the client secret with sendmail-shim --set-password"))
    where = endpoints(config)
    client_id = _client_id(config)
    now = time.time()
    say = lambda text: print(localize(text, environ), file=out, flush=True)  # noqa: E731
    if where.device_url:
        token, refresh = _device_login(config, where, client_id, say, sleep)
    elif where.authorize_url:
        token, refresh = _code_login(config, where, client_id, stdin, say, environ)
    else:
        raise ConfigError(_("SMTP_OAUTH2_DEVICE_URL is not set (provider {provider} has no default)").format(
            provider=config.provider))
    if refresh is None:
        raise PolicyError(_("the identity provider gave no refresh token"),
                          _("ask for offline access: add offline_access to SMTP_OAUTH2_SCOPE (Microsoft)"))
    stored = credentials.set_refresh_token(config, refresh, environ)
    cache = _cache(config, environ)
    with cache.locked() if cache else nullcontext() as writer:
        _keep(config, writer, token._replace(expires_at=now + token.lifetime), None, None, environ)
    return stored


def _device_login(config, where: Endpoints, client_id: str, say, sleep) -> tuple[Token, Secret | None]:
    from urllib.parse import urlencode

    status, body = post(config, where.device_url, urlencode({"client_id": client_id, "scope": where.scope}))
    try:
        device = json.loads(body)
        if "error" in device:
            raise refusal(config, str(device["error"]), device.get("error_description"))
        device_code, user_code = device["device_code"], device["user_code"]
    except (ValueError, KeyError, TypeError):
        raise PolicyError(_("the device authorization endpoint answered HTTP {status} without a code").format(
            status=status)) from None
    url = device.get("verification_uri_complete") or device.get("verification_uri") or device.get("verification_url")
    say(_("Open {url} in any browser, sign in as {user} and enter the code {code}").format(
        url=url, user=config.user, code=user_code))
    interval = float(device.get("interval") or 5)
    deadline = time.monotonic() + float(device.get("expires_in") or 900)
    form = urlencode({"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": client_id})
    while time.monotonic() < deadline:
        sleep(interval)
        try:
            return token_request(config, where, form, time.time())
        except (PolicyError, TempFail) as exc:
            pending = getattr(exc, "oauth2_error", None)
            if pending == "slow_down":
                interval += 5  # RFC 8628 §3.5
            elif pending != "authorization_pending":
                raise
    raise PolicyError(_("the device code expired before the login was finished"),
                      _("run sendmail-shim --oauth2-login again"))


def _code_login(config, where: Endpoints, client_id: str, stdin, say, environ) -> tuple[Token, Secret | None]:
    import secrets
    from urllib.parse import parse_qs, urlsplit

    from oauthlib.oauth2 import WebApplicationClient

    client = WebApplicationClient(client_id)
    verifier = client.create_code_verifier(96)
    state = secrets.token_urlsafe(16)
    url = client.prepare_request_uri(
        where.authorize_url, redirect_uri=REDIRECT_URI, scope=where.scope, state=state,
        code_challenge=client.create_code_challenge(verifier, "S256"), code_challenge_method="S256",
        access_type="offline", prompt="consent", login_hint=config.user)
    say(_("Open this address in any browser and sign in as {user}:").format(user=config.user))
    say(url)
    say(_("The browser then fails to open a 127.0.0.1 page: paste its whole address (or the code) here:"))
    answer = stdin.readline()
    answer = (answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer).strip()
    if answer.startswith("http"):
        query = parse_qs(urlsplit(answer).query)
        if query.get("state", [None])[0] != state:
            raise PolicyError(_("the pasted address is not the answer to this login (its state differs)"))
        if "error" in query:
            raise refusal(config, query["error"][0], query.get("error_description", [None])[0])
        answer = query.get("code", [""])[0]
    if not answer:
        raise PolicyError(_("no authorization code was given"))
    form = client.prepare_request_body(code=answer, redirect_uri=REDIRECT_URI, code_verifier=verifier,
                                       include_client_id=True, **_client_secret(config, environ))
    return token_request(config, where, form, time.time())
