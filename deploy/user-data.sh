#!/usr/bin/env bash
# EC2 user-data EXAMPLE for the parent instance (Amazon Linux 2023, enclave support enabled at
# launch). Review and fill in the four settings below; deploy/README.md explains each step.
#
# It replaces the seed's plaintext step (Secrets Manager -> `jq` -> a secrets JSON file on the
# parent -> socat) with the SEALED envelope: the parent downloads only ciphertext that KMS opens
# for an enclave whose PCR0 is in the key policy, and never sees a secret in the clear.
#
# The release bucket holds what `make zipapp` + the image build produced, next to each other:
#   enclave.eif  enclave-runtime.tar.gz (this repository: scripts/, deploy/, docs/)  SHA256SUMS
set -euo pipefail

case "${1:-}" in
  -h|--help)
    echo "usage: user-data.sh   (EC2 user-data for the parent instance; edit its settings first)"
    echo "Installs nitro-cli, the allocator, the release (EIF checked against SHA256SUMS and"
    echo "EXPECTED_PCR0), the vsock-proxy allow-list and units, fetches the SEALED envelope,"
    echo "and starts the enclave."
    exit 0 ;;
esac

# -- settings (not secret) ----------------------------------------------------------------
RELEASE_URI="s3://example-enclave-releases/enclave-runtime/2024-01-01"   # no trailing slash
ENVELOPE_SOURCE="secretsmanager:enclave/sealed-secrets"   # or s3://BUCKET/sealed-envelope.json
EXPECTED_PCR0=""            # the release's PCR0 (96 hex digits); empty skips the comparison
INSTALL_DIR="/opt/enclave-runtime"

log() { echo "user-data: $*" >&2; }

# IMDSv2: the region this instance runs in (the image's KMS route names one region)
imds_token="$(curl -sS -X PUT http://169.254.169.254/latest/api/token \
  -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')"
region="$(curl -sS -H "X-aws-ec2-metadata-token: $imds_token" \
  http://169.254.169.254/latest/meta-data/placement/region)"

# 1. Nitro Enclaves CLI (nitro-cli, vsock-proxy, the allocator service), socat, jq
dnf install -y aws-nitro-enclaves-cli socat jq

# 2. the release, checked against its SHA256SUMS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for name in enclave.eif enclave-runtime.tar.gz SHA256SUMS; do
  aws s3 cp --only-show-errors "$RELEASE_URI/$name" "$work/$name"
done
(cd "$work" && sha256sum --check --strict SHA256SUMS)
mkdir -p "$INSTALL_DIR" /var/lib/enclave /etc/enclave
tar -xzf "$work/enclave-runtime.tar.gz" -C "$INSTALL_DIR"
install -m 0644 "$work/enclave.eif" /var/lib/enclave/enclave.eif
if [ -n "$EXPECTED_PCR0" ]; then
  pcr0="$(nitro-cli describe-eif --eif-path /var/lib/enclave/enclave.eif \
    | jq -r '.Measurements.PCR0')"
  if [ "$pcr0" != "$EXPECTED_PCR0" ]; then
    log "PCR0 of the EIF is $pcr0, expected $EXPECTED_PCR0"
    exit 1
  fi
fi

# 3. the allocator: memory and CPUs reserved for the enclave at every boot
install -m 0644 "$INSTALL_DIR/deploy/allocator.yaml" /etc/nitro_enclaves/allocator.yaml
systemctl enable --now nitro-enclaves-allocator.service

# 4. egress: the allow-list generated with the image's routes; it must name this region's KMS
if ! grep -q "address: kms\.${region}\.amazonaws\.com," "$INSTALL_DIR/deploy/vsock-proxy.yaml"; then
  log "the release routes KMS for another region than $region (deploy/egress-routes.json)"
  exit 1
fi
install -m 0644 "$INSTALL_DIR/deploy/vsock-proxy.yaml" /etc/nitro_enclaves/vsock-proxy.yaml

# 5. units and their settings; the envelope source goes into the settings so that every
#    delivery (enclave start, the 30-minute timer) fetches the newest envelope first
install -m 0644 "$INSTALL_DIR"/deploy/systemd/* /etc/systemd/system/
install -m 0644 "$INSTALL_DIR/deploy/enclave.env" /etc/enclave/enclave.env
sed -i "s|^ENCLAVE_ENVELOPE_SOURCE=.*|ENCLAVE_ENVELOPE_SOURCE=${ENVELOPE_SOURCE}|" \
  /etc/enclave/enclave.env

# 6. the sealed envelope, once now so that a wrong source fails here, loudly
#    (fetch-envelope.sh refuses anything but a sealed envelope; no plaintext ever lands here)
ENCLAVE_ENVELOPE_PATH=/var/lib/enclave/sealed-envelope.json \
  "$INSTALL_DIR/deploy/fetch-envelope.sh" "$ENVELOPE_SOURCE"

# 7. start: log receiver and vsock-proxies first, then the enclave, the forwarder and the
#    delivery (enclave.service wants them all); enclave-secrets.timer re-delivers every 30
#    minutes, enclave-watchdog.timer restarts an enclave that exited (every 30 s)
systemctl daemon-reload
systemctl enable --now enclave.service enclave-secrets.timer enclave-watchdog.timer
log "enclave started; its logs: journalctl -t enclave;" \
    "its deliveries: systemctl status enclave-secrets;" \
    "its restarts: journalctl -u enclave-watchdog"
