# pytest-ignition guest: shell functions shared by /init (init=systemd) and rcS (init=agent).
# The image (VMConfig.image) is a read-only ext4 disk; the guest's root is an overlay whose
# upper layer is a tmpfs, so every write lives in guest RAM: in the snapshot, gone with the VM.

# ig_arg NAME: the value of ignition.NAME=... on the kernel command line (status 1 if absent).
ig_arg() {
    for a in $(cat /proc/cmdline); do
        case "$a" in "ignition.$1="*) echo "${a#*=}"; return 0 ;; esac
    done
    return 1
}

# ig_boot_timer: the boot-timer byte (123) to the VMM's MMIO page (Firecracker's convention).
# x86_64: 0xd0000000, where nothing else lives (QEMU ignores the write). Elsewhere only at the
# address a VMM names with ignition.boot_timer=ADDR: on arm64, 0xd0000000 may be guest RAM.
ig_boot_timer() {
    addr=$(ig_arg boot_timer) || { [ "$(uname -m)" = x86_64 ] && addr=0xd0000000; } || return 0
    devmem "$addr" 8 123 2>/dev/null
}

# ig_console: the kernel's console tty: ttyS0, or ttyAMA0 (the PL011 of QEMU's arm64 virt).
ig_console() {
    c=$(cat /sys/class/tty/console/active 2>/dev/null)
    c=${c##* }
    echo "${c:-ttyS0}"
}

# ig_disk SERIAL FALLBACK: the /dev node of the virtio disk with that serial, else FALLBACK.
ig_disk() {
    for s in /sys/block/vd*/serial; do
        [ -r "$s" ] || continue
        if [ "$(cat "$s")" = "$1" ]; then
            d=${s%/serial}
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    echo "$2"
}

# ig_mount_image: the image as an overlay at /newroot (read-only lower, tmpfs upper).
ig_mount_image() {
    dev=$(ig_disk ignition-image /dev/vda)
    mkdir -p /image/lower /image/rw /newroot
    # noload: a read-only device must not get its journal replayed
    mount -t ext4 -o ro,noload "$dev" /image/lower || return 1
    mount -t tmpfs -o mode=755 tmpfs /image/rw || return 1
    mkdir -p /image/rw/upper /image/rw/work
    mount -t overlay overlay \
        -o lowerdir=/image/lower,upperdir=/image/rw/upper,workdir=/image/rw/work /newroot || return 1
    mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/run /newroot/tmp
    chmod 1777 /newroot/tmp
    mount -t tmpfs -o mode=755 tmpfs /newroot/run || return 1
    mkdir -p /newroot/run/ignition
    cp /sbin/ignition-agent /newroot/run/ignition/ignition-agent 2>/dev/null
    mkdir -p /newroot/etc
    grep -q 'host.ignition.internal' /newroot/etc/hosts 2>/dev/null ||
        grep 'host.ignition.internal' /etc/hosts >>/newroot/etc/hosts 2>/dev/null
    grep -q ignition /newroot/etc/hosts 2>/dev/null || echo "127.0.1.1 ignition" >>/newroot/etc/hosts
    echo ignition >/newroot/etc/hostname
    return 0
}

# ig_unmount_image: undo ig_mount_image (init=systemd falling back to busybox init).
ig_unmount_image() {
    for m in /newroot/run /newroot /image/rw /image/lower; do umount "$m" 2>/dev/null; done
    rm -f /run/ignition-root
}

# ig_network: the network step of rcS (init=agent) and /init (init=systemd), see rcS's block.
ig_network() {
    if net=$(ig_arg net); then
        ip link set eth0 up 2>/dev/null || echo "ignition: ignition.net=$net but no eth0"
        if [ "$net" = user ]; then
            udhcpc -i eth0 -f -q -n -t 20 -T 1 -s /etc/ignition/udhcpc.script >/dev/null 2>&1 ||
                echo "ignition: no DHCP lease on eth0"
        fi
    fi
}
