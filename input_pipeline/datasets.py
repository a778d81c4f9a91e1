"""The input's front door: every source kind in one table, and the datasets built from them.

A source string (`data.train`, `data.eval`, `data.test`) is KIND:REST, one of
  embedded:deu-eng[:SPLIT]      Tatoeba German->English, shipped with the package (SPLIT =
                                train, dev or test; input_pipeline/data/deu-eng/README.md)
  embedded[:cldr_numbers][:SPLIT]  the generated cldr_numbers TFDS corpus (default split train)
  tsv:PATH[:SRC_COL:TGT_COL]    tab-separated pairs, Tatoeba/Anki style; columns count from 0
                                and default to 0:1, extra columns are ignored
  text:SRC_GLOB,TGT_GLOB        Moses-style aligned plain text: line i of one side
                                translates line i of the other
  tfds:NAME[:SPLIT]             any TFDS dataset, e.g. tfds:wmt14_translate/de-en:train
  prepared:DIR[:SPLIT]          written by nmt-prepare (input_pipeline/prepare.py); SPLIT
                                is train or eval, by default the split of the config key
  holdout:N                     data.eval only: N pairs carved out of data.train, which
                                then trains without them (see holdout_threshold)
SOURCE_KINDS has, per kind, its syntax, its parser, its reader and the config keys that
accept it: a new format is one reader (in corpora.py, or a module of its own) and one entry
there. Everything else in the input is reached through this module: `read` (pairs of any
kind), `make_dataset` (the batched train/eval stream), `tokenizer_sample`, `check_sources`.
"""
import dataclasses
import os
import re
from typing import Callable, Iterator

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from configs import validate as validate_lib
from input_pipeline import corpora
from input_pipeline import pipeline
from input_pipeline import prepared
from input_pipeline import tokenizer as tokenizer_lib

SourceSpec = corpora.SourceSpec
CorpusError = corpora.CorpusError
SkipStats = corpora.SkipStats
surface_corpus_errors = corpora.surface_corpus_errors
_SPLITS = ("train", "eval")  # make_dataset's splits, also the config.data keys naming them.


def _parse_holdout(source: str, rest: str) -> SourceSpec:
  if not re.fullmatch(r"[1-9]\d*", rest):
    raise CorpusError("holdout:N needs the number of held-out pairs N >= 1, like "
                      "holdout:2000")
  return SourceSpec(source, "holdout", count=int(rest))


def _read_holdout(spec: SourceSpec, data_config: ml_collections.ConfigDict,
                  shard: corpora.Shard, shuffle_files: bool, seed: int,
                  stats: SkipStats | None, numbered: bool = False) -> tf.data.Dataset:
  del spec, shard, shuffle_files, seed  # One pipeline reads the whole dev set, in order.
  return _holdout_pairs(data_config, stats, numbered)


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One kind of source string: KIND:REST."""
  form: str  # Its syntax, for error messages.
  # (the whole source string, REST) -> SourceSpec; raises CorpusError saying what is wrong.
  parse: Callable[[str, str], SourceSpec]
  # (spec, data_config, shard, shuffle_files, seed, stats, numbered) -> (source, target)
  # tf.string pairs, one epoch; `shard` says which part this input pipeline reads;
  # `numbered` puts each pair's int64 position first (corpora.LINE_BITS).
  read: Callable[..., tf.data.Dataset]
  keys: tuple[str, ...] = ("train", "eval", "test")  # The data.* keys that accept it.
  # For kinds stored as token ids: the batched stream (prepared.make_dataset's signature),
  # instead of read + tokenize + bucket.
  batches: Callable[..., tf.data.Dataset] | None = None
  # For kinds read from lines of files: spec -> its units (corpora.file_units), which
  # nmt-prepare's Beam workers read in parallel; other kinds are read whole by one worker.
  units: Callable[[SourceSpec], list[tuple[str, ...]]] | None = None


SOURCE_KINDS: dict[str, SourceKind] = {
    "embedded": SourceKind("embedded:deu-eng[:train|dev|test], embedded[:cldr_numbers][:SPLIT]",
                           corpora.parse_embedded, corpora.read_embedded,
                           units=lambda spec: corpora.file_units(spec) if spec.paths else None),
    "tsv": SourceKind("tsv:PATH[:SRC_COL:TGT_COL]", corpora.parse_tsv, corpora.read_files,
                      units=corpora.file_units),
    "text": SourceKind("text:SRC_GLOB,TGT_GLOB", corpora.parse_text, corpora.read_files,
                       units=corpora.file_units),
    "tfds": SourceKind("tfds:NAME[:SPLIT]", corpora.parse_tfds, corpora.read_tfds),
    "prepared": SourceKind("prepared:DIR[:train|eval]", prepared.parse, prepared.read_text,
                           batches=prepared.make_dataset),
    "holdout": SourceKind("holdout:N (data.eval only)", _parse_holdout, _read_holdout,
                          keys=("eval",)),
}
FORMS = ", ".join(kind.form for kind in SOURCE_KINDS.values())


def parse_source(source: str) -> SourceSpec:
  """Parses a source string; CorpusError naming it and the valid forms if bad."""
  try:
    return _parse(source)
  except CorpusError as e:
    raise CorpusError(f"data source {source!r} is not valid ({e}); valid forms: "
                      f"{FORMS}") from None


def _parse(source: str) -> SourceSpec:
  """parse_source's parsing; its CorpusError says what is wrong, nothing more."""
  name, _, rest = source.partition(":") if isinstance(source, str) else ("", "", "")
  if name not in SOURCE_KINDS:
    raise CorpusError(f"unknown kind {name!r}" if source else "empty")
  return SOURCE_KINDS[name].parse(source, rest)


