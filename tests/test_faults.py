"""Fault injection (issue 13): every fault leaves a resumable run, every bad input one line.

One tiny run (20 steps on a word-for-word TSV corpus, checkpoints at 10 and 20) is trained
once; tests that corrupt it work on a copy. CLI behaviour (exit codes, one `error:` line,
signals, a second trainer) runs in subprocesses, the rest in-process.
"""
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from configs import tiny
from input_pipeline import datasets
from input_pipeline import tokenizer as tokenizer_lib
from trainer import checkpoints
from trainer import evaluate
from trainer import main
from trainer import train
from trainer import translate
from conftest import cli, REPO
import word_pairs  # tests/word_pairs.py

pytestmark = pytest.mark.slow


def _write_tsv(path, n, seed, bad=0):
  """n English -> German word pairs of 1-5 words, then `bad` lines with one column only."""
  return word_pairs.write_tsv(path, word_pairs.english_german(n, seed, max_words=5), bad)


def _overrides(data_dir) -> dict:
  """configs/tiny.py shrunk to seconds: the same keys in-process and as CLI flags."""
  return {"data.train": f"tsv:{data_dir}/train.tsv", "data.eval": f"tsv:{data_dir}/eval.tsv",
          "tokenizer.vocab_size": 40, "model.units": 32, "model.embed_dim": 16,
          "train.batch_size": 32, "train.steps": 20, "train.steps_per_loop": 10,
          "train.log_every": 10, "train.checkpoint_every": 10, "train.eval_every": 20,
          "train.xla": "off", "train.warmup_steps": 5, "eval.beam_size": 1,
          "eval.num_probes": 0, "distribute.strategy": "one_device"}


def _config(data_dir, **changes):
  config = tiny.get_config()
  for key, value in {**_overrides(data_dir), **changes}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _flags(data_dir, **changes):
  return ["--config=configs/tiny.py"] + [
      f"--config.{k}={v}" for k, v in {**_overrides(data_dir), **changes}.items()]


