"""Machines on one machine, for tests: Linux network namespaces joined by a bridge, each with its own
address and (through `unshare --uts`, per command) its own hostname, so daemons and clients talk over
real network interfaces as on separate nodes.

    with Network("mfa", ["node-a", "node-b"], subnet=231) as net:   # 10.231.0.1 = this host on the bridge
        net.ip["node-a"]                                            # "10.231.0.11"
        net.popen("node-a", ["slurmd", ...])                        # runs inside node-a, hostname node-a
        net.run("node-b", ["python", "-c", "..."])

Names are unique per network (the bridge is `<prefix>br`, a namespace `<prefix>-<name>`), so tests
with different prefixes and subnets do not collide. The hostnames resolve through /etc/hosts lines
tagged with the prefix, added on entry and removed on exit. Everything is removed on exit, on an
exception or Ctrl-C, and leftovers of an earlier, killed test with the same prefix are removed
before starting. `unavailable()` says why namespaces cannot be had (not root, no `ip`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

HOSTS = Path("/etc/hosts")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root; not root here"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install iproute2 util-linux)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns` does not work here: {r.stderr.strip()}"
    return None


def stop(p: subprocess.Popen, grace: float = 15) -> None:
    """A daemon started in its own process group: SIGTERM to the group, SIGKILL after `grace` s."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    def __init__(self, prefix: str, names: list[str], subnet: int):
        if not prefix.isalnum() or len(prefix) > 6:
            raise ValueError(f"prefix {prefix!r}: up to 6 letters or digits (interface names are short)")
        self.prefix, self.names, self.subnet = prefix, list(names), subnet
        self.bridge = f"{prefix}br"
        self.host_ip = f"10.{subnet}.0.1"
        self.ip = {n: f"10.{subnet}.0.{11 + i}" for i, n in enumerate(self.names)}
        self.procs: list[subprocess.Popen] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    # ------------------------------------------------------------------ set-up and tear-down
    def __enter__(self) -> "Network":
        self.close()   # leftovers of a killed test with this prefix
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, n in enumerate(self.names):
                ns, host_if, ns_if = self.ns(n), f"{self.prefix}v{i}", f"{self.prefix}p{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
                _ip("link", "set", ns_if, "netns", ns)
                _ip("link", "set", host_if, "master", self.bridge)
                _ip("link", "set", host_if, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip[n]}/24", "dev", ns_if)
                _ip("-n", ns, "link", "set", ns_if, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "route", "add", "default", "via", self.host_ip)
            self._hosts(add=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop what this network started and remove its namespaces, bridge and hosts lines (idempotent)."""
        for p in reversed(self.procs):
            stop(p)
        self.procs.clear()
        listed = _ip("netns", "list", check=False).stdout.split()
        for ns in [x for x in listed if x.startswith(f"{self.prefix}-")]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:   # anything still inside (a daemon that forked away from its group)
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)
        self._hosts(add=False)

    def _hosts(self, add: bool) -> None:
        tag = f"# netns-test {self.prefix}"
        lines = [x for x in HOSTS.read_text().splitlines() if not x.endswith(tag)]
        if add:
            lines += [f"{self.ip[n]} {n} {tag}" for n in self.names]
        HOSTS.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ running things on a node
    def argv(self, name: str, cmd: list[str]) -> list[str]:
        """cmd run inside node `name`'s namespace with hostname `name` (a UTS namespace of its own)."""
        return ["ip", "netns", "exec", self.ns(name), "unshare", "--uts", "sh", "-c",
                f'hostname {name} && exec "$@"', "sh", *map(str, cmd)]

    def run(self, name: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(name, cmd), **kw)

    def popen(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        """A daemon on node `name`, in its own process group; stopped by close()."""
        p = subprocess.Popen(self.argv(name, cmd), start_new_session=True, **kw)
        self.procs.append(p)
        return p
