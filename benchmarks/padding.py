"""Padding of OpenNMT-tf's batches and of this project's grid on the same tokenized pairs.

Reads the OpenNMT-tf kit's SentencePiece-tokenized training files (`--kit_data`, made by
its prepare.sh: one line of pieces per sentence) and prints one JSON line: padded cells per
row and the padding fraction of (1) OpenNMT-tf's batching (buckets of width 2 on the longer
side, 128 examples, each side padded to its batch maximum) and (2) each `--grids` (this
project: both sides of a batch padded to the smallest grid length holding both, counted as
the train step counts them: source + target[1:]). docs/peer.md has the result.

    python -m benchmarks.padding --kit_data=/tmp/onmt_peer/data \
      --grids=8,12,16,24,32:8,10,12,14,16,20,24,32
"""
import argparse
import json
import os

import numpy as np


def _lengths(path: str) -> np.ndarray:
  with open(path, encoding="utf-8") as f:
    return np.array([len(line.split()) for line in f])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kit_data", default="/tmp/onmt_peer/data")
  parser.add_argument("--grids", default="8,12,16,24,32:8,10,12,14,16,20,24,32")
  parser.add_argument("--batch_size", type=int, default=128)
  args = parser.parse_args(argv)
  source = _lengths(os.path.join(args.kit_data, "train.de.sp")) + 1  # EOS
  target = _lengths(os.path.join(args.kit_data, "train.en.sp")) + 1  # EOS
  keep = (source <= 32) & (target <= 31)  # The kit's length limits (ours: 32 and 32).
  order = np.random.default_rng(0).permutation(int(keep.sum()))
  source, target = source[keep][order], target[keep][order]
  result = {}
  bucket = np.maximum(source, target) // 2
  real = cells = rows = 0
  for b in np.unique(bucket):
    s, t = source[bucket == b], target[bucket == b]
    for i in range(0, len(s) - args.batch_size + 1, args.batch_size):
      ss, tt = s[i:i + args.batch_size], t[i:i + args.batch_size]
      real += int(ss.sum() + tt.sum())
      cells += args.batch_size * int(ss.max() + tt.max())
      rows += args.batch_size
  result["opennmt_tf"] = dict(cells_per_row=round(cells / rows, 2),
                              padding=round(1 - real / cells, 3))
  ours_target = target + 1  # BOS too; the step counts target[1:].
  longest = np.maximum(source, ours_target)
  for grid in args.grids.split(":"):
    lengths = np.array(sorted(int(x) for x in grid.split(",")))
    padded = lengths[np.searchsorted(lengths, longest)]
    result[f"grid {grid}"] = dict(
        cells_per_row=round(float((2 * padded - 1).mean()), 2),
        padding=round(float(1 - (source + ours_target - 1).sum() / (2 * padded - 1).sum()), 3))
  result["real_tokens_per_row"] = round(float((source + target).mean()), 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
