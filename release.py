"""
A run as a release: one folder to upload, laid out as LLM360 released AMBER, with a
model card that links every part of it.

    python release.py RUN_DIR [OUT_DIR]        default OUT_DIR: RUN_DIR/release
    python release.py export CKPT_DIR OUT_DIR  one checkpoint as a Hugging Face folder

    OUT_DIR/
        README.md                 the model card, generated: the paper's Table 1 and Table 2 for
                                  this run, final metrics and evaluations, memorization, figures
        config.json, model.safetensors, tokenizer.*, generation_config.json
                                  the final checkpoint: from_pretrained(OUT_DIR) loads it
        checkpoints/ckpt_NNN/     every checkpoint as a Hugging Face folder (export, below)
        optimizer/ckpt_NNN/       its AdamW state, RNG states and state.json: a run resumes
                                  from here
        data/                     manifest.json, tokenizer.model and every chunk of training
                                  sequences
        logs/                     config.py (train.py takes it as it is), run.json, metrics.jsonl,
                                  ledger.jsonl, training.png
        evals/, memorization/     what evaluate.py and memorize.py wrote into the run
        dynamics/                 dynamics.csv and spikes.csv with their figures
        release.json              what each checkpoint folder was exported from

Everything but the exported weights is a hard link to the run's file where the
filesystem allows (a copy otherwise): AMBER's 360 optimizer states (54 GB each) and
2.5 TB of chunks are not written twice. Identical tokenizer files are one file linked
into every checkpoint, and the top-level final model is linked, not copied. Rerun it
after new checkpoints, evaluations or memorization results: only new or changed
checkpoints are exported, and everything else, the card included, is refreshed.
"""

import glob
import json
import os
import re
import shutil
import sys

import torch

import checkpoint
import data
import hf_format
import runlog
from common import (UserError, hold_lock, iter_jsonl, link, link_tree, one_line_errors, read_json,
                    sha256_file, write_json_atomic, write_text_atomic, writing)
from config import format_config, saved_config
from model import Transformer
from model_config import hf_config

CARD_FIGURES = [("logs/training.png", "training"), ("evals/evals.png", "evaluations over training"),
                ("evals/emergence.png", "items learned over training (emergence.py)"),
                ("dynamics/dynamics.png", "the weights over the checkpoints (dynamics.py)"),
                ("dynamics/spikes.png", "loss spikes (spikes.py)"),
                ("memorization/*/scores.png", "memorization scores"),
                ("memorization/*/matrix.png", "memorization by chunk")]


class ReleaseError(UserError):
    pass


