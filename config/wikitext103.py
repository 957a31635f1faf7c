# WikiText-103 with GPT-2's architecture: 8 layers, 8 heads, 512 wide, 512 tokens of context.
#   python prepare_data.py wikitext103
#   python train.py config/wikitext103.py
# 25.2M in the blocks + the 50257 x 512 tied embedding + 512 positions = 51.2M parameters.
# WikiText-103 is about 120M GPT-2 tokens: 12k steps of 64k tokens is about 6 epochs, hence dropout.
out_dir = "out-wikitext103"
dataset = "wikitext103"
sample_prompt = " = = History = = \n"
eval_interval = 500
eval_iters = 100
log_interval = 10

n_layer = 8
n_head = 8
n_embd = 512
block_size = 512
dropout = 0.1

batch_size = 32
gradient_accumulation_steps = 4   # per process: 4 x 32 x 512 = 65k tokens per step on one GPU
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 12000
warmup_iters = 500
weight_decay = 0.1

compile = True
