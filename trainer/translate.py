"""Text in, text out with a trained model: translating sentences and files (nmt-translate,
the evaluator's BLEU) and scoring given pairs (nmt-score).

Sentences are decoded in batches of similar length (sorted by source length, results in
input order), so a batch decodes for as long as its own longest sentence, not the file's;
with a compiled decoder step the sources are padded to the training grid (decode.on_grid),
so a few compiled shapes serve every batch. Sources are never cut: one longer than the
model was trained on is translated whole, with a warning. Files are read in windows of
_WINDOW_BATCHES batches, so memory stays bounded on a stream of any length.
"""
import contextlib
import io
import os
import sys
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from input_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from trainer import decode
from trainer import summaries

_WINDOW_BATCHES = 32  # Batches of input lines sorted together by length (translate_lines).
_WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a word.


class Translation(NamedTuple):
  """One sentence's n-best list, best first: hypotheses [N] (text), scores [N] (log P /
  length penalty), ids [N, T] and attention weights [N, T, S] (both 0-padded), source ids
  [S] (with EOS). An empty input has N = 0."""
  hypotheses: List[str]
  scores: np.ndarray
  ids: np.ndarray
  weights: np.ndarray
  source: np.ndarray


def encode_sources(tokenizer, sentences, max_length: Optional[int] = None) -> tf.Tensor:
  """Strings -> [B,S] int32 source ids with EOS, 0-padded; truncated to `max_length`
  (EOS included) if given, else whole.

  `sentences` is a list of str or a tf.string [B] tensor (so it also works in-graph).
  """
  if not tf.is_tensor(sentences):
    sentences = tf.constant(list(sentences), tf.string)
  ids = tf.cast(tokenizer.tokenize_source(sentences), tf.int32)
  if max_length is not None:
    ids = ids[:, :max_length - 1]
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


def make_translate_fn(model, config, beam_size: Optional[int] = None, n_best: int = 1):
  """tf.function source ids [B,S] -> (ids [B,N,T], weights [B,N,T,S], scores [B,N]).

  Beam search with `beam_size` (default config.eval.beam_size) beams, keeping the `n_best`
  best hypotheses; beam size 1 is greedy search (the same result, decode.py).
  """
  beam_size = resolve_beam_size(config, beam_size)
  ratio, alpha = float(config.eval.max_length_ratio), float(config.eval.length_penalty)
  grid = decode.source_grid(model, config)  # One compiled decoder step per grid length.

  def search(source):
    max_len = decode.max_output_length(source, ratio)
    ids, weights, scores = decode.n_best_search(model, source, beam_size, max_len, alpha,
                                                n_best)
    used = tf.reduce_any(ids != PAD_ID, axis=[0, 1])  # trim, over all N hypotheses.
    length = tf.reduce_max(tf.where(used, tf.range(1, tf.shape(ids)[2] + 1), 0))
    return ids[:, :, :length], weights[:, :, :length], scores

  # One trace for every batch shape: a trace of the beam search costs ~2 s on a 2-core
  # CPU, and reduce_retracing traced it 3 times per file (nmt-translate, each evaluation).
  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="source")])
  def translate_ids(source):
    return decode.on_grid(search, source, grid)

  return translate_ids


def length_order(tokenizer, sentences: Sequence[str]) -> np.ndarray:
  """Indices of `sentences` sorted by source length in pieces (stable)."""
  if not sentences:
    return np.zeros([0], np.int64)
  lengths = tokenizer.tokenize_source(tf.constant(list(sentences), tf.string)).row_lengths()
  return np.argsort(lengths.numpy(), kind="stable")


