#!/usr/bin/env bash
# Fashion-MNIST for the demo: the Debian package dataset-fashion-mnist (IDX files under
# /usr/share/datasets/fashion-mnist). Without apt (or root), the demo downloads the official files
# instead (md5-checked) into ~/.cache/subnetdp, which needs internet access.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -n "${SUBNETDP_DATA:-}" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="$(command -v sudo || true)"; fi
if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "no apt-get here: the demo will download Fashion-MNIST (needs internet)"
fi
