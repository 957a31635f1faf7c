# GPT-2 small (124M) from scratch, nanoGPT's recipe: ~0.5M tokens per step, 600k steps (300B tokens).
# Bring a large web-text corpus (e.g. OpenWebText as text files) and tokenize it with
#   python prepare_data.py text --input=path/to/openwebtext --out_dir=data/openwebtext
# then, on one node with 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
out_dir = "out-gpt2-124m"
dataset = "openwebtext"
sample_prompt = "The meaning of life is"
eval_interval = 1000
eval_iters = 200
log_interval = 10

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0

batch_size = 12
gradient_accumulation_steps = 5   # per GPU: 8 GPUs x 5 x 12 x 1024 = 491,520 tokens per step (on 1 GPU: 40)
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 600000
warmup_iters = 2000
weight_decay = 0.1
beta2 = 0.95

compile = True
