# Fine-tune OpenAI's GPT-2 (124M) on Tiny Shakespeare: a small constant learning rate, few steps.
#   python prepare_data.py shakespeare
#   python train.py config/shakespeare.py             # --init_from=gpt2-medium etc. for a larger one
# About 300k training tokens: 80 steps of 8k tokens are about two epochs; watch val loss turn up.
out_dir = "out-shakespeare"
dataset = "shakespeare"
init_from = "gpt2"
sample_prompt = "ROMEO:"
sample_tokens = 64
eval_interval = 10
eval_iters = 20
log_interval = 1

block_size = 256
batch_size = 8
gradient_accumulation_steps = 4
learning_rate = 3e-5
min_lr = 3e-5                     # = learning_rate: constant after warmup
warmup_iters = 0
max_iters = 80
dropout = 0.1
