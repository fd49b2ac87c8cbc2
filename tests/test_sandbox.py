"""sandbox.py: generated code that fails, loops, escapes or lingers is contained, whoever
runs the evaluation: root (as in containers and CI), and an ordinary user (tested through
`nobody` when the suite runs as root)."""

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISOLATED = sandbox.isolation() is None
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="no namespaces here: " + str(sandbox.isolation()))


def _python_for_nobody():
    """A Python that `nobody` may run (the suite's may live under /root), or None."""
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        parts = python.split(os.sep)
        if os.path.exists(python) and all(os.stat(os.sep.join(parts[:i]) or "/").st_mode & 0o001
                                           for i in range(1, len(parts))):
            return python
    return None


# who starts the evaluation: this process, and when it is root an ordinary user too
CALLERS = ["this process"] + (["an ordinary user"] if os.geteuid() == 0 and _python_for_nobody() else [])


def run_as(caller, programs, **kwargs):
    """sandbox.run of each program, started by `caller`."""
    if caller == "this process":
        return [sandbox.run(p, **kwargs) for p in programs]
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); import sandbox\n"
            f"print(json.dumps([sandbox.run(p, **{kwargs!r}) for p in json.load(sys.stdin)]))")
    proc = subprocess.run(["setpriv", f"--reuid={sandbox.NOBODY}", f"--regid={sandbox.NOBODY}", "--clear-groups",
                           _python_for_nobody(), "-I", "-c", code], input=json.dumps(programs), capture_output=True,
                          text=True, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def place(tmp_path):
    """A folder that the caller owns (nobody's, for the ordinary user) and the sample may
    walk into, with a victim file in it."""
    folder = tempfile.mkdtemp(dir="/tmp")
    os.chmod(folder, 0o755)
    victim = os.path.join(folder, "victim.txt")
    with open(victim, "w") as f:
        f.write("intact")
    secret = os.path.join(folder, "secret.txt")  # the caller's root-only file
    with open(secret, "w") as f:
        f.write("the host's secret")
    os.chmod(secret, 0o600)

    def owned_by(caller):
        owner = sandbox.NOBODY if caller == "an ordinary user" else os.geteuid()
        for path in (folder, victim):
            os.chown(path, owner, owner)
        return folder

    yield owned_by
    shutil.rmtree(folder)


def test_sandbox_contains_bad_code(monkeypatch):
    if not ISOLATED:  # the same limits, without namespaces, where the machine has none
        monkeypatch.setattr(sandbox, "run", functools.partial(sandbox.run, allow_unisolated=True))
    assert sandbox.run("assert sum([1, 2]) == 3\n") == "passed"
    assert sandbox.run("assert 1 == 2\n") == "failed"
    assert sandbox.run("while True:\n    pass\n", timeout=2) == "timeout"
    assert sandbox.run("x = bytearray(4 * 2**30)\n") == "failed"  # over the memory limit
    assert sandbox.run("import os\nassert 'HOME' not in os.environ and 'SECRET' not in os.environ\n") == "passed"
    # pass@1 cannot be forged by leaving before the tests' end, with any status
    for exit_early in ("raise SystemExit(0)", "import os; os._exit(0)", "import sys; sys.exit()"):
        assert sandbox.run(f"{exit_early}\nassert 1 == 2\n") == "failed"


def test_without_isolation_code_runs_only_when_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: "unshare: operation not permitted")
    with pytest.raises(sandbox.SandboxError, match="--allow_code_execution=True"):
        sandbox.run("assert True\n")
    assert sandbox.run("assert True\n", allow_unisolated=True) == "passed"


