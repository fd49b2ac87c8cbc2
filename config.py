"""
The run's config: one frozen dataclass for every script, and one loader.

A config file is a plain Python file of assignments (see configs/). Every script
takes `CONFIG [--key=value ...]`:

    python train.py configs/tiny.py --lr=1e-3 --n_layer=6

The file runs in a namespace of its own (never in our globals). Every key, from
the file or the command line, must name a field of Config or of model_config.ModelConfig
(those override the preset named by `model`); an unknown key is an error that names
the closest valid one. Types are checked: an int widens to a float, nothing else is
converted. The result is frozen, prints as `key = value` lines, and round-trips
through JSON so that it is saved with every run.
"""

import ast
import difflib
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace

from common import UserError, parse_options, write_json_atomic
from model_config import PRESETS, ModelConfig


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class Config:
    # model: a preset name of model_config.PRESETS; any ModelConfig field given as a key overrides
    # it
    model: ModelConfig = PRESETS["tiny"]
    # data (data.py): the mix, {source name: source spec}, see prepare.py for a spec's keys
    sources: dict = field(default_factory=dict)
    # "train" (SentencePiece BPE on the sources) | a .model path | "tiktoken:NAME"
    tokenizer: str = "train"
    val_fraction: float = 0.01  # share of each source's documents held out for validation
    data_dir: str = "data/tiny"  # where prepare.py writes the tokenizer, manifest and chunks
    # train.py: data dirs trained one after the other (CrystalCoder); (): data_dir
    stages: tuple[str, ...] = ()
    seq_len: int = 256  # tokens per training sequence (chunks store seq_len + 1)
    n_chunks: int = 8  # the training data is split into this many chunks, one checkpoint each
    seed: int = 1337  # data shuffle, order inside a chunk, and init
    num_workers: int = 0  # tokenizer processes; 0 means one per CPU core
    # run (train.py): checkpoints after every chunk, metrics, the ledger of events
    out_dir: str = "runs/tiny"
    # optimizer steps between rolling mid-chunk checkpoints; 0: after each chunk only
    ckpt_interval: int = 0
    # extra permanent checkpoints ckpt_stepSSSSSS at these steps, or "log": 0 (the
    # initialization), 1, 2, 4, ..., 512, Pythia's early checkpoints
    ckpt_steps: tuple[int, ...] | str = ()
    val_interval: int = 0  # optimizer steps between validation losses; 0: at every checkpoint only
    val_sequences: int = 64  # held-out sequences per validation (the first ones of the val split)
    # every this many optimizer steps, each layer's gradient, update and weight norms go to
    # metrics.jsonl (grad_norm/layer.3, ...); 0: never
    layer_stats_interval: int = 0
    # non-finite loss or grad norm: "skip_chunk" (roll back, skip, replace) | "stop"
    nan_policy: str = "skip_chunk"
    # optimizer steps (numbered as in metrics.jsonl) whose batch is read and not trained on, the
    # LR schedule going on: a branch that skips a spike's step (spikes.py); () skips none
    skip_steps: tuple[int, ...] = ()
    # stop (with a checkpoint) after this many optimizer steps; 0: run the whole schedule
    max_steps: int = 0
    # start a new run from another run's checkpoint (weights and AdamW state), new data
    init_from: str = ""
    # init_from also takes the AdamW state (False: weights only, as fine-tuning does)
    init_optimizer: bool = True
    # continue another run's schedule from its checkpoint in a new out_dir (branch.py)
    branch_from: str = ""
    # post-training (finetune.py): the objective, the data, the template
    # "lm": next-token loss on the counted targets | "dpo": DPO on (chosen, rejected) pairs
    objective: str = "lm"
    dpo_beta: float = 0.1  # DPO's beta (AmberSafe: 0.1)
    finetune_data: str = ""  # conversations or pairs (.json, .jsonl, .parquet), or "builtin:stdlib"
    epochs: int = 1  # passes over the fine-tuning data, one chunk (and one checkpoint) each
    system_prompt: str = ("A chat between a curious user and an artificial intelligence assistant. "
                          # Vicuna v1.1
                          "The assistant gives helpful, detailed, and polite answers to the user's "
                          "questions.")
    # also log to this Weights & Biases project (needs wandb); a resume logs on into its W&B run
    wandb_project: str = ""
    # per device, for MFU; 0: a known GPU's bf16 peak, or the measured float32 matmul rate
    peak_flops: float = 0.0
    dry_run: bool = False  # print the plan (memory, steps, time) without allocating the model
    # for the plan when the data dir is not prepared (AMBER: 1,706,976)
    dry_run_sequences_per_chunk: int = 0
    # devices for the plan; 0: one micro-batch per device, no accumulation
    dry_run_world_size: int = 0
    plan_gpu: str = "A100"  # the GPU the plan is for (its bf16 peak: machine.GPU_BF16_PEAK)
    # its memory in GiB: the dry run refuses a plan that needs more than 90%
    plan_gpu_memory_gb: float = 80.0
    # seconds from the stop signal to SIGKILL (torchrun, SLURM's KillWait; SLURM's USR1 warning)
    stop_grace_s: float = 30.0
    # batch: sequences per optimizer step over all ranks, and per forward pass on one rank;
    # gradient accumulation = global_batch_size / (micro_batch_size * world size)
    global_batch_size: int = 32
    micro_batch_size: int = 8
    # optimizer: AdamW
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # "cosine" | "linear" decay to min_lr after warmup
    # the LR schedule's length in optimizer steps; 0: the planned chunks' (a branch: its parent's)
    lr_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # on the global gradient norm; 0 disables
    # system
    # "auto": bf16 autocast on GPUs that have it and on CPUs whose bf16 matmul measures
    dtype: str = "auto"
    #                      1.5x float32 (Intel AMX), else float32 (train.choose_dtype) | "float32" |
    # "bfloat16"
    parallel: str = "ddp"  # "ddp" | "fsdp" when launched with torchrun
    # one CPU thread, torch's deterministic algorithms (+ cuBLAS's workspace on GPUs)
    deterministic: bool = False
    # torch.compile each block (one compile for all; ~10 s on a CPU, 1.18x the tiny step there)
    compile: bool = False
    # recompute each block in the backward pass: less memory, ~1/3 more compute
    activation_checkpointing: bool = False

    def __post_init__(self):
        choices = {"lr_schedule": ("cosine", "linear"), "dtype": ("auto", "float32", "bfloat16"),
                   "parallel": ("ddp", "fsdp"), "nan_policy": ("skip_chunk", "stop"),
                   "objective": ("lm", "dpo"), "plan_gpu": ("A100", "H100", "H100 PCIe", "H100 NVL",
                                                            "H200", "L40S", "L4", "A10G")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}: must be one of "
                                  f"{', '.join(map(repr, allowed))}")
        try:  # sources are saved with every run: plain JSON only (tuples become lists)
            object.__setattr__(self, "sources", json.loads(json.dumps(self.sources)))
        except TypeError as e:
            raise ConfigError("sources: must hold only str, numbers, lists and dicts "
                              f"({e})") from None
        if isinstance(self.ckpt_steps, str) and self.ckpt_steps != "log":
            raise ConfigError(f"ckpt_steps={self.ckpt_steps!r}: give a list of steps, or 'log'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        # key: (lowest allowed, what it means): a run that would silently do nothing is refused
        ranges = {
            "seq_len": (1, "tokens per sequence"), "n_chunks": (1, "chunks"),
            "global_batch_size": (1, "sequences"), "micro_batch_size": (1, "sequences"),
            "epochs": (1, "passes"), "val_sequences": (0, "sequences"),
            "max_steps": (0, "steps (0: no limit)"),
            "lr_steps": (0, "steps (0: the planned chunks')"),
            "ckpt_interval": (0, "steps (0: per chunk only)"),
            "layer_stats_interval": (0, "steps (0: off)"),
            "val_interval": (0, "steps (0: per chunk only)"), "warmup_steps": (0, "steps"),
            "num_workers": (0, "processes (0: one per core)"), "lr": (0.0, "learning rate"),
            "min_lr": (0.0, "learning rate"), "weight_decay": (0.0, "decay"),
            "grad_clip": (0.0, "norm (0: off)"), "eps": (0.0, "epsilon"), "dpo_beta": (0.0, "beta"),
            "peak_flops": (0.0, "FLOP/s (0: measured)"), "plan_gpu_memory_gb": (0.0, "GiB"),
            "stop_grace_s": (0.0, "seconds")}
        for key, (low, what) in ranges.items():
            if getattr(self, key) < low:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= {low} ({what})")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2}: each must be in [0, 1)")
        if self.branch_from and self.init_from:
            raise ConfigError("branch_from and init_from: give one (a branch continues the "
                              "parent's schedule, init_from starts a new one)")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} is longer than the model's max_seq_len="
                              f"{self.model.max_seq_len}; raise max_seq_len or lower seq_len")


