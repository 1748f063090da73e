#!/usr/bin/env bash
# Build stand-ins for flwr/superlink, flwr/supernode and flwr/superexec without a registry.
#
# A machine that cannot pull from Docker Hub (an air-gapped hospital, this project's CI box)
# can still reach a Debian mirror and a Python package index. This script makes a minimal
# Debian bookworm root file system with debootstrap (Python 3.11, the Python of
# flwr/superexec:1.42.0-py3.11-*), imports it as an image, and builds docker/offline/Dockerfile's
# three targets on it: Flower in a venv owned by user app (UID 49999, HOME=/app), as in the
# official images. docker/Dockerfile then builds the app image on the stand-in superexec with
#   --build-arg BASE_IMAGE=fl-w3s-offline/superexec:$FLWR_VERSION-py3.11
# and docker/offline.override.yml points the compose files at these tags.
#
# Needs root (debootstrap), debootstrap, and a Docker engine with BuildKit (Docker >= 23, or
# DOCKER_BUILDKIT=1 with the Docker 20.10 CLI).
#   DEBIAN_MIRROR   default http://deb.debian.org/debian
#   FLWR_VERSION    default 1.42.0
#   PIP_CERT_FILE   CA bundle pip trusts inside the build (default: the host's, if present);
#                   handed over as a BuildKit secret, so it is in no layer
#   DOCKER          the docker CLI (default: docker)
#   REBUILD_DEBIAN=1  make the Debian base again even if its image exists
set -euo pipefail

DOCKER=${DOCKER:-docker}
FLWR_VERSION=${FLWR_VERSION:-1.42.0}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_IMAGE=fl-w3s-offline/debian:bookworm
PIP_CERT_FILE=${PIP_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
HERE=$(cd "$(dirname "$0")" && pwd)
export DOCKER_BUILDKIT=1

if [[ ${REBUILD_DEBIAN:-0} == 1 ]] || ! $DOCKER image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 2; }
  rootfs=$(mktemp -d /tmp/fl-w3s-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm from $DEBIAN_MIRROR into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; echo "debootstrap failed (log: $rootfs.log)" >&2; exit 1; }
  rm -f "$rootfs.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | $DOCKER import - "$DEBIAN_IMAGE" >/dev/null
  echo "imported $DEBIAN_IMAGE"
fi

secret=()
if [[ -s $PIP_CERT_FILE ]]; then
  secret=(--secret "id=pip_cert,src=$PIP_CERT_FILE")
fi
for role in superlink supernode superexec; do
  tag=fl-w3s-offline/$role:$FLWR_VERSION
  [[ $role == superexec ]] && tag=$tag-py3.11
  $DOCKER build --network host "${secret[@]}" --target "$role" \
    --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" --build-arg "FLWR_VERSION=$FLWR_VERSION" \
    -f "$HERE/offline/Dockerfile" -t "$tag" "$HERE/offline"
  echo "built $tag"
done
