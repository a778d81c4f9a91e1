"""Prepared corpora: tokenized once by `nmt-prepare`, read by pure tf.data, resumed in O(1).

`prepare(config, output_dir)` reads data.train and data.eval with corpora.read (same skipping,
file:line logs and data.max_skip_fraction), trains or reuses the tokenizer, tokenizes and
length-filters once (data.max_*_length, data.length_policy), and writes:
  <dir>/tokenizer/                 the tokenizer (tokenizer.json + model files)
  <dir>/train-00000.tfrecord ...   tf.train.Example records: "source" = ids + [EOS], "target"
                                   = [BOS] + ids + [EOS] (int64 lists); train shards sorted
                                   by grid length, each a stratified sample of the whole
                                   corpus (below), eval shards in corpus order with the text
                                   ("source_text", "target_text": BLEU references)
  <dir>/manifest.json              counts, skipped lines by reason, length-filter counts, the
                                   tokenizer config and fingerprint, the data.* lengths and
                                   grid, and per shard: examples, bytes, sha256, a histogram
                                   of lengths and the record run of each grid length
Shards are written under a .tmp name and renamed when complete; the manifest is written
last, so a directory without one is unfinished and is refused. Train shards are cut from
the examples in a seeded spread order (`_spread_keys`): each of K shards holds ~1/K of every
stretch of the corpus (at most twice that of any 1% of it at 1000-example shards, tested),
so no replica trains on one file or domain for many steps. The order comes from an external
sort: sorted runs of _RUN_BYTES of examples in `.tmp` files, then a k-way merge. Memory is
bounded by one run, one shard and the tokenizer's training sample, not by the corpus; the
runs need as much disk as the train shards, until the merge deletes them.

Reading (`make_dataset`): pipeline i of N gets shards i, i+N, ...; they form G groups of up
to GROUP_SHARDS shards (group j = shards j, j+G, j+2G, ...). An epoch visits the groups in
an order drawn from (seed, epoch). In a group, each grid length L is one stream, prefetched
in its own thread (so the streams read their files in parallel): the group's files of
length L one after the other, permuted in windows of data.shuffle_buffer records
(stateless, seeded by the group), batched by k * B_L (one step of the k local replicas
this pipeline feeds), parsed and padded to L a batch at a time. The order of the steps of
the different lengths is a permutation of the group's step labels drawn from (seed,
group); each step batch is then cut into the k per-replica batches of B_L, so the replicas
of a step share L. No op looks at one example at a time and no Python runs per example. A
group is a pure function of its global index g = epoch * G + slot, and its step count,
sum over L of floor(examples of length L / (k * B_L)), comes from the manifest. So step N
maps by arithmetic to (g, offset); the batches before the offset are skipped as
serialized records, before parsing.

Why this and not checkpointing the tf.data iterator: nmt-train's distributed iterator
(distribute_datasets_from_function) cannot be saved in a checkpoint, a saved shuffle
buffer would add to every checkpoint, and neither works through the tf.data service. The
README (Prepared corpora) has the measured cost of both paths.

Cost (design note). At any step N, resuming costs: one manifest read, a size and sha256
check of this pipeline's shards, O(G) arithmetic, and skipping at most one group's batches
(GROUP_SHARDS * shard_examples = 80k examples by default, whole windows unparsed): the same
at step 10^6 as at step 100. At 10^8 corpus lines: 5000 shards of 20k examples, up to one
file per shard and grid length; every start lists the directory and hashes this pipeline's
share of the data, O(corpus bytes / workers), which names a damaged file before training
rather than failing mid-run. nmt-prepare holds one run (128 MiB of examples), one shard and
the tokenizer's sample, not the corpus: 10^8 examples are ~140 runs, merged in one pass (up
to _MERGE_RUNS open at once); it runs at the raw readers' speed in one process. The README
(Prepared corpora) has these sizes and times extrapolated from a measured 1M-pair run.
Trade-offs: examples of different groups never share a batch, and the tf.data service path
(`data.service_address`) hands out whole groups to its workers in the order they ask, so
it resumes at a group boundary and its order is not reproducible.
"""
import concurrent.futures
import hashlib
import heapq
import json
import os
import time
from typing import Iterable, Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from configs import validate as validate_lib
from input_pipeline import corpora
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
GROUP_SHARDS = 4  # Shards read and shuffled together; a resume skips at most one group.
SHARD_EXAMPLES = 20000  # Default examples per shard written by nmt-prepare.
# Batches each grid length's stream prepares ahead, in its own thread: the streams of a
# group read their files concurrently. (Within a stream the files are read one after the
# other: interleaving them record by record, num_parallel_reads, halved the throughput.)
_STREAM_PREFETCH = 2
_PARSE_BATCH = 1024  # Records per parse_example call (one call per batch, not per record).
_DATA_KEYS = ("max_source_length", "max_target_length", "length_policy", "bucket_boundaries")
_MAX_INT64 = np.iinfo(np.int64).max
# nmt-prepare's external sort of the train split (_spread): serialized examples sorted in
# memory per run, runs merged at once (open files, each with a read buffer), key bits.
_RUN_BYTES = 1 << 27
_MERGE_RUNS = 256
_RUN_READ_BYTES = 1 << 18
_KEY_BITS = 48  # Orders up to 2^48 examples.
_MASK64 = (1 << 64) - 1


