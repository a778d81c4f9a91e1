"""`nmt-prepare`: tokenizes a raw corpus once into the shards that input_pipeline/prepared.py reads.

`prepare(config, output_dir)` reads data.train and data.eval through the input front door
(input_pipeline/datasets.py: the same skipping, file:line logs and data.max_skip_fraction),
trains or reuses the tokenizer on a uniform sample of data.train, tokenizes and
length-filters once (data.max_*_length, data.length_policy), and writes the directory whose
layout prepared.py's docstring lists.
Shards are written under a .tmp name and renamed when complete; the manifest is written
last, so a directory without one is unfinished and is refused. Train shards are cut from
the examples in a seeded spread order (`_spread_keys`): each of K shards holds ~1/K of every
stretch of the corpus (at most twice that of any 1% of it at 1000-example shards, tested),
so no replica trains on one file or domain for many steps. The order comes from an external
sort: sorted runs of _RUN_BYTES of examples in `.tmp` files, then a k-way merge. Memory is
bounded by one run, one shard and the tokenizer's training sample, not by the corpus; the
runs need as much disk as the train shards, until the merge deletes them.


Cost (design note): nmt-prepare holds one run (128 MiB of examples), one shard and the
tokenizer's sample, not the corpus: 10^8 examples are ~140 runs, merged in one pass (up to
_MERGE_RUNS open at once); it runs at the raw readers' speed in one process. docs/prepared.md
has these sizes and times extrapolated from a measured 1M-pair run.
"""
import heapq
import json
import os
import time
from typing import Iterable, Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import corpora
from input_pipeline import datasets
from input_pipeline import pipeline
from input_pipeline import prepared
from input_pipeline import tokenizer as tokenizer_lib

SHARD_EXAMPLES = 20000  # Default examples per shard written by nmt-prepare.
# The external sort of the train split (_spread): serialized examples sorted in memory per
# run, runs merged at once (open files, each with a read buffer), key bits.
_RUN_BYTES = 1 << 27
_MERGE_RUNS = 256
_RUN_READ_BYTES = 1 << 18
_KEY_BITS = 48  # Orders up to 2^48 examples.
_MASK64 = (1 << 64) - 1


def prepare(config: ml_collections.ConfigDict, output_dir: str, *,
            shard_examples: int = SHARD_EXAMPLES) -> dict:
  """Writes data.train and data.eval of `config` to `output_dir`; returns the manifest.

  A directory with a manifest is verified (checksums, config) instead and returned as it is.
  A directory without one (an interrupted run) is written again from the start.
  """
  if not isinstance(shard_examples, int) or shard_examples < 1:
    raise ValueError(f"shard_examples={shard_examples!r} is invalid: it must be an "
                     f"integer >= 1")
  for key in prepared.SPLITS:
    if datasets.parse_source(config.data[key]).kind == "prepared":
      raise ValueError(f"data.{key}={config.data[key]!r}: nmt-prepare reads a raw corpus "
                       f"(embedded, tsv:, text:, tfds:), not a prepared one")
  if tf.io.gfile.exists(os.path.join(output_dir, prepared.MANIFEST)):
    manifest = prepared.load_manifest(output_dir)
    prepared.check_config(manifest, config, output_dir)
    for split in prepared.SPLITS:
      prepared.verify_shards(output_dir, manifest, split)
    logging.info("%s is complete and verified; nothing to do.", output_dir)
    return manifest
  tf.io.gfile.makedirs(output_dir)
  _remove_unfinished(output_dir)
  tokenizer = tokenizer_lib.load_or_train(config.tokenizer, output_dir,
                                          datasets.tokenizer_sample(config))
  manifest = {
      "format_version": prepared.FORMAT_VERSION,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "data": {key: prepared.plain(config.data[key]) for key in prepared.DATA_KEYS},
      "tokenizer": _tokenizer_description(output_dir, tokenizer),
      "splits": {split: _write_split(config, tokenizer, split, output_dir, shard_examples)
                 for split in prepared.SPLITS},
  }
  _write_atomically(os.path.join(output_dir, prepared.MANIFEST),
                    json.dumps(manifest, indent=1, sort_keys=True).encode())
  logging.info("Prepared %s: %s", output_dir, prepared.summary(manifest))
  return manifest


