"""Host-side commands: check-config, verify, probe, sign, send-secrets, seal-secrets.

They run on the parent instance, a laptop or a host service, never inside the enclave. Nothing
outside this package and enclave.cli imports it (tests/test_layering.py checks it).
"""
