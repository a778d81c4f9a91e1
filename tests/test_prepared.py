"""Tests of input_pipeline/prepared.py: nmt-prepare's output, the prepared reader (grid,
sharding, constant-time exact resume), every kind of bad prepared input, tf.data service."""
import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import corpora
from input_pipeline import datasets
from input_pipeline import prepare
from input_pipeline import prepared
from input_pipeline import tokenizer as tokenizer_lib
from conftest import cli, unpadded_rows
import word_pairs  # tests/word_pairs.py

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NUM_PAIRS = 600


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A tsv corpus with one malformed line, prepared in 50-example shards: (config, dir)."""
  root = tmp_path_factory.mktemp("prepared")
  lines = [f"{src}\t{tgt}\n" for src, tgt in word_pairs.make_pairs(_NUM_PAIRS)]
  lines.insert(100, "a line without a tab\n")
  (root / "pairs.tsv").write_text("".join(lines), encoding="utf-8")
  (root / "eval.tsv").write_text("".join(lines[:120]), encoding="utf-8")
  config = word_pairs.pipeline_config(f"tsv:{root / 'pairs.tsv'}",
                                      f"tsv:{root / 'eval.tsv'}")
  prepare.prepare(config, str(root / "data"), shard_examples=50)
  return config, str(root / "data")


def _prepared_config(corpus):
  raw, directory = corpus
  config = word_pairs.pipeline_config(f"prepared:{directory}")
  config.seed = raw.seed
  return config


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  """The run's tokenizer: copied from the prepared directory, as nmt-train does."""
  config = _prepared_config(corpus)
  return tokenizer_lib.load_or_train(config.tokenizer, str(tmp_path_factory.mktemp("run")),
                                     datasets.tokenizer_sample(config))


def _expected_sources(corpus, tokenizer):
  """EOS-terminated source ids of the pairs the raw pipeline keeps (same tokenizer)."""
  config = corpus[0].copy_and_resolve_references()
  config.data.eval = config.data.train
  batches = datasets.make_dataset(config, tokenizer, "eval").as_numpy_iterator()
  return collections.Counter(row for batch in batches for row in unpadded_rows(batch))


def test_parse_source_prepared_forms():
  assert datasets.parse_source("prepared:/d").paths == ("/d",)
  assert datasets.parse_source("prepared:/d").split == ""
  assert datasets.parse_source("prepared:/d:eval").split == "eval"
  assert datasets.parse_source("prepared:gs://b/d").paths == ("gs://b/d",)
  with pytest.raises(ValueError, match="prepared:DIR"):
    datasets.parse_source("prepared:")


def test_manifest_counts_every_line_and_rerun_only_verifies(corpus):
  config, directory = corpus
  manifest = prepared.load_manifest(directory)
  train = manifest["splits"]["train"]
  assert train["read"] == _NUM_PAIRS and train["skipped"] == {"too few columns": 1}
  assert train["examples"] == _NUM_PAIRS - train["length_filter"]["dropped"]
  assert train["examples"] == sum(s["examples"] for s in train["shards"])
  assert len(train["shards"]) >= 2 * prepared.GROUP_SHARDS  # Two groups at least.
  assert manifest["data"]["max_source_length"] == 16
  assert manifest["tokenizer"]["config"]["vocab_size"] == 60
  assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]
  mtimes = {n: os.path.getmtime(os.path.join(directory, n)) for n in os.listdir(directory)}
  assert prepare.prepare(config, directory, shard_examples=50) == manifest
  assert mtimes == {n: os.path.getmtime(os.path.join(directory, n))
                    for n in os.listdir(directory)}


def test_unfinished_directory_is_refused_then_prepared_again(corpus, tokenizer, tmp_path):
  config, directory = corpus
  copy = str(tmp_path / "data")
  shutil.copytree(directory, copy)
  os.remove(os.path.join(copy, prepared.MANIFEST))
  (tmp_path / "data" / "train-00099.tfrecord.tmp").write_bytes(b"half a shard")
  run_config = _prepared_config((config, copy))
  with pytest.raises(prepared.PreparedDataError, match=r"manifest.json does not exist.*"
                     r"run nmt-prepare"):
    datasets.make_dataset(run_config, tokenizer, "train")
  prepare.prepare(config, copy, shard_examples=50)
  assert not [n for n in os.listdir(copy) if n.endswith(".tmp")]
  assert prepared.load_manifest(copy)["splits"] == prepared.load_manifest(directory)["splits"]


