"""Raw corpus readers: the embedded, tsv:, text: and tfds: source kinds, as (source, target)
string pairs, skipping and counting bad lines.

Each kind has a `parse_*` (the text after "KIND:" -> SourceSpec) and a `read_*` (SourceSpec ->
dataset of pairs); input_pipeline/datasets.py lists them in its table of source kinds, which
has the syntax of every kind, and is the only caller. Files may match several shards (read in
sorted order) and may be gzipped (`.gz`). Bad lines of tsv/text files are skipped, logged with
file:line and counted; more than `data.max_skip_fraction` of a file skipped is a CorpusError.
Also here, because every reader shares them: SourceSpec, CorpusError, SkipStats, Shard,
surface_corpus_errors and the uniform sample of a pairs dataset.
"""
import collections
import contextlib
import dataclasses
import gzip
import io
import itertools
import os
import re
import threading
from typing import Iterator, NamedTuple
import zlib

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

# A side (source or target text) longer than this many UTF-8 bytes is skipped as over-long:
# no sentence is that long, so it is a broken line (a missing newline, a pasted document),
# and tokenizing it would cost more time and memory than the rest of its batch.
MAX_SIDE_BYTES = 10_000
# A whole line longer than this is dropped while it streams past, never held in memory,
# so a binary file or one without newlines cannot exhaust memory.
_MAX_LINE_BYTES = 1 << 20
_READ_BYTES = 1 << 18  # Must not exceed _MAX_LINE_BYTES (see _lines).
_UTF8_BOM = b"\xef\xbb\xbf"
CHUNK_PAIRS = 2048  # Pairs per from_generator element: amortizes its per-call cost.
_CHUNK_SIGNATURE = (tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.string))
_LOGGED_SKIPS_PER_FILE = 10
# A pair's position in its corpus: (unit index << LINE_BITS) | line number (from 1), where a
# unit is one file (tsv:) or aligned file pair (text:) in sorted order, or a TFDS split
# (unit 0, record number). Sorting by it gives corpus order; nmt-prepare derives each
# example's shard from it, so that the result does not depend on the order of reading.
LINE_BITS = 40
_END = object()  # Marks the end of the shorter file of an aligned pair.
# NAME may carry a TFDS version (mnist:3.0.1) and SPLIT a slice (train[:10%]).
_TFDS_SOURCE = re.compile(r"(?P<name>[^:\[]+(?::\d+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?")


_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# Corpora shipped as package data: {name: {split: path}}.
EMBEDDED_FILES = {"deu-eng": {split: os.path.join(_DATA_DIR, "deu-eng", f"{split}.tsv.gz")
                              for split in ("train", "dev", "test")}}


class CorpusError(ValueError):
  """A corpus cannot be read as asked: the message names the file (and line) or source."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed source string; `source` is the original, for error messages."""
  source: str
  kind: str  # embedded | tsv | text | tfds | prepared | holdout
  # tsv: (PATH,); text: (SRC_GLOB, TGT_GLOB); prepared: (DIR,); embedded:deu-eng: (its file,).
  paths: tuple[str, ...] = ()
  columns: tuple[int, int] = (0, 1)  # tsv: source and target column, from 0.
  name: str = ""  # embedded/tfds: the TFDS name, with config and version if given.
  split: str = ""  # embedded/tfds: the TFDS split, slices allowed; prepared: "" or the split.
  count: int = 0  # holdout: the number of pairs held out.


class Shard(NamedTuple):
  """The part of a source one input pipeline reads: `index` of `count` (disjoint parts that
  together cover the corpus once)."""
  count: int = 1
  index: int = 0

  @classmethod
  def of(cls, input_context: tf.distribute.InputContext | None) -> "Shard":
    if input_context is None:
      return cls()
    return cls(input_context.num_input_pipelines, input_context.input_pipeline_id)


class _Skip(Exception):
  """A line to skip; `reason` is what is counted, `detail` what is logged."""

  def __init__(self, reason: str, detail: str, side: str = ""):
    super().__init__(detail)
    self.reason, self.detail, self.side = reason, detail, side


