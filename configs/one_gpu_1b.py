# A 1B-parameter AMBER-shaped model for one 80 GB GPU (A100 / H100), on your own data.
#   python prepare.py configs/one_gpu_1b.py         # after setting `sources` to your corpus
#   python train.py configs/one_gpu_1b.py
#   python train.py configs/one_gpu_1b.py --dry_run=True --dry_run_sequences_per_chunk=100000
# The shape is ours (not from the paper): LLaMA's recipe at width 2048.

model = "amber_7b"  # the architecture of AMBER; the shape below makes it 1.04B parameters
dim = 2048
n_layer = 18
n_head = 16  # head dim 128, as LLaMA-7B
intermediate_size = 5504  # about 8/3 x 2048, a multiple of 64
vocab_size = 32000  # LLaMA's tokenizer: set tokenizer to its tokenizer.model path, or train one
max_seq_len = 2048

sources = {}  # {name: {"path": ..., "format": ...}}: see prepare.py
tokenizer = "train"
data_dir = "data/one_gpu"
seq_len = 2048
n_chunks = 100
out_dir = "runs/one_gpu_1b"

# 256 x 2048 = 524,288 tokens per step: micro-batches of 8 sequences, 32 accumulation steps
global_batch_size = 256
micro_batch_size = 8
lr = 3e-4  # AMBER's optimizer settings
min_lr = 3e-5
warmup_steps = 2000
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0

dtype = "auto"  # bf16 autocast with float32 master weights on the GPU
compile = True  # torch.compile: worth its compile time on a GPU
activation_checkpointing = False  # set True if activations do not fit
ckpt_interval = 500  # a rolling checkpoint every 500 steps, besides one per chunk
plan_gpu = "H100"  # an 80 GB A100 or H100; the dry run plans for this one
# one process writes the whole 12.5 GB checkpoint (no shards to share it): 48 s with the step in
# flight (dry run), more than a plain SIGTERM's 30 s. Ask the scheduler for an early warning
# (SLURM: --signal=USR1@120), which stops the run like SIGTERM
stop_grace_s = 120.0
dry_run_world_size = 1  # plan for one GPU