def test_train_batches_are_on_the_grid(corpus, tokenizer):
  config = _prepared_config(corpus)
  for batch in datasets.make_dataset(config, tokenizer, "train").take(60).as_numpy_iterator():
    source, target = batch["source"], batch["target"]
    assert source.shape == target.shape and source.dtype == target.dtype == "int32"
    assert source.shape[0] == 8 and source.shape[1] in word_pairs.GRID
    assert (target[:, 0] == tokenizer_lib.BOS_ID).all()
    for row in unpadded_rows(batch):
      assert row[-1] == tokenizer_lib.EOS_ID and tokenizer_lib.BOS_ID not in row
    shorter = [length for length in word_pairs.GRID if length < source.shape[1]]
    # Each pair is padded to the smallest grid length L that fits it.
    for src, tgt in zip(unpadded_rows(batch), unpadded_rows(batch, "target")):
      assert max(shorter, default=0) < max(len(src), len(tgt)) <= source.shape[1]


def test_two_pipelines_split_the_corpus_exactly_once(corpus, tokenizer):
  expected = _expected_sources(corpus, tokenizer)
  assert max(expected.values()) == 1 and len(expected) > _NUM_PAIRS // 2
  config = _prepared_config(corpus)
  config.train.batch_size = 2  # 1 per replica: no remainder to drop in train.
  per_pipeline = []
  for index in range(2):
    context = tf.distribute.InputContext(2, index, 2)
    batches = datasets.make_dataset(config, tokenizer, "train", input_context=context,
                                    repeat=False)
    per_pipeline.append(collections.Counter(
        row for batch in batches.as_numpy_iterator() for row in unpadded_rows(batch)))
  assert per_pipeline[0] and per_pipeline[1]
  assert not per_pipeline[0] & per_pipeline[1]
  assert per_pipeline[0] + per_pipeline[1] == expected


def test_eval_split_keeps_every_pair_and_its_text(corpus, tokenizer):
  config = _prepared_config(corpus)
  batches = list(datasets.make_dataset(config, tokenizer, "eval").as_numpy_iterator())
  examples = prepared.load_manifest(corpus[1])["splits"]["eval"]["examples"]
  assert sum(b["source"].shape[0] for b in batches) == examples
  assert all(b["source"].shape[1] in word_pairs.GRID for b in batches)
  pairs = list(datasets.read_pairs(config.data.eval, config.data))
  assert len(pairs) == examples and pairs[0] == word_pairs.make_pairs(_NUM_PAIRS)[0]


def test_prepare_with_a_holdout_dev_set_stores_both_sides(corpus, tmp_path):
  raw, _ = corpus
  config = word_pairs.pipeline_config(raw.data.train, "holdout:40")
  manifest = prepare.prepare(config, str(tmp_path / "data"), shard_examples=200)
  raw_dev = list(datasets.read_pairs("holdout:40", config.data))
  config.data.eval = f"prepared:{tmp_path / 'data'}:eval"
  dev = list(datasets.read_pairs(config.data.eval, config.data))
  assert set(dev) <= set(raw_dev) and dev  # Less the over-long pairs, as in training.
  seen = {split: manifest["splits"][split]["length_filter"]["seen"] for split in ("train", "eval")}
  assert seen == {"train": _NUM_PAIRS - len(raw_dev), "eval": len(raw_dev)}, seen