ESCAPES = {  # each runs, and must leave no trace outside; {victim}, {root}, {pid}, {tmp} are filled in
    "posix.system": "import posix\nposix.system('touch {victim}.new')",
    "reload(os)": "import importlib, os\nimportlib.reload(os)\nos.system('touch {victim}.new')",
    "ctypes": "import ctypes\nctypes.CDLL(None).system(b'touch {victim}.new')",
    "posix_spawn": "import posix\nposix.posix_spawn('/usr/bin/touch', ['touch', '{victim}.new'], {{}})",
    "fork + execv": "import posix\nif posix.fork() == 0:\n    posix.execv('/usr/bin/touch', ['touch', '{victim}.new'])",
    "os.system = posix.system": "import os, posix\nos.system = posix.system\nos.system('touch {victim}.new')",
    "unlink": "import posix\nposix.unlink('{victim}')",
    "overwrite": "open('{victim}', 'w').write('gone')",
    "project write": "open('{root}/sandbox_escape.py', 'w').write('x')",
    "kill the parent": "import posix\nposix.kill({pid}, 9)",
    "survive the timeout": ("import posix\nposix.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 0.5; touch {victim}.new'], {{}})"
                            "\nwhile True:\n    pass"),
    # undoing the sandbox's own mounts
    "remount / writable": ("import ctypes\nlibc = ctypes.CDLL(None)\nfor m in (b'/', b'{tmp}'):\n"
                           "    libc.mount(None, m, None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, not MS_RDONLY\n"
                           "open('{victim}', 'w').write('gone')"),
    "unmount the project's cover": ("import ctypes\nctypes.CDLL(None).umount2(b'{root}', 2)\n"
                                    "open('{root}/sandbox_escape.py', 'w').write('x')"),
    "a namespace of its own": ("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.unshare(0x10000000 | 0x00020000)\n"
                               "libc.mount(None, b'/', None, 32 | 4096, None)\nopen('{victim}', 'w').write('gone')"),
    "/dev/shm": "open('/dev/shm/llm360_escape', 'w').write('stays on the host?')",
    "a tmpfs under /sys": "open('/sys/fs/cgroup/llm360_escape', 'w').write('stays on the host?')",
    "the host's name": "open('/proc/sys/kernel/hostname', 'w').write('llm360-escape')",
    "core_pattern": "open('/proc/sys/kernel/core_pattern', 'w').write('|/bin/touch {victim}.new')",
}


@needs_isolation
@pytest.mark.parametrize("caller", CALLERS)
def test_sandbox_holds_against_escapes(caller, place):
    folder = place(caller)
    victim = os.path.join(folder, "victim.txt")
    hostname, core_pattern = (open(f"/proc/sys/kernel/{k}").read() for k in ("hostname", "core_pattern"))
    programs = [p.format(victim=victim, root=ROOT, pid=os.getpid(), tmp=folder) + "\n" for p in ESCAPES.values()]
    run_as(caller, programs, timeout=2)
    time.sleep(1)  # a surviving grandchild would have written by now
    assert open(victim).read() == "intact" and not os.path.exists(victim + ".new")
    assert not os.path.exists(os.path.join(ROOT, "sandbox_escape.py"))
    assert not os.path.exists("/dev/shm/llm360_escape") and not os.path.exists("/sys/fs/cgroup/llm360_escape")
    assert open("/proc/sys/kernel/hostname").read() == hostname
    assert open("/proc/sys/kernel/core_pattern").read() == core_pattern


