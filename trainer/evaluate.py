"""Evaluation: held-out loss, translation of sentence lists, BLEU/chrF, attention probes."""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import sacrebleu
import tensorflow as tf

from input_pipeline.tokenizer import EOS_ID
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
  """tf.function batch -> (loss_sum, tokens) with teacher forcing, no dropout."""

  @tf.function
  def eval_step(batch):
    target = batch["target"]
    logits, _ = model(batch["source"], target[:, :-1], training=False)
    return masked_cross_entropy(logits, target[:, 1:])

  return eval_step


def eval_loss(eval_step, dataset: tf.data.Dataset) -> float:
  """Mean per-token loss over a finite dataset."""
  loss_sum, tokens = 0.0, 0.0
  for batch in dataset:
    l, n = eval_step(batch)
    loss_sum, tokens = loss_sum + float(l), tokens + float(n)
  return loss_sum / max(tokens, 1.0)


def encode_sources(tokenizer, sentences: Sequence[str], max_length: int) -> tf.Tensor:
  """Strings -> [B,S] int32 source ids with EOS, truncated to max_length, 0-padded."""
  ids = tokenizer.tokenize_source(tf.constant(list(sentences)))
  ids = ids[:, :max_length - 1]
  eos = tf.fill([ids.nrows(), 1], EOS_ID)
  ids = tf.concat([tf.cast(ids, tf.int32), tf.RaggedTensor.from_tensor(eos)], axis=1)
  return ids.to_tensor(0)


def make_translate_fn(model, config):
  """tf.function source ids [B,S] -> (ids [B,T], weights [B,T,S]) by greedy search."""

  @tf.function(reduce_retracing=True)
  def translate_ids(source):
    max_len = decode.max_output_length(source, config.eval.max_length_ratio)
    return decode.greedy(model, source, max_len)

  return translate_ids


def translate(translate_ids, tokenizer, sentences: Sequence[str], config
              ) -> Tuple[List[str], List[np.ndarray], List[np.ndarray], tf.Tensor]:
  """Translates strings in batches -> hypotheses, output ids, attention weights, sources."""
  hyps, out_ids, weights, sources = [], [], [], []
  bs = config.eval.batch_size
  for i in range(0, len(sentences), bs):
    source = encode_sources(tokenizer, sentences[i:i + bs], config.data.max_source_length)
    ids, w = translate_ids(source)
    hyps += [s.decode("utf-8") for s in tokenizer.detokenize_target(ids).numpy()]
    out_ids += list(ids.numpy())
    weights += list(w.numpy())
    sources += list(source.numpy())
  return hyps, out_ids, weights, sources


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
  """Corpus BLEU and chrF from sacreBLEU on detokenized text."""
  return {"bleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
          "chrf": sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score}


def attention_pngs(tokenizer, sources, out_ids, weights, names) -> Dict[str, bytes]:
  """Labelled heatmaps for each (source ids, output ids, weights [T,S]) triple."""
  pngs = {}
  for name, src, ids, w in zip(names, sources, out_ids, weights):
    src = [int(x) for x in src if x != 0]
    tgt = []
    for x in ids:
      if x == 0:
        break
      tgt.append(int(x))
    src_tokens = [p.decode() for p in tokenizer.source_pieces(tf.constant(src)).numpy()]
    tgt_tokens = [p.decode() for p in tokenizer.target_pieces(tf.constant(tgt)).numpy()]
    pngs[name] = summaries.plot_attention(w[:len(tgt), :len(src)], src_tokens, tgt_tokens)
  return pngs