@pytest.mark.parametrize("num_pipelines,replicas", [(1, 1), (1, 2), (2, 2), (1, 4)])
def test_resume_at_any_step_gives_the_uninterrupted_batches(corpus, tokenizer,
                                                            num_pipelines, replicas):
  """Per pipeline, a step takes one batch per replica: step N starts at batch N * R / P."""
  config = _prepared_config(corpus)
  context = tf.distribute.InputContext(num_pipelines, num_pipelines - 1, replicas)
  per_step = replicas // num_pipelines
  epoch = prepared.Plan(config, corpus[1], prepared._pipeline_shards(
      prepared.load_manifest(corpus[1]), corpus[1], "train", corpora.Shard.of(context)),
      context).epoch_batches
  steps = [0, 1, epoch // per_step, epoch // per_step + 1, 2 * epoch // per_step + 3]
  straight = datasets.make_dataset(config, tokenizer, "train", input_context=context)
  batches = list(straight.take(steps[-1] * per_step + 3).as_numpy_iterator())  # 2+ epochs.
  for step in steps:
    resumed = datasets.make_dataset(config, tokenizer, "train", input_context=context,
                                    start_step=step)
    for i, batch in enumerate(resumed.take(3).as_numpy_iterator()):
      for key in ("source", "target"):
        np.testing.assert_array_equal(batch[key], batches[step * per_step + i][key])


@pytest.mark.parametrize("through", ["local", "service"])
def test_the_replicas_of_a_step_share_a_length(corpus, tokenizer, through):
  """One pipeline feeding 4 replicas: each step's 4 consecutive batches have one length and
  the per-replica size, also when two tf.data service workers interleave their output."""
  config = _prepared_config(corpus)
  servers = []
  if through == "service":
    dispatcher = tf.data.experimental.service.DispatchServer()
    servers = [dispatcher] + [tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(dispatcher.target.split("://")[1]))
        for _ in range(2)]
    config.data.service_address = dispatcher.target
  try:
    batches = datasets.make_dataset(config, tokenizer, "train",
                                    input_context=tf.distribute.InputContext(1, 0, 4))
    shapes = [b["source"].shape for b in batches.take(4 * 40).as_numpy_iterator()]
  finally:
    for server in servers[::-1]:
      server.stop()
  steps = [shapes[i:i + 4] for i in range(0, len(shapes), 4)]
  assert all(step == [(2, step[0][1])] * 4 for step in steps), steps
  assert {step[0][1] for step in steps} == set(word_pairs.GRID)


def test_resume_a_million_steps_in(corpus, tokenizer):
  config = _prepared_config(corpus)
  batch = next(iter(datasets.make_dataset(config, tokenizer, "train", start_step=10**6)))
  assert batch["source"].shape[0] == 8 and batch["source"].shape[1] in word_pairs.GRID


def test_raw_source_resume_skips_one_batch_per_replica(corpus, tokenizer):
  """The raw path replays: on 2 replicas of one pipeline, step N is batch 2N."""
  config = corpus[0]
  context = tf.distribute.InputContext(1, 0, 2)
  straight = list(datasets.make_dataset(config, tokenizer, "train", input_context=context)
                  .take(8).as_numpy_iterator())
  resumed = datasets.make_dataset(config, tokenizer, "train", input_context=context,
                                  start_step=3)
  np.testing.assert_array_equal(next(resumed.as_numpy_iterator())["source"],
                                straight[6]["source"])


def test_shard_corrupted_after_the_check_is_a_clear_error(corpus, tokenizer, tmp_path):
  copy = str(tmp_path / "data")
  shutil.copytree(corpus[1], copy)
  config = _prepared_config((corpus[0], copy))
  config.data.shuffle_buffer = 0  # Groups in order: group 0 holds train-00000.
  dataset = datasets.make_dataset(config, tokenizer, "train")  # Checked here.
  for path in _shard_files(copy, 0):
    _corrupt(path, truncate=False)
  with pytest.raises(datasets.CorpusError, match=r"prepared shard is corrupted .*run "
                     r"nmt-prepare again with the same --output_dir"):
    with datasets.surface_corpus_errors():
      for _ in dataset.take(200):
        pass


