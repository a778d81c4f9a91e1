"""Side-by-side benchmark orchestration (benchmarks/compare.py): tutorial vs project, plot."""
import os

import pytest

from benchmarks import compare


def test_plot_sweep_writes_a_png(tmp_path):
  runs = {"float32:off": [{"target_tokens_per_sec": 100.0, "mfu": 0.2},
                          {"target_tokens_per_sec": 180.0, "mfu": 0.3}]}
  path = str(tmp_path / "docs" / "plot.png")
  compare.plot_sweep(runs, [16, 32], path, "test")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_runs_both_systems_on_the_same_data(tmp_path):
  """Tiny sizes, and a stand-in for the tutorial that reports fixed rates."""
  tutorial = tmp_path / "tutorial.py"
  tutorial.write_text(
      "import json\n"
      "print(json.dumps({'target_tokens_per_sec': 90.0, 'sec_per_step': 2.0, 'batch': 8}))\n")
  config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py")
  result = compare.compare(str(tutorial), config, str(tmp_path / "work"), ["float32:off"],
                         words=4, pairs=200, vocab_words=40, tutorial_steps=1, num_steps=2,
                         units=16, embed_dim=8, batch_size=8)
  for name in ("fixed", "variable"):
    project = result[name]["project"]["float32:off"]
    assert result[name]["tutorial"]["sentences_per_sec"] == 4.0
    assert result[name]["sentences_per_sec_ratio"]["float32:off"] == pytest.approx(
        project["sentences_per_sec"] / 4.0)
    assert result[name]["pieces_per_word"] == pytest.approx(1.0)
  assert result["fixed"]["project"]["float32:off"]["batch_lengths"] == [6]
  table = compare.compare_table(result).splitlines()
  assert len(table) == 4 and table[3].startswith("| float32:off | ")
  ratio = result["fixed"]["sentences_per_sec_ratio"]["float32:off"]
  assert f"**{ratio:.2f}x**" in table[3]
