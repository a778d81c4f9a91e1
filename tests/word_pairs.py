"""Tiny synthetic parallel corpora for the tests (word-for-word pairs), a TSV writer, and
configs/tiny.py sized for the pipeline tests' corpus."""
import random

import ml_collections

from configs import tiny

DE = ("null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf zwanzig "
      "dreißig vierzig hundert tausend million und am im märz juni mai").split()
FR = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze vingt trente "
      "quarante cent mille million et le en mars juin mai").split()
EN = ("zero one two three four five six seven eight nine ten eleven twelve twenty "
      "thirty forty hundred thousand million and on in march june may").split()
# The trained-model tests' corpus (test_export, test_faults): ten words, English -> German.
WORDS = {"one": "eins", "two": "zwei", "three": "drei", "four": "vier", "five": "fünf",
         "red": "rot", "blue": "blau", "house": "haus", "cat": "katze", "dog": "hund"}
GRID = [6, 10, 16]  # The padded lengths of pipeline_config's batches.


def make_pairs(n: int, seed: int = 0, max_words: int = 7,
               sources: tuple = (DE,)) -> list[tuple[str, str]]:
  """n distinct (source, English) word-for-word pairs of 1..max_words words, each source in
  one of `sources` (DE, FR); with the defaults some pairs exceed 16 tokens."""
  rng = random.Random(seed)
  pairs = {}
  while len(pairs) < n:
    words = [rng.randrange(len(EN)) for _ in range(rng.randint(1, max_words))]
    source = rng.choice(sources) if len(sources) > 1 else sources[0]  # No draw for one.
    pairs[" ".join(source[i] for i in words)] = " ".join(EN[i] for i in words)
  return list(pairs.items())


def english_german(n: int, seed: int, max_words: int) -> list[tuple[str, str]]:
  """n (English, German) pairs of 1..max_words WORDS, repeats allowed."""
  rng = random.Random(seed)
  pairs = []
  for _ in range(n):
    words = [rng.choice(list(WORDS)) for _ in range(rng.randint(1, max_words))]
    pairs.append((" ".join(words), " ".join(WORDS[w] for w in words)))
  return pairs


def write_tsv(path, pairs, bad: int = 0) -> str:
  """Writes SOURCE<TAB>TARGET lines, then `bad` lines with one column only; -> str(path)."""
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(f"{src}\t{tgt}\n" for src, tgt in pairs)
    f.write("one column only\n" * bad)
  return str(path)


def pipeline_config(train: str, eval_: str = "", batch_size: int = 8
                    ) -> ml_collections.ConfigDict:
  """configs/tiny.py for make_pairs' corpora: pairs of up to 16 tokens batched on GRID (the
  boundary 24 is unreachable, so trimmed), 60 pieces, eval on `eval_` (default: train)."""
  config = tiny.get_config()
  config.data.train, config.data.eval = train, eval_ or train
  config.data.max_source_length = config.data.max_target_length = 16
  config.data.bucket_boundaries = (6, 10, 16, 24)
  config.data.shuffle_buffer = 100
  config.tokenizer.vocab_size = 60
  config.train.batch_size = batch_size
  return config
