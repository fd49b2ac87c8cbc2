# DPO of the SFT model, AmberSafe's recipe at laptop size:
#   python finetune.py configs/chat_tiny.py && python finetune.py configs/safe_tiny.py
# Pairs made from the standard library: the true function is chosen, another function's
# body under its signature (or the true one with `return None`) rejected. The reference is
# the starting checkpoint, frozen.

init_from = "runs/chat_tiny/ckpt_002"  # the SFT model (its last epoch)
init_optimizer = False
objective = "dpo"
dpo_beta = 0.1  # AmberSafe's
finetune_data = "builtin:stdlib"
data_dir = "data/safe_tiny"
out_dir = "runs/safe_tiny"
seq_len = 256
epochs = 1

global_batch_size = 8  # pairs
micro_batch_size = 4
lr = 1e-4  # AmberSafe: 5e-7 on a 7B
min_lr = 1e-5
warmup_steps = 5
lr_schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
val_sequences = 64
dtype = "auto"