def check_sources(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the data.* key whose source string is malformed or of a kind that
  key does not accept; the entry points call it once, with configs/validate.py's checks."""
  specs = {}
  for key in ("train", "eval", "test"):
    source = config.data[key]
    if key == "test" and source == "":
      continue
    if source.partition(":")[0] not in SOURCE_KINDS:
      raise validate_lib.invalid(f"data.{key}", source, "must start with one of " + ", ".join(
          kind + ":" for kind in SOURCE_KINDS) + " (docs/data.md)")
    try:
      specs[key] = _parse(source)
    except CorpusError as e:
      raise validate_lib.invalid(f"data.{key}", source, f"{e}; the form is "
                                 f"{SOURCE_KINDS[source.partition(':')[0]].form}") from None
    if key not in SOURCE_KINDS[specs[key].kind].keys:
      raise validate_lib.invalid(f"data.{key}", source, (
          "holdout:N is a dev set carved out of data.train; it is for data.eval only"
          if specs[key].kind == "holdout" else f"data.{key} does not take this kind"))
  if specs["eval"].kind == "holdout" and specs["train"].kind == "prepared":
    raise validate_lib.invalid(
        "data.eval", config.data.eval, "holdout:N carves the dev set out of a raw "
        "data.train; for a prepared corpus, run nmt-prepare with data.eval=holdout:N and "
        "use data.eval=prepared:DIR:eval")
  _check_sampling(config, specs["train"])


def _check_sampling(config: ml_collections.ConfigDict, train: SourceSpec) -> None:
  """ConfigError for subword sampling on a data.train stored as token ids: a prepared
  corpus holds one segmentation per sentence, not the text to sample others from."""
  if config.tokenizer.get("sampling_alpha", 0) > 0 and SOURCE_KINDS[train.kind].batches:
    raise validate_lib.ConfigError(
        f"config.tokenizer.sampling_alpha={config.tokenizer.sampling_alpha!r} with "
        f"config.data.train={config.data.train!r} is invalid: a prepared corpus stores "
        "token ids (one segmentation per sentence), so subword sampling has no text to "
        "sample from; train on the raw corpus (the data.train given to nmt-prepare) or set "
        "tokenizer.sampling_alpha=0")


def read(source: str, data_config: ml_collections.ConfigDict, *,
         input_context: tf.distribute.InputContext | None = None,
         shuffle_files: bool = False, seed: int = 0,
         stats: SkipStats | None = None, numbered: bool = False,
         _holdout: bool = True) -> tf.data.Dataset:
  """Dataset of (source, target) scalar tf.string pairs from one source string; finite (one epoch).

  `numbered` puts each pair's int64 position in the corpus first, (position, source,
  target): its file and line (corpora.LINE_BITS), or its record number for TFDS.

  With data.eval=holdout:N, reading data.train leaves out the dev set, and reading
  holdout:N gives it (see holdout_threshold).

  With an input_context the pipelines get disjoint parts that together cover the corpus once:
  whole files if there are at least as many files as pipelines, else every N-th line (or
  TFDS record). Errors found while iterating are CorpusErrors wrapped by tf.data in an
  InvalidArgumentError; iterate inside surface_corpus_errors() to get them back as raised.
  """
  spec = parse_source(source)
  dataset = SOURCE_KINDS[spec.kind].read(spec, data_config, corpora.Shard.of(input_context),
                                         shuffle_files, seed, stats, numbered)
  if _holdout and source == data_config.train and holdout_count(data_config):
    threshold = holdout_threshold(data_config)  # Training reads data.train without the dev set.
    dataset = dataset.filter(lambda *pair: _source_hash(pair[-2]) > threshold)
  return dataset


def read_pairs(source: str, data_config: ml_collections.ConfigDict,
               limit: int | None = None, *,
               stats: SkipStats | None = None) -> Iterator[tuple[str, str]]:
  """Yields (source, target) Python strings, the first `limit` (None = all), in file order.

  For BLEU references; a CorpusError is raised as itself.
  """
  if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                            or limit < 0):
    raise ValueError(f"read_pairs: limit = {limit!r} is invalid: it must be None or >= 0")
  dataset = read(source, data_config, stats=stats)  # Now, so that bad sources fail here.
  if limit is not None:
    dataset = dataset.take(limit)

  def pairs() -> Iterator[tuple[str, str]]:
    with surface_corpus_errors():
      for sources, targets in dataset.batch(1024).as_numpy_iterator():
        for src, tgt in zip(sources, targets):
          yield src.decode("utf-8"), tgt.decode("utf-8")

  return pairs()


