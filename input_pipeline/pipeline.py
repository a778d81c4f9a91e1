"""The shared tf.data stages: shuffle, tokenize, filter_length, add_special_tokens, bucket.

datasets.py (the front door) chains them over the pairs of a raw source (`batch_pairs`);
prepared.py and prepare.py use them for stored token ids.

Every batch is {"source": int32 [B, L], "target": int32 [B, L]}, 0-padded, where L is one
of `padded_shapes(config)` (from data.bucket_boundaries), so a compiled train step sees a
small fixed set of shapes. source = ids + [EOS]; target = [BOS] + ids + [EOS].

An input pipeline feeding k local replicas (MirroredStrategy deals its batches round robin,
k consecutive ones per step) batches k x the per-replica batch and splits it (`bucket`,
`split_steps`), so the replicas of one step share L and none waits for a longer one.
"""
from absl import logging
import tensorflow as tf

from input_pipeline.tokenizer import BOS_ID, EOS_ID, SubwordSampler, Tokenizer

# Strings per SentencePiece call: one op call per batch is ~10x faster than one per
# example (see benchmark.py and docs/data.md).
TOKENIZE_BATCH = 256


class LengthStats(tf.Module):
  """Counts of pairs seen, dropped and truncated by `filter_length` (all pipelines).

  The counters are variables updated inside the tf.data graph; create one outside any
  tf.function, pass it to `make_dataset`, and call `log()` or `result()` from Python.
  """

  def __init__(self, name: str = "length_stats"):
    super().__init__(name=name)
    with tf.init_scope():
      self.seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="seen")
      self.dropped = tf.Variable(0, dtype=tf.int64, trainable=False, name="dropped")
      self.truncated = tf.Variable(0, dtype=tf.int64, trainable=False, name="truncated")

  def add(self, seen: tf.Tensor, dropped: tf.Tensor, truncated: tf.Tensor) -> None:
    """In-graph update; prints a line when the dropped+truncated total reaches 2**k."""
    before = self.dropped + self.truncated
    self.seen.assign_add(tf.cast(seen, tf.int64))
    self.dropped.assign_add(tf.cast(dropped, tf.int64))
    self.truncated.assign_add(tf.cast(truncated, tf.int64))
    after = before + tf.cast(dropped + truncated, tf.int64)
    # Bit length grows exactly when a power of two is reached: log2(N) lines, not N.
    crossed = _bit_length(after) > _bit_length(before)
    message = self.name + (": over-long pairs so far: {} dropped, {} truncated, of {} "
                           "seen (data.max_*_length, data.length_policy).")
    tf.cond(crossed, lambda: tf.print(tf.strings.format(
        message, (self.dropped, self.truncated, self.seen))), tf.no_op)

  def result(self) -> dict[str, int]:
    return {"seen": int(self.seen.numpy()), "dropped": int(self.dropped.numpy()),
            "truncated": int(self.truncated.numpy())}

  def log(self) -> None:
    counts = self.result()
    logging.info("%s: %d pairs seen, %d dropped and %d truncated as over-long.",
                 self.name, counts["seen"], counts["dropped"], counts["truncated"])


def _bit_length(x: tf.Tensor) -> tf.Tensor:
  """Number of bits of a non-negative int64 (0 for 0)."""
  return tf.reduce_sum(tf.cast(tf.bitwise.right_shift(
      tf.expand_dims(x, -1), tf.range(63, dtype=tf.int64)) > 0, tf.int32), -1)


