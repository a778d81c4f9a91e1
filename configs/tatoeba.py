"""Tatoeba/Anki sentence pairs: the recipe for short-sentence real corpora on a small machine.

Tuned on a 2,000-pair dev split carved out of the Tatoeba German->English training file
(`data.eval=holdout:2000`), never on its test file; see the README's "Real corpora" section
for the scores on the deu-eng and fra-eng test files at 10 minutes and 2 hours.

Your own Anki export: `--config.data.train=tsv:spa.txt:1:0` (Anki files are English<TAB>other).
A wall-clock budget: `--config.train.max_seconds=600` (raise it and rerun to go on).
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the Tatoeba recipe (German->English from ../shared/corpora by default)."""
  config = default.get_config()
  config.data.train = "tsv:../shared/corpora/deu-eng.train.tsv.gz"
  config.data.eval = "holdout:2000"
  config.data.max_source_length = 32
  config.data.max_target_length = 32
  config.data.bucket_boundaries = (8, 12, 16, 24, 32)
  config.data.eval_examples = 1000
  config.tokenizer.vocab_size = 4000
  config.tokenizer.sample_size = 200000
  config.model.units = 256
  config.model.embed_dim = 256
  config.train.batch_size = 128
  config.train.steps = 100000
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 300
  config.train.decay = "rsqrt"
  config.train.log_every = 200
  config.train.checkpoint_every = 1000
  config.train.eval_every = 1000
  return config
