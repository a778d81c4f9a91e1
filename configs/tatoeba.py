"""Tatoeba/Anki sentence pairs: the recipe for short-sentence real corpora on a small machine.

Tuned on the dev split of the embedded Tatoeba German->English corpus (`embedded:deu-eng:dev`,
the same pairs as `data.eval=holdout:2000` of its training file), never on its test file;
docs/real_corpora.md has the scores on the deu-eng and fra-eng test files.

Your own Anki export: `--config.data.train=tsv:spa.txt:1:0 --config.data.eval=holdout:2000
--config.data.test=""` (Anki files are English<TAB>other, hence the columns 1:0).
A wall-clock budget: `--config.train.max_seconds=600` (raise it and rerun to go on). Without
dropout it overfits the 165k deu-eng pairs after about an hour of a 2-core CPU (~18,000 steps;
docs/real_corpora.md, "The 2-hour runs"): beyond that, the best checkpoint is the one to use,
and `--config.train.ema_decay=0.999` adds ~1 BLEU (at 600 s it does not pay for its cost).
On fra-eng dev BLEU plateaus instead (2 hours: 58.6 test BLEU with the moving average, final
weights better than the best-by-dev checkpoint): the second hour adds at most ~1 BLEU on both.
For budgets of an hour or more add `--config.model.dropout=0.2` (free per step on a CPU):
2 hours gave 49.8 test BLEU on deu-eng against 47.2 and 59.2 on fra-eng against 58.6, dev
BLEU still rising on both (it costs ~2 dev BLEU at 10 minutes, so the 600-s recipe leaves it
off). With `--config.model.units=384 --config.model.embed_dim=384` added to dropout (1.62x
the step time) 2 hours gave 52.3 on deu-eng and 61.4 on fra-eng: configs/tatoeba_long.py.
Dropout with `--config.train.decay=cosine` did worse (43.9): the cosine keeps this 6e-3 peak
too long for batches of 64.
"""
import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the Tatoeba recipe (on the embedded German->English corpus by default)."""
  config = default.get_config()
  config.data.train = "embedded:deu-eng:train"
  config.data.eval = "embedded:deu-eng:dev"
  config.data.test = "embedded:deu-eng:test"
  config.data.max_source_length = 32
  config.data.max_target_length = 32
  # Steps of 2 where most pairs are: 14% padding against 21% with (8, 12, 16, 24, 32), for
  # 3 more compiled shapes (~5 s each); 1.16x target tokens/s (docs/peer.md).
  config.data.bucket_boundaries = (8, 10, 12, 14, 16, 20, 24, 32)
  config.data.eval_examples = 1000
  config.tokenizer.vocab_size = 4000
  config.tokenizer.sample_size = 200000
  config.model.units = 256
  config.model.embed_dim = 256
  # Bidirectional encoder and label smoothing: chosen on the dev split (docs/real_corpora.md).
  config.model.bidirectional = True
  # Tied target embeddings: the one option of issue 24 that won on the deu-eng dev split
  # (dev BLEU at step 1000: 19.4 -> 23.0; EMA 0.999 17.0; budget-fitted cosine, SentencePiece
  # sampling and 2 decoder layers lost at 600 s on a 2-core EPYC; docs/real_corpora.md).
  config.model.tie_embeddings = True
  # Batches of 64 at a peak of 6e-3 after 150 warmup steps: on one core for 600 s, deu-eng dev
  # BLEU 27.6 -> 34.3 against batches of 128 at 3e-3 after 300 (0.13 s/step instead of 0.24
  # alone: 1.8x the updates for 0.86x the tokens/s; docs/real_corpora.md, 2026-12-04).
  config.train.batch_size = 64
  config.train.steps = 100000
  config.train.learning_rate = 6e-3
  config.train.warmup_steps = 150
  config.train.decay = "rsqrt"  # No end to decay to: runs are cut by train.max_seconds.
  config.train.label_smoothing = 0.1
  config.train.log_every = 200
  config.train.checkpoint_every = 1000
  config.train.eval_every = 2000  # 128,000 sentences between evaluations, as at batch 128.
  # Real sentences from outside the corpus (checked against train, dev and test).
  config.eval.probe_sentences = ("Ich habe heute keine Zeit, weil ich arbeiten muss.",
                                 "Mein Bruder wohnt seit zwei Jahren in Berlin.")
  return config
