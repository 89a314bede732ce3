"""A real OAuth2 authorization server on HTTPS on 127.0.0.1 for the tests, built from oauthlib's
server endpoints (`oauthlib.oauth2.Server`): client credentials, refresh tokens and authorization
codes with PKCE (RFC 6749, RFC 7636; `consent` plays the browser),
short-lived access tokens, refresh tokens rotated on every use (the old one refused from then
on, as strict providers do), revocation, and an RFC 8628 device authorization endpoint (which
oauthlib 3.2 does not have: the device grant is written here, on the same token store).

    idp.clients["app-id"] = "client-secret"          # None: a public client (device login)
    refresh = idp.grant_refresh_token("app-id", "alice@163.test")   # as a past --oauth2-login
    idp.revoke(refresh); idp.stop(); idp.start()     # same port
    idp.hold = threading.Event()                     # token answers wait until idp.hold.set()
    idp.check(token) -> Grant | None                 # what the test relay asks
    idp.consent(authorization_url, user) -> the address the browser is sent back to
"""

import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qsl

import pytest
from oauthlib.oauth2 import RequestValidator, Server

from tests.shim import TOKENS

__all__ = ["IdP", "Grant", "idp_server", "IDP_SCOPE", "CLIENT_ID", "CLIENT_SECRET"]

IDP_SCOPE = "https://mail.test/smtp"  # what the test relay wants in a token
CLIENT_ID = "sendmail-shim-test-app"
CLIENT_SECRET = "client-Secret-4-tests"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class Grant(NamedTuple):
    client_id: str
    user: str | None  # None: an app-only (client credentials) token
    scopes: tuple[str, ...]
    expires_at: float  # access tokens only


class _Client(NamedTuple):
    client_id: str


class _Validator(RequestValidator):
    """oauthlib's hooks onto the IdP's dictionaries."""

    def __init__(self, idp: "IdP"):
        self.idp = idp

    def client_authentication_required(self, request, *args, **kwargs):
        return self.idp.clients.get(request.client_id) is not None

    def authenticate_client(self, request, *args, **kwargs):
        secret = self.idp.clients.get(request.client_id)
        assertion = dict(request.decoded_body or ()).get("client_assertion")
        if assertion is not None:
            if not self.idp.assertion_valid(request.client_id, assertion):
                return False
        elif secret is None or not secrets.compare_digest(secret, request.client_secret or ""):
            return False
        request.client = _Client(request.client_id)
        return True

    def authenticate_client_id(self, client_id, request, *args, **kwargs):
        if client_id not in self.idp.clients:
            return False
        request.client = _Client(client_id)
        return True

    def validate_grant_type(self, client_id, grant_type, client, request, *args, **kwargs):
        return grant_type in ("client_credentials", "refresh_token", "authorization_code")

    # the authorization code grant, PKCE required
    def validate_client_id(self, client_id, request, *args, **kwargs):
        return client_id in self.idp.clients

    def validate_redirect_uri(self, client_id, redirect_uri, request, *args, **kwargs):
        return redirect_uri.startswith("http://127.0.0.1:")  # loopback, as Google's installed apps

    def validate_response_type(self, client_id, response_type, client, request, *args, **kwargs):
        return response_type == "code"

    def is_pkce_required(self, client_id, request):
        return True

    def save_authorization_code(self, client_id, code, request, *args, **kwargs):
        self.idp.codes[code["code"]] = {
            "client_id": client_id, "redirect_uri": request.redirect_uri, "user": request.user,
            "scopes": request.scopes, "challenge": request.code_challenge, "method": request.code_challenge_method}

    def validate_code(self, client_id, code, client, request, *args, **kwargs):
        grant = self.idp.codes.get(code)
        if grant is None or grant["client_id"] != client_id:
            return False
        request.user, request.scopes = grant["user"], grant["scopes"]
        return True

    def confirm_redirect_uri(self, client_id, code, redirect_uri, client, request, *args, **kwargs):
        return self.idp.codes[code]["redirect_uri"] == redirect_uri

    def get_code_challenge(self, code, request):
        return self.idp.codes[code]["challenge"]

    def get_code_challenge_method(self, code, request):
        return self.idp.codes[code]["method"]

    def invalidate_authorization_code(self, client_id, code, request, *args, **kwargs):
        self.idp.codes.pop(code, None)

    def validate_scopes(self, client_id, scopes, client, request, *args, **kwargs):
        return True  # any scope is granted; the relay decides whether it is enough

    def get_default_scopes(self, client_id, request, *args, **kwargs):
        return [IDP_SCOPE]

    def validate_refresh_token(self, refresh_token, client, request, *args, **kwargs):
        grant = self.idp.refresh_tokens.get(refresh_token)
        if grant is None or grant.client_id != client.client_id:
            return False
        request.user = grant.user
        return True

    def get_original_scopes(self, refresh_token, request, *args, **kwargs):
        return list(self.idp.refresh_tokens[refresh_token].scopes)

    def rotate_refresh_token(self, request):
        return True

    def save_bearer_token(self, token, request, *args, **kwargs):
        self.idp.save(token, request.client_id or request.client.client_id, getattr(request, "user", None),
                      old_refresh=request.refresh_token)


