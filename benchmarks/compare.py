"""Side-by-side benchmarks: the seed tutorial against the project, and batch-size sweeps.

Orchestration only: each measurement is `nmt-bench train` (trainer/bench.py) or the seed
tutorial script in its own subprocess (a fresh TensorFlow runtime per variant), all started
one after the other so that they measure under the same load; each prints one JSON line.
`python -m benchmarks.compare compare|sweep|table` (docs/performance.md).
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from absl import logging

from trainer.bench import write_synthetic_tsv

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
  """A compare() result as docs/performance.md's markdown table: one row per project variant."""
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
  """python -m benchmarks.compare compare|sweep ...: prints one JSON line; table FILE: markdown."""
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compare")
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