class SkipStats:
  """Kept and skipped line counts per file, added by read()'s readers at the end of each file.

  Pass one to read(..., stats=) to inspect what was skipped; the reader threads of one
  pipeline share it, hence the lock. Counts add up over epochs if the dataset is repeated.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._files: dict[str, tuple[int, collections.Counter]] = {}
    self._first: dict[str, tuple[int, str]] = {}

  def add(self, name: str, read: int, skipped: dict[str, int],
          first_skip: tuple[int, str] | None = None) -> None:
    """Adds one reader's counts for file `name`; `first_skip` = (line, "path:line: why")
    of its first skipped line (the earliest line of all the file's readers is kept)."""
    first_skip = tuple(first_skip) if first_skip else None
    with self._lock:
      old_read, old_skipped = self._files.get(name, (0, collections.Counter()))
      self._files[name] = (old_read + read, old_skipped + collections.Counter(skipped))
      if first_skip and (name not in self._first or first_skip < self._first[name]):
        self._first[name] = first_skip

  def first_skips(self) -> dict[str, tuple[int, str]]:
    """{file: (line, "path:line: why")} of the first skipped line of each file with one."""
    with self._lock:
      return dict(self._first)

  def merge(self, other: "SkipStats") -> None:
    first = other.first_skips()
    for name, (read, skipped) in other.per_file().items():
      self.add(name, read, skipped, first.get(name))

  def error(self, max_skip_fraction: float) -> "CorpusError | None":
    """The CorpusError of the first file (by name) with more than max_skip_fraction of its
    lines skipped, else None: for readers of parts of a file, which cannot tell alone."""
    first = self.first_skips()
    for name, (read, skipped) in sorted(self.per_file().items()):
      error = skip_error(name, read, skipped, first.get(name, (0, ""))[1],
                         max_skip_fraction)
      if error:
        return error
    return None

  def per_file(self) -> dict[str, tuple[int, dict[str, int]]]:
    """{file (or "src,tgt" pair): (pairs read, {reason: lines skipped})}."""
    with self._lock:
      return {name: (read, dict(skipped)) for name, (read, skipped) in self._files.items()}

  @property
  def read(self) -> int:
    return sum(read for read, _ in self.per_file().values())

  @property
  def skipped(self) -> dict[str, int]:
    """Lines skipped over all files, by reason."""
    total = collections.Counter()
    for _, skipped in self.per_file().values():
      total.update(skipped)
    return dict(total)


def parse_embedded(source: str, rest: str) -> SourceSpec:
  """embedded:deu-eng[:SPLIT] (shipped files) or embedded[:cldr_numbers][:SPLIT] (generated)."""
  if source.endswith(":") and not rest:
    raise CorpusError("embedded: needs a corpus or SPLIT after the colon")
  name, _, split = rest.partition(":")
  if name in EMBEDDED_FILES:
    if split not in ("",) + tuple(EMBEDDED_FILES[name]):
      raise CorpusError(f"embedded:{name} has the splits {', '.join(EMBEDDED_FILES[name])}")
    return SourceSpec(source, "embedded", name=name, split=split or "train",
                      paths=(EMBEDDED_FILES[name][split or "train"],))
  if name == "cldr_numbers":
    return SourceSpec(source, "embedded", name=name, split=split or "train")
  return SourceSpec(source, "embedded", name="cldr_numbers", split=rest or "train")


def parse_tsv(source: str, rest: str) -> SourceSpec:
  """PATH[:SRC_COL:TGT_COL]; a last field with a '/' is part of a URL path (gs://)."""
  path, columns = rest, "0:1"
  head, _, last = rest.rpartition(":")
  if head and "/" not in last:  # rest ends with a column spec.
    path, _, first = head.rpartition(":")
    columns = f"{first}:{last}"
  if not re.fullmatch(r"\d+:\d+", columns):
    raise CorpusError(f"columns must be two column numbers counted from 0, like "
                      f"tsv:PATH:0:1, got {columns!r}")
  if not path:
    raise CorpusError("tsv: needs a PATH")
  src_col, tgt_col = map(int, columns.split(":"))
  return SourceSpec(source, "tsv", paths=(path,), columns=(src_col, tgt_col))


def parse_text(source: str, rest: str) -> SourceSpec:
  """SRC_GLOB,TGT_GLOB."""
  globs = tuple(rest.split(","))
  if len(globs) != 2 or not all(globs):
    raise CorpusError("text: needs exactly two comma-separated globs")
  return SourceSpec(source, "text", paths=globs)


def parse_tfds(source: str, rest: str) -> SourceSpec:
  """NAME[:SPLIT]."""
  match = _TFDS_SOURCE.fullmatch(rest)
  if not match:
    raise CorpusError("tfds: needs NAME or NAME:SPLIT")
  return SourceSpec(source, "tfds", name=match["name"], split=match["split"] or "train")


def read_embedded(spec: SourceSpec, data_config: ml_collections.ConfigDict, shard: Shard,
                  shuffle_files: bool, seed: int, stats: SkipStats | None,
                  numbered: bool = False) -> tf.data.Dataset:
  """The shipped files of embedded:deu-eng are read as tsv:, the generated corpus by TFDS."""
  if spec.paths:
    return read_files(dataclasses.replace(spec, kind="tsv"), data_config, shard,
                      shuffle_files, seed, stats, numbered)
  return read_tfds(spec, data_config, shard, shuffle_files, seed, stats, numbered)


def uniform_sample(numbered_pairs: tf.data.Dataset, size: int, *, seed: int = 0,
                   name: str = "") -> Iterator[tuple[str, str]]:
  """Yields `size` (source, target) pairs of a dataset of (position, source, target) drawn
  uniformly (all of them when fewer), in corpus order (by position): those whose seeded
  hash of the pair's text (`pair_hashes`) is smallest, ties broken by position.

  One pass over the dataset, run when the iterator is first advanced (hashing in-graph;
  memory O(size)); the same seed and pairs give the same sample, in any reading order (so
  nmt-prepare's Beam path, which keeps the same smallest hashes, draws the same one).
  """
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f"sample_pairs: size = {size!r} is invalid: it must be an int >= 1")
  hashed = numbered_pairs.batch(1 << 14).map(
      lambda position, src, tgt: (pair_hashes(src, tgt, seed), position, src, tgt))

  def sample() -> Iterator[tuple[str, str]]:
    logging.info("Sampling %d pairs uniformly from %s: one pass over the corpus.", size,
                 name)
    kept = Sample(size)
    with surface_corpus_errors():
      for hashes, positions, src, tgt in hashed.as_numpy_iterator():
        kept.add(hashes, positions, src, tgt)
    logging.info("Sampled %d of the %d pairs of %s.", len(kept.hashes), kept.seen, name)
    for src, tgt in zip(*kept.in_corpus_order()):
      yield src.decode("utf-8"), tgt.decode("utf-8")

  return sample()


