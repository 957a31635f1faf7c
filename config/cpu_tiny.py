# A few minutes on a laptop CPU: a 7M-parameter GPT on nine of Shakespeare's plays (shipped in
# lib/plays/, so no download) that learns the plays' layout (speaker names, verse lines) and some words.
#   python prepare_data.py plays
#   python train.py config/cpu_tiny.py
# Most of the compute is the 50257-way output layer, which is why the model is this narrow.
# About 1,400 tokens/s (0.7 s per step) on 2 cores of a server: 600 steps take 7 minutes there,
# less on a laptop with more cores. 600 steps of 1k tokens are two passes over the 323k tokens.
out_dir = "out-cpu-tiny"
dataset = "plays"
sample_prompt = "ROMEO:"
eval_interval = 100
eval_iters = 20
log_interval = 20

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.1

batch_size = 8
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 600
warmup_iters = 50
weight_decay = 0.1
beta2 = 0.99                      # small batches: a longer memory for the second moment

device = "cpu"
dtype = "float32"
