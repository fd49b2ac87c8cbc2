# AmberChat (paper §3): SFT of AMBER's final checkpoint on WizardLM's evolved instructions,
# as FastChat trained it: Vicuna v1.1 template, 3 epochs, lr 2e-5, warmup ratio 0.04,
# 8 A100s with FSDP and gradient accumulation 16.
#   torchrun --nproc_per_node=8 finetune.py configs/amberchat.py
# Save WizardLM's data (WizardLM_evol_instruct_V2_196k, ShareGPT JSON) first; nothing is downloaded.

init_from = "path/to/amber/ckpt_359"  # AMBER's last released checkpoint (a Hugging Face folder with tokenizer.model)
init_optimizer = False
model = "amber_7b"  # finetune.py takes the shape from init_from; named here so that seq_len checks
objective = "lm"
finetune_data = "data/wizardlm_evol_instruct_v2_196k.json"
data_dir = "data/amberchat"
out_dir = "runs/amberchat"
seq_len = 2048
epochs = 3
parallel = "fsdp"

# 8 GPUs x micro-batch 1 x gradient accumulation 16 = 128 conversations per step (FastChat's settings)
global_batch_size = 128
micro_batch_size = 1
lr = 2e-5
min_lr = 0.0
warmup_steps = 180  # about 0.04 of the ~4,500 steps of 3 epochs over the conversations that fit 2,048 tokens
lr_schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
val_sequences = 256
dtype = "auto"
compile = True
activation_checkpointing = True
