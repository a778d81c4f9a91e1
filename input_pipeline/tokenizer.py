"""SentencePiece tokenizers: trained once per workdir, reused on resume, run in-graph.

The models are trained with the `sentencepiece` library on a sample of training pairs and
stored in `<workdir>/tokenizer/` next to `tokenizer.json` (the tokenizer config that made
them). Tokenizing and detokenizing run as TensorFlow ops (tensorflow_text), so they work
inside tf.data, inside tf.function and in an exported SavedModel.
"""
import hashlib
import io
import itertools
import json
import os
from typing import Callable, Iterable, Iterator, NamedTuple

from absl import logging
import sentencepiece as spm
import tensorflow as tf
import tensorflow_text as tf_text

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

CONFIG_FILE = "tokenizer.json"
_CONFIG_KEYS = ("model_type", "vocab_size", "joint", "sample_size", "character_coverage")
_MODEL_TYPES = ("unigram", "bpe")


class Tokenizer(tf.Module):
  """Source and target SentencePiece models as TF ops (trackable, so SavedModel-able)."""

  def __init__(self, source_model: bytes, target_model: bytes):
    """Takes serialized SentencePiece ModelProtos; pass the same bytes twice when joint."""
    super().__init__(name="tokenizer")
    self.joint = source_model == target_model
    # Identifies the models (a prepared corpus records the one that tokenized it).
    self.fingerprint = hashlib.sha256(source_model + b"\0" + target_model).hexdigest()
    self._source = tf_text.SentencepieceTokenizer(model=source_model, out_type=tf.int32)
    self._target = (self._source if self.joint else
                    tf_text.SentencepieceTokenizer(model=target_model, out_type=tf.int32))
    self.source_vocab_size = _piece_size(source_model)
    self.target_vocab_size = _piece_size(target_model)
    # Plain bytes, not tracked: SubwordSampler builds its own ops from them (training only,
    # so an exported SavedModel does not carry them).
    self._models = (source_model, target_model)

  def tokenize_source(self, strings) -> tf.RaggedTensor:
    """tf.string [B] -> int32 ids [B, (T)], without BOS/EOS."""
    return self._source.tokenize(_as_vector(strings))

  def tokenize_target(self, strings) -> tf.RaggedTensor:
    """tf.string [B] -> int32 ids [B, (T)], without BOS/EOS."""
    return self._target.tokenize(_as_vector(strings))

  def detokenize_target(self, ids) -> tf.Tensor:
    """int32 ids [B, T] (dense or ragged) -> tf.string [B].

    Each row is cut at its first EOS, and PAD/BOS are dropped, so decoder outputs can be
    passed as they are.
    """
    if isinstance(ids, tf.RaggedTensor):
      ids = ids.to_tensor(default_value=PAD_ID)
    ids = tf.cast(ids, tf.int32)
    if ids.shape.rank != 2:
      raise ValueError(f"detokenize_target expects ids of shape [B, T], got {ids.shape}.")
    before_eos = tf.math.cumsum(tf.cast(ids == EOS_ID, tf.int32), axis=1) == 0
    keep = before_eos & (ids != PAD_ID) & (ids != BOS_ID)
    return self._target.detokenize(tf.ragged.boolean_mask(ids, keep))

  def sampler(self, alpha: float, nbest: int) -> "SubwordSampler":
    """Subword regularisation for training batches (tokenizer.sampling_alpha/_nbest)."""
    return SubwordSampler(*self._models, alpha=alpha, nbest=nbest)

  def source_pieces(self, ids) -> tf.Tensor:
    """int32 ids of any shape (dense or ragged) -> tf.string pieces, e.g. for plot labels."""
    return self._source.id_to_string(ids)

  def target_pieces(self, ids) -> tf.Tensor:
    """int32 ids of any shape (dense or ragged) -> tf.string pieces, e.g. for plot labels."""
    return self._target.id_to_string(ids)


def _piece_size(model: bytes) -> int:
  return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def _as_vector(strings) -> tf.Tensor:
  strings = tf.convert_to_tensor(strings, dtype=tf.string)
  if strings.shape.rank != 1:
    raise ValueError(f"Tokenizer expects a vector of strings [B], got shape {strings.shape}.")
  return strings


