# SFT of the main job's last checkpoint, AmberChat's recipe at laptop size:
#   python train.py configs/tiny.py && python finetune.py configs/chat_tiny.py
# Instructions made from the standard library ("Write a Python function `f(x)` that ...",
# answered by its source; questions on the pydoc topics), Vicuna v1.1 template, loss on
# the assistant's tokens only.

init_from = "runs/tiny/ckpt_007"  # the model's shape and tokenizer come from here
init_optimizer = False  # a fresh AdamW, as fine-tuning starts
objective = "lm"
finetune_data = "builtin:stdlib"
data_dir = "data/chat_tiny"
out_dir = "runs/chat_tiny"
seq_len = 256
epochs = 3  # as AmberChat (on WizardLM's 196k conversations)

global_batch_size = 16
micro_batch_size = 8
lr = 5e-4  # the base run ended at 5e-4; AmberChat: 2e-5 on a 7B
min_lr = 5e-5
warmup_steps = 10  # AmberChat: a warmup ratio of 0.04
lr_schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
val_sequences = 64
dtype = "auto"
