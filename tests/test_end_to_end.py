"""End to end: the tiny config learns the embedded task, logs to TensorBoard, resumes exactly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from configs import tiny

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An untrained model scores BLEU < 1 here and a model that has learnt only the most frequent
# words ("on", "at", "and") stays under 3; 5 needs correct ordered n-grams of numbers and
# dates, which a seeded 600-step run of configs/tiny.py (~1 CPU minute) reaches (~8).
BLEU_THRESHOLD = 5.0


def test_tiny_config_learns_the_embedded_task(tiny_run):
  _, _, summary = tiny_run
  assert summary["step"] == 600
  assert summary["eval"]["bleu"] > BLEU_THRESHOLD, summary["eval"]
  assert summary["losses"][-1] < 0.5 * summary["losses"][0]
  assert summary["compiled_lengths"] and set(summary["compiled_lengths"]) <= {12, 16, 24}


def _tags(directory):
  acc = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def test_event_files_hold_scalars_images_and_text(tiny_run):
  _, workdir, _ = tiny_run
  train_events = _tags(os.path.join(workdir, "train"))
  scalars = set(train_events.Tags()["tensors"])
  for name in ("loss", "perplexity", "learning_rate", "grad_norm", "target_tokens_per_sec",
               "examples_per_sec", "step_time_s", "input_wait_fraction", "compiled_shapes"):
    assert name in scalars, (name, scalars)
  eval_events = _tags(os.path.join(workdir, "eval"))
  tags = set(eval_events.Tags()["tensors"])
  assert {"bleu", "chrf", "loss", "samples"} <= tags, tags
  images = [t for t in tags if t.startswith("attention/")]
  assert images, tags
  png = eval_events.Tensors(images[0])[-1].tensor_proto.string_val[2]
  assert png.startswith(b"\x89PNG")


def test_checkpoints_and_best_checkpoint_are_kept(tiny_run):
  _, workdir, _ = tiny_run
  assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("-600")
  # checkpoints/best holds the evaluation with the highest dev BLEU (the first, on a tie).
  bleu = {event.step: tf.make_ndarray(event.tensor_proto).item()
          for event in _tags(os.path.join(workdir, "eval")).Tensors("bleu")}
  assert sorted(bleu) == [300, 600]
  best_step = max(sorted(bleu), key=bleu.get)
  best = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints", "best"))
  assert best.endswith(f"ckpt-{best_step}"), (best, bleu)


def _short_config(data_dir, steps):
  config = tiny.get_config()
  config.data.tfds_data_dir = data_dir
  config.data.eval_examples = 16
  config.tokenizer.sample_size = 5000  # A quarter of tiny's: enough for its 500 pieces.
  config.eval.beam_size = 1
  config.train.xla = "off"  # Compiling is slower than these 20 steps.
  config.train.update(steps=steps, steps_per_loop=5, log_every=5, checkpoint_every=10,
                      eval_every=1000)
  return config


_RESUME_SCRIPT = """
import json, shutil, sys
import tensorflow as tf
from tests.test_end_to_end import _short_config
from trainer import train
data_dir, root = sys.argv[1:]
one = tf.distribute.OneDeviceStrategy("/cpu:0")
losses = {}
for name, workdir, steps in (("straight", "straight", 20), ("first", "resumed", 10),
                             ("second", "resumed", 20)):
  config = _short_config(data_dir, steps)
  config.train.deterministic_ops = True
  config.model.dropout = 0.1  # Its masks must be redrawn exactly after the resume.
  summary = train.train_and_evaluate(config, root + "/" + workdir, one)
  losses[name] = dict(losses=summary["losses"], step=summary["step"])
  if name == "straight":  # One tokenizer for both runs: its training is not what is tested.
    shutil.copytree(root + "/straight/tokenizer", root + "/resumed/tokenizer")
print(json.dumps(losses))
"""


def test_stop_and_resume_reproduces_uninterrupted_losses(embedded_data_dir, tmp_path):
  # In a subprocess: op determinism is process-wide and would slow every later test.
  result = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, embedded_data_dir,
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = json.loads(result.stdout.strip().splitlines()[-1])
  assert runs["second"]["step"] == 20 and len(runs["second"]["losses"]) == 10
  np.testing.assert_allclose(runs["first"]["losses"] + runs["second"]["losses"],
                             runs["straight"]["losses"], rtol=1e-6)


@pytest.mark.parametrize("override,expected", [
    ("--config.data.train=csv:corpus.csv", "csv:corpus.csv"),
    ("--config.train.xla=everything", "config.train.xla='everything'"),
])
def test_nmt_train_bad_input_is_a_clear_error_not_a_traceback(tmp_path, override, expected):
  result = subprocess.run(
      [sys.executable, "-c", "from trainer.main import run_train; run_train()",
       "--config=configs/tiny.py", f"--workdir={tmp_path}", override],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "error:" in result.stderr and expected in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_nmt_eval_after_tiny_training_reports_bleu_above_threshold(tiny_run):
  _, workdir, summary = tiny_run
  result = subprocess.run(
      [sys.executable, "-c", "from trainer.main import run_eval; run_eval()",
       f"--workdir={workdir}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads(result.stdout.strip().splitlines()[-1])
  assert scores["step"] == 600
  assert scores["bleu"] > BLEU_THRESHOLD, scores
  assert abs(scores["bleu"] - summary["eval"]["bleu"]) < 1.0  # Same checkpoint and search.


def test_bleu_against_wall_clock_is_read_from_the_run(tiny_run, tmp_path):
  from benchmarks import bleu_vs_time
  _, workdir, summary = tiny_run
  curve = bleu_vs_time.run_curve(workdir)
  assert len(curve) == 2  # Evaluations at steps 300 and 600.
  assert 0 < curve[0][0] < curve[1][0] and curve[1][1] == pytest.approx(summary["eval"]["bleu"])
  tutorial = tmp_path / "tutorial.json"
  tutorial.write_text('{"steps": 10, "sec_per_step": 3.0, "bleu": 0.5}\n')
  bleu_vs_time.main([f"--runs=tiny={workdir}", f"--tutorial_json={tutorial}",
                     f"--output={tmp_path / 'plot.png'}"])
  assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