class PreparedDataError(corpora.CorpusError):
  """A prepared directory that cannot be used as it is; the message names the file and what
  to do."""


# ---------------------------------------------------------------------------- writing


def prepare(config: ml_collections.ConfigDict, output_dir: str, *,
            shard_examples: int = SHARD_EXAMPLES) -> dict:
  """Writes data.train and data.eval of `config` to `output_dir`; returns the manifest.

  A directory with a manifest is verified (checksums, config) instead and returned as it is.
  A directory without one (an interrupted run) is written again from the start.
  """
  validate_lib.validate(config)
  if not isinstance(shard_examples, int) or shard_examples < 1:
    raise ValueError(f"shard_examples={shard_examples!r} is invalid: it must be an "
                     f"integer >= 1")
  for key in SPLITS:
    if corpora.parse_source(config.data[key]).kind == "prepared":
      raise ValueError(f"data.{key}={config.data[key]!r}: nmt-prepare reads a raw corpus "
                       f"(embedded, tsv:, text:, tfds:), not a prepared one")
  if tf.io.gfile.exists(os.path.join(output_dir, MANIFEST)):
    manifest = load_manifest(output_dir)
    check_config(manifest, config, output_dir)
    for split in SPLITS:
      verify_shards(output_dir, manifest, split)
    logging.info("%s is complete and verified; nothing to do.", output_dir)
    return manifest
  tf.io.gfile.makedirs(output_dir)
  _remove_unfinished(output_dir)
  tokenizer = tokenizer_lib.load_or_train(config.tokenizer, output_dir,
                                          pipeline.tokenizer_sample(config))
  manifest = {
      "format_version": FORMAT_VERSION,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "data": {key: _plain(config.data[key]) for key in _DATA_KEYS},
      "tokenizer": _tokenizer_description(output_dir, tokenizer),
      "splits": {split: _write_split(config, tokenizer, split, output_dir, shard_examples)
                 for split in SPLITS},
  }
  _write_atomically(os.path.join(output_dir, MANIFEST),
                    json.dumps(manifest, indent=1, sort_keys=True).encode())
  logging.info("Prepared %s: %s", output_dir, summary(manifest))
  return manifest


def _plain(value):
  """A config value as JSON holds it (tuples become lists), for comparing with a manifest."""
  return list(value) if isinstance(value, (tuple, list)) else value


def summary(manifest: dict) -> dict:
  """The manifest without its per-shard and per-file lists, for one log or JSON line."""
  return {split: {key: value for key, value in info.items()
                  if key not in ("shards", "per_file")}
          for split, info in manifest["splits"].items()}


def _remove_unfinished(output_dir: str) -> None:
  """Deletes shards and temporary files an interrupted run left (there is no manifest)."""
  for name in tf.io.gfile.listdir(output_dir):
    if name.endswith(".tmp") or (name.endswith(".tfrecord") and
                                 name.split("-")[0] in SPLITS):
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
    raise PreparedDataError(f"{path} ends in a partial record: a temporary file of "
                            f"nmt-prepare changed while it ran; run it again")
  tf.io.gfile.remove(path)


