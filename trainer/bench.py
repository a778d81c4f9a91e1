"""Speed: `nmt-bench train` times the real train loop and reports MFU; `nmt-bench doctor`
trains a few steps in every mode combination the device allows; `nmt-bench translate`
times a trained run translating a file, and its SavedModel's latency.

`run` builds a run exactly as `nmt-train` does (run_setup.setup, train.make_run_train_loop,
with the moving average if on), compiles every batch shape of the bucket grid first, then times
`num_steps` steps of the configured input pipeline. Side-by-side comparisons with the
seed tutorial and batch-size sweeps live in benchmarks/compare.py.
"""
import itertools
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from configs import validate as validate_lib
from input_pipeline import datasets
from input_pipeline import pipeline
from trainer import checkpoints
from trainer import distribute
from trainer import export
from trainer import run_setup
from trainer import train
from trainer import translate

# Words of the synthetic corpus: short, lowercase, ASCII, so the tutorial's preprocessing
# keeps them unchanged and SentencePiece can hold each one as a single piece.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def synthetic_words(vocab_words: int, seed: int = 0) -> List[str]:
  """`vocab_words` distinct random words of 3 to 6 letters (seeded)."""
  rng = np.random.default_rng(seed)
  words = set()
  while len(words) < vocab_words:
    length = int(rng.integers(3, 7))
    words.add("".join(rng.choice(list(_LETTERS), size=length)))
  return sorted(words)


def write_synthetic_tsv(path: str, num_pairs: int, min_words: int, max_words: int,
                        vocab_words: int = 500, seed: int = 0) -> None:
  """Writes `num_pairs` lines "source<TAB>target" with min..max words per sentence.

  The target is the source reversed and mapped word by word through a fixed permutation
  of the same closed vocabulary: both sides have equal length, and the task is learnable.
  """
  words = synthetic_words(vocab_words, seed)
  rng = np.random.default_rng(seed + 1)
  translation = rng.permutation(len(words))
  lines = []
  for _ in range(num_pairs):
    ids = rng.integers(0, len(words), size=int(rng.integers(min_words, max_words + 1)))
    source = " ".join(words[i] for i in ids)
    target = " ".join(words[translation[i]] for i in ids[::-1])
    lines.append(f"{source}\t{target}\n")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(lines)


def model_flops_per_step(model_config, batch_size: int, source_length: int,
                         target_length: int, target_vocab_size: int) -> float:
  """Training FLOPs of one step on padded [B, S] sources and [B, T+1] targets.

  Counts 2 FLOPs per multiply-add of the model's matmuls (elementwise ops are ignored),
  for the padded shapes as run, with B batch, S source length, T = target_length - 1
  decoder steps, E embedding size, U units, V target vocabulary:
    encoder GRU, per layer and direction (I = E, then U or 2U):   2*B*S*(I + U)*3U
    bidirectional bridge (outputs and state):                    2*B*S*2U*U + 2*B*2U*U
    attention keys W2(values), once per batch:                   2*B*S*U*U
    per decoder step: W1 2*B*U*U, score V 2*B*S*U, context 2*B*S*U,
                      GRU cell 2*B*(U + E)*3U + 2*B*U*3U,
                      each layer above (model.decoder_layers): 2*B*U*3U + 2*B*U*3U
    output projection over all steps:                            2*B*T*U*V
      (model.tie_embeddings with E != U: 2*B*T*U*E + 2*B*T*E*V)
  Training = 3 x forward (the backward pass costs two forward matmuls per matmul).
  """
  b, s, t = batch_size, source_length, target_length - 1
  u, e, m = model_config.units, model_config.embed_dim, model_config
  directions = 2 if m.bidirectional else 1
  encoder, width = 0, e
  for _ in range(m.encoder_layers):
    encoder += directions * 2 * b * s * (width + u) * 3 * u
    width = directions * u
  if m.bidirectional:
    encoder += 2 * b * s * 2 * u * u + 2 * b * 2 * u * u
  keys = 2 * b * s * u * u
  decoder_step = (2 * b * u * u + 4 * b * s * u + 2 * b * (u + e) * 3 * u
                  + 2 * b * u * 3 * u
                  + (m.get("decoder_layers", 1) - 1) * 2 * (2 * b * u * 3 * u))
  if m.get("tie_embeddings", False) and e != u:
    projection = 2 * b * t * u * e + 2 * b * t * e * target_vocab_size
  else:
    projection = 2 * b * t * u * target_vocab_size
  return 3.0 * (encoder + keys + t * decoder_step + projection)


