"""The config loader: typos are caught and named, types are checked, configs round-trip."""

import dataclasses
import glob
import json
import os

import pytest

from config import Config, ConfigError, config_to_dict, load_config, save_config, saved_config
from model_config import PRESETS

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def write(tmp_path, text, name="c.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_typo_in_file_names_the_right_key(tmp_path):
    path = write(tmp_path, "model = 'tiny'\nwarmup_step = 10\n")
    with pytest.raises(ConfigError, match=r"'warmup_step'.*c\.py.*did you mean 'warmup_steps'"):
        load_config([path])


def test_typo_on_command_line_names_the_right_key(tmp_path):
    path = write(tmp_path, "model = 'tiny'\n")
    with pytest.raises(ConfigError, match=r"'n_layr'.*command line.*did you mean 'n_layer'"):
        load_config([path, "--n_layr=3"])


def test_int_widens_to_float_and_nothing_else_is_coerced(tmp_path):
    path = write(tmp_path, "model = 'tiny'\n")
    cfg = load_config([path, "--lr=1", "--n_layer=6", "--out_dir=runs/x1"])
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.model.n_layer == 6 and cfg.model.dim == PRESETS["tiny"].dim  # override on top of the preset
    assert cfg.out_dir == "runs/x1"
    with pytest.raises(ConfigError, match=r"n_layer: expected int, got str 'abc'"):
        load_config([path, "--n_layer=abc"])
    with pytest.raises(ConfigError, match=r"n_layer: expected int, got float"):
        load_config([path, "--n_layer=2.5"])
    with pytest.raises(ConfigError, match=r"tie_embeddings: expected bool.*True or False"):
        load_config([path, "--tie_embeddings=1"])
    with pytest.raises(ConfigError, match=r"warmup_steps: expected int, got str"):
        load_config([write(tmp_path, "warmup_steps = '10'\n", "d.py")])


def test_bad_values_and_usage(tmp_path):
    path = write(tmp_path, "model = 'tiny'\n")
    with pytest.raises(ConfigError, match="model='llama'.*'amber_7b'"):
        load_config([path, "--model=llama"])
    with pytest.raises(ConfigError, match="lr_schedule='step'"):
        load_config([path, "--lr_schedule=step"])
    with pytest.raises(ConfigError, match="dim=100 is not divisible by n_head=8"):
        load_config([path, "--dim=100"])
    with pytest.raises(ConfigError, match="--key=value"):
        load_config([path, "--lr", "1e-3"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config([str(tmp_path / "missing.py")])
    with pytest.raises(ConfigError, match="usage"):
        load_config([])


def test_file_runs_in_its_own_namespace(tmp_path):
    path = write(tmp_path, "import math\n_scratch = 3\nlr = math.sqrt(1e-6)\n")
    cfg = load_config([path])
    assert cfg.lr == pytest.approx(1e-3)
    import config

    assert not hasattr(config, "lr") and not hasattr(config, "_scratch")


def test_config_is_frozen_printable_and_round_trips(tmp_path):
    cfg = load_config([os.path.join(CONFIGS, "crystalcoder_7b.py"), "--lr=0.02"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    save_config(cfg, tmp_path / "config.json")
    assert saved_config(json.loads((tmp_path / "config.json").read_text())) == cfg
    assert "mup_width_scale = 0.0625" in "\n".join(f"{k} = {v!r}" for k, v in config_to_dict(cfg).items())


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.py"))), ids=os.path.basename)
def test_shipped_configs_load(path):
    cfg = load_config([path])
    assert isinstance(cfg, Config)
    if "amber_7b" in path:
        assert cfg.model == PRESETS["amber_7b"] and cfg.global_batch_size == 2240 and cfg.n_chunks == 360
    if "crystalcoder_7b" in path:
        assert cfg.model == PRESETS["crystalcoder_7b"] and cfg.lr == 0.012 and cfg.global_batch_size == 2112


@pytest.mark.parametrize("bad", ["--global_batch_size=-8", "--max_steps=-1", "--micro_batch_size=0", "--n_chunks=0",
                                 "--lr=-0.1", "--beta2=1.5", "--epochs=0"])
def test_values_out_of_range_are_refused(bad):
    """A run that would do nothing, or something else than asked, never starts."""
    key = bad[2:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.*must be"):
        load_config([os.path.join(CONFIGS, "tiny.py"), bad])


def test_the_config_reference_lists_every_key_with_its_default():
    """docs/config.md has a row for every field of Config and of ModelConfig, with the
    default the code has (the tiny and amber_7b presets' for model keys), and no other."""
    import re

    from model_config import ModelConfig

    with open(os.path.join(CONFIGS, "..", "docs", "config.md")) as f:
        run_part, model_part = f.read().split("## Model keys")
    run_rows = dict(re.findall(r"^\| `(\w+)` \| (.*?) \|", run_part, re.M))
    model_rows = {k: (a, b) for k, a, b in re.findall(r"^\| `(\w+)` \| (`.*?`) \| (`.*?`) \|", model_part, re.M)}
    cfg = Config()
    shown = {f.name: f"`{getattr(cfg, f.name)!r}`" for f in dataclasses.fields(Config)} | {"model": "`'tiny'`"}
    shown["system_prompt"] = '`"A chat between ..."` (Vicuna v1.1)'  # too long for a table cell
    assert run_rows == shown
    assert model_rows == {f.name: (f"`{getattr(PRESETS['tiny'], f.name)!r}`", f"`{getattr(PRESETS['amber_7b'], f.name)!r}`")
                          for f in dataclasses.fields(ModelConfig)}
    assert cfg.system_prompt.startswith("A chat between") and cfg.model == PRESETS["tiny"]


def test_a_run_saved_by_older_code_still_loads(tmp_path):
    """A key an older version saved and no field has now is dropped when it was empty (it
    changed nothing), and refused when it was set."""
    from config import saved_config

    values = config_to_dict(Config())
    assert saved_config(values | {"nan_test_chunks": []}) == Config()
    with pytest.raises(ConfigError, match="unknown config key 'nan_test_chunks'"):
        saved_config(values | {"nan_test_chunks": [1]})


def test_typed_options_take_any_boolean_spelling_and_refuse_the_rest():
    """--chat=true was ignored (only True worked): every script's options go through one parser."""
    from common import UserError, as_bool, parse_options

    kinds = {"chat": as_bool, "n": int, "t": float}
    assert parse_options(["--chat=true", "--n=3", "--t=0.5"], kinds) == {"chat": True, "n": 3, "t": 0.5}
    assert parse_options(["--chat=False"], kinds) == {"chat": False} and parse_options(["--chat=1"], kinds)["chat"]
    for bad, message in [("--chat=yes please", "expected True or False"), ("--n=2.5", "expected a whole number"),
                         ("--tasks", "options are written --key=value"), ("extra", "bad argument 'extra'"),
                         ("--chta=True", "did you mean 'chat'")]:
        with pytest.raises(UserError, match=message):
            parse_options([bad], kinds)


def test_every_module_name_the_docs_mention_exists():
    """`module.name` (or `module.name()`) in the README and docs/ names something the module
    has; a file name such as `model.safetensors` is not a module's name."""
    import glob
    import importlib
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    files = {"safetensors", "json", "jsonl", "npy", "png", "pt", "csv", "txt", "lock", "tmp", "model", "md", "py"}
    missing = []
    for path in [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md"))):
        for m in re.finditer(r"`([a-z_]+)\.([A-Za-z_]\w*)(\(\))?`", open(path).read()):
            if m[1] in modules and m[2] not in files and not hasattr(importlib.import_module(m[1]), m[2]):
                missing.append(f"{os.path.basename(path)}: {m[0]}`")
    assert not missing, missing


def test_no_line_of_the_modules_is_over_100_characters():
    """The house rule the README states: a line of a module holds at most 100 characters."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wide = [f"{name}:{i}" for name in sorted(os.listdir(root)) if name.endswith(".py")
            for i, line in enumerate(open(os.path.join(root, name)), 1) if len(line.rstrip("\n")) > 100]
    assert not wide, wide
