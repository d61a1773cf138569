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
command -v jq           >/dev/null 2>&1 || need+=(jq)
command -v nginx        >/dev/null 2>&1 || need+=(nginx-light)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v /usr/bin/time    >/dev/null 2>&1 || need+=(time)
# The Linux agent's VM scenarios (make test-vm): QEMU, UEFI firmware, GRUB, a kernel, the
# tools that build disk images from files (no loop mounts).
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ]        || need+=(ovmf)
[ -d /usr/lib/grub/x86_64-efi ]               || need+=(grub-efi-amd64-bin)
command -v grub-mkstandalone >/dev/null 2>&1  || need+=(grub-common)
command -v grub-editenv >/dev/null 2>&1       || need+=(grub-common)
command -v mcopy >/dev/null 2>&1              || need+=(mtools)
command -v mkfs.vfat >/dev/null 2>&1          || need+=(dosfstools)
command -v sgdisk >/dev/null 2>&1             || need+=(gdisk)
command -v mkfs.ext4 >/dev/null 2>&1          || need+=(e2fsprogs)
command -v debugfs >/dev/null 2>&1            || need+=(e2fsprogs)
ls /boot/vmlinuz-* >/dev/null 2>&1            || need+=(linux-image-amd64)
[ -x /bin/busybox ]                           || need+=(busybox-static)
command -v cpio >/dev/null 2>&1               || need+=(cpio)
# tpm2-pytss (pip) builds against the TSS2 libraries; the TPM VM scenario needs a software TPM.
pkg-config --exists tss2-esys 2>/dev/null      || need+=(libtss2-dev)
command -v pkg-config >/dev/null 2>&1         || need+=(pkg-config)
command -v gcc >/dev/null 2>&1                || need+=(gcc)
[ -e /usr/include/python3.11/Python.h ]       || need+=(python3-dev)
command -v swtpm >/dev/null 2>&1              || need+=(swtpm)
command -v swtpm_setup >/dev/null 2>&1        || need+=(swtpm-tools)
# U-Boot boot control (make test-vm) and its environment tools.
[ -e /usr/lib/u-boot/qemu-x86/u-boot.rom ]    || need+=(u-boot-qemu)
command -v fw_setenv >/dev/null 2>&1          || need+=(libubootenv-tool)
command -v mkimage >/dev/null 2>&1            || need+=(u-boot-tools)
# The cluster test: haproxy in TLS pass-through in front of several server nodes.
command -v haproxy >/dev/null 2>&1            || need+=(haproxy)
# The dashboard's browser tests: Debian's chromium driven through chromium-driver.
command -v chromium >/dev/null 2>&1           || need+=(chromium)
command -v chromedriver >/dev/null 2>&1       || need+=(chromium-driver)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  echo "system-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf "%s\n" "${need[@]}" | sort -u) >/dev/null
else
  echo "system-deps: missing ${need[*]} (not root, not installing)" >&2
fi
