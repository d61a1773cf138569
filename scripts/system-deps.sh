#!/usr/bin/env bash
# Installs the Debian packages the tests and demo need when they are missing.
# Runs apt-get only as root; otherwise it says what is missing and leaves the decision to
# the test suite (which fails under CI=true and skips locally).
set -euo pipefail
need=()
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
command -v pkcs11-tool  >/dev/null 2>&1 || need+=(opensc)
command -v xdelta3      >/dev/null 2>&1 || need+=(xdelta3)
command -v xz           >/dev/null 2>&1 || need+=(xz-utils)
command -v zstd         >/dev/null 2>&1 || need+=(zstd)
command -v openssl      >/dev/null 2>&1 || need+=(openssl)
command -v nginx        >/dev/null 2>&1 || need+=(nginx-light)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  echo "system-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "system-deps: missing ${need[*]} (not root, not installing)" >&2
fi
