"""`nmt-prepare`: tokenizes a raw corpus once into the shards that input_pipeline/prepared.py reads.

`prepare(config, output_dir)` reads data.train and data.eval through the input front door
(input_pipeline/datasets.py: the same skipping, file:line logs and data.max_skip_fraction),
trains or reuses the tokenizer on a uniform sample of data.train (datasets.tokenizer_sample),
tokenizes and length-filters once (data.max_*_length, data.length_policy), and writes the
directory whose layout prepared.py's docstring lists. Which shard each example goes to, and
in which order, is shard_layout.py's: train shards are key ranges of keys spread from the
examples' file and line (each of K shards holds ~1/K of every stretch of every file), eval
shards keep corpus order. Here it runs in this process (runner=SINGLE_PROCESS); with a Beam
runner, prepare_beam.py runs it on workers and writes the same directory, byte for byte.
Shards are written under a .tmp name and renamed when complete; the manifest is written
last, so a directory without one is unfinished and is refused.

In this process the examples are put in key order by an external sort: sorted runs of
_RUN_BYTES of examples in `.tmp` files, then a k-way merge. Memory is bounded by one run,
one shard and the tokenizer's training sample, not by the corpus; the runs need as much
disk as the shards, until the merge deletes them.

Cost (design note): this process holds one run (128 MiB of examples), one shard and the
tokenizer's sample, not the corpus: 10^8 examples are ~140 runs, merged in one pass (up to
_MERGE_RUNS open at once); it runs at one core's speed (reading and serializing are Python).
At 10^8 lines that is hours: --runner=direct uses every core here, a cluster runner many
machines (prepare_beam.py); docs/prepared.md has the measured figures and the extrapolation.
"""
import heapq
import importlib.util
import json
import os
import time
from typing import Iterable, Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from input_pipeline import corpora
from input_pipeline import datasets
from input_pipeline import pipeline
from input_pipeline import prepared
from input_pipeline import shard_layout
from input_pipeline import tokenizer as tokenizer_lib

SHARD_EXAMPLES = 20000  # Default examples per shard written by nmt-prepare.
SINGLE_PROCESS = "single_process"  # The runner that needs no Apache Beam.
BEAM_EXTRA = "pip install -e '.[beam]'"
# The external sort of a split (_sorted): serialized examples sorted in memory per run,
# runs merged at once (open files, each with a read buffer).
_RUN_BYTES = 1 << 27
_MERGE_RUNS = 256
_RUN_READ_BYTES = 1 << 18


def default_runner() -> str:
  """"direct" (Beam worker processes here, one per CPU) if Apache Beam is installed, else
  SINGLE_PROCESS, logging how to get the parallel one."""
  if importlib.util.find_spec("apache_beam"):
    return "direct"
  logging.info("Apache Beam is not installed: preparing in one process. For parallel "
               "workers (--runner=direct) or a cluster runner: %s", BEAM_EXTRA)
  return SINGLE_PROCESS


def beam_args(direct_num_workers: int, options: str) -> list[str]:
  """Beam PipelineOptions flags from nmt-prepare's --direct_num_workers and the
  comma-separated KEY=VALUE list of --beam_pipeline_options (as TFDS takes it)."""
  args = [f"--direct_num_workers={direct_num_workers}"]
  for option in filter(None, (o.strip() for o in options.split(","))):
    if "=" not in option:
      raise ValueError(f"--beam_pipeline_options: {option!r} is not KEY=VALUE (e.g. "
                       f"project=my-project,region=europe-west1)")
    args.append("--" + option.removeprefix("--"))
  return args


