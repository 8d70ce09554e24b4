"""Enclave runtime for AWS Nitro Enclaves: secrets over VSOCK, an HTTP API, attestation."""

__version__ = "0.1.0"
__all__ = ["__version__"]
