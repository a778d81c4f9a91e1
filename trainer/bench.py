"""Training throughput: `nmt-bench train` times the real train loop and reports MFU.

`run` builds a run exactly as `nmt-train` does (train.setup, make_replica_step,
make_train_loop), compiles every batch shape of the bucket grid first, then times
`num_steps` steps of the configured input pipeline. `compare` and `sweep` (see `main`)
start `nmt-bench train` and the seed tutorial as subprocesses, one after the other, so
they measure under the same load; each prints one JSON line.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from input_pipeline import pipeline
from trainer import train

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
                      GRU cell 2*B*(U + E)*3U + 2*B*U*3U
    output projection over all steps:                            2*B*T*U*V
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
                  + 2 * b * u * 3 * u)
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
  """dataset_fn(ctx) for distribute_datasets_from_function: `repeats` batches of random
  ids for each length of the bucket grid, with the real pipeline's per-bucket batch sizes."""
  grid = pipeline.padded_shapes(config)

  def dataset_fn(ctx):
    rows = tf.constant(np.repeat(pipeline.bucket_batch_sizes(config, ctx), repeats))
    lengths = tf.constant(np.repeat(grid, repeats))

    def batch(i):
      ids = tf.random.stateless_uniform(tf.stack([rows[i], lengths[i]]), seed=[0, i],
                                        minval=4, maxval=vocab_size, dtype=tf.int32)
      return {"source": ids, "target": ids}

    return tf.data.Dataset.range(len(grid) * repeats).map(batch)

  return dataset_fn


def _call(train_loop, iterator, num_steps: int):
  """One train_loop call: (per-step metrics as numpy, input wait s, wall time s)."""
  start = time.perf_counter()
  with pipeline.corpora.surface_corpus_errors():
    out, input_wait = train_loop(iterator, tf.constant(num_steps))
    out = {k: v.numpy() for k, v in out.items()}
  return out, float(input_wait), time.perf_counter() - start


def _warm_up(run: train.Run, train_loop, config) -> Dict:
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


def _time_steps(run: train.Run, train_loop, num_steps: int, steps_per_loop: int) -> Dict:
  """Times `num_steps` steps of the real iterator in train_loop calls of steps_per_loop."""
  step_times, wall, wait = [], 0.0, 0.0
  metrics = {k: [] for k in ("tokens", "examples", "length")}
  done = 0
  while done < num_steps:
    n = min(steps_per_loop, num_steps - done)
    out, input_wait, seconds = _call(train_loop, run.iterator, n)
    step_times += [seconds / n] * n
    wall, wait, done = wall + seconds, wait + input_wait, done + n
    for k in metrics:
      metrics[k] += [float(x) for x in out[k]]
  return dict(step_times=step_times, seconds=wall, input_wait=wait, **metrics)


def run(config, workdir: str, num_steps: int = 30,
        strategy: Optional[tf.distribute.Strategy] = None) -> Dict:
  """`nmt-bench train`: one JSON-able dict of throughput, compile cost and MFU.

  Rates are over all timed steps (batches of different lengths take different times):
  target_tokens_per_sec * step_time_s == tokens_per_step (real target tokens, EOS
  included, BOS and padding not), and mfu == achieved / peak GFLOP/s. The median step
  time is reported too; far below the mean, other processes were competing for the CPU.
  """
  if num_steps <= 0:
    raise ValueError(f"num_steps={num_steps}; must be > 0.")
  load_before = os.getloadavg()[0]
  run_ = train.setup(config, workdir, strategy)
  train_loop = train.make_train_loop(run_.strategy, train.make_replica_step(
      run_.model, run_.optimizer, config, run_.strategy))
  peak = measure_peak_gflops(compute_dtype(run_.policy))
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
      tokens_per_step=float(tokens), examples_per_step=float(examples),
      compile_count=compiled["compile_count"], compile_seconds=compiled["compile_seconds"],
      traces=compiled["traces"], model_flops_per_step=flops,
      achieved_gflops_per_sec=achieved, peak_gflops_per_sec=peak, mfu=achieved / peak,
      precision=run_.policy, xla=config.train.xla, batch_size=config.train.batch_size,
      units=config.model.units, embed_dim=config.model.embed_dim,
      target_vocab_size=run_.tokenizer.target_vocab_size,
      batch_lengths=sorted({int(x) for x in timed["length"]}), num_steps=num_steps,
      steps_per_loop=config.train.steps_per_loop, replicas=run_.strategy.num_replicas_in_sync,
      load_avg_1m=[load_before, os.getloadavg()[0]])
  logging.info("Train benchmark: %s", result)
  return result


