"""nmt-prepare's time and memory by corpus size and runner: one JSON line per configuration.

  python -m benchmarks.prepare_scale --pairs=1000000,10000000 \
    --runners=single_process,direct --direct_num_workers=2 --workdir=/tmp/nmt_prepare_scale

Writes a synthetic TSV per size (the closed random vocabulary of trainer.bench, so that the
default 8000-piece tokenizer can be trained), then runs `nmt-prepare` (configs/default.py,
a new output dir each time) once per runner, the runners back to back for each size so
that they see the same load from other jobs. While it runs, the RSS of its process tree
is sampled every 0.2 s: the peak of the sum over all processes, and the peaks of the
launching process and of the largest worker process (Beam's); and the CPU seconds of the
launching process and of all others (as last sampled, so a little short). A last line
per size gives the throughput of each runner over the first one.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from typing import Dict, List, Sequence

import numpy as np
import psutil

from trainer import bench

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_pairs(path: str, num_pairs: int, min_words: int, max_words: int,
                vocab_words: int, seed: int = 0) -> None:
  """Like trainer.bench.write_synthetic_tsv (target = source reversed, mapped word by word
  through a permutation), vectorized: 10^7 pairs in about a minute, a chunk in memory."""
  words = np.array(bench.synthetic_words(vocab_words, seed), dtype=object)
  rng = np.random.default_rng(seed + 1)
  translation = rng.permutation(len(words))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for start in range(0, num_pairs, 100_000):
      count = min(100_000, num_pairs - start)
      lengths = rng.integers(min_words, max_words + 1, size=count)
      ids = rng.integers(0, len(words), size=int(lengths.sum()))
      ends = np.cumsum(lengths)
      sources, targets = words[ids], words[translation[ids]]
      f.writelines(f"{' '.join(sources[end - n:end])}\t{' '.join(targets[end - n:end][::-1])}\n"
                   for n, end in zip(lengths.tolist(), ends.tolist()))
  os.replace(path + ".tmp", path)


class _PeakRss:
  """Samples the RSS of a process and its descendants until stopped: peaks in bytes."""

  def __init__(self, pid: int):
    self.root = psutil.Process(pid)
    self.total = self.launcher = self.worker = 0
    self.workers = 0
    self.cpu = {}  # pid -> (user + system seconds, is the launcher), as last read.
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.wait(0.2):
      try:
        launcher = self.root.memory_info().rss
        processes = self.root.children(recursive=True)
        children = [p.memory_info().rss for p in processes]
        for process in [self.root] + processes:
          times = process.cpu_times()
          self.cpu[process.pid] = (times.user + times.system, process is self.root)
      except psutil.Error:  # A process ended while being read.
        continue
      self.launcher = max(self.launcher, launcher)
      self.worker = max([self.worker] + children)
      self.workers = max(self.workers, len(children))
      self.total = max(self.total, launcher + sum(children))

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


def prepare(config: str, tsv: str, eval_tsv: str, output_dir: str, runner: str,
            workers: int) -> Dict:
  """Runs nmt-prepare once; its JSON line's counts, wall time and peak RSS."""
  shutil.rmtree(output_dir, ignore_errors=True)
  command = [sys.executable, "-c", "from trainer.main import run_prepare; run_prepare()",
             f"--config={config}", f"--config.data.train=tsv:{tsv}",
             f"--config.data.eval=tsv:{eval_tsv}", f"--output_dir={output_dir}",
             f"--runner={runner}", f"--direct_num_workers={workers}"]
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=_ROOT)
  rss = _PeakRss(process.pid)
  stdout, stderr = process.communicate()
  seconds = time.perf_counter() - start
  rss.stop()
  if process.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
  line = json.loads(stdout.strip().splitlines()[-1])
  pairs = line["train"]["read"]
  gib = 2.0**30
  return dict(measurement="nmt-prepare", runner=runner,
              workers=workers if runner != "single_process" else 1, pairs=pairs,
              examples=line["train"]["examples"], seconds=round(seconds, 1),
              pairs_per_sec=round(pairs / seconds), peak_rss_total_gib=round(rss.total / gib, 3),
              peak_rss_launcher_gib=round(rss.launcher / gib, 3),
              peak_rss_worker_gib=round(rss.worker / gib, 3), processes=1 + rss.workers,
              cpu_s_launcher=round(sum(t for t, root in rss.cpu.values() if root), 1),
              cpu_s_workers=round(sum(t for t, root in rss.cpu.values() if not root), 1),
              load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--workdir", default="/tmp/nmt_prepare_scale")
  parser.add_argument("--pairs", default="1000000", help="Comma-separated corpus sizes.")
  parser.add_argument("--runners", default="single_process,direct",
                      help="Comma-separated nmt-prepare --runner values, run in this order.")
  parser.add_argument("--direct_num_workers", type=int, default=2)
  parser.add_argument("--words", default="3:20", help="MIN:MAX words per sentence.")
  parser.add_argument("--vocab_words", type=int, default=20_000)
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  low, high = (int(x) for x in args.words.split(":"))
  eval_tsv = os.path.join(args.workdir, "eval.tsv")
  if not os.path.exists(eval_tsv):
    write_pairs(eval_tsv, 2000, low, high, args.vocab_words, seed=1)
  machine = dict(cpu=_cpu_model(), cpus=os.cpu_count(), python=platform.python_version(),
                 date=time.strftime("%Y-%m-%d"))
  for pairs in (int(n) for n in args.pairs.split(",")):
    tsv = os.path.join(args.workdir, f"pairs_{pairs}.tsv")
    if not os.path.exists(tsv):
      write_pairs(tsv, pairs, low, high, args.vocab_words)
    rows: List[Dict] = []
    for runner in args.runners.split(","):
      rows.append(prepare(args.config, tsv, eval_tsv, os.path.join(args.workdir, "out"),
                          runner, args.direct_num_workers))
      print(json.dumps(dict(rows[-1], **machine)), flush=True)
    print(json.dumps(dict(measurement="summary", pairs=pairs, **{
        f"{row['runner']}_over_{rows[0]['runner']}": round(
            row["pairs_per_sec"] / rows[0]["pairs_per_sec"], 3) for row in rows[1:]})),
        flush=True)


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("Model name"))
  except (OSError, StopIteration):
    return platform.processor()


if __name__ == "__main__":
  main()