class SubwordSampler:
  """Subword regularisation (Kudo, 2018) for training batches, seeded statelessly.

  Each sentence's segmentation is drawn from its `nbest` best ones with P(seg) proportional
  to exp(alpha * score(seg)), score = the sum of its pieces' log-probabilities, as
  SentencePiece's SampleEncode(nbest_size, alpha) draws for unigram models. tf_text's own
  sampling draws inside the op from an unseeded generator, so a resumed run would see other
  segmentations; here the n-best op (deterministic) gives the candidates and
  tf.random.stateless_categorical draws one, a pure function of the seed passed in. The whole
  lattice (SentencePiece's nbest_size=-1) is not reachable this way: the op returns no lattice.
  Cost: SentencePiece's n-best search, roughly linear in nbest (docs/data.md).
  """

  def __init__(self, source_model: bytes, target_model: bytes, *, alpha: float, nbest: int):
    """Serialized unigram ModelProtos; ValueError for a model without n-best (BPE)."""
    for model in {source_model, target_model}:
      _check_nbest_available(model)
    self.alpha, self.nbest = float(alpha), int(nbest)
    with tf.init_scope():  # The ops' resources are made eagerly, also when built in a trace.
      self._source = self._side(source_model)
      self._target = (self._source if source_model == target_model
                      else self._side(target_model))

  def _side(self, model: bytes) -> tuple[tf_text.SentencepieceTokenizer, tf.Tensor]:
    nbest = tf_text.SentencepieceTokenizer(model=model, out_type=tf.int32,
                                           nbest_size=self.nbest, return_nbest=True)
    return nbest, tf.constant(_piece_scores(model), tf.float32)

  def tokenize_source(self, strings, seed) -> tf.RaggedTensor:
    """tf.string [B], int seed [2] -> int32 ids [B, (T)]: one sampled segmentation each."""
    return self._sample(self._source, strings, tf.random.experimental.stateless_fold_in(
        seed, 0))

  def tokenize_target(self, strings, seed) -> tf.RaggedTensor:
    """tf.string [B], int seed [2] -> int32 ids [B, (T)]: one sampled segmentation each."""
    return self._sample(self._target, strings, tf.random.experimental.stateless_fold_in(
        seed, 1))

  def _sample(self, side, strings, seed) -> tf.RaggedTensor:
    nbest_op, scores = side
    strings = _as_vector(strings)
    # A sentence has 1 to nbest candidates and the op does not say how many: an empty string
    # after each sentence gives exactly one empty row, which marks where they end.
    marked = tf.reshape(tf.stack([strings, tf.fill(tf.shape(strings), "")], axis=1), [-1])
    candidates = _group_candidates(nbest_op.tokenize(marked), tf.size(strings))
    # UNK's score (0 in the model) differs from SentencePiece's penalty, but every candidate
    # of a sentence has the same unknown characters, so the difference cancels out.
    logits = self.alpha * tf.reduce_sum(tf.gather(scores, candidates), axis=-1)
    logits = logits.to_tensor(default_value=float("-inf"), shape=[None, self.nbest])
    choice = tf.random.stateless_categorical(logits, 1, seed, dtype=tf.int64)[:, 0]
    return tf.gather(candidates.values, candidates.row_starts() + choice)


def _group_candidates(rows: tf.RaggedTensor, batch: tf.Tensor) -> tf.RaggedTensor:
  """The n-best op's rows for [s0, "", s1, "", ...] -> ids [B, (candidates), (T)].

  Sentence i gives k_i >= 1 rows, none empty unless it normalizes to nothing (then exactly
  one empty row); each "" gives one empty row, its marker. So in a run of empty rows the
  markers sit at even offsets from the run's start, or odd ones in a run that opens the
  batch (its first row is an empty sentence).
  """
  empty = rows.row_lengths() == 0
  position = tf.range(tf.size(empty, out_type=tf.int64))
  opens_run = empty & ~tf.concat([[False], empty[:-1]], axis=0)
  run = tf.maximum(tf.cumsum(tf.cast(opens_run, tf.int64)) - 1, 0)
  run_start = tf.gather(tf.concat([tf.boolean_mask(position, opens_run), [0]], 0), run)
  opening = tf.cast(run_start == 0, tf.int64)  # Only the run at row 0 starts there.
  marker = empty & ((position - run_start + opening) % 2 == 0)
  markers = tf.reduce_sum(tf.cast(marker, tf.int32))
  with tf.control_dependencies([tf.debugging.assert_equal(
      markers, tf.cast(batch, tf.int32),
      message="SubwordSampler: n-best rows do not line up with the sentences")]):
    sentence = tf.cumsum(tf.cast(marker, tf.int64), exclusive=True)
  keep = ~marker
  return tf.RaggedTensor.from_value_rowids(tf.ragged.boolean_mask(rows, keep),
                                           tf.boolean_mask(sentence, keep),
                                           nrows=tf.cast(batch, tf.int64))