def compute_dtype(policy: str) -> tf.DType:
  """The dtype matmuls run in under a Keras precision policy name."""
  return {"mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}.get(
      policy, tf.float32)


def measure_peak_gflops(dtype: tf.DType, max_size: int = 4096, budget_s: float = 0.2,
                        windows: int = 10) -> float:
  """Best GFLOP/s of a square matmul in `dtype`: n doubles from 512 up to max_size while
  the next size (8x the work) would still take under `budget_s`; then the best of
  `windows` timed windows of about `budget_s` each (~2-3 s in all).

  Measured in-process, so MFU compares against this machine as it is now; the best
  window discounts moments when other processes hold the cores.
  """
  matmul = tf.function(tf.matmul)
  n, seconds = 256, 0.0
  while n < max_size and seconds * 8 < budget_s:
    n *= 2
    a = tf.cast(tf.random.stateless_normal([n, n], seed=[0, n]), dtype)
    matmul(a, a).numpy()  # Warm-up: kernel selection, allocation.
    start = time.perf_counter()
    matmul(a, a).numpy()
    seconds = time.perf_counter() - start
  reps = max(1, int(budget_s / max(seconds, 1e-6)))
  best = float("inf")
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(reps):
      result = matmul(a, a)
    result.numpy()
    best = min(best, (time.perf_counter() - start) / reps)
  return 2.0 * n ** 3 / best / 1e9


def _grid_dataset_fn(config, vocab_size: int, repeats: int):
  """dataset_fn(ctx) for distribute_datasets_from_function: `repeats` steps of random ids
  for each length of the bucket grid, with the real pipeline's per-bucket batch sizes.

  A step takes one batch per local replica (k = replicas per pipeline), so each length
  comes k times in a row: every replica compiles it, and none gets an empty batch.
  """
  grid = pipeline.padded_shapes(config)

  def dataset_fn(ctx):
    replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    count = repeats * replicas
    rows = tf.constant(np.repeat(pipeline.bucket_batch_sizes(config, ctx), count))
    lengths = tf.constant(np.repeat(grid, count))

    def batch(i):
      ids = tf.random.stateless_uniform(tf.stack([rows[i], lengths[i]]), seed=[0, i],
                                        minval=4, maxval=vocab_size, dtype=tf.int32)
      return {"source": ids, "target": ids}

    return tf.data.Dataset.range(len(grid) * count).map(batch)

  return dataset_fn


def _call(train_loop, iterator, num_steps: int):
  """One train_loop call: (per-step metrics as numpy, input wait s, wall time s)."""
  start = time.perf_counter()
  with datasets.surface_corpus_errors():
    out, input_wait = train_loop(iterator, tf.constant(num_steps))
    out = {k: v.numpy() for k, v in out.items()}
  return out, float(input_wait), time.perf_counter() - start


def _warm_up(run: run_setup.Run, train_loop, config) -> Dict:
  """Runs each grid shape twice and one real batch, so that timing sees no compilation.

  A call counts as compiling when it took longer than its same-shape repeat by more than
  max(0.1 s, 20%) (a trace or an XLA compile costs seconds, a step's noise far less);
  compile_seconds sums those excesses. The real batch starts the input pipeline (fills
  the shuffle buffer), which is then not counted as input wait.
  """
  vocab = min(run.tokenizer.source_vocab_size, run.tokenizer.target_vocab_size)
  warm = iter(run.strategy.distribute_datasets_from_function(
      _grid_dataset_fn(config, vocab, repeats=2)))
  traces_before = train_loop.experimental_get_tracing_count()
  count, seconds = 0, 0.0
  for _ in pipeline.padded_shapes(config):
    first, second = _call(train_loop, warm, 1)[2], _call(train_loop, warm, 1)[2]
    if first - second > max(0.1, 0.2 * second):
      count, seconds = count + 1, seconds + first - second
  _call(train_loop, run.iterator, 1)
  return dict(compile_count=count, compile_seconds=seconds,
              traces=train_loop.experimental_get_tracing_count() - traces_before)


