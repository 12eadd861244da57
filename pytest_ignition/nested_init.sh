#!/bin/sh
# PID 1 of the nested hypervisor host booted by pytest_ignition/nested.py.
#
# Stage 1 runs on the read-only virtio-9p root (the outer machine's `/`): it stacks an overlayfs
# with a tmpfs upper layer on that root, so that everything is writable in RAM and nothing reaches
# the outer machine, makes it the root (pivot_root) and re-executes itself there as stage 2.
# Stage 2 mounts the kernel filesystems, the control share (`ignctl`: run.sh, nonce, cwd; rc is
# written back) and the writable share of the caller's directory (`igncwd`), prints the start
# marker on the console, sources run.sh in a subshell with its output on the console, prints the
# exit marker and reboots (QEMU runs with -no-reboot, so that ends it). If anything here fails,
# PID 1 exits and the kernel panics (panic=-1 reboots at once), which the outer side reports
# with the console tail.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
SELF="$1"
STAGE="${2:-1}"
P9="trans=virtio,version=9p2000.L,msize=262144"
# Every exec of a dynamically linked tool costs ~0.2 s under TCG (ld.so and libc over 9p);
# busybox is static, so its applets are used where it exists.
BB=/bin/busybox
[ -x "$BB" ] || BB=

say() { echo "ignition-nested-init: $*" >/dev/console; }

if [ "$STAGE" = 1 ]; then
    $BB mount -t tmpfs -o mode=0755 tmpfs /run || exit 1
    $BB mkdir -p /run/ovl/upper /run/ovl/work /run/ovl/root
    if $BB mount -t overlay -o lowerdir=/,upperdir=/run/ovl/upper,workdir=/run/ovl/work \
        overlay /run/ovl/root 2>/dev/console; then
        # pivot_root rather than only chroot: a chrooted process may not create a user
        # namespace (EPERM), and passt's sandbox makes one. The old root (the 9p share, the
        # overlay's lower layer) stays mounted on /run, which stage 2 covers with a fresh tmpfs.
        if cd /run/ovl/root && $BB pivot_root . run; then
            exec $BB chroot . ${BB:-/bin/sh} ${BB:+sh} "$SELF" "$SELF" 2
        fi
        say "pivot_root into the overlay failed; chroot only (no user namespaces: passt fails)"
        exec $BB chroot /run/ovl/root ${BB:-/bin/sh} ${BB:+sh} "$SELF" "$SELF" 2
    fi
    say "overlayfs over the 9p root failed; the root stays read-only (tmpfs on /tmp, /var/tmp)"
    $BB umount /run
    $BB mount -t tmpfs -o mode=1777 tmpfs /var/tmp
    STAGE=2
fi

# ---- stage 2
$BB mount -t proc proc /proc
$BB mount -t sysfs sysfs /sys
$BB mount -t devtmpfs devtmpfs /dev 2>/dev/null
$BB mkdir -p /dev/pts /dev/shm
$BB mount -t devpts -o mode=0620,ptmxmode=0666 devpts /dev/pts
$BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# Fresh /run and /tmp: the outer machine's show through the root share otherwise.
$BB mount -t tmpfs -o mode=0755 tmpfs /run
$BB mount -t tmpfs -o mode=1777 tmpfs /tmp
CTL=/run/ignition-nested
$BB mkdir -p "$CTL"
$BB mount -t 9p -o "$P9" ignctl "$CTL" || { say "cannot mount the control share"; exit 1; }
read -r NONCE <"$CTL/nonce"
CWD=
[ -s "$CTL/cwd" ] && read -r CWD <"$CTL/cwd"
if [ -n "$CWD" ]; then
    [ -d "$CWD" ] || $BB mkdir -p "$CWD"
    $BB mount -t 9p -o "$P9,cache=loose" igncwd "$CWD" || { say "cannot mount $CWD"; exit 1; }
fi
$BB ip link set lo up 2>/dev/null
# passt (network=user) refuses to start without an interface that has a default route, and the
# host has only lo: a dummy interface (CONFIG_DUMMY) gives it one. A dummy drops what it is sent,
# so the two unreachable halves of the address space (more specific than the default) keep every
# other destination failing at once (EHOSTUNREACH) instead of a connect hanging until its timeout.
# passt only looks the default route up (prefix length 0, its device) to pick an interface.
if $BB ip link add ign-dummy0 type dummy 2>/dev/null; then
    $BB ip addr add 192.0.2.2/24 dev ign-dummy0
    $BB ip link set ign-dummy0 up
    $BB ip route add default via 192.0.2.1 dev ign-dummy0
    $BB ip route add unreachable 0.0.0.0/1
    $BB ip route add unreachable 128.0.0.0/1
fi
# While CMD runs only critical kernel messages reach the console (it carries CMD's output);
# everything stays in dmesg. Raw console: CMD's bytes go out unchanged (no \n -> \r\n, no echo).
echo 3 >/proc/sys/kernel/printk
$BB stty raw -echo </dev/ttyS0 2>/dev/null

printf '@@ignition-nested:%s:start@@\n' "$NONCE" >/dev/ttyS0
(. "$CTL/run.sh") </dev/null >/dev/ttyS0 2>&1
rc=$?
echo "$rc" >"$CTL/rc"
printf '@@ignition-nested:%s:exit=%s@@\n' "$NONCE" "$rc" >/dev/ttyS0
$BB sync
echo b >/proc/sysrq-trigger
exit "$rc"