def _piece_scores(model: bytes) -> list[float]:
  """Each piece's score in the model (its log-probability, for unigram), by id."""
  processor = spm.SentencePieceProcessor(model_proto=model)
  return [processor.get_score(i) for i in range(processor.get_piece_size())]


def _check_nbest_available(model: bytes) -> None:
  try:
    spm.SentencePieceProcessor(model_proto=model).nbest_encode_as_ids("a", 2)
  except RuntimeError as e:  # "NBestEncode is not available for the current model."
    raise ValueError(
        "tokenizer.sampling_alpha > 0 needs tokenizer.model_type='unigram': this "
        f"SentencePiece model has no n-best segmentations to sample from ({e}); a BPE "
        "model's sampling (BPE-dropout) cannot be seeded in tf_text. Set "
        "tokenizer.sampling_alpha=0.") from None


class StoredTokenizer(NamedTuple):
  """A tokenizer directory to copy instead of training (a prepared corpus's tokenizer/)."""
  directory: str


def load_or_train(tok_config, workdir: str,
                  sample: Callable[[], Iterable[tuple[str, str]]] | StoredTokenizer
                  ) -> Tokenizer:
  """Loads the tokenizer stored in `<workdir>/tokenizer/`, training and storing it first.

  `sample()` yields (source, target) training pairs; it is called once per model trained
  (twice when not joint), and not at all when a stored tokenizer is reused. A
  StoredTokenizer is copied instead of training. Raises ValueError if the stored (or
  copied) tokenizer was made with a different tokenizer config.
  """
  config = _config_dict(tok_config)
  directory = os.path.join(workdir, "tokenizer")
  stored = _read_stored_config(directory)
  if stored is None and isinstance(sample, StoredTokenizer):
    _copy_stored(config, sample.directory, directory)
    stored = _read_stored_config(directory)
  elif stored is None:
    _train_and_store(config, directory, sample)
    stored = _read_stored_config(directory)
  else:
    _check_same_config(stored["config"], config, directory)
    logging.info("Reusing the tokenizer in %s.", directory)
  tokenizer = _load(directory, stored["files"])
  logging.info("Tokenizer: source vocab %d, target vocab %d (joint=%s).",
               tokenizer.source_vocab_size, tokenizer.target_vocab_size, tokenizer.joint)
  return tokenizer


def _load(directory: str, files: dict) -> Tokenizer:
  """The stored models as a Tokenizer; ValueError naming the file if one does not load."""
  models = {}
  for side in ("source", "target"):
    path = os.path.join(directory, files[side])
    models[side] = _read_bytes(path)
    try:
      _piece_size(models[side])
    except RuntimeError as e:  # sentencepiece: "Internal: ... ParseFromArray ..."
      raise ValueError(
          f"{path} is not a valid SentencePiece model ({str(e).strip()[:200]}). If the run "
          f"has no checkpoints yet, delete {directory} to train a new tokenizer; otherwise "
          "restore the file from a copy: the checkpoints fit only its vocabulary.") from None
  return Tokenizer(models["source"], models["target"])


def _config_dict(tok_config) -> dict:
  """Returns the keys that define a tokenizer, validated, as plain JSON-able values."""
  missing = [key for key in _CONFIG_KEYS if key not in tok_config]
  if missing:
    raise ValueError(f"tokenizer config is missing keys {missing}; see configs/default.py.")
  config = {key: tok_config[key] for key in _CONFIG_KEYS}
  if config["model_type"] not in _MODEL_TYPES:
    raise ValueError(f"tokenizer.model_type={config['model_type']!r}; valid: {_MODEL_TYPES}.")
  if not isinstance(config["vocab_size"], int) or config["vocab_size"] <= EOS_ID + 1:
    raise ValueError(f"tokenizer.vocab_size={config['vocab_size']!r}; must be an int > 4.")
  if not isinstance(config["sample_size"], int) or config["sample_size"] <= 0:
    raise ValueError(f"tokenizer.sample_size={config['sample_size']!r}; must be an int > 0.")
  if not 0.0 < config["character_coverage"] <= 1.0:
    raise ValueError(f"tokenizer.character_coverage={config['character_coverage']!r}; "
                     "must be in (0, 1].")
  config["joint"] = bool(config["joint"])
  config["character_coverage"] = float(config["character_coverage"])
  return config