_HASH_BUCKETS = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def pair_hashes(sources, targets, seed: int) -> tf.Tensor:
  """int64 [B]: a seeded hash (SipHash) of each pair's text; the tokenizer sample keeps the
  pairs with the smallest ones (in-graph or eager)."""
  key = [seed & _MASK64, 0x6e6d745f73616d70]  # Any fixed second half ("nmt_samp").
  return tf.strings.to_hash_bucket_strong(tf.strings.join([sources, targets], "\t"),
                                          _HASH_BUCKETS, key)


class Sample:
  """The `size` pairs with the smallest (hash, position) seen so far; `merge` adds another
  Sample's (a Beam combiner's partial results). Candidates are trimmed when twice `size`
  are pending (O(n log size) in all); pickled compactly (the texts as one buffer)."""

  def __init__(self, size: int):
    self.size, self.seen = size, 0
    self._columns = [[np.zeros([0], np.int64)], [np.zeros([0], np.int64)],
                     [np.zeros([0], object)], [np.zeros([0], object)]]
    self._pending = 0
    self._largest = None  # The largest kept hash once `size` are kept: a bound for new ones.

  def add(self, hashes: np.ndarray, positions: np.ndarray, sources: np.ndarray,
          targets: np.ndarray, seen: int | None = None) -> None:
    self.seen += len(hashes) if seen is None else seen
    if self._largest is not None:  # Only hashes up to the largest kept one can get in.
      take = hashes <= self._largest
      hashes, positions, sources, targets = (
          hashes[take], positions[take], sources[take], targets[take])
    for column, values in zip(self._columns, (hashes, positions, sources, targets)):
      column.append(values)
    self._pending += len(hashes)
    if self._pending > 2 * self.size:
      self._trim()

  def _trim(self) -> None:
    hashes, positions, sources, targets = (np.concatenate(c) for c in self._columns)
    if len(hashes) > self.size:
      keep = np.lexsort((positions, hashes))[:self.size]
      hashes, positions, sources, targets = (
          hashes[keep], positions[keep], sources[keep], targets[keep])
      self._largest = hashes[-1]
    self._columns = [[hashes], [positions], [sources], [targets]]
    self._pending = len(hashes)

  @property
  def hashes(self) -> np.ndarray:
    self._trim()
    return self._columns[0][0]

  def merge(self, other: "Sample") -> None:
    other._trim()
    self.add(*(column[0] for column in other._columns), other.seen)

  def in_corpus_order(self) -> tuple[np.ndarray, np.ndarray]:
    self._trim()
    _, positions, sources, targets = (column[0] for column in self._columns)
    order = np.argsort(positions, kind="stable")
    return sources[order], targets[order]

  def __getstate__(self) -> dict:
    self._trim()
    hashes, positions, sources, targets = (column[0] for column in self._columns)
    texts = [t.encode("utf-8") if isinstance(t, str) else bytes(t)
             for t in np.concatenate([sources, targets])]
    return {"size": self.size, "seen": self.seen, "largest": self._largest,
            "hashes": hashes, "positions": positions, "texts": b"".join(texts),
            "lengths": np.array([len(t) for t in texts], np.int64)}

  def __setstate__(self, state: dict) -> None:
    self.size, self.seen, self._largest = state["size"], state["seen"], state["largest"]
    ends = np.cumsum(state["lengths"]).tolist()
    buffer = state["texts"]
    texts = np.empty(len(ends), object)
    texts[:] = [buffer[end - n:end] for end, n in zip(ends, state["lengths"].tolist())]
    half = len(texts) // 2
    self._columns = [[state["hashes"]], [state["positions"]], [texts[:half]], [texts[half:]]]
    self._pending = len(state["hashes"])