# ---------------------------------------------------------------------------------------
# Side-by-side comparison with the seed tutorial, and the batch-size sweep. Each run is a
# subprocess (a fresh TensorFlow runtime per variant), all started one after the other.

_BENCH_COMMAND = (sys.executable, "-c", "from trainer.main import run_bench; run_bench()",
                  "train")
_VOCAB_SLACK = 31  # SentencePiece's most pieces = words + 26 letters + "▁" + 4 specials.


def _subprocess_json(command: Sequence[str]) -> Dict:
  """Runs a command that prints one JSON line last; returns it (stderr shown on failure)."""
  logging.info("Running: %s", " ".join(command))
  done = subprocess.run(list(command), capture_output=True, text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
  if done.returncode or not lines:
    raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n"
                       f"{done.stderr[-3000:]}")
  return json.loads(lines[-1])


def run_tutorial(tutorial: str, tsv: str, steps: int, pairs: int, units: int,
                 embed_dim: int, batch_size: int) -> Dict:
  """The seed tutorial script on `tsv`, adding sentences_per_sec and tokens per sentence."""
  result = _subprocess_json([sys.executable, tutorial, "--tsv", tsv, "--src_col", "0",
                             "--tgt_col", "1", "--pairs", str(pairs), "--steps", str(steps),
                             "--units", str(units), "--emb", str(embed_dim),
                             "--batch", str(batch_size)])
  result["sentences_per_sec"] = result["batch"] / result["sec_per_step"]
  result["target_tokens_per_sentence"] = (result["target_tokens_per_sec"] *
                                          result["sec_per_step"] / result["batch"])
  return result


def run_project(config_path: str, workdir: str, num_steps: int,
                overrides: Dict[str, object]) -> Dict:
  """`nmt-bench train` in a subprocess with --config.KEY=VALUE overrides."""
  flags = [f"--config.{key}={value}" for key, value in overrides.items()]
  result = _subprocess_json(list(_BENCH_COMMAND) + [
      f"--config={config_path}", f"--workdir={workdir}", f"--num_steps={num_steps}"] + flags)
  result["sentences_per_sec"] = result["examples_per_sec"]
  result["target_tokens_per_sentence"] = (result["tokens_per_step"] /
                                          result["examples_per_step"])
  return result


def pieces_per_word(workdir: str, tsv: str, lines: int = 500) -> float:
  """SentencePiece pieces per whitespace word on the first `lines` sources of `tsv`."""
  import sentencepiece as spm  # Only needed here.
  model = spm.SentencePieceProcessor(
      model_file=os.path.join(workdir, "tokenizer", "joint.model"))
  with open(tsv, encoding="utf-8") as f:
    sources = [line.split("\t")[0] for line in itertools.islice(f, lines)]
  return (sum(len(model.encode(s)) for s in sources) /
          sum(len(s.split()) for s in sources))


def _synthetic_overrides(tsv: str, words: int, vocab_words: int, units: int,
                         embed_dim: int, batch_size: int) -> Dict[str, object]:
  """Config overrides so that the project trains on `tsv` with one piece per word.

  vocab_size is SentencePiece's maximum for the closed vocabulary, which keeps every word
  whole (compare() reports pieces_per_word); both max lengths hold BOS + words + EOS.
  """
  length = words + 2
  return {"data.train": f"tsv:{tsv}", "data.eval": f"tsv:{tsv}",
          "tokenizer.vocab_size": vocab_words + _VOCAB_SLACK,
          "data.max_source_length": length, "data.max_target_length": length,
          "model.units": units, "model.embed_dim": embed_dim,
          "train.batch_size": batch_size}


