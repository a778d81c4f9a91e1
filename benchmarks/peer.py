"""This project and OpenNMT-tf side by side: the same model, corpus and wall-clock budget.

Runs `../shared/bench/opennmt_tf` (the model of configs/tatoeba.py rebuilt from OpenNMT-tf
parts; its README) and `nmt-train --config=configs/tatoeba.py` one after the other, each
alone, on the same Tatoeba pair from `../shared/corpora`, for the same training budget; then
each translates the 2,000 test sentences (beam 4, length penalty 0.6) as a user would (a
fresh process, TensorFlow start-up included) and is scored with sacreBLEU (cased, 13a). One
JSON line per side on stdout:

    python -m benchmarks.peer --seconds=600 --pair=deu-eng >> docs/peer.jsonl
    python -m benchmarks.peer --seconds=30 --smoke_lines=50   # the whole chain, ~5 minutes

Keys of both sides: side, pair, budget_s, steps, train_seconds, target_tokens_per_sec (real
target tokens incl. EOS per second, median of the progress reports after the first; both
tools count them the same way), bleu, chrf, test_sentences, infer_seconds, machine, date.
The project's precision is a flag (float32 as the peer, or auto). The project side turns
off configs/tatoeba.py's tied embeddings (and EMA if set), which the kit's model lacks, and
trains the kit's batches of 128 at 3e-3 after 300 warmup steps (`--recipe` keeps
tatoeba.py's own). Nothing else may run on the machine meanwhile: both sides are timed
by the wall clock.
"""
import argparse
import datetime
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import sacrebleu

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.path.join(os.path.dirname(_ROOT), "shared")
# nmt-train's progress line: "step 1400/3000  loss 2.9286  5901 tok/s  ...".
_PROGRESS = re.compile(r"step (\d+)/\d+  loss [\d.]+  (\d+) tok/s")


def machine() -> str:
  """The CPU model and core count, as lscpu names them."""
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = re.search(r"Model name:\s*(.+)", text)
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores"
  except (OSError, subprocess.CalledProcessError):
    return f"unknown CPU, {os.cpu_count()} cores"


def _test_pairs(corpora: str, pair: str, limit: int) -> List[List[str]]:
  with gzip.open(os.path.join(corpora, f"{pair}.test.tsv.gz"), "rt", encoding="utf-8") as f:
    pairs = [line.rstrip("\n").split("\t")[:2] for line in f]
  return pairs[:limit] if limit else pairs