def sample_pairs(source: str, data_config: ml_collections.ConfigDict, size: int, *,
                 seed: int = 0, stats: SkipStats | None = None) -> Iterator[tuple[str, str]]:
  """Yields `size` (source, target) pairs drawn uniformly from the whole corpus (all of it
  when smaller), in corpus order (corpora.uniform_sample).

  For the tokenizer's training sample, which the first `size` lines of sorted files would
  draw from one file (often one domain). It costs one pass over the corpus, logged, when
  the iterator is first advanced; the same seed and corpus give the same sample.
  """
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f"sample_pairs: size = {size!r} is invalid: it must be an int >= 1")
  return corpora.uniform_sample(read(source, data_config, stats=stats, numbered=True), size,
                                seed=seed, name=source)


def tokenizer_sample(config: ml_collections.ConfigDict):
  """A callable yielding up to tokenizer.sample_size training pairs drawn uniformly from
  all of data.train, for tokenizer.load_or_train; for a prepared: data.train, its stored
  tokenizer (load_or_train copies it)."""
  spec = parse_source(config.data.train)
  if spec.kind == "prepared":
    return tokenizer_lib.StoredTokenizer(os.path.join(spec.paths[0], "tokenizer"))

  def sample() -> Iterator[tuple[str, str]]:
    return sample_pairs(config.data.train, config.data, config.tokenizer.sample_size)

  return sample


def prepare_source(source: str, data_config: ml_collections.ConfigDict) -> None:
  """Generates an embedded corpus (or prepares a tfds: one) if not done yet; other kinds
  need nothing. Multi-worker, the chief calls it before the workers' first barrier, so
  that workers sharing a TFDS data dir do not generate it at the same time on first use
  (one of them would read files the other is still writing)."""
  spec = parse_source(source)
  if spec.kind in ("embedded", "tfds"):
    corpora.prepare_tfds(spec, data_config)


