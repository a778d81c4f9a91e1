"""The progress line's durations (an ETA of a long run never wraps at 24 hours, nor outlives
train.max_seconds), and the TensorBoard tags a run writes."""
import pytest

from trainer import summaries


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00:00"),
    (74517, "20:41:57"),
    (86400 + 2705, "1d 00:45:05"),          # Was "00:45:05": the ETA wrapped at a day.
    (1_000_000 * 1.2, "13d 21:20:00"),       # 10^6 steps at 1.2 s/step.
])
def test_format_duration_counts_days(seconds, text):
  assert summaries.format_duration(seconds) == text


@pytest.mark.slow
def test_a_run_writes_the_tags_summaries_declares(tiny_run):
  """summaries.py chooses every tag (callers pass values): a run's event files hold
  exactly summaries.TAGS, besides the HParams plugin's own and the attention images."""
  import os
  import re
  from tensorboard.backend.event_processing import event_accumulator
  _, workdir, _ = tiny_run
  found = {}
  for run in ("train", "eval"):
    events = event_accumulator.EventAccumulator(os.path.join(workdir, run))
    events.Reload()
    found[run] = {t for t in events.Tags()["tensors"] if not t.startswith("_hparams_/")}
  attention = re.compile(summaries.ATTENTION_TAG.format(search="(greedy|beam)",
                                                        index=r"\d+") + "$")
  assert any(attention.match(t) for t in found["eval"]), found["eval"]
  found["eval"] = {t for t in found["eval"] if not attention.match(t)}
  # float32, constant decay: no loss scale, no fitted schedule.
  assert found == {"train": set(summaries.TAGS["train"]) - {"loss_scale", "schedule/end_step"},
                   "eval": set(summaries.TAGS["eval"])}


@pytest.mark.parametrize("budget_left_s, eta", [
    (None, "ETA 00:15:00"),                # 900 steps left at 1 s a step.
    (1000.0, "ETA 00:15:00"),              # The steps end first.
    (120.0, "ETA 00:02:00 (budget)"),      # train.max_seconds ends the run first.
])
def test_the_eta_is_the_sooner_of_the_steps_and_the_budget(monkeypatch, budget_left_s, eta):
  """A run with train.max_seconds stops at its budget: the progress line said the steps' ETA
  (hours past the end of a 2-hour run of 10^5 steps)."""
  times = [0.0, 0.0, 100.0]  # run_start, the window's start, the flush; then 100.0 on.
  monkeypatch.setattr(summaries.time, "time",
                      lambda: times.pop(0) if len(times) > 1 else times[0])
  lines = []
  monkeypatch.setattr(summaries.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  window = summaries.ProgressWindow(writer=None, start_step=0)
  window.add({"loss": [2.0] * 100, "tokens": [10.0] * 100, "examples": [1.0] * 100,
              "grad_norm": [1.0] * 100, "real_tokens": [9.0] * 100,
              "padded_tokens": [10.0] * 100, "length": [16] * 100}, input_wait=0.0)
  window.flush(100, 1000, learning_rate=1e-3, over_long_fraction=0.0,
               budget_left_s=budget_left_s)
  assert lines[-1].startswith("step 100/1000  loss 2.0000") and lines[-1].endswith(eta)