def translate_all(translate_ids, tokenizer, sentences: Sequence[str], batch_size: int
                  ) -> List[Translation]:
  """Translates strings in batches of similar length -> one Translation each, in input
  order. Empty (or whitespace-only) sentences are not decoded: N = 0."""
  results: List[Optional[Translation]] = [None] * len(sentences)
  nonempty = [i for i, s in enumerate(sentences) if s.strip()]
  order = [nonempty[i] for i in length_order(tokenizer, [sentences[i] for i in nonempty])]
  for first in range(0, len(order), batch_size):
    rows = order[first:first + batch_size]
    source = encode_sources(tokenizer, [sentences[i] for i in rows])
    ids, weights, scores = (x.numpy() for x in translate_ids(source))
    texts = tokenizer.detokenize_target(
        tf.reshape(ids, [-1, ids.shape[-1]])).numpy().reshape(ids.shape[:2])
    for b, i in enumerate(rows):
      results[i] = Translation([t.decode("utf-8") for t in texts[b]], scores[b], ids[b],
                               weights[b], source.numpy()[b])
  empty = Translation([], np.zeros([0], np.float32), np.zeros([0, 0], np.int32),
                      np.zeros([0, 0, 0], np.float32), np.zeros([0], np.int32))
  return [result or empty for result in results]