def batch_pairs(pairs: tf.data.Dataset, config, tokenizer: Tokenizer, *, training: bool,
                repeat: bool, input_context: tf.distribute.InputContext | None = None,
                start_step: int = 0, length_stats: LengthStats) -> tf.data.Dataset:
  """(source, target) string pairs -> the batches of datasets.make_dataset: shuffled (train),
  repeated, tokenized, length-filtered, bucketed onto the grid; from step `start_step`
  by replaying the stream (O(start_step) input work; prepared: sources skip in O(1))."""
  if training and config.data.shuffle_buffer > 0:
    pairs = pairs.shuffle(config.data.shuffle_buffer, seed=config.seed,
                          reshuffle_each_iteration=True)
  if repeat:
    pairs = pairs.repeat()
  sampler = None
  if training and config.tokenizer.get("sampling_alpha", 0) > 0:  # 0: an older config.json.
    sampler = tokenizer.sampler(config.tokenizer.sampling_alpha,
                                config.tokenizer.sampling_nbest)
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  dataset = tokenize(pairs.batch(TOKENIZE_BATCH), tokenizer,
                     deterministic=config.data.deterministic, sampler=sampler,
                     seed=(config.seed, pipeline_id))
  dataset = filter_length(dataset, config.data, length_stats)
  dataset = unbatch(add_special_tokens(dataset))
  dataset = bucket(dataset, config, input_context=input_context, drop_remainder=training)
  if start_step:
    dataset = dataset.skip(start_step * replicas_per_pipeline(input_context))
  return dataset.prefetch(tf.data.AUTOTUNE)


def tokenize(dataset: tf.data.Dataset, tokenizer: Tokenizer, *,
             deterministic: bool = True, sampler: SubwordSampler | None = None,
             seed: tuple[int, int] = (0, 0)) -> tf.data.Dataset:
  """Batches of (src, tgt) tf.string [B] -> {"source", "target"}: int32 ragged [B, (T)].

  With a `sampler` (subword regularisation, training only) both sides get sampled
  segmentations, seeded by (`seed`, the batch's index in this stream): the same on every
  replay of the stream (resume), different for each epoch's pass over a sentence.
  """

  def tokenize_batch(src, tgt):
    return {"source": tokenizer.tokenize_source(src),
            "target": tokenizer.tokenize_target(tgt)}

  def sample_batch(index, pair):
    batch_seed = tf.random.experimental.stateless_fold_in(
        tf.constant(seed, tf.int64), index)
    return {"source": sampler.tokenize_source(pair[0], batch_seed),
            "target": sampler.tokenize_target(pair[1], batch_seed)}

  if sampler is not None:  # enumerate() numbers the batches before the parallel map.
    return dataset.enumerate().map(sample_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                   deterministic=deterministic)
  return dataset.map(tokenize_batch, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=deterministic)


def filter_length(dataset: tf.data.Dataset, data_config,
                  length_stats: LengthStats) -> tf.data.Dataset:
  """Drops or truncates ragged id batches that would exceed the max lengths, counting them.

  data.max_source_length counts the EOS to be added and data.max_target_length counts BOS
  and EOS, so ids are limited to max_source_length - 1 and max_target_length - 2. Other
  features of the batch (e.g. the text, [B]) are kept or dropped with their pair.
  """
  max_source_ids = data_config.max_source_length - 1
  max_target_ids = data_config.max_target_length - 2
  truncate = data_config.length_policy == "truncate"

  def limit(features):
    source, target = features["source"], features["target"]
    others = {key: value for key, value in features.items()
              if key not in ("source", "target")}
    too_long = ((source.row_lengths() > max_source_ids) |
                (target.row_lengths() > max_target_ids))
    num_too_long = tf.reduce_sum(tf.cast(too_long, tf.int64))
    seen = tf.size(too_long, out_type=tf.int64)
    if truncate:
      length_stats.add(seen, tf.constant(0, tf.int64), num_too_long)
      return {"source": source[:, :max_source_ids], "target": target[:, :max_target_ids],
              **others}
    length_stats.add(seen, num_too_long, tf.constant(0, tf.int64))
    keep = tf.logical_not(too_long)
    return {"source": tf.ragged.boolean_mask(source, keep),
            "target": tf.ragged.boolean_mask(target, keep),
            **{key: tf.boolean_mask(value, keep) for key, value in others.items()}}

  return dataset.map(limit, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=data_config.deterministic)


