# AmberSafe (paper §3): DPO with beta 0.1, lr 5e-7 and gradient accumulation 4, on
# SafeRLHF preference pairs (PKU-SafeRLHF: prompt, response_0, response_1,
# safer_response_id), starting from AMBER tuned on ShareGPT 90K, which is also the
# frozen reference.
#   torchrun --nproc_per_node=8 finetune.py configs/ambersafe.py
# Save the pairs first (JSON lines or parquet); nothing is downloaded.

init_from = "runs/amber_sharegpt90k/ckpt_002"  # AMBER after SFT on ShareGPT 90K (finetune.py, as amberchat.py)
init_optimizer = False
model = "amber_7b"  # finetune.py takes the shape from init_from; named here so that seq_len checks
objective = "dpo"
dpo_beta = 0.1
finetune_data = "data/pku_saferlhf_train.jsonl"
data_dir = "data/ambersafe"
out_dir = "runs/ambersafe"
seq_len = 1024  # prompt + response, each of the pair
epochs = 1
parallel = "fsdp"  # the policy and its frozen reference, both sharded

# 8 GPUs x micro-batch 2 x gradient accumulation 4 = 64 pairs per step
global_batch_size = 64
micro_batch_size = 2
lr = 5e-7
min_lr = 0.0
warmup_steps = 150
lr_schedule = "linear"
weight_decay = 0.0
grad_clip = 1.0
val_sequences = 512
dtype = "auto"
activation_checkpointing = True
