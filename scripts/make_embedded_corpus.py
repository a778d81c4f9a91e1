"""Rebuilds input_pipeline/data/deu-eng/ (the embedded Tatoeba German->English corpus) from
the project's shared corpora: `python scripts/make_embedded_corpus.py [CORPORA_DIR]`.

train + dev = ../shared/corpora/deu-eng.train.tsv.gz, split by the rule of
data.eval=holdout:2000 (datasets.holdout_threshold), so `embedded:deu-eng:dev` is exactly the dev
set that `tsv:.../deu-eng.train.tsv.gz` with `holdout:2000` carves; test is the shared test file
unchanged. File order is kept. gzip with mtime 0 and level 9: reruns are byte-identical.
"""
import gzip
import os
import shutil
import sys

from configs import default
from input_pipeline import datasets

_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "input_pipeline", "data", "deu-eng")


def _write(path: str, pairs) -> int:
  lines = [f"{src}\t{tgt}\n" for src, tgt in pairs]
  with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9,
                                            mtime=0, filename="") as out:
    out.write("".join(lines).encode("utf-8"))
  return len(lines)


def main(corpora_dir: str) -> None:
  data = default.get_config().data
  data.train = f"tsv:{os.path.join(corpora_dir, 'deu-eng.train.tsv.gz')}"
  data.eval = "holdout:2000"
  os.makedirs(_OUT, exist_ok=True)
  counts = {"dev": _write(os.path.join(_OUT, "dev.tsv.gz"),
                          datasets.read_pairs(data.eval, data)),
            "train": _write(os.path.join(_OUT, "train.tsv.gz"),
                            datasets.read_pairs(data.train, data))}
  shutil.copyfile(os.path.join(corpora_dir, "deu-eng.test.tsv.gz"),
                  os.path.join(_OUT, "test.tsv.gz"))
  shutil.copyfile(os.path.join(corpora_dir, "raw", "deu-eng_about.txt"),
                  os.path.join(_OUT, "_about.txt"))
  print(counts)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "../shared/corpora")