def _tokenized_batches(config, tokenizer, source: str, stats: corpora.SkipStats,
                       length_stats: pipeline.LengthStats,
                       keep_text: bool) -> Iterator[dict]:
  """Batches of {"source", "target"} (values, row_splits) numpy pairs, in corpus order,
  with special tokens added and over-long pairs dropped or truncated as in training."""
  pairs = corpora.read(source, config.data, stats=stats).batch(pipeline.TOKENIZE_BATCH)

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
          "sha256": _sha256(path)}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
  with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
    f.write(data)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


# ---------------------------------------------------------------------------- checking


def load_manifest(directory: str) -> dict:
  """The parsed manifest.json; PreparedDataError if it is missing or unreadable."""
  path = os.path.join(directory, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise PreparedDataError(
        f"{path} does not exist: {directory} is not a finished prepared corpus (nmt-prepare "
        f"writes the manifest last); run nmt-prepare --config=... --output_dir={directory}")
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      manifest = json.loads(f.read())
    if manifest["format_version"] != FORMAT_VERSION:
      raise ValueError(f"format_version {manifest['format_version']}, this code reads "
                       f"{FORMAT_VERSION}")
    for split in SPLITS:
      for shard in manifest["splits"][split]["shards"]:
        for file in shard["files"]:
          file["file"], file["examples"], file["bytes"], file["sha256"]  # noqa: B018
  except (ValueError, KeyError, TypeError) as e:
    raise PreparedDataError(f"{path} is not a valid manifest ({type(e).__name__}: {e}); "
                            f"delete {directory} and run nmt-prepare again") from None
  return manifest


def check_config(manifest: dict, config, directory: str) -> None:
  """PreparedDataError naming each data.*/tokenizer.* key whose value differs from the one
  the directory was prepared with."""
  differing = [f"data.{key}: prepared {value!r} vs config {_plain(config.data[key])!r}"
               for key, value in manifest["data"].items()
               if _plain(config.data[key]) != value]
  differing += [f"tokenizer.{key}: prepared {value!r} vs config {config.tokenizer[key]!r}"
                for key, value in manifest["tokenizer"]["config"].items()
                if key in config.tokenizer and config.tokenizer[key] != value]
  if differing:
    raise PreparedDataError(
        f"{os.path.join(directory, MANIFEST)} was prepared with another config ("
        f"{'; '.join(differing)}); set those keys as prepared, or run nmt-prepare with "
        f"this config into a new --output_dir")


def check_tokenizer(manifest: dict, tokenizer: tokenizer_lib.Tokenizer,
                    directory: str) -> None:
  """PreparedDataError if the run's tokenizer is not the one the directory was made with."""
  if tokenizer.fingerprint != manifest["tokenizer"]["fingerprint"]:
    raise PreparedDataError(
        f"{directory} was tokenized with another tokenizer than the run's (fingerprint "
        f"{manifest['tokenizer']['fingerprint'][:12]} vs {tokenizer.fingerprint[:12]}): the "
        f"workdir already holds a tokenizer of its own; train in a new --workdir (nmt-train "
        f"copies {os.path.join(directory, 'tokenizer')} there) or prepare again with it")


def verify_shards(directory: str, manifest: dict, split: str,
                  shards: list[dict] | None = None) -> None:
  """PreparedDataError naming the first shard (of `shards`, default all of the split) that
  is missing, truncated or corrupted (sha256), or an extra one the manifest does not list."""
  listed = {file["file"] for shard in manifest["splits"][split]["shards"]
            for file in shard["files"]}
  shards = manifest["splits"][split]["shards"] if shards is None else shards
  extra = sorted(name for name in tf.io.gfile.listdir(directory)
                 if name.startswith(split + "-") and name not in listed)
  if extra:
    raise PreparedDataError(
        f"{os.path.join(directory, extra[0])} is not listed in {MANIFEST}: the manifest does "
        f"not match the shards; delete {directory} and run nmt-prepare again")

  def check(shard: dict) -> str | None:
    path = os.path.join(directory, shard["file"])
    if not tf.io.gfile.exists(path):
      return f"{path} is missing"
    size = tf.io.gfile.stat(path).length
    if size != shard["bytes"]:
      return f"{path} has {size} bytes, {MANIFEST} says {shard['bytes']} (truncated?)"
    if _sha256(path) != shard["sha256"]:
      return f"{path} does not match its sha256 in {MANIFEST} (corrupted)"
    return None

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    problems = [p for p in pool.map(check, [f for shard in shards for f in shard["files"]])
                if p]
  if problems:
    raise PreparedDataError(f"{problems[0]}; run nmt-prepare again into a new --output_dir "
                            f"(or delete {directory} first)"
                            + (f" ({len(problems)} shards are bad)" if len(problems) > 1
                               else ""))


# ---------------------------------------------------------------------------- reading


def source_split(spec: corpora.SourceSpec, split: str) -> str:
  """The split a prepared source names: its own (prepared:DIR:eval), else the config key's."""
  return spec.split or split


def make_dataset(config, tokenizer: tokenizer_lib.Tokenizer, split: str, *,
                 input_context: tf.distribute.InputContext | None = None,
                 repeat: bool | None = None, start_step: int = 0,
                 length_stats: pipeline.LengthStats | None = None) -> tf.data.Dataset:
  """pipeline.make_dataset for a prepared source (same batches' form and grid).

  Checks the manifest against the config and tokenizer and every shard's size and checksum
  first. For training, the stream starts where the uninterrupted one would be after
  `start_step` steps (each step takes one batch per replica of this pipeline).
  """
  spec = corpora.parse_source(config.data[split])
  directory, part = spec.paths[0], source_split(spec, split)
  manifest = load_manifest(directory)
  check_config(manifest, config, directory)
  check_tokenizer(manifest, tokenizer, directory)
  shards = _pipeline_shards(manifest, directory, part, input_context)
  verify_shards(directory, manifest, part, shards)  # Each worker checks its own shards.
  if length_stats is not None:  # The filter ran at prepare time: report its counts.
    length_stats.add(*(manifest["splits"][part]["length_filter"][key]
                       for key in ("seen", "dropped", "truncated")))
  training = split == "train"
  repeat = training if repeat is None else repeat
  if not training:
    dataset = _parse(tf.data.TFRecordDataset(_paths(directory, shards)))
    dataset = pipeline.bucket(dataset, config, input_context=input_context,
                              drop_remainder=False)
    return (dataset.repeat() if repeat else dataset).prefetch(tf.data.AUTOTUNE)
  plan = Plan(config, directory, shards, input_context)
  if not repeat:
    if start_step:
      raise ValueError("start_step needs repeat=True (a resumed run trains on)")
    dataset = tf.data.Dataset.range(plan.num_groups).flat_map(plan.group_dataset)
  elif config.data.service_address:
    dataset = _through_service(plan, start_step, config.data.service_address)
  else:
    group, offset = plan.locate(start_step * plan.batches_per_step)
    groups = tf.data.Dataset.range(group, _MAX_INT64)  # The first one from `offset`.
    dataset = groups.flat_map(lambda g: plan.group_dataset(
        g, tf.where(g == group, tf.constant(offset, tf.int64), 0)))
  return dataset.prefetch(tf.data.AUTOTUNE)


def _pipeline_shards(manifest: dict, directory: str, split: str,
                     input_context: tf.distribute.InputContext | None) -> list[dict]:
  """This pipeline's shards: file i goes to pipeline i mod N (disjoint, complete)."""
  shards = manifest["splits"][split]["shards"]
  if input_context is None:
    return shards
  count = input_context.num_input_pipelines
  if len(shards) < count:
    raise PreparedDataError(
        f"{directory}: the {split} split has {len(shards)} shards, fewer than the "
        f"{count} input pipelines (one per worker); run nmt-prepare again with "
        f"--shard_examples <= {manifest['splits'][split]['examples'] // count}")
  return shards[input_context.input_pipeline_id::count]


def _paths(directory: str, shards: list[dict], length: int | None = None) -> list[str]:
  """The files of `shards` (of grid length `length` only, if given), in order."""
  return [os.path.join(directory, file["file"]) for shard in shards
          for file in shard["files"] if length is None or file["length"] == length]


def _parse(records: tf.data.Dataset) -> tf.data.Dataset:
  """Serialized examples -> {"source", "target"} int32 [T] examples (dense)."""
  features = {key: tf.io.RaggedFeature(tf.int64) for key in ("source", "target")}

  def parse(serialized):
    parsed = tf.io.parse_example(serialized, features)
    return {key: tf.cast(value, tf.int32) for key, value in parsed.items()}

  return pipeline.unbatch(records.batch(_PARSE_BATCH).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE))


