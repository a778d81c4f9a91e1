"""Raw against prepared input, side by side in one run: one JSON line per measurement.

  python -m benchmarks.prepared_input --pairs=200000 --workdir=/tmp/nmt_bench_input

Writes a synthetic TSV (trainer.bench.write_synthetic_tsv, a closed vocabulary of random
words so that the default 8000-piece tokenizer can be trained), runs nmt-prepare on it
(peak memory of that process from getrusage), then `nmt-bench input` on the raw and the
prepared source, at --start_step=0 and at the resume steps given. Each command runs in its
own process, one after the other, so they measure under the same load. The last line
compares them against issue 12's targets.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Sequence

from trainer import bench

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry(name: str, args: Sequence[str]) -> List[str]:
  """A console entry point of trainer.main as a command (no reinstall needed)."""
  return [sys.executable, "-c", f"from trainer.main import {name}; {name}()", *args]


def _last_json(command: Sequence[str]) -> Dict:
  result = subprocess.run(command, capture_output=True, text=True, cwd=_ROOT)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(config: str, tsv: str, eval_tsv: str, output_dir: str) -> Dict:
  """Runs nmt-prepare; returns its JSON line plus wall time and the child's peak RSS."""
  start = time.perf_counter()
  line = _last_json(_entry("run_prepare", [
      f"--config={config}", f"--config.data.train=tsv:{tsv}",
      f"--config.data.eval=tsv:{eval_tsv}", f"--output_dir={output_dir}"]))
  # ru_maxrss of the largest child waited for so far, in KiB on Linux: run this first.
  peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return dict(measurement="nmt-prepare", seconds=time.perf_counter() - start,
              peak_rss_gib=peak_kib / 2**20, examples=line["train"]["examples"],
              output_dir=output_dir)


def bench_input(config: str, source: str, workdir: str, start_step: int,
                num_batches: int) -> Dict:
  line = _last_json(_entry("run_bench", [
      "input", f"--config={config}", f"--config.data.train={source}",
      f"--workdir={workdir}", f"--start_step={start_step}",
      f"--num_batches={num_batches}"]))
  return dict(measurement="nmt-bench input", **line)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--workdir", default="/tmp/nmt_bench_input")
  parser.add_argument("--pairs", type=int, default=200_000)
  parser.add_argument("--words", default="3:20", help="MIN:MAX words per sentence.")
  parser.add_argument("--vocab_words", type=int, default=20_000)
  parser.add_argument("--num_batches", type=int, default=300)
  parser.add_argument("--resume_steps", default="1000000",
                      help="Comma-separated start steps for the prepared source.")
  parser.add_argument("--raw_resume_steps", default="",
                      help="Comma-separated start steps for the raw source (replays).")
  parser.add_argument("--prepare_only", action="store_true")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  low, high = (int(x) for x in args.words.split(":"))
  tsv = os.path.join(args.workdir, f"pairs_{args.pairs}.tsv")
  eval_tsv = os.path.join(args.workdir, "eval.tsv")
  if not os.path.exists(tsv):
    bench.write_synthetic_tsv(tsv, args.pairs, low, high, args.vocab_words)
    bench.write_synthetic_tsv(eval_tsv, 2000, low, high, args.vocab_words, seed=1)
  prepared_dir = os.path.join(args.workdir, f"prepared_{args.pairs}")
  rows = [prepare(args.config, tsv, eval_tsv, prepared_dir)]
  print(json.dumps(rows[-1]), flush=True)
  if args.prepare_only:
    return
  runs = [(f"tsv:{tsv}", 0, prepared_dir)]
  runs += [(f"tsv:{tsv}", int(n), prepared_dir) for n in args.raw_resume_steps.split(",") if n]
  runs += [(f"prepared:{prepared_dir}", int(n), os.path.join(args.workdir, "run"))
           for n in ["0"] + args.resume_steps.split(",") if n]
  for source, start_step, workdir in runs:
    rows.append(bench_input(args.config, source, workdir, start_step, args.num_batches))
    print(json.dumps(rows[-1], default=float), flush=True)
  print(json.dumps(compare(rows), default=float), flush=True)


def compare(rows: List[Dict]) -> Dict:
  """The ratios issue 12 sets targets for."""
  def pick(prefix: str, step: int) -> Dict:
    return next(r for r in rows if r.get("source", "").startswith(prefix)
                and r.get("start_step") == step)

  raw, prepared = pick("tsv:", 0), pick("prepared:", 0)
  resumed = [r for r in rows if r.get("source", "").startswith("prepared:")
             and r.get("start_step")]
  return dict(
      measurement="summary",
      prepared_over_raw_examples_per_sec=prepared["examples_per_sec"] / raw["examples_per_sec"],
      prepared_examples_per_sec=prepared["examples_per_sec"],
      first_batch_s_at_step={str(r["start_step"]): r["seconds_to_first_batch"]
                             for r in [prepared] + resumed},
      resumed_over_start_first_batch=[r["seconds_to_first_batch"] /
                                      prepared["seconds_to_first_batch"] for r in resumed],
      prepare_peak_rss_gib=rows[0]["peak_rss_gib"])


if __name__ == "__main__":
  main()