RUN_KEYS = {f.name: f for f in fields(Config) if f.name != "model"}
MODEL_KEYS = {f.name: f for f in fields(ModelConfig)}
assert not set(RUN_KEYS) & set(MODEL_KEYS), "Config and ModelConfig must not share a key name"


# -----------------------------------------------------------------------------
# type checking


def _type_name(t):
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _check(key, value, annotation):
    """Return value if it fits annotation (an int widens to a float), else raise ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(key, value, arg)
            except ConfigError:
                pass
    elif annotation is type(None):
        if value is None:
            return value
    elif origin is tuple:
        if isinstance(value, (tuple, list)):
            elem = args[0] if args else typing.Any
            return tuple(_check(key, v, elem) for v in value)
    elif annotation is typing.Any:
        return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    hint = " (write True or False)" if annotation is bool else ""
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {type(value).__name__} "
                      f"{value!r}{hint}")


def _unknown(key, where):
    valid = ["model", *RUN_KEYS, *MODEL_KEYS]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = (f"; did you mean {close[0]!r}?" if close else "; see config.py and "
            "model_config.ModelConfig for valid keys")
    return ConfigError(f"unknown config key {key!r} {where}{hint}")


# -----------------------------------------------------------------------------
# building a Config


def config_from_dict(values, where="", base=None):
    """A Config from {key: value}: keys checked and typed, model keys override the preset."""
    base = base or Config()
    run, model = {}, {}
    preset = values.get("model")
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"model={preset!r} {where}: must be one of "
                              f"{', '.join(map(repr, PRESETS))}")
    for key, value in values.items():
        if key == "model":
            continue
        if key in RUN_KEYS:
            run[key] = _check(key, value, RUN_KEYS[key].type)
        elif key in MODEL_KEYS:
            model[key] = _check(key, value, MODEL_KEYS[key].type)
        else:
            raise _unknown(key, where)
    try:
        model_cfg = replace(PRESETS[preset] if preset else base.model, **model)
    except ValueError as e:
        raise ConfigError(f"{e} {where}") from None
    return replace(base, model=model_cfg, **run)


def parse_overrides(args):
    """['--lr=1e-3', '--out_dir=runs/x'] -> {'lr': 0.001, 'out_dir': 'runs/x'}."""
    out = {}
    for key, raw in parse_options(args, error=ConfigError).items():
        annotation = (RUN_KEYS[key].type if key in RUN_KEYS else MODEL_KEYS[key].type
                      if key in MODEL_KEYS else None)
        if annotation is str or key == "model":
            out[key] = raw  # paths and names need no quotes
            continue
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw  # left as text; the type check says what was expected
    return out


def read_config_file(path):
    """The assignments of a config file, run in a namespace of its own."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    namespace = {"__file__": path, "__name__": "__config__"}
    try:
        # a config file is Python: loading it runs it
        exec(compile(source, path, "exec"), namespace)
    # noqa: BLE001 -- whatever the user's file raises, name the file and line
    except Exception as e:
        import traceback

        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        if isinstance(e, SyntaxError):
            line = e.lineno
        else:
            line = lines[-1] if lines else "?"
        raise ConfigError(f"{path}:{line}: the config file raised {type(e).__name__}: "
                          f"{e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith("_")
            and not isinstance(v, types.ModuleType)}