def translate(translate_ids, tokenizer, sentences: Sequence[str], config
              ) -> Tuple[List[str], List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
  """The best hypotheses of `translate_all` in config.eval.batch_size batches -> texts,
  output ids [T], attention weights [T,S] and source ids [S] per sentence ("" and empty
  arrays for an empty sentence)."""
  hyps, out_ids, weights, sources = [], [], [], []
  for result in translate_all(translate_ids, tokenizer, sentences, config.eval.batch_size):
    found = bool(result.hypotheses)
    hyps.append(result.hypotheses[0] if found else "")
    out_ids.append(result.ids[0] if found else np.zeros([0], np.int32))
    weights.append(result.weights[0] if found else np.zeros([0, 0], np.float32))
    sources.append(result.source)
  return hyps, out_ids, weights, sources


def word_alignments(tokenizer, source: np.ndarray, ids: np.ndarray,
                    weights: np.ndarray) -> str:
  """Pharaoh links "i-j" (source word i, target word j, from 0) from one hypothesis's
  attention weights [T,S]: each target piece links to the source piece it attends to most,
  and pieces map to words by SentencePiece's word-start mark. EOS and padding link nothing.
  (RNN attention is a usable soft alignment without extra training.)"""
  src = [int(x) for x in source if x not in (PAD_ID, EOS_ID, BOS_ID)]
  tgt = []
  for x in ids:
    if x in (PAD_ID, EOS_ID):
      break
    tgt.append(int(x))
  if not src or not tgt:
    return ""
  src_words = _word_index(tokenizer.source_pieces(tf.constant(src, tf.int32)).numpy())
  tgt_words = _word_index(tokenizer.target_pieces(tf.constant(tgt, tf.int32)).numpy())
  links = {(src_words[int(np.argmax(weights[t, :len(src)]))], tgt_words[t])
           for t in range(len(tgt))}
  return " ".join(f"{i}-{j}" for i, j in sorted(links, key=lambda link: (link[1], link[0])))


def _word_index(pieces: Sequence[bytes]) -> List[int]:
  """The word each piece belongs to (a piece starting with the word mark opens a word)."""
  words, index = [], -1
  for position, piece in enumerate(pieces):
    if position == 0 or piece.decode("utf-8").startswith(_WORD_START):
      index += 1
    words.append(index)
  return words


def format_lines(tokenizer, number: int, result: Translation, n_best: int,
                 with_scores: bool, alignments: bool) -> List[str]:
  """Output lines of input line `number` (from 0): the best hypothesis, or with n_best > 1
  or scores Moses' n-best form "NUMBER ||| HYPOTHESIS ||| SCORE"; alignments append
  " ||| LINKS". An empty input gives one empty line (n_best lines with scores)."""
  rows = max(1, n_best) if (n_best > 1 or with_scores) else 1
  lines = []
  for n in range(rows):
    if n < len(result.hypotheses):
      text, score = result.hypotheses[n], float(result.scores[n])
      links = (word_alignments(tokenizer, result.source, result.ids[n], result.weights[n])
               if alignments else "")
    else:
      text, score, links = "", float("nan"), ""
    fields = [f"{number}", text, f"{score:.4f}"] if rows > 1 or with_scores else [text]
    if alignments:
      fields.append(links)
    lines.append(" ||| ".join(fields))
  return lines


def translate_lines(translate_ids, tokenizer, lines: Iterable[str], config, *,
                    n_best: int = 1, with_scores: bool = False, alignments: bool = False,
                    attention_dir: Optional[str] = None) -> Iterator[str]:
  """Yields the output lines for the input lines (format_lines), in order, decoding
  config.eval.batch_size lines at once, sorted by length within windows of lines.

  Empty lines give empty translations; a line longer than the model's training maximum
  (data.max_source_length) is translated whole, with a warning naming it (numbered from
  1). With `attention_dir`, line N's attention is written to attention_dir/00000N.png.
  """
  if attention_dir:
    tf.io.gfile.makedirs(attention_dir)
  said_empty, size = False, config.eval.batch_size
  for first, window in _numbered_windows(lines, size * _WINDOW_BATCHES):
    _warn_if_long(tokenizer, window, first, config.data.max_source_length)
    if not said_empty and any(not line.strip() for line in window):
      number = first + next(i for i, line in enumerate(window) if not line.strip())
      logging.info("Empty input lines (the first is line %d) give empty output lines.",
                   number)
      said_empty = True
    results = translate_all(translate_ids, tokenizer, window, size)
    if attention_dir:
      _write_attention(tokenizer, results, first, attention_dir)
    for i, result in enumerate(results):
      yield from format_lines(tokenizer, first + i - 1, result, n_best, with_scores,
                              alignments)


def translate_file(translate_ids, tokenizer, config, input_path: Optional[str] = None,
                   output_path: Optional[str] = None, attention_dir: Optional[str] = None,
                   **options) -> None:
  """Translates a UTF-8 text file (default stdin) line by line into `output_path` (stdout).

  Undecodable bytes become U+FFFD, which the tokenizer maps to UNK like any unknown
  character, and NUL bytes spaces, each line with a warning; see `translate_lines` (and
  its `options`: n_best, with_scores, alignments).
  """
  with _text_io(input_path, output_path) as (lines, out):
    for line in translate_lines(translate_ids, tokenizer, lines, config,
                                attention_dir=attention_dir, **options):
      out.write(line + "\n")


@contextlib.contextmanager
def _text_io(input_path: Optional[str], output_path: Optional[str]):
  """(decoded input lines, writable text output): files, or stdin/stdout when not given."""
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
    if output_path:
      if os.path.dirname(output_path):
        tf.io.gfile.makedirs(os.path.dirname(output_path))
      out = stack.enter_context(tf.io.gfile.GFile(output_path, "w"))
    else:
      out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", line_buffering=True)
      stack.callback(out.detach)  # Leaves sys.stdout open.
    yield _decode_lines(raw), out
    out.flush()


def _decode_lines(raw: Iterable[bytes], max_warnings: int = 10) -> Iterator[str]:
  """Decodes input lines (without their newline); one with invalid UTF-8 (U+FFFD in its
  place) or NUL bytes (spaces) is still used, with a warning naming its number (the first
  ones)."""
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
        logging.warning("input line %d: %s; used anyway.", number, ", ".join(problems))
    yield text.rstrip("\r\n")
  if bad > max_warnings:
    logging.warning("%d input lines had invalid UTF-8 or NUL bytes (the first %d are named "
                    "above).", bad, max_warnings)


def _numbered_windows(lines: Iterable[str], size: int) -> Iterator[Tuple[int, List[str]]]:
  """(number of the window's first line, counted from 1, up to `size` lines) pairs."""
  window, first = [], 1
  for number, line in enumerate(lines, start=1):
    window.append(line.rstrip("\r\n"))
    if len(window) == size:
      yield first, window
      window, first = [], number + 1
  if window:
    yield first, window


def _warn_if_long(tokenizer, lines: List[str], first: int, max_length: int) -> None:
  lengths = tokenizer.tokenize_source(tf.constant(lines, tf.string)).row_lengths().numpy()
  for i, length in enumerate(lengths):
    if length + 1 > max_length:  # + EOS
      logging.warning("line %d: %d tokens + EOS is longer than the data.max_source_length=%d "
                      "this model was trained with; translated whole (quality may suffer).",
                      first + i, length, max_length)


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


def _write_attention(tokenizer, results: List[Translation], first: int,
                     directory: str) -> None:
  keep = [i for i, result in enumerate(results) if result.hypotheses]
  pngs = attention_pngs(tokenizer, [results[i].source for i in keep],
                        [results[i].ids[0] for i in keep],
                        [results[i].weights[0] for i in keep])
  for i, png in zip(keep, pngs):
    with tf.io.gfile.GFile(os.path.join(directory, f"{first + i:06d}.png"), "wb") as f:
      f.write(png)


# ---------------------------------------------------------------- nmt-score


def make_score_fn(model):
  """tf.function (source [B,S], target [B,T] with BOS and EOS) -> log P(target | source)
  [B] f32 and target tokens [B] (EOS counted, BOS not), by teacher forcing."""

  @tf.function(reduce_retracing=True)
  def score(source, target):
    logits, _ = model(source, target[:, :-1], training=False)
    labels = target[:, 1:]
    log_p = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    mask = tf.cast(labels != PAD_ID, tf.float32)
    return tf.reduce_sum(log_p * mask, axis=1), tf.reduce_sum(mask, axis=1)

  return score


def score_pairs(score_fn, tokenizer, pairs: Sequence[Tuple[str, str]], batch_size: int
                ) -> List[Tuple[float, int]]:
  """(log P(target | source), target tokens with EOS) per pair, in order, in batches of
  similar source length; sides are never cut."""
  results: List[Tuple[float, int]] = [(0.0, 0)] * len(pairs)
  order = length_order(tokenizer, [source for source, _ in pairs])
  for first in range(0, len(order), batch_size):
    rows = order[first:first + batch_size]
    source = encode_sources(tokenizer, [pairs[i][0] for i in rows])
    target = tf.cast(tokenizer.tokenize_target(
        tf.constant([pairs[i][1] for i in rows], tf.string)), tf.int32)
    bos = tf.RaggedTensor.from_tensor(tf.fill([target.nrows(), 1], BOS_ID))
    eos = tf.RaggedTensor.from_tensor(tf.fill([target.nrows(), 1], EOS_ID))
    log_p, tokens = score_fn(source, tf.concat([bos, target, eos], axis=1).to_tensor(0))
    for b, i in enumerate(rows):
      results[i] = (float(log_p[b]), int(tokens[b]))
  return results


def score_file(score_fn, tokenizer, config, input_path: Optional[str] = None,
               output_path: Optional[str] = None) -> Dict[str, int]:
  """Scores a file of "SOURCE<TAB>TARGET" lines (default stdin): one output line per input
  line, "LOG_PROB<TAB>LOG_PROB_PER_TOKEN<TAB>TOKENS" (natural log, EOS counted), in order.
  A line without a tab or with an empty side gives "nan<TAB>nan<TAB>0" and a warning
  naming it (the first ones), so output line i always scores input line i.
  Returns {"scored": n, "unscorable": n}."""
  window = config.eval.batch_size * _WINDOW_BATCHES
  counts = {"scored": 0, "unscorable": 0}
  with _text_io(input_path, output_path) as (lines, out):
    for first, chunk in _numbered_windows(lines, window):
      pairs, rows = [], []
      for i, line in enumerate(chunk):
        source, tab, target = line.partition("\t")
        target = target.split("\t")[0]
        if tab and source.strip() and target.strip():
          pairs.append((source, target))
          rows.append(i)
        else:
          counts["unscorable"] += 1
          if counts["unscorable"] <= 10:
            logging.warning("input line %d: not SOURCE<TAB>TARGET with two non-empty "
                            "sides; scored nan.", first + i)
      scores = dict(zip(rows, score_pairs(score_fn, tokenizer, pairs,
                                          config.eval.batch_size)))
      for i in range(len(chunk)):
        log_p, tokens = scores.get(i, (float("nan"), 0))
        out.write(f"{log_p:.4f}\t{log_p / tokens if tokens else float('nan'):.4f}"
                  f"\t{tokens}\n")
      counts["scored"] += len(pairs)
  if counts["unscorable"]:
    logging.warning("%d of %d lines could not be scored (nan).", counts["unscorable"],
                    counts["unscorable"] + counts["scored"])
  return counts
