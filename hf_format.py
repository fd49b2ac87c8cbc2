"""
Hugging Face model folders, LLM360's release format: config.json and float32 safetensors
(or .bin) shards, written and read one tensor at a time. model.py maps our tensor names
to theirs (fused q/k/v and gate/up split and joined), model_config.py the config.json;
the tokenizer's files (hf_tokenizer_files) are written here. checkpoint.py reads a folder
through here as it reads one of ours.
"""

import json
import os

import torch

import data
from data import DataError
from common import atomic_write, write_json_atomic, writing
from model import Transformer, hf_parts, to_hf_state_dict
from model_config import hf_config, model_config_from_hf


class CheckpointError(data.DataError):
    """A checkpoint folder, ours or a Hugging Face one, that cannot be read as one."""


def hf_model_config(hf_dir):
    """The ModelConfig of a Hugging Face folder's config.json; one that is not JSON, not an
    object, or not a llama / stablelm config is a one-line error."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found; is {hf_dir} a Hugging Face model folder?")
    try:
        with open(path, "rb") as f:
            return model_config_from_hf(json.load(f))
    # not JSON / not UTF-8 / missing keys / not an object
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a Hugging Face config of a llama or stablelm model "
                              f"({type(e).__name__}: {e})") from None


def save_hf(model, out_dir, max_shard_bytes=5 * 2**30, bos_token_id=None, eos_token_id=None):
    """Write `model` as a Hugging Face folder (config.json + safetensors, float32) that
    LlamaForCausalLM / StableLmForCausalLM.from_pretrained(out_dir) loads.

    Each file is written atomically, config.json last, so an interrupted save never
    leaves a folder that loads. Shards above max_shard_bytes, with an index, as HF does.
    """
    from safetensors.torch import save_file

    # refuses before anything is written
    config = hf_config(model.config, bos_token_id, eos_token_id)
    tensors = to_hf_state_dict(model)
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    os.makedirs(out_dir, exist_ok=True)
    with writing(out_dir):
        _write_shards(out_dir, shards, tensors, save_file)
    write_json_atomic(os.path.join(out_dir, "config.json"), config, indent=2)


def _write_shards(out_dir, shards, tensors, save_file):
    """The safetensors files (and their index when there are several), each atomically."""
    if len(shards) == 1:
        atomic_write(os.path.join(out_dir, "model.safetensors"),
                      lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(os.path.join(out_dir, fname),
                         lambda p: save_file(shard, p, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": weight_map}
        write_json_atomic(os.path.join(out_dir, "model.safetensors.index.json"), index, indent=2)


def hf_shards(hf_dir):
    """The weight files of a HF folder, in order: safetensors or .bin, single or sharded."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(hf_dir, index_name)
        single = os.path.join(hf_dir, index_name.replace(".index.json", ""))
        if os.path.exists(index_path):
            with open(index_path) as f:
                return [os.path.join(hf_dir, n)
                        for n in sorted(set(json.load(f)["weight_map"].values()))]
        if os.path.exists(single):
            return [single]
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors, pytorch_model.bin or their "
                            ".index.json; is this a Hugging Face model folder?")