def release(run_dir, out_dir=None):
    """Write or refresh the release of run_dir; returns its folder."""
    out_dir = out_dir or os.path.join(run_dir, "release")
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise ReleaseError(f"{run_dir} is not a run dir (no metrics.jsonl); give the out_dir of a "
                           "train.py run")
    check_out_dir(run_dir, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # two releases into one folder wait
    hold_lock(os.path.join(out_dir, ".release.lock"), "a release.py run")
    ckpts = [os.path.join(run_dir, n) for n in checkpoint.checkpoint_names(run_dir)
             if checkpoint.kind(os.path.join(run_dir, n)) == "ours"]
    if not ckpts:
        raise ReleaseError(f"{run_dir} holds no checkpoints (ckpt_NNN folders); train first")
    last_state = checkpoint.read_state(ckpts[-1])
    if last_state is None:
        raise ReleaseError(f"{ckpts[-1]}/state.json is missing or not valid JSON; python train.py "
                           f"verify {run_dir}")
    cfg = saved_config(last_state["config"])
    try:
        hf_config(cfg.model)
        hf_reason = None
    except ValueError as e:
        hf_reason = str(e)
    index_path = os.path.join(out_dir, "release.json")
    index = {"checkpoints": {}}
    if os.path.exists(index_path):
        index = read_json(index_path, "release into a new folder")
    index["run_dir"] = os.path.realpath(run_dir)  # which run this folder is a release of
    gone = sorted(set(index["checkpoints"]) - {os.path.basename(p) for p in ckpts})
    if gone:  # the release may hold the last copy of them: refused, not deleted
        raise ReleaseError(f"{out_dir} holds {', '.join(gone)}, which {run_dir} no longer has "
                           "(moved aside, or deleted?); a release mirrors its run: restore them in "
                           "the run, or release into a new folder. Nothing was changed")
    copied = 0

    # every checkpoint: a Hugging Face folder (exported once), its optimizer state (linked)
    shared = {}  # tokenizer file name -> the first exported copy, linked into the others
    for path in ckpts:
        name = os.path.basename(path)
        dst = os.path.join(out_dir, "checkpoints", name)
        weights = os.stat(os.path.join(path, "model.safetensors"))  # cheap: no 27 GB hash per rerun
        state_sha = sha256_file(os.path.join(path, "state.json"))
        source = f"{state_sha[:16]}-{weights.st_size}-{weights.st_mtime_ns}"
        if index["checkpoints"].get(name, {}).get("source") != source or not os.path.exists(
                os.path.join(dst, "config.json")):
            # every file against the sha256 written with it
            problems = checkpoint.verify_checkpoint(path)
            if problems:
                raise ReleaseError(f"{path} is damaged ({'; '.join(problems)}); nothing of it was "
                                   "released. Move it aside, or retrain it: a resume from the "
                                   "checkpoint before it rewrites it")
            if hf_reason:  # our own format: optimizer/NAME holds the whole checkpoint
                copied += link(os.path.join(path, "model.safetensors"),
                               os.path.join(dst, "model.safetensors"))
            else:
                export(path, dst)
            with open(os.path.join(path, "state.json")) as f:
                state = json.load(f)
            index["checkpoints"][name] = {"source": source, "step": state["step"],
                                          "tokens": state["tokens"],
                                          "chunks_trained": state["schedule"][: state["pos"]]}
            write_json_atomic(index_path, index)
        for tok_file in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json"):
            f = os.path.join(dst, tok_file)
            if not os.path.exists(f):
                continue
            if tok_file not in shared:
                shared[tok_file] = f
            elif not os.path.samefile(f, shared[tok_file]) \
                    and open(f, "rb").read() == open(shared[tok_file], "rb").read():
                link(shared[tok_file], f)
        copied += link_tree(path, os.path.join(out_dir, "optimizer", name))
    if not hf_reason:  # the final checkpoint at the top level, linked
        final = os.path.join(out_dir, "checkpoints", os.path.basename(ckpts[-1]))
        for f in os.listdir(final):
            link(os.path.join(final, f), os.path.join(out_dir, f))

    # the data: manifests, tokenizers and chunks of every stage, linked
    dirs = data.stage_dirs(last_state["config"])
    data_dsts = [os.path.join(out_dir, "data")] if len(dirs) == 1 else [
        os.path.join(out_dir, "data", f"stage_{i}_{os.path.basename(os.path.normpath(d))}")
        for i, d in enumerate(dirs)]
    manifests = []
    for d, dd in zip(dirs, data_dsts):
        manifest = data.load_manifest(d)
        manifests.append(manifest)
        entries = manifest["chunks"] + ([manifest["val"]] if manifest.get("val") else [])
        files = ["manifest.json"] + ([manifest["tokenizer"]["file"]]
                                     if manifest["tokenizer"].get("file") else [])
        files += [e[k] for e in entries for k in ("file", "sources_file")]
        for f in files:
            copied += link(os.path.join(d, f), os.path.join(dd, f))

    # logs, evaluations, memorization
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    write_text_atomic(os.path.join(logs, "config.py"),
                      "# the resolved config of this run: python train.py logs/config.py\n"
                      + format_config(cfg) + "\n")
    for f in ("run.json", "metrics.jsonl", "ledger.jsonl", "training.png", "config.json"):
        if os.path.exists(os.path.join(run_dir, f)):
            copied += link(os.path.join(run_dir, f), os.path.join(logs, f))
    for f in ("evals.jsonl", "evals.csv", "evals.png", "contamination.csv",
              "contamination_rows.jsonl", "emergence.csv", "emergence.png", "bold.csv"):
        if os.path.exists(os.path.join(run_dir, f)):
            copied += link(os.path.join(run_dir, f), os.path.join(out_dir, "evals", f))
    for f in ("dynamics.csv", "dynamics.png", "spikes.csv", "spikes.png"):
        if os.path.exists(os.path.join(run_dir, f)):
            copied += link(os.path.join(run_dir, f), os.path.join(out_dir, "dynamics", f))
    if os.path.isdir(os.path.join(run_dir, "memorization")):
        copied += link_tree(os.path.join(run_dir, "memorization"),
                            os.path.join(out_dir, "memorization"))

    card = model_card(run_dir, out_dir, cfg, last_state, manifests=manifests, data_dsts=data_dsts,
                      index=index, hf_reason=hf_reason)
    write_text_atomic(os.path.join(out_dir, "README.md"), card)
    print(f"released {len(ckpts)} checkpoints of {run_dir} to {out_dir} ({copied / 1e6:.1f} MB "
          "copied where hard links were not possible)")
    return out_dir


def check_out_dir(run_dir, out_dir):
    """A release writes only into its own folder: not the run dir, nor a folder inside it but
    the default RUN_DIR/release, nor one that holds anything but a release of this run."""
    run, out = os.path.realpath(run_dir), os.path.realpath(out_dir)
    if out == run or run.startswith(out + os.sep):
        raise ReleaseError(f"{out_dir} is the run dir or holds it; give a folder of its own for "
                           "the release")
    if out.startswith(run + os.sep) and out != os.path.join(run, "release"):
        raise ReleaseError(f"{out_dir} is inside the run dir; give a folder outside it (or none: "
                           f"{run_dir}/release)")
    if not os.path.isdir(out) or not [n for n in os.listdir(out) if n != ".release.lock"]:
        return
    try:
        with open(os.path.join(out, "release.json")) as f:
            index = json.load(f)
    except (OSError, ValueError):
        raise ReleaseError(f"{out_dir} holds files that are not a release (no readable "
                           "release.json); give a new or empty folder") from None
    if index.get("run_dir", run) != run:
        raise ReleaseError(f"{out_dir} is a release of {index['run_dir']}, not of {run_dir}; give "
                           "another folder")


# -----------------------------------------------------------------------------
# one checkpoint as a Hugging Face folder


def export(ckpt_dir, out_dir, max_shard_bytes=5 * 2**30):
    """Write a checkpoint (ours, or a Hugging Face folder) as a folder that transformers
    loads offline with AutoModelForCausalLM / AutoTokenizer.from_pretrained(out_dir):
    config.json and safetensors weights (float32), tokenizer.model / tokenizer.json /
    tokenizer_config.json / special_tokens_map.json (hf_format.hf_tokenizer_files), and
    generation_config.json. Everything is written to OUT_DIR.tmp and renamed into place,
    so OUT_DIR is either the whole export or absent (or the previous export)."""
    model, tok, info = checkpoint.load(ckpt_dir)
    cfg = model.config
    hf_config(cfg)  # refuses a shape no Hugging Face layout holds, before anything is written
    files = hf_format.hf_tokenizer_files(tok, cfg.max_seq_len)
    ours = set(files) | {"config.json", "generation_config.json", "model.safetensors.index.json"}
    other = [n for n in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
             if n not in ours and not re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", n)]
    if other or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise FileExistsError(f"{out_dir} holds files an export does not write "
                              f"({(other or [out_dir])[0]}), so it is not a previous export to "
                              "replace; give a new or empty folder")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        # a full disk: one line naming out_dir, and no half-written folder left
        with writing(out_dir):
            _write_export(tmp, files, model, tok, max_shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp):  # safetensors writes 0600; a release is for reading
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return info


def _write_export(tmp, files, model, tok, max_shard_bytes):
    for name, blob in files.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(blob)
    eos = tok.eos_id
    write_json_atomic(os.path.join(tmp, "generation_config.json"),
                      {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
                       "do_sample": False, "max_length": model.config.max_seq_len}, indent=2)
    # config.json last
    hf_format.save_hf(model, tmp, max_shard_bytes, bos_token_id=eos, eos_token_id=eos)


# -----------------------------------------------------------------------------
# the model card


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _last_metrics(path):
    """The last training line and the last validation line of metrics.jsonl, read as a stream."""
    train = val = None
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "val_loss" in r:
                val = r
            elif "loss" in r:
                train = r
    return train, val


def model_card(run_dir, out_dir, cfg, state, *, manifests, data_dsts, index, hf_reason):
    name = os.path.basename(os.path.normpath(run_dir))
    run_json = os.path.join(run_dir, "run.json")
    run = read_json(run_json) if os.path.exists(run_json) else {}
    commit = run.get("git_commit") or "unknown"
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
    m = cfg.model
    with torch.device("meta"):
        n_params = Transformer(m).num_params()
    ckpt_names = sorted(index["checkpoints"])
    data_rel = rel(data_dsts[0]) if len(data_dsts) == 1 else "data"
    manifest_links = ", ".join(f"[{rel(d)}/manifest.json]({rel(d)}/manifest.json)"
                               for d in data_dsts)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [llm360-mini, pretraining, transparent]", "---", "",
        f"# {name}", "",
        f"A {n_params / 1e6:,.1f}M-parameter "
        f"{'LLaMA' if m.norm == 'rmsnorm' else 'CrystalCoder'}-architecture language model "
        f"pre-trained from scratch with llm360-mini on {state['tokens']:,} tokens "
        f"({state['step']:,} optimizer steps), released whole as LLM360 released AMBER: every "
        "checkpoint, its optimizer state, the data in the order it was trained, the logs, the "
        "evaluations and the memorization analysis.", "",
        "## Release (the LLM360 paper's Table 1, for this run)", "",
        _table(["code", "config", "checkpoints", "optimizer states", "data mix", "data order",
                "data availability"], [[
            f"llm360-mini `{commit[:12]}` ([run.json](logs/run.json))",
            "[logs/config.py](logs/config.py)",
            f"{len(ckpt_names)} ([checkpoints/](checkpoints/))" if not hf_reason else
            f"{len(ckpt_names)}, our format ([checkpoints/](checkpoints/))",
            "AdamW, every checkpoint ([optimizer/](optimizer/))",
            f"Table 2 below ({manifest_links})",
            f"chunks in schedule order {state['schedule']} ([ledger](logs/ledger.jsonl), "
            f"{manifest_links})",
            f"every training sequence: {sum(len(mf['chunks']) for mf in manifests)} chunks "
            f"([{data_rel}/]({data_rel}/), sha256 in the manifest)",
        ]]), "",
    ]
    if hf_reason:
        lines += [f"No Hugging Face layout holds this model: {hf_reason}", ""]
    first = runlog.first_event(run_dir)
    # an experiment: where it left its parent, and what it changed
    if first.get("event") == "branch":
        changed = ", ".join(f"`{k}` {a!r} -> {b!r}"
                            for k, (a, b) in first["changes"].items()) or "nothing"
        lines += [f"Branched from `{first['parent_run']}` at `{first['checkpoint']}` (step "
                  f"{first['step']:,}, {first['tokens']:,} tokens; its state.json sha256 "
                  f"`{first['checkpoint_sha256'][:16]}...`), AdamW {first['optimizer']}; changed: "
                  f"{changed}. The checkpoints up to there are the parent's.", ""]
    lines += ["## Data mix (the paper's Table 2, for this run)", ""]
    for mf, d in zip(manifests, data_dsts):
        total = sum(s.get("train_tokens", 0) for s in mf["sources"]) or 1
        lines += [_table(["source", "origin", "license", "documents", "training tokens", "share",
                          "weight (epochs)"],
                         [[s["name"], s.get("origin", ""), s.get("license", ""),
                           f"{s.get('documents', 0):,}", f"{s.get('train_tokens', 0):,}",
                           f"{100 * s.get('train_tokens', 0) / total:.2f}%", s.get("weight", "")]
                          for s in mf["sources"]]),
                  "", f"{rel(d)}: {mf['totals']['train_tokens']:,} training tokens in "
                  f"{mf['totals']['chunks']} chunks of sequences of {mf['seq_len']} tokens, "
                  f"shuffled globally with seed {mf['seed']}; tokenizer: "
                  f"{mf['tokenizer']['kind']}, {mf['tokenizer']['vocab_size']:,} tokens.", ""]
    train, val = _last_metrics(os.path.join(run_dir, "metrics.jsonl"))
    lines += ["## Results", "",
              _table(["", "value"], [["tokens", f"{state['tokens']:,}"],
                                     ["optimizer steps", f"{state['step']:,}"],
                                     ["final training loss", f"{train['loss']:.4f}" if train
                                      else "-"], ["final validation loss", f"{val['val_loss']:.4f}"
                                                  if val else "-"],
                                     *[[f"final validation loss, {k.removeprefix('val_loss/')}",
                                        f"{v:.4f}"]
                                       for k, v in (val or {}).items()
                                       if k.startswith("val_loss/")],
                                     ["skipped chunks (NaN policy)",
                                      [s["chunk"] for s in state["skipped"]] or "none"]]),
              ""]
    evals_path = os.path.join(run_dir, "evals.jsonl")
    last_ckpt = None
    for r in iter_jsonl(evals_path):  # streamed: the file holds every row's results
        last_ckpt = r["checkpoint"]
    evals = [r for r in iter_jsonl(evals_path) if r["checkpoint"] == last_ckpt]
    if evals:
        last = last_ckpt
        lines += [f"Evaluations of {last} ([evals/evals.csv](evals/evals.csv) has every "
                  "checkpoint):", "",
                  _table(["task", "metric", "value", "items"],
                         [[r["task"], r["metric"], f"{r['value']:.4f}", r["n"]
                           if r["n"] is not None else ""]
                          for r in evals if r["checkpoint"] == last]), ""]
    contam = os.path.join(run_dir, "contamination.csv")
    # tracing.py contamination: benchmark rows found in this run's training data
    if os.path.exists(contam):
        with open(contam) as f:
            rows = [line.rstrip("\n").split(",") for line in f][1:]
        lines += ["Benchmark contamination ([evals/contamination.csv](evals/contamination.csv), "
                  "`tracing.py contamination`): rows of which a 13-gram occurs in the training "
                  "data, and the last checkpoint's score on the clean and the dirty rows:", "",
                  _table(["task", "rows", "dirty", "share", "metric", "clean", "dirty rows"],
                         [[r[0], r[1], r[2], f"{100 * float(r[3]):.1f}%", r[5], r[6][:6], r[7][:6]]
                          for r in rows if not r[4] or r[4] == last_ckpt]), ""]
    for mem in sorted(glob.glob(os.path.join(glob.escape(run_dir), "memorization", "k*_l*",
                                             "per_checkpoint.csv"))):
        with open(mem) as f:
            rows = [line.rstrip("\n").split(",") for line in f]
        name = os.path.basename(os.path.dirname(mem))
        k, l = re.fullmatch(r"k(\d+)_l(\d+)", name).groups()
        lines += [f"Memorization at k = {k}, l = {l} "
                  f"([memorization/{name}/](memorization/{name}/)): the share of sampled training "
                  "sequences whose continuation the checkpoint reproduces exactly (k-extractible) "
                  "and the mean score:", "",
                  _table(["checkpoint", "sequences", "mean score", "k-extractible"],
                         [r[:4] for r in rows[1:]]), ""]
    # memorization: one per (k, l)
    figures = [(os.path.relpath(f, out_dir), t) for pattern, t in CARD_FIGURES
               for f in sorted(glob.glob(os.path.join(glob.escape(out_dir), pattern)))]
    if figures:
        lines += ["## Figures", ""] + [f"![{t}]({f})" for f, t in figures] + [""]
    if not hf_reason:
        lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, "
                  "AutoTokenizer", "",
                  'tok = AutoTokenizer.from_pretrained("PATH")  # this folder, or its Hub '
                  'repository',
                  'model = AutoModelForCausalLM.from_pretrained("PATH")  # the final checkpoint',
                  'early = AutoModelForCausalLM.from_pretrained("PATH", '
                  f'subfolder="checkpoints/{ckpt_names[0]}")',
                  "```", "",
                  "Documents are separated by EOS and no BOS is added: the tokenizer gives the ids "
                  "the model was trained on.", ""]
    data_arg = ("--data_dir=data" if len(data_dsts) == 1
                else f"--stages=\"{tuple(rel(d) for d in data_dsts)!r}\"")
    lines += ["## Reproduce", "", "From this folder, with llm360-mini at the run's commit: the "
              "same data in the same order, the same config; on a CPU with one thread "
              "(`--deterministic=True`) the weights come out identical.", "", "```",
              f"python train.py logs/config.py {data_arg} --out_dir=rerun", "```", "",
              "Or resume from any checkpoint: copy `optimizer/ckpt_NNN` into the out_dir and run "
              "the same command.", ""]
    return "\n".join(lines)


def main(argv):
    usage = ("usage: python release.py RUN_DIR [OUT_DIR]\n       python release.py export CKPT_DIR "
             "OUT_DIR")
    if not argv or argv[0].startswith("-") or len(argv) > 3 or (len(argv)
                                                                == 3) != (argv[0] == "export"):
        sys.exit(usage)
    with one_line_errors():
        try:
            if argv[0] == "export":
                export(argv[1], argv[2])
                print(f"wrote {argv[2]}")
            else:
                release(*argv)
        # a shape that no Hugging Face layout holds (model_config.hf_config), said as it is
        except ValueError as e:
            raise ReleaseError(str(e)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
