"""Quickstart: the README's first command. A German->English translator in about 10 minutes
on a 2-core CPU, from the Tatoeba corpus that ships with the package (`embedded:deu-eng`).

The model of configs/tatoeba.py for a fixed number of steps (so every machine trains the
same model; docs/real_corpora.md says how long it took where) with a cosine decay to the last one,
batches of 128 at 3e-3 (what its scores were measured with), and three evaluations.
Full sizes are `--config=configs/default.py`; longer runs `--config=configs/tatoeba.py`.
"""
import ml_collections

from configs import tatoeba


def get_config() -> ml_collections.ConfigDict:
  """Returns the Tatoeba recipe sized to about 10 minutes of a 2-core CPU."""
  config = tatoeba.get_config()
  # Measured (docs/real_corpora.md) with batches of 128 at 3e-3 after 300 warmup steps, not
  # tatoeba.py's 600-s batches of 64 at 6e-3.
  config.train.batch_size = 128
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 300
  config.train.steps = 3000
  config.train.decay = "cosine"
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
