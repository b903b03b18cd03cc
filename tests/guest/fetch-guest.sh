#!/usr/bin/env bash
# Fetches the test guest's kernel (Debian's linux-image-amd64) and busybox-static as packages
# and unpacks them into CACHE_DIR (apt-get download + dpkg -x): nothing is installed, the
# host's /boot and /lib/modules are not touched. Idempotent: with the cache complete it only
# prints the paths. Prints the kernel image, the modules directory and the busybox binary.
#
#   tests/guest/fetch-guest.sh CACHE_DIR
set -euo pipefail
cache=${1:?usage: fetch-guest.sh CACHE_DIR}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
stamp="$cache/complete"

print_paths() {
    local kver
    kver=$(cat "$stamp")
    echo "$cache/root/boot/vmlinuz-$kver"
    echo "$cache/root/lib/modules/$kver"
    echo "$cache/root/bin/busybox"
}

if [ -s "$stamp" ] && [ -r "$(print_paths | head -n 1)" ]; then
    print_paths
    exit 0
fi

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || { echo "fetch-guest.sh needs apt-get and dpkg-deb (a Debian or Ubuntu host)" >&2; exit 1; }

# The metapackage names the current kernel package.
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
pkg=$(kernel_pkg)
if [ -z "$pkg" ]; then
    # No package lists yet (a fresh container): fetch them, which installs nothing.
    apt-get update -qq >&2
    pkg=$(kernel_pkg)
fi
[ -n "$pkg" ] || { echo "apt knows no linux-image-amd64 (is this Debian on amd64?)" >&2; exit 1; }

work=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
(
    cd "$work"
    # apt-get download warns when it cannot drop to _apt for a root-owned directory.
    apt-get download -q "$pkg" busybox-static 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true
)
debs=("$work"/*.deb)
[ ${#debs[@]} -eq 2 ] || { echo "apt-get download $pkg busybox-static failed" >&2; exit 1; }
rm -rf "$cache/root"
mkdir -p "$cache/root"
for deb in "${debs[@]}"; do
    dpkg -x "$deb" "$cache/root"
done
kver=${pkg#linux-image-}
[ -r "$cache/root/boot/vmlinuz-$kver" ] || { echo "no vmlinuz-$kver in $pkg" >&2; exit 1; }
[ -x "$cache/root/bin/busybox" ] || { echo "no busybox in busybox-static" >&2; exit 1; }
echo "$kver" >"$stamp"
print_paths