@contextlib.contextmanager
def surface_corpus_errors() -> Iterator[None]:
  """Re-raises a CorpusError from a reader thread as itself, without the tf.data wrapping.

  tf.data reports an exception raised in a from_generator reader as an InvalidArgumentError
  whose message buries ours in a Python traceback; wrap loops over read()'s datasets in this.
  A DataLossError (a prepared shard corrupted while training) becomes a CorpusError too.
  """
  try:
    yield
  except tf.errors.InvalidArgumentError as e:
    messages = re.findall(r"CorpusError: (.+)", e.message)
    if not messages:
      raise
    raise CorpusError(messages[-1]) from None
  except tf.errors.DataLossError as e:  # A prepared shard changed after it was verified.
    raise CorpusError(f"a prepared shard is corrupted ({e.message.splitlines()[-1]}); run "
                      f"nmt-prepare again with the same --output_dir: it checks every "
                      f"shard and names the bad one") from None


def prepare_tfds(spec: SourceSpec, data_config: ml_collections.ConfigDict) -> None:
  """Generates the embedded TFDS corpus (or prepares a tfds: one) if not done yet; the
  shipped embedded:deu-eng files need nothing."""
  if not spec.paths:
    _tfds_builder(spec, data_config)


def _tfds_builder(spec: SourceSpec, data_config: ml_collections.ConfigDict):
  """The TFDS builder of an embedded or tfds: source, prepared (generated, for embedded)."""
  import tensorflow_datasets as tfds  # Here, not at the top: it takes seconds to import.
  if spec.kind == "embedded":
    from input_pipeline import cldr_numbers  # noqa: F401  (registers the builder)
  builder = tfds.builder(spec.name, data_dir=data_config.tfds_data_dir or None)
  if spec.kind == "embedded":
    # Generated here, nothing downloaded: TFDS's "Downloading and preparing" print would
    # say otherwise, so it is replaced by a line of ours.
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      logging.info("Generating the embedded corpus %s into %s (once; about 20 s).",
                   spec.name, builder.data_dir)
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
  else:
    builder.download_and_prepare()
  return builder