class IdP:
    """The server; ``url`` is its base, ``token_url`` and ``device_url`` its endpoints."""

    def __init__(self, certificates, lifetime: float = 3600):
        self.lifetime = lifetime
        self.clients: dict[str, str | None] = {CLIENT_ID: CLIENT_SECRET}
        self.certificates: dict[str, object] = {}  # client id → its registered certificate (cryptography x509)
        TOKENS.add(CLIENT_SECRET)
        self.access_tokens: dict[str, Grant] = {}
        self.refresh_tokens: dict[str, Grant] = {}
        self.devices: dict[str, dict] = {}  # device_code → user_code, scope, client, approved user
        self.codes: dict[str, dict] = {}  # authorization code → its client, redirect, user, PKCE challenge
        self.requests: list[str] = []  # grant_type of every token request
        self.hold: threading.Event | None = None  # when set: token answers wait until it is set
        self._lock = threading.Lock()
        self._server = Server(_Validator(self), token_expires_in=lambda request: int(self.lifetime))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificates.ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._context)
        self.port = 0
        self._httpd = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    token_url = property(lambda self: self.url + "/token")
    device_url = property(lambda self: self.url + "/device")

    def start(self) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.socket = self._context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening (connections are refused) until `start`, on the same port."""
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- what the tests and the relay use -------------------------------------------------------

    def grant_refresh_token(self, client_id: str, user: str, scope: str = IDP_SCOPE) -> str:
        """A refresh token, as a completed login of ``user`` would have left."""
        token = secrets.token_urlsafe(24)
        TOKENS.add(token)
        self.refresh_tokens[token] = Grant(client_id, user, tuple(scope.split()), 0.0)
        return token

    def revoke(self, refresh_token: str) -> None:
        self.refresh_tokens.pop(refresh_token, None)

    def check(self, access_token: str) -> Grant | None:
        """The grant of a live access token, None for an unknown or expired one."""
        grant = self.access_tokens.get(access_token)
        return grant if grant and grant.expires_at > time.time() else None

    def approve(self, user_code: str, user: str) -> None:
        """The person logs in on the verification page and enters ``user_code``."""
        for device in self.devices.values():
            if device["user_code"] == user_code:
                device["user"] = user

    def assertion_valid(self, client_id: str, assertion: str) -> bool:
        """A certificate credential (RFC 7523 JWT, PS256, as Microsoft takes it): signed by the
        client's registered certificate, for this token endpoint, not expired."""
        from base64 import urlsafe_b64decode

        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        TOKENS.add(assertion)
        certificate = self.certificates.get(client_id)
        b64 = lambda text: urlsafe_b64decode(text + "=" * (-len(text) % 4))  # noqa: E731
        try:
            header, claims, signature = assertion.split(".")
            certificate.public_key().verify(b64(signature), f"{header}.{claims}".encode(),
                                            padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
            header, claims = json.loads(b64(header)), json.loads(b64(claims))
        except (AttributeError, ValueError, InvalidSignature):
            return False
        thumbprint = b64(header.get("x5t#S256", "")) == certificate.fingerprint(hashes.SHA256())
        return (thumbprint and header.get("alg") == "PS256" and claims.get("aud") == self.token_url
                and claims.get("iss") == claims.get("sub") == client_id and claims.get("exp", 0) > time.time())

    def consent(self, authorization_url: str, user: str) -> str:
        """The person opens ``authorization_url`` (any host: only its query counts), signs in as
        ``user`` and agrees; the address the browser is then sent to (the code and the state)."""
        query = authorization_url.partition("?")[2]
        scopes, _details = self._server.validate_authorization_request(f"{self.url}/authorize?{query}")
        headers, _body, _status = self._server.create_authorization_response(
            f"{self.url}/authorize?{query}", scopes=scopes, credentials={"user": user})
        return headers["Location"]

    def save(self, token: dict, client_id: str, user: str | None, old_refresh: str | None = None) -> None:
        scopes = tuple(token.get("scope", "").split())
        TOKENS.update(filter(None, (token["access_token"], token.get("refresh_token"))))
        with self._lock:
            self.access_tokens[token["access_token"]] = Grant(client_id, user, scopes,
                                                              time.time() + token["expires_in"])
            if old_refresh:
                self.refresh_tokens.pop(old_refresh, None)  # rotated: the old one is spent
            if token.get("refresh_token"):
                self.refresh_tokens[token["refresh_token"]] = Grant(client_id, user, scopes, 0.0)

    # -- HTTP -----------------------------------------------------------------------------------

    def answer(self, path: str, body: str) -> tuple[int, dict]:
        form = dict(parse_qsl(body))
        if path == "/device":
            return self._device_authorization(form)
        if path != "/token":
            return 404, {"error": "not_found"}
        self.requests.append(form.get("grant_type", ""))
        if self.hold is not None:
            self.hold.wait(60)
        if form.get("grant_type") == DEVICE_GRANT:
            return self._device_token(form)
        _headers, text, status = self._server.create_token_response(
            self.token_url, "POST", body, {"Content-Type": "application/x-www-form-urlencoded"})
        return status, json.loads(text)

    def _device_authorization(self, form: dict) -> tuple[int, dict]:
        if form.get("client_id") not in self.clients:
            return 400, {"error": "invalid_client"}
        device_code = secrets.token_urlsafe(16)
        user_code = secrets.token_hex(4).upper()
        self.devices[device_code] = {"user_code": user_code, "client_id": form["client_id"],
                                     "scope": form.get("scope", IDP_SCOPE), "user": None}
        return 200, {"device_code": device_code, "user_code": user_code, "verification_uri": self.url + "/login",
                     "expires_in": 600, "interval": 1}

    def _device_token(self, form: dict) -> tuple[int, dict]:
        device = self.devices.get(form.get("device_code", ""))
        if device is None or device["client_id"] != form.get("client_id"):
            return 400, {"error": "invalid_grant"}
        if device["user"] is None:
            return 400, {"error": "authorization_pending"}
        del self.devices[form["device_code"]]
        token = {"access_token": secrets.token_urlsafe(24), "token_type": "Bearer", "expires_in": int(self.lifetime),
                 "refresh_token": secrets.token_urlsafe(24), "scope": device["scope"]}
        self.save(token, device["client_id"], device["user"])
        return 200, token


def _handler(idp: IdP):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length") or 0)
            status, answer = idp.answer(self.path, self.rfile.read(length).decode())
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # the tokens are in the requests: never printed
            pass

    return Handler


@pytest.fixture
def idp_server(ca):
    """A started IdP (tokens live an hour: set ``lifetime`` for shorter ones)."""
    server = IdP(ca)
    server.start()
    yield server
    server.stop()