def variant_overrides(variant: str) -> Dict[str, object]:
  """"precision:xla" or "precision:xla:tokens=N" (batches of up to N real-or-pad tokens
  instead of a fixed sentence count) -> config overrides."""
  parts = variant.split(":")
  if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].startswith("tokens=")):
    raise ValueError(f"variant {variant!r}; expected precision:xla[:tokens=N], e.g. "
                     "float32:decoder_step or float32:off:tokens=1536")
  overrides = {"train.precision": parts[0], "train.xla": parts[1]}
  if len(parts) == 3:
    overrides.update({"data.batch_by": "tokens",
                      "train.tokens_per_batch": int(parts[2].split("=")[1])})
  return overrides


def compare(tutorial: str, config_path: str, workdir: str, variants: Sequence[str], *,
            words: int = 22, pairs: int = 4096, vocab_words: int = 500,
            tutorial_steps: int = 5, num_steps: int = 10, units: int = 1024,
            embed_dim: int = 256, batch_size: int = 64) -> Dict:
  """The tutorial and the project (each variant: see variant_overrides) on the same
  synthetic data: every sentence `words` words (fixed) or 3..`words` words (variable).

  Returns per dataset the runs and sentences_per_sec_ratio = project / tutorial. The
  fixed-length run uses a one-length bucket grid, since no other length can occur.
  """
  os.makedirs(workdir, exist_ok=True)
  result = {"load_avg_1m_start": os.getloadavg()[0], "units": units,
            "embed_dim": embed_dim, "batch_size": batch_size, "words": words}
  for name, min_words in (("fixed", words), ("variable", 3)):
    tsv = os.path.join(workdir, f"{name}.tsv")
    write_synthetic_tsv(tsv, pairs, min_words, words, vocab_words)
    base = _synthetic_overrides(tsv, words, vocab_words, units, embed_dim, batch_size)
    if name == "fixed":
      base["data.bucket_boundaries"] = f"({words + 2},)"
    reference = run_tutorial(tutorial, tsv, tutorial_steps, pairs, units, embed_dim,
                             batch_size)
    project = {}
    for variant in variants:
      project[variant] = run_project(config_path, os.path.join(workdir, name), num_steps,
                                     dict(base, **variant_overrides(variant)))
    result[name] = {
        "tutorial": reference, "project": project,
        "sentences_per_sec_ratio": {v: p["sentences_per_sec"] / reference["sentences_per_sec"]
                                    for v, p in project.items()},
        "pieces_per_word": pieces_per_word(os.path.join(workdir, name), tsv)}
  result["load_avg_1m_end"] = os.getloadavg()[0]
  return result


def compare_table(result: Dict) -> str:
  """A compare() result as the README's markdown table: one row per project variant."""
  rows = ["| project variant | fixed: sentences/s | ratio | MFU | variable: sentences/s | "
          "ratio | MFU | variable: sentences/batch |", "|---" * 8 + "|"]
  fixed, variable = result["fixed"], result["variable"]
  rows.append(f"| seed tutorial (float32, Python-unrolled decoder in one tf.function) | "
              f"{fixed['tutorial']['sentences_per_sec']:.1f} | 1.0x | | "
              f"{variable['tutorial']['sentences_per_sec']:.1f} | 1.0x | | "
              f"{variable['tutorial']['batch']} |")
  for variant, run_fixed in fixed["project"].items():
    run_variable = variable["project"][variant]
    rows.append(
        f"| {variant} | {run_fixed['sentences_per_sec']:.1f} | "
        f"**{fixed['sentences_per_sec_ratio'][variant]:.2f}x** | {run_fixed['mfu']:.2f} | "
        f"{run_variable['sentences_per_sec']:.1f} | "
        f"**{variable['sentences_per_sec_ratio'][variant]:.2f}x** | {run_variable['mfu']:.2f} | "
        f"{run_variable['examples_per_step']:.0f} |")
  return "\n".join(rows)