def read_tfds(spec: SourceSpec, data_config: ml_collections.ConfigDict, shard: Shard,
              shuffle_files: bool, seed: int, stats: SkipStats | None,
              numbered: bool = False) -> tf.data.Dataset:
  """Reads an embedded or tfds: source, preparing it first (generating, for embedded).
  TFDS records have no lines to skip, so `stats` stays unused. With `numbered`, the
  position of a record is its number in the split (from 1) as read (unit 0)."""
  del stats
  import tensorflow_datasets as tfds  # Here, not at the top: it takes seconds to import.
  builder = _tfds_builder(spec, data_config)
  src_key, tgt_key = _feature_keys(spec, list(builder.info.features.keys()), data_config)
  split = spec.split
  if shard.count > 1:  # By record: TFDS shards by file only if there are enough files.
    split = tfds.even_splits(split, n=shard.count)[shard.index]
  options = tf.data.Options()
  options.deterministic = data_config.deterministic
  read_config = tfds.ReadConfig(shuffle_seed=seed, options=options)
  # Ordered datasets (disable_shuffling) refuse shuffle_files; the example shuffle
  # buffer downstream still mixes them.
  shuffle_files = shuffle_files and not builder.info.disable_shuffling
  examples = builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                read_config=read_config)
  pairs = examples.map(lambda example: (example[src_key], example[tgt_key]),
                       num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=data_config.deterministic)
  if numbered:
    return pairs.enumerate(start=1).map(lambda position, pair: (position, *pair))
  return pairs


