#!/usr/bin/env bash
# Installs Prometheus and promtool (Debian package `prometheus`) unless both are on PATH already.
# The deployment tests call it when they are missing; it needs root (CI runs as root).
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_prometheus.sh: needs root to apt-get install prometheus" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The package's service is not started: the tests run their own Prometheus.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version | head -n 1