def sweep(config_path: str, workdir: str, batch_sizes: Sequence[int],
          variants: Sequence[str], num_steps: int, plot: str = "", *, words: int = 22,
          pairs: int = 4096, vocab_words: int = 500, units: int = 1024,
          embed_dim: int = 256) -> Dict:
  """Target tokens/s against batch size on the fixed-length synthetic data (one shape);
  writes a PNG to `plot` if given."""
  os.makedirs(workdir, exist_ok=True)
  tsv = os.path.join(workdir, "fixed.tsv")
  write_synthetic_tsv(tsv, pairs, words, words, vocab_words)
  runs = {variant: [] for variant in variants}
  for batch_size in batch_sizes:
    for variant in variants:
      overrides = _synthetic_overrides(tsv, words, vocab_words, units, embed_dim,
                                       batch_size)
      overrides.update(variant_overrides(variant), **{
          "data.bucket_boundaries": f"({words + 2},)"})
      runs[variant].append(run_project(config_path, workdir, num_steps, overrides))
  if plot:
    plot_sweep(runs, batch_sizes, plot, f"{units} units, {embed_dim}-d embeddings, "
               f"{words + 2}-token batches, {os.cpu_count()} CPU cores")
  return {"batch_sizes": list(batch_sizes), "plot": plot, "runs": runs}


def plot_sweep(runs: Dict[str, List[Dict]], batch_sizes: Sequence[int], path: str,
               title: str) -> None:
  """Tokens/s (one line per variant, MFU written at each point) against batch size."""
  import matplotlib  # Only needed here.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for variant, results in runs.items():
    rates = [r["target_tokens_per_sec"] for r in results]
    ax.plot(batch_sizes, rates, marker="o", label=variant.replace(":", ", xla ", 1))
    for b, rate, r in zip(batch_sizes, rates, results):
      ax.annotate(f"{100 * r['mfu']:.0f}%", (b, rate), textcoords="offset points",
                  xytext=(0, 6), ha="center", fontsize=8)
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
  ax.set_xlabel("batch size (sentences)")
  ax.set_ylabel("target tokens / s (labels: MFU)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """python -m trainer.bench compare|sweep ...: prints one JSON line; table FILE: markdown."""
  parser = argparse.ArgumentParser(prog="python -m trainer.bench")
  parser.add_argument("command", choices=("compare", "sweep", "table"))
  parser.add_argument("result", nargs="?", default="",
                      help="table: a JSON file written by compare.")
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--workdir", default="/tmp/nmt_bench_compare")
  parser.add_argument("--variants", default="float32:train_step,float32:off",
                      help="Comma-separated precision:xla pairs to run the project with.")
  parser.add_argument("--num_steps", type=int, default=10)
  parser.add_argument("--words", type=int, default=22)
  parser.add_argument("--units", type=int, default=1024)
  parser.add_argument("--embed_dim", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=64, help="compare only.")
  parser.add_argument("--pairs", type=int, default=4096)
  parser.add_argument("--tutorial", default="", help="compare: tutorial_baseline.py path.")
  parser.add_argument("--tutorial_steps", type=int, default=5)
  parser.add_argument("--batch_sizes", default="16,32,64,128,256", help="sweep only.")
  parser.add_argument("--plot", default="", help="sweep: PNG path to write.")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  variants = args.variants.split(",")
  if args.command == "table":
    if not args.result:
      parser.error("table needs the path of a compare JSON file")
    with open(args.result, encoding="utf-8") as f:
      print(compare_table(json.load(f)))
    return
  if args.command == "compare":
    if not args.tutorial:
      parser.error("compare needs --tutorial=PATH/tutorial_baseline.py")
    result = compare(args.tutorial, args.config, args.workdir, variants,
                     words=args.words, pairs=args.pairs, num_steps=args.num_steps,
                     tutorial_steps=args.tutorial_steps, units=args.units,
                     embed_dim=args.embed_dim, batch_size=args.batch_size)
  else:
    result = sweep(args.config, args.workdir, [int(b) for b in args.batch_sizes.split(",")],
                   variants, args.num_steps, args.plot, words=args.words, pairs=args.pairs,
                   units=args.units, embed_dim=args.embed_dim)
  print(json.dumps(result, default=float))


if __name__ == "__main__":
  main()
