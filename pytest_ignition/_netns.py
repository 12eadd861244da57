"""Hosts made of network namespaces on this machine, each with its own sshd (tests, benchmarks).

Owns the rig behind ``tests/e2e/test_remote.py`` and ``benchmarks/xdist.py``: a controller
namespace joined by a veth pair to each host namespace (addresses only inside the namespaces,
nothing in the root namespace), an OpenSSH ``sshd`` per host in its own UTS namespace (so the
host has its own hostname) with host keys, ``authorized_keys`` and config made here, and
``SetEnv`` giving each host its own ``IGNITION_CACHE_DIR`` (and, for a host that should lack
QEMU, a ``PATH`` without it). :func:`seed_cache` hard-links an already built guest into a host's
cache so no host builds a kernel. :meth:`Rig.close` kills every process the rig started (by
pid, and whatever still runs inside its namespaces) and deletes the namespaces; it is
idempotent, and safe after a half-finished setup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SUBNET = "10.77"  # 10.77.<n>.1 controller side, 10.77.<n>.2 host side, one /30 per host


class RigUnavailable(Exception):
    """This machine cannot make the rig (not root, no ip/sshd, netns creation refused)."""


def _run(cmd: list[str], what: str, timeout: float = 30) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RigUnavailable(f"{what}: {' '.join(cmd)}: {e}") from None
    if r.returncode != 0:
        raise RigUnavailable(f"{what}: {' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


def missing_tools() -> str | None:
    """Why the rig cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, sshd)"
    for tool, pkg in (("ip", "iproute2"), ("unshare", "util-linux"), ("ssh", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {pkg})"
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        return f"{SSHD} not found (apt-get install openssh-server)"
    return None


@dataclass
class Host:
    name: str  # ssh alias and hostname
    ns: str
    address: str
    cache: Path
    workdir: Path
    sshd: subprocess.Popen[bytes] | None = None


class Rig:
    """A controller namespace and hosts reachable from it over ssh by name."""

    def __init__(self, workdir: Path, tag: str | None = None) -> None:
        why = missing_tools()
        if why:
            raise RigUnavailable(why)
        self.workdir = workdir
        self.tag = tag or f"i{os.getpid() % 100000}"
        self.ctl = f"{self.tag}-ctl"
        self.namespaces: list[str] = []
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.key = workdir / "id_ed25519"
        self.ssh_config = workdir / "ssh_config"
        self.known_hosts = workdir / "known_hosts"
        try:
            self._netns_add(self.ctl)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], "key")
        except BaseException:
            self.close()
            raise

    def _netns_add(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns], "cannot create a network namespace")
        self.namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"], "loopback up")

    def add_host(self, name: str, *, path: str | None = None) -> Host:
        """A new host namespace ``name`` with its own sshd; ``path`` replaces its ``PATH``."""
        n = len({h.ns for h in self.hosts}) + 1
        ns = f"{self.tag}-{name}"
        self._netns_add(ns)
        a, b = f"{self.tag}{n}c", f"{self.tag}{n}h"  # veth ends (15-character limit)
        ip = ["ip", "-n", self.ctl]
        _run([*ip, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns], "veth")
        _run([*ip, "addr", "add", f"{SUBNET}.{n}.1/30", "dev", a], "address")
        _run([*ip, "link", "set", a, "up"], "link up")
        _run(["ip", "-n", ns, "addr", "add", f"{SUBNET}.{n}.2/30", "dev", b], "address")
        _run(["ip", "-n", ns, "link", "set", b, "up"], "link up")
        cache = (self.workdir / f"cache-{name}").resolve()
        cache.mkdir(parents=True, exist_ok=True)
        host = Host(name, ns, f"{SUBNET}.{n}.2", cache, self.workdir / name)
        self.hosts.append(host)
        host.sshd = self._sshd(host, name, 22, path)
        return host

    def add_sshd(self, host: Host, alias: str, port: int, *, path: str | None = None) -> None:
        """One more sshd on ``host`` (same hostname and cache), reached as ``alias``."""
        self._sshd(host, alias, port, path)

    def _sshd(self, host: Host, alias: str, port: int, path: str | None) -> subprocess.Popen[bytes]:
        hw = self.workdir / f"{alias}-{port}"
        hw.mkdir(parents=True, exist_ok=True)
        hostkey = hw / "hostkey"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], "host key")
        (hw / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        env = f"IGNITION_CACHE_DIR={host.cache}" + (f" PATH={path}" if path else "")
        (hw / "sshd_config").write_text(
            f"Port {port}\nListenAddress {host.address}\nHostKey {hostkey}\n"
            f"PidFile {hw}/sshd.pid\nAuthorizedKeysFile {hw}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\n"
            "UseDNS no\nMaxStartups 64\nMaxSessions 64\n"
            f"SetEnv {env}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        with open(hw / "sshd.log", "wb") as log:
            # ip netns exec, unshare and sh exec in place: the Popen's pid is sshd's own.
            sshd = subprocess.Popen(
                [
                    *("ip", "netns", "exec", host.ns, "unshare", "--uts", "sh", "-c"),
                    f'hostname "$0" && exec {SSHD} -D -e -f "$1"',
                    host.name,
                    str(hw / "sshd_config"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(sshd)
        kind, key = (hw / "hostkey.pub").read_text().split()[:2]
        where = host.address if port == 22 else f"[{host.address}]:{port}"
        with self.known_hosts.open("a") as f:
            f.write(f"{where} {kind} {key}\n")
        with self.ssh_config.open("a") as f:
            f.write(
                f"Host {alias}\n  HostName {host.address}\n  Port {port}\n  User root\n"
                f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.known_hosts}\n  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n  ConnectTimeout 10\n  LogLevel ERROR\n\n"
            )
        self._wait_listening(alias, sshd, hw)
        return sshd

    def _wait_listening(
        self, alias: str, sshd: subprocess.Popen[bytes], hw: Path, timeout: float = 20
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sshd.poll() is not None:
                log = (hw / "sshd.log").read_text(errors="replace")[-2000:]
                raise RigUnavailable(f"sshd for {alias} exited: {log}")
            if self.ssh(alias, "true", timeout=30).returncode == 0:
                return
            time.sleep(0.2)
        raise RigUnavailable(f"sshd for {alias} did not answer within {timeout:g} s")

    def controller(self, argv: list[str]) -> list[str]:
        """``argv`` run in the controller namespace."""
        return ["ip", "netns", "exec", self.ctl, *argv]

    def ssh(self, host: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.controller(["ssh", "-F", str(self.ssh_config), host, command]),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGTERM)
        for ns in self.namespaces:
            # ssh sessions (remote workers) and their QEMUs still inside the namespace
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


def seed_cache(cache: Path, kernel: Path, initrd: Path) -> None:
    """Put an already built guest into ``cache`` (hard links, else copies): no rebuild there.

    ``kernel`` is ``<cache>/guest/<key>/bzImage`` of the source cache; the whole ``<key>`` dir
    (bzImage, vmlinux, config) and the initramfs go to the same places under ``cache``.
    """
    kdir = kernel.parent
    dst = cache / kdir.parent.name / kdir.name
    dst.mkdir(parents=True, exist_ok=True)
    for f in list(kdir.iterdir()) + [initrd]:
        if not f.is_file():
            continue
        target = (cache / f.name) if f == initrd else (dst / f.name)
        if target.exists():
            continue
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def path_without(workdir: Path, prefix: str) -> str:
    """A PATH like this one but without programs named ``prefix*`` (e.g. ``qemu-``).

    Debian's /bin is /usr/bin, so leaving a directory out is not enough: the PATH is one
    directory of links to every other program of the usual directories.
    """
    out = workdir / f"bin-without-{prefix.strip('-')}"
    out.mkdir(parents=True, exist_ok=True)
    for d in ("/usr/local/bin", "/usr/bin", "/usr/sbin"):
        for p in Path(d).iterdir() if Path(d).is_dir() else ():
            link = out / p.name
            if not p.name.startswith(prefix) and not link.exists():
                link.symlink_to(p)
    return str(out)
