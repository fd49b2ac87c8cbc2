# AMBER: LLaMA-7B pre-trained on 1.26T tokens in 360 chunks (LLM360 paper, 2023).
#   torchrun --nnodes=56 --nproc_per_node=4 ... train.py configs/amber_7b.py
# "Table 3" and "§4.1" are the LLM360 paper's; numbers also in ../shared/DESIGN.md.

# model: LLaMA-7B (paper Table 3). Every field is spelled out although the preset holds them.
model = "amber_7b"
vocab_size = 32000  # LLaMA tokenizer (Table 3)
dim = 4096  # hidden size (Table 3)
n_layer = 32  # (Table 3)
n_head = 32  # (Table 3)
n_kv_head = None  # plain multi-head attention, as LLaMA-7B
intermediate_size = 11008  # SwiGLU MLP (Table 3)
max_seq_len = 2048  # (Table 3)
norm = "rmsnorm"  # (Table 3)
norm_eps = 1e-6  # (Table 3)
qkv_bias = False  # LLaMA has no biases
proj_bias = False
rope_theta = 10000.0  # LLaMA's rotary base
rotary_pct = 1.0  # rotary on the whole head dimension
tie_embeddings = False  # untied input and output embeddings (Table 3)
mup = False

# data: 1,259.13B tokens (Table 2: Arxiv 30.00, Book 28.86, C4 197.67, RefinedWeb 665.01,
# StarCoder 291.92, StackExchange 21.75, Wikipedia 23.90), globally permuted and split
# into 360 chunks of 1,706,976 sequences of 2,049 tokens (§4.1, released data chunks)
data_dir = "data/amber"
seq_len = 2048  # (Table 3)
n_chunks = 360  # one checkpoint per chunk (§4.1)
dry_run_sequences_per_chunk = 1706976  # released chunks: 1,706,976 sequences of 2,049 tokens, for --dry_run
seed = 1337

out_dir = "runs/amber_7b"

# batch: 224 A100s (56 nodes x 4) x 10 sequences, no accumulation = 2,240 x 2,048 tokens per step (§4.1)
global_batch_size = 2240
micro_batch_size = 10

# optimizer: AdamW (§4.1, Table 3)
lr = 3e-4  # peak LR
min_lr = 3e-5  # cosine decay ends at lr / 10
warmup_steps = 2000
lr_schedule = "cosine"
beta1 = 0.9
beta2 = 0.95
eps = 1e-8  # not given in the paper; the AdamW default (assumption)
weight_decay = 0.1
grad_clip = 1.0

# system: BF16 mixed precision with FP32 master weights (§4.1); sharded data parallel
dtype = "auto"
parallel = "fsdp"
activation_checkpointing = True  # 10 sequences of 2,048 do not fit 80 GB otherwise (see --dry_run=True)
plan_gpu = "A100"  # 56 nodes x 4 A100-80GB (§4.1)
plan_gpu_memory_gb = 80.0
# preemption: a signal stops the run after the step in flight with a checkpoint of each rank's shard
# (the dry run: 0.37 GB a rank, ~9 s from the signal to exit), within SLURM's and torchrun's 30 s
stop_grace_s = 30.0
# a rolling checkpoint every 100 steps (~13 min at 36% MFU): 0.14% of the time (dry run), and a
# crash with no warning (a node lost) loses at most that, not a chunk of 762 steps (1.6 h)
ckpt_interval = 100
