"""Which shard of nmt-prepare's output each example goes to, in which order, and writing it.

Shared by the single-process path (prepare.py) and the Beam path (prepare_beam.py), so that
both write the same shards, byte for byte. Everything here depends on an example's content
and its position in the corpus (corpora.LINE_BITS: its file and line), never on the order
in which it was read, so workers reading different files agree without global counts:
  train  key = spread(line of the unit; seed, unit) << UNIT_BITS | unit (`train_keys`);
         K = ceil(pairs / shard_examples) shards, counting the pairs that reach the length
         filter (so K is known before tokenizing: Beam workers group examples by shard
         as they make them); shard j holds the keys in [j * w, (j + 1) * w),
         w = ceil(2^64 / K) (`shard_of`), one file per grid length, each in key order.
  eval   key = position; shards are consecutive runs of shard_examples in corpus order (so
         data.eval_examples takes the first pairs).
Within a unit, the spread keys of any aligned block of 2^m lines have all 2^m distinct top-m
bits (prepare.md: "Spread"), so a key range of width 2^64 / K takes ~1/K of every stretch
of every file: each shard is a stratified sample of the corpus. Shard sizes are
~examples / K: shard_examples less the share of over-long pairs dropped, ±1 per block.
"""
import os

import numpy as np
import tensorflow as tf

from input_pipeline import corpora
from input_pipeline import pipeline
from input_pipeline import prepared

LINE_BITS = corpora.LINE_BITS  # Low bits of a position: the line in its unit.
UNIT_BITS = 64 - LINE_BITS  # Low bits of a train key: the unit (ties between units).
_MASK64 = (1 << 64) - 1
# Pairs per tokenize call and per `examples` batch: larger than training's TOKENIZE_BATCH,
# as the keys and the serialization cost a few numpy calls per batch (~40 for the keys).
BATCH = 2048


def train_keys(positions: np.ndarray, seed: int) -> np.ndarray:
  """uint64 keys of the train examples at int64 `positions`: distinct, and sorted by them
  every run of keys is a stratified sample of every file (module docstring)."""
  positions = positions.astype(np.uint64)
  units = positions >> np.uint64(LINE_BITS)
  lines = positions & np.uint64((1 << LINE_BITS) - 1)
  salts = _mix64(units ^ _mix64(np.full_like(units, seed & _MASK64)))
  return (_spread(lines, salts) << np.uint64(UNIT_BITS)) | units


def _spread(lines: np.ndarray, salts: np.ndarray) -> np.ndarray:
  """A bijection of the LINE_BITS-bit lines (per salt): key bit b from the top is line bit b
  flipped at random (seeded by the salt, b, the aligned block of 2^(b+1) lines and the key's
  higher bits), so the lines of an aligned block of 2^m have distinct top-m key bits."""
  keys = np.zeros_like(lines)
  one = np.uint64(1)
  for bit in range(LINE_BITS):
    salt = _mix64(salts ^ np.uint64(bit + 1))
    block = lines >> np.uint64(bit + 1)
    flip = _mix64(block ^ _mix64(keys ^ salt)) >> np.uint64(63)
    keys = (keys << one) | (((lines >> np.uint64(bit)) & one) ^ flip)
  return keys


