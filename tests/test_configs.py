"""Configs: every key is commented, documented in the README, and the configs validate."""
import os
import re

import pytest

from configs import default, quickstart, tiny
from input_pipeline import corpora
from trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = {"config": "", "data": "data.", "tok": "tokenizer.", "model": "model.",
            "train": "train.", "ev": "eval.", "dist": "distribute."}


def reference_rows():
  """README config-reference rows generated from configs/default.py's comments."""
  rows = {}
  with open(os.path.join(ROOT, "configs", "default.py")) as f:
    for line in f:
      m = re.match(r"\s+(\w+)\.(\w+) = (.+?)  # (.+)$", line)
      if m and m.group(1) in SECTIONS:
        alias, key, value, comment = m.groups()
        comment = comment.replace("|", "\\|")
        rows[SECTIONS[alias] + key] = f"| `{SECTIONS[alias]}{key}` | `{value}` | {comment} |"
  return rows


def _flat_keys(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flat_keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_config_key_has_a_comment_and_a_readme_row():
  rows = reference_rows()
  assert set(_flat_keys(default.get_config())) == set(rows)
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  missing = [row for row in rows.values() if row not in readme]
  assert not missing, "README config reference is stale; regenerate it:\n" + "\n".join(missing)


@pytest.mark.parametrize("module", [default, quickstart, tiny])
def test_configs_validate(module):
  config = module.get_config()
  corpora.validate_data_config(config.data)
  train.validate_train_config(config)
