"""Dev BLEU against wall-clock minutes: nmt-train runs read from TensorBoard, the seed
tutorial's script run at a time budget, one PNG and one JSON line.

  python -m benchmarks.bleu_vs_time --runs=tatoeba.py=runs/tatoeba,quickstart.py=runs/qs \
      --tutorial_json=tutorial.json --output=docs/bleu_vs_minutes.png

A run's points are its evaluations (`eval/bleu`) at the run's wall-clock seconds
(`train/elapsed_s`: training and evaluation since the first step, over all resumes; the
set-up before the first step, a few seconds, is not counted, nor is the tutorial's compile).
The tutorial's script scores only at its end: each JSON line it printed (`--seconds`
budget, `bleu`) is one point. Its BLEU is computed on its own lowercased, tokenized
references (tutorial_baseline.py), which flatters it; ours is sacreBLEU on the raw text.
"""
import argparse
import json
import os
from typing import Dict, List, Sequence, Tuple

from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf

Curve = List[Tuple[float, float]]  # (minutes, BLEU)


def _scalars(directory: str, tag: str) -> Dict[int, float]:
  acc = event_accumulator.EventAccumulator(directory, size_guidance={
      event_accumulator.TENSORS: 0})
  acc.Reload()
  if tag not in acc.Tags()["tensors"]:
    return {}
  return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def run_curve(workdir: str) -> Curve:
  """(minutes, dev BLEU) at each evaluation of an nmt-train run."""
  bleu = _scalars(os.path.join(workdir, "eval"), "bleu")
  elapsed = _scalars(os.path.join(workdir, "train"), "elapsed_s")
  missing = sorted(set(bleu) - set(elapsed))
  if missing:
    raise ValueError(f"{workdir}: evaluations at steps {missing} have no train/elapsed_s "
                     f"(a run from before it was logged)")
  return [(elapsed[step] / 60, bleu[step]) for step in sorted(bleu)]


def tutorial_points(paths: Sequence[str]) -> Curve:
  """(minutes, BLEU) from the JSON lines tutorial_baseline.py printed (with --seconds)."""
  points = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.startswith("{"):
          result = json.loads(line)
          points.append((result["steps"] * result["sec_per_step"] / 60, result["bleu"]))
  return sorted(points)


def plot(curves: Dict[str, Curve], path: str, title: str) -> None:
  import matplotlib  # Only needed here.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, curve in curves.items():
    minutes, bleu = zip(*([(0.0, 0.0)] + curve))
    ax.plot(minutes, bleu, marker="o", label=label)
    ax.annotate(f"{bleu[-1]:.1f}", (minutes[-1], bleu[-1]), textcoords="offset points",
                xytext=(4, 4))
  ax.margins(x=0.1)  # Room for the last point's label.
  ax.set_xlabel("wall-clock minutes (training + evaluation)")
  ax.set_ylabel("dev BLEU (sacreBLEU)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", required=True,
                      help="LABEL=WORKDIR,... of nmt-train runs")
  parser.add_argument("--tutorial_json", default="",
                      help="Files with tutorial_baseline.py's JSON lines, comma-separated")
  parser.add_argument("--tutorial_label", default="seed tutorial (tutorial_baseline.py)")
  parser.add_argument("--output", required=True, help="PNG to write")
  parser.add_argument("--title", default="Tatoeba deu-eng: dev BLEU vs wall clock, 2-core CPU")
  args = parser.parse_args(argv)
  curves = {}
  for item in args.runs.split(","):
    label, _, workdir = item.partition("=")
    curves[label] = run_curve(workdir)
  if args.tutorial_json:
    curves[args.tutorial_label] = tutorial_points(args.tutorial_json.split(","))
  plot(curves, args.output, args.title)
  print(json.dumps({label: [[round(m, 2), round(b, 2)] for m, b in curve]
                    for label, curve in curves.items()}))


if __name__ == "__main__":
  main()
