"""Input-pipeline throughput: how fast the train dataset yields batches, without a model.

Answers "is the input pipeline the bottleneck?", shows what the bucketing grid costs in
padding, and how long a run resumed at `start_step` waits for its first batch (raw sources
replay the pipeline up to it; prepared: ones jump there). Wired to `nmt-bench input`, which
prints the returned dict as one JSON line.
"""
import time

from absl import logging
import numpy as np

from input_pipeline import datasets
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib


def run(config, workdir: str, num_batches: int = 200, *, warmup_batches: int = 10,
        start_step: int = 0) -> dict:
  """Iterates `num_batches` train batches after `warmup_batches`; returns rates and shapes.

  Builds (or reuses) the tokenizer in `workdir` first. Token counts exclude padding;
  padding_fraction is pad cells / all cells over source and target together;
  seconds_to_first_batch runs from building the dataset (at `start_step`) to its first batch.
  """
  if num_batches <= 0:
    raise ValueError(f"num_batches={num_batches}; must be > 0.")
  tokenizer = tokenizer_lib.load_or_train(config.tokenizer, workdir,
                                          datasets.tokenizer_sample(config))
  length_stats = pipeline.LengthStats()
  examples = source_tokens = target_tokens = cells = 0
  shapes = set()
  with datasets.surface_corpus_errors():
    start = time.perf_counter()
    iterator = iter(datasets.make_dataset(config, tokenizer, "train", start_step=start_step,
                                          length_stats=length_stats))
    next(iterator)
    seconds_to_first_batch = time.perf_counter() - start
    for _ in range(warmup_batches):
      next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
      batch = next(iterator)
      source, target = batch["source"].numpy(), batch["target"].numpy()
      examples += source.shape[0]
      source_tokens += int(np.count_nonzero(source != tokenizer_lib.PAD_ID))
      target_tokens += int(np.count_nonzero(target != tokenizer_lib.PAD_ID))
      cells += source.size + target.size
      shapes.add(source.shape)
    seconds = time.perf_counter() - start

  length_stats.log()
  result = {
      "source": config.data.train,
      "examples_per_sec": examples / seconds,
      "target_tokens_per_sec": target_tokens / seconds,
      "source_tokens_per_sec": source_tokens / seconds,
      "padding_fraction": 1.0 - (source_tokens + target_tokens) / cells,
      "distinct_batch_shapes": len(shapes),
      "batch_shapes": [list(shape) for shape in sorted(shapes)],
      "num_batches": num_batches,
      "seconds": seconds,
      "start_step": start_step,
      "seconds_to_first_batch": seconds_to_first_batch,
      "length_stats": length_stats.result(),
  }
  logging.info("Input benchmark: %s", result)
  return result