def _error_lines(stderr: str):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(data dir, workdir) of the tiny run, trained once: checkpoints at steps 10 and 20."""
  data = tmp_path_factory.mktemp("data")
  _write_tsv(data / "train.tsv", 400, seed=0)
  _write_tsv(data / "eval.tsv", 30, seed=1)
  workdir = str(tmp_path_factory.mktemp("run") / "workdir")
  train.train_and_evaluate(_config(data), workdir)
  return str(data), workdir


@pytest.fixture
def copy(run, tmp_path):
  """A copy of the trained workdir, free to corrupt."""
  shutil.copytree(run[1], tmp_path / "workdir")
  return str(tmp_path / "workdir")


def _tree_digest(directory):
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


# Divergence guard (row 1) -------------------------------------------------------------------

def test_huge_learning_rate_stops_with_one_line_and_keeps_the_last_checkpoint(run, copy):
  config = _config(run[0], **{"train.steps": 40, "train.learning_rate": 1e35,
                              "train.max_nonfinite_steps": 3})
  with pytest.raises(FloatingPointError, match=r"non-finite losses in a row.*"
                                               r"config.train.max_nonfinite_steps=3"):
    train.train_and_evaluate(config, copy)
  assert checkpoints.find_checkpoint(copy).endswith("ckpt-20")  # Nothing diverged saved.


def test_final_json_line_is_strict():
  line = main._strict_json({"eval": {"loss": float("nan"), "bleu": float("inf")}, "step": 3})
  assert json.loads(line) == {"eval": {"loss": None, "bleu": None}, "step": 3}


# Checkpoints (rows 2, 3, 15) ----------------------------------------------------------------

def _truncate_data(prefix):
  path = prefix + ".data-00000-of-00001"
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty_index(prefix):
  open(prefix + ".index", "wb").close()


def _random_index(prefix):
  with open(prefix + ".index", "wb") as f:
    f.write(random.Random(0).randbytes(300))


@pytest.mark.parametrize("corrupt", [_truncate_data, _empty_index, _random_index])
def test_broken_latest_checkpoint_is_reported_and_the_previous_used(copy, corrupt, caplog):
  """nmt-eval, nmt-translate and nmt-export all load through load_for_inference."""
  corrupt(os.path.join(copy, "checkpoints", "ckpt-20"))
  caplog.set_level(logging.WARNING, logger="absl")
  loaded = checkpoints.load_for_inference(copy)
  assert loaded.step == 10
  assert "ckpt-20 does not read" in caplog.text and "different config" not in caplog.text


def test_no_readable_checkpoint_is_one_clear_error(copy):
  for step in (10, 20):
    _empty_index(os.path.join(copy, "checkpoints", f"ckpt-{step}"))
  with pytest.raises(ValueError, match="no checkpoint reads: .*ckpt-20 .*ckpt-10"):
    checkpoints.load_for_inference(copy)


def test_training_resumes_from_the_newest_intact_checkpoint_and_drops_temp_dirs(run, copy):
  _truncate_data(os.path.join(copy, "checkpoints", "ckpt-20"))
  os.makedirs(os.path.join(copy, "checkpoints", "ckpt-30_temp"))  # kill -9 during a save.
  summary = train.train_and_evaluate(_config(run[0]), copy)
  assert summary["step"] == 20 and len(summary["losses"]) == 10  # Resumed at 10.
  assert not [p for p in os.listdir(os.path.join(copy, "checkpoints")) if "_temp" in p]
  assert checkpoints.load_for_inference(copy).step == 20  # Rewritten, intact.


class _FakeManager:
  """A CheckpointManager whose save fails as on a full disk, after writing partial files."""

  def __init__(self, directory, latest):
    self.directory, self.latest_checkpoint = directory, latest

  def save(self, checkpoint_number):
    os.makedirs(os.path.join(self.directory, f"ckpt-{checkpoint_number}_temp"))
    open(os.path.join(self.directory, f"ckpt-{checkpoint_number}.index"), "wb").close()
    raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")


def test_failed_save_is_one_line_naming_the_path_and_leaves_no_partial_files(copy):
  directory = os.path.join(copy, "checkpoints")
  with pytest.raises(OSError, match=rf"cannot save checkpoint {directory}/ckpt-30 .*No space "
                                    rf"left on device.*ckpt-20 is intact"):
    checkpoints.save(_FakeManager(directory, os.path.join(directory, "ckpt-20")), 30)
  assert sorted(os.listdir(directory)) == sorted(
      ["checkpoint", "ckpt-10.index", "ckpt-10.data-00000-of-00001", "ckpt-20.index",
       "ckpt-20.data-00000-of-00001", "best"])


def _mount_tmpfs(path, options):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
  if result.returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  return path


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
  disk = _mount_tmpfs(tmp_path / "disk", "size=2m")
  try:
    variable = tf.Variable(tf.zeros([300_000]))  # 1.2 MB: fits once, not twice.
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), str(disk), 3)
    first = checkpoints.save(manager, 1)
    with pytest.raises(OSError, match=rf"cannot save checkpoint {disk}/ckpt-2 .*{first} is "
                                      "intact"):
      variable.assign_add(tf.ones([300_000]))
      checkpoints.save(manager, 2)
    assert [p for p in checkpoints.checkpoints_in(str(disk))] == [first]
    assert not checkpoints.unreadable(first)
  finally:
    subprocess.run(["umount", str(disk)], check=False)


def test_read_only_workdir_is_one_line(run, tmp_path):
  workdir = _mount_tmpfs(tmp_path / "ro", "size=1m,ro")
  try:
    with pytest.raises(OSError, match=rf"cannot write to --workdir={workdir} \(Read-only"):
      train.train_and_evaluate(_config(run[0]), str(workdir))
  finally:
    subprocess.run(["umount", str(workdir)], check=False)


# Workdir lock (row 6), signals and exit codes (row 16) ---------------------------------------

def test_lock_left_by_a_killed_process_is_taken_over(tmp_path, caplog):
  with open(tmp_path / checkpoints.LOCK_FILE, "w") as f:
    f.write("pid 999999 on host gone\n")  # No flock held: its process is dead.
  caplog.set_level(logging.WARNING, logger="absl")
  with checkpoints.workdir_lock(str(tmp_path)):
    with open(tmp_path / checkpoints.LOCK_FILE) as f:
      assert f.read().startswith(f"pid {os.getpid()} on host ")
    with pytest.raises(checkpoints.WorkdirInUse, match=rf"in use by another nmt-train "
                                                       rf"\(pid {os.getpid()} on host"):
      with checkpoints.workdir_lock(str(tmp_path)):
        pass
  assert "from pid 999999 on host gone, which is no longer running" in caplog.text
  assert not os.path.exists(tmp_path / checkpoints.LOCK_FILE)


def _wait_for(path, pattern, process, timeout=120):
  """The first match of `pattern` in the log file `path` that `process` writes, read as it
  grows; fails if the process exits or `timeout` s pass first (a bound, not a guess)."""
  deadline, text = time.time() + timeout, ""
  with open(path, encoding="utf-8", errors="replace") as f:
    while time.time() < deadline:
      text += f.read()
      match = re.search(pattern, text)
      if match:
        return match
      if process.poll() is not None:
        break
      time.sleep(0.1)  # Poll interval only: nothing waits for time to pass.
  raise AssertionError(f"{pattern!r} never appeared in {path}:\n{text[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_trainer_is_refused_and_a_signal_exits_42_with_a_checkpoint(run, copy, tmp_path,
                                                                           signum):
  flags = _flags(run[0], **{"train.steps": 100_000}) + [f"--workdir={copy}"]
  code = "from trainer import main; main.run_train()"
  with open(tmp_path / "err", "w") as err, open(tmp_path / "out", "w") as out:
    # As a user starts it: without conftest's TF_CPP_MIN_LOG_LEVEL (main.py sets its own).
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    first = subprocess.Popen([sys.executable, "-c", code, *flags], stdout=out, stderr=err,
                             cwd=REPO, env=env)
  try:
    _wait_for(tmp_path / "err", "Training float32", first)  # It holds the workdir lock.
    if signum == signal.SIGTERM:  # Once is enough.
      second = cli("run_train", *flags)
      assert second.returncode == 1
      assert _error_lines(second.stderr) == [
          f"error: --workdir={copy} is in use by another nmt-train (pid {first.pid} on host "
          f"{os.uname().nodename}; lock file {copy}/{checkpoints.LOCK_FILE}). Wait for it to "
          "finish, stop it, or train in another --workdir."]
    # A progress line: the loop runs, with the signal handlers in place.
    progress = _wait_for(tmp_path / "err", r"step (\d+)/100000 ", first)
    first.send_signal(signum)
    assert first.wait(timeout=120) == 42
  finally:
    first.kill()
  final = json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])
  # Stopped at the end of a later loop call (steps_per_loop=10), not where it was seen.
  assert final["interrupted"] == signum.name
  assert final["step"] > int(progress.group(1)) and final["step"] % 10 == 0
  assert checkpoints.find_checkpoint(copy).endswith(f"ckpt-{final['step']}")
  assert not os.path.exists(os.path.join(copy, checkpoints.LOCK_FILE))
  if not os.path.exists("/proc/driver/nvidia/version"):  # CPU-only: CUDA's cuInit is no fault.
    assert not re.search(r"^E\d{4} ", (tmp_path / "err").read_text(), re.M)


# Finished runs, empty directories (rows 18, 20) ---------------------------------------------

def test_rerunning_a_finished_run_says_so_and_writes_nothing(run, copy):
  before = _tree_digest(copy)
  summary = train.train_and_evaluate(_config(run[0]), copy)
  assert summary["already_complete"] and summary["step"] == 20
  assert _tree_digest(copy) == before


def test_failed_run_leaves_no_directories_and_says_is_a_directory_once(run, tmp_path):
  workdir = tmp_path / "new"
  result = cli("run_train", *_flags(run[0], **{"data.train": f"tsv:{tmp_path}"}),
               f"--workdir={workdir}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert _error_lines(result.stderr) == [
      f"error: tsv:{tmp_path}: '{tmp_path}' is a directory; name a file, or a glob like "
      f"'{tmp_path}/*.tsv'"]
  assert result.stderr.count("is a directory") == 1
  assert not workdir.exists()


# Data errors (rows 7, 8, 13, 14) ------------------------------------------------------------

def test_bad_eval_data_in_training_is_the_corpus_error_after_a_checkpoint(run, copy, tmp_path):
  bad = _write_tsv(tmp_path / "bad.tsv", 20, seed=2, bad=20)
  config = _config(run[0], **{"data.eval": f"tsv:{bad}", "data.eval_examples": 10,
                              "train.steps": 30, "train.eval_every": 30,
                              "train.checkpoint_every": 1000})
  with pytest.raises(datasets.CorpusError, match=rf"^{bad}: 20 of 40 lines skipped"):
    train.train_and_evaluate(config, copy)
  assert checkpoints.find_checkpoint(copy).endswith("ckpt-30")  # The 10 steps are kept.


def test_bad_eval_data_in_nmt_eval_is_the_corpus_error(run, tmp_path):
  bad = _write_tsv(tmp_path / "bad.tsv", 10, seed=2, bad=10)
  loaded = checkpoints.load_for_inference(run[1])
  loaded.config.data.eval = f"tsv:{bad}"
  with pytest.raises(datasets.CorpusError, match="more than data.max_skip_fraction"):
    evaluate.evaluate_checkpoint(loaded.config, loaded.tokenizer, loaded.model, 1)


def test_bad_lines_while_sampling_for_the_tokenizer_are_the_corpus_error(tmp_path):
  def sample():
    yield "eins", "one"
    raise datasets.CorpusError("train.tsv: 9 of 10 lines skipped as malformed")

  config = tiny.get_config().tokenizer
  with pytest.raises(datasets.CorpusError, match="^train.tsv: 9 of 10 lines skipped"):
    tokenizer_lib.load_or_train(config, str(tmp_path), sample)
  assert not os.path.exists(tmp_path / "tokenizer")  # No empty directory left.


def test_tsv_column_out_of_range_names_the_column(tmp_path):
  path = _write_tsv(tmp_path / "f.tsv", 30, seed=0)
  with pytest.raises(datasets.CorpusError, match=r"30 of 30 lines skipped .*2 tab-separated "
                                                r"columns, need at least 6 \(columns 0:5"):
    list(datasets.read_pairs(f"tsv:{path}:0:5", tiny.get_config().data))


# Config errors (rows 9, 10, 17, 19) ---------------------------------------------------------

def test_unknown_override_is_one_line_with_the_suggestion():
  result = cli("run_train", "--config=configs/tiny.py", "--config.train.stepz=5",
               "--workdir=/nonexistent/never_written")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip() == ('error: --config.train.stepz: no such config key '
                                   '\'stepz\'. Did you mean "steps" instead of "stepz"? '
                                   'Keys: configs/default.py.')


def test_missing_config_file_is_one_line():
  result = cli("run_train", "--config=configs/nonexistent.py", "--workdir=/tmp/x")
  assert result.returncode == 1
  assert result.stderr.strip() == ("error: --config=configs/nonexistent.py: no such file; "
                                   "use e.g. configs/default.py.")


def test_resuming_with_another_model_names_the_keys_and_both_values(run):
  result = cli("run_train", *_flags(run[0], **{"model.units": 64,
                                               "model.bidirectional": True}),
               f"--workdir={run[1]}")
  assert result.returncode == 1
  assert result.stderr.strip() == (
      "error: config.model.units=64, config.model.bidirectional=True are invalid: the "
      f"checkpoints in {run[1]} were trained with model.units=32, model.bidirectional=False "
      f"({run[1]}/config.json). Use those values to resume, or another --workdir to train "
      "a new model.")


@pytest.mark.parametrize("command", ["run_train", "run_eval", "run_translate", "run_export",
                                     "run_bench", "run_prepare"])
def test_help_lists_the_commands_own_flags_and_exits_0(command):
  result = cli(command, "--help")
  assert result.returncode == 0, result.stderr
  assert "  --config" in result.stdout or "  --workdir" in result.stdout
  if command == "run_translate":
    assert "  --input:" in result.stdout and "  --output:" in result.stdout


# Inference inputs (rows 11, 12, 17) ---------------------------------------------------------

def test_corrupt_tokenizer_model_is_one_line(copy):
  with open(os.path.join(copy, "tokenizer", "joint.model"), "wb") as f:
    f.write(b"\x01not a model")
  with pytest.raises(ValueError, match=r"joint.model is not a valid SentencePiece model"):
    checkpoints.load_for_inference(copy)


def test_translate_warns_about_bad_bytes_and_keeps_one_line_per_line(run, tmp_path, caplog):
  loaded = checkpoints.load_for_inference(run[1])
  translate_ids = translate.make_translate_fn(loaded.model, loaded.config, 1)
  source = tmp_path / "in.txt"
  source.write_bytes(b"one two\ncaf\xe9 red\nred\x00cat\n\ndog\n")
  caplog.set_level(logging.WARNING, logger="absl")
  output = str(tmp_path / "out.txt")
  translate.translate_file(translate_ids, loaded.tokenizer, loaded.config, str(source), output)
  with open(output, encoding="utf-8") as f:
    assert len(f.read().split("\n")) == 5 + 1
  assert "input line 2: invalid UTF-8 at byte 3" in caplog.text
  assert "input line 3: NUL bytes" in caplog.text
  with pytest.raises(ValueError, match=rf"--output={tmp_path} is a directory"):
    translate.translate_file(translate_ids, loaded.tokenizer, loaded.config, str(source),
                             str(tmp_path))
