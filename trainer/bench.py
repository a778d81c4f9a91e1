"""Training throughput: `nmt-bench train` times the real train loop and reports MFU.

`run` builds a run exactly as `nmt-train` does (train.setup, make_replica_step,
make_train_loop), compiles every batch shape of the bucket grid first, then times
`num_steps` steps of the configured input pipeline. `compare` and `sweep` (see `main`)
start `nmt-bench train` and the seed tutorial as subprocesses, one after the other, so
they measure under the same load; each prints one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

# Words of the synthetic corpus: short, lowercase, ASCII, so the tutorial's preprocessing
# keeps them unchanged and SentencePiece can hold each one as a single piece.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def synthetic_words(vocab_words: int, seed: int = 0) -> List[str]:
  """`vocab_words` distinct random words of 3 to 6 letters (seeded)."""
  rng = np.random.default_rng(seed)
  words = set()
  while len(words) < vocab_words:
    length = int(rng.integers(3, 7))
    words.add("".join(rng.choice(list(_LETTERS), size=length)))
  return sorted(words)


def write_synthetic_tsv(path: str, num_pairs: int, min_words: int, max_words: int,
                        vocab_words: int = 500, seed: int = 0) -> None:
  """Writes `num_pairs` lines "source<TAB>target" with min..max words per sentence.

  The target is the source reversed and mapped word by word through a fixed permutation
  of the same closed vocabulary: both sides have equal length, and the task is learnable.
  """
  words = synthetic_words(vocab_words, seed)
  rng = np.random.default_rng(seed + 1)
  translation = rng.permutation(len(words))
  lines = []
  for _ in range(num_pairs):
    ids = rng.integers(0, len(words), size=int(rng.integers(min_words, max_words + 1)))
    source = " ".join(words[i] for i in ids)
    target = " ".join(words[translation[i]] for i in ids[::-1])
    lines.append(f"{source}\t{target}\n")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(lines)