def _read_stored_config(directory: str) -> dict | None:
  """Returns the parsed tokenizer.json, or None if there is no complete stored tokenizer."""
  path = os.path.join(directory, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    stored = json.loads(_read_bytes(path))
    return {"config": dict(stored["config"]), "files": dict(stored["files"])}
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a valid tokenizer description ({e}); delete "
                     f"{directory} to train a new tokenizer.") from e


def _check_same_config(stored: dict, current: dict, directory: str) -> None:
  differing = sorted(key for key in set(stored) | set(current)
                     if stored.get(key) != current.get(key))
  if differing:
    changes = ", ".join(f"tokenizer.{key}: stored {stored.get(key)!r} vs config "
                        f"{current.get(key)!r}" for key in differing)
    raise ValueError(
        f"The tokenizer in {directory} was trained with a different config ({changes}). "
        f"Restore those config values, or use a new workdir (or delete {directory}) to "
        "train a new tokenizer.")


def _train_and_store(config: dict, directory: str,
                     sample: Callable[[], Iterable[tuple[str, str]]]) -> None:
  """Trains the model(s) and writes them; tokenizer.json is written last, as the marker.
  The directory is created only once training succeeded (no empty one after a failure).
  The sample is read once, also for two models: drawing it may cost a pass over the corpus
  (corpora.sample_pairs); SentencePiece holds all of it in memory anyway."""
  pairs = list(itertools.islice(sample(), config["sample_size"]))
  if config["joint"]:
    files = {"source": "joint.model", "target": "joint.model"}
    models = {"joint.model": train_model(_sentences(pairs, (0, 1)), config, "joint")}
  else:
    files = {"source": "source.model", "target": "target.model"}
    models = {files[side]: train_model(_sentences(pairs, (index,)), config, side)
              for index, side in enumerate(("source", "target"))}
  tf.io.gfile.makedirs(directory)
  for name, model in models.items():
    _write_bytes(os.path.join(directory, name), model)
  description = {"config": config, "files": files}
  _write_bytes(os.path.join(directory, CONFIG_FILE),
               json.dumps(description, indent=2, sort_keys=True).encode())
  logging.info("Stored the tokenizer in %s.", directory)


def _copy_stored(config: dict, source: str, directory: str) -> None:
  """Copies a stored tokenizer (checked against `config` first); tokenizer.json last."""
  stored = _read_stored_config(source)
  if stored is None:
    raise ValueError(f"{os.path.join(source, CONFIG_FILE)} does not exist: no stored "
                     f"tokenizer to copy (is the prepared corpus complete?)")
  _check_same_config(stored["config"], config, source)
  tf.io.gfile.makedirs(directory)
  for name in sorted(set(stored["files"].values())) + [CONFIG_FILE]:
    _write_bytes(os.path.join(directory, name), _read_bytes(os.path.join(source, name)))
  logging.info("Copied the tokenizer of %s to %s.", source, directory)


def _sentences(pairs: list[tuple[str, str]], sides: tuple[int, ...]) -> Iterator[str]:
  for pair in pairs:
    for side in sides:
      if pair[side]:
        yield pair[side]


def train_model(sentences: Iterator[str], config: dict, name: str) -> bytes:
  """Trains one SentencePiece model from in-memory sentences; returns the ModelProto bytes."""
  model = io.BytesIO()
  logging.info("Training the %s SentencePiece model: %s", name, config)
  failures = []

  def reraised_sentences() -> Iterator[str]:
    try:
      yield from sentences
    except Exception as e:  # A CorpusError while sampling: re-raised below as itself.
      failures.append(e)
      raise

  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=reraised_sentences(), model_writer=model,
        model_type=config["model_type"], vocab_size=config["vocab_size"],
        character_coverage=config["character_coverage"],
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=os.cpu_count() or 1, minloglevel=1)
  except RuntimeError as e:
    if failures:
      raise failures[0] from None
    raise ValueError(f"Training the {name} SentencePiece model with tokenizer config "
                     f"{config} failed: {e}") from e
  return model.getvalue()


def _read_bytes(path: str) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def _write_bytes(path: str, data: bytes) -> None:
  """Writes via a temporary file and a rename, so a crash never leaves a partial file."""
  tmp_path = path + ".tmp"
  with tf.io.gfile.GFile(tmp_path, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp_path, path, overwrite=True)
