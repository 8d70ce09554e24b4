"""The one function that builds the mTLS client context for the ECS watermark service (DESIGN §5).

A context is built once per set of certificates and never modified afterwards: a rotation builds
a new one and swaps the reference (enclave.secretstore). Connections made with an old context
finish normally.
"""

from __future__ import annotations

import os
import ssl

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2  # TLS 1.0/1.1 are deprecated (RFC 8996)


def create_mtls_context(ca_file: str | os.PathLike, cert_file: str | os.PathLike,
                        key_file: str | os.PathLike) -> ssl.SSLContext:
    """A client context that trusts only `ca_file` and presents the chain in `cert_file`.

    Raises ssl.SSLError (or OSError) when OpenSSL refuses the files, e.g. a key too small for
    the default security level; callers refuse the delivery and keep the old context.
    """
    # Client side: the protocol version is negotiated, the highest both sides support.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Never below TLS 1.2.
    context.minimum_version = MINIMUM_TLS_VERSION
    # The server must present a certificate that chains to the trusted CA...
    context.verify_mode = ssl.CERT_REQUIRED
    # ...and that names the host we connect to (server_hostname at wrap time).
    context.check_hostname = True
    # No TLS compression (CRIME); no session tickets: nothing to resume across a rotation.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    # Trust ONLY the delivered CA. load_default_certs()/set_default_verify_paths() are never
    # called, so the system store plays no part; a PROTOCOL_TLS_CLIENT context starts empty.
    context.load_verify_locations(cafile=os.fspath(ca_file))
    # The delivered CA may be an intermediate: accept a chain that ends at it.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # Our identity: the client certificate chain and its key, from the files just written.
    context.load_cert_chain(certfile=os.fspath(cert_file), keyfile=os.fspath(key_file))
    # TLS 1.3 servers may ask for the client certificate after the handshake.
    context.post_handshake_auth = True
    return context