@needs_isolation
@pytest.mark.parametrize("caller", CALLERS)
def test_sandbox_sees_no_network_no_host_and_no_privilege(caller, place):
    """Run as checks inside the sandbox: "passed" means each view is closed."""
    import socket

    folder = place(caller)
    host_ns = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in ("pid", "net", "mnt", "uts", "ipc", "user")}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = (f"import os, socket\n"
                 f"s = socket.socket(); s.settimeout(1)\nassert s.connect_ex(('127.0.0.1', {port})) != 0\n"
                 f"assert not os.path.exists('/proc/{os.getpid()}/environ')  # the parent, out of sight\n"
                 f"assert os.listdir('{ROOT}') == []  # the project, hidden\n"
                 f"assert not os.path.exists('/root/.bash_history')\n"
                 # never root: an unprivileged uid, which cannot read the caller's root-only file
                 f"assert os.getuid() == os.geteuid() == 1000 and os.getgid() == 1000\n"
                 f"try:\n    open('{folder}/secret.txt').read()\nexcept OSError:\n    pass\n"
                 f"else:\n    raise SystemExit('read the secret')\n"
                 # namespaces of its own, all of them
                 f"for n, host in {host_ns!r}.items():\n"
                 f"    assert os.stat(f'/proc/self/ns/{{n}}').st_ino != host, n\n"
                 # every file system read-only, /proc with it, but its own folder
                 f"for path in ('/etc/sandbox_probe', '/proc/sys/kernel/hostname', '/proc/sysrq-trigger',\n"
                 f"             '/proc/sys/net/ipv4/ip_forward', '/proc/sys/user/max_user_namespaces'):\n"
                 f"    try:\n        open(path, 'w').write('1')\n    except OSError:\n        pass\n"
                 f"    else:\n        raise SystemExit('wrote ' + path)\n"
                 f"open('inside.txt', 'w').write('its own folder is writable')\n"
                 # no capability left, so no mount undone
                 f"status = open('/proc/self/status').read()\n"
                 f"assert 'CapEff:\\t0000000000000000' in status and 'CapBnd:\\t0000000000000000' in status\n"
                 f"import ctypes\nctypes.CDLL(None).umount2(b'/proc', 2)\n"
                 f"assert not os.path.exists('/proc/{os.getpid()}')\n"
                 # the bytes it may write, in all, are bounded (16 MB)
                 f"try:\n    open('big', 'wb').write(b'x' * (20 * 2**20))\nexcept OSError:\n    pass\n"
                 f"else:\n    raise SystemExit(1)\n")
        bomb = ("import posix\nn = 0\ntry:\n    for _ in range(200):\n        if posix.fork() == 0:\n"
                "            import time; time.sleep(3); posix._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
                f"assert n < {sandbox.MAX_PROCESSES}\n")
        flood = "print('x' * (300 * 2**20))\n"  # 300 MB of output: capped, not held
        assert run_as(caller, [probe, bomb, flood], timeout=5) == ["passed", "passed", "failed"]


LINGERERS = {  # each leaves a process behind ("sleep 987.5"), and some never end
    "a child at the timeout": "import posix\nposix.posix_spawn('/bin/sleep', ['sleep', '987.5'], {})\nwhile True:\n"
                              "    pass\n",
    "a double fork": ("import posix, time\nif posix.fork() == 0:\n    if posix.fork() == 0:\n"
                      "        posix.execv('/bin/sleep', ['sleep', '987.5'])\n    posix._exit(0)\ntime.sleep(0.2)\n"),
    "a new session": ("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n"
                      "    posix.execv('/bin/sleep', ['sleep', '987.5'])\ntime.sleep(0.2)\n"),
    "the sample leaves its group": ("import posix\nposix.setpgid(0, 0)\n"
                                    "posix.posix_spawn('/bin/sleep', ['sleep', '987.5'], {})\nwhile True:\n    pass\n"),
    "the sample's own session": ("import posix\nposix.setsid()\n"
                                 "posix.posix_spawn('/bin/sleep', ['sleep', '987.5'], {})\nwhile True:\n    pass\n"),
}


def _lingering():
    """The processes of this host that run `sleep 987.5` or the sandbox's runner."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"987.5" in cmdline or b"runner.py" in cmdline:
            found.append((pid, cmdline))
    return found


@needs_isolation
@pytest.mark.parametrize("caller", CALLERS)
def test_no_process_of_a_sample_outlives_run(caller):
    assert not _lingering()
    for name, program in LINGERERS.items():
        run_as(caller, [program], timeout=0.75)
        assert not _lingering(), name  # checked the moment run() returned: no wait, no retry
