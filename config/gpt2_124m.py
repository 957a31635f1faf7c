# GPT-2 small (124M) from scratch on 10B tokens of FineWeb-Edu, as build-nanogpt reproduces GPT-2
# (llm.c runs the same recipe on FineWeb). docs/training.md has the numbers to expect.
#   python prepare_data.py fineweb-edu                        # 10B tokens in 100M-token shards, about 20 GB
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
#   python train.py config/gpt2_124m.py                       # one GPU: the same steps, 8x the accumulation
# Sources: [L] llm.c's scripts/run_gpt2_124M.sh, [B] build-nanogpt's train_gpt2.py.
out_dir = "out-gpt2-124m"
dataset = "fineweb-edu"
sample_prompt = "Hello, I'm a language model,"   # [B]'s prompt
eval_interval = 250               # [L] -v 250, [B] every 250 steps: validation, HellaSwag, a sample, a checkpoint
eval_iters = 160                  # 160 x 64 x 1024 = 10.5M tokens per split, as [B] on 8 GPUs (20 batches each)
eval_tasks = "hellaswag"          # [L] -h 1, [B]: the 10,042 validation examples at every evaluation

n_layer = 12                      # GPT-2 small: [L] -e "d12"
n_head = 12
n_embd = 768
block_size = 1024                 # [L] -t 1024, [B] T = 1024
dropout = 0.0

batch_size = 64                   # [L] -b 64, [B] B = 64: per process, per micro-batch (fits 80 GB in bfloat16)
total_batch_size = 524288         # [L] -d 524288, [B] 2**19 tokens per step: 1 micro-batch on 8 GPUs, 8 on 1
learning_rate = 6e-4              # [L] -l 0.0006, [B] max_lr; GPT-3's paper for its 125M model
min_lr = 0.0                      # [L] -q 0.0: the cosine goes to 0 ([B] stops at 10%, 6e-5)
warmup_iters = 700                # [L] -u 700 ([B] 715)
max_iters = 19073                 # [B] max_steps: 10B tokens / 524,288 per step ([L] 18,865 on FineWeb's 9.9B)
weight_decay = 0.1                # [L] -c 0.1, [B]
beta1 = 0.9                       # [L], [B]
beta2 = 0.95                      # [L], [B]
grad_clip = 1.0                   # [L], [B]

compile = True                    # [B]. dtype=auto is bfloat16 on an A100 or H100, as [L] and [B] train, and
                                  # scaled_dot_product_attention then runs flash attention
