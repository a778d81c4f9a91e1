"""nmt-prepare on Apache Beam: the same prepared directory as prepare.py's single process,
built by worker processes on this machine (--runner=direct) or by a cluster (Dataflow,
Flink, Spark: any Beam runner).

prepare.py calls `Job.run` for a runner other than single_process and writes the manifest
itself. One Beam job, its stages waiting for their side inputs:
  threshold   (data.eval=holdout:N) the N smallest source hashes of data.train;
  tokenizer   unless one is stored: the tokenizer.sample_size pairs of data.train with the
              smallest seeded hashes (corpora.Sample: the single-process sample exactly),
              SentencePiece trained on them in one worker and stored in the output dir;
  examples    read -> tokenize -> length-filter -> serialize, each worker a part of the
              files (shard_layout.tokenized_batches, as in one process);
  shards      K = ceil(train pairs / shard_examples) from the first pass, so each worker
              knows an example's shard (shard_layout.shard_of) as it makes it, buffers
              them and spills them to files grouped by shard (_SPILL_BYTES); Beam's
              shuffle groups the file references by shard, and a worker reads each
              shard's examples and writes its files in key order.
Workers read files through corpora.unit_chunks (its skipping, file:line logs and counts);
when there are fewer files than workers, a file is read in `parts` interleaved parts
(every parts-th line), each part scanning the whole file. Skip counts come back per file
and part; data.max_skip_fraction is checked on their sums (a file read in one part fails
its worker at once). The job hands its results back through a file in the output dir;
the manifest is written by the caller after the job succeeded, so a failed job leaves a
directory that is refused, and prepared again from the start by the next run.

"direct" is Beam's FnApiRunner, the DirectRunner's engine for batch jobs, with one worker
process per --direct_num_workers (named, because Beam 2.77's DirectRunner first tries to
download its Prism runner). Cost (design note): a worker holds what the single process
holds (TensorFlow, the tokenizer, a batch in flight, one shard while writing) plus one
spill buffer, whatever the corpus size; the spill files take as much disk as the shards
until the job ends. The launcher holds the references (one per shard and spill file: ~7x10^5
at 10^8 pairs). docs/prepared.md has the measured figures and the cost at 10^8 lines.
"""
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import re
import struct
import time
import uuid
from typing import Iterator, Sequence

import apache_beam as beam
from apache_beam.options import pipeline_options
from apache_beam.transforms import window
from apache_beam.utils import windowed_value
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

# Short names for Beam's runners; any other name is passed to Beam as it is.
RUNNERS = {"direct": "FnApiRunner", "directrunner": "FnApiRunner",
           "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner",
           "portable": "PortableRunner"}
# A worker buffers the examples it makes up to _SPILL_BYTES, then writes them to one spill
# file, grouped by shard (segments of: key, length class, size, serialized example), and
# Beam's shuffle groups the (file, offset, size) references by shard. Not the examples
# themselves: the direct runner holds every shuffled element in the launching process's
# memory, and its workers their whole share of a stage's input (both grow with the corpus:
# docs/prepared.md has the measurement); the files keep every process's memory flat.
_SPILL_BYTES = 1 << 27
_SPILL_HEADER = struct.Struct(">QHI")
_SPILL_PREFIX = "spill-"  # In the output dir, as *.tmp (prepare.py removes leftovers).
_RESULT = "beam-result.tmp"