def _time_steps(run: run_setup.Run, train_loop, num_steps: int, steps_per_loop: int) -> Dict:
  """Times `num_steps` steps of the real iterator in train_loop calls of steps_per_loop."""
  step_times, wall, wait = [], 0.0, 0.0
  metrics = {k: [] for k in ("tokens", "examples", "length", "loss", "real_tokens",
                             "padded_tokens")}
  done = 0
  while done < num_steps:
    n = min(steps_per_loop, num_steps - done)
    out, input_wait, seconds = _call(train_loop, run.iterator, n)
    step_times += [seconds / n] * n
    wall, wait, done = wall + seconds, wait + input_wait, done + n
    for k in metrics:
      metrics[k] += [float(x) for x in out[k]]
  return dict(step_times=step_times, seconds=wall, input_wait=wait, **metrics)


def run(config, workdir: str, num_steps: int = 30) -> Dict:
  """`nmt-bench train`: one JSON-able dict of throughput, compile cost and MFU.

  Rates are over all timed steps (batches of different lengths take different times):
  target_tokens_per_sec * step_time_s == tokens_per_step (real target tokens, EOS
  included, BOS and padding not), and mfu == achieved / peak GFLOP/s. The median step
  time is reported too; far below the mean, other processes were competing for the CPU.
  """
  if num_steps <= 0:
    raise ValueError(f"num_steps={num_steps}; must be > 0.")
  load_before = os.getloadavg()[0]
  run_ = run_setup.setup(config, workdir)
  config = run_.config  # Resolved: no 'auto' modes.
  train_loop = train.make_run_train_loop(run_)  # With train.ema_decay's update, if on.
  peak = measure_peak_gflops(compute_dtype(config.train.precision))
  compiled = _warm_up(run_, train_loop, config)
  timed = _time_steps(run_, train_loop, num_steps, config.train.steps_per_loop)
  step_time = timed["seconds"] / num_steps
  tokens, examples = np.mean(timed["tokens"]), np.mean(timed["examples"])
  flops = float(np.mean([
      model_flops_per_step(config.model, int(b), int(length), int(length),
                           run_.tokenizer.target_vocab_size)
      for b, length in zip(timed["examples"], timed["length"])]))
  achieved = flops / step_time / 1e9
  result = dict(
      target_tokens_per_sec=tokens / step_time, examples_per_sec=examples / step_time,
      step_time_s=step_time, median_step_time_s=float(np.median(timed["step_times"])),
      input_wait_fraction=timed["input_wait"] / timed["seconds"],
      padding_fraction=1.0 - sum(timed["real_tokens"]) / max(sum(timed["padded_tokens"]), 1.0),
      tokens_per_step=float(tokens), examples_per_step=float(examples),
      compile_count=compiled["compile_count"], compile_seconds=compiled["compile_seconds"],
      traces=compiled["traces"], model_flops_per_step=flops,
      achieved_gflops_per_sec=achieved, peak_gflops_per_sec=peak, mfu=achieved / peak,
      final_loss=timed["loss"][-1],
      precision=config.train.precision, xla=config.train.xla,
      recurrence=config.model.recurrence, batch_size=config.train.batch_size,
      units=config.model.units, embed_dim=config.model.embed_dim,
      target_vocab_size=run_.tokenizer.target_vocab_size,
      batch_lengths=sorted({int(x) for x in timed["length"]}), num_steps=num_steps,
      steps_per_loop=config.train.steps_per_loop, replicas=run_.strategy.num_replicas_in_sync,
      load_avg_1m=[load_before, os.getloadavg()[0]])
  logging.info("Train benchmark: %s", result)
  return result