class Plan:
  """The training stream of one input pipeline as a sequence of groups (module docstring).

  Everything here is arithmetic on the manifest: nothing is read to locate a step. Within a
  group, each grid length L is one stream (the group's files of length L, parsed, padded to
  L and permuted a window of whole batches at a time, then cut into step batches of
  k * B_L); the order in which the lengths' steps follow each other is a seeded permutation
  of the group's step labels, so no op ever looks at a single example. A label stands for
  one step: k per-replica batches of one length (k = 1 on one replica per pipeline).
  Positions (`locate`, `group_dataset`) count per-replica batches, k per step.
  """

  def __init__(self, config, directory: str, shards: list[dict],
               input_context: tf.distribute.InputContext | None):
    self.seed, self.shuffle_buffer = config.seed, config.data.shuffle_buffer
    self.deterministic = config.data.deterministic
    self.grid = pipeline.padded_shapes(config)
    self.sizes = pipeline.bucket_batch_sizes(config, input_context)  # Per replica.
    self.batches_per_step = pipeline.replicas_per_pipeline(input_context)  # k
    self.num_groups = -(-len(shards) // GROUP_SHARDS)  # G
    members = [shards[j::self.num_groups] for j in range(self.num_groups)]
    # Row j * len(grid) + b: the files of length grid[b] of group j; a group without any
    # names one file that is not read (has_files), as TFRecordDataset needs a name.
    placeholder = _paths(directory, shards)[:1]
    self.files = tf.ragged.constant([_paths(directory, group, length) or placeholder
                                     for group in members for length in self.grid])
    self.has_files = tf.constant([bool(_paths(directory, group, length))
                                  for group in members for length in self.grid])
    examples = np.array([[sum(f["examples"] for shard in group for f in shard["files"]
                              if f["length"] == length) for length in self.grid]
                         for group in members], np.int64)  # [G, lengths]
    step_sizes = np.array(self.sizes) * self.batches_per_step
    self.steps = examples // step_sizes  # [G, lengths], remainders dropped.
    self.epoch_batches = int(self.steps.sum()) * self.batches_per_step
    if not self.epoch_batches:
      raise PreparedDataError(
          f"{directory}: an epoch of this input pipeline yields no full step (examples "
          f"per grid length {examples.sum(axis=0).tolist()}, per-replica batch sizes "
          f"{self.sizes} x {self.batches_per_step} replicas); lower train.batch_size or "
          f"prepare a larger corpus")
    self.labels = tf.constant(self.steps)

  def group_order(self, epoch) -> tf.Tensor:
    """The order of the groups in `epoch` (the same op eagerly and inside tf.data)."""
    order = tf.range(self.num_groups, dtype=tf.int64)
    if not self.shuffle_buffer:
      return order
    seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(order, seed=seed)

  def locate(self, position: int) -> tuple[int, int]:
    """Batch `position` of the stream -> (global group index, batches to skip in it)."""
    epoch, position = divmod(position, self.epoch_batches)
    with tf.device("/cpu:0"):
      order = self.group_order(epoch).numpy()
    ends = np.cumsum(self.steps.sum(axis=1)[order]) * self.batches_per_step
    slot = int(np.searchsorted(ends, position, side="right"))
    offset = position - (int(ends[slot - 1]) if slot else 0)
    return epoch * self.num_groups + slot, offset

  def group_dataset(self, group, offset=0) -> tf.data.Dataset:
    """The per-replica batches of global group index `group` (a pure function of it), from
    batch `offset` (k per step)."""
    k = self.batches_per_step
    if k == 1:
      return self.group_steps(group, offset)
    return pipeline.split_steps(self.group_steps(group, offset // k), k).skip(offset % k)

  def group_steps(self, group, offset=0) -> tf.data.Dataset:
    """The step batches [k * B_L, L] of global group index `group`, from step `offset`."""
    group = tf.cast(group, tf.int64)
    j = self.group_order(group // self.num_groups)[group % self.num_groups]
    labels = tf.repeat(tf.range(len(self.grid), dtype=tf.int64), self.labels[j])
    if self.shuffle_buffer:
      labels = tf.random.experimental.stateless_shuffle(
          labels, seed=tf.stack([tf.constant(self.seed, tf.int64), group]))
    done = labels[:offset]  # Batches before the offset: skipped as records, not parsed.
    streams = [self._length_stream(group, j, b, tf.reduce_sum(tf.cast(done == b, tf.int64)))
               for b in range(len(self.grid))]
    return tf.data.Dataset.choose_from_datasets(
        streams, tf.data.Dataset.from_tensor_slices(labels[offset:]))

  def _length_stream(self, group, j, b: int, skip_batches) -> tf.data.Dataset:
    """Step batches [k * B_L, L] of grid length index b of group j (order: seeded by the
    group); `skip_batches` counts step batches."""
    row = j * len(self.grid) + b
    records = tf.data.TFRecordDataset(self.files[row])
    records = records.take(tf.where(self.has_files[row], tf.constant(-1, tf.int64), 0))
    size, length = self.sizes[b] * self.batches_per_step, self.grid[b]
    # Windows of whole batches, parsed and permuted at once: one op per window, not per
    # batch or example; skipped batches that fill whole windows are never parsed.
    per_window = max(1, (self.shuffle_buffer or _PARSE_BATCH) // size)
    seed = tf.stack([self.seed * 1_000_003 + group, tf.constant(b * 2**32, tf.int64)])

    def parse(i, serialized):
      window = _parse_padded(serialized, length)
      if not self.shuffle_buffer:
        return window
      # Stateless: a pure function of (seed, group, length, window), so resumable; a
      # seeded tf.data shuffle cannot take a seed computed in the graph here.
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(serialized)[0]), seed + [0, i])
      return {key: tf.gather(value, order) for key, value in window.items()}

    windows = records.batch(per_window * size).enumerate().skip(skip_batches // per_window)
    batches = windows.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=self.deterministic)
    return batches.rebatch(size, drop_remainder=True).skip(
        skip_batches % per_window).prefetch(_STREAM_PREFETCH)


def _parse_padded(serialized: tf.Tensor, length: int) -> dict:
  """Serialized examples [B] -> {"source", "target"}: int32 [B, length], 0-padded."""
  features = {key: tf.io.RaggedFeature(tf.int64) for key in ("source", "target")}
  parsed = tf.io.parse_example(serialized, features)
  batch = tf.shape(serialized, out_type=tf.int64)[0]
  return {key: tf.cast(value.to_tensor(shape=[batch, length]), tf.int32)
          for key, value in parsed.items()}


def _through_service(plan: Plan, start_step: int, address: str) -> tf.data.Dataset:
  """The stream processed by tf.data service workers, group by group (dynamic sharding).

  Workers take whole groups from the dispatcher as they become free, so the batch order
  depends on their timing: a resumed run starts at the next group boundary and does not
  reproduce the uninterrupted order exactly. The workers' elements interleave, so they send
  whole steps, cut into per-replica batches here.
  """
  group, offset = plan.locate(start_step * plan.batches_per_step)
  groups = tf.data.Dataset.range(group + (offset > 0), _MAX_INT64)
  logging.info("Input through the tf.data service at %s from group %d.", address, group)
  steps = groups.flat_map(plan.group_steps).apply(tf.data.experimental.service.distribute(
      processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
      service=address))
  return pipeline.split_steps(steps, plan.batches_per_step)


def read_text(spec: corpora.SourceSpec,
              input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
  """(source, target) tf.string pairs of a prepared eval split, in corpus order.

  Only eval shards keep the text (for BLEU references); train shards hold ids only.
  """
  directory, part = spec.paths[0], spec.split or "eval"
  manifest = load_manifest(directory)
  if part != "eval":
    raise PreparedDataError(f"{spec.source}: the {part} split of a prepared corpus holds "
                            f"token ids only; its text is in the eval split "
                            f"(prepared:{directory}:eval) or in the raw corpus")
  shards = _pipeline_shards(manifest, directory, part, input_context)
  verify_shards(directory, manifest, part, shards)
  features = {key: tf.io.FixedLenFeature([], tf.string)
              for key in ("source_text", "target_text")}
  records = tf.data.TFRecordDataset(_paths(directory, shards))
  return records.batch(_PARSE_BATCH).map(
      lambda serialized: tf.io.parse_example(serialized, features)).unbatch().map(
          lambda f: (f["source_text"], f["target_text"]))
