"""SavedModel export: strings in, translations and attention out, tokenization in-graph.

The SavedModel loads with only `tensorflow` and `tensorflow_text` (whose import registers
the SentencePiece ops), e.g. in TensorFlow Serving:

  import tensorflow as tf, tensorflow_text  # noqa
  translate = tf.saved_model.load(export_dir).signatures["serving_default"]
  translate(sources=tf.constant(["le vingt-deux juin"]))["translations"]
"""
from typing import Dict, Optional

from absl import logging
import ml_collections
import tensorflow as tf

from trainer import decode
from trainer import translate as translate_lib


class Translator(tf.Module):
  """Tokenizer + model + search; its `serve` function is the serving signature."""

  def __init__(self, tokenizer, model, config: ml_collections.ConfigDict,
               beam_size: Optional[int] = None):
    super().__init__(name="translator")
    self.tokenizer = tokenizer
    self.model = model
    # Plain Python numbers, baked into the graph when `serve` is traced.
    self.beam_size = translate_lib.resolve_beam_size(config, beam_size)
    self.max_length_ratio = float(config.eval.max_length_ratio)
    self.length_penalty = float(config.eval.length_penalty)
    self.grid = decode.source_grid(model, config)  # Empty unless the step is compiled.

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="sources")])
  def serve(self, sources: tf.Tensor) -> Dict[str, tf.Tensor]:
    """sources [B] -> translations [B], attention_weights [B,T,S] f32, tokens [B,S]/[B,T].

    Token strings are "" on padding, so row b of attention_weights is labelled by the
    non-empty source_tokens[b] (columns) and target_tokens[b] (rows). Empty or
    whitespace-only sources give "" and no tokens.
    """
    # One extra empty sentence, dropped below, keeps an empty request from reaching the
    # encoder GRU with zero time steps (which fails) and costs little.
    # Sources are translated whole, as by nmt-translate (longer ones than the model was
    # trained on too).
    source = translate_lib.encode_sources(self.tokenizer, tf.concat([sources, [""]], 0))
    ids, weights = decode.on_grid(
        lambda padded: translate_lib.decode_ids(self.model, padded, self.beam_size,
                                                self.max_length_ratio, self.length_penalty),
        source, self.grid)
    source = source[:-1]
    ids, weights = decode.trim(ids[:-1], weights[:-1])
    empty = tf.equal(tf.strings.length(tf.strings.strip(sources)), 0)
    source = tf.where(empty[:, tf.newaxis], 0, source)
    ids = tf.where(empty[:, tf.newaxis], 0, ids)
    weights = tf.where(empty[:, tf.newaxis, tf.newaxis], 0.0, weights)
    return {
        "translations": self.tokenizer.detokenize_target(ids),
        "attention_weights": weights,
        "source_tokens": tf.where(source != 0, self.tokenizer.source_pieces(source), ""),
        "target_tokens": tf.where(ids != 0, self.tokenizer.target_pieces(ids), ""),
    }


def export(config: ml_collections.ConfigDict, tokenizer, model, export_dir: str,
           beam_size: Optional[int] = None) -> Translator:
  """Writes a SavedModel with signature serving_default(sources) to `export_dir`.

  Uses beam search with `beam_size` (default config.eval.beam_size; 1 = greedy). The
  decoder step is exported without XLA: serving binaries need not include the JIT.
  """
  if not export_dir:
    raise ValueError("--export_dir is required: where to write the SavedModel, e.g. "
                     "exports/nmt/1 (TensorFlow Serving wants a numbered version dir).")
  translator = Translator(tokenizer, model, config, beam_size)
  tf.saved_model.save(translator, export_dir,
                      signatures={"serving_default": translator.serve})
  logging.info("Exported a SavedModel (beam size %d) to %s.", translator.beam_size,
               export_dir)
  return translator
