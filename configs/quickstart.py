"""Quickstart: the README's first command. Trains in about 10 minutes on a 2-core CPU.

Same model and pipeline as configs/default.py at a quarter of the width; full sizes are
`--config=configs/default.py`.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns a CPU-sized variant of the default configuration."""
  config = default.get_config()
  config.data.max_source_length = 24
  config.data.max_target_length = 24
  config.data.bucket_boundaries = (12, 16, 24)
  config.data.eval_examples = 500
  config.tokenizer.vocab_size = 1000
  config.tokenizer.sample_size = 50000
  config.model.units = 256
  config.model.embed_dim = 128
  config.train.batch_size = 64
  config.train.steps = 1500
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 200
  config.train.decay = "cosine"
  config.train.xla = "train_step"
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.eval_every = 500
  return config
