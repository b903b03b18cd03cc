#!/usr/bin/env bash
# Builds the test guest's initramfs: busybox plus the guest kernel's virtio-net modules, from
# Debian's linux-image-amd64 and busybox-static as fetch-guest.sh unpacks them into CACHE_DIR
# (default: target/guest-cache; nothing is installed on the host). Prints the kernel and
# initramfs paths. The guest's /init runs the script passed on the kernel command line as
# tapir.script=... (base64), or just reports its network interfaces and powers off.
#
#   tests/guest/build-initramfs.sh OUT_DIR [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-initramfs.sh OUT_DIR [CACHE_DIR]}
cache=${2:-$here/../../target/guest-cache}
fetched=$("$here/fetch-guest.sh" "$cache")
kernel=$(sed -n 1p <<<"$fetched")
moddir=$(sed -n 2p <<<"$fetched")
busybox=$(sed -n 3p <<<"$fetched")

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc,lib/modules}
cp "$busybox" "$root/bin/busybox"
for tool in sh mount umount ip ping cat echo ls sleep poweroff insmod base64 sha256sum nc dd \
    ifconfig route grep awk seq wc date uname head tail true false timeout; do
    ln -sf busybox "$root/bin/$tool"
done
# The virtio-net stack, in dependency order.
mods="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net"
for m in $mods; do
    f=$(find "$moddir" -name "$m.ko*" | head -n 1)
    [ -n "$f" ] || { echo "module $m not found in $moddir" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
cat >"$root/init" <<INIT
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $mods; do insmod /lib/modules/\$m.ko 2>/dev/null; done
echo TAPIR-GUEST-UP \$(uname -r)
script=\$(sed -n 's/.*tapir.script=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "\$script" ]; then
    echo "\$script" | base64 -d >/tmp/script.sh
    sh /tmp/script.sh
else
    ip -o link
fi
echo TAPIR-GUEST-DONE
poweroff -f
INIT
chmod +x "$root/init"
mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initramfs.gz"
echo "$kernel"
echo "$out/initramfs.gz"
