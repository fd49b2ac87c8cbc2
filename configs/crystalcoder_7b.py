# CrystalCoder: 7B code and text model with muP, trained in three stages (LLM360 paper, 2023).
#   torchrun ... train.py configs/crystalcoder_7b.py
# Values from the released config.json and model code of LLM360/CrystalCoder and
# the paper's §4.2; also in ../shared/DESIGN.md.

model = "crystalcoder_7b"
vocab_size = 32032  # (released config)
dim = 4096  # (released config)
n_layer = 32
n_head = 32
n_kv_head = None
intermediate_size = 10922  # SwiGLU, about 8/3 x 4096 (released config)
max_seq_len = 2048
norm = "layernorm"  # LayerNorm instead of RMSNorm (model code)
norm_eps = 1e-5  # (released config)
norm_bias = True
qkv_bias = True  # biases in the attention projections ...
proj_bias = True  # ... and in the MLP (GPT-2 style Conv1D layers)
rope_theta = 10000.0
rotary_pct = 0.25  # rotary on the first 32 of 128 head dims (released config)
tie_embeddings = True  # (released config)
init_std = 0.073  # truncated normal; hidden 0.073 * sqrt(0.0625) = 0.01825, outputs 0.00228125
mup = True  # maximal update parametrization
mup_width_scale = 0.0625  # base width 256 / 4096: hidden LR and init multiplier
mup_embeddings_scale = 14.6  # embedding output multiplier
mup_output_alpha = 2.22  # logits x 2.22 x 0.0625 = 0.13875; attention scaled by 1/d_head

# data: three stages, each its own prepared data dir: (1) half of SlimPajama,
# (2) the other half plus two epochs of StarCoder, (3) Python and web code
# (HTML, CSS, JavaScript) plus a 10B-token SlimPajama sample (§4.2)
data_dir = "data/crystalcoder_stage1"  # prepare.py prepares one stage at a time: --data_dir=... with its sources
stages = ("data/crystalcoder_stage1", "data/crystalcoder_stage2", "data/crystalcoder_stage3")  # train.py: in order
seq_len = 2048
n_chunks = 143  # (assumption: the paper reports 143 released checkpoints, one per chunk here)
seed = 1337

out_dir = "runs/crystalcoder_7b"

# batch: 2,112 sequences of 2,048 tokens per step (§4.2)
global_batch_size = 2112
micro_batch_size = 8  # not given (assumption)

# optimizer: AdamW (§4.2, released config)
lr = 0.012  # peak LR; muP scales the hidden matrices' LR by 0.0625
min_lr = 1.24e-4
warmup_steps = 2000  # not given in the paper (assumption)
lr_schedule = "linear"  # linear warmup, then linear decay
beta1 = 0.9
beta2 = 0.95
eps = 1e-9
weight_decay = 0.1  # not on norms and biases
grad_clip = 1.0

dtype = "auto"
parallel = "fsdp"
# a block saves 43 bytes per token per hidden unit (dry run, measured): 8 x 2,048 tokens x 32 blocks
# would be 87 GiB of activations; checkpointed, 10.9 GiB in all per GPU (dry run)
activation_checkpointing = True
plan_gpu = "A100"  # (assumption: CrystalCoder was trained on Cerebras CS-2s, not GPUs)
ckpt_interval = 100  # a rolling checkpoint, each rank its shard: as amber_7b.py
