"""Small LM comparison (benchmarks/lm_compare.py, issue 8 item 4): ~30M-parameter models that differ
only in the token mixer, byte tokenizer, T = 1024, on the embedded corpus.

`--config configs/lm_compare.py:prism` (or gdn, attention, ttt). All four share d_model 512, 8 layers,
4 heads (head width 128), SwiGLU 1408, bf16 compute with float32 params, and the optimizer recipe;
benchmarks/lm_compare.py sets total_steps so that every model sees the same number of tokens.
"""

from train.config_lib import base_config

MIXERS = {
    "prism": dict(mixer="prism", solver_steps=2, solver_rank=64),  # PRISM, L = 2
    "gdn": dict(mixer="gdn"),  # Gated DeltaNet
    "attention": dict(mixer="attention"),  # Transformer (RoPE softmax attention)
    "ttt": dict(mixer="ttt", ttt_mini_batch=16),  # TTT-Linear, mini-batch 16 dual form
}
SHAPE = dict(vocab_size=256, d_model=512, num_layers=8, num_heads=4, head_k_dim=128, mlp_hidden_dim=1408,
             chunk_size=64, max_seq_len=1024, dtype="bfloat16", param_dtype="float32", op_impl="chunk")


def get_config(model="prism"):
    if model not in MIXERS:
        raise ValueError(f"configs/lm_compare.py: model {model!r} is not one of {sorted(MIXERS)}")
    config = base_config("tiny", **SHAPE, **MIXERS[model])
    config.data.seq_len = 1024
    config.batch_size = 64  # 64K tokens (bytes) per step
    config.learning_rate = 2e-3
    config.warmup_steps = 50
    config.total_steps = 1000  # benchmarks/lm_compare.py replaces it with its equal-token step count
    config.log_every_steps = 25
    config.eval_every_steps = 1000
    config.eval_batches = 8  # 8 x 64 x 1024 = 512K validation bytes, the same first rows for every model
    config.checkpoint_every_steps = 1000
    config.sample.max_new_tokens = 0
    return config
