"""What a run shows: TensorBoard writers' content (attention heatmaps as labelled PNGs,
scalars, text, hparams), the one-line progress log, and the profiler window.

The only module that names TensorBoard runs and tags: callers pass values, `TAGS` lists
what each run (a subdirectory of the workdir) holds.
"""
import io
import os
import time
from typing import Dict, List, Mapping, Optional, Sequence

from absl import logging
import ml_collections

import matplotlib

matplotlib.use("Agg")  # Off-screen: training machines have no display.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


EVAL_SCALARS = ("loss", "perplexity", "bleu", "chrf")  # Of the Evaluator's metrics.
TEST_SCALARS = ("bleu", "chrf", "loss")
ATTENTION_TAG = "attention/{search}/probe_{index}"
# Every tag a run writes, by TensorBoard run (workdir subdirectory), besides the HParams
# plugin's own. loss_scale only with train.precision=mixed_float16; schedule/end_step only
# with train.decay=cosine and train.max_seconds; test/ only with data.test; eval/ also
# holds ATTENTION_TAG for each search and probe sentence.
TAGS = {
    "train": ("loss", "perplexity", "grad_norm", "target_tokens_per_sec",
              "examples_per_sec", "step_time_s", "input_wait_fraction", "compiled_shapes",
              "learning_rate", "data/over_long_fraction", "data/padding_fraction", "loss_scale",
              "eval_time_fraction", "elapsed_s", "schedule/end_step"),
    "eval": EVAL_SCALARS + ("samples",),
    "test": TEST_SCALARS,
}


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


def create_writers(workdir: str) -> Dict[str, tf.summary.SummaryWriter]:
  """The run's train/ and eval/ writers (create once per run, on the chief only)."""
  return {run: tf.summary.create_file_writer(os.path.join(workdir, run))
          for run in ("train", "eval")}


def write_eval(writer: tf.summary.SummaryWriter, step: int, metrics: Mapping[str, float],
               attention: Mapping[str, Sequence[bytes]],
               samples: Sequence[Sequence[str]]) -> None:
  """One evaluation: its loss, perplexity, BLEU and chrF; the probe sentences' attention
  PNGs by search ("greedy", "beam"); the sample (source, reference, translation) rows."""
  _write_scalars(writer, step, {k: metrics[k] for k in EVAL_SCALARS})
  for search, pngs in attention.items():
    _write_images(writer, step, {ATTENTION_TAG.format(search=search, index=i): png
                                 for i, png in enumerate(pngs)})
  _write_text(writer, step, "samples",
              [("source", "reference", "translation")] + list(samples))


def write_time(writer: tf.summary.SummaryWriter, step: int, eval_time_fraction: float,
               elapsed_s: float) -> None:
  """After each evaluation (train/): for dev BLEU against wall-clock time."""
  _write_scalars(writer, step, {"eval_time_fraction": eval_time_fraction,
                                "elapsed_s": elapsed_s})


def write_schedule(writer: tf.summary.SummaryWriter, step: int, end_step: int) -> None:
  """The cosine schedule's end fitted to train.max_seconds (in updates), when fitted."""
  _write_scalars(writer, step, {"schedule/end_step": end_step})


def write_test(workdir: str, step: int, metrics: Mapping[str, float]) -> None:
  """The final test-set scores, in their own run (test/)."""
  writer = tf.summary.create_file_writer(os.path.join(workdir, "test"))
  _write_scalars(writer, step, {k: metrics[k] for k in TEST_SCALARS})
  writer.close()


def _write_scalars(writer: tf.summary.SummaryWriter, step: int,
                   scalars: Mapping[str, float]) -> None:
  with writer.as_default(step=step):
    for name, value in scalars.items():
      tf.summary.scalar(name, value)
  writer.flush()


def _write_images(writer: tf.summary.SummaryWriter, step: int,
                  pngs: Mapping[str, bytes]) -> None:
  with writer.as_default(step=step):
    for name, png in pngs.items():
      tf.summary.image(name, tf.image.decode_png(png, channels=4)[tf.newaxis])
  writer.flush()