def test_prepare_enforces_max_skip_fraction(tmp_path):
  lines = [f"{s}\t{t}\n" for s, t in word_pairs.make_pairs(100)] + ["no tab\n"] * 5
  (tmp_path / "bad.tsv").write_text("".join(lines), encoding="utf-8")
  config = word_pairs.pipeline_config(f"tsv:{tmp_path / 'bad.tsv'}")
  with pytest.raises(datasets.CorpusError, match=r"bad.tsv: 5 of 105 lines skipped .*"
                                                r"data.max_skip_fraction"):
    prepare.prepare(config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / prepared.MANIFEST)


_TRAIN_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")  # The working directory is the repository root.
import word_pairs
from trainer import train
import tensorflow as tf
directory, workdir = sys.argv[1:3]
def config(steps):
  c = word_pairs.pipeline_config(f"prepared:{directory}", batch_size=8)
  c.model.units, c.model.embed_dim = 32, 16
  c.model.dropout = 0.1  # Masks differ per replica and are redrawn exactly on resume.
  c.data.eval_examples, c.eval.beam_size = 8, 1
  c.eval.num_probes, c.eval.probe_sentences = 0, ()  # No attention images to draw.
  c.distribute.strategy, c.distribute.cpu_devices = "mirrored", 2
  c.train.xla, c.train.precision = "off", "float32"
  c.train.update(steps=steps, steps_per_loop=3, log_every=3, checkpoint_every=6,
                 eval_every=1000)
  if "deterministic_ops" in c.train:
    c.train.deterministic_ops = True
  else:
    tf.config.experimental.enable_op_determinism()
  return c
import shutil
straight = train.train_and_evaluate(config(12), workdir + "/straight")
# The run as if stopped after its checkpoint at step 6: a copy without the later one.
shutil.copytree(workdir + "/straight/checkpoints", workdir + "/resumed/checkpoints",
                ignore=shutil.ignore_patterns("best", "ckpt-12*"))
tf.compat.v1.train.update_checkpoint_state(workdir + "/resumed/checkpoints",
                                           workdir + "/resumed/checkpoints/ckpt-6")
shutil.copytree(workdir + "/straight/tokenizer", workdir + "/resumed/tokenizer")
losses = {"straight": straight["losses"],
          "second": train.train_and_evaluate(config(12), workdir + "/resumed")["losses"]}
print(json.dumps(losses))
"""


def test_stop_and_resume_on_two_replicas_reproduces_uninterrupted_losses(corpus, tmp_path):
  """float32, shuffled multi-shard input, steps_per_loop 3, 2 replicas (logical CPUs, so in
  a subprocess: the device split is process-global). The resumed run starts from the
  straight run's step-6 checkpoint, as a run stopped there would."""
  result = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, corpus[1], str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  losses = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(losses["second"]) == 6 and len(losses["straight"]) == 12
  np.testing.assert_allclose(losses["second"], losses["straight"][6:], rtol=1e-6)


def _corrupt(path, truncate):
  data = bytearray(open(path, "rb").read())
  if truncate:
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _shard_files(directory, index):
  """The files of train shard `index`, from the manifest."""
  shard = prepared.load_manifest(directory)["splits"]["train"]["shards"][index]
  return [os.path.join(directory, f["file"]) for f in shard["files"]]


@pytest.mark.parametrize("damage,message", [
    ("truncated", r"{name} has \d+ bytes, manifest.json says \d+ \(truncated"),
    ("corrupted", r"{name} does not match its sha256 in manifest.json"),
    ("extra shard", r"train-00999.tfrecord is not listed in manifest.json"),
    ("missing shard", r"{name} is missing"),
    ("manifest", r"manifest.json is not a valid manifest"),
])
def test_damaged_directory_is_one_clear_error(corpus, tokenizer, tmp_path, damage, message):
  copy = str(tmp_path / "data")
  shutil.copytree(corpus[1], copy)
  shard = _shard_files(copy, 3)[0]
  message = message.format(name=re.escape(os.path.basename(shard)))
  if damage in ("truncated", "corrupted"):
    _corrupt(shard, truncate=damage == "truncated")
  elif damage == "extra shard":
    shutil.copy(shard, os.path.join(copy, "train-00999.tfrecord"))
  elif damage == "missing shard":
    os.remove(shard)
  else:
    with open(os.path.join(copy, prepared.MANIFEST), "r+") as f:
      f.truncate(100)
  config = _prepared_config((corpus[0], copy))
  with pytest.raises(prepared.PreparedDataError, match=message) as error:
    datasets.make_dataset(config, tokenizer, "train")
  assert copy in str(error.value) and "\n" not in str(error.value)
  assert "nmt-prepare" in str(error.value)