def add_special_tokens(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Ragged id batches -> source = ids + [EOS], target = [BOS] + ids + [EOS]; other
  features pass through."""

  def add(features):
    source, target = features["source"], features["target"]
    batch = source.nrows()
    eos = tf.fill([batch, 1], tf.constant(EOS_ID, source.dtype))
    bos = tf.fill([batch, 1], tf.constant(BOS_ID, target.dtype))
    return {**features, "source": tf.concat([source, eos], axis=1),
            "target": tf.concat([bos, target, eos], axis=1)}

  return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def unbatch(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Ragged batches -> examples {"source": int32 [S], "target": int32 [T]} (dense).

  Unbatched rows already are dense tensors, but their spec stays ragged (rank 0), which
  padded_batch rejects; an identity map gives them a TensorSpec.
  """
  return dataset.unbatch().map(dict, num_parallel_calls=tf.data.AUTOTUNE)


def bucket(dataset: tf.data.Dataset, config, *,
           input_context: tf.distribute.InputContext | None = None,
           drop_remainder: bool = True) -> tf.data.Dataset:
  """Examples of variable length -> per-replica batches padded to exactly a grid length.

  An example goes to the smallest grid length L >= max(len(source), len(target)); both
  sides are padded with PAD (0) to L. Batch size per bucket from `bucket_batch_sizes`.
  Buckets fill k x that size (k replicas per pipeline) and `split_steps` cuts each into
  the k batches of one step, so the replicas of a step get the same L.
  """
  grid = padded_shapes(config)
  replicas = replicas_per_pipeline(input_context)
  batch_sizes = [size * replicas for size in bucket_batch_sizes(config, input_context)]
  step_batches = dataset.bucket_by_sequence_length(
      element_length_func=_example_length,
      # The library pads a bucket to its boundary - 1 and puts length n in the first
      # bucket with n < boundary, so boundary L + 1 holds lengths up to L, padded to L.
      bucket_boundaries=[length + 1 for length in grid],
      # One more bucket (beyond the grid) always exists; filter_length keeps it empty.
      bucket_batch_sizes=batch_sizes + batch_sizes[-1:],
      pad_to_bucket_boundary=True,
      drop_remainder=drop_remainder)
  return split_steps(step_batches, replicas)


def split_steps(dataset: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
  """Step batches [k * B, L] -> k consecutive per-replica batches [B, L] (same L); k = 1: as
  they are. A short step batch (an eval remainder) gives up to k of ceil(rows / k) rows."""
  if replicas == 1:
    return dataset

  def split(features):
    rows = tf.shape(features["source"], out_type=tf.int64)[0]
    size = tf.maximum((rows + replicas - 1) // replicas, 1)
    return tf.data.Dataset.range(0, rows, size).map(
        lambda start: {key: value[start:start + size] for key, value in features.items()})

  return dataset.flat_map(split)


def replicas_per_pipeline(input_context: tf.distribute.InputContext | None) -> int:
  """k: the local replicas one input pipeline feeds, k consecutive batches per step."""
  if input_context is None:
    return 1
  return input_context.num_replicas_in_sync // input_context.num_input_pipelines


def _example_length(example) -> tf.Tensor:
  return tf.maximum(tf.shape(example["source"])[0], tf.shape(example["target"])[0])


def bucket_batch_sizes(config, input_context: tf.distribute.InputContext | None = None
                       ) -> list[int]:
  """Per-replica batch size (sentences) for each length in `padded_shapes(config)`.

  sentences: train.batch_size split over replicas. tokens: the per-replica token budget
  train.tokens_per_batch // num_replicas divided by the padded length (at least 1).
  """
  grid = padded_shapes(config)
  if config.data.batch_by == "sentences":
    batch_size = config.train.batch_size
    if input_context is not None:
      batch_size = input_context.get_per_replica_batch_size(batch_size)
    return [batch_size] * len(grid)
  num_replicas = input_context.num_replicas_in_sync if input_context else 1
  budget = config.train.tokens_per_batch // num_replicas
  return [max(1, budget // length) for length in grid]


def padded_shapes(config) -> list[int]:
  """The sequence lengths batches can have: the bucket boundaries up to the first one
  holding both max lengths (longer boundaries can never be used; configs/validate.py
  checks that the last boundary holds them)."""
  longest = max(config.data.max_source_length, config.data.max_target_length)
  grid = []
  for length in config.data.bucket_boundaries:
    grid.append(int(length))
    if length >= longest:
      break
  return grid
