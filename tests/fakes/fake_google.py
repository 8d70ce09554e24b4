"""A fake Google OAuth token and revoke service over HTTPS, with Google's real error bodies.

    fake = FakeGoogle(ca).start()        # https://127.0.0.1:PORT/token and /revoke
    code = fake.mint_code("https://app.example/cb", code_challenge=challenge)
    ...
    fake.stop()

Behaviour follows Google's token endpoint (form-encoded POST, client_id/client_secret in the
form, JSON answers): single-use authorization codes, PKCE S256, redirect_uri match, the
refresh_token grant, and the revoke endpoint (`token=`; 200, or 400 invalid_token when unknown).
Error bodies are the ones Google sends (the ERR_* constants below).
Modes: "normal", "hang" (no answer until the hang bound or stop()), "error500", and the odd
answers of RAW_ANSWERS (a 100k-deep error body, a token answer with a lone surrogate, HTML, an
answer over the client's size bound). `refresh_token_chars` pads issued refresh tokens to a length;
`rotate_refresh_tokens` makes the refresh_token grant answer a new refresh token (Google may).

Also a script for the local stack:
    python -m tests.fakes.fake_google --port P --cert F --key F --client-id ID --client-secret S
`POST /_fake/mint` (form: redirect_uri, scope, code_challenge) mints a code for smoke tests.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import json
import logging
import secrets
import sys
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from tests.fakes.served import ServedInThread, TlsThreadingServer
from tests.support import remember_secret

log = logging.getLogger(__name__)

DEFAULT_CLIENT_ID = "fake-client-id.apps.googleusercontent.com"
DEFAULT_CLIENT_SECRET = "fake-client-secret-GOCSPX-test"
MAX_FORM_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 5.0  # handler threads end when a kept-alive client goes quiet
HANG_BOUND_S = 5.0  # "hang" mode answers nothing for at most this long (or until stop())
ACCESS_TOKEN_TTL_S = 3599

# Google's error bodies (status, body), as observed from oauth2.googleapis.com.
ERR_INVALID_GRANT = (400, {"error": "invalid_grant", "error_description": "Bad Request"})
ERR_EXPIRED_OR_REVOKED = (400, {"error": "invalid_grant",
                                "error_description": "Token has been expired or revoked."})
ERR_MISSING_VERIFIER = (400, {"error": "invalid_grant",
                              "error_description": "Missing code verifier."})
ERR_INVALID_VERIFIER = (400, {"error": "invalid_grant",
                              "error_description": "Invalid code verifier."})
ERR_REDIRECT_MISMATCH = (400, {"error": "redirect_uri_mismatch", "error_description": "Bad Request"})
ERR_CLIENT_NOT_FOUND = (401, {"error": "invalid_client",
                              "error_description": "The OAuth client was not found."})
ERR_CLIENT_UNAUTHORIZED = (401, {"error": "invalid_client", "error_description": "Unauthorized"})
ERR_INVALID_TOKEN = (400, {"error": "invalid_token", "error_description": "Token expired or revoked"})
ERR_BACKEND = (500, {"error": "internal_failure", "error_description": "Backend Error"})


DEEP_NESTING = 100_000  # far past any recursion limit: a recursive parser would blow up
# Odd answers by mode name: (status, content type, body bytes).
RAW_ANSWERS = {
    "deep_error": (400, "application/json",
                   b'{"error": ' + b"[" * DEEP_NESTING + b"]" * DEEP_NESTING + b"}"),
    "deep_error_401": (401, "application/json",
                       b'{"error": ' + b"[" * DEEP_NESTING + b"]" * DEEP_NESTING + b"}"),
    "lone_surrogate_token": (200, "application/json",
                             b'{"access_token": "ya29.\\udc00", "expires_in": 3599, '
                             b'"token_type": "Bearer"}'),
    "nan_expiry": (200, "application/json",
                   b'{"access_token": "ya29.x", "expires_in": NaN, "token_type": "Bearer"}'),
    "non_json": (200, "text/html", b"<html><body>Service Unavailable</body></html>"),
    "html_502": (502, "text/html", b"<html><body>502 Bad Gateway</body></html>"),
    "oversize": (200, "application/json", b'{"access_token": "' + b"a" * (1024 * 1024) + b'"}'),
}
MODES = ("normal", "hang", "error500", *RAW_ANSWERS)


def _missing(name: str):
    return 400, {"error": "invalid_request", "error_description": f"Missing required parameter: {name}"}


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    offline: bool


@dataclass
class _State:
    client_id: str
    client_secret: str
    mode: str = "normal"
    codes: dict[str, _Code] = field(default_factory=dict)
    refresh_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (client, scope)
    access_tokens: dict[str, str] = field(default_factory=dict)  # -> refresh token ('' if none)
    revoked: set[str] = field(default_factory=set)
    tls_connections: int = 0
    token_requests: int = 0
    revoke_requests: int = 0
    grants: list[str] = field(default_factory=list)  # grant_type of each token request
    refresh_token_chars: int | None = None  # pad issued refresh tokens to this length
    rotate_refresh_tokens: bool = False  # the refresh grant answers a new refresh token


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()) \
        .rstrip(b"=").decode("ascii")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ESF"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        log.debug("fake-google %s " + format, self.client_address[0], *args)

    # One write per answer: no Nagle/delayed-ACK stall on kept-alive connections.
    def _answer(self, status: int, value, close: bool = False) -> None:
        body = json.dumps(value, indent=2).encode("utf-8") + b"\n"
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-cache, no-store, max-age=0, must-revalidate")
        self.send_header("Content-Length", str(len(body)))
        if close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self._headers_buffer.append(b"\r\n")
        self.wfile.write(b"".join(self._headers_buffer) + body)
        self._headers_buffer = []
        self.log_request(status, len(body))

    def _answer_raw(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self._headers_buffer.append(b"\r\n")
        self.wfile.write(b"".join(self._headers_buffer) + body)
        self._headers_buffer = []
        self.log_request(status, len(body))

    def _form(self) -> dict[str, str] | None:
        """The url-encoded form, or None after answering an error."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_FORM_BYTES:
            self._answer(400, {"error": "invalid_request", "error_description": "Bad Request"},
                         close=True)
            return None
        raw = self.rfile.read(int(length))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            self._answer(400, {"error": "invalid_request",
                               "error_description": "Invalid content type"})
            return None
        try:
            parsed = parse_qs(raw.decode("ascii"), keep_blank_values=True, strict_parsing=bool(raw))
        except (UnicodeDecodeError, ValueError):
            self._answer(400, {"error": "invalid_request", "error_description": "Bad Request"})
            return None
        for name, values in parsed.items():
            if len(values) > 1:
                self._answer(400, {"error": "invalid_request",
                                   "error_description": f"Duplicate parameter: {name}"})
                return None
        return {k: v[0] for k, v in parsed.items()}

    def do_GET(self):
        self._answer(404, {"error": "not_found"})

    def do_POST(self):
        fake: FakeGoogle = self.server.fake
        path = self.path.split("?", 1)[0]
        if path not in ("/token", "/revoke", "/_fake/mint"):
            self._answer(404, {"error": "not_found"})
            return
        form = self._form()
        if form is None:
            return
        if fake.state.mode == "hang":
            fake._release.wait(fake.hang_s)
            self.close_connection = True
            return
        if fake.state.mode == "error500":
            self._answer(*ERR_BACKEND)
            return
        if fake.state.mode in RAW_ANSWERS:
            self._answer_raw(*RAW_ANSWERS[fake.state.mode])
            return
        with fake._lock:
            if path == "/token":
                fake.state.token_requests += 1
                status, value = fake._token(form)
            elif path == "/revoke":
                fake.state.revoke_requests += 1
                status, value = fake._revoke(form)
            else:
                status, value = 200, {"code": fake._mint_locked(
                    form.get("redirect_uri", ""), form.get("scope", "openid email"),
                    form.get("code_challenge") or None, True)}
        self._answer(status, value)


