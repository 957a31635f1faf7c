# TinyStories, about 100M parameters with the modern block: RoPE, SwiGLU, no biases, bfloat16.
#   python prepare_data.py tinystories
#   python train.py config/tinystories.py                                   # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py config/tinystories.py --gradient_accumulation_steps=1
# 14 layers x 640 wide (10 heads of 64) + the 50257 x 640 tied embedding = 101.6M parameters.
out_dir = "out-tinystories"
dataset = "tinystories"
sample_prompt = "Once upon a time"
eval_interval = 500
eval_iters = 100
log_interval = 10

n_layer = 14
n_head = 10
n_embd = 640
block_size = 512          # a story is a few hundred tokens
pos_emb = "rope"
mlp = "swiglu"
bias = False
dropout = 0.0

batch_size = 32
gradient_accumulation_steps = 8   # per process: 8 x 32 x 512 = 131k tokens per step on one GPU
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 10000                 # 1.3B tokens
warmup_iters = 500
weight_decay = 0.1

dtype = "bfloat16"
compile = True