class Job:
  """The Beam job of one nmt-prepare run (module docstring): `runner` is a Beam runner
  name or a RUNNERS key, `args` further PipelineOptions flags (--direct_num_workers=2,
  --project=..., as Beam spells them)."""

  def __init__(self, config: ml_collections.ConfigDict, output_dir: str, runner: str,
               args: Sequence[str] = ()):
    self.config, self.output_dir = config, output_dir
    self.options = pipeline_options.PipelineOptions(
        [f"--runner={RUNNERS.get(runner.lower(), runner)}"] + list(args))
    direct = self.options.view_as(pipeline_options.DirectOptions)
    if (self.options.view_as(pipeline_options.StandardOptions).runner == "FnApiRunner"
        and (direct.direct_num_workers or 1) > 1 and direct.direct_running_mode == "in_memory"):
      direct.direct_running_mode = "multi_processing"  # Workers as processes, not threads.
    for source in (config.data.train, config.data.eval):  # Generated once, here.
      if datasets.parse_source(source).kind != "holdout":
        datasets.prepare_source(source, config.data)

  def parallelism(self) -> int:
    """The workers the runner is asked for (1 if it decides alone, e.g. autoscaling)."""
    values = self.options.get_all_options()
    names = (("direct_num_workers",)
             if values.get("runner") == "FnApiRunner" else
             ("num_workers", "max_num_workers", "parallelism"))
    return max([1] + [int(values[name]) for name in names if values.get(name)])

  def units(self, source: str) -> list[datasets.ReadUnit]:
    """The ReadUnits of a raw source, in enough parts to give every worker one."""
    files = len(datasets.read_units(source))
    return datasets.read_units(source, max(1, math.ceil(self.parallelism() / files)))

  def run(self, shard_examples: int, fingerprint: str | None) -> dict:
    """Writes the train and eval shards, training the tokenizer first unless one with
    `fingerprint` is stored; returns the manifest's "splits". One Beam job: its stages wait
    for their side inputs (the holdout threshold; the tokenizer and the number of train
    shards, from one pass over the train pairs)."""
    config, data = self.config, _data(self.config)
    train, train_side = datasets.holdout_side(config.data.train, config.data)
    with _surfaced(), self._pipeline("nmt-prepare") as p:
      if datasets.holdout_count(config.data):
        count = datasets.holdout_count(config.data)
        threshold = (p | "Units to hash" >> beam.Create(self.units(train))
                     | "Hash sources" >> beam.ParDo(_SourceHashes(data, count))
                     | "Smallest hashes" >> beam.CombineGlobally(_Smallest(count))
                     | "Threshold" >> beam.Map(_threshold, data))
      else:
        threshold = p | "No holdout" >> beam.Create([0])
      threshold = beam.pvalue.AsSingleton(threshold)
      # One pass over the train pairs: K from their number; the tokenizer's sample.
      size = config.tokenizer.sample_size if fingerprint is None else 0
      sample = (p | "Train units" >> beam.Create(self.units(train))
                | "Hash pairs" >> beam.ParDo(_PairHashes(data, train_side, size), threshold)
                | "Sample" >> beam.CombineGlobally(_SampleCombine(size)))
      if fingerprint is None:
        tokenizer = sample | "Train tokenizer" >> beam.Map(_train_tokenizer, data,
                                                           self.output_dir)
      else:
        tokenizer = p | "Stored tokenizer" >> beam.Create([fingerprint])
      shards = sample | "Shards" >> beam.Map(
          lambda sample_and_count: shard_layout.num_shards(sample_and_count[1],
                                                           shard_examples))
      items = [(split, side, unit) for split in prepared.SPLITS
               for source, side in [datasets.holdout_side(config.data[split], config.data)]
               for unit in self.units(source)]
      tokenized = (p | "Units" >> beam.Create(items)
                   | "Read, tokenize, assign" >> beam.ParDo(
                       _Tokenize(data, self.output_dir), threshold,
                       beam.pvalue.AsSingleton(tokenizer),
                       beam.pvalue.AsSingleton(shards)).with_outputs("stats", main="shards"))
      entries = (tokenized.shards
                 | beam.GroupByKey()
                 | "Write shards" >> beam.ParDo(_WriteShards(data, self.output_dir,
                                                             shard_examples)))
      _ = ((entries, tokenized.stats) | beam.Flatten()
           | beam.combiners.ToList()
           | beam.Map(_write_result, self._result()))
    for path in tf.io.gfile.glob(os.path.join(self.output_dir, _SPILL_PREFIX + "*")):
      tf.io.gfile.remove(path)
    return self._splits(_read_result(self._result()))

  def _splits(self, results: list) -> dict:
    """The manifest's "splits" from the job's shard entries and per-part counts."""
    stats = {split: corpora.SkipStats() for split in prepared.SPLITS}
    lengths = {split: collections.Counter() for split in prepared.SPLITS}
    shards = {split: [] for split in prepared.SPLITS}
    for result in results:
      if result[0] == "shard":
        _, split, index, entry = result
        shards[split].append((index, entry))
      else:
        _, split, per_file, first_skips, length_filter = result
        for name, (read, skipped) in per_file.items():
          stats[split].add(name, read, skipped, first_skips.get(name))
        lengths[split].update(length_filter)
    splits = {}
    for split in prepared.SPLITS:
      error = stats[split].error(self.config.data.max_skip_fraction)
      if error:
        raise error
      length_filter = {key: lengths[split][key] for key in ("seen", "dropped", "truncated")}
      logging.info("prepare_%s: %s", split, length_filter)
      splits[split] = shard_layout.split_entry(
          split, self.config.data[split], stats[split], length_filter,
          [entry for _, entry in sorted(shards[split], key=lambda s: s[0])])
    return splits

  @contextlib.contextmanager
  def _pipeline(self, name: str) -> Iterator[beam.Pipeline]:
    """A Beam pipeline, run at the end of the block; its time is logged."""
    start = time.perf_counter()
    with beam.Pipeline(options=self.options) as p:
      yield p
    logging.info("Beam job %s took %.1f s.", name, time.perf_counter() - start)

  def _result(self) -> str:
    return os.path.join(self.output_dir, _RESULT)


