"""An in-process runtime with its fakes, for end-to-end tests.

LocalStack starts a test CA, the fake mTLS watermark service, the fake Google and the runtime
(enclave.service.start) on 127.0.0.1:0 ports with a temporary state directory, and offers a
secrets sender and a signed RPC client that speak the real protocols.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import time

from enclave.addresses import parse_address
from enclave.host.send_secrets import exchange
from enclave.config import load_settings
from enclave.rpcauth import LOCAL_DEFAULT_RPC_SECRET
from enclave.rpcauth import new_nonce, sign_request
from enclave.service import start
from tests.fakes.fake_google import FakeGoogle
from tests.fakes.fake_watermark import FakeWatermark
from tests.fakes.pki import TestCA
from tests.support import remember_key_files, remember_private_key, remember_secret

GOOGLE_CLIENT_ID = "stack-client-id.apps.googleusercontent.com"
GOOGLE_CLIENT_SECRET = "stack-google-client-secret-value"
remember_secret(GOOGLE_CLIENT_SECRET, kind="google client secret")


def send_secrets(port: int, payload: bytes) -> dict:
    """Deliver one payload like `socat`: write, half-close, read the one-line ack."""
    return json.loads(exchange(parse_address(f"tcp:127.0.0.1:{port}"), payload))


class LocalStack:
    def __init__(self, *, watermark: bool = True, google: bool = True, env: dict | None = None,
                 ca: TestCA | None = None):
        """`ca`: the test CA to issue from (default: a new one), e.g. one a fake KMS started
        before the stack also uses, so ENCLAVE_OUTBOUND_CA_FILE trusts both."""
        self.dir = tempfile.mkdtemp(prefix="enclave-stack-")
        self.ca = ca or TestCA("Enclave Stack Test CA")
        self.ca_file = self.ca.write(self.dir, "ca")
        server = self.ca.issue("127.0.0.1", server=True)
        self.server_cert, self.server_key = server.write(self.dir, "server")
        self.client = self.ca.issue("enclave-client-1")
        self.fake_wm = self.fake_google = None
        if watermark:
            self.fake_wm = FakeWatermark(self.server_cert, self.server_key, self.ca.cert_pem,
                                         self.ca.key)
            self.fake_wm.serve_in_thread()
        if google:
            self.fake_google = FakeGoogle(self.ca, client_id=GOOGLE_CLIENT_ID,
                                          client_secret=GOOGLE_CLIENT_SECRET)
            self.fake_google.start()
        environ = {
            "ALFRED_ENV": "local",
            "ENCLAVE_HTTP_LISTEN": "tcp:127.0.0.1:0",
            "ENCLAVE_SECRETS_LISTEN": "tcp:127.0.0.1:0",
            "ENCLAVE_SECRETS_INITIAL_TIMEOUT_SECONDS": "0",
            "ENCLAVE_STATE_DIR": os.path.join(self.dir, "state"),
            "ENCLAVE_CERTS_DIR": os.path.join(self.dir, "certs"),
            "ENCLAVE_OUTBOUND_CA_FILE": self.ca_file,
        }
        if self.fake_google:
            environ["GOOGLE_OAUTH_TOKEN_URL"] = self.fake_google.token_url
            environ["GOOGLE_OAUTH_REVOKE_URL"] = self.fake_google.revoke_url
        environ.update(env or {})
        self.settings = load_settings(environ)
        self.secret = self.settings.rpc_shared_secret or LOCAL_DEFAULT_RPC_SECRET
        if self.secret != LOCAL_DEFAULT_RPC_SECRET:  # the local default is public
            remember_secret(self.secret, kind="rpc shared secret")
        remember_secret(self.settings.google_client_secret, kind="google client secret")
        if self.settings.signing_private_key_pem:
            remember_private_key(self.settings.signing_private_key_pem, kind="signing key PEM")
        # Client/server/CA private keys are registered by TestCA as it issues them.
        self.running = start(self.settings)
        # Generated per boot when not configured (local/test): must never be logged either.
        keyring = self.running.runtime.store.sealing_keyring()
        remember_secret(keyring.current, kind="token sealing key")
        self.port = self.running.http.port
        self.secrets_port = self.running.listener.address.port

    # -- helpers ----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.fake_wm.server_address[1]}"

    def mtls_payload(self, issued=None, ca_pem: bytes | None = None, endpoint: str | None = None,
                     **extra) -> dict:
        issued = issued or self.client
        payload = {
            "MTLS_CLIENT_CERT_JSON": {
                "client_cert": issued.cert_pem.decode(),
                "client_key": issued.key_pem.decode(),
                "ca_cert": (ca_pem or self.ca.cert_pem).decode(),
            },
            "ECS_WATERMARK_ENDPOINT": endpoint or self.endpoint,
        }
        payload.update(extra)
        return payload

    def deliver(self, payload: dict | bytes) -> dict:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return send_secrets(self.secrets_port, data)

    def call(self, method: str, target: str, body: bytes | None = None, *, sign: bool = True,
             headers: dict | None = None, conn: http.client.HTTPConnection | None = None,
             timeout: float = 30.0):
        all_headers = {}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        if sign:
            all_headers.update(sign_request(self.secret, method, target, body or b"",
                                            int(time.time()), new_nonce()))
        all_headers.update(headers or {})
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, target, body=body, headers=all_headers)
            resp = conn.getresponse()
            data = resp.read()
            try:
                return resp.status, json.loads(data)
            except ValueError:
                return resp.status, data
        finally:
            if own:
                conn.close()

    def close(self) -> None:
        self.running.stop()
        remember_key_files(self.dir, kind="stack state")  # the dev-shim root key, client.key
        if self.fake_wm:
            self.fake_wm.stop()
        if self.fake_google:
            self.fake_google.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
