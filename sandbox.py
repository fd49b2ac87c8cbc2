"""
Generated code (HumanEval, MBPP) run without trusting it: run(program) says "passed",
"failed" or "timeout".

Where Linux namespaces work here (isolation() is None), a sample runs:
- as an unprivileged user, inside and outside: uid 1000 of a user namespace of its own,
  which is the caller's uid on the host, or `nobody` (65534) when the caller is root (as
  in containers and CI); with no capability, and no further user namespace allowed;
- in its own PID, network, mount, UTS and IPC namespaces: no network, no other process in
  sight, a hostname of its own;
- on read-only file systems, /proc included, with the project and home folders hidden;
  its folder is a tmpfs of BOX_MB, the one place it may write;
- under limits on memory, CPU time, file size and processes (MAX_PROCESSES);
- and when run() returns, no process of it is left: the namespace's first process is the
  sandbox's shell, never the sample; when that shell ends or is killed, the kernel kills
  every process in the namespace, and unshare exits only after the last of them.
Everywhere: an empty environment, a guard that disables the process and file-removal
calls (it stops accidents; a hostile sample gets past it, and the namespaces hold), and a
token the sample must print last, so that leaving early fails.

Not covered: a kernel exploit; files that every user may read (and, when an ordinary
user runs it, that user's files outside the hidden folders: read-only, but readable);
timing side channels. Without namespaces run() refuses, unless allow_unisolated
(evaluate.py's --allow_code_execution=True): then only the limits and the guard hold.
"""

import contextlib
import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

from common import UserError

BOX_MB = 16  # what a sample may write, in all
MAX_PROCESSES = 32  # processes a sample may have at once, beside what its host uid already runs
NOBODY = 65534  # the host uid and gid of a sample when the caller is root
SETUP_FAILED = 97  # the exit status of the setup shell when the sandbox could not be built


class SandboxError(UserError):
    pass


# runs before the sample in the child process: no processes, no shell, no deleting files
_GUARD = """
import builtins, os, shutil, subprocess, sys
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp",
              "spawnl", "spawnv", "remove", "unlink", "rmdir", "removedirs", "rename", "replace",
              "putenv", "chmod"):
    setattr(os, _name, None)
shutil.rmtree = shutil.move = None
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = None
"""

# the child's entry point: it takes a token from stdin before the sample exists, runs the
# sample and its tests, and prints the token only if they ran to their end
_RUNNER = """
import sys


def main():
    token = sys.stdin.readline().strip()
    sys.stdin.close()
    with open("sample.py") as f:
        source = f.read()
    try:
        exec(compile(source, "sample.py", "exec"), {"__name__": "__main__"})
    except BaseException:  # an assert, an error, or an exit before the tests' end
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        import os

        os._exit(1)
    sys.stdout.write("\\n" + token + "\\n")
    sys.stdout.flush()


main()
"""

# The first process of the new namespaces (PID 1), as their root (the caller, or real root):
# the project and home folders hidden (unwritable tmpfs), the sample's folder a tmpfs of
# BOX_MB, /dev/shm and /dev/mqueue private and tiny, every other mount read-only, checked.
# Then the sample starts as its child, never as PID 1: as nobody when root ($DROP), in a user
# namespace of its own where it is uid 1000, that namespace's /proc mount read-only and its
# count of further user namespaces 0; without a capability, so no mount can be undone.
_SETUP = r"""
dir="$1"; shift
i=0
for keep in $KEEP; do  # the Python installation, when it lives inside a hidden folder
  mkdir "$dir/.keep$i" && mount --bind "$keep" "$dir/.keep$i" || exit 97; i=$((i + 1))
done
for hide in "$@"; do mount -t tmpfs -o size=64k,mode=0555 tmpfs "$hide" || exit 97; done
i=0
for keep in $KEEP; do
  mkdir -p "$keep" 2>/dev/null; mount --bind "$dir/.keep$i" "$keep" || exit 97
  umount "$dir/.keep$i"; rmdir "$dir/.keep$i"; i=$((i + 1))
done
mount -t tmpfs -o "size=${BOX_MB}m,mode=0700" tmpfs "$dir/w" || exit 97
cp "$dir/sample.py" "$dir/runner.py" "$dir/w/" && chown -R "$OWNER" "$dir/w" || exit 97
for shm in /dev/shm /dev/mqueue; do
  if [ -d "$shm" ]; then mount -t tmpfs -o size=64k,mode=0700 tmpfs "$shm" || exit 97; fi
done
# the mounts that stay writable: the sample's folder, the private tmpfs, /proc (read-only below)
writable() {
  case "$1" in "$dir/w"|/dev/shm|/dev/mqueue|/proc) return 0;; esac; return 1
}
top() {  # each mount point's topmost mount (a later line covers an earlier one): "point options"
  awk '{ top[$5] = $6 } END { for (m in top) print m, top[m] }' /proc/self/mountinfo
}
while read -r _ _ _ _ mp _; do
  writable "$mp" || mount -o remount,bind,ro "$mp" 2>/dev/null
done < /proc/self/mountinfo
# a mount that refuses to be read-only is covered by an empty read-only tmpfs
top | while read -r mp opts; do
  if ! writable "$mp" && [ "$mp" != / ]; then
    case "$opts" in rw*) mount -t tmpfs -o ro,size=4k tmpfs "$mp" 2>/dev/null;; esac
  fi
done
top | while read -r mp opts; do  # what could not be made read-only stops the run
  writable "$mp" && continue
  case "$opts" in rw*) echo "sandbox: $mp stays writable" >&2; exit 97;; esac
done || exit 97
cd "$dir/w" || exit 97
$DROP unshare --user --map-user=1000 --map-group=1000 --keep-caps --mount sh -c '
  echo 0 > /proc/sys/user/max_user_namespaces && mount -o remount,bind,ro /proc || exit 97
  exec setpriv --bounding-set=-all --inh-caps=-all --ambient-caps=-all --no-new-privs \
    "$PYTHON" -I -S runner.py'
"""
_NAMESPACES = ["--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--net", "--uts",
               "--ipc"]


