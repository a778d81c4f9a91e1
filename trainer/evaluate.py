"""Evaluation: held-out loss, translation of sentence lists, BLEU/chrF, attention probes,
and what dev BLEU decides during training (the best checkpoint, early stopping)."""
import contextlib
import io
import os
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import ml_collections
import numpy as np
import sacrebleu
import tensorflow as tf

from input_pipeline import datasets
from input_pipeline.tokenizer import EOS_ID
from trainer import checkpoints
from trainer import decode
from trainer import summaries


def masked_cross_entropy(logits: tf.Tensor, labels: tf.Tensor,
                         label_smoothing: float = 0.0) -> Tuple[tf.Tensor, tf.Tensor]:
  """Sum of per-token cross-entropy over real tokens, and their count (both f32 scalars).

  Label smoothing is computed as (1-e)*nll + e*mean_v(-log p_v) without a one-hot [B,T,V].
  """
  mask = tf.cast(labels != 0, tf.float32)
  nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
  if label_smoothing:
    uniform = tf.reduce_logsumexp(logits, -1) - tf.reduce_mean(logits, -1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  return tf.reduce_sum(nll * mask), tf.reduce_sum(mask)


def make_eval_loss_fn(model):
  """tf.function batch -> (loss_sum, tokens) with teacher forcing, no dropout.

  reduce_retracing: eval batches come in every grid length x every partial batch size; one
  shape-generic trace replaces a retrace (and TensorFlow's retracing warning) per shape.
  """

  @tf.function(reduce_retracing=True)
  def eval_step(batch):
    target = batch["target"]
    logits, _ = model(batch["source"], target[:, :-1], training=False)
    return masked_cross_entropy(logits, target[:, 1:])

  return eval_step


def make_eval_dataset(config, tokenizer, num_replicas: int = 1) -> tf.data.Dataset:
  """config.data.eval in batches of one replica's share of the train batch (sentences or
  tokens): what one device was sized for. The global batch, on the one device that
  evaluates, would need num_replicas x the memory of a train step."""
  if not isinstance(num_replicas, int) or num_replicas < 1:
    raise ValueError(f"num_replicas={num_replicas!r}: must be an integer >= 1 (the "
                     f"strategy's num_replicas_in_sync)")
  context = None
  if num_replicas > 1:  # One pipeline feeding num_replicas replicas: per-replica batches.
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=num_replicas)
  return datasets.make_dataset(config, tokenizer, "eval", input_context=context)


def eval_loss(eval_step, dataset: tf.data.Dataset) -> float:
  """Mean per-token loss over a finite dataset."""
  loss_sum, tokens = 0.0, 0.0
  for batch in dataset:
    l, n = eval_step(batch)
    loss_sum, tokens = loss_sum + float(l), tokens + float(n)
  return loss_sum / max(tokens, 1.0)


def encode_sources(tokenizer, sentences, max_length: int) -> tf.Tensor:
  """Strings -> [B,S] int32 source ids with EOS, truncated to max_length, 0-padded.

  `sentences` is a list of str or a tf.string [B] tensor (so it also works in-graph).
  """
  if not tf.is_tensor(sentences):
    sentences = tf.constant(list(sentences), tf.string)
  ids = tf.cast(tokenizer.tokenize_source(sentences)[:, :max_length - 1], tf.int32)
  eos = tf.fill([ids.nrows(), 1], EOS_ID)
  ids = tf.concat([ids, tf.RaggedTensor.from_tensor(eos)], axis=1)
  return ids.to_tensor(0)


def resolve_beam_size(config, beam_size: Optional[int] = None) -> int:
  """beam_size, or config.eval.beam_size when None; ValueError unless an int >= 1."""
  beam_size = config.eval.beam_size if beam_size is None else beam_size
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f"beam size {beam_size!r} (--beam_size or config.eval.beam_size) "
                     "must be an integer >= 1; 1 means greedy search.")
  return beam_size


def decode_ids(model, source: tf.Tensor, beam_size: int, max_length_ratio: float,
               length_penalty: float) -> Tuple[tf.Tensor, tf.Tensor]:
  """source [B,S] -> ids [B,T], weights [B,T,S]: beam search if beam_size > 1, else greedy.

  T is the longest output of the batch (EOS included); shorter rows are 0-padded.
  """
  max_len = decode.max_output_length(source, max_length_ratio)
  if beam_size > 1:
    ids, weights, _ = decode.beam_search(model, source, beam_size, max_len, length_penalty)
  else:
    ids, weights = decode.greedy(model, source, max_len)
  return decode.trim(ids, weights)


