"""A real SLURM cluster with accounting, started on this machine for a test: one node on localhost,
or (nodes=2) two nodes, each in its own network namespace with its own address and hostname.

`cluster(tmp)` (a context manager) installs the Debian packages if missing (root + apt only; see
.ci/slurm-setup), then starts, all under `tmp` and on free localhost ports:

  MariaDB (its own datadir and socket)  -> slurmdbd (accounting_storage/mysql)
  munged (its own key and socket)       -> slurmctld (accounting_storage/slurmdbd) -> slurmd
  the cluster, an account and the user registered with sacctmgr, so that sacct answers.

With `cluster(tmp, nodes=2)` the two nodes are `mfnode1` (10.231.0.11: slurmctld and a slurmd) and
`mfnode2` (10.231.0.12: a slurmd), network namespaces on a bridge (tests/netns.py, prefix "mfc",
subnet 231); MariaDB and slurmdbd stay in this namespace and listen on the bridge's host address
10.231.0.1 too; munged's unix socket is shared by the filesystem. Client commands here reach
slurmctld over the bridge.

It yields a `Cluster` whose `.env` (SLURM_CONF and PATH) lets sbatch/squeue/sacct/snakemake talk
to it, and stops every daemon it started at the end. `unavailable()` says why a cluster cannot be
had here (None when it can; `unavailable(nodes=2)` also needs network namespaces)."""
from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import netns

ROOT = Path(__file__).resolve().parent.parent
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
NEEDED = ("munged", "slurmctld", "slurmd", "slurmdbd", "sacctmgr", "sacct", "sbatch", "squeue", "sinfo",
          "mariadbd", "mariadb-install-db", "mariadb")
CLUSTER = "mftest"
ACCOUNT = "mfacct"
PARTITION = "debug"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
NET = dict(prefix="mfc", subnet=231)   # the multi-node cluster's namespaces (tests/netns.py)
NODE_NAMES = ("mfnode1", "mfnode2")


class SlurmUnavailable(RuntimeError):
    pass


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def missing() -> list[str]:
    return [b for b in NEEDED if which(b) is None]


def ensure_installed() -> None:
    """Install the packages with .ci/slurm-setup when missing; raise SlurmUnavailable if that can't."""
    if not missing():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"SLURM packages missing ({', '.join(missing())}) and cannot install them "
                               "(needs root and apt-get; run .ci/slurm-setup)")
    r = subprocess.run([str(ROOT / ".ci" / "slurm-setup")], capture_output=True, text=True, timeout=1800)
    if missing():
        raise SlurmUnavailable(f"apt-get could not install the SLURM packages ({', '.join(missing())} missing):\n"
                               + (r.stdout + r.stderr)[-2000:])


