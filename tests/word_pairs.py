"""A tiny synthetic parallel corpus for pipeline tests: German number words -> English."""
import random

DE = ("null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf zwanzig "
      "dreißig vierzig hundert tausend million und am im märz juni mai").split()
EN = ("zero one two three four five six seven eight nine ten eleven twelve twenty "
      "thirty forty hundred thousand million and on in march june may").split()


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
  """n distinct (de, en) word-for-word pairs of 1-7 words (some exceed 16 tokens)."""
  rng = random.Random(seed)
  pairs = {}
  while len(pairs) < n:
    words = [rng.randrange(len(EN)) for _ in range(rng.randint(1, 7))]
    pairs[" ".join(DE[i] for i in words)] = " ".join(EN[i] for i in words)
  return list(pairs.items())