def _remove_unfinished(output_dir: str) -> None:
  """Deletes shards and temporary files an interrupted run left (there is no manifest)."""
  for name in tf.io.gfile.listdir(output_dir):
    if name.endswith(".tmp") or (name.endswith(".tfrecord") and
                                 name.split("-")[0] in prepared.SPLITS):
      tf.io.gfile.remove(os.path.join(output_dir, name))


def _tokenizer_description(output_dir: str, tokenizer: tokenizer_lib.Tokenizer) -> dict:
  with tf.io.gfile.GFile(os.path.join(output_dir, "tokenizer",
                                      tokenizer_lib.CONFIG_FILE), "rb") as f:
    stored = json.loads(f.read())
  return {"config": stored["config"], "fingerprint": tokenizer.fingerprint}


def _write_split(config, tokenizer: tokenizer_lib.Tokenizer, split: str, output_dir: str,
                 shard_examples: int) -> dict:
  """Tokenizes one split and writes it shard by shard; returns its manifest entry.

  Train shards are consecutive chunks of the examples in spread order (`_spread`): each a
  stratified sample of the whole corpus, so no replica reads one stretch of it (one file,
  one domain) for many steps. Eval shards keep corpus order (eval_examples: the first ones).
  """
  source = config.data[split]
  stats, length_stats = corpora.SkipStats(), pipeline.LengthStats(f"prepare_{split}")
  keep_text = split == "eval"
  rng = np.random.default_rng(config.seed)
  grid = pipeline.padded_shapes(config)
  shards = []
  with corpora.surface_corpus_errors():
    examples = (example for batch in _tokenized_batches(config, tokenizer, source, stats,
                                                         length_stats, keep_text)
                for example in _examples(batch, keep_text))
    if not keep_text:
      examples = _spread(examples, output_dir, split, config.seed)
    for chunk in _chunks(examples, shard_examples):
      shards.append(_write_shard(output_dir, split, len(shards), chunk, rng, grid,
                                 by_bucket=not keep_text))
  if not shards:
    raise corpora.CorpusError(f"data.{split}={source!r}: no pair is left after the length "
                              f"filter ({length_stats.result()}); nothing to prepare")
  length_stats.log()
  return {"source": source, "examples": sum(s["examples"] for s in shards),
          "read": stats.read, "skipped": stats.skipped,
          "length_filter": length_stats.result(),
          "per_file": {name: {"read": read, "skipped": skipped}
                       for name, (read, skipped) in stats.per_file().items()},
          "shards": shards}


def _chunks(items: Iterable, size: int) -> Iterator[list]:
  """Lists of `size` consecutive items (the last one shorter)."""
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _spread(examples: Iterable[tuple[bytes, int]], output_dir: str, split: str,
            seed: int) -> Iterator[tuple[bytes, int]]:
  """`examples` sorted by `_spread_keys` of their positions, by an external sort: sorted
  runs of _RUN_BYTES go to `<split>-runL-NNNNN.tmp` files, then one k-way merge (a first
  merge pass above _MERGE_RUNS runs). Memory: one run and the merge's read buffers, not
  the corpus; disk: the runs take as much as the shards, until the merge deletes them.
  A split that fits in one run is sorted in memory and writes no run."""
  runs, buffer, size, start = [], [], 0, 0
  for example in examples:
    buffer.append(example)
    size += len(example[0])
    if size >= _RUN_BYTES:
      runs.append(_write_run(output_dir, f"{split}-run0-{len(runs):05d}.tmp",
                             _sorted_records(buffer, start, seed)))
      start, buffer, size = start + len(buffer), [], 0
  if not runs:
    for index in np.argsort(_spread_keys(np.arange(len(buffer)), seed)):
      yield buffer[index]
    return
  total = start + len(buffer)
  if buffer:
    runs.append(_write_run(output_dir, f"{split}-run0-{len(runs):05d}.tmp",
                           _sorted_records(buffer, start, seed)))
  buffer = []
  logging.info("%s: %d examples in %d sorted runs of up to %d MiB; merging them.", split,
               total, len(runs), _RUN_BYTES >> 20)
  level = 0
  while len(runs) > _MERGE_RUNS:
    level += 1
    runs = [_write_run(output_dir, f"{split}-run{level}-{i // _MERGE_RUNS:05d}.tmp",
                       _merged(runs[i:i + _MERGE_RUNS]))
            for i in range(0, len(runs), _MERGE_RUNS)]
  for record in _merged(runs):
    yield record[10:], int.from_bytes(record[8:10], "big")