def _data(config: ml_collections.ConfigDict) -> dict:
  """What the workers need of the config, as plain values (pickled to them)."""
  return {"data": config.data.to_dict(), "tokenizer": config.tokenizer.to_dict(),
          "seed": config.seed}


def _config(data: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(data)


@contextlib.contextmanager
def _surfaced() -> Iterator[None]:
  """Re-raises a failed job's CorpusError (raised in a worker, reported by the runner
  inside its own exception and traceback) as itself: one message naming file and line."""
  try:
    yield
  except corpora.CorpusError as e:
    raise corpora.CorpusError(_without_step(str(e))) from None
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless it wraps ours)
    found = re.findall(r"(?:CorpusError|PreparedDataError): (.+)", str(e))
    if not found:
      raise
    raise corpora.CorpusError(_without_step(found[-1])) from None


def _without_step(message: str) -> str:
  """A worker's error message without the " [while running 'STEP']" Beam appends."""
  return re.sub(r" \[while running '[^']*'\]$", "", message.strip())


def _write_result(value, path: str) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(value))


def _read_result(path: str):
  with tf.io.gfile.GFile(path, "r") as f:
    value = json.loads(f.read())
  tf.io.gfile.remove(path)
  return value


def _chunks(unit: datasets.ReadUnit, data_config, stats: corpora.SkipStats | None
            ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The numbered chunks of a ReadUnit; a file read whole enforces max_skip_fraction at its
  end, one read in parts leaves that to the sums (Job._splits)."""
  limit = data_config.max_skip_fraction if unit.parts == 1 else math.inf
  return datasets.read_unit(unit, data_config, stats, limit)


def _name(unit: datasets.ReadUnit) -> str:
  """A ReadUnit for the log: its files, and its part if it is one."""
  name = ",".join(unit.paths) or unit.source
  return f"{name} (part {unit.part + 1} of {unit.parts})" if unit.parts > 1 else name


def _side(sources: np.ndarray, side: str, threshold: int) -> np.ndarray:
  """The mask of the pairs on `side` of data.eval=holdout:N (all for side "")."""
  if not side:
    return np.ones(len(sources), bool)
  hashes = datasets.source_hashes(sources)
  return hashes <= threshold if side == "dev" else hashes > threshold


class _SourceHashes(beam.DoFn):
  """ReadUnit -> (the `count` smallest source hashes of its pairs, its number of pairs)."""

  def __init__(self, data: dict, count: int):
    self.data, self.count = data, count

  def process(self, unit: datasets.ReadUnit):
    config = _config(self.data)
    smallest, pairs = np.zeros([0], np.int64), 0
    for _, sources, _ in _chunks(unit, config.data, None):
      pairs += len(sources)
      smallest = np.sort(np.concatenate([smallest, datasets.source_hashes(sources)]))
      smallest = smallest[:self.count]
    yield smallest, pairs


class _Smallest(beam.CombineFn):
  """The `count` smallest values (repeats included) and the number of pairs, as lists."""

  def __init__(self, count: int):
    self.count = count

  def create_accumulator(self):
    return np.zeros([0], np.int64), 0

  def add_input(self, accumulator, element):
    return self.merge_accumulators([accumulator, element])

  def merge_accumulators(self, accumulators):
    values = np.concatenate([values for values, _ in accumulators])
    return np.sort(values)[:self.count], sum(pairs for _, pairs in accumulators)

  def extract_output(self, accumulator):
    return accumulator[0].tolist(), accumulator[1]


def _threshold(smallest_and_pairs, data: dict) -> int:
  smallest, pairs = smallest_and_pairs
  return datasets.threshold_of(np.array(smallest, np.int64), pairs, _config(data).data)


class _PairHashes(beam.DoFn):
  """ReadUnit -> a corpora.Sample of `size` of its pairs on data.train's side (and their
  number: Sample.seen)."""

  def __init__(self, data: dict, side: str, size: int):
    self.data, self.side, self.size = data, side, size

  def process(self, unit: datasets.ReadUnit, threshold: int):
    start, config = time.perf_counter(), _config(self.data)
    sample = corpora.Sample(self.size)
    for positions, sources, targets in _chunks(unit, config.data, None):
      keep = _side(sources, self.side, threshold)
      if not self.size:  # A stored tokenizer: only the pairs are counted.
        sample.seen += int(keep.sum())
        continue
      positions, sources, targets = positions[keep], sources[keep], targets[keep]
      hashes = corpora.pair_hashes(sources, targets, 0).numpy()
      sample.add(hashes, positions, sources, targets)
    logging.info("Tokenizer sample: %s: %d pairs in %.1f s.", _name(unit), sample.seen,
                 time.perf_counter() - start)
    yield sample


class _SampleCombine(beam.CombineFn):
  """corpora.Samples -> (their merged sample's [source, target] pairs in corpus order, the
  number of pairs they saw)."""

  def __init__(self, size: int):
    self.size = size

  def create_accumulator(self):
    return corpora.Sample(self.size)

  def add_input(self, accumulator, sample):
    accumulator.merge(sample)
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = self.create_accumulator()
    for accumulator in accumulators:
      merged.merge(accumulator)
    return merged

  def extract_output(self, accumulator):
    pairs = [[_text(src), _text(tgt)] for src, tgt in zip(*accumulator.in_corpus_order())]
    return pairs, accumulator.seen


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _train_tokenizer(sample_and_count: tuple, data: dict, output_dir: str) -> str:
  """Trains and stores the tokenizer on the sample (in one worker); its fingerprint."""
  pairs, _ = sample_and_count
  tokenizer = tokenizer_lib.load_or_train(_config(data).tokenizer, output_dir,
                                          lambda: iter(pairs))
  return tokenizer.fingerprint


class _Tokenize(beam.DoFn):
  """(split, side, ReadUnit) -> ((split, shard), spill reference), and to the "stats"
  output (split, per-file counts, first skips, length-filter counts): the single process's
  reading and tokenizing (shard_layout.tokenized_batches) on a part of the corpus, each
  example grouped with its train shard (shard_layout.shard_of) or with the one eval
  writer, in spill files (_SPILL_BYTES)."""

  def __init__(self, data: dict, output_dir: str):
    self.data, self.output_dir = data, output_dir
    self.tokenizer = None

  def start_bundle(self):
    self.pending, self.size = [], 0

  def process(self, item, threshold: int, fingerprint: str, shards: int):
    if self.tokenizer is None:  # Stored by now: this stage waits for the fingerprint.
      self.config = _config(self.data)
      self.tokenizer = tokenizer_lib.load_or_train(self.config.tokenizer,
                                                   self.output_dir, None)
    if self.tokenizer.fingerprint != fingerprint:
      raise prepared.PreparedDataError(
          f"{self.output_dir}/tokenizer changed while nmt-prepare ran; run it again")
    split, side, unit = item
    start, examples = time.perf_counter(), 0
    stats, length_stats = corpora.SkipStats(), pipeline.LengthStats(f"prepare_{split}")
    keep_text = split == "eval"

    def chunks():
      for positions, sources, targets in _chunks(unit, self.config.data, stats):
        keep = _side(sources, side, threshold)
        yield positions[keep], sources[keep], targets[keep]

    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string),
                 tf.TensorSpec([None], tf.string))
    pairs = tf.data.Dataset.from_generator(chunks, output_signature=signature).unbatch()
    with corpora.surface_corpus_errors():
      for batch in shard_layout.tokenized_batches(pairs, self.config, self.tokenizer,
                                                  length_stats, keep_text):
        keys, lengths, records = shard_layout.examples(batch, keep_text, self.config.seed)
        examples += len(records)
        yield from self._add(split, shards, keys, lengths, records)
    logging.info("prepare_%s: %s: %d pairs read, %d examples in %.1f s.", split,
                 _name(unit), stats.read, examples, time.perf_counter() - start)
    yield beam.pvalue.TaggedOutput("stats", (
        "stats", split, stats.per_file(), stats.first_skips(), length_stats.result()))

  def _add(self, split: str, shards: int, keys: np.ndarray, lengths: np.ndarray,
           records: list[bytes]):
    """Buffers a batch's examples; spills the buffer when it holds _SPILL_BYTES."""
    targets = (shard_layout.shard_of(keys, shards) if split == "train"
               else np.zeros(len(keys), np.int64))
    self.pending.append((split, targets, keys, lengths, records))
    self.size += sum(map(len, records))
    if self.size >= _SPILL_BYTES:
      yield from self._spill()

  def _spill(self) -> list:
    """Writes the buffered examples to one spill file, grouped by shard; returns a
    ((split, shard), (path, offset, size)) reference per group."""
    groups = collections.defaultdict(list)
    for split, targets, keys, lengths, records in self.pending:
      for target, key, length, record in zip(targets.tolist(), keys.tolist(),
                                             lengths.tolist(), records):
        groups[(split, target)].append(_SPILL_HEADER.pack(key, length, len(record)) + record)
    self.pending, self.size = [], 0
    if not groups:
      return []
    path = os.path.join(self.output_dir, f"{_SPILL_PREFIX}{uuid.uuid4().hex}.tmp")
    references, offset = [], 0
    with tf.io.gfile.GFile(path, "wb") as f:
      for group, encoded in groups.items():
        data = b"".join(encoded)
        f.write(data)
        references.append((group, (path, offset, len(data))))
        offset += len(data)
    return references

  def finish_bundle(self):
    for group, reference in self._spill():
      yield windowed_value.WindowedValue((group, reference), 0, [window.GlobalWindow()])