def prepare(config: ml_collections.ConfigDict, output_dir: str, *,
            shard_examples: int = SHARD_EXAMPLES, runner: str = SINGLE_PROCESS,
            beam_options: Sequence[str] = ()) -> dict:
  """Writes data.train and data.eval of `config` to `output_dir`; returns the manifest.

  runner: SINGLE_PROCESS (this process), or a Beam runner ("direct", "DataflowRunner",
  ...; prepare_beam.py) with `beam_options` (PipelineOptions flags, see `beam_args`): the
  same directory either way. A directory with a manifest is verified (checksums, config)
  instead and returned as it is. One without (an interrupted run) is written again.
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
  job = _beam_job(config, output_dir, runner, beam_options)
  tf.io.gfile.makedirs(output_dir)
  _remove_unfinished(output_dir)
  if job:  # Trains the tokenizer too, unless one is stored (checked against the config).
    stored = tf.io.gfile.exists(os.path.join(output_dir, "tokenizer",
                                             tokenizer_lib.CONFIG_FILE))
    tokenizer = (tokenizer_lib.load_or_train(config.tokenizer, output_dir, None)
                 if stored else None)
    splits = job.run(shard_examples, tokenizer.fingerprint if tokenizer else None)
    tokenizer = tokenizer or tokenizer_lib.load_or_train(config.tokenizer, output_dir, None)
  else:
    tokenizer = tokenizer_lib.load_or_train(config.tokenizer, output_dir,
                                            datasets.tokenizer_sample(config))
    splits = {split: _write_split(config, tokenizer, split, output_dir, shard_examples)
              for split in prepared.SPLITS}
  manifest = {
      "format_version": prepared.FORMAT_VERSION,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "data": {key: prepared.plain(config.data[key]) for key in prepared.DATA_KEYS},
      "tokenizer": _tokenizer_description(output_dir, tokenizer),
      "splits": splits,
  }
  _write_atomically(os.path.join(output_dir, prepared.MANIFEST),
                    json.dumps(manifest, indent=1, sort_keys=True).encode())
  logging.info("Prepared %s: %s", output_dir, prepared.summary(manifest))
  return manifest


def _beam_job(config, output_dir: str, runner: str, beam_options: Sequence[str]):
  """prepare_beam.Job for a Beam runner, None for SINGLE_PROCESS."""
  if runner == SINGLE_PROCESS:
    return None
  if not importlib.util.find_spec("apache_beam"):
    raise ValueError(f"--runner={runner} needs Apache Beam, which is not installed: "
                     f"{BEAM_EXTRA}, or prepare in one process with "
                     f"--runner={SINGLE_PROCESS}")
  # Imported here, not at the top, only to keep Apache Beam an optional dependency.
  from input_pipeline import prepare_beam
  logging.info("Preparing with Apache Beam's %s (options %s).", runner, list(beam_options))
  return prepare_beam.Job(config, output_dir, runner, beam_options)


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
  """Tokenizes one split in this process and writes its shards (shard_layout: which shard
  each example goes to, in which order); returns its manifest entry."""
  source = config.data[split]
  stats, length_stats = corpora.SkipStats(), pipeline.LengthStats(f"prepare_{split}")
  keep_text = split == "eval"
  pairs = datasets.read(source, config.data, stats=stats, numbered=True)
  grid = pipeline.padded_shapes(config)
  shards = []
  with corpora.surface_corpus_errors():
    records = (record for batch in shard_layout.tokenized_batches(
                   pairs, config, tokenizer, length_stats, keep_text)
               for record in _run_records(*shard_layout.examples(batch, keep_text,
                                                                 config.seed)))
    ordered = _sorted(records, output_dir, split)
    if keep_text:  # Consecutive runs of shard_examples in corpus order.
      groups = enumerate(_chunks(ordered, shard_examples))
    else:  # K key ranges, K from the pairs that reached the length filter.
      groups = _key_ranges(ordered, shard_layout.num_shards(length_stats.result()["seen"],
                                                            shard_examples))
    for index, group in groups:
      shards.append(shard_layout.write_shard(
          output_dir, split, index, [_example(r) for r in group],
          [_length(r) for r in group], grid))
  length_stats.log()
  return shard_layout.split_entry(split, source, stats, length_stats.result(), shards)


def _run_records(keys: np.ndarray, lengths: np.ndarray,
                 records: list[bytes]) -> Iterator[bytes]:
  """Records of the external sort: the 8-byte big-endian key (so records compare as their
  keys), the 2-byte length class, the serialized example."""
  for key, length, record in zip(keys.tolist(), lengths.tolist(), records):
    yield key.to_bytes(8, "big") + length.to_bytes(2, "big") + record


def _key(record: bytes) -> int:
  return int.from_bytes(record[:8], "big")


def _length(record: bytes) -> int:
  return int.from_bytes(record[8:10], "big")


def _example(record: bytes) -> bytes:
  return record[10:]


def _key_ranges(records: Iterator[bytes], shards: int) -> Iterator[tuple[int, list[bytes]]]:
  """(shard, its records) of key-sorted records: shard_layout.shard_of's key ranges; empty
  ones are left out."""
  width = -(-(1 << 64) // shards)
  index, group = 0, []
  for record in records:
    shard = _key(record) // width
    if shard != index and group:
      yield index, group
      group = []
    index = shard
    group.append(record)
  if group:
    yield index, group


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


def _sorted(records: Iterable[bytes], output_dir: str, split: str) -> Iterator[bytes]:
  """The records in key order (all read before this returns), by an external sort: sorted runs of _RUN_BYTES go
  to `<split>-runL-NNNNN.tmp` files, then one k-way merge (a first merge pass above
  _MERGE_RUNS runs). Memory: one run and the merge's read buffers, not the corpus; disk:
  the runs take as much as the shards, until the merge deletes them. A split that fits in
  one run is sorted in memory and writes no run."""
  runs, buffer, size, total = [], [], 0, 0
  for record in records:
    buffer.append(record)
    size += len(record)
    total += 1
    if size >= _RUN_BYTES:
      buffer.sort()
      runs.append(_write_run(output_dir, f"{split}-run0-{len(runs):05d}.tmp", buffer))
      buffer, size = [], 0
  buffer.sort()
  if not runs:
    return iter(buffer)
  if buffer:
    runs.append(_write_run(output_dir, f"{split}-run0-{len(runs):05d}.tmp", buffer))
  logging.info("%s: %d examples in %d sorted runs of up to %d MiB; merging them.", split,
               total, len(runs), _RUN_BYTES >> 20)
  level = 0
  while len(runs) > _MERGE_RUNS:
    level += 1
    runs = [_write_run(output_dir, f"{split}-run{level}-{i // _MERGE_RUNS:05d}.tmp",
                       _merged(runs[i:i + _MERGE_RUNS]))
            for i in range(0, len(runs), _MERGE_RUNS)]
  return _merged(runs)


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


def _write_atomically(path: str, data: bytes) -> None:
  with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
    f.write(data)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