def _mix64(values: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer: a bijection of uint64 whose output bits all depend on every
  input bit (numpy's uint64 arithmetic wraps, as it needs to)."""
  values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return values ^ (values >> np.uint64(31))


def num_shards(pairs: int, shard_examples: int) -> int:
  """K, the number of train shards (key ranges), for `pairs` pairs before length filtering."""
  return max(1, -(-pairs // shard_examples))


def shard_of(keys: np.ndarray, shards: int) -> np.ndarray:
  """The train shard (key range) of each uint64 key: key // ceil(2^64 / shards)."""
  if shards == 1:
    return np.zeros(len(keys), np.int64)
  width = np.uint64(-(-(1 << 64) // shards))
  return (keys // width).astype(np.int64)


def tokenized_batches(pairs: tf.data.Dataset, config, tokenizer, length_stats,
                      keep_text: bool):
  """(position, source, target) pairs -> numpy batches {"position", "source", "target"
  (values, row_splits), ["source_text", "target_text"]}, with special tokens added and
  over-long pairs dropped or truncated as in training (counted in `length_stats`)."""

  def tokenize(position, src, tgt):
    features = {"position": position, "source": tokenizer.tokenize_source(src),
                "target": tokenizer.tokenize_target(tgt)}
    if keep_text:
      features.update(source_text=src, target_text=tgt)
    return features

  batches = pairs.batch(BATCH).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
  batches = pipeline.add_special_tokens(
      pipeline.filter_length(batches, config.data, length_stats))

  def flat(features):
    out = {k: v for k, v in features.items() if k not in ("source", "target")}
    for key in ("source", "target"):
      out[key] = (features[key].flat_values, features[key].row_splits)
    return out

  return batches.map(flat).prefetch(2).as_numpy_iterator()


def examples(batch: dict, keep_text: bool, seed: int
             ) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
  """(keys uint64, length classes, serialized tf.train.Examples) of a tokenized batch;
  train keys (`train_keys`) unless keep_text (eval: the positions)."""
  sources = np.split(batch["source"][0], batch["source"][1][1:-1])
  targets = np.split(batch["target"][0], batch["target"][1][1:-1])
  records = []
  for i, (source, target) in enumerate(zip(sources, targets)):
    example = tf.train.Example()  # Filled in place: twice as fast as building Features.
    feature = example.features.feature
    feature["source"].int64_list.value.extend(source.tolist())
    feature["target"].int64_list.value.extend(target.tolist())
    if keep_text:
      feature["source_text"].bytes_list.value.append(batch["source_text"][i])
      feature["target_text"].bytes_list.value.append(batch["target_text"][i])
    # Deterministic: map entries in key order, the same bytes in every process.
    records.append(example.SerializeToString(deterministic=True))
  lengths = np.maximum(np.diff(batch["source"][1]), np.diff(batch["target"][1]))
  positions = batch["position"]
  keys = positions.astype(np.uint64) if keep_text else train_keys(positions, seed)
  return keys, lengths, records


def write_shard(output_dir: str, split: str, index: int, records: list[bytes],
                lengths: np.ndarray, grid: list[int]) -> dict:
  """Writes shard `index` of `split` (its records in key order) and returns its manifest
  entry: train shards are one file per grid length L (`train-00012-L016.tfrecord`, so a
  reader batches each length from its own files), eval shards one file. Each file is
  written under a .tmp name and renamed when complete."""
  lengths = np.asarray(lengths)
  values, numbers = np.unique(lengths, return_counts=True)
  entry = {"examples": len(records), "files": [],
           "lengths": {str(length): int(n) for length, n in zip(values, numbers)}}
  if split != "train":
    entry["files"].append(_write_file(output_dir, f"{split}-{index:05d}.tfrecord", records))
    return entry
  buckets = np.searchsorted(grid, lengths)
  for b, length in enumerate(grid):
    members = np.flatnonzero(buckets == b)
    if len(members):
      name = f"{split}-{index:05d}-L{length:03d}.tfrecord"
      entry["files"].append(dict(length=length, **_write_file(
          output_dir, name, [records[i] for i in members])))
  return entry


def _write_file(output_dir: str, name: str, records: list[bytes]) -> dict:
  path = os.path.join(output_dir, name)
  with tf.io.TFRecordWriter(path + ".tmp") as writer:
    for record in records:
      writer.write(record)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return {"file": name, "examples": len(records), "bytes": tf.io.gfile.stat(path).length,
          "sha256": prepared.sha256(path)}


def split_entry(split: str, source: str, stats: corpora.SkipStats,
                length_filter: dict[str, int], shards: list[dict]) -> dict:
  """A split's manifest entry; CorpusError if no example is left."""
  if not shards:
    raise corpora.CorpusError(f"data.{split}={source!r}: no pair is left after the length "
                              f"filter ({length_filter}); nothing to prepare")
  return {"source": source, "examples": sum(s["examples"] for s in shards),
          "read": stats.read, "skipped": stats.skipped, "length_filter": length_filter,
          "per_file": {name: {"read": read, "skipped": skipped}
                       for name, (read, skipped) in stats.per_file().items()},
          "shards": shards}
