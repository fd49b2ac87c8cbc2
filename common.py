"""
What every script shares about processes and files: ranks, locks, atomic writes,
hashes, one-line errors and the `--key=value` options.

- Ranks: init_distributed() gives (rank, world size, device) under torchrun or alone;
  print0, barrier and all_reduce_sum do nothing in a single process; rank_token and
  wait_for_ranks let rank 0 wait for the others with no timeout (an evaluation rank may
  be hours behind).
- Files: one writer per folder (hold_lock, a flock the kernel drops when the process
  dies), writes that never leave half a file (atomic_write, write_json_atomic), one
  sha256_file, and `writing` / os_error_line, which turn a full or read-only disk into
  one line that names the path.
- one_line_errors: what every script's main runs in, so that a user's error is one line,
  and so is a SIGINT or SIGTERM (raised as an exception: what is half-written is cleaned up).
- parse_options: the `--key=value` options of evaluate.py, memorize.py, sample.py and
  bench.py (config.py types its own keys on top of it).

Nothing here imports the project.
"""

import contextlib
import difflib
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time



class UserError(ValueError):
    """An error the user can fix (a bad option, a missing file, a folder in use): every
    script prints it as one line, `error: ...`, never as a traceback."""


# -----------------------------------------------------------------------------
# ranks


def _dist():
    """torch.distributed, imported where it is used: data.py's workers never load torch."""
    import torch.distributed

    return torch.distributed


# how long a rank waits in a collective before the job fails, said explicitly: longer than the
# longest work one rank does while the others wait (at 7B: gathering and writing the 27 GB
# model.safetensors at a chunk end, ~1.5 min planned; hashing a 7 GB chunk, seconds), and short
# enough that a hung rank frees 224 GPUs within minutes
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=15)


def init_distributed():
    """(rank, world_size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the
    backend is NCCL on CUDA and gloo on CPU, so every mode runs on a laptop too."""
    import torch

    dist = _dist()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, local_rank = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                                    int(os.environ["LOCAL_RANK"]))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=COLLECTIVE_TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank, world_size, device


def close_distributed():
    dist = sys.modules.get("torch.distributed")  # not loaded: nothing to close
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, rank=0, **kwargs):
    if rank == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(x, world_size):
    if world_size > 1:
        _dist().all_reduce(x, op=_dist().ReduceOp.SUM)
    return x


def barrier(world_size):
    if world_size > 1:
        _dist().barrier()


def broadcast0(value, world_size):
    """Rank 0's value on every rank (any picklable object)."""
    box = [value]
    if world_size > 1:
        _dist().broadcast_object_list(box, src=0)
    return box[0]


def gather(value, world_size):
    """Every rank's value, in rank order, on every rank (any picklable object)."""
    if world_size == 1:
        return [value]
    out = [None] * world_size
    _dist().all_gather_object(out, value)
    return out


def rank_token(world_size):
    """A token from rank 0, the same on every rank; call it when all ranks start a job
    that ends in wait_for_ranks."""
    return broadcast0(os.urandom(8).hex(), world_size)


def wait_for_ranks(folder, token, rank, world_size, poll_s=2.0):
    """Let rank 0 go on once every rank has reached this point, with no timeout: a rank
    of an evaluation may wait hours for the others, and a collective barrier would time
    out (NCCL's default is 10 minutes). Each rank leaves a file holding the job's token;
    rank 0 polls for them, then removes them. Other ranks return at once (torchrun stops
    every rank if one of them fails, so rank 0 never waits for a dead one)."""
    if world_size == 1:
        return
    marks = [os.path.join(folder, f".rank{r}.done") for r in range(world_size)]
    with open(marks[rank], "w") as f:
        f.write(token)
    if rank != 0:
        return

    def done(path):
        with contextlib.suppress(OSError), open(path) as f:
            return f.read() == token
        return False

    while not all(done(p) for p in marks):
        time.sleep(poll_s)
    for p in marks:
        os.remove(p)


# -----------------------------------------------------------------------------
# one writer per folder


_LOCKS = {}  # lock file -> its open descriptor, held for the life of the process


def hold_lock(lock_path, what):
    """One writer at a time: an exclusive flock on lock_path, held until the process ends
    (the kernel lets go when it dies, even by SIGKILL, so no lock goes stale). Another
    holder makes this a one-line UserError naming it (pid, host, start time)."""
    lock_path = os.path.abspath(lock_path)
    if lock_path in _LOCKS:
        return
    import fcntl
    import socket

    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{os.path.dirname(lock_path)} is in use by {holder} ({what}); wait for it "
                        "to end or stop it, then run this again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
              f"{time.strftime('%Y-%m-%dT%H:%M:%S')}".encode(),
              0)
    _LOCKS[lock_path] = fd


def dir_lock(folder):
    """The lock file of a folder that is built elsewhere and renamed into place: a hidden
    sibling, ".NAME.lock"."""
    folder = os.path.abspath(folder.rstrip("/"))
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.lock")


# -----------------------------------------------------------------------------
# files: atomic writes, hashes, one-line OS errors


def atomic_write(path, write):
    """write(tmp) to a temporary name beside path, then one rename: a crash never leaves
    a file at `path` that looks valid and is not."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj, indent=1):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")

    atomic_write(path, write)


def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def read_jsonl(path):
    """The records of a JSON-lines file written by us; [] when there is none."""
    return list(iter_jsonl(path))


def read_json(path, fix="restore it, or remove it and run the command again"):
    """A JSON file: one that is cut short, edited into something else or not UTF-8 is a
    one-line UserError naming it and what to do (`fix`)."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); {fix}") from None