@pytest.mark.parametrize("key,value", [("data.max_source_length", 12),
                                       ("data.length_policy", "truncate"),
                                       ("data.bucket_boundaries", (8, 16)),
                                       ("tokenizer.vocab_size", 80)])
def test_other_config_than_prepared_names_the_key(corpus, tokenizer, key, value):
  config = _prepared_config(corpus)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(prepared.PreparedDataError,
                     match=rf"{corpus[1]}/manifest.json was prepared with another config "
                           rf"\({key}: prepared .* vs config"):
    datasets.make_dataset(config, tokenizer, "train")


def test_workdir_with_another_tokenizer_is_refused(corpus, tmp_path):
  config = _prepared_config(corpus)
  pairs = [(s + " extra", t + " words") for s, t in word_pairs.make_pairs(300, seed=5)]
  other = tokenizer_lib.load_or_train(config.tokenizer, str(tmp_path), lambda: iter(pairs))
  with pytest.raises(prepared.PreparedDataError, match="another tokenizer than the run's"):
    datasets.make_dataset(config, other, "train")


def test_nmt_prepare_cli_verifies_and_reports_a_corrupted_shard(corpus, tmp_path):
  copy = str(tmp_path / "data")
  shutil.copytree(corpus[1], copy)
  config = corpus[0]
  flags = ["--config=configs/tiny.py", f"--output_dir={copy}",
           f"--config.data.train={config.data.train}", f"--config.data.eval={config.data.eval}",
           "--config.data.max_source_length=16", "--config.data.max_target_length=16",
           "--config.data.bucket_boundaries=(6, 10, 16, 24)", "--config.tokenizer.vocab_size=60"]
  ok = cli("run_prepare", *flags)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert json.loads(ok.stdout.strip().splitlines()[-1])["train"]["skipped"] == {
      "too few columns": 1}
  shard = _shard_files(copy, 1)[0]
  _corrupt(shard, truncate=False)
  bad = cli("run_prepare", *flags)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert "error:" in bad.stderr and f"{shard} does not match" in bad.stderr


def test_tf_data_service_with_two_workers_trains_the_tiny_config(corpus, tmp_path, caplog):
  """launch/data_service.py (one dispatcher, two workers, localhost) feeds nmt-train."""
  from trainer import train
  service = subprocess.Popen(
      [sys.executable, "launch/data_service.py", "--port=0", "--num_workers=2"],
      stdout=subprocess.PIPE, text=True, cwd=_ROOT)
  try:
    line = service.stdout.readline()
    assert "tf.data service dispatcher grpc://localhost:" in line, line
    config = _prepared_config(corpus)
    config.data.service_address = line.split()[3]
    config.model.units, config.model.embed_dim = 32, 16
    config.data.eval_examples, config.eval.beam_size = 8, 1
    config.eval.num_probes, config.eval.probe_sentences = 0, ()
    config.train.update(steps=6, steps_per_loop=3, log_every=3, checkpoint_every=6,
                        eval_every=1000, xla="off")
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="absl")  # An earlier in-process CLI may have raised it.
    # Straight on absl's logger: an earlier test in the session may have stopped it
    # propagating to the root logger that caplog listens on.
    absl_logger = logging.getLogger("absl")
    absl_logger.addHandler(caplog.handler)
    try:
      summary = train.train_and_evaluate(config, str(tmp_path),
                                         tf.distribute.OneDeviceStrategy("/cpu:0"))
    finally:
      absl_logger.removeHandler(caplog.handler)
  finally:
    service.terminate()
    service.wait(timeout=60)
  assert summary["step"] == 6 and len(summary["losses"]) == 6
  assert all(np.isfinite(summary["losses"]))
  assert "Input through the tf.data service at grpc://localhost:" in caplog.text


