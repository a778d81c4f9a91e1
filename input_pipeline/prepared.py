"""Prepared corpora, the reading side: shards that pure tf.data reads and resumes in O(1).

`nmt-prepare` (input_pipeline/prepare.py) tokenizes and length-filters a corpus once and writes:
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
docs/prepared.md has the measured cost of both paths.

Cost (design note). At any step N, resuming costs: one manifest read, a size and sha256
check of this pipeline's shards, O(G) arithmetic, and skipping at most one group's batches
(GROUP_SHARDS * shard_examples = 80k examples by default, whole windows unparsed): the same
at step 10^6 as at step 100. At 10^8 corpus lines: 5000 shards of 20k examples, up to one
file per shard and grid length; every start lists the directory and hashes this pipeline's
share of the data, O(corpus bytes / workers), which names a damaged file before training
rather than failing mid-run. Trade-offs: examples of different groups never share a batch,
and the tf.data service path (`data.service_address`) hands out whole groups to its workers
in the order they ask, so it resumes at a group boundary and its order is not reproducible.
"""
import concurrent.futures
import hashlib
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf

from input_pipeline import corpora
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
GROUP_SHARDS = 4  # Shards read and shuffled together; a resume skips at most one group.
# Batches each grid length's stream prepares ahead, in its own thread: the streams of a
# group read their files concurrently. (Within a stream the files are read one after the
# other: interleaving them record by record, num_parallel_reads, halved the throughput.)
_STREAM_PREFETCH = 2
_PARSE_BATCH = 1024  # Records per parse_example call (one call per batch, not per record).
DATA_KEYS = ("max_source_length", "max_target_length", "length_policy", "bucket_boundaries")
_MAX_INT64 = np.iinfo(np.int64).max


class PreparedDataError(corpora.CorpusError):
  """A prepared directory that cannot be used as it is; the message names the file and what
  to do."""


def parse(source: str, rest: str) -> corpora.SourceSpec:
  """DIR[:train|eval] (a DIR may be a URL, gs://...)."""
  head, _, last = rest.rpartition(":")
  directory, split = (head, last) if head and last in SPLITS else (rest, "")
  if not directory:
    raise corpora.CorpusError("prepared: needs the DIR that nmt-prepare wrote")
  return corpora.SourceSpec(source, "prepared", paths=(directory,), split=split)


def plain(value):
  """A config value as JSON holds it (tuples become lists), for comparing with a manifest."""
  return list(value) if isinstance(value, (tuple, list)) else value


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def summary(manifest: dict) -> dict:
  """The manifest without its per-shard and per-file lists, for one log or JSON line."""
  return {split: {key: value for key, value in info.items()
                  if key not in ("shards", "per_file")}
          for split, info in manifest["splits"].items()}


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
  differing = [f"data.{key}: prepared {value!r} vs config {plain(config.data[key])!r}"
               for key, value in manifest["data"].items()
               if plain(config.data[key]) != value]
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
    if sha256(path) != shard["sha256"]:
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


def make_dataset(spec: corpora.SourceSpec, config, tokenizer: tokenizer_lib.Tokenizer,
                 split: str, *, input_context: tf.distribute.InputContext | None = None,
                 repeat: bool | None = None, start_step: int = 0,
                 length_stats: pipeline.LengthStats | None = None) -> tf.data.Dataset:
  """datasets.make_dataset for a prepared source (same batches' form and grid).

  Checks the manifest against the config and tokenizer and every shard's size and checksum
  first. For training, the stream starts where the uninterrupted one would be after
  `start_step` steps (each step takes one batch per replica of this pipeline).
  """
  directory, part = spec.paths[0], source_split(spec, split)
  manifest = load_manifest(directory)
  check_config(manifest, config, directory)
  check_tokenizer(manifest, tokenizer, directory)
  shards = _pipeline_shards(manifest, directory, part, corpora.Shard.of(input_context))
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
                     shard: corpora.Shard) -> list[dict]:
  """This pipeline's shards: file i goes to pipeline i mod N (disjoint, complete)."""
  shards = manifest["splits"][split]["shards"]
  count = shard.count
  if count == 1:
    return shards
  if len(shards) < count:
    raise PreparedDataError(
        f"{directory}: the {split} split has {len(shards)} shards, fewer than the "
        f"{count} input pipelines (one per worker); run nmt-prepare again with "
        f"--shard_examples <= {manifest['splits'][split]['examples'] // count}")
  return shards[shard.index::count]


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


def read_text(spec: corpora.SourceSpec, data_config=None,
              shard: corpora.Shard = corpora.Shard(), shuffle_files: bool = False, seed: int = 0,
              stats: corpora.SkipStats | None = None, numbered: bool = False) -> tf.data.Dataset:
  """(source, target) tf.string pairs of a prepared eval split, in corpus order (the reader
  of the prepared kind, for BLEU references: `shuffle_files`, `seed` and `stats` do not
  apply to text already cleaned by nmt-prepare).

  Only eval shards keep the text (for BLEU references); train shards hold ids only. They
  have no positions (`numbered`): nmt-prepare reads raw corpora only.
  """
  del data_config, shuffle_files, seed, stats
  if numbered:
    raise PreparedDataError(f"{spec.source}: a prepared corpus has no line positions; "
                            f"nmt-prepare reads a raw corpus")
  directory, part = spec.paths[0], spec.split or "eval"
  manifest = load_manifest(directory)
  if part != "eval":
    raise PreparedDataError(f"{spec.source}: the {part} split of a prepared corpus holds "
                            f"token ids only; its text is in the eval split "
                            f"(prepared:{directory}:eval) or in the raw corpus")
  shards = _pipeline_shards(manifest, directory, part, shard)
  verify_shards(directory, manifest, part, shards)
  features = {key: tf.io.FixedLenFeature([], tf.string)
              for key in ("source_text", "target_text")}
  records = tf.data.TFRecordDataset(_paths(directory, shards))
  return records.batch(_PARSE_BATCH).map(
      lambda serialized: tf.io.parse_example(serialized, features)).unbatch().map(
          lambda f: (f["source_text"], f["target_text"]))
