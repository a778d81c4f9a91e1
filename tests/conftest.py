"""Shared test setup: two logical CPU devices (for 2-replica MirroredStrategy tests), the
embedded corpus and one tiny run built once per session, the CLI in a fresh process, and
which tests pytest-xdist keeps on one worker process."""
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Logical devices must be configured before TensorFlow initialises its runtime, so this
# happens at import time, once for the whole session.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(command: str, *args: str, stdin: str = "", timeout: int = 300
        ) -> subprocess.CompletedProcess:
  """Runs `trainer.main.<command>()` (run_train for nmt-train, ...) in a fresh process from
  the repository root, as its console script would; stdout and stderr captured as text."""
  return subprocess.run([sys.executable, "-c", f"from trainer import main; main.{command}()",
                         *args], input=stdin, capture_output=True, text=True, cwd=REPO,
                        timeout=timeout)


@pytest.hookimpl(tryfirst=True)  # Before xdist's own hook reads the xdist_group marks.
def pytest_collection_modifyitems(items):
  """For `pytest -n 2 --dist=loadgroup` (pytest-xdist, two worker processes). A session or
  module fixture is built once per worker that uses it, so tests sharing an expensive one
  stay on one worker: all users of tiny_run, and a module's tests that use any of its
  module-scoped fixtures (a module may split them with its own xdist_group marks). Every
  other test goes to whichever worker is free."""
  for item in items:
    if item.get_closest_marker("xdist_group"):
      continue
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures is None:
      continue
    if "tiny_run" in item.fixturenames:
      group = "tiny_run"
    elif any(defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
      group = item.module.__name__
    else:
      continue
    item.add_marker(pytest.mark.xdist_group(group))


def unpadded_rows(batch, key: str = "source") -> list[tuple[int, ...]]:
  """The id rows of one side of a numpy batch, padding (id 0) removed."""
  return [tuple(row[row != 0].tolist()) for row in batch[key]]


@pytest.fixture(scope="session")
def embedded_data_dir(tmp_path_factory):
  """A TFDS data dir holding the prepared embedded corpus, built once per session."""
  import tensorflow_datasets as tfds
  from input_pipeline import cldr_numbers  # noqa: F401  (registers the builder)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("cldr_numbers", data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope="session")
def tiny_run(embedded_data_dir, tmp_path_factory):
  """configs/tiny.py trained once on the embedded corpus: (config, workdir, summary)."""
  from configs import tiny
  from trainer import train
  config = tiny.get_config()
  config.data.tfds_data_dir = embedded_data_dir
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  summary = train.train_and_evaluate(config, workdir,
                                     tf.distribute.OneDeviceStrategy("/cpu:0"))
  return config, workdir, summary


@pytest.fixture(scope="session", autouse=True)
def reuse_trained_tokenizers(tmp_path_factory):
  """In this process, a run on an `embedded:` corpus trains its tokenizer only the first
  time a data and tokenizer config is seen; later fresh workdirs with the same ones copy
  it through tokenizer.StoredTokenizer, the path a `prepared:` corpus takes (config
  checked, tokenizer.json written last). Each training costs a pass over the corpus plus
  SentencePiece (~10 s of a 2-core CPU) and many tests train from fresh workdirs on the
  same corpus (tests/test_train_loop.py: 181 -> 149 s); the training path still runs once
  per config here, and tests/test_tokenizer.py tests it directly. Other sources (files a
  test writes, prepared corpora) and subprocesses train as users' runs do."""
  import json
  import shutil
  from input_pipeline import datasets
  from input_pipeline import tokenizer as tokenizer_lib
  store = tmp_path_factory.mktemp("tokenizers")
  trained: dict[str, str] = {}
  make_sample, train_and_store = datasets.tokenizer_sample, tokenizer_lib._train_and_store

  def tokenizer_sample(config):
    sample = make_sample(config)
    if not callable(sample) or not config.data.train.startswith("embedded:"):
      return sample
    # The keys that cannot change the sample drawn from data.train are left out.
    data = {k: v for k, v in config.data.to_dict().items()
            if k not in ("test", "eval_examples", "bucket_boundaries", "shuffle_buffer")}
    key = json.dumps([data, config.tokenizer.to_dict(), config.seed], sort_keys=True,
                     default=str)
    if key in trained:
      return tokenizer_lib.StoredTokenizer(trained[key])

    def keyed():
      return sample()

    keyed.key = key
    return keyed

  def train_and_store_and_keep(tok_config, directory, sample):
    """Trains as the project does, then keeps a copy for the next run with its key."""
    train_and_store(tok_config, directory, sample)
    key = getattr(sample, "key", None)
    if key is not None and key not in trained:
      trained[key] = str(store / str(len(trained)))
      shutil.copytree(directory, trained[key])

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(datasets, "tokenizer_sample", tokenizer_sample)
    patch.setattr(tokenizer_lib, "_train_and_store", train_and_store_and_keep)
    yield
