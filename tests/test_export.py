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
from trainer import export
from trainer import model as model_lib
from trainer import train
from trainer import translate
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
  translate_ids = translate.make_translate_fn(loaded.model, loaded.config)
  hyps = translate.translate(translate_ids, loaded.tokenizer, SENTENCES, loaded.config)[0]
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
    assert sources[-1] == "</s>"
    if sentence == LONG:
      assert len(sources) > loaded.config.data.max_source_length  # Not cut.
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
  assert re.search(r"line 6: \d+ tokens \+ EOS is longer than the data.max_source_length=24 "
                   r"this model was trained with; translated whole", result.stderr)


def test_eval_cli_prints_one_json_line(workdir):
  result = cli("run_eval", f"--workdir={workdir}", "--beam_size=2", "--no_ema",
               "--examples=25", "--length_penalty=1.5")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.strip())
  assert set(metrics) == {"bleu", "chrf", "loss", "loss_pairs", "loss_dropped", "examples",
                          "checkpoint", "step", "ema", "beam_size", "length_penalty"}
  assert metrics["examples"] == 25 and metrics["step"] == 60 and metrics["ema"] is False
  assert (metrics["beam_size"], metrics["length_penalty"]) == (2, 1.5)  # The search used.
  assert metrics["checkpoint"].endswith("ckpt-60") and metrics["loss"] < 3.0


def test_eval_cli_scores_all_of_a_named_corpus_unless_told(workdir, tmp_path):
  # 250 pairs, more than tiny.py's data.eval_examples=200 (the cut of in-training evals),
  # and one longer than tiny's data.max_source_length=24: translated, left out of the loss.
  pairs = word_pairs.english_german(250, seed=2, max_words=3)
  pairs.insert(100, (" ".join(["dog"] * 40), "Hund"))
  word_pairs.write_tsv(tmp_path / "test.tsv", pairs)
  result = cli("run_eval", f"--workdir={workdir}", "--beam_size=1", "--no_ema",
               f"--data=tsv:{tmp_path / 'test.tsv'}")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads(result.stdout.strip())
  assert (metrics["examples"], metrics["loss_pairs"], metrics["loss_dropped"]) == (251, 250, 1)


def test_workdir_without_checkpoint(tmp_path):
  with pytest.raises(ValueError, match=f"no checkpoint in {tmp_path}; train first with "
                                       "nmt-train"):
    checkpoints.load_for_inference(str(tmp_path))


def test_missing_workdir_flag_is_named():
  result = cli("run_eval")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "error: flag --workdir=None" in result.stderr, result.stderr[-2000:]


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
  translate_ids = translate.make_translate_fn(model, loaded.config)
  expected = translate.translate(translate_ids, loaded.tokenizer, SENTENCES, loaded.config)
  assert [t.decode() for t in out["translations"].numpy()] == expected[0]
  assert out["attention_weights"].shape[-1] == out["source_tokens"].shape[-1] == max(
      len(source) for source in expected[3])


def test_translate_cli_n_best_with_scores_and_alignments(workdir):
  """--n_best=2 --alignments: Moses n-best lines "LINE ||| TEXT ||| SCORE ||| LINKS", two
  per input line, best first; the first is the plain translation; links are Pharaoh pairs
  of source and target word positions."""
  _, expected = _translate_in_process(workdir)
  inputs = SENTENCES[:4]
  result = cli("run_translate", f"--workdir={workdir}", "--n_best=2", "--alignments",
               stdin="\n".join(inputs) + "\n")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line.split(" ||| ") for line in result.stdout.splitlines()]
  assert [int(fields[0]) for fields in lines] == [0, 0, 1, 1, 2, 2, 3, 3]
  for number, sentence in enumerate(inputs):
    best, second = lines[2 * number], lines[2 * number + 1]
    if not sentence:
      assert best[1:] == second[1:] == ["", "nan", ""]
      continue
    assert best[1] == expected[number] and second[1] != best[1]
    assert float(best[2]) >= float(second[2])
    for fields in (best, second):
      links = [tuple(map(int, link.split("-"))) for link in fields[3].split()]
      assert links and all(0 <= i < len(sentence.split()) and 0 <= j < len(fields[1].split())
                           for i, j in links), fields
  too_many = cli("run_translate", f"--workdir={workdir}", "--n_best=3", stdin="one\n")
  assert too_many.returncode == 1
  assert "error: --n_best=3 needs --beam_size >= 3 (the beam size is 2)" in too_many.stderr


def test_score_file_ranks_the_models_translation_above_a_wrong_one(workdir, tmp_path):
  """nmt-score's log P(target | source): the model's own beam output is likelier than a
  wrong target; per token is log P / tokens; a line that is not a pair scores nan, in
  place, and is counted."""
  loaded, hyps = _translate_in_process(workdir)
  pairs = [("one two", hyps[0]), ("one two", "blau haus"), ("no tab here", None),
           ("red cat", hyps[2])]
  path = tmp_path / "pairs.tsv"
  path.write_text("".join(f"{s}\t{t}\n" if t is not None else f"{s}\n" for s, t in pairs),
                  encoding="utf-8")
  output = tmp_path / "scores.txt"
  counts = translate.score_file(translate.make_score_fn(loaded.model), loaded.tokenizer,
                                loaded.config, str(path), str(output))
  assert counts == {"scored": 3, "unscorable": 1}
  rows = [line.split("\t") for line in output.read_text(encoding="utf-8").splitlines()]
  assert len(rows) == 4 and rows[2] == ["nan", "nan", "0"]
  (own, own_per_token, own_tokens), (wrong, _, _) = [
      (float(a), float(b), int(c)) for a, b, c in (rows[0], rows[1])]
  assert own > wrong and own < 0
  assert own_per_token == pytest.approx(own / own_tokens, abs=1e-3)
  # The translation's beam score is the same log P divided by its length penalty.
  lp = float(translate.decode.length_penalty(own_tokens, loaded.config.eval.length_penalty))
  ids, _, scores = translate.make_translate_fn(loaded.model, loaded.config)(
      translate.encode_sources(loaded.tokenizer, ["one two"]))
  assert float(scores[0, 0]) == pytest.approx(own / lp, abs=1e-3)


def test_bench_translate_prints_speed_and_latency(workdir, tmp_path):
  source = tmp_path / "in.txt"
  source.write_text("\n".join(SENTENCES * 6) + "\n", encoding="utf-8")
  result = cli("run_bench", "translate", f"--workdir={workdir}", f"--input={source}")
  assert result.returncode == 0, result.stderr[-3000:]
  speed = json.loads(result.stdout.strip().splitlines()[-1])
  assert speed["sentences"] == 36 and speed["beam_size"] == 2
  assert speed["sentences_per_sec"] == pytest.approx(36 / speed["file_seconds"])
  for size, requests in ((1, 36), (32, 2)):
    latency = speed["saved_model"][f"batch_{size}"]
    assert latency["requests"] == requests
    assert 0 < latency["p50_ms"] <= latency["p95_ms"]