def unavailable(nodes: int = 1) -> str | None:
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs; not root here"
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        return str(e)
    if nodes > 1:
        return netns.unavailable() or (None if shutil.which("nsenter") else "`nsenter` is missing (util-linux)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


@dataclasses.dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict
    procs: list = dataclasses.field(default_factory=list)
    logs: dict = dataclasses.field(default_factory=dict)
    nodes: list = dataclasses.field(default_factory=lambda: ["localhost"])
    net: netns.Network | None = None   # the nodes' namespaces (nodes > 1)

    def run(self, *cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}\n{self.tail_logs()}")
        return r

    def tail_logs(self, n: int = 25) -> str:
        out = []
        for name, p in self.logs.items():
            if Path(p).exists():
                lines = Path(p).read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {name} ({p})\n" + "\n".join(lines))
        return "\n".join(out)


def _wait(pred, what: str, cl: Cluster, timeout: float = 60.0, every: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - keep polling until the deadline
            pass
        time.sleep(every)
    raise SlurmUnavailable(f"timed out waiting for {what}\n{cl.tail_logs()}")


def _start(cl: Cluster, name: str, cmd: list[str], node: str | None = None):
    """A daemon, in its own process group; on `node`'s namespace (and hostname) when given."""
    log = cl.root / "log" / f"{name}.out"
    f = open(log, "wb")
    if node is not None:   # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs /sys/fs/cgroup
        cmd = ["nsenter", f"--net=/run/netns/{cl.net.ns(node)}", "unshare", "--uts", "sh", "-c",
               f'hostname {node} && exec "$@"', "sh", *cmd]
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=cl.env, start_new_session=True)
    cl.procs.append((name, p))
    cl.logs.setdefault(name + ".out", log)
    return p


def _stop(cl: Cluster):
    for name, p in reversed(cl.procs):  # started last, stopped first
        netns.stop(p, grace=20)


def _write_configs(cl: Cluster, ports: dict, user: str) -> None:
    r, net = cl.root, cl.net
    # one node: everything on localhost; several: slurmctld on the first node's address, slurmdbd
    # on the bridge's host address (this namespace), each node at its namespace's address
    dbd_addr = net.host_ip if net else "127.0.0.1"
    ctld = f"{cl.nodes[0]}({net.ip[cl.nodes[0]]})" if net else "localhost(127.0.0.1)"
    cpus = os.cpu_count() or 1
    mem = max(512, int(mem_mb() * 0.8) // len(cl.nodes))
    node_lines = "\n".join(f"NodeName={n} NodeAddr={net.ip[n] if net else '127.0.0.1'} CPUs={cpus} RealMemory={mem} "
                           "State=UNKNOWN" for n in cl.nodes)
    auth = "AuthType=auth/munge\n"  # the default socket: not every client honours AuthInfo=socket=
    (r / "etc" / "slurmdbd.conf").write_text(f"""{auth}DbdHost=localhost
DbdAddr={dbd_addr}
DbdPort={ports['dbd']}
SlurmUser={user}
LogFile={r}/log/slurmdbd.log
PidFile={r}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mysql']}
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
""")
    os.chmod(r / "etc" / "slurmdbd.conf", 0o600)
    cl.conf.write_text(f"""ClusterName={CLUSTER}
SlurmctldHost={ctld}
SlurmctldPort={ports['ctld']}
SlurmdPort={ports['slurmd']}
SlurmUser={user}
SlurmdUser=root
{auth}CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={dbd_addr}
AccountingStoragePort={ports['dbd']}
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName={PARTITION} Nodes={",".join(cl.nodes)} Default=YES MaxTime=INFINITE State=UP
""")


@contextlib.contextmanager
def cluster(tmp: str | Path, nodes: int = 1):
    """`_cluster`, one at a time on this machine: clusters share /etc/slurm/slurm.conf, so a second
    (another pytest-xdist worker's test file) waits for the first to stop."""
    import fcntl
    with open("/tmp/meanflow-slurm-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with _cluster(tmp, nodes) as cl:
            yield cl


@contextlib.contextmanager
def _cluster(tmp: str | Path, nodes: int = 1):
    """Start the cluster under `tmp` (keep the path short: unix socket paths are limited to 107 bytes)
    with 1 node (localhost) or 2 (network namespaces mfnode1, mfnode2)."""
    if nodes not in (1, len(NODE_NAMES)):
        raise ValueError(f"nodes={nodes}: 1 or {len(NODE_NAMES)}")
    why = unavailable(nodes)
    if why:
        raise SlurmUnavailable(why)
    root = Path(tmp)
    for d in ("etc", "log", "run", "state", "spool", "munge", "db"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o755)
    user = getpass.getuser()
    env = dict(os.environ, SLURM_CONF=str(root / "etc" / "slurm.conf"))
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        env.pop(k)  # a surrounding allocation must not leak into the test's cluster
    cl = Cluster(root=root, conf=root / "etc" / "slurm.conf", env=env)
    if nodes > 1:
        cl.nodes = list(NODE_NAMES)
        cl.net = netns.Network(NET["prefix"], cl.nodes, NET["subnet"])
    cl.logs.update({"slurmdbd": root / "log/slurmdbd.log", "slurmctld": root / "log/slurmctld.log",
                    "mariadb": root / "log/mariadb.err"})
    cl.logs.update({f"slurmd {n}": root / f"log/slurmd-{n}.log" for n in cl.nodes})
    linked = False
    ports = {k: free_port() for k in ("mysql", "dbd", "ctld", "slurmd")}
    try:
        if cl.net:
            cl.net.__enter__()
        # ---- munge: own key and socket
        # Clients (sacctmgr in 22.05) ignore AuthInfo=socket=, so munged listens on the default socket;
        # one already answering there (a system munged) is used as is. Key and logs stay under tmp.
        if subprocess.run([which("munge") or "munge", "-n"], capture_output=True).returncode != 0:
            key = root / "munge" / "munge.key"
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            _start(cl, "munged", [which("munged"), "--foreground", "--force", f"--key-file={key}",
                                  f"--socket={MUNGE_SOCKET}", f"--pid-file={root}/run/munged.pid",
                                  f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/munged.seed"])
            _wait(lambda: subprocess.run([which("munge") or "munge", "-n"], capture_output=True).returncode == 0,
                  "munged", cl, 20)
        # ---- MariaDB: own datadir, socket and port
        datadir, sock = root / "db" / "data", root / "run" / "mysql.sock"
        r = subprocess.run([which("mariadb-install-db"), f"--datadir={datadir}", "--user=root",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SlurmUnavailable(f"mariadb-install-db failed:\n{r.stdout}{r.stderr}")
        _start(cl, "mariadbd", [which("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                                f"--port={ports['mysql']}", "--bind-address=127.0.0.1", "--user=root",
                                f"--pid-file={root}/run/mariadb.pid", f"--log-error={root}/log/mariadb.err",
                                "--innodb-buffer-pool-size=64M", "--innodb-lock-wait-timeout=900",
                                "--innodb-log-file-size=16M"])
        mysql = [which("mariadb"), "--no-defaults", f"--socket={sock}", "-uroot"]
        _wait(lambda: subprocess.run(mysql + ["-e", "SELECT 1"], capture_output=True).returncode == 0,
              "MariaDB", cl, 90)
        sql = ("CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';"
               "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';"
               "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        subprocess.run(mysql + ["-e", sql], check=True, capture_output=True, timeout=60)
        # ---- slurmdbd, then the cluster/account/user in accounting
        _write_configs(cl, ports, user)
        # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
        _start(cl, "slurmdbd", [which("slurmdbd"), "-D"])
        last = {}

        def dbd_up():
            last["r"] = r = cl.run("sacctmgr", "-n", "list", "cluster", check=False, timeout=20)
            return r.returncode == 0
        try:
            _wait(dbd_up, "slurmdbd", cl, 60, 1.0)
        except SlurmUnavailable as e:
            r = last.get("r")
            raise SlurmUnavailable(f"{e}\nsacctmgr: {r and (r.stdout + r.stderr)}") from None
        cl.run("sacctmgr", "-i", "add", "cluster", CLUSTER, check=False)
        cl.run("sacctmgr", "-i", "add", "account", ACCOUNT, f"cluster={CLUSTER}", "Description=test",
               "Organization=test", check=False)
        cl.run("sacctmgr", "-i", "add", "user", user, f"account={ACCOUNT}", f"DefaultAccount={ACCOUNT}",
               f"cluster={CLUSTER}", check=False)
        _wait(lambda: CLUSTER in cl.run("sacctmgr", "-nP", "list", "cluster", "format=cluster", check=False).stdout,
              "cluster registration", cl, 30)
        # Batch jobs don't inherit SLURM_CONF (slurmd drops it), so srun inside a job reads the
        # compiled-in /etc/slurm/slurm.conf: link it to ours while the cluster runs, only if absent.
        if not SYSTEM_CONF.exists() and not SYSTEM_CONF.is_symlink():
            SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
            SYSTEM_CONF.symlink_to(cl.conf)
            linked = True
        elif SYSTEM_CONF.resolve() != cl.conf.resolve():
            raise SlurmUnavailable(f"{SYSTEM_CONF} exists (another SLURM setup); jobs would not find this cluster")
        # ---- slurmctld + slurmd
        head = cl.nodes[0] if cl.net else None
        _start(cl, "slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(cl.conf)], head)
        _wait(lambda: cl.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") >= 1,
              "slurmctld", cl, 60, 1.0)
        for n in cl.nodes:
            _start(cl, f"slurmd-{n}", [which("slurmd"), "-D", "-N", n, "-f", str(cl.conf),
                                       "-L", str(root / f"log/slurmd-{n}.log")], n if cl.net else None)

        def all_idle():
            states = cl.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).stdout.split()
            return len(states) == len(cl.nodes) and all(s in ("idle", "mixed") for s in states)
        _wait(all_idle, f"slurmd to register the node{'s' if nodes > 1 else ''} idle", cl, 90, 1.0)
        yield cl
    finally:
        _stop(cl)
        if cl.net:
            cl.net.close()   # also anything a job left inside the namespaces
        if linked and SYSTEM_CONF.is_symlink():
            SYSTEM_CONF.unlink()


if __name__ == "__main__":  # manual check: python tests/slurm_cluster.py
    import sys
    import tempfile
    n = 2 if "-2" in sys.argv else 1
    with tempfile.TemporaryDirectory(prefix="slurm", dir="/tmp") as d, cluster(d, nodes=n) as c:
        print(c.run("sinfo").stdout)
        j = c.run("sbatch", "--parsable", f"--nodes={n}", "--wrap", "srun hostname", "-o", f"{d}/job.out").stdout.strip()
        _wait(lambda: "COMPLETED" in c.run("sacct", "-nXP", "-j", j, "-o", "State").stdout, "job", c, 60)
        print("job", j, c.run("sacct", "-XP", "-j", j, "-o", "JobID,State,ExitCode,NodeList").stdout)
        print(Path(f"{d}/job.out").read_text())
        if "-i" in sys.argv:
            input("cluster up; SLURM_CONF=" + str(c.conf) + " ; enter to stop")