def make_dataset(config, tokenizer: tokenizer_lib.Tokenizer, split: str, *,
                 input_context: tf.distribute.InputContext | None = None,
                 repeat: bool | None = None, start_step: int = 0,
                 length_stats: pipeline.LengthStats | None = None) -> tf.data.Dataset:
  """Builds the batched dataset of one split ("train" or "eval") for one input pipeline.

  train: config.data.train, shuffled with config.seed, repeated forever, remainders
  dropped (every shape on the grid). eval: config.data.eval, in order, one epoch, partial
  batches kept (batch size varies, length stays on the grid). `repeat` overrides the
  epoch default. With `input_context` the pipeline reads only its shard and batches per
  replica, for `strategy.distribute_datasets_from_function`: each step's k batches (one per
  local replica) have the same length. Other workers' pipelines bucket their own shards,
  so across workers a step's lengths still differ and the all-reduce waits for the worker
  with the longest (cost: E[max] over workers instead of the mean; a length schedule shared
  by all workers would remove it). The train stream starts after the batches of
  `start_step` steps: for a prepared: source in constant time (prepared.py), else by
  replaying the pipeline.
  """
  if split not in _SPLITS:
    raise ValueError(f"split={split!r}; valid: {_SPLITS}.")
  training = split == "train"
  repeat = training if repeat is None else repeat
  if length_stats is None:
    length_stats = pipeline.LengthStats(name=f"length_stats_{split}")
  source = config.data[split]
  logging.info("Input pipeline %s: %s, input context %s, repeat=%s, start step %d.", split,
               source, input_context, repeat, start_step)
  spec = parse_source(source)
  if training:
    _check_sampling(config, spec)
  if SOURCE_KINDS[spec.kind].batches:
    return SOURCE_KINDS[spec.kind].batches(spec, config, tokenizer, split,
                                           input_context=input_context, repeat=repeat,
                                           start_step=start_step, length_stats=length_stats)
  if config.data.service_address:
    raise ValueError(f"data.service_address={config.data.service_address!r} needs a "
                     f"prepared: data.{split} (nmt-prepare), not {source!r}: the raw "
                     f"readers run Python, which tf.data service workers cannot run")
  pairs = read(source, config.data, input_context=input_context, shuffle_files=training,
               seed=config.seed)
  return pipeline.batch_pairs(pairs, config, tokenizer, training=training, repeat=repeat,
                              input_context=input_context, start_step=start_step,
                              length_stats=length_stats)


# ---------------------------------------------------------------- holdout:N, the dev set

_dev_sets: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_thresholds: dict[tuple, int] = {}
_HASH_BUCKETS = (1 << 63) - 1


def _holdout_pairs(data_config: ml_collections.ConfigDict, stats: SkipStats | None,
                   numbered: bool = False) -> tf.data.Dataset:
  """The dev set of data.eval=holdout:N, in corpus order; kept in memory (N pairs) after the
  first call, so the evaluations during training do not rescan data.train."""
  key = _holdout_key(data_config)
  if key not in _dev_sets:
    threshold = holdout_threshold(data_config)
    dataset = read(data_config.train, data_config, stats=stats, numbered=True,
                   _holdout=False)
    dev = dataset.filter(lambda _, src, tgt: _source_hash(src) <= threshold).batch(1 << 14)
    columns = [[np.zeros([0], np.int64)], [np.zeros([0], object)], [np.zeros([0], object)]]
    with surface_corpus_errors():
      for batch in dev.as_numpy_iterator():
        for column, values in zip(columns, batch):
          column.append(values)
    positions, sources, targets = (np.concatenate(column) for column in columns)
    order = np.argsort(positions, kind="stable")
    _dev_sets[key] = positions[order], sources[order], targets[order]
  positions, sources, targets = _dev_sets[key]
  pairs = (tf.constant(sources, tf.string), tf.constant(targets, tf.string))
  if numbered:
    pairs = (tf.constant(positions, tf.int64),) + pairs
  return tf.data.Dataset.from_tensor_slices(pairs)


def _holdout_key(data_config: ml_collections.ConfigDict) -> tuple:
  return (data_config.train, data_config.eval, data_config.tfds_data_dir,
          data_config.tfds_source_key, data_config.tfds_target_key,
          data_config.max_skip_fraction)


def holdout_count(data_config: ml_collections.ConfigDict) -> int:
  """N of data.eval=holdout:N, else 0."""
  spec = parse_source(data_config.eval)
  return spec.count if spec.kind == "holdout" else 0


def _source_hash(sources: tf.Tensor) -> tf.Tensor:
  """A stable non-negative int64 of each source string (FarmHash Fingerprint64, the same on
  every platform and TensorFlow version), which decides the side of data.eval=holdout:N."""
  return tf.strings.to_hash_bucket_fast(sources, _HASH_BUCKETS)