def test_kubernetes_data_service_manifest_parses():
  import yaml  # PyYAML: ml_collections depends on it.
  with open(os.path.join(_ROOT, "launch", "k8s", "data-service.yaml")) as f:
    kinds = [doc["kind"] for doc in yaml.safe_load_all(f)]
  assert kinds == ["Service", "Deployment", "Deployment"]


def _train_targets(directory, tokenizer):
  """Each train shard's target texts, detokenized, in the shard's files' order."""
  manifest = prepared.load_manifest(directory)
  features = {"target": tf.io.RaggedFeature(tf.int64)}
  shards = []
  for shard in manifest["splits"]["train"]["shards"]:
    paths = [os.path.join(directory, file["file"]) for file in shard["files"]]
    texts = []
    for serialized in tf.data.TFRecordDataset(paths).batch(1024):
      ids = tf.io.parse_example(serialized, features)["target"]
      texts += [t.decode() for t in tokenizer.detokenize_target(ids).numpy()]
    shards.append(texts)
  return shards


def test_every_train_shard_is_a_sample_of_the_whole_corpus(tmp_path):
  """20k numbered lines in 20 shards: each shard holds ~1/20 of every 1% stretch of the
  corpus (at most twice that), not one stretch of it; eval shards keep corpus order."""
  lines = 20000
  (tmp_path / "numbers.tsv").write_text(
      "".join(f"zahl {i}\t{i}\n" for i in range(lines)), encoding="utf-8")
  (tmp_path / "eval.tsv").write_text(
      "".join(f"zahl {i}\t{i}\n" for i in range(50)), encoding="utf-8")
  config = word_pairs.pipeline_config(f"tsv:{tmp_path / 'numbers.tsv'}",
                                      f"tsv:{tmp_path / 'eval.tsv'}")
  directory = str(tmp_path / "data")
  prepare.prepare(config, directory, shard_examples=1000)
  tokenizer = tokenizer_lib.load_or_train(config.tokenizer, directory, None)
  shards = [[int(text) for text in texts] for texts in _train_targets(directory, tokenizer)]
  assert len(shards) == 20 and sorted(sum(shards, [])) == list(range(lines))
  stretch = lines // 100  # Lines per 1% of the corpus; each shard's share: 10 of them.
  counts = np.array([np.bincount(np.array(numbers) // stretch, minlength=100)
                     for numbers in shards])
  assert counts.max() <= 2 * stretch // 20, counts.max()
  assert counts.min() >= 1, counts.min()
  eval_text = list(prepared.read_text(datasets.parse_source(f"prepared:{directory}:eval")))
  assert [int(target.numpy()) for _, target in eval_text] == list(range(50))


def test_spread_through_run_files_gives_the_same_shards(corpus, tmp_path, monkeypatch):
  """A split larger than one in-memory run is sorted through run files (here 3 KB runs,
  merged 3 at a time in two passes): the same shards, byte for byte, no file left over."""
  config, directory = corpus
  monkeypatch.setattr(prepare, "_RUN_BYTES", 3000)
  monkeypatch.setattr(prepare, "_MERGE_RUNS", 3)
  copy = str(tmp_path / "data")
  prepare.prepare(config, copy, shard_examples=50)
  assert prepared.load_manifest(copy)["splits"] == prepared.load_manifest(directory)["splits"]
  assert not [name for name in os.listdir(copy) if name.endswith(".tmp")]
  other = config.copy_and_resolve_references()
  other.seed += 1
  monkeypatch.setattr(prepare, "_RUN_BYTES", 1 << 27)
  prepare.prepare(other, str(tmp_path / "other"), shard_examples=50)
  assert (prepared.load_manifest(str(tmp_path / "other"))["splits"]["train"]["shards"]
          != prepared.load_manifest(directory)["splits"]["train"]["shards"])