def doctor(config, workdir: str, num_steps: int = 3,
           precisions: Sequence[str] = validate_lib.PRECISIONS[1:],
           xla_modes: Sequence[str] = validate_lib.XLA_MODES[1:],
           recurrences: Sequence[str] = validate_lib.RECURRENCES[1:],
           devices: Optional[distribute.Devices] = None) -> Iterator[Dict]:
  """`nmt-bench doctor`: one dict per precision x XLA x recurrence combination.

  A combination this device refuses (trainer.distribute.mode_refusal) is reported with
  `ran: false` and the reason, without running; the others train `num_steps` timed steps
  of `config` (after compiling every batch shape) and report step time, MFU and the last
  loss, or `ran: false` with the error if they fail. Yields as it goes, so a user sees
  each line as soon as it is measured.
  """
  devices = devices or distribute.detect_devices()
  for precision, xla, recurrence in itertools.product(precisions, xla_modes, recurrences):
    row = dict(precision=precision, xla=xla, recurrence=recurrence)
    why = distribute.mode_refusal(recurrence, xla, precision, devices)
    if why:
      yield dict(row, ran=False, reason=why)
      continue
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.train.precision, variant.train.xla = precision, xla
    variant.model.recurrence = recurrence
    try:
      validate_lib.validate(variant)  # The entry point validated `config`, not these modes.
      result = run(variant, workdir, num_steps)
    except Exception as e:  # pylint: disable=broad-except  # Reported, not raised: the
      # doctor's job is to say which combinations fail on this device and how.
      message = (str(e).strip().splitlines() or [""])[0][:300]
      yield dict(row, ran=False, reason=f"{type(e).__name__}: {message}")
      continue
    yield dict(row, ran=True, **{k: result[k] for k in (
        "step_time_s", "median_step_time_s", "mfu", "peak_gflops_per_sec",
        "target_tokens_per_sec", "compile_seconds", "final_loss")})


def translate_speed(workdir: str, input_path: str, batch_sizes: Sequence[int] = (1, 32),
                    latency_sentences: int = 256) -> Dict:
  """`nmt-bench translate`: how fast a trained run translates a file, one JSON-able dict.

  file: nmt-translate's path in this process (load the checkpoint, compile, decode every
  line in length-sorted batches; the process's own start-up, ~5 s of imports, not
  included): sentences/s and real target tokens/s (EOS included). saved_model: the
  exported SavedModel (as TF Serving runs it) on the first `latency_sentences` lines in
  requests of each batch size, after one warm-up request: p50/p95 latency per request and
  sentences/s.
  """
  with tf.io.gfile.GFile(input_path, "r") as f:
    sentences = [line.rstrip("\r\n") for line in f]
  if not sentences:
    raise ValueError(f"--input={input_path} has no lines to translate")
  start = time.perf_counter()
  loaded = checkpoints.load_for_inference(workdir, for_export=True)
  translate_ids = translate.make_translate_fn(loaded.model, loaded.config)
  results = translate.translate_all(translate_ids, loaded.tokenizer, sentences,
                                    loaded.config.eval.batch_size)
  seconds = time.perf_counter() - start
  tokens = sum(int(np.count_nonzero(r.ids[0])) for r in results if r.hypotheses)
  result = dict(input=input_path, sentences=len(sentences), beam_size=
                translate.resolve_beam_size(loaded.config), file_seconds=seconds,
                sentences_per_sec=len(sentences) / seconds,
                target_tokens_per_sec=tokens / seconds, saved_model={})
  export_dir = os.path.join(workdir, "bench_export")
  export.export(loaded.config, loaded.tokenizer, loaded.model, export_dir)
  serve = tf.saved_model.load(export_dir).signatures["serving_default"]
  requests = sentences[:latency_sentences]
  for size in batch_sizes:
    batches = [requests[i:i + size] for i in range(0, len(requests), size)]
    serve(sources=tf.constant(batches[0]))  # Warm-up: traces and loads the kernels.
    latencies = []
    for batch in batches:
      begin = time.perf_counter()
      serve(sources=tf.constant(batch))["translations"].numpy()
      latencies.append(time.perf_counter() - begin)
    result["saved_model"][f"batch_{size}"] = dict(
        p50_ms=1000 * float(np.percentile(latencies, 50)),
        p95_ms=1000 * float(np.percentile(latencies, 95)),
        sentences_per_sec=len(requests) / sum(latencies), requests=len(batches))
  logging.info("Translate benchmark: %s", result)
  return result
