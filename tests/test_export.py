"""End to end on a workdir trained for a few steps: nmt-eval, nmt-translate, nmt-export,
and the errors a user meets (no checkpoint, another config's checkpoint, no --workdir)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from configs import tiny
from trainer import checkpoints
from trainer import evaluate
from trainer import export
from trainer import model as model_lib
from trainer import train
from conftest import cli
import word_pairs  # tests/word_pairs.py

pytestmark = pytest.mark.slow

LONG = " ".join(["one two three four five"] * 8)  # 40 words: over max_source_length.
SENTENCES = ["one two", "", "red cat", "blue house five", "漢字 ☃ ünknöwn", LONG]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model trained for 60 steps on a word-for-word TSV corpus (~30 s)."""
  tmp = tmp_path_factory.mktemp("run")
  word_pairs.write_tsv(tmp / "train.tsv", word_pairs.english_german(600, seed=0, max_words=6))
  word_pairs.write_tsv(tmp / "eval.tsv", word_pairs.english_german(40, seed=1, max_words=6))
  config = tiny.get_config()
  config.data.train, config.data.eval = f"tsv:{tmp / 'train.tsv'}", f"tsv:{tmp / 'eval.tsv'}"
  config.data.max_source_length = config.data.max_target_length = 24
  config.data.bucket_boundaries = (12, 16, 24)
  config.tokenizer.vocab_size = 40
  config.model.units, config.model.embed_dim = 64, 32
  config.train.update(batch_size=32, steps=60, steps_per_loop=10, log_every=20,
                      checkpoint_every=60, eval_every=60, learning_rate=1e-2,
                      warmup_steps=5, xla="off", precision="float32")
  config.distribute.strategy = "one_device"
  config.eval.beam_size = 2
  train.train_and_evaluate(config, str(tmp / "workdir"))
  return str(tmp / "workdir")


def _translate_in_process(workdir):
  loaded = checkpoints.load_for_inference(workdir, for_export=True)
  translate_ids = evaluate.make_translate_fn(loaded.model, loaded.config)
  hyps = evaluate.translate(translate_ids, loaded.tokenizer, SENTENCES, loaded.config)[0]
  return loaded, hyps


def test_export_reloads_with_only_tensorflow_text_and_translates_the_same(workdir,
                                                                          tmp_path):
  loaded, expected = _translate_in_process(workdir)
  assert any(expected) and expected[1] == ""
  export_dir = str(tmp_path / "export" / "1")
  export.export(loaded.config, loaded.tokenizer, loaded.model, export_dir)
  script = (
      "import json, sys\n"
      "import tensorflow as tf, tensorflow_text  # noqa\n"
      "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
      "out = serve(sources=tf.constant(json.loads(sys.argv[2])))\n"
      "text = lambda x: [text(y) for y in x] if isinstance(x, list) else x.decode()\n"
      "out = {k: v.numpy().tolist() if v.dtype == tf.float32 else text(v.numpy().tolist())\n"
      "       for k, v in out.items()}\n"
      "out['own'] = [m for m in sys.modules\n"
      "              if m.split('.')[0] in ('trainer', 'input_pipeline')]\n"
      "print(json.dumps(out))\n")
  result = subprocess.run([sys.executable, "-c", script, export_dir, json.dumps(SENTENCES)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out["own"] == []  # Loaded without the project's code.
  assert out["translations"] == expected
  for b, sentence in enumerate(SENTENCES):
    sources = [t for t in out["source_tokens"][b] if t]
    targets = [t for t in out["target_tokens"][b] if t]
    if not sentence:
      assert sources == targets == []
      continue
    assert sources[-1] == "</s>" and len(sources) <= loaded.config.data.max_source_length
    for row in out["attention_weights"][b][:len(targets)]:
      assert sum(row[:len(sources)]) == pytest.approx(1.0, abs=1e-4)


def test_translate_cli_round_trip_with_attention_pngs(workdir, tmp_path):
  _, expected = _translate_in_process(workdir)
  attention_dir = tmp_path / "attention"
  result = cli("run_translate", f"--workdir={workdir}", f"--attention_dir={attention_dir}",
               stdin="\n".join(SENTENCES) + "\n")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split("\n")[:-1] == expected  # One line out per line in.
  assert sorted(os.listdir(attention_dir)) == ["000001.png", "000003.png", "000004.png",
                                               "000005.png", "000006.png"]
  with open(attention_dir / "000001.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert result.stderr.count("Empty input lines (the first is line 2)") == 1
  assert re.search(r"line 6: \d+ tokens \+ EOS is longer than data.max_source_length=24",
                   result.stderr)


def test_eval_cli_prints_one_json_line(workdir):
  result = cli("run_eval", f"--workdir={workdir}", "--beam_size=1")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.strip())
  assert set(metrics) == {"bleu", "chrf", "loss", "examples", "checkpoint", "step"}
  assert metrics["examples"] == 40 and metrics["step"] == 60
  assert metrics["checkpoint"].endswith("ckpt-60") and metrics["loss"] < 3.0


def test_workdir_without_checkpoint(tmp_path):
  with pytest.raises(ValueError, match=f"no checkpoint in {tmp_path}; train first with "
                                       "nmt-train"):
    checkpoints.load_for_inference(str(tmp_path))


def test_missing_workdir_flag_is_named():
  result = cli("run_eval")
  assert result.returncode != 0
  assert "--workdir" in result.stderr


def test_checkpoint_of_another_config_says_which_key(workdir, tmp_path):
  other = tmp_path / "other"
  shutil.copytree(os.path.join(workdir, "tokenizer"), other / "tokenizer")
  config = checkpoints.load_config(workdir)
  config.model.units = 32
  checkpoints.save_config(config, str(other))
  checkpoint = checkpoints.find_checkpoint(workdir)
  with pytest.raises(ValueError, match=r"different config \(model.units: 64 vs 32"):
    checkpoints.load_for_inference(str(other), checkpoint)
  # The same, with the checkpoints copied next to the edited config.json.
  shutil.copytree(os.path.join(workdir, "checkpoints"), other / "checkpoints")
  with pytest.raises(ValueError, match=r"does not fit the model built from .*model.units=32"):
    checkpoints.load_for_inference(str(other))


def test_translator_with_a_compiled_step_decodes_on_the_grid_as_without(workdir):
  loaded = checkpoints.load_for_inference(workdir)
  loaded.config.train.xla = "decoder_step"  # The run had xla=off.
  model = model_lib.create_model(loaded.config, loaded.tokenizer.source_vocab_size,
                                 loaded.tokenizer.target_vocab_size)
  checkpoints.restore_model(model, loaded.checkpoint, loaded.config, workdir)
  translator = export.Translator(loaded.tokenizer, model, loaded.config)
  assert tuple(translator.grid) == (12, 16, 24)
  out = translator.serve(tf.constant(SENTENCES))
  # The same model, sources not padded.
  translate_ids = evaluate.make_translate_fn(model, loaded.config)
  expected = evaluate.translate(translate_ids, loaded.tokenizer, SENTENCES, loaded.config)
  assert [t.decode() for t in out["translations"].numpy()] == expected[0]
  assert out["attention_weights"].shape[-1] == out["source_tokens"].shape[-1] == max(
      len(source) for source in expected[3])
