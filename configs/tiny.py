# The laptop default: AMBER's architecture at 5.3M parameters, trained on a small
# built-in "web + books + code" corpus in minutes on a CPU.
#   python train.py configs/tiny.py

model = "tiny"  # model.PRESETS["tiny"]: dim 256, 4 layers, 8 heads, SwiGLU 704, vocab 4096

# data
data_dir = "data/tiny"
seq_len = 256
n_chunks = 8  # 8 checkpoints over the run, as AMBER's 360 over its
seed = 1337

# run
out_dir = "runs/tiny"

# batch: 32 x 256 = 8,192 tokens per optimizer step
global_batch_size = 32
micro_batch_size = 8

# optimizer: AMBER's recipe, with a higher peak LR as small models take it
lr = 3e-3
min_lr = 3e-4  # lr / 10, as AMBER
warmup_steps = 20
lr_schedule = "cosine"
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0

dtype = "auto"  # float32 on a CPU
