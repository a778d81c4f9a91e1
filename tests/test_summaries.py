"""The progress line's durations: an ETA of a long run never wraps at 24 hours."""
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