def _write_text(writer: tf.summary.SummaryWriter, step: int, name: str,
                rows: Sequence[Sequence[str]]) -> None:
  """Writes a markdown table (e.g. source | reference | hypothesis) as text."""
  lines = [" | ".join(row) for row in rows]
  if len(lines) > 1:
    lines.insert(1, " | ".join(["---"] * len(rows[0])))
  with writer.as_default(step=step):
    tf.summary.text(name, "\n".join(lines))
  writer.flush()


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> Dict:
  """{"train.steps": 600, ...}: the config as one flat dict of dotted keys."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_hparams(writer: tf.summary.SummaryWriter, config: ml_collections.ConfigDict
                  ) -> None:
  """Records the run's hyperparameters for TensorBoard's HParams dashboard."""
  from tensorboard.plugins.hparams import api as hp
  allowed = (bool, int, float, str)
  hparams = {k: (v if isinstance(v, allowed) else str(v))
             for k, v in flatten(config).items()}
  with writer.as_default(step=0):
    hp.hparams(hparams)
  writer.flush()


def format_duration(seconds: float) -> str:
  """"HH:MM:SS", with days in front past 24 hours ("3d 04:05:06"): an ETA never wraps."""
  seconds = max(int(seconds), 0)
  days, rest = divmod(seconds, 86400)
  clock = time.strftime("%H:%M:%S", time.gmtime(rest))
  return f"{days}d {clock}" if days else clock


class ProgressWindow:
  """The metrics of the steps since the last progress line; `flush` logs one line and
  writes the scalars (train/ in TensorBoard)."""

  # Per-step, from train_loop.
  STEP_KEYS = ("loss", "tokens", "examples", "grad_norm", "real_tokens", "padded_tokens")

  def __init__(self, writer, start_step: int):
    self.writer, self.start_step = writer, start_step
    self.run_start = time.time()
    self.compiled_lengths = set()
    self.reset()

  def reset(self) -> None:
    """Starts a new window (also after an eval: eval time is not training time)."""
    self.values = {k: [] for k in self.STEP_KEYS + ("input_wait",)}
    self.start = time.time()

  def add(self, out: Mapping[str, List[float]], input_wait: float) -> None:
    for k in self.STEP_KEYS:
      self.values[k] += out[k]
    self.values["input_wait"].append(float(input_wait))
    self.compiled_lengths.update(int(x) for x in out["length"])

  def flush(self, step: int, total: int, learning_rate: float, over_long_fraction: float,
            loss_scale: Optional[float] = None,
            budget_left_s: Optional[float] = None) -> Dict[str, float]:
    """Logs `step N/total  loss ...  ETA` and writes the window's scalars, the learning
    rate, the share of examples over the length limits and the fp16 loss scale (if any).
    `budget_left_s`: what is left of train.max_seconds; the ETA is the sooner of the steps'
    and the budget's end, marked "(budget)" when the budget ends the run first (a 2-hour run
    of 10^5 steps said "ETA 06:49:06" while it had 1:58 left)."""
    now, window = time.time(), self.values
    elapsed = now - self.start
    tokens, examples = sum(window["tokens"]), sum(window["examples"])
    loss = float(np.sum(np.array(window["loss"]) * np.array(window["tokens"])) /
                 max(tokens, 1.0))
    scalars = {
        "loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
        "grad_norm": float(np.mean(window["grad_norm"])),
        "target_tokens_per_sec": tokens / elapsed, "examples_per_sec": examples / elapsed,
        "step_time_s": elapsed / len(window["loss"]),
        "input_wait_fraction": sum(window["input_wait"]) / elapsed,
        "compiled_shapes": len(self.compiled_lengths), "learning_rate": learning_rate,
        "data/over_long_fraction": over_long_fraction,
        # The share of the batches' cells (source and target) that are padding.
        "data/padding_fraction": 1.0 - sum(window["real_tokens"]) / max(
            sum(window["padded_tokens"]), 1.0),
    }
    if loss_scale is not None:
      scalars["loss_scale"] = loss_scale
    eta_s = (total - step) * (now - self.run_start) / max(step - self.start_step, 1)
    eta = format_duration(eta_s)
    if budget_left_s is not None and budget_left_s < eta_s:
      eta = format_duration(budget_left_s) + " (budget)"
    logging.info("step %d/%d  loss %.4f  %.0f tok/s  %.1f ex/s  %.3f s/step  pad %.0f%%  "
                 "ETA %s", step, total, loss, scalars["target_tokens_per_sec"],
                 scalars["examples_per_sec"], scalars["step_time_s"],
                 100 * scalars["data/padding_fraction"], eta)
    if self.writer:
      _write_scalars(self.writer, step, scalars)
    self.reset()
    return scalars


class Profiler:
  """Records a TensorBoard profiler trace for config.train.profile_steps='START,END'
  (into the train/ run of `workdir`)."""

  def __init__(self, spec: str, workdir: str):
    self.window = tuple(int(x) for x in spec.split(",")) if spec else None
    self.logdir, self.on, self.done = os.path.join(workdir, "train"), False, False

  def update(self, step: int) -> None:
    """Call before each loop call: starts the trace at START, stops it at END."""
    if self.window is None:
      return
    start, end = self.window
    if not self.on and not self.done and start <= step < end:
      tf.profiler.experimental.start(self.logdir)
      self.on = True
    elif self.on and step >= end:
      self.stop()

  def stop(self) -> None:
    if self.on:
      tf.profiler.experimental.stop()
      self.on, self.done = False, True