class _WriteShards(beam.DoFn):
  """((split, shard), its spill references) -> ("shard", split, index, manifest entry): a
  train shard's files in key order; for eval, its shards in corpus order."""

  def __init__(self, data: dict, output_dir: str, shard_examples: int):
    self.data, self.output_dir, self.shard_examples = data, output_dir, shard_examples

  def process(self, element):
    (split, shard), references = element
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # Remote files: reads overlap.
      segments = list(pool.map(_read_segment, references))
    examples = sorted(example for segment in segments for example in _decoded(segment))
    grid = pipeline.padded_shapes(_config(self.data))
    size = len(examples) if split == "train" else self.shard_examples
    for start in range(0, len(examples), size):
      group = examples[start:start + size]  # In key order (keys are distinct).
      index = shard if split == "train" else start // size
      entry = shard_layout.write_shard(self.output_dir, split, index,
                                       [record for _, _, record in group],
                                       [length for _, length, _ in group], grid)
      yield "shard", split, index, entry


def _read_segment(reference: tuple[str, int, int]) -> bytes:
  path, offset, size = reference
  with tf.io.gfile.GFile(path, "rb") as f:
    f.seek(offset)
    return f.read(size)


def _decoded(segment: bytes) -> Iterator[tuple[int, int, bytes]]:
  """The (key, length class, serialized example) of a spill segment."""
  offset = 0
  while offset < len(segment):
    key, length, size = _SPILL_HEADER.unpack_from(segment, offset)
    offset += _SPILL_HEADER.size
    yield key, length, segment[offset:offset + size]
    offset += size
