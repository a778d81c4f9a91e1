"""Tiny configuration: trains in seconds on a CPU; used by the tests.

It trains on the generated numbers-and-dates corpus (input_pipeline/cldr_numbers.py), which
a 600-step model learns well enough for the tests to check BLEU; users train on Tatoeba.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns a seconds-on-CPU variant of the default configuration."""
  config = default.get_config()
  config.data.train = "embedded:train"
  config.data.eval = "embedded:validation"
  config.data.test = ""
  config.data.max_source_length = 24
  config.data.max_target_length = 24
  config.data.bucket_boundaries = (12, 16, 24)
  config.data.shuffle_buffer = 2000
  config.data.eval_examples = 200
  config.tokenizer.vocab_size = 500
  config.tokenizer.sample_size = 20000
  config.model.units = 128
  config.model.embed_dim = 64
  config.model.recurrence = "fused"  # Explicit, so tests can build a model without a device.
  config.train.batch_size = 64
  config.train.steps = 600
  config.train.steps_per_loop = 10
  config.train.learning_rate = 5e-3
  config.train.warmup_steps = 50
  config.train.decay = "constant"
  config.train.precision = "float32"
  config.train.xla = "decoder_step"  # Short tests: train_step compiles each shape ~4x longer.
  config.train.log_every = 100
  config.train.checkpoint_every = 300
  config.train.eval_every = 300
  config.eval.beam_size = 2
  config.eval.num_probes = 1
  config.eval.probe_sentences = ("am dreiundzwanzigsten April zweitausendzweiundachtzig",
                                 "le vingt-trois mai mille neuf cent treize")
  return config
