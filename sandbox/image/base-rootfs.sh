#!/usr/bin/env bash
# Base recipe of the sandbox image: a minimal Debian bookworm root filesystem
# with python3 (3.11, same bytecode magic as the host's cp311 tooling) and
# libgomp1 (OpenMP runtime for lightgbm/xgboost).
#
#   sandbox/image/base-rootfs.sh <empty-dir>
#
# Run as root by scripts/build-image.sh, which hashes this file: any change here
# produces a new airlock-base:<hash> tag. No registry is involved: the result is
# turned into an image with `tar | docker import`.
set -euo pipefail

ROOTFS="${1:?usage: base-rootfs.sh <dir>}"
SUITE=bookworm
MIRROR="${AIRLOCK_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
INCLUDE=python3,libgomp1
# The Debian archive's signing keys (package debian-archive-keyring, which
# scripts/ensure-docker.sh installs). Every package is checked against the
# Release file's hashes, and the Release file against these keys: nothing else
# vouches for bytes fetched over plain http from a mirror anyone may name.
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

[ -s "$KEYRING" ] || {
    echo "base-rootfs: ERROR: the Debian archive keyring $KEYRING is missing:" \
         "run scripts/ensure-docker.sh (or apt-get install debian-archive-keyring)" >&2
    exit 1
}

# --force-check-gpg: with an explicit mirror, debootstrap would otherwise only
# warn when it cannot check the Release signature, and go on unverified.
debootstrap --variant=minbase --include="$INCLUDE" \
    --force-check-gpg --keyring="$KEYRING" \
    "$SUITE" "$ROOTFS" "$MIRROR" >&2

# Slim down: package caches, indexes, docs, manuals, translations.
rm -rf "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old \
       "$ROOTFS"/var/log/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/usr/share/lintian \
       "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*

# Defence in depth (the container also runs with no-new-privileges and
# cap_drop=ALL): no setuid/setgid binaries in the image.
find "$ROOTFS" -xdev -type f -perm /6000 -exec chmod ug-s {} +

# Device nodes come from the runtime, not from the image.
rm -rf "${ROOTFS:?}"/dev/*
