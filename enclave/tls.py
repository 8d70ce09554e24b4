"""Every TLS context the project builds, one function per role (urllib3's create_urllib3_context
is the model), each option with the reason it is there.

- mtls_client_context: the watermark service (docs/DESIGN.md §5): trust ONLY the delivered CA, present
  the delivered client chain. Built once per set of certificates and never modified afterwards:
  a rotation builds a new one and swaps the reference (enclave.secretstore).
- outbound_context: Google OAuth: the system trust store (plus a fake's CA in local/test).
- pinned_roots_context: a client that trusts exactly the roots given (KMS: the Amazon roots
  bundled with the project, or a fake's CA in local/test).
- https_client_context: host tools (probe) calling an HTTPS base URL: the system trust store.
"""

from __future__ import annotations

import os
import ssl

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2  # TLS 1.0/1.1 are deprecated (RFC 8996)
HTTP11_ALPN = ["http/1.1"]  # keep-alive reuse is what makes the outbound pool worth it


def _client_context() -> ssl.SSLContext:
    """The settings every client context shares; trust is added by the role's function."""
    # Client side: the protocol version is negotiated, the highest both sides support.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Never below TLS 1.2.
    context.minimum_version = MINIMUM_TLS_VERSION
    # The server must present a certificate that chains to a trusted root...
    context.verify_mode = ssl.CERT_REQUIRED
    # ...and that names the host we connect to (server_hostname at wrap time).
    context.check_hostname = True
    # No TLS compression (CRIME).
    context.options |= ssl.OP_NO_COMPRESSION
    # A PROTOCOL_TLS_CLIENT context starts with an EMPTY trust store: nothing is trusted until
    # the role's function says what.
    return context


def mtls_client_context(ca_file: str | os.PathLike, cert_file: str | os.PathLike,
                        key_file: str | os.PathLike) -> ssl.SSLContext:
    """A client context that trusts only `ca_file` and presents the chain in `cert_file`.

    Raises ssl.SSLError (or OSError) when OpenSSL refuses the files, e.g. a key too small for
    the default security level; callers refuse the delivery and keep the old context.
    """
    context = _client_context()
    # No session tickets: nothing to resume across a rotation.
    context.options |= ssl.OP_NO_TICKET
    # Trust ONLY the delivered CA; the system store plays no part.
    context.load_verify_locations(cafile=os.fspath(ca_file))
    # The delivered CA may be an intermediate: accept a chain that ends at it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # Our identity: the client certificate chain and its key, from the files just written.
    context.load_cert_chain(certfile=os.fspath(cert_file), keyfile=os.fspath(key_file))
    # TLS 1.3 servers may ask for the client certificate after the handshake.
    context.post_handshake_auth = True
    return context


def outbound_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Outbound HTTPS to public services (Google): the system store, HTTP/1.1."""
    context = _client_context()
    # The system trust store (loading it costs ~40 ms: callers build this on first use).
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    # A fake's CA (local/test only; config refuses it in staging/production). Added, not replacing.
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(HTTP11_ALPN)
    return context


def pinned_roots_context(*, cadata: str | None = None, ca_file: str | None = None) -> ssl.SSLContext:
    """A client that trusts exactly the roots in `cadata` (PEM) or `ca_file`, nothing else."""
    if (cadata is None) == (ca_file is None):
        raise ValueError("give exactly one of cadata and ca_file")
    context = _client_context()
    # Only these roots: the system store is never loaded.
    if cadata is not None:
        context.load_verify_locations(cadata=cadata)
    else:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(HTTP11_ALPN)
    return context


def https_client_context() -> ssl.SSLContext:
    """Host tools calling an https:// base URL: the system trust store."""
    context = _client_context()
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context