def _shard_tensors(path):
    """Yield (name, tensor) of one weight file, holding as little of it as the format allows:
    safetensors one tensor at a time, .bin memory-mapped when it is a zip-format pickle."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a safetensors file, or a damaged one "
                                  f"({e})") from None
        return
    # a .bin checkpoint is a pickle: weights_only=True so loading never runs code
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch's own errors: the file is not a weights file
        raise CheckpointError(f"{path}: not a PyTorch weights file, or a damaged one "
                              f"({type(e).__name__}: {e})") from None
    while sd:
        yield sd.popitem()  # each tensor is released once copied


def load_hf(hf_dir, dtype=torch.float32, device="cpu"):
    """Build our Transformer from a Hugging Face llama or stablelm folder (e.g. one of
    AMBER's released checkpoints, sharded pytorch_model-0000i-of-0000n.bin files).

    The model's tensors are allocated once in `dtype` and filled shard by shard, so memory
    holds the model plus one shard (with .bin zip files and safetensors, one tensor),
    never two full copies of the weights."""
    cfg = hf_model_config(hf_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    where = {}  # HF tensor -> (our tensor, first row, rows): fused matrices take several HF tensors
    for name in model.state_dict():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        row = 0
        for hf, rows in hf_parts(cfg, name):
            where[hf] = (name, row, rows)
            row += rows or 0
    shapes = model.state_dict()
    state = {name: torch.empty(shapes[name].shape, dtype=dtype, device=device)
             for name, _, _ in where.values()}
    filled = set()
    for path in hf_shards(hf_dir):
        for hf, t in _shard_tensors(path):
            if hf.endswith("rotary_emb.inv_freq") or (hf == "lm_head.weight"
                                                      and cfg.tie_embeddings):
                continue  # recomputed / re-tied; some tied checkpoints store the head anyway
            if hf not in where:
                raise CheckpointError(f"{path}: unexpected tensor {hf!r} for a model of this "
                                      "config.json")
            name, row, rows = where[hf]
            dst = state[name] if rows is None else state[name][row : row + rows]
            if dst.shape != t.shape:
                raise ValueError(f"{path}: tensor {hf!r} has shape {tuple(t.shape)}, config.json "
                                 f"implies {tuple(dst.shape)}")
            dst.copy_(t)
            filled.add(hf)
            del t
    missing = sorted(set(where) - filled)
    if missing:
        raise ValueError(f"{hf_dir}: tensor {missing[0]!r} is missing for a model of this "
                         "config.json")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter
    return model


# -----------------------------------------------------------------------------
# the tokenizer as Hugging Face files: tokenizer.json that `tokenizers` runs exactly
# like our SentencePiece model


def hf_tokenizer_files(tok, model_max_length):
    """{file name: bytes} of the tokenizer files of a Hugging Face folder: tokenizer.model
    (ours, as is), tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    tokenizer.json is a byte-fallback BPE written from the SentencePiece model itself: its
    merges are the pieces' splits, ranked by the pieces' scores, which is the order in
    which SentencePiece's BPE merges. Our run's conventions carry over exactly:
      - SentencePiece always adds the dummy "\u2581" in front, even before a leading space
        (Hugging Face's Llama tokenizer does not when the text starts with a space, so it
        disagrees on " x": we write the normalizer ourselves: Prepend, then Replace);
      - no BOS is added: our documents are separated by EOS, so EOS is also the "start"
        token (bos_token = eos_token, as GPT-2), and the harness's prefix for an empty
        context is EOS, as in evaluate.py;
      - special-token strings in text ("</s>") are text, as in our data (split_special_tokens).
    """
    if tok.kind != "sentencepiece":
        raise DataError("only SentencePiece tokenizers export to Hugging Face files; this run "
                        f"uses tiktoken {tok.name!r}, which Hugging Face loads by its own name "
                        "(e.g. 'gpt2')")
    sp, space = tok.sp, "\u2581"
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith(space)
    fullwidth_f = sp.encode("\uff46", out_type=str)
    if sp.encode("a b", out_type=str)[-1] != space + "b" \
            or "\uff46" not in "".join(fullwidth_f) and "<0xEF>" not in fullwidth_f:
        raise DataError("the SentencePiece model puts whitespace at the end of pieces or "
                        "normalizes text (NFKC); tokenizer.json would not reproduce it: train it "
                        "with normalization_rule_name='identity'")
    try:  # the model type needs protobuf (installed with the test requirements)
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(tok.blob)
        if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
            raise DataError("only a SentencePiece BPE model (LLaMA's kind) exports to "
                            "tokenizer.json; this one is "
                            f"{pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}")
    except ImportError:
        pass
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {p: i for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i)
                                                         or sp.is_byte(i))}
    merges = []  # (score of the merged piece, ids of the two halves, the halves)
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-sp.get_score(i), normal[left], normal[right], left, right))
    merges.sort()
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    eos = pieces[tok.eos_id]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Sequence", "normalizers": (
            [{"type": "Prepend", "prepend": space}] if dummy_prefix else []) + [
            {"type": "Replace", "pattern": {"String": " "}, "content": space}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": space}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]
                    + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
                                 if dummy_prefix else [])},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": any(sp.is_byte(i) for i in range(n)), "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)},
                  "merges": [[m[3], m[4]] for m in merges]},
    }
    specials = {"bos_token": eos, "eos_token": eos, "unk_token": unk, "pad_token": eos}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
              "add_eos_token": False, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length}

    def dump(obj):
        return json.dumps(obj, ensure_ascii=False, indent=2).encode()

    return {"tokenizer.model": tok.blob, "tokenizer.json": dump(tokenizer),
            "tokenizer_config.json": dump(config), "special_tokens_map.json": dump(specials)}
