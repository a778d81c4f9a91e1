"""Tests of input_pipeline/prepare_beam.py: nmt-prepare on Apache Beam writes the directory
the single process writes (same manifest, same shards byte for byte), reports bad input the
same way, leaves no manifest when its job fails, and the prepared reader resumes on it."""
import gzip
import json
import logging
import os

import pytest

from conftest import cli
from input_pipeline import datasets
from input_pipeline import prepare
from input_pipeline import prepared
import test_prepared  # tests/test_prepared.py: its corpus, config and resume test.
from test_prepared import tokenizer  # noqa: F401  (the fixture, on this module's corpus)
import word_pairs  # tests/word_pairs.py

_IN_PROCESS = prepare.beam_args(1, "")  # FnApiRunner running the workers' code in-process.
# Worker threads (quicker to start than processes): with more workers than files, each
# file is read in parts, as by worker processes.
_TWO_THREADS = prepare.beam_args(2, "direct_running_mode=multi_threading")
_FOUR_THREADS = prepare.beam_args(4, "direct_running_mode=multi_threading")


def _without_created(manifest: dict) -> dict:
  return {key: value for key, value in manifest.items() if key != "created"}


def _write_corpus(root, bad_lines=1):
  """Two train files (one with `bad_lines` lines without a tab) and an eval file."""
  pairs = [f"{src}\t{tgt}\n" for src, tgt in word_pairs.make_pairs(600)]
  lines = pairs[:300] + ["a line without a tab\n"] * bad_lines + pairs[300:400]
  (root / "train-a.tsv").write_text("".join(lines), encoding="utf-8")
  (root / "train-b.tsv").write_text("".join(pairs[400:]), encoding="utf-8")
  (root / "eval.tsv").write_text("".join(pairs[:120]), encoding="utf-8")
  return word_pairs.pipeline_config(f"tsv:{root}/train-*.tsv", f"tsv:{root / 'eval.tsv'}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """test_prepared's corpus, prepared through Beam in 50-example shards: (config, dir)."""
  root = tmp_path_factory.mktemp("beam")
  lines = [f"{src}\t{tgt}\n" for src, tgt in word_pairs.make_pairs(test_prepared._NUM_PAIRS)]
  lines.insert(100, "a line without a tab\n")
  (root / "pairs.tsv").write_text("".join(lines), encoding="utf-8")
  (root / "eval.tsv").write_text("".join(lines[:120]), encoding="utf-8")
  config = word_pairs.pipeline_config(f"tsv:{root / 'pairs.tsv'}", f"tsv:{root / 'eval.tsv'}")
  prepare.prepare(config, str(root / "data"), shard_examples=50, runner="direct",
                  beam_options=_TWO_THREADS)
  return config, str(root / "data")


# The exact-resume test of test_prepared.py, on the Beam-prepared directory (this module's
# `corpus` and `tokenizer` fixtures).
test_resume_on_a_beam_prepared_directory = (
    test_prepared.test_resume_at_any_step_gives_the_uninterrupted_batches)


def test_beam_writes_what_the_single_process_writes(tmp_path):
  """Two files, one bad line, 50-example shards: the same manifest (counts, skipped lines
  per file, every shard's examples per length, sizes and sha256) from both paths."""
  config = _write_corpus(tmp_path)
  single = prepare.prepare(config, str(tmp_path / "single"), shard_examples=50)
  beam = prepare.prepare(config, str(tmp_path / "beam"), shard_examples=50,
                         runner="direct", beam_options=_TWO_THREADS)
  assert _without_created(beam) == _without_created(single)
  train = beam["splits"]["train"]
  assert train["per_file"][str(tmp_path / "train-a.tsv")] == {"read": 400,
                                                         "skipped": {"too few columns": 1}}
  assert len(train["shards"]) >= 2 * prepared.GROUP_SHARDS
  assert not [name for name in os.listdir(tmp_path / "beam") if name.endswith(".tmp")]


@pytest.mark.slow
def test_cli_with_two_worker_processes_and_a_holdout_dev_set(tmp_path):
  """nmt-prepare --runner=direct --direct_num_workers=2 (worker processes), with
  data.eval=holdout:40: the single process's directory, byte for byte."""
  config = _write_corpus(tmp_path)
  config.data.eval = "holdout:40"
  single = prepare.prepare(config, str(tmp_path / "single"), shard_examples=50)
  result = cli("run_prepare", "--config=configs/tiny.py", f"--output_dir={tmp_path / 'beam'}",
               "--runner=direct", "--direct_num_workers=2", "--shard_examples=50",
               f"--config.data.train={config.data.train}", "--config.data.eval=holdout:40",
               "--config.data.max_source_length=16", "--config.data.max_target_length=16",
               "--config.data.bucket_boundaries=(6, 10, 16, 24)",
               "--config.data.shuffle_buffer=100", "--config.tokenizer.vocab_size=60",
               timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line["eval"]["length_filter"]["seen"] == single["splits"]["eval"]["length_filter"][
      "seen"]
  beam = prepared.load_manifest(str(tmp_path / "beam"))
  assert _without_created(beam) == _without_created(single)


@pytest.mark.parametrize("options", [_IN_PROCESS, _FOUR_THREADS],
                         ids=["file read whole", "file read in two parts"])
def test_too_many_bad_lines_fail_the_job_naming_file_and_line(tmp_path, options):
  """More than data.max_skip_fraction of a file skipped: one CorpusError naming the file,
  the counts and the first bad line (from the worker reading the whole file, or from the
  sums of the parts); no manifest; once fixed, the same directory is prepared."""
  config = _write_corpus(tmp_path, bad_lines=5)
  output_dir = str(tmp_path / "out")
  with pytest.raises(datasets.CorpusError) as error:
    prepare.prepare(config, output_dir, shard_examples=50, runner="direct",
                    beam_options=options)
  message = str(error.value)
  assert message.startswith(f"{tmp_path / 'train-a.tsv'}: 5 of 405 lines skipped as "
                            f"malformed (5 too few columns), more than "
                            f"data.max_skip_fraction"), message
  assert f"the first: {tmp_path / 'train-a.tsv'}:301: 1 tab-separated columns" in message
  assert "\n" not in message and "Traceback" not in message
  assert not os.path.exists(os.path.join(output_dir, prepared.MANIFEST))
  with pytest.raises(prepared.PreparedDataError, match="manifest.json does not exist"):
    prepared.load_manifest(output_dir)
  _write_corpus(tmp_path, bad_lines=1)
  manifest = prepare.prepare(config, output_dir, shard_examples=50, runner="direct",
                             beam_options=options)
  assert manifest["splits"]["train"]["skipped"] == {"too few columns": 1}
  assert not [name for name in os.listdir(output_dir) if name.endswith(".tmp")]


def test_a_truncated_file_fails_the_job_naming_it(tmp_path):
  """A .gz file cut short: its first chunk reads (the job starts), the worker then fails;
  the error names the file, no manifest is written."""
  config = _write_corpus(tmp_path)
  lines = "".join(f"{src}\t{tgt}\n" for src, tgt in word_pairs.make_pairs(20000, seed=3))
  data = gzip.compress(lines.encode(), mtime=0)
  (tmp_path / "train-c.tsv.gz").write_bytes(data[:len(data) * 3 // 4])
  config.data.train = f"tsv:{tmp_path}/train-*.tsv*"
  with pytest.raises(datasets.CorpusError, match=rf"^{tmp_path / 'train-c.tsv.gz'}: cannot "
                                                 r"read the file"):
    prepare.prepare(config, str(tmp_path / "out"), runner="direct", beam_options=_IN_PROCESS)
  assert not os.path.exists(tmp_path / "out" / prepared.MANIFEST)


def test_without_beam_one_process_prepares_and_says_how_to_get_more(tmp_path, monkeypatch,
                                                                     caplog):
  real_find_spec = prepare.importlib.util.find_spec
  monkeypatch.setattr(prepare.importlib.util, "find_spec",
                      lambda name, *args: None if name == "apache_beam"
                      else real_find_spec(name, *args))
  # The absl logger's own level: an earlier test's flag parsing may have raised it.
  caplog.set_level(logging.INFO, logger="absl")
  assert prepare.default_runner() == prepare.SINGLE_PROCESS
  assert "pip install -e '.[beam]'" in caplog.text
  config = _write_corpus(tmp_path)
  with pytest.raises(ValueError, match=r"--runner=direct needs Apache Beam, which is not "
                                       r"installed: pip install -e '.\[beam\]'"):
    prepare.prepare(config, str(tmp_path / "out"), runner="direct")


def test_beam_pipeline_options_are_key_value_pairs():
  assert prepare.beam_args(4, "project=p, region=europe-west1,--temp_location=gs://b/t") == [
      "--direct_num_workers=4", "--project=p", "--region=europe-west1",
      "--temp_location=gs://b/t"]
  with pytest.raises(ValueError, match="'project' is not KEY=VALUE"):
    prepare.beam_args(1, "project")