class _Server(TlsThreadingServer):
    def on_tls_connection(self) -> None:
        with self.fake._lock:
            self.fake.state.tls_connections += 1


class FakeGoogle(ServedInThread):
    """Google's token and revoke endpoints on https://127.0.0.1:PORT (port 0 by default)."""

    THREAD_NAME = "fake-google"

    def __init__(self, ca=None, *, client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET, host: str = "127.0.0.1",
                 port: int = 0, cert_file: str | None = None, key_file: str | None = None,
                 hang_s: float = HANG_BOUND_S, idle_timeout_s: float = IDLE_TIMEOUT_S):
        self.state = _State(client_id, client_secret)
        remember_secret(client_secret, kind="google client secret")
        self.hang_s = hang_s
        self._lock = threading.Lock()
        self._release = threading.Event()
        handler = type("_FakeGoogleHandler", (_Handler,), {"timeout": idle_timeout_s})
        self._listen(host, port, handler, ca=ca, cert_file=cert_file, key_file=key_file,
                     server_class=_Server)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"https://{self._server.server_address[0]}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    @property
    def revoke_url(self) -> str:
        return self.base_url + "/revoke"

    # -- test controls -----------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.state.mode = mode
        if mode == "normal":
            self._release.set()
            self._release = threading.Event()

    @property
    def tls_connections(self) -> int:
        return self.state.tls_connections

    def _mint_locked(self, redirect_uri, scope, code_challenge, offline, client_id=None) -> str:
        code = "4/0A" + secrets.token_urlsafe(40)
        remember_secret(code, kind="google authorization code")
        self.state.codes[code] = _Code(client_id or self.state.client_id, redirect_uri, scope,
                                       code_challenge, offline)
        return code

    def mint_code(self, redirect_uri: str, *, scope: str = "openid email",
                  code_challenge: str | None = None, offline: bool = True,
                  client_id: str | None = None) -> str:
        """An authorization code as Google's consent screen would hand it to the redirect URI.

        With `code_challenge` (S256), the exchange must present the matching code_verifier.
        `offline=False` mimics a consent without access_type=offline: no refresh token.
        """
        with self._lock:
            return self._mint_locked(redirect_uri, scope, code_challenge, offline, client_id)

    def mint_refresh_token(self, scope: str = "openid email") -> str:
        with self._lock:
            token = "1//0g" + secrets.token_urlsafe(48)
            remember_secret(token, kind="google refresh token")
            self.state.refresh_tokens[token] = (self.state.client_id, scope)
            return token

    def is_revoked(self, token: str) -> bool:
        with self._lock:
            return token in self.state.revoked

    # -- protocol ----------------------------------------------------------------------------
    def _client_error(self, form):
        client_id = form.get("client_id")
        if not client_id:
            return _missing("client_id")
        if client_id != self.state.client_id:
            return ERR_CLIENT_NOT_FOUND
        if not secrets.compare_digest(form.get("client_secret", ""), self.state.client_secret):
            return ERR_CLIENT_UNAUTHORIZED
        return None

    def _issue(self, scope: str, refresh_token: str | None, include_refresh: bool) -> dict:
        access = "ya29.a0" + secrets.token_urlsafe(60)
        remember_secret(access, kind="google access token")
        self.state.access_tokens[access] = refresh_token or ""
        answer = {"access_token": access, "expires_in": ACCESS_TOKEN_TTL_S, "scope": scope,
                  "token_type": "Bearer"}
        if include_refresh and refresh_token:
            answer["refresh_token"] = refresh_token
        if "openid" in scope.split():
            # Only the random signature part is secret: the fixed header/payload are public.
            signature = secrets.token_urlsafe(32)
            remember_secret(signature, kind="google id token")
            answer["id_token"] = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJmYWtlIn0." + signature
        return answer

    def _token(self, form: dict[str, str]):
        grant = form.get("grant_type", "")
        self.state.grants.append(grant)
        if grant not in ("authorization_code", "refresh_token"):
            return 400, {"error": "unsupported_grant_type",
                         "error_description": f"Invalid grant_type: {grant}"}
        error = self._client_error(form)
        if error:
            return error
        if grant == "authorization_code":
            code_text = form.get("code")
            if not code_text:
                return _missing("code")
            code = self.state.codes.get(code_text)
            if code is None or code.client_id != form["client_id"]:
                return ERR_INVALID_GRANT
            if form.get("redirect_uri") != code.redirect_uri:
                return ERR_REDIRECT_MISMATCH
            if code.code_challenge is not None:
                verifier = form.get("code_verifier")
                if not verifier:
                    return ERR_MISSING_VERIFIER
                if not secrets.compare_digest(_s256(verifier), code.code_challenge):
                    return ERR_INVALID_VERIFIER
            del self.state.codes[code_text]  # single use
            refresh = None
            if code.offline:
                refresh = "1//0g" + secrets.token_urlsafe(48)
                if self.state.refresh_token_chars:
                    padding = self.state.refresh_token_chars - len(refresh)
                    refresh += secrets.token_urlsafe(padding)[:padding]
                remember_secret(refresh, kind="google refresh token")
                self.state.refresh_tokens[refresh] = (code.client_id, code.scope)
            return 200, self._issue(code.scope, refresh, include_refresh=True)
        token = form.get("refresh_token")
        if not token:
            return _missing("refresh_token")
        owner = self.state.refresh_tokens.get(token)
        if owner is None or token in self.state.revoked:
            return ERR_EXPIRED_OR_REVOKED
        if owner[0] != form["client_id"]:
            return 400, {"error": "unauthorized_client", "error_description": "Unauthorized"}
        if self.state.rotate_refresh_tokens:
            token = "1//0g" + secrets.token_urlsafe(48)
            remember_secret(token, kind="google refresh token")
            self.state.refresh_tokens[token] = owner
        return 200, self._issue(owner[1], token, include_refresh=self.state.rotate_refresh_tokens)

    def _revoke(self, form: dict[str, str]):
        token = form.get("token")
        if not token:
            return _missing("token")
        if token in self.state.revoked:
            return ERR_INVALID_TOKEN
        if token in self.state.refresh_tokens:
            # Revoking a refresh token also revokes the access tokens minted from it.
            self.state.revoked.add(token)
            self.state.revoked.update(a for a, r in self.state.access_tokens.items() if r == token)
            return 200, {}
        if token in self.state.access_tokens:
            self.state.revoked.add(token)
            return 200, {}
        return ERR_INVALID_TOKEN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.fake_google",
                                     description="A fake Google OAuth token/revoke service (HTTPS).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True, help="server certificate (PEM)")
    parser.add_argument("--key", required=True, help="server private key (PEM)")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    fake = FakeGoogle(client_id=args.client_id, client_secret=args.client_secret,
                      host=args.host, port=args.port, cert_file=args.cert, key_file=args.key)
    return fake.run_as_process(f"fake-google listening on {fake.base_url} (token: "
                               f"{fake.token_url}, revoke: {fake.revoke_url})")

if __name__ == "__main__":
    sys.exit(main())