def run_opennmt(args, corpora: str) -> Dict:
  """The kit's run.sh in a writable copy (`--onmt_dir`, set up once); its last line."""
  kit = args.onmt_dir
  if not os.path.isdir(kit):
    shutil.copytree(os.path.join(_SHARED, "bench", "opennmt_tf"), kit)
  env = dict(os.environ, CORPORA=corpora, PAIR=args.pair,
             RUN_DIR=f"runs/peer_{args.pair}_{args.seconds}s")
  if args.smoke_lines:
    env["SMOKE_LINES"] = str(args.smoke_lines)
  if not os.path.isdir(os.path.join(kit, "venv")):
    subprocess.run(["./setup.sh"], cwd=kit, check=True)
  data_pair = os.path.join(kit, "data", "pair.txt")  # The kit's data/ is for one pair.
  if os.path.exists(data_pair) and open(data_pair).read().strip() != args.pair:
    shutil.rmtree(os.path.join(kit, "data"))
  result = subprocess.run(["./run.sh", str(args.seconds)], cwd=kit, env=env,
                          capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f"OpenNMT-tf run failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
  with open(data_pair, "w") as f:
    f.write(args.pair)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  return dict(side="opennmt_tf", steps=out["steps"], train_seconds=out["train_seconds"],
              target_tokens_per_sec=out["target_tokens_per_sec_train"], bleu=out["bleu"],
              chrf=out["chrf"], test_sentences=out["test_sentences"],
              infer_seconds=out["infer_seconds"])


def run_project(args, corpora: str) -> Dict:
  """nmt-train on the pair (dev: 1,000 pairs carved out of train, as the kit does), then
  nmt-translate of the test sources in a fresh process, timed whole."""
  workdir = os.path.join(args.workdir, f"peer_{args.pair}_{args.seconds}s")
  shutil.rmtree(workdir, ignore_errors=True)
  train = os.path.join(corpora, f"{args.pair}.train.tsv.gz")
  test = _test_pairs(corpora, args.pair, args.smoke_lines)
  overrides = [f"--config.data.train=tsv:{train}", "--config.data.eval=holdout:1000",
               '--config.data.test=', f"--config.train.max_seconds={args.seconds}",
               f"--config.train.precision={args.precision}", "--config.eval.beam_size=4",
               "--config.eval.length_penalty=0.6"]
  if not args.recipe:
    # The kit's model has neither tied target embeddings nor a moving average of the weights
    # (configs/tatoeba.py ties them since 2026-12-04), and trains batches of 128 at 3e-3 after
    # 300 warmup steps (tatoeba.py: 64 at 6e-3 after 150 since 2026-12-04): the kit's values,
    # so that both sides train one model on the same batches and schedule.
    overrides += ["--config.model.tie_embeddings=False", "--config.train.ema_decay=0.0",
                  "--config.train.batch_size=128", "--config.train.learning_rate=3e-3",
                  "--config.train.warmup_steps=300", "--config.train.eval_every=1000"]
  if args.smoke_lines:
    overrides.append(f"--config.data.eval_examples={args.smoke_lines}")
  started = time.monotonic()
  result = subprocess.run(["nmt-train", "--config=configs/tatoeba.py", f"--workdir={workdir}",
                           *overrides], cwd=_ROOT, capture_output=True, text=True)
  if result.returncode not in (0, 42):
    raise SystemExit(f"nmt-train failed:\n{result.stderr[-3000:]}")
  final = json.loads(result.stdout.strip().splitlines()[-1])
  rates = [int(m.group(2)) for m in _PROGRESS.finditer(result.stderr)]
  steady = rates[1:] or rates
  source_file = os.path.join(workdir, "test.src")
  with open(source_file, "w", encoding="utf-8") as f:
    f.writelines(source + "\n" for source, _ in test)
  begin = time.monotonic()
  translated = subprocess.run(["nmt-translate", f"--workdir={workdir}",
                               f"--input={source_file}"], cwd=_ROOT, capture_output=True,
                              text=True)
  infer_seconds = time.monotonic() - begin
  if translated.returncode:
    raise SystemExit(f"nmt-translate failed:\n{translated.stderr[-3000:]}")
  hyps = translated.stdout.split("\n")[:len(test)]
  refs = [target for _, target in test]
  return dict(side="project", steps=final["step"], train_seconds=final.get("seconds"),
              target_tokens_per_sec=statistics.median(steady) if steady else None,
              bleu=round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
              chrf=round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
              test_sentences=len(test), infer_seconds=round(infer_seconds, 1),
              precision=args.precision, wall_seconds=round(time.monotonic() - started, 1))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=int, default=600, help="training budget per side")
  parser.add_argument("--pair", default="deu-eng", help="a <pair>.train/test.tsv.gz of "
                      "../shared/corpora")
  parser.add_argument("--sides", default="opennmt_tf,project")
  parser.add_argument("--precision", default="float32", help="the project's "
                      "train.precision (float32 as the peer, or auto)")
  parser.add_argument("--onmt_dir", default="/tmp/onmt_peer", help="writable copy of the "
                      "kit (made and set up on first use: a venv with TensorFlow 2.13)")
  parser.add_argument("--recipe", action="store_true", help="the project side runs "
                      "configs/tatoeba.py as it is (tied embeddings, batch 64 at "
                      "6e-3) instead of the kit's model and batches")
  parser.add_argument("--workdir", default="/tmp/peer_runs", help="the project's runs")
  parser.add_argument("--smoke_lines", type=int, default=0, help="only the first N dev and "
                      "test pairs (a quick check of the chain)")
  args = parser.parse_args(argv)
  corpora = os.path.join(_SHARED, "corpora")
  common = dict(pair=args.pair, budget_s=args.seconds, machine=machine(),
                date=datetime.date.today().isoformat())
  runners = {"opennmt_tf": run_opennmt, "project": run_project}
  for side in args.sides.split(","):
    if side not in runners:
      parser.error(f"--sides: {side!r} is not one of {', '.join(runners)}")
    print(json.dumps(dict(common, **runners[side](args, corpora))), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
