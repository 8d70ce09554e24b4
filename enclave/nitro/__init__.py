"""AWS Nitro Enclaves attestation, as a library: COSE_Sign1, document claims, the verifier.

    from enclave.nitro import Verifier, AT_DOCUMENT_TIME
    doc = Verifier.production().verify(document_bytes, at_ms=now_ms, expected_pcrs={0: pcr0})

Pure: bytes and a time in, a VerifiedDocument or one VerificationError (with the failed step)
out. It imports nothing of the enclave runtime except the root error type.
"""

from .claims import (INTENT_CHALLENGE, INTENT_WATERMARK, ClaimsError, canonical_json,
                     verify_claims)
from .cose import CoseError
from .encoding import decode_b64, read_document_bytes
from .verifier import (AT_DOCUMENT_TIME, STEP_NAMES, TrustAnchorError, VerificationError,
                       VerifiedDocument, Verifier, nitro_root_der, pem_to_der_certs,
                       verify_document, verify_response)

__all__ = [
    "AT_DOCUMENT_TIME",
    "ClaimsError",
    "CoseError",
    "INTENT_CHALLENGE",
    "INTENT_WATERMARK",
    "STEP_NAMES",
    "TrustAnchorError",
    "VerificationError",
    "VerifiedDocument",
    "Verifier",
    "canonical_json",
    "decode_b64",
    "nitro_root_der",
    "pem_to_der_certs",
    "read_document_bytes",
    "verify_claims",
    "verify_document",
    "verify_response",
]
