"""Evaluation: held-out loss, BLEU/chrF of the dev set's translations (translate.py),
attention probes, and what dev BLEU decides during training (the best checkpoint, early
stopping)."""
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import ml_collections
import numpy as np
import sacrebleu
import tensorflow as tf

from input_pipeline import datasets
from input_pipeline import pipeline
from trainer import checkpoints
from trainer import summaries
from trainer import translate as translate_lib


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


def make_eval_dataset(config, tokenizer, num_replicas: int = 1,
                      length_stats: Optional[pipeline.LengthStats] = None) -> tf.data.Dataset:
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
  return datasets.make_dataset(config, tokenizer, "eval", input_context=context,
                               length_stats=length_stats)


def eval_loss(eval_step, dataset: tf.data.Dataset) -> float:
  """Mean per-token loss over a finite dataset."""
  loss_sum, tokens = 0.0, 0.0
  for batch in dataset:
    l, n = eval_step(batch)
    loss_sum, tokens = loss_sum + float(l), tokens + float(n)
  return loss_sum / max(tokens, 1.0)


def evaluate_checkpoint(config, tokenizer, model, beam_size: Optional[int] = None, *,
                        num_replicas: int = 1) -> Dict[str, float]:
  """Loss on config.data.eval (teacher forcing) and BLEU/chrF of its translations.

  Translates the first data.eval_examples sentences (0 = all), as the training Evaluator
  does, with `beam_size` beams (default config.eval.beam_size). The loss batches are one
  of `num_replicas` replicas' share of the train batch (make_eval_dataset). The loss is
  over all of data.eval less its over-long pairs (data.max_*_length: dropped under
  length_policy=drop); `loss_pairs` and `loss_dropped` say how many, so that a loss is never
  read as over pairs it left out. BLEU/chrF translate every pair, long or not.
  """
  length_stats = pipeline.LengthStats(name="length_stats_eval")
  with datasets.surface_corpus_errors():  # A bad eval file: its CorpusError, not tf.data's.
    loss = eval_loss(make_eval_loss_fn(model),
                     make_eval_dataset(config, tokenizer, num_replicas, length_stats))
  lengths = length_stats.result()
  limit = config.data.eval_examples or None
  pairs = list(datasets.read_pairs(config.data.eval, config.data, limit=limit))
  translate_ids = translate_lib.make_translate_fn(model, config, beam_size)
  hyps, _, _, _ = translate_lib.translate(translate_ids, tokenizer, [s for s, _ in pairs],
                                          config)
  metrics = score(hyps, [t for _, t in pairs])
  metrics.update(loss=loss, loss_pairs=lengths["seen"] - lengths["dropped"],
                 loss_dropped=lengths["dropped"], examples=len(pairs))
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


class Evaluator:
  """Evaluation during training, one call per eval: held-out loss, beam-search BLEU/chrF,
  and (given a writer) the scalars, attention heatmaps and a sample-translation table.

  It runs on one device: pass the strategy's num_replicas_in_sync as `num_replicas` so the
  loss batches are one replica's share of the train batch, not all of it.
  """

  def __init__(self, config, tokenizer, model, num_replicas: int = 1):
    self.config, self.tokenizer = config, tokenizer
    self.eval_step = make_eval_loss_fn(model)
    self.translate_ids = translate_lib.make_translate_fn(model, config)  # Beam search.
    self.greedy_ids = translate_lib.make_translate_fn(model, config, beam_size=1)
    # Counts the loss's over-long pairs (data.max_*_length): cumulative over evaluations,
    # so each call reports its own difference (loss_pairs / loss_dropped, as nmt-eval does).
    self.length_stats = pipeline.LengthStats(name="length_stats_eval")
    self.dataset = make_eval_dataset(config, tokenizer, num_replicas, self.length_stats)
    limit = config.data.eval_examples or None
    pairs = list(datasets.read_pairs(config.data.eval, config.data, limit=limit))
    self.sources = [s for s, _ in pairs]
    self.references = [t for _, t in pairs]
    # Decoded in batches of similar length (translate.py), in this order.
    self.order = translate_lib.length_order(tokenizer, self.sources)
    self.probes = list(config.eval.probe_sentences) + self.sources[:config.eval.num_probes]
    self.samples: List[Tuple[str, str, str]] = []

  def __call__(self, step: int, writer: Optional[tf.summary.SummaryWriter],
               stop: Callable[[], bool] = lambda: False) -> Optional[Dict]:
    """The metrics; None if `stop()` turned True between decoding batches (a SIGTERM: the
    run saves and exits at once, not after the whole dev set)."""
    before = self.length_stats.result()
    with datasets.surface_corpus_errors():  # A bad eval file: its CorpusError.
      metrics = {"loss": eval_loss(self.eval_step, self.dataset)}
    after = self.length_stats.result()
    dropped = after["dropped"] - before["dropped"]
    metrics.update(loss_pairs=after["seen"] - before["seen"] - dropped, loss_dropped=dropped)
    metrics["perplexity"] = float(np.exp(min(metrics["loss"], 50.0)))
    hyps, size = [""] * len(self.sources), self.config.eval.batch_size
    for first in range(0, len(self.sources), size):
      if stop():
        logging.warning("Evaluation at step %d abandoned after %d of %d sentences: the run "
                        "is stopping.", step, first, len(self.sources))
        return None
      rows = self.order[first:first + size]
      batch = translate_lib.translate(self.translate_ids, self.tokenizer,
                                      [self.sources[i] for i in rows], self.config)[0]
      for i, hyp in zip(rows, batch):
        hyps[i] = hyp
    metrics.update(score(hyps, self.references))
    self.samples = list(zip(self.sources[:8], self.references[:8], hyps[:8]))
    logging.info("eval at step %d: loss %.4f  BLEU %.2f  chrF %.2f%s", step,
                 metrics["loss"], metrics["bleu"], metrics["chrf"],
                 f"  (loss over {metrics['loss_pairs']} pairs, {dropped} over-long left out)"
                 if dropped else "")
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
      _, ids, weights, srcs = translate_lib.translate(translate_ids, self.tokenizer,
                                                      self.probes, self.config)
      pngs[search] = translate_lib.attention_pngs(self.tokenizer, srcs, ids, weights)
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