def _spread_keys(positions: np.ndarray, seed: int) -> np.ndarray:
  """uint64 sort keys of corpus positions: sorted by them, any run of consecutive examples
  is a stratified random sample of the corpus.

  Bit b of a key (from the top) splits each aligned block of 2^(b+1) positions, among the
  positions already sharing the key's higher bits, one per half, at random (seeded by
  the seed, b, the block and those bits). So the positions with given top m bits are
  exactly one per aligned block of 2^m positions, at a random place in it: a shard of S of
  T examples holds about S/T of any stretch of the corpus (a uniform random split would
  leave some shards with twice their share of a stretch when the share is ~10 examples).
  A bijection of the positions < 2^_KEY_BITS: keys never tie.
  """
  positions = positions.astype(np.uint64)
  keys = np.zeros_like(positions)
  one = np.uint64(1)
  for bit in range(_KEY_BITS):
    salt = _mix64(np.array([(seed * _KEY_BITS + bit) & _MASK64], np.uint64))
    block = positions >> np.uint64(bit + 1)
    flip = _mix64(block ^ _mix64(keys ^ salt)) >> np.uint64(63)
    keys = (keys << one) | (((positions >> np.uint64(bit)) & one) ^ flip)
  return keys


def _mix64(values: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer: a bijection of uint64 whose output bits all depend on every
  input bit (numpy's uint64 arithmetic wraps, as it needs to)."""
  values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return values ^ (values >> np.uint64(31))


def _sorted_records(examples: list[tuple[bytes, int]], start: int,
                    seed: int) -> Iterator[bytes]:
  """Run records of examples at positions start, start + 1, ... in key order: the 8-byte
  big-endian key (so records compare as their keys), the length class, the example."""
  keys = _spread_keys(np.arange(start, start + len(examples)), seed)
  for index in np.argsort(keys):
    serialized, length = examples[index]
    yield int(keys[index]).to_bytes(8, "big") + length.to_bytes(2, "big") + serialized


def _write_run(output_dir: str, name: str, records: Iterable[bytes]) -> str:
  """Writes records, each after its 4-byte size, to a run file; returns its path."""
  path = os.path.join(output_dir, name)
  with tf.io.gfile.GFile(path, "wb") as f:
    for chunk in _chunks(records, 4096):
      f.write(b"".join(len(record).to_bytes(4, "big") + record for record in chunk))
  return path


def _merged(runs: list[str]) -> Iterator[bytes]:
  """The records of sorted runs in one sorted stream; each run is deleted once read."""
  return heapq.merge(*(_read_run(path) for path in runs))


def _read_run(path: str) -> Iterator[bytes]:
  """The records of a run file, read _RUN_READ_BYTES at a time; deletes the file at the end."""
  with tf.io.gfile.GFile(path, "rb") as f:
    pending = b""
    while chunk := f.read(_RUN_READ_BYTES):
      pending += chunk
      offset = 0
      while len(pending) - offset >= 4:
        end = offset + 4 + int.from_bytes(pending[offset:offset + 4], "big")
        if end > len(pending):
          break
        yield pending[offset + 4:end]
        offset = end
      pending = pending[offset:]
  if pending:
    raise prepared.PreparedDataError(f"{path} ends in a partial record: a temporary file of "
                            f"nmt-prepare changed while it ran; run it again")
  tf.io.gfile.remove(path)


def _tokenized_batches(config, tokenizer, source: str, stats: corpora.SkipStats,
                       length_stats: pipeline.LengthStats,
                       keep_text: bool) -> Iterator[dict]:
  """Batches of {"source", "target"} (values, row_splits) numpy pairs, in corpus order,
  with special tokens added and over-long pairs dropped or truncated as in training."""
  pairs = datasets.read(source, config.data, stats=stats).batch(pipeline.TOKENIZE_BATCH)

  def tokenize(src, tgt):
    features = {"source": tokenizer.tokenize_source(src),
                "target": tokenizer.tokenize_target(tgt)}
    if keep_text:
      features.update(source_text=src, target_text=tgt)
    return features

  batches = pairs.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
  batches = pipeline.add_special_tokens(
      pipeline.filter_length(batches, config.data, length_stats))

  def flat(features):
    out = {k: v for k, v in features.items() if k.endswith("_text")}
    for key in ("source", "target"):
      out[key] = (features[key].flat_values, features[key].row_splits)
    return out

  return batches.map(flat).prefetch(2).as_numpy_iterator()


def _examples(batch: dict, keep_text: bool) -> list[tuple[bytes, int]]:
  """(serialized tf.train.Example, length class) of each pair of a batch."""
  sources = np.split(batch["source"][0], batch["source"][1][1:-1])
  targets = np.split(batch["target"][0], batch["target"][1][1:-1])
  examples = []
  for i, (source, target) in enumerate(zip(sources, targets)):
    feature = {"source": _int64s(source), "target": _int64s(target)}
    if keep_text:
      feature["source_text"] = _bytes(batch["source_text"][i])
      feature["target_text"] = _bytes(batch["target_text"][i])
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    examples.append((example.SerializeToString(), max(len(source), len(target))))
  return examples


def _int64s(ids: np.ndarray) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=ids.tolist()))


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _write_shard(output_dir: str, split: str, index: int, examples: list,
                 rng: np.random.Generator, grid: list[int], by_bucket: bool) -> dict:
  """Writes one shard (consecutive examples of the spread order for train, of the corpus
  for eval) and returns its manifest entry.

  Train shards are one file per grid length L (`train-00012-L016.tfrecord`), shuffled, so a
  reader batches each length from its own files without looking at single examples. Eval
  shards are one file in corpus order (eval_examples takes the first ones for BLEU). Each
  file is written under a .tmp name and renamed when complete.
  """
  lengths = np.array([length for _, length in examples])
  values, numbers = np.unique(lengths, return_counts=True)
  entry = {"examples": len(examples), "files": [],
           "lengths": {str(length): int(n) for length, n in zip(values, numbers)}}
  if not by_bucket:
    entry["files"].append(_write_file(output_dir, f"{split}-{index:05d}.tfrecord",
                                      [serialized for serialized, _ in examples]))
    return entry
  buckets = np.searchsorted(grid, lengths)
  for b, length in enumerate(grid):
    members = np.flatnonzero(buckets == b)
    if len(members):
      name = f"{split}-{index:05d}-L{length:03d}.tfrecord"
      entry["files"].append(dict(length=length, **_write_file(
          output_dir, name, [examples[i][0] for i in rng.permutation(members)])))
  return entry


def _write_file(output_dir: str, name: str, records: list[bytes]) -> dict:
  path = os.path.join(output_dir, name)
  with tf.io.TFRecordWriter(path + ".tmp") as writer:
    for record in records:
      writer.write(record)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return {"file": name, "examples": len(records), "bytes": tf.io.gfile.stat(path).length,
          "sha256": prepared.sha256(path)}


def _write_atomically(path: str, data: bytes) -> None:
  with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
    f.write(data)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
