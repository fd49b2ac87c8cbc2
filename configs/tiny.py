# The laptop default: AMBER's architecture at 5.3M parameters, trained on a small
# built-in "web + books + code" corpus in minutes on a CPU.
#   python train.py configs/tiny.py

model = "tiny"  # model.PRESETS["tiny"]: dim 256, 4 layers, 8 heads, SwiGLU 704, vocab 4096

# data: a small "web + books + code" mix that installs with requirements.txt, no download.
# weight = epochs over a source (0.5: a seeded half of its documents)
sources = {
    "code": {"builtin": "python_stdlib", "weight": 0.15},  # the standard library's .py files, tests left out
    "books": {"builtin": "kjv", "weight": 0.4},  # King James Bible, one document per chapter
    "docs": {"builtin": "pydoc_topics", "weight": 1.0},  # Python's documentation topics: prose
}
tokenizer = "train"  # a SentencePiece BPE of vocab_size tokens, trained on a sample of the sources
val_fraction = 0.02  # of each source's documents
data_dir = "data/tiny"
seq_len = 256
n_chunks = 8  # 8 checkpoints over the run, as AMBER's 360 over its
seed = 1337

# run
out_dir = "runs/tiny"

# batch: 16 x 256 = 4,096 tokens per optimizer step, in 2 micro-batches of 8
global_batch_size = 16
micro_batch_size = 8

# optimizer: AMBER's recipe, with a higher peak LR as small models take it
lr = 5e-3
min_lr = 5e-4  # lr / 10, as AMBER
warmup_steps = 20
lr_schedule = "cosine"
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0

dtype = "auto"  # bf16 autocast where this CPU measures it 1.5x faster (AMX), else float32
