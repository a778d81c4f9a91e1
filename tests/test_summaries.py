"""The progress line's durations (an ETA of a long run never wraps at 24 hours), and the
TensorBoard tags a run writes."""
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