def make_translate_fn(model, config, beam_size: Optional[int] = None):
  """tf.function source ids [B,S] -> (ids [B,T], weights [B,T,S]).

  Beam search with `beam_size` (default config.eval.beam_size) beams, greedy if it is 1.
  """
  beam_size = resolve_beam_size(config, beam_size)
  ratio, alpha = float(config.eval.max_length_ratio), float(config.eval.length_penalty)
  grid = decode.source_grid(model, config)  # One compiled decoder step per grid length.

  @tf.function(reduce_retracing=True)
  def translate_ids(source):
    return decode.on_grid(lambda padded: decode_ids(model, padded, beam_size, ratio, alpha),
                          source, grid)

  return translate_ids


def translate(translate_ids, tokenizer, sentences: Sequence[str], config
              ) -> Tuple[List[str], List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
  """Translates strings in batches -> hypotheses, output ids, attention weights, sources.

  Empty (or whitespace-only) sentences are not decoded: they give "" and empty arrays.
  """
  hyps, out_ids, weights, sources = [], [], [], []
  empty = ("", np.zeros([0], np.int32), np.zeros([0, 0], np.float32), np.zeros([0], np.int32))
  bs = config.eval.batch_size
  for i in range(0, len(sentences), bs):
    batch = list(sentences[i:i + bs])
    nonempty = [s for s in batch if s.strip()]
    results = iter(())
    if nonempty:
      source = encode_sources(tokenizer, nonempty, config.data.max_source_length)
      ids, w = translate_ids(source)
      texts = [s.decode("utf-8") for s in tokenizer.detokenize_target(ids).numpy()]
      results = zip(texts, ids.numpy(), w.numpy(), source.numpy())
    for sentence in batch:
      hyp, ids_i, w_i, src_i = next(results) if sentence.strip() else empty
      hyps.append(hyp)
      out_ids.append(ids_i)
      weights.append(w_i)
      sources.append(src_i)
  return hyps, out_ids, weights, sources


def translate_lines(translate_ids, tokenizer, lines: Iterable[str], config,
                    attention_dir: Optional[str] = None) -> Iterator[str]:
  """Yields one translation per input line, decoding config.eval.batch_size lines at once.

  Empty lines give empty translations; lines longer than data.max_source_length tokens
  are truncated with a warning naming the line (numbered from 1). With `attention_dir`,
  the attention of line N is written to attention_dir/00000N.png (none for empty lines).
  """
  if attention_dir:
    tf.io.gfile.makedirs(attention_dir)
  said_empty = False
  for first, batch in _numbered_batches(lines, config.eval.batch_size):
    _warn_if_truncated(tokenizer, batch, first, config.data.max_source_length)
    if not said_empty and any(not line.strip() for line in batch):
      number = first + next(i for i, line in enumerate(batch) if not line.strip())
      logging.info("Empty input lines (the first is line %d) give empty output lines.",
                   number)
      said_empty = True
    hyps, ids, weights, sources = translate(translate_ids, tokenizer, batch, config)
    if attention_dir:
      _write_attention(tokenizer, batch, first, sources, ids, weights, attention_dir)
    yield from hyps


def translate_file(translate_ids, tokenizer, config, input_path: Optional[str] = None,
                   output_path: Optional[str] = None,
                   attention_dir: Optional[str] = None) -> None:
  """Translates a UTF-8 text file (default stdin) line by line into `output_path` (stdout).

  Undecodable bytes become U+FFFD, which the tokenizer maps to UNK like any unknown
  character, and NUL bytes spaces, each line with a warning; see `translate_lines`.
  """
  if input_path and not tf.io.gfile.exists(input_path):
    raise ValueError(f"--input={input_path}: no such file.")
  for flag, path in (("input", input_path), ("output", output_path)):
    if path and tf.io.gfile.isdir(path):
      raise ValueError(f"--{flag}={path} is a directory; name a file, e.g. "
                       f"{os.path.join(path, 'translations.txt')}.")
  with contextlib.ExitStack() as stack:
    if input_path:
      raw = stack.enter_context(tf.io.gfile.GFile(input_path, "rb"))
    else:
      raw = sys.stdin.buffer
    lines = _decode_lines(raw)
    if output_path:
      if os.path.dirname(output_path):
        tf.io.gfile.makedirs(os.path.dirname(output_path))
      out = stack.enter_context(tf.io.gfile.GFile(output_path, "w"))
    else:
      out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", line_buffering=True)
      stack.callback(out.detach)  # Leaves sys.stdout open.
    for hyp in translate_lines(translate_ids, tokenizer, lines, config, attention_dir):
      out.write(hyp + "\n")
    out.flush()


def _decode_lines(raw: Iterable[bytes], max_warnings: int = 10) -> Iterator[str]:
  """Decodes input lines; one with invalid UTF-8 (U+FFFD in its place) or NUL bytes
  (spaces) is still translated, with a warning naming its number (the first ones)."""
  bad = 0
  for number, line in enumerate(raw, start=1):
    problems = []
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError as e:
      text = line.decode("utf-8", errors="replace")
      problems.append(f"invalid UTF-8 at byte {e.start} (replaced by U+FFFD)")
    if "\0" in text:
      text = text.replace("\0", " ")
      problems.append("NUL bytes (replaced by spaces)")
    if problems:
      bad += 1
      if bad <= max_warnings:
        logging.warning("input line %d: %s; translated anyway.", number, ", ".join(problems))
    yield text
  if bad > max_warnings:
    logging.warning("%d input lines had invalid UTF-8 or NUL bytes (the first %d are named "
                    "above).", bad, max_warnings)


def _numbered_batches(lines: Iterable[str], batch_size: int
                      ) -> Iterator[Tuple[int, List[str]]]:
  """(number of the batch's first line, counted from 1, lines without newline) pairs."""
  batch, first = [], 1
  for number, line in enumerate(lines, start=1):
    batch.append(line.rstrip("\r\n"))
    if len(batch) == batch_size:
      yield first, batch
      batch, first = [], number + 1
  if batch:
    yield first, batch


def _warn_if_truncated(tokenizer, batch: List[str], first: int, max_length: int) -> None:
  lengths = tokenizer.tokenize_source(tf.constant(batch, tf.string)).row_lengths().numpy()
  for i, length in enumerate(lengths):
    if length + 1 > max_length:  # + EOS
      logging.warning("line %d: %d tokens + EOS is longer than data.max_source_length=%d "
                      "of this model; translating only its first %d tokens.",
                      first + i, length, max_length, max_length - 1)


def _write_attention(tokenizer, batch, first, sources, ids, weights, directory) -> None:
  keep = [i for i, line in enumerate(batch) if line.strip()]
  pngs = attention_pngs(tokenizer, [sources[i] for i in keep], [ids[i] for i in keep],
                        [weights[i] for i in keep])
  for i, png in zip(keep, pngs):
    with tf.io.gfile.GFile(os.path.join(directory, f"{first + i:06d}.png"), "wb") as f:
      f.write(png)


def evaluate_checkpoint(config, tokenizer, model, beam_size: Optional[int] = None, *,
                        num_replicas: int = 1) -> Dict[str, float]:
  """Loss on config.data.eval (teacher forcing) and BLEU/chrF of its translations.

  Translates the first data.eval_examples sentences (0 = all), as the training Evaluator
  does, with `beam_size` beams (default config.eval.beam_size). The loss batches are one
  of `num_replicas` replicas' share of the train batch (make_eval_dataset).
  """
  with datasets.surface_corpus_errors():  # A bad eval file: its CorpusError, not tf.data's.
    loss = eval_loss(make_eval_loss_fn(model),
                     make_eval_dataset(config, tokenizer, num_replicas))
  limit = config.data.eval_examples or None
  pairs = list(datasets.read_pairs(config.data.eval, config.data, limit=limit))
  translate_ids = make_translate_fn(model, config, beam_size)
  hyps, _, _, _ = translate(translate_ids, tokenizer, [s for s, _ in pairs], config)
  metrics = score(hyps, [t for _, t in pairs])
  metrics.update(loss=loss, examples=len(pairs))
  return metrics


def evaluate_test_set(config, tokenizer, model, step: int, *,
                      num_replicas: int = 1) -> Dict:
  """Scores all of config.data.test once (the final weights), as evaluate_checkpoint does
  config.data.eval; logs one line. Its metrics, with `source` (config.data.test)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.eval, config.data.eval_examples = config.data.test, 0
  metrics = evaluate_checkpoint(config, tokenizer, model, num_replicas=num_replicas)
  logging.info("test (%s, %d pairs) at step %d: BLEU %.2f  chrF %.2f", config.data.test,
               metrics["examples"], step, metrics["bleu"], metrics["chrf"])
  return dict(metrics, source=config.data.test)


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
  """Corpus BLEU and chrF from sacreBLEU on detokenized text."""
  return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
          "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score}


def attention_pngs(tokenizer, sources, out_ids, weights) -> List[bytes]:
  """Labelled heatmaps for each (source ids, output ids, weights [T,S]) triple."""
  pngs = []
  for src, ids, w in zip(sources, out_ids, weights):
    src = [int(x) for x in src if x != 0]
    tgt = []
    for x in ids:
      if x == 0:
        break
      tgt.append(int(x))
    src_tokens = [p.decode() for p in
                  tokenizer.source_pieces(tf.constant(src, tf.int32)).numpy()]
    tgt_tokens = [p.decode() for p in
                  tokenizer.target_pieces(tf.constant(tgt, tf.int32)).numpy()]
    pngs.append(summaries.plot_attention(w[:len(tgt), :len(src)], src_tokens, tgt_tokens))
  return pngs


class Evaluator:
  """Evaluation during training, one call per eval: held-out loss, beam-search BLEU/chrF,
  and (given a writer) the scalars, attention heatmaps and a sample-translation table.

  It runs on one device: pass the strategy's num_replicas_in_sync as `num_replicas` so the
  loss batches are one replica's share of the train batch, not all of it.
  """

  def __init__(self, config, tokenizer, model, num_replicas: int = 1):
    self.config, self.tokenizer = config, tokenizer
    self.eval_step = make_eval_loss_fn(model)
    self.translate_ids = make_translate_fn(model, config)  # Beam search.
    self.greedy_ids = make_translate_fn(model, config, beam_size=1)
    self.dataset = make_eval_dataset(config, tokenizer, num_replicas)
    limit = config.data.eval_examples or None
    pairs = list(datasets.read_pairs(config.data.eval, config.data, limit=limit))
    self.sources = [s for s, _ in pairs]
    self.references = [t for _, t in pairs]
    self.probes = list(config.eval.probe_sentences) + self.sources[:config.eval.num_probes]
    self.samples: List[Tuple[str, str, str]] = []

  def __call__(self, step: int, writer: Optional[tf.summary.SummaryWriter],
               stop: Callable[[], bool] = lambda: False) -> Optional[Dict]:
    """The metrics; None if `stop()` turned True between decoding batches (a SIGTERM: the
    run saves and exits at once, not after the whole dev set)."""
    with datasets.surface_corpus_errors():  # A bad eval file: its CorpusError.
      metrics = {"loss": eval_loss(self.eval_step, self.dataset)}
    metrics["perplexity"] = float(np.exp(min(metrics["loss"], 50.0)))
    hyps, size = [], self.config.eval.batch_size
    for first in range(0, len(self.sources), size):
      if stop():
        logging.warning("Evaluation at step %d abandoned after %d of %d sentences: the run "
                        "is stopping.", step, first, len(self.sources))
        return None
      hyps += translate(self.translate_ids, self.tokenizer, self.sources[first:first + size],
                        self.config)[0]
    metrics.update(score(hyps, self.references))
    self.samples = list(zip(self.sources[:8], self.references[:8], hyps[:8]))
    logging.info("eval at step %d: loss %.4f  BLEU %.2f  chrF %.2f", step,
                 metrics["loss"], metrics["bleu"], metrics["chrf"])
    if writer is not None:
      summaries.write_eval(writer, step, metrics, self._attention(), self.samples)
    return metrics

  def _attention(self) -> Dict[str, List[bytes]]:
    """The probe sentences' attention heatmaps by search: greedy, and beam if used."""
    searches = {"greedy": self.greedy_ids}
    if self.config.eval.beam_size > 1:
      searches["beam"] = self.translate_ids
    pngs = {}
    for search, translate_ids in searches.items():
      _, ids, weights, srcs = translate(translate_ids, self.tokenizer, self.probes,
                                        self.config)
      pngs[search] = attention_pngs(self.tokenizer, srcs, ids, weights)
    return pngs


class BestTracker:
  """What dev BLEU decides: checkpoints/best (kept when BLEU beats the best so far) and
  early stopping (train.early_stopping_patience evaluations without a gain of
  train.early_stopping_min_delta). The state is RunState's best_bleu and
  evals_without_gain, saved in every checkpoint, so a resumed run goes on counting.

  `update` runs where the Evaluator does (the chief); multi-worker, the others take the
  chief's `evals_without_gain` (distribute.ChiefBroadcast) and `stop_reason` agrees.
  """

  def __init__(self, state: checkpoints.RunState, checkpoint: tf.train.Checkpoint,
               run_dir: str, min_delta: float, patience: int):
    self.best_bleu, self.evals_without_gain = state.best_bleu, state.evals_without_gain
    self.min_delta, self.patience = min_delta, patience
    self.manager = tf.train.CheckpointManager(
        checkpoint, os.path.join(run_dir, "checkpoints", "best"), max_to_keep=1,
        step_counter=state.step)

  def update(self, step: int, bleu: float) -> None:
    """Takes one evaluation's dev BLEU: saves checkpoints/best at `step` if it is the best
    so far, and counts the evaluation against the patience unless it gained min_delta."""
    best = float(self.best_bleu.numpy())
    if bleu > best:
      self.best_bleu.assign(bleu)
      checkpoints.save(self.manager, step)
    gained = bleu >= best + self.min_delta
    self.evals_without_gain.assign(0 if gained else self.evals_without_gain + 1)

  def stop_reason(self) -> Optional[str]:
    """Why early stopping ends the run, naming the key to raise; None while it goes on."""
    if self.patience and int(self.evals_without_gain.numpy()) >= self.patience:
      return (f"stopped early: dev BLEU did not improve by {self.min_delta} in "
              f"{self.patience} evaluations (config.train.early_stopping_patience)"
              "; raise it to train further")
    return None