def holdout_threshold(data_config: ml_collections.ConfigDict) -> int:
  """The largest source hash of the dev set of data.eval=holdout:N: the N-th smallest
  source hash of data.train's pairs. Pairs whose source hashes at most this are the dev
  set, all others train, so a source never lands on both sides (the dev set has a few
  more than N pairs when the N-th source has several translations; none is dropped) and
  the split is the same on every run, worker and machine, whatever the file order.

  It costs one scan of data.train per process (hashing in-graph, keeping the N smallest:
  O(lines) time, O(N) memory; about 1 s per 10^5 pairs here, so ~15 min at 10^8); for
  such corpora run nmt-prepare with data.eval=holdout:N once, which stores both sides.
  """
  count = holdout_count(data_config)
  if parse_source(data_config.train).kind in ("prepared", "holdout"):
    raise CorpusError(
        f"data.eval={data_config.eval!r} carves its pairs out of a raw data.train, not "
        f"{data_config.train!r}; run nmt-prepare on the raw corpus with "
        f"data.eval={data_config.eval!r} and then train on prepared:DIR with "
        f"data.eval=prepared:DIR:eval")
  key = _holdout_key(data_config)
  if key not in _thresholds:
    smallest = np.zeros([0], np.int64)  # The N smallest source hashes, repeats included.
    hashes = read(data_config.train, data_config, _holdout=False).batch(1 << 14).map(
        lambda src, _: _source_hash(src))
    pairs = 0
    with surface_corpus_errors():
      for chunk in hashes.as_numpy_iterator():
        pairs += len(chunk)
        smallest = np.sort(np.concatenate([smallest, chunk]))[:count]
    _thresholds[key] = threshold_of(smallest, pairs, data_config)
    logging.info("data.eval=%s: dev set = the pairs of %s whose source hashes <= %d; "
                 "training skips them.", data_config.eval, data_config.train,
                 _thresholds[key])
  return _thresholds[key]


def threshold_of(smallest: np.ndarray, pairs: int,
                 data_config: ml_collections.ConfigDict) -> int:
  """holdout_threshold from the N smallest source hashes of data.train (repeats included)
  and its number of pairs; CorpusError if that leaves nothing to train on."""
  count = holdout_count(data_config)
  if pairs <= count:
    raise CorpusError(f"data.eval={data_config.eval!r} asks for {count} held-out "
                      f"pairs but data.train={data_config.train!r} has only {pairs}, "
                      f"which would leave nothing to train on")
  return int(np.sort(smallest)[count - 1])


def source_hashes(sources: np.ndarray) -> np.ndarray:
  """The holdout hashes (`_source_hash`) of a batch of source strings, eagerly."""
  return _source_hash(tf.constant(sources, tf.string)).numpy()


# ------------------------------------------------- reading in parts (nmt-prepare on Beam)


@dataclasses.dataclass(frozen=True)
class ReadUnit:
  """A part of a source that one worker reads: the lines i % parts == part of unit `index`
  of the source's units (`paths`: a file, or an aligned pair); paths=() for a source read
  whole by one worker (tfds:, the generated embedded corpus)."""
  source: str
  index: int = 0
  paths: tuple[str, ...] = ()
  part: int = 0
  parts: int = 1


def holdout_side(source: str, data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(the source to read, the side of data.eval=holdout:N to keep: "dev", "train" or "")
  for the source of one split: holdout:N reads data.train's dev side, and data.train its
  train side when data.eval is holdout:N."""
  if parse_source(source).kind == "holdout":
    return data_config.train, "dev"
  if source == data_config.train and holdout_count(data_config):
    return source, "train"
  return source, ""


def read_units(source: str, parts: int = 1) -> list[ReadUnit]:
  """The units of a raw source (not holdout:), each in `parts` parts of interleaved lines
  (a source without units is one part). CorpusError if no file matches or all are empty."""
  spec = parse_source(source)
  units = SOURCE_KINDS[spec.kind].units
  paths = units(spec) if units else None
  if paths is None:
    return [ReadUnit(source)]
  return [ReadUnit(source, index, unit, part, parts)
          for index, unit in enumerate(paths) for part in range(parts)]


def read_unit(unit: ReadUnit, data_config: ml_collections.ConfigDict,
              stats: SkipStats | None, max_skip_fraction: float
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(positions, sources, targets) numpy chunks of one ReadUnit, in its order, bad lines
  skipped and counted into `stats` (max_skip_fraction checked per call, see
  corpora.unit_chunks). The same positions as read(..., numbered=True)."""
  spec = parse_source(unit.source)
  if not unit.paths:
    pairs = read(unit.source, data_config, numbered=True, _holdout=False)
    with surface_corpus_errors():
      yield from pairs.batch(corpora.CHUNK_PAIRS).as_numpy_iterator()
    return
  if spec.kind == "text":
    corpora.check_aligned(unit.paths)
  yield from corpora.unit_chunks(spec, unit.index, unit.paths, max_skip_fraction, stats,
                                 corpora.Shard(unit.parts, unit.part))
