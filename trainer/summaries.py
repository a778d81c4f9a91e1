"""TensorBoard output: attention heatmaps as labelled PNGs, scalars, text, hparams."""
import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Off-screen: training machines have no display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def plot_attention(weights: np.ndarray, source_tokens: Sequence[str],
                   target_tokens: Sequence[str]) -> bytes:
  """Attention weights [T,S] with token labels on both axes -> PNG bytes."""
  weights = np.asarray(weights)[:len(target_tokens), :len(source_tokens)]
  height = 1.5 + 0.3 * len(target_tokens)
  width = 1.5 + 0.3 * len(source_tokens)
  fig, ax = plt.subplots(figsize=(max(width, 3), max(height, 3)), dpi=100)
  ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(source_tokens)), list(source_tokens), rotation=90, fontsize=9)
  ax.set_yticks(range(len(target_tokens)), list(target_tokens), fontsize=9)
  ax.set_xlabel("source")
  ax.set_ylabel("target")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  return buffer.getvalue()


def write_scalars(writer: tf.summary.SummaryWriter, step: int,
                  scalars: Mapping[str, float]) -> None:
  with writer.as_default(step=step):
    for name, value in scalars.items():
      tf.summary.scalar(name, value)
  writer.flush()


def write_images(writer: tf.summary.SummaryWriter, step: int,
                 pngs: Mapping[str, bytes]) -> None:
  with writer.as_default(step=step):
    for name, png in pngs.items():
      tf.summary.image(name, tf.image.decode_png(png, channels=4)[tf.newaxis])
  writer.flush()


def write_text(writer: tf.summary.SummaryWriter, step: int, name: str,
               rows: Sequence[Sequence[str]]) -> None:
  """Writes a markdown table (e.g. source | reference | hypothesis) as text."""
  lines = [" | ".join(row) for row in rows]
  if len(lines) > 1:
    lines.insert(1, " | ".join(["---"] * len(rows[0])))
  with writer.as_default(step=step):
    tf.summary.text(name, "\n".join(lines))
  writer.flush()


def write_hparams(writer: tf.summary.SummaryWriter, flat_config: Mapping) -> None:
  """Records the run's hyperparameters for TensorBoard's HParams dashboard."""
  from tensorboard.plugins.hparams import api as hp
  allowed = (bool, int, float, str)
  hparams = {k: (v if isinstance(v, allowed) else str(v)) for k, v in flat_config.items()}
  with writer.as_default(step=0):
    hp.hparams(hparams)
  writer.flush()
