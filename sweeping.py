"""
What evaluate.py and memorize.py share as they sweep a run's checkpoints: the
checkpoints a command names (an unknown name is refused with the ones there are),
whether decoding is compiled, and the key under which a cached result is reused.
"""

import functools
import hashlib
import json
import os

from common import code_version

# decoding steps per checkpoint from which compile="auto" compiles the step
COMPILE_MIN_STEPS = 10_000


def pick(run_dir, names, wanted, error):
    """The names of `names` (a run's checkpoints, in order) that `wanted` lists, all when it
    is empty; a name that is not there is `error`, naming the ones there are."""
    unknown = sorted(set(wanted or ()) - set(names))
    if unknown:
        raise error(f"{run_dir} has no checkpoint {', '.join(unknown)}; it has {', '.join(names)}")
    return [n for n in names if not wanted or n in wanted]


def compile_decoding(compile, steps):
    """compile: True, False, or "auto": compile the decoding step when it runs `steps` steps
    or more (a compile takes seconds to a minute; CUDA graphs on a GPU)."""
    return steps >= COMPILE_MIN_STEPS if compile == "auto" else bool(compile)


@functools.cache
def code_hash(*paths):
    """sha256 (16 hex digits) of the code files that compute a result, read once a process."""
    return code_version(*paths)


def result_key(parts, *code):
    """16 hex digits of what a result depends on ({name: value}) and of the code files that
    compute it: a result is reused only when all of them are equal, so a change to that
    code scores again (results of older code stay on disk, unused)."""
    blob = json.dumps(parts | {"code": code_hash(*map(os.path.abspath, code))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
