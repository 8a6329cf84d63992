#!/usr/bin/env bash
# Build a Debian bookworm base image for `bentoml containerize` from Debian's own packages, for hosts
# that cannot pull from a public container registry. Reused when it already exists (podman's store is
# the cache); --rebuild makes it again.
#
#   scripts/container_base.sh [--image NAME] [--mirror URL] [--rebuild]
#
# The image satisfies BentoML's Dockerfile for a custom base image: python3.11 with pip (BentoML installs
# uv with it), bash, groupadd/useradd, apt, and the packages BentoML's Debian recipe installs anyway
# (ca-certificates gnupg2 build-essential git), so that step finds them present.
set -Eeuo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="${KUZUSHIJI_BASE_IMAGE:-localhost/kuzushiji/debian-python:bookworm}"
SUITE="bookworm"                  # Debian 12: its python3 is 3.11, the project's version
MIRROR="${DEBIAN_MIRROR:-}"
REBUILD=0
PACKAGES="python3,python3-pip,python3-venv,ca-certificates,curl,gnupg2,build-essential,git"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "container_base: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) IMAGE="${2:?--image needs a name}"; shift 2 ;;
    --mirror) MIRROR="${2:?--mirror needs a URL}"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

# The Debian mirror apt already uses on this host (deb822 .sources or one-line sources.list).
host_mirror() {
  local file url
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$file" ]] || continue
    url="$(awk '/^URIs:/ {print $2; exit}' "$file")"
    if [[ -n "$url" && "$url" != *security* ]]; then echo "$url"; return 0; fi
  done
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f "$file" ]] || continue
    url="$(awk '$1 == "deb" && $0 ~ /debian/ && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' "$file")"
    if [[ -n "$url" ]]; then echo "$url"; return 0; fi
  done
  return 1
}

command -v podman >/dev/null || die "podman is not installed (Debian/Ubuntu: apt-get install -y podman runc debootstrap)"
if [[ "$REBUILD" == 0 ]] && podman image exists "$IMAGE"; then
  echo "container_base: reusing $IMAGE"
  exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
[[ "$(id -u)" == 0 ]] || die "debootstrap needs root to build the base image; run as root or pull a base image instead"
if [[ -z "$MIRROR" ]]; then
  MIRROR="$(host_mirror)" || die "no Debian mirror found in /etc/apt/sources.list*; pass --mirror URL"
fi

ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/kuzushiji-rootfs.XXXXXX")"
trap 'rm -rf --one-file-system "$ROOTFS"' EXIT

echo "container_base: debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"

# BentoML installs uv with the base image's pip, as on the official python images; Debian marks its
# interpreter externally managed (PEP 668), which would refuse that install.
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
# A smaller image: package lists and the .deb cache are refetched by any later apt-get update.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/log/*.log

# uv (used by BentoML inside the build) reads SSL_CERT_FILE; point it at Debian's standard bundle, so a
# CA bundle mounted over /etc/ssl/certs at build time (TLS-intercepting proxies) is honoured.
tar -C "$ROOTFS" --numeric-owner -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $SUITE $MIRROR + $PACKAGES" \
  - "$IMAGE" >/dev/null
echo "container_base: built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