def iter_jsonl(path):
    """The records of a JSON-lines file written by us, one at a time (evals.jsonl at AMBER's
    360 checkpoints, with each row's results, is too large to hold)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def link(src, dst):
    """dst as a hard link to src (a copy where links fail: across filesystems); returns the
    bytes copied."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        # linked before (os.replace onto the same file would leave the temporary link behind)
        return 0
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
        copied = 0
    except OSError:
        shutil.copy2(src, tmp)
        copied = os.path.getsize(src)
    os.replace(tmp, dst)
    return copied


def link_tree(src, dst):
    """Every file under src linked (or copied) to the same place under dst; returns the bytes
    copied."""
    copied = 0
    for folder, _, files in os.walk(src):
        for name in files:
            path = os.path.join(folder, name)
            copied += link(path, os.path.join(dst, os.path.relpath(path, src)))
    return copied


def code_version(*paths):
    """sha256 (16 hex digits) of source files: part of a cached result's key, so that a
    change to the code that computed it computes it again."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def sha256_file(path, bufsize=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def size_text(n):
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


@contextlib.contextmanager
def writing(path):
    """Writes under `path`: an OSError that names no file (a write to a full disk; numpy's
    short write "N requested and M written"), or safetensors' own error for one ("I/O
    error: ... (os error 28)", not an OSError), is raised again as an OSError naming
    `path`, so that the one-line error says where and what is half-written is removed."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        short = e.errno is None and "written" in str(e)
        raise OSError(errno.ENOSPC if short else e.errno, "No space left on device (a short write)"
                      if short else e.strerror or str(e), path) from None
    except Exception as e:
        found = re.search(r"os error (\d+)",
                          str(e)) if type(e).__name__ == "SafetensorError" else None
        if not found:
            raise
        raise OSError(int(found[1]), os.strerror(int(found[1])), path) from None


def os_error_line(e):
    """One line for an OSError met by a script: the path, the reason, and for a full disk
    what is free there. A read-only or full out_dir is the user's to fix, not a traceback."""
    path = e.filename or ""
    line = f"{path}: {e.strerror or e}" if path else str(e)
    if e.errno == errno.ENOSPC and path:
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free / 2**20
        line += f" ({free:,.1f} MiB free on {folder}); free space and run again"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        line += "; give a folder this process can write to"
    return line


class Stopped(BaseException):
    """SIGTERM, raised where the main thread is, as Ctrl-C raises KeyboardInterrupt: every
    `with` and `finally` on the way out runs, so a staging folder or a .tmp file is cleaned
    up and what was committed stays. A BaseException, so no `except Exception` swallows it."""


def _stop(signum, frame):
    raise Stopped()


def worker_signals():
    """For a pool's worker processes (their initializer): the parent handles Ctrl-C and
    SIGTERM and ends its pool; a worker just dies with it, and with a parent killed
    outright too (SIGKILL, the OOM killer), so that no orphan goes on writing while the
    same command, run again, writes the same files."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


def die_with_parent(parent_pid=None):
    """SIGKILL this process when its parent (parent_pid; by default multiprocessing's
    parent) ends: Linux's PR_SET_PDEATHSIG, kept across exec; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent_pid is None:
        parent_pid = (multiprocessing.parent_process().pid if multiprocessing.parent_process()
                      else os.getppid())
    if os.getppid() != parent_pid:  # the parent ended before the call
        os._exit(1)


@contextlib.contextmanager
def one_line_errors():
    """The body of a script's main: an error the user can fix (UserError, a full or
    read-only disk) ends the process with one line, `error: ...`, and exit status 1,
    never a traceback; SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) end it with
    one line saying that the same command goes on, and status 130 or 143. The process
    group, if any, is closed on the way out."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main else None
    try:
        yield
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {os_error_line(e)}")
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError
        line = out_of_memory_line(e)
        if line is None:
            raise
        sys.exit(f"error: {line}")
    except (KeyboardInterrupt, Stopped) as e:
        name, status = ("SIGINT", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
        print(f"stopped by {name}: what was finished is kept (written whole, or not at all); run "
              "the same command to go on", file=sys.stderr, flush=True)
        sys.exit(status)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        close_distributed()


def out_of_memory_line(e):
    """One line for a failed allocation (host or GPU), with the size it asked for; None for
    another error."""
    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    asked = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B|[0-9]+ bytes)", text)
    return (f"out of memory{f' allocating {asked[1]}' if asked else ''}: lower micro_batch_size, "
            "or see what a config needs on each device with --dry_run=True")


# -----------------------------------------------------------------------------
# --key=value options


def as_bool(text):
    """The booleans of --key=value options: True / False in any case, or 1 / 0."""
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(text)
    return value


as_bool.what = "True or False"


def parse_options(args, known=None, error=UserError):
    """['--a=1', '--b=x'] -> {'a': '1', 'b': 'x'}. Anything not written --key=value, or a key
    not in `known` (when given), is an `error` naming the closest known key. When `known`
    is a dict of converters (int, float, as_bool, ...), values come back converted, and
    one that does not convert is an `error` saying what was expected."""
    out = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise error(f"bad argument {arg!r}: options are written --key=value")
        key, value = arg[2:].split("=", 1)
        if known is not None and key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
            hint = (f"; did you mean {close[0]!r}?" if close
                    else f"; known: {', '.join(sorted(known))}")
            raise error(f"unknown option {key!r}{hint}")
        out[key] = value
        if isinstance(known, dict):
            try:
                out[key] = known[key](value)
            except ValueError:
                what = getattr(known[key], "what",
                               {int: "a whole number", float: "a number"}.get(known[key], "?"))
                raise error(f"--{key}={value!r}: expected {what}") from None
    return out
