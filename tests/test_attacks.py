"""Adversarial tests, part 1: an agent inside the container tries to gain privileges or reach
the host. Every attack runs for real in a task container and must fail, with nothing outside
the container touched. (Further parts: test_attacks_resources.py, test_attacks_host.py,
test_network.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from taskbox import TaskService
from taskbox.sandbox import ContainerSpec, weakened


@pytest.fixture
def task(svc: TaskService, repo: Path):
    return svc.create_task(repo, "attacker")


def sh(svc: TaskService, task, cmd: str, **kw):
    return svc.exec(task.id, cmd, **kw)


def status_fields(svc: TaskService, task) -> dict[str, str]:
    text = sh(svc, task, "cat /proc/self/status").stdout
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_capabilities_are_all_zero(svc, task) -> None:
    st = status_fields(svc, task)
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert st[key] == "0000000000000000", key
    # and a process started through a set-uid binary gets none either
    r = sh(svc, task, "su -c 'grep CapEff /proc/self/status' root </dev/null 2>&1; echo rc=$?")
    assert "CapEff:\t0000000000000000" not in r.stdout or "rc=0" not in r.stdout
    assert "rc=0" not in r.stdout


def test_no_new_privileges_and_seccomp_filter_are_on(svc, task) -> None:
    st = status_fields(svc, task)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # 2 = filter mode: Docker's default profile is active
    # the profile really filters: unshare(CLONE_NEWUSER) and keyctl are refused
    r = sh(svc, task, "python3 -c \"import ctypes,os; l=ctypes.CDLL(None,use_errno=True); "
                      "print(l.unshare(0x10000000), ctypes.get_errno())\"")
    assert r.stdout.split()[0] == "-1"
    r = sh(svc, task, "unshare -Ur id 2>&1; echo rc=$?")
    assert "rc=0" not in r.stdout


def test_not_root_and_setuid_does_not_escalate(svc, task, tmp_path: Path) -> None:
    assert sh(svc, task, "id -u").stdout.strip() != "0"
    assert sh(svc, task, "sudo -n true").exit_code != 0  # no sudo, and no way to get it
    # set-uid root binaries exist in the image, but no-new-privileges makes the bit inert
    suid = sh(svc, task, "find / -xdev -perm -4000 -type f 2>/dev/null").stdout.split()
    assert suid, "expected some set-uid binaries in the image to attack"
    for binary in suid:
        r = sh(svc, task, f"{binary} --help </dev/null >/dev/null 2>&1; id -u")
        assert r.stdout.strip().splitlines()[-1] != "0"
    r = sh(svc, task, "su -c 'touch /root/pwned' root </dev/null; ls /root/pwned")
    assert r.exit_code != 0
    # a set-uid copy made by the agent belongs to the agent: it cannot become root
    r = sh(svc, task, "cp /usr/bin/python3 /tmp/py && chmod u+s /tmp/py && "
                      "/tmp/py -c 'import os; print(os.geteuid()); os.setuid(0)' 2>&1")
    assert r.stdout.splitlines()[0] != "0"
    assert "PermissionError" in r.stdout or "Operation not permitted" in r.stdout
    r = sh(svc, task, "chown root /tmp/py 2>&1; chmod u+s /usr/bin/python3 2>&1; echo rc=$?")
    assert "Operation not permitted" in r.stdout


def test_no_docker_socket_and_engine_api_unreachable(svc, task) -> None:
    r = sh(svc, task, "ls -la /var/run/docker.sock /run/docker.sock /run/containerd 2>&1; "
                      "find / -xdev -type s 2>/dev/null")
    assert "docker.sock" not in r.stdout.replace("No such file", "").split("cannot access")[0]
    assert "containerd" not in r.stdout.split("No such file")[-1]
    # no network at all by default: the engine's TCP ports cannot even be attempted
    for port in (2375, 2376):
        r = sh(svc, task, f"curl -sS -m 3 http://127.0.0.1:{port}/version 2>&1; echo rc=$?")
        assert '"ApiVersion"' not in r.stdout and "rc=0" not in r.stdout
    assert sh(svc, task, "ls /sys/class/net").stdout.split() == ["lo"]


def test_mount_mknod_and_kernel_tunables_are_refused(svc, task, tmp_path: Path) -> None:
    assert sh(svc, task, "mount -t tmpfs none /tmp 2>&1").exit_code != 0
    assert sh(svc, task, "mount --bind /workspace /mnt 2>&1").exit_code != 0
    assert sh(svc, task, "mknod /tmp/sda b 8 0 2>&1").exit_code != 0
    assert sh(svc, task, "mknod /tmp/mem c 1 1 2>&1").exit_code != 0
    assert sh(svc, task, "ls /dev/sda /dev/mem /dev/kmsg 2>/dev/null").stdout == ""
    watched = [Path(p) for p in ("/proc/sys/kernel/sysrq", "/proc/sys/kernel/panic",
                                 "/proc/sys/vm/overcommit_memory") if Path(p).exists()]
    before = {p: p.read_text() for p in watched}
    for target, value in (("/proc/sys/kernel/sysrq", "0"), ("/proc/sys/kernel/panic", "7"),
                          ("/proc/sys/vm/overcommit_memory", "1"), ("/proc/sysrq-trigger", "h"),
                          ("/sys/kernel/mm/transparent_hugepage/enabled", "never")):
        r = sh(svc, task, f"echo {value} > {target}")
        assert r.exit_code != 0, target
    assert {p: p.read_text() for p in watched} == before  # the host's values are unchanged
    # the host's processes and the engine are invisible: only the container's own pid namespace
    pids = sh(svc, task, "ls /proc | grep -E '^[0-9]+$' | wc -l").stdout.strip()
    assert int(pids) < 20
    assert "dockerd" not in sh(svc, task, "ps -eo args").stdout


def test_no_host_namespaces_or_devices_in_the_container_config(svc, task, docker_engine) -> None:
    hc = docker_engine.api.inspect_container(task.container_id)["HostConfig"]
    assert hc["Privileged"] is False
    assert hc["NetworkMode"] == "none"
    assert hc["PidMode"] in ("", "private") and hc["IpcMode"] == "private"
    assert hc["CgroupnsMode"] == "private"
    assert hc["Devices"] in (None, [])
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
    assert "no-new-privileges:true" in hc["SecurityOpt"]
    assert not any("unconfined" in o for o in hc["SecurityOpt"])
    assert hc["MemorySwap"] == hc["Memory"] > 0  # no swap beyond the limit
    assert hc["PidsLimit"] and hc["NanoCpus"] and hc["Init"] is True
    assert {u["Name"] for u in hc["Ulimits"]} == {"nofile", "fsize"}
    assert hc["LogConfig"]["Config"]["max-size"]
    assert not any("docker.sock" in b for b in hc["Binds"] or [])


def test_file_size_and_open_files_limits_hold(svc, task) -> None:
    r = sh(svc, task, "ulimit -n; ulimit -f")
    nofile, fsize_blocks = r.stdout.split()
    assert int(nofile) == 4096
    assert int(fsize_blocks) * 512 == 8 * 1024**3
    r = sh(svc, task, "python3 -c \"import os\nfs=[]\ntry:\n  [fs.append(os.open('/dev/null',0)) for _ in range(5000)]"
                      "\nexcept OSError as e: print('refused', len(fs))\"")
    assert r.stdout.startswith("refused")


def test_weakening_a_default_is_listed() -> None:
    safe = ContainerSpec(name="x", image="i", workspace=Path("/"), labels={})
    assert weakened(safe) == []
    risky = ContainerSpec(name="x", image="i", workspace=Path("/"), labels={}, network="open",
                          cap_add=["NET_BIND_SERVICE"], seccomp="unconfined", pids_limit=4096, memory="8g")
    text = " ".join(weakened(risky))
    for word in ("open", "NET_BIND_SERVICE", "seccomp", "pids", "memory"):
        assert word in text


def test_dangerous_capabilities_cannot_be_added(svc: TaskService, repo: Path) -> None:
    from taskbox import InvalidInput

    for cap in ("SYS_ADMIN", "CAP_SYS_PTRACE", "NET_ADMIN", "SYS_MODULE"):
        with pytest.raises(InvalidInput, match="cannot be given"):
            svc.create_task(repo, f"wants {cap}", metadata={"sandbox": {"cap_add": [cap]}})
    assert svc.list_tasks() == []


def test_the_host_stays_untouched(svc, task, tmp_path: Path) -> None:
    """Writes aimed at host paths land, at most, in the container's own filesystem."""
    marker = tmp_path / "host-marker"
    r = sh(svc, task, f"mkdir -p {tmp_path} 2>&1; echo pwned > {marker} 2>&1; echo x > /etc/hostname 2>&1; "
                      "echo x >> /etc/passwd 2>&1; true")
    assert r.exit_code == 0
    assert not marker.exists()
    assert "pwned" not in Path("/etc/passwd").read_text()
    assert not Path("/etc/passwd").read_text().endswith("x\n")