def load_config(argv):
    """argv = [CONFIG, --key=value, ...] -> a frozen Config."""
    if not argv or argv[0].startswith("--"):
        raise ConfigError("usage: SCRIPT CONFIG [--key=value ...], e.g. configs/tiny.py")
    path, overrides = argv[0], argv[1:]
    cfg = config_from_dict(read_config_file(path), where=f"in {path}")
    return config_from_dict(parse_overrides(overrides), where="on the command line", base=cfg)


# -----------------------------------------------------------------------------
# printing and saving


def config_to_dict(cfg):
    """Flat {key: value}, every model field spelled out, so that config_from_dict reloads it."""
    out = {k: getattr(cfg, k) for k in RUN_KEYS}
    out.update(asdict(cfg.model))
    return out


def format_config(cfg):
    return "\n".join(f"{k} = {v!r}" for k, v in config_to_dict(cfg).items())


def save_config(cfg, path):
    write_json_atomic(path, config_to_dict(cfg), indent=2)


def saved_config(values, where=""):
    """The Config a run saved (config.json, a checkpoint's state.json), by this code or an
    older one: a key that no field has now is dropped when its value is empty (0, False,
    "", []: it changed nothing then), and refused otherwise."""
    known = {"model", *RUN_KEYS, *MODEL_KEYS}
    return config_from_dict({k: v for k, v in values.items() if k in known or v}, where=where)

