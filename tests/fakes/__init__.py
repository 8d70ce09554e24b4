"""Fakes that speak the real protocols (HTTPS Google, mTLS watermark service, NSM device)."""