def _feature_keys(spec: SourceSpec, available: list[str],
                  data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The source and target feature keys: from the config, else the config name (de-en)."""
  if spec.kind == "embedded":
    return "source", "target"
  config_name = spec.name.split(":")[0].partition("/")[2]
  languages = config_name.split("-") if config_name.count("-") == 1 else ["", ""]
  keys = []
  for config_key, default in zip(("tfds_source_key", "tfds_target_key"), languages):
    key = data_config[config_key] or default
    if key not in available:
      given = (f"data.{config_key} = {key!r}" if data_config[config_key] else
               f"{key!r} from the config name" if key else
               f"data.{config_key} is empty and the config name {config_name!r} is not "
               f"SRC-TGT (like de-en)")
      raise CorpusError(f"{spec.source}: {given}, but the dataset has no such feature; "
                        f"available feature keys: {', '.join(sorted(available))}")
    keys.append(key)
  return keys[0], keys[1]


def read_files(spec: SourceSpec, data_config: ml_collections.ConfigDict, shard: Shard,
               shuffle_files: bool, seed: int, stats: SkipStats | None,
               numbered: bool = False) -> tf.data.Dataset:
  """Reads a tsv: or text: source: one Python reader per file (pair), interleaved; with
  `numbered`, (position, source, target) triples (LINE_BITS).

  Each reader is a from_generator over the file's bytes (`unit_chunks`), not a chain of
  tf.data text ops, because skipping needs the file and line number in the log and
  per-file counts, which in-graph ops cannot report; reading in chunks of CHUNK_PAIRS
  pairs keeps it fast.
  """
  units = list(enumerate(file_units(spec)))  # (index, (path,) or (src, tgt)).
  record_shard = shard
  if len(units) >= shard.count:  # By file: file i goes to pipeline i % N.
    units, record_shard = units[shard.index::shard.count], Shard()
  if spec.kind == "text":
    for _, paths in units:  # Up front: the reader would only notice at the end of an epoch.
      check_aligned(paths)

  def reader(index, *paths: bytes) -> Iterator[tuple[np.ndarray, ...]]:
    chunks = unit_chunks(spec, int(index), [path.decode("utf-8") for path in paths],
                         data_config.max_skip_fraction, stats, record_shard)
    for positions, sources, targets in chunks:
      yield (positions, sources, targets) if numbered else (sources, targets)

  signature = (tf.TensorSpec([None], tf.int64),) * numbered + _CHUNK_SIGNATURE
  files = tf.data.Dataset.from_tensor_slices(
      (tf.constant([index for index, _ in units], tf.int64),
       *(list(paths) for paths in zip(*(paths for _, paths in units)))))
  if shuffle_files:
    files = files.shuffle(len(units), seed=seed)
  chunks = files.interleave(
      lambda index, *paths: tf.data.Dataset.from_generator(
          reader, args=(index, *paths), output_signature=signature),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=data_config.deterministic)
  return chunks.unbatch()


def file_units(spec: SourceSpec) -> list[tuple[str, ...]]:
  """The units of a tsv:, text: or shipped embedded source in corpus order: (path,) per tsv
  file, (src, tgt) per aligned text pair; empty files are dropped with a warning."""
  if spec.kind == "embedded":
    spec = dataclasses.replace(spec, kind="tsv")
  return _nonempty(spec, _find_units(spec))


def unit_chunks(spec: SourceSpec, index: int, paths: list[str] | tuple[str, ...],
                max_skip_fraction: float, stats: SkipStats | None,
                shard: Shard = Shard()) -> Iterator[tuple[np.ndarray, ...]]:
  """(positions int64, sources, targets) arrays of up to CHUNK_PAIRS good pairs of unit
  `index` of `file_units(spec)` (its lines i with i % shard.count == shard.index, counted
  from 0), skipping and counting bad lines into `stats` at the end of the unit.

  The one reader of tsv:/text: lines: read_files (training) and nmt-prepare, in one process
  or in Beam workers, all read through it. max_skip_fraction is enforced per call, so a
  caller reading a file in parts passes inf and checks SkipStats.error over all parts.
  """
  tally = _Tally(",".join(paths), max_skip_fraction, stats)
  if spec.kind == "text":
    pairs = _text_pairs(list(paths), tally, shard=shard)
  else:
    pairs = _tsv_pairs(list(paths), tally, columns=spec.columns, shard=shard)
  base = index << LINE_BITS
  while chunk := list(itertools.islice(pairs, CHUNK_PAIRS)):
    tally.read += len(chunk)
    linenos, sources, targets = zip(*chunk)
    yield (np.array(linenos, np.int64) + base, np.array(sources, dtype=object),
           np.array(targets, dtype=object))
  tally.finish()


def check_aligned(paths: tuple[str, ...] | list[str]) -> None:
  """CorpusError naming both files of a text: unit if their line counts differ."""
  error = _alignment_error(*paths)
  if error:
    raise error


def _find_units(spec: SourceSpec) -> list[tuple[str, ...]]:
  """The files of a tsv/text source, sorted; for text, the i-th match of each side paired."""
  matches = [_glob(spec.source, pattern) for pattern in spec.paths]
  if len(matches) == 2 and len(matches[0]) != len(matches[1]):
    raise CorpusError(
        f"{spec.source}: {spec.paths[0]!r} matches {len(matches[0])} files but "
        f"{spec.paths[1]!r} matches {len(matches[1])}; the sorted matches are paired in "
        f"order, so both sides need the same number of files")
  return list(zip(*matches))


def _glob(source: str, pattern: str) -> list[str]:
  paths = sorted(p for p in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(p))
  if not paths and tf.io.gfile.isdir(pattern):
    raise CorpusError(f"{source}: {pattern!r} is a directory; name a file, or a glob like "
                      f"{os.path.join(pattern, '*.tsv')!r}")
  if not paths:
    raise CorpusError(f"{source}: no file matches {pattern!r} "
                      f"(working directory {os.getcwd()})")
  return paths


def _nonempty(spec: SourceSpec, units: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
  """Drops empty files with a warning; all of them empty is a CorpusError."""
  empty = [unit for unit in units if all(_is_empty(path) for path in unit)]
  if len(empty) == len(units):
    raise CorpusError(f"{spec.source}: every matching file is empty: "
                      f"{'; '.join(','.join(unit) for unit in units)}")
  for unit in empty:
    logging.warning("%s: empty file, skipped (other files of %s have data)",
                    ",".join(unit), spec.source)
  return [unit for unit in units if unit not in empty]


def _tsv_pairs(paths: list[str], tally: "_Tally", *, columns: tuple[int, int],
               shard: Shard) -> Iterator[tuple[int, str, str]]:
  """Yields (line number, source, target) of the good lines of one TSV file (this shard's
  lines); tallies the bad."""
  (path,) = paths
  src_col, tgt_col = columns
  needed = max(columns) + 1
  with _open(path) as f:
    numbered = itertools.islice(enumerate(_lines(f, path), 1), shard.index, None, shard.count)
    for lineno, line in numbered:
      try:
        if line is None:
          raise _Skip("over-long", f"line over {_MAX_LINE_BYTES} bytes")
        fields = line.split(b"\t", needed)  # Later columns stay unsplit: they are ignored.
        if len(fields) < needed:
          raise _Skip("too few columns",
                      f"{len(fields)} tab-separated columns, need at least {needed} "
                      f"(columns {src_col}:{tgt_col}, counted from 0)")
        src, tgt = _pair(fields[src_col], fields[tgt_col])
      except _Skip as skip:
        tally.skip(path, lineno, skip)
        continue
      yield lineno, src, tgt


def _text_pairs(paths: list[str], tally: "_Tally", *,
                shard: Shard) -> Iterator[tuple[int, str, str]]:
  """Yields (line number, source, target) of the good lines of two aligned text files (this
  shard's lines); tallies the bad."""
  src_path, tgt_path = paths
  with _open(src_path) as src_file, _open(tgt_path) as tgt_file:
    lines = _aligned(src_path, tgt_path, _lines(src_file, src_path), _lines(tgt_file, tgt_path))
    numbered = itertools.islice(enumerate(lines, 1), shard.index, None, shard.count)
    for lineno, (src, tgt) in numbered:
      try:
        pair = _pair(src, tgt)
      except _Skip as skip:
        tally.skip(tgt_path if skip.side == "target" else src_path, lineno, skip)
        continue
      yield lineno, pair[0], pair[1]


def _aligned(src_path: str, tgt_path: str, src_lines: Iterator, tgt_lines: Iterator
             ) -> Iterator[tuple[bytes | None, bytes | None]]:
  """Pairs the lines of two aligned files; every record shard sees a length mismatch."""
  for src, tgt in itertools.zip_longest(src_lines, tgt_lines, fillvalue=_END):
    if src is _END or tgt is _END:  # The files changed since read() compared them.
      raise (_alignment_error(src_path, tgt_path)
             or CorpusError(f"{src_path} and {tgt_path} changed while being read"))
    yield src, tgt


def _pair(src: bytes | None, tgt: bytes | None) -> tuple[str, str]:
  """Decodes and strips a pair; raises _Skip saying why it is unusable."""
  # A quick test that most lines pass; _side, the definition of a usable side, finds the
  # reason for those that do not (this halves the time per line).
  if (src is not None and tgt is not None and len(src) <= MAX_SIDE_BYTES
      and len(tgt) <= MAX_SIDE_BYTES and 0 not in src and 0 not in tgt):
    try:
      pair = src.decode("utf-8").strip(), tgt.decode("utf-8").strip()
    except UnicodeDecodeError:
      pair = ("", "")  # _side says which side.
    if pair[0] and pair[1]:
      return pair
  return _side(src, "source"), _side(tgt, "target")


def _side(raw: bytes | None, side: str) -> str:
  """Decodes and strips one side of a pair; raises _Skip saying why it is unusable."""
  if raw is None or len(raw) > MAX_SIDE_BYTES:
    raise _Skip("over-long", f"{side} over {MAX_SIDE_BYTES} bytes", side)
  if 0 in raw:  # A NUL byte; testing for the int is a memchr, for b"\0" much slower.
    raise _Skip("NUL byte", f"NUL byte in the {side}", side)
  try:
    text = raw.decode("utf-8").strip()
  except UnicodeDecodeError as e:
    raise _Skip("invalid UTF-8", f"invalid UTF-8 in the {side} at byte {e.start}",
                side) from None
  if not text:
    raise _Skip("empty side", f"empty {side}", side)
  return text


class _Tally:
  """One file's kept and skipped lines: logs the first skips, a summary at the end of the
  file, and enforces data.max_skip_fraction there (for files of any size)."""

  def __init__(self, name: str, max_skip_fraction: float, stats: SkipStats | None):
    self.name, self.max_skip_fraction, self.stats = name, max_skip_fraction, stats
    self.read = 0
    self.skipped = collections.Counter()
    self.first_skip: tuple[int, str] | None = None  # (line, "path:line: why")

  def skip(self, path: str, lineno: int, skip: _Skip) -> None:
    self.skipped[skip.reason] += 1
    total = self.skipped.total()
    if total == 1:
      self.first_skip = (lineno, f"{path}:{lineno}: {skip.detail}")
    if total <= _LOGGED_SKIPS_PER_FILE:
      logging.warning("%s:%d: skipped line: %s", path, lineno, skip.detail)
    if total == _LOGGED_SKIPS_PER_FILE + 1:
      logging.warning("%s: further skipped lines are only counted; the end-of-file "
                      "summary has the totals", self.name)

  def finish(self) -> None:
    reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
    logging.info("%s: %d read, %d skipped%s", self.name, self.read, self.skipped.total(),
                 f" ({reasons})" if reasons else "")
    if self.stats is not None:
      self.stats.add(self.name, self.read, self.skipped, self.first_skip)
    error = skip_error(self.name, self.read, self.skipped,
                       self.first_skip[1] if self.first_skip else "", self.max_skip_fraction)
    if error:
      raise error  # Not logged too: the caller prints it once.


def skip_error(name: str, read: int, skipped: dict[str, int], first_skip: str,
               max_skip_fraction: float) -> CorpusError | None:
  """The CorpusError for a file with more than max_skip_fraction of its lines skipped
  (naming it, the counts by reason and the first bad line), else None."""
  skipped = collections.Counter(skipped)
  seen = read + skipped.total()
  if not seen or skipped.total() / seen <= max_skip_fraction:
    return None
  reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
  return CorpusError(
      f"{name}: {skipped.total()} of {seen} lines skipped as malformed ({reasons}), more "
      f"than data.max_skip_fraction = {max_skip_fraction}; the first: {first_skip}. Fix "
      "the file (the log names the first bad lines) or raise data.max_skip_fraction")


@contextlib.contextmanager
def _open(path: str) -> Iterator:
  """Opens a local or remote (gs://...) file for binary reading, decompressing .gz."""
  with tf.io.gfile.GFile(path, "rb") as f:
    if path.endswith(".gz"):
      with gzip.GzipFile(fileobj=f, mode="rb") as unzipped:
        yield unzipped
    else:
      yield f


def _read_chunks(f, path: str) -> Iterator[bytes]:
  """Yields an open file's bytes in chunks, minus a leading UTF-8 byte-order mark."""
  try:
    yield f.read(_READ_BYTES).removeprefix(_UTF8_BOM)
    while chunk := f.read(_READ_BYTES):
      yield chunk
  except (OSError, EOFError, zlib.error, tf.errors.OpError) as e:  # E.g. a corrupt .gz.
    raise CorpusError(f"{path}: cannot read the file: {e}") from e


def _lines(f, path: str) -> Iterator[bytes | None]:
  """Yields the lines of an open file without their newline; None for a line longer than
  _MAX_LINE_BYTES, which is dropped as it streams past so memory stays bounded.

  Splitting large chunks is several times faster than reading line by line, and a line
  wholly inside one chunk is shorter than _READ_BYTES <= _MAX_LINE_BYTES.
  """
  tail, dropping = b"", False  # The unfinished last line of the chunks so far.
  for chunk in _read_chunks(f, path):
    lines = chunk.split(b"\n")
    rest = lines.pop()
    if lines:
      too_long = dropping or len(tail) + len(lines[0]) > _MAX_LINE_BYTES
      lines[0] = None if too_long else tail + lines[0]
      yield from lines
      tail, dropping = b"", False
    if not dropping:
      tail += rest
      if len(tail) > _MAX_LINE_BYTES:
        tail, dropping = b"", True
  if dropping:
    yield None
  elif tail:
    yield tail


def _count_lines(path: str) -> int:
  """Counts lines as _lines yields them (a last line without a newline counts)."""
  count, last = 0, b"\n"
  with _open(path) as f:
    for chunk in _read_chunks(f, path):
      count += chunk.count(b"\n")
      last = chunk[-1:] or last
  return count + (last != b"\n")


def _is_empty(path: str) -> bool:
  with _open(path) as f:
    return not any(_read_chunks(f, path))


def _alignment_error(src_path: str, tgt_path: str) -> CorpusError | None:
  """A CorpusError naming both files and their line counts if these differ, else None."""
  src_lines, tgt_lines = _count_lines(src_path), _count_lines(tgt_path)
  if src_lines == tgt_lines:
    return None
  return CorpusError(f"aligned text files differ in length: {src_path} has {src_lines} "
                     f"lines but {tgt_path} has {tgt_lines}; line i of one must be the "
                     f"translation of line i of the other")
