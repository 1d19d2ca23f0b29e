#!/bin/sh
# PID 1 of a fresh PID/mount/UTS/IPC/net namespace (see harness.py): give systemd a private
# world, then exec it. Nothing here may touch the shared root: an earlier attempt that booted
# systemd on it ran tmpfiles, wiped /tmp and started host services.
#
#   $1  staging directory prepared by harness.py: units/, empty/, etc-upper/, etc-work/,
#       opt-vsup/ (a venv), passwd.add, group.add; systemd's log goes to $1/systemd.log
#   $2  name of the cgroup created for this boot in each hierarchy of $3
#   $3  space-separated hierarchies under /sys/fs/cgroup
#   $4  the repository (its supervisor/ and tests/), $5 the test venv's site-packages: bound
#       read-only at /opt/vsup-src and /opt/vsup-deps (harness.REPO_IN_NS, DEPS_IN_NS)
set -eu
S=$1
exec >"$S/ns-init.log" 2>&1
set -x

# Into our own cgroup first: systemd takes the cgroup it starts in as its root and creates
# everything below it. (Written as pid 1: cgroup.procs reads pids in the writer's namespace.)
for h in $3; do
    echo $$ >"/sys/fs/cgroup/$h/$2/cgroup.procs"
done

# The checkout and the test venv, held under $S before /tmp (where either may live) is covered.
mkdir -p "$S/src" "$S/deps"
mount --bind "$4" "$S/src"
mount --bind "$5" "$S/deps"

# Mounts made here stay here: unshare(1) made every mount private before running us.
# Global sysctls and /sys stay read-only to everything in the namespace (systemd as PID 1
# would otherwise raise fs.nr_open and friends for the whole machine). The cgroup mounts
# below /sys keep their own read-write flag: systemd needs them.
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
if [ -e /proc/sysrq-trigger ]; then
    mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
    mount -o remount,bind,ro /proc/sysrq-trigger
fi
mount -o remount,bind,ro /sys

# /sys/fs/cgroup: a tmpfs of our own holding binds of the host's hierarchies. systemd mkdirs
# mount points for controllers it finds unmounted and remounts this tmpfs read-only; done on
# the host's tmpfs (one superblock, shared by every namespace) that made it read-only for the
# whole machine and left directories behind. Ours is read-only from the start, so systemd
# also cannot mount extra v1 hierarchies (which would take controllers away from the host's
# v2 tree while we run).
HOSTCG=$S/cgroup-host
mkdir -p "$HOSTCG"
mount --rbind /sys/fs/cgroup "$HOSTCG"
mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup-root /sys/fs/cgroup
for e in "$HOSTCG"/*; do
    n=${e##*/}
    if [ -L "$e" ]; then
        ln -s "$(readlink "$e")" "/sys/fs/cgroup/$n"
    elif mountpoint -q "$e"; then
        mkdir "/sys/fs/cgroup/$n"
        mount --bind "$e" "/sys/fs/cgroup/$n"
    fi
done
umount -R "$HOSTCG"
mount -o remount,ro /sys/fs/cgroup

# /etc: an overlay, so the vsup user, /etc/vsup and systemd's own writes land in $S.
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$S/etc-upper,workdir=$S/etc-work" /etc
cat "$S/passwd.add" >>/etc/passwd
cat "$S/group.add" >>/etc/group

# /dev: only the pseudo devices a service may use, a private devpts, /dev/shm and mqueue.
# The host's devtmpfs (GPU nodes, disks, kmsg, the real console) is not reachable.
D=$S/dev
mkdir -p "$D"
mount -t tmpfs -o mode=755,nosuid dev "$D"
for n in null zero full random urandom tty; do
    touch "$D/$n"
    mount --bind "/dev/$n" "$D/$n"
done
# systemd writes status and console-target logs to /dev/console: a file here.
touch "$S/console.log" "$D/console"
mount --bind "$S/console.log" "$D/console"
mkdir "$D/pts" "$D/shm" "$D/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$D/pts"
ln -s pts/ptmx "$D/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$D/shm"
mount -t mqueue mqueue "$D/mqueue"
ln -s /proc/self/fd "$D/fd"
ln -s /proc/self/fd/0 "$D/stdin"
ln -s /proc/self/fd/1 "$D/stdout"
ln -s /proc/self/fd/2 "$D/stderr"
mount --move "$D" /dev

# /run, /tmp, /var: empty, as after a boot. $S stays reachable as /run/harness (it may live
# under the /tmp we are about to cover).
mount --rbind "$S" /mnt
mount -t tmpfs -o mode=755,nosuid,nodev run /run
mkdir /run/harness
mount --move /mnt /run/harness
S=/run/harness
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
mount -t tmpfs -o mode=755 var /var
mkdir -p /var/lib /var/log /var/cache /var/tmp /run/lock
chmod 1777 /var/tmp
ln -s /run /var/run
ln -s /run/lock /var/lock

# /opt/vsup: the venv the unit's ExecStart= names, exactly as installed on a GPU box.
mount -t tmpfs -o mode=755 opt /opt
mkdir /opt/vsup
mount --bind "$S/opt-vsup" /opt/vsup
# Only the checkout's supervisor/ and tests/, under a directory of our own: the checkout's top
# may be a directory only root can enter (`git clone . "$(mktemp -d)"`), and user vsup must
# read through it.
mkdir -m 755 /opt/vsup-src /opt/vsup-deps
for d in supervisor tests; do
    mkdir -m 755 "/opt/vsup-src/$d"
    mount --bind "$S/src/$d" "/opt/vsup-src/$d"
    mount -o remount,bind,ro "/opt/vsup-src/$d"
done
mount --bind "$S/deps" /opt/vsup-deps
mount -o remount,bind,ro /opt/vsup-deps

# container=: systemd's container mode (no kmsg, no hwclock, no kernel modules, no
# release agent, no unmounting or loop/DM detaching at shutdown). SYSTEMD_UNIT_PATH without a
# trailing ':' makes our units/ the only unit directory: no host unit can be started.
# Generators are off (the fstab generator would mount the host's /etc/fstab entries).
exec env -i container=vsup-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    SYSTEMD_UNIT_PATH="$S/units" \
    SYSTEMD_GENERATOR_PATH="$S/empty" \
    SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$S/empty" \
    /lib/systemd/systemd --system --unit=vsup-test.target --show-status=no \
    --log-target=journal --log-level=info >"$S/systemd.log" 2>&1
