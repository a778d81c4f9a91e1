"""Tests for input_pipeline/benchmark.py on a small generated tsv corpus."""
import pytest

from configs import tiny
from input_pipeline import benchmark


def test_run_reports_rates_and_grid_shapes(tmp_path):
  words = "one two three four five six seven eight nine ten eleven twelve".split()
  lines = [f"{' '.join(words[i % 12:i % 12 + 1 + i % 5])}\t{words[i % 12]} {i}\n"
           for i in range(400)]
  (tmp_path / "pairs.tsv").write_text("".join(lines), encoding="utf-8")
  config = tiny.get_config()
  config.data.train = config.data.eval = f"tsv:{tmp_path / 'pairs.tsv'}"
  config.tokenizer.vocab_size = 40
  config.data.shuffle_buffer = 50
  config.train.batch_size = 8

  result = benchmark.run(config, str(tmp_path / "workdir"), num_batches=5, warmup_batches=1)

  assert result["num_batches"] == 5
  # Rates over the timed seconds: 5 batches of 8 pairs; a target is 2+ tokens (words, EOS).
  assert result["examples_per_sec"] * result["seconds"] == pytest.approx(5 * 8)
  assert result["target_tokens_per_sec"] >= 2 * result["examples_per_sec"]
  assert 0.0 < result["padding_fraction"] < 1.0  # 0 would mean padding counted as tokens.
  assert result["distinct_batch_shapes"] == len(result["batch_shapes"]) >= 1
  assert all(b == 8 and length in (12, 16, 24) for b, length in result["batch_shapes"])