def _command(box):
    """The command and environment that start `box`/runner.py in the namespaces."""
    python = os.path.realpath(sys.executable)
    here = os.path.dirname(os.path.abspath(__file__))
    hide = sorted(d for d in {here, os.path.expanduser("~"), "/root", "/home"}
                  if os.path.isdir(d) and not box.startswith(d + os.sep) and " " not in d)
    install = os.path.realpath(sys.base_prefix)
    keep = {install} if any(install.startswith(d + os.sep) for d in hide) else set()
    root = os.geteuid() == 0
    env = {"PATH": "/usr/bin:/bin", "PYTHON": python, "BOX_MB": str(BOX_MB),
           "KEEP": " ".join(sorted(keep)), "OWNER": f"{NOBODY}:{NOBODY}" if root else "0:0",
           "DROP": f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups" if root else ""}
    user = [] if root else ["--user", "--map-root-user"]  # root needs no user namespace to mount
    return ["unshare"] + user + _NAMESPACES + ["sh", "-c", _SETUP, "sh", box] + hide, env


def _stop(proc, isolated):
    """Kill what is left of the sample; return once none of it exists. Isolated, that is
    the namespace's first process (unshare's child): the kernel then kills the rest of the
    namespace, and unshare, waiting for that process, exits after the last of them."""
    if isolated and proc.poll() is None:
        with contextlib.suppress(OSError):
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                for pid in f.read().split():
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _launch(program, timeout, memory_mb, output_limit, isolated):
    """(result, the last line the sandbox wrote to stderr)."""
    uid = NOBODY if isolated and os.geteuid() == 0 else os.getuid()
    nproc = _processes_of(uid) + MAX_PROCESSES

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_limit, output_limit))
        # the kernel holds root to it only as nobody
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(dir="/tmp") as folder, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        box = os.path.join(folder, "box")
        os.makedirs(os.path.join(box, "w"))  # the sample's folder, a tmpfs once isolated
        # a path the sample (nobody, when root runs this) can walk, not list
        for path in (folder, box):
            os.chmod(path, 0o711)
        with open(os.path.join(box, "sample.py"), "w") as f:
            f.write(_GUARD + "\n" + program)
        with open(os.path.join(box, "runner.py"), "w") as f:
            f.write(_RUNNER)
        cmd, env = _command(box) if isolated else ([sys.executable, "-I", "-S", "runner.py"], {})
        proc = subprocess.Popen(cmd, cwd=box, env=env, stdin=subprocess.PIPE, stdout=out,
                                stderr=err, preexec_fn=limits, start_new_session=True)
        try:
            proc.communicate((token + "\n").encode(), timeout=timeout)
            result = "passed" if proc.returncode == 0 and _last_line(out) == token else "failed"
        except subprocess.TimeoutExpired:
            result = "timeout"
        finally:
            _stop(proc, isolated)
        if isolated and proc.returncode == SETUP_FAILED:
            result = "setup failed"
        return result, _last_line(err)


def _last_line(f):
    f.seek(max(0, f.seek(0, 2) - 4096))
    return f.read().decode(errors="replace").rstrip("\n").rsplit("\n", 1)[-1]


def _processes_of(uid):
    """How many processes `uid` has now (RLIMIT_NPROC counts them all, not the sample's only)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as f:
                n += any(line.startswith("Uid:") and line.split()[1] == str(uid) for line in f)
    return n


@functools.cache
def isolation():
    """None if generated code runs isolated here (a trivial sample passes in the sandbox),
    else the reason it cannot, in one line."""
    for tool in ("unshare", "setpriv"):
        if not shutil.which(tool):
            return f"{tool} (util-linux) not found"
    try:
        result, err = _launch("pass\n", timeout=20, memory_mb=512, output_limit=2**20,
                              isolated=True)
    except OSError as e:
        return str(e)
    return None if result == "passed" else (err or f"a trivial sample: {result}")


def run(program, timeout=10.0, memory_mb=512, allow_unisolated=False, output_limit=10 * 2**20):
    """Run generated Python `program` with its tests: "passed", "failed" or "timeout".
    Isolated as the module's docstring says; without isolation only if allow_unisolated."""
    reason = isolation()
    if reason and not allow_unisolated:
        raise SandboxError("HumanEval / MBPP run generated code, and this machine cannot isolate "
                           f"it ({reason}); rerun with --allow_code_execution=True to run it with "
                           "resource limits and a guard only: no protection of the network, the "
                           "file system or other processes")
    result, _ = _launch(program, timeout, memory_mb, output_limit, isolated=reason is None)
    if result == "setup failed":
        raise SandboxError("the sandbox could not be set up (a mount could not be made read-only, "
                           "or a tmpfs not mounted); nothing was run. See sandbox._SETUP")
    return result
