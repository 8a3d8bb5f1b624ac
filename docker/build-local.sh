#!/usr/bin/env bash
# Build the fedfsd image where no container registry is reachable (an air-gapped data centre,
# or CI here): make a Debian base image from Debian's own packages (debootstrap + docker import),
# or reuse one already made by the same recipe, then build docker/Dockerfile on it.
#
#   docker/build-local.sh              # base (made once, then reused) + image, prints its size
#
# The build stage reaches the package index through the host network with the host's CA bundle
# and takes torch from local wheels; both travel in docker/build-extra/ (git-ignored) and stay
# in the build stage: the final image holds only /opt/venv, the service user and fedfsd.
#
# Environment (all optional):
#   FEDFSD_IMAGE          image to build                 (fedfsd:0.1.0)
#   FEDFSD_BASE_IMAGE     base image to make or reuse    (fedfsd-base:bookworm-py311)
#   FEDFSD_REBUILD_BASE=1 make the base again even if one with this recipe exists
#   DEBIAN_MIRROR         Debian mirror for debootstrap  (http://deb.debian.org/debian)
#   PIP_CA                CA bundle pip trusts           (PIP_CERT, else pip's `cert` setting,
#                                                         else the system bundle)
#   WHEEL_DIR             directory with the torch wheel (PIP_FIND_LINKS, else pip's
#                                                         `find-links` setting; one directory)
#   TORCH_SPEC            torch requirement              (torch==2.13.0)
#   PIP_INDEX             package index for the build    (pip's `index-url`, else PyPI)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
image="${FEDFSD_IMAGE:-fedfsd:0.1.0}"
base="${FEDFSD_BASE_IMAGE:-fedfsd-base:bookworm-py311}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
packages=python3,python3-venv,python3-pip,ca-certificates
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

say() { printf '[build-local] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "no docker client on PATH"
docker info >/dev/null 2>&1 || die "no container engine answers \`docker info\` (start dockerd)"

# pip's own settings on this host tell where the CA bundle and the local wheels are.
pip_setting() {
  local key="$1" py
  py="$(command -v python3 || true)"
  [ -n "$py" ] || return 0
  "$py" -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*\.$key='\(.*\)'$/\1/p" | head -n1
}

# ---- 1. base image -------------------------------------------------------------------------
# The recipe (suite, packages, mirror) is stored as a label: a base made by another recipe is
# not reused, so changing the package list here always rebuilds it.
recipe="$(printf '%s|%s|%s|minbase' "$suite" "$packages" "$mirror" | sha256sum | cut -c1-16)"
have="$(docker image inspect -f '{{ index .Config.Labels "fedfsd.base.recipe" }}' "$base" 2>/dev/null || true)"
if [ "$have" = "$recipe" ] && [ "${FEDFSD_REBUILD_BASE:-0}" != 1 ]; then
  say "reusing base image $base (recipe $recipe)"
else
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root to make the base image"
  rootfs="$(mktemp -d /var/tmp/fedfsd-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  t0=$(date +%s)
  say "debootstrap $suite ($packages) from $mirror"
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
  rm -f "$rootfs.log"
  # What a base image does not need: package caches, lists and docs.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL fedfsd.base.recipe=$recipe" \
    --change 'CMD ["python3"]' \
    - "$base" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  say "made base image $base in $(( $(date +%s) - t0 )) s"
fi

# ---- 2. what the build stage needs from this host --------------------------------------------
extra="$here/build-extra"
find "$extra" -mindepth 1 ! -name README.md -delete 2>/dev/null || true
mkdir -p "$extra/wheels"
ca="${PIP_CA:-${PIP_CERT:-$(pip_setting cert)}}"
ca="${ca:-/etc/ssl/certs/ca-certificates.crt}"
[ -f "$ca" ] || die "CA bundle $ca not found (set PIP_CA)"
cp "$ca" "$extra/ca.pem"
wheels="${WHEEL_DIR:-${PIP_FIND_LINKS:-$(pip_setting find-links)}}"
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
  for whl in "$wheels"/torch-*.whl; do
    [ -e "$whl" ] || continue
    ln "$whl" "$extra/wheels/" 2>/dev/null || cp "$whl" "$extra/wheels/"
  done
fi
ls "$extra/wheels"/torch-*.whl >/dev/null 2>&1 \
  || say "note: no local torch wheel (WHEEL_DIR); $torch_spec comes from the index"
index="${PIP_INDEX:-$(pip_setting index-url)}"
index="${index:-https://pypi.org/simple}"
case "$index" in file:*) index=https://pypi.org/simple ;; esac  # a host path is not in the build
cat >"$extra/pip.conf" <<EOF
[global]
cert = /tmp/build-extra/ca.pem
find-links = /tmp/build-extra/wheels
EOF
say "build stage gets CA bundle $ca, index $index, wheels: $(ls "$extra/wheels" | tr '\n' ' ')"

# ---- 3. the image ------------------------------------------------------------------------------
t0=$(date +%s)
DOCKER_BUILDKIT=0 docker build --network host -f "$here/Dockerfile" -t "$image" \
  --build-arg PYTHON_IMAGE="$base" \
  --build-arg TORCH_SPEC="$torch_spec" \
  --build-arg TORCH_INDEX="$index" \
  "$repo" >&2
took=$(( $(date +%s) - t0 ))
find "$extra" -mindepth 1 ! -name README.md -delete
# The image this build replaced (same tag) is left untagged: drop it, ~2 GB each time the
# sources change. Only untagged images with the fedfsd title label go; the build cache stays.
docker image prune -f --filter "label=org.opencontainers.image.title=fedfsd" >/dev/null
size=$(docker image inspect -f '{{ .Size }}' "$image")
say "built $image on $base in $took s"
printf '%s %s MB\n' "$image" "$(( size / 1000000 ))"
