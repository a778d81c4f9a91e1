"""Configs: every key is commented, documented in docs/config.md, and the configs validate.

`python -m tests.test_configs` (from the repository root) rewrites docs/config.md from the
comments in configs/default.py; run it after adding or changing a key.
"""
import json
import os
import re

import pytest
import tensorflow as tf

from configs import default, quickstart, tatoeba, tatoeba_long, tiny
from configs import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_REFERENCE = os.path.join(ROOT, "docs", "config.md")
SECTIONS = {"config": "", "data": "data.", "tok": "tokenizer.", "model": "model.",
            "train": "train.", "ev": "eval.", "dist": "distribute."}
REFERENCE_HEADER = """\
# Config reference

Generated from the comments in `configs/default.py` by `python -m tests.test_configs` (from the
repository root); `tests/test_configs.py` fails when they drift apart. `configs/quickstart.py`,
`configs/tatoeba.py`, `configs/tatoeba_long.py` and `configs/tiny.py` override a few of these.
Any key can be overridden on the command line: `--config.train.steps=200`.

| key | default | meaning |
|---|---|---|
"""


def reference_rows() -> dict:
  """Config-reference rows, key -> markdown row, from configs/default.py's comments."""
  rows = {}
  with open(os.path.join(ROOT, "configs", "default.py")) as f:
    for line in f:
      m = re.match(r"\s+(\w+)\.(\w+) = (.+?)  # (.+)$", line)
      if m and m.group(1) in SECTIONS:
        alias, key, value, comment = m.groups()
        comment = comment.replace("|", "\\|")
        rows[SECTIONS[alias] + key] = f"| `{SECTIONS[alias]}{key}` | `{value}` | {comment} |"
  return rows


def config_reference() -> str:
  """The whole of docs/config.md."""
  return REFERENCE_HEADER + "".join(row + "\n" for row in reference_rows().values())


def write_config_reference() -> None:
  with open(CONFIG_REFERENCE, "w", encoding="utf-8") as f:
    f.write(config_reference())


def _flat_keys(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flat_keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_config_key_has_a_comment_and_a_reference_row():
  rows = reference_rows()
  keys = set(_flat_keys(default.get_config()))
  assert keys == set(rows), (
      f"keys without a `  section.key = value  # comment` line in configs/default.py: "
      f"{sorted(keys - set(rows))}; rows for keys that do not exist: {sorted(set(rows) - keys)}")
  with open(CONFIG_REFERENCE, encoding="utf-8") as f:
    written = f.read()
  stale = [row for row in rows.values() if row not in written]
  assert written == config_reference(), (
      "docs/config.md is stale: regenerate it with `python -m tests.test_configs` from the "
      "repository root. Rows missing or changed:\n" + "\n".join(stale))


@pytest.mark.parametrize("module", [default, quickstart, tatoeba, tatoeba_long, tiny])
def test_configs_validate(module):
  validate.validate(module.get_config())


def test_the_long_recipe_is_tatoeba_with_only_its_documented_changes():
  """configs/tatoeba_long.py follows configs/tatoeba.py (data, schedule, batch) and changes
  only what the 2-hour runs measured (docs/real_corpora.md); a key drifting here would make
  its docstring's scores describe another recipe."""
  base, long = tatoeba.get_config().to_dict(), tatoeba_long.get_config().to_dict()
  changed = {f"{section}.{key}": (base[section][key], value)
             for section, values in long.items() if isinstance(values, dict)
             for key, value in values.items() if base[section][key] != value}
  assert changed == {
      "model.units": (256, 384), "model.embed_dim": (256, 384), "model.dropout": (0.0, 0.2),
      "train.ema_decay": (0.0, 0.999), "train.max_seconds": (0.0, 7200.0),
      "eval.beam_size": (4, 8), "eval.length_penalty": (0.6, 1.4)}


@pytest.mark.parametrize("key, value, message", [
    ("train.xla", "all", "must be one of auto | off | decoder_step | train_step"),
    ("train.precision", "fp8", "must be one of auto | float32"),
    ("train.steps_per_loop", 0, "must be an integer >= 1"),
    ("train.decay", "linear", "must be one of constant | rsqrt | cosine"),
    ("model.recurrence", "lstm", "must be one of auto | fused | keras | cudnn"),
    ("model.dropout", 1.0, "must be a number >= 0.0 and < 1.0"),
    ("eval.beam_size", 0, "must be an integer >= 1"),
    ("data.max_source_length", 1, "must be an integer >= 2"),
    ("data.bucket_boundaries", (8, 8, 64), "strictly increasing"),
    ("data.bucket_boundaries", (8, 16), "must end in a boundary >= max("),
    ("train.profile_steps", "10", "must be 'START,END'"),
    ("distribute.collective", "mpi", "must be one of auto | nccl | ring"),
])
def test_an_invalid_value_is_one_line_naming_key_and_value(key, value, message):
  config = tiny.get_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(validate.ConfigError) as e:
    validate.validate(config)
  assert str(e.value).startswith(f"config.{key}={value!r} is invalid: ")
  assert message in str(e.value) and "\n" not in str(e.value)


def test_cudnn_under_whole_step_xla_is_refused_on_every_device():
  config = tiny.get_config()
  config.model.recurrence, config.train.xla = "cudnn", "train_step"
  with pytest.raises(validate.ConfigError, match="XLA has no kernel for the cuDNN RNN op"):
    validate.validate(config)


def test_resume_check_reads_a_url_workdir(tmp_path):
  """A gs:// workdir is checked like a local one; TensorFlow's in-memory ram:// filesystem
  stands in for it (os.path would take either for a missing local directory)."""
  config = tiny.get_config()
  workdir = f"ram://{tmp_path.name}/run"
  tf.io.gfile.makedirs(f"{workdir}/checkpoints")
  saved = config.to_dict()
  saved["model"]["units"] = config.model.units * 2
  with tf.io.gfile.GFile(f"{workdir}/config.json", "w") as f:
    f.write(json.dumps(saved))
  validate.check_resume(config, workdir)  # No checkpoint yet: nothing to fit.
  with tf.io.gfile.GFile(f"{workdir}/checkpoints/ckpt-10.index", "w") as f:
    f.write("")
  with pytest.raises(validate.ConfigError,
                     match=rf"config.model.units={config.model.units} is invalid: the "
                     rf"checkpoints in {workdir} were trained with model.units="):
    validate.check_resume(config, workdir)


if __name__ == "__main__":
  write_config_reference()
  print(f"wrote {CONFIG_REFERENCE}")
