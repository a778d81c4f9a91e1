"""Tests for input_pipeline/pipeline.py on a small generated tsv corpus."""
import collections

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from configs import validate
from input_pipeline import datasets
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib
from conftest import unpadded_rows
import word_pairs  # tests/word_pairs.py

_NUM_PAIRS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The pairs and a tsv: source for them."""
  pairs = word_pairs.make_pairs(_NUM_PAIRS)
  path = tmp_path_factory.mktemp("corpus") / "pairs.tsv"
  return pairs, f"tsv:{word_pairs.write_tsv(path, pairs)}"


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  pairs, _ = corpus
  config = word_pairs.pipeline_config(corpus[1]).tokenizer
  return tokenizer_lib.load_or_train(config, str(tmp_path_factory.mktemp("workdir")),
                                     lambda: iter(pairs))


@pytest.fixture
def config(corpus):
  return word_pairs.pipeline_config(corpus[1])


def _all_batches(config, tokenizer, split="eval", **kwargs):
  return list(datasets.make_dataset(config, tokenizer, split, **kwargs).as_numpy_iterator())


def test_padded_shapes_is_the_reachable_grid(config):
  assert pipeline.padded_shapes(config) == word_pairs.GRID
  config.data.bucket_boundaries = (*word_pairs.GRID, 2 * word_pairs.GRID[-1])  # Unreachable.
  assert pipeline.padded_shapes(config) == word_pairs.GRID


def test_tokenize_then_special_tokens(tokenizer):
  strings = tf.data.Dataset.from_tensors((["zwei mai"], ["two may"]))
  batch = next(iter(pipeline.add_special_tokens(pipeline.tokenize(strings, tokenizer))))
  source_ids = tokenizer.tokenize_source(["zwei mai"]).to_list()[0]
  target_ids = tokenizer.tokenize_target(["two may"]).to_list()[0]
  assert batch["source"].to_list() == [source_ids + [tokenizer_lib.EOS_ID]]
  assert batch["target"].to_list() == [
      [tokenizer_lib.BOS_ID] + target_ids + [tokenizer_lib.EOS_ID]]


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_filter_length_drops_or_truncates_and_counts(config, policy):
  config.data.max_source_length, config.data.max_target_length = 4, 5  # 3 ids each.
  config.data.length_policy = policy
  ids = {"source": tf.ragged.constant([[5, 6], [5, 6, 7, 8], [5]], tf.int32),
         "target": tf.ragged.constant([[5], [5, 6], [5, 6, 7, 8, 9]], tf.int32)}
  stats = pipeline.LengthStats()
  dataset = pipeline.filter_length(tf.data.Dataset.from_tensors(ids), config.data, stats)
  batch = next(iter(dataset))
  if policy == "drop":
    assert batch["source"].to_list() == [[5, 6]]
    assert stats.result() == {"seen": 3, "dropped": 2, "truncated": 0}
  else:
    assert batch["source"].to_list() == [[5, 6], [5, 6, 7], [5]]
    assert batch["target"].to_list() == [[5], [5, 6], [5, 6, 7]]
    assert stats.result() == {"seen": 3, "dropped": 0, "truncated": 2}


def test_train_batches_are_on_the_grid(config, tokenizer):
  dataset = datasets.make_dataset(config, tokenizer, "train")
  lengths = set()
  for batch in dataset.take(60).as_numpy_iterator():
    source, target = batch["source"], batch["target"]
    assert source.shape == target.shape and source.dtype == target.dtype == "int32"
    assert source.shape[0] == 8 and source.shape[1] in word_pairs.GRID
    lengths.add(source.shape[1])
    assert (target[:, 0] == tokenizer_lib.BOS_ID).all()
    for row in unpadded_rows(batch, "source"):
      assert row[-1] == tokenizer_lib.EOS_ID and tokenizer_lib.BOS_ID not in row
    for row in unpadded_rows(batch, "target"):
      assert row[-1] == tokenizer_lib.EOS_ID and row.count(tokenizer_lib.EOS_ID) == 1
  assert lengths == set(word_pairs.GRID)


def test_train_order_is_seeded(config, tokenizer):
  first, second = (next(iter(datasets.make_dataset(config, tokenizer, "train")))
                   for _ in range(2))
  assert (first["source"].numpy() == second["source"].numpy()).all()


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_eval_epoch_counts_every_pair(config, tokenizer, corpus, policy):
  config.data.length_policy = policy
  stats = pipeline.LengthStats()
  batches = _all_batches(config, tokenizer, length_stats=stats)
  assert all(b["source"].shape[1] in word_pairs.GRID for b in batches)
  examples = sum(b["source"].shape[0] for b in batches)
  counts = stats.result()
  assert counts["seen"] == _NUM_PAIRS
  assert examples == _NUM_PAIRS - counts["dropped"]
  over_long = counts["dropped"] if policy == "drop" else counts["truncated"]
  fitting = sum(_expected_sources(corpus[0], tokenizer).values())
  assert over_long == _NUM_PAIRS - fitting > 0  # Each pair over either limit, once.


def test_token_budget_batching(config, tokenizer):
  config.data.batch_by = "tokens"
  config.train.tokens_per_batch = 128
  context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0,
                                       num_replicas_in_sync=2)
  assert pipeline.bucket_batch_sizes(config, context) == [64 // 6, 64 // 10, 64 // 16]
  batches = datasets.make_dataset(config, tokenizer, "train", input_context=context)
  for batch in batches.take(20).as_numpy_iterator():
    rows, length = batch["source"].shape
    assert rows * length <= 64 and rows == 64 // length


def _steps(batches, replicas):
  """Shapes of consecutive batches, `replicas` a step (MirroredStrategy's round robin)."""
  shapes = [batch["source"].shape for batch in batches]
  return [shapes[i:i + replicas] for i in range(0, len(shapes), replicas)]


@pytest.mark.parametrize("batch_by", ["sentences", "tokens"])
def test_the_replicas_of_a_step_share_a_length_and_resume_exactly(config, tokenizer,
                                                                   batch_by):
  """One pipeline feeding 4 replicas: each step's 4 batches have one length and the
  per-replica size; a stream started at step N is the straight one from step N on."""
  config.data.batch_by, config.train.tokens_per_batch = batch_by, 256
  context = tf.distribute.InputContext(1, 0, 4)
  sizes = dict(zip(word_pairs.GRID, pipeline.bucket_batch_sizes(config, context)))
  assert sizes == ({6: 2, 10: 2, 16: 2} if batch_by == "sentences" else
                   {6: 64 // 6, 10: 64 // 10, 16: 64 // 16})
  straight = list(datasets.make_dataset(config, tokenizer, "train", input_context=context)
                  .take(4 * 30).as_numpy_iterator())
  steps = _steps(straight, 4)
  for shapes in steps:
    assert [tuple(s) for s in shapes] == [(sizes[shapes[0][1]], shapes[0][1])] * 4, shapes
  assert {shapes[0][1] for shapes in steps} == set(word_pairs.GRID)
  resumed = datasets.make_dataset(config, tokenizer, "train", input_context=context,
                                  start_step=7)
  for i, batch in enumerate(resumed.take(8).as_numpy_iterator()):
    np.testing.assert_array_equal(batch["source"], straight[4 * 7 + i]["source"])


def test_eval_on_four_replicas_keeps_every_pair_at_most_the_replica_batch(config,
                                                                         tokenizer):
  stats = pipeline.LengthStats()
  context = tf.distribute.InputContext(1, 0, 4)
  batches = _all_batches(config, tokenizer, input_context=context, length_stats=stats)
  assert all(b["source"].shape[0] <= 2 and b["source"].shape[1] in word_pairs.GRID for b in batches)
  counts = stats.result()
  assert sum(b["source"].shape[0] for b in batches) == counts["seen"] - counts["dropped"]


def _expected_sources(pairs, tokenizer, max_length=16):
  """EOS-terminated source ids of the pairs that fit both max lengths (the drop policy)."""
  sources = tokenizer.tokenize_source([p[0] for p in pairs]).to_list()
  targets = tokenizer.tokenize_target([p[1] for p in pairs]).to_list()
  return collections.Counter(tuple(s) + (tokenizer_lib.EOS_ID,) for s, t in zip(
      sources, targets) if len(s) + 1 <= max_length and len(t) + 2 <= max_length)


def test_two_pipelines_split_the_corpus_exactly_once(config, tokenizer, corpus):
  expected = _expected_sources(corpus[0], tokenizer)
  assert max(expected.values()) == 1 and len(expected) > _NUM_PAIRS // 2
  config.train.batch_size = 2  # 1 per replica: no remainder to drop in train.
  for split in ("eval", "train"):
    per_pipeline = []
    for index in range(2):
      context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index,
                                           num_replicas_in_sync=2)
      batches = _all_batches(config, tokenizer, split, input_context=context, repeat=False)
      assert all(b["source"].shape[0] == 1 for b in batches)
      per_pipeline.append(collections.Counter(
          row for b in batches for row in unpadded_rows(b, "source")))
    assert per_pipeline[0] and per_pipeline[1]
    assert not per_pipeline[0] & per_pipeline[1], split
    assert per_pipeline[0] + per_pipeline[1] == expected, split


def test_plugs_into_distribute_datasets_from_function(config, tokenizer):
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  stats = pipeline.LengthStats()
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: datasets.make_dataset(config, tokenizer, "train", input_context=ctx,
                                        length_stats=stats))
  batch = next(iter(dataset))
  shapes = [t.shape for t in strategy.experimental_local_results(batch["target"])]
  assert len(shapes) == 2 and all(s[0] == 4 and s[1] in word_pairs.GRID for s in shapes)
  assert stats.result()["seen"] >= 8  # At least the batch's pairs (read-ahead adds more).


def test_an_unknown_split_is_named(config, tokenizer):
  # Config values are checked once at start-up (configs/validate.py, test_configs.py).
  with pytest.raises(ValueError, match="split"):
    datasets.make_dataset(config, tokenizer, "test")


@pytest.mark.slow
def test_embedded_corpus_batches_on_the_tiny_grid(embedded_data_dir, tmp_path):
  config = tiny.get_config()
  config.data.tfds_data_dir = embedded_data_dir
  config.tokenizer.sample_size = 5000
  tok = tokenizer_lib.load_or_train(config.tokenizer, str(tmp_path),
                                    datasets.tokenizer_sample(config))
  grid = pipeline.padded_shapes(config)
  for batch in datasets.make_dataset(config, tok, "train").take(20).as_numpy_iterator():
    assert batch["source"].shape[1] == batch["target"].shape[1]
    assert batch["source"].shape[1] in grid


# ------------------------------------------------- subword regularisation (sampling_alpha)

def _sources_and_targets(batches):
  return [(b["source"].tolist(), b["target"].tolist()) for b in batches]


def test_sampled_train_stream_resumes_exactly_and_leaves_eval_alone(config, tokenizer,
                                                                     corpus):
  """With tokenizer.sampling_alpha > 0 the train batches hold sampled segmentations that
  spell the corpus's sentences; a stream started at step 7 is the straight one from step
  7 on (exact resume); eval batches are the best segmentations, as without sampling."""
  config.tokenizer.sampling_alpha = 0.2
  context = tf.distribute.InputContext(1, 0, 2)  # Two replicas: resume counts in steps.
  straight = list(datasets.make_dataset(config, tokenizer, "train", input_context=context)
                  .take(2 * 15).as_numpy_iterator())
  resumed = datasets.make_dataset(config, tokenizer, "train", input_context=context,
                                  start_step=7)
  assert (_sources_and_targets(resumed.take(2 * 8).as_numpy_iterator())
          == _sources_and_targets(straight[2 * 7:]))
  rows = [row for b in straight for row in unpadded_rows(b, "target")]
  texts = tokenizer.detokenize_target(tf.ragged.constant(rows, tf.int32)).numpy()
  assert set(texts) <= {p[1].encode() for p in corpus[0]}
  best = _expected_sources(corpus[0], tokenizer)
  sampled = collections.Counter(row for b in straight for row in unpadded_rows(b, "source"))
  assert len(set(sampled) - set(best)) >= 10  # Not the best segmentations.
  eval_rows = collections.Counter(row for b in _all_batches(config, tokenizer)
                                  for row in unpadded_rows(b, "source"))
  assert eval_rows == best


def test_sampling_differs_per_batch_index_and_pipeline_seed(tokenizer, corpus):
  """The same sentences met again (the next epoch: a later batch index) or by another input
  pipeline (another seed) are segmented anew."""
  pairs = corpus[0][:64]
  batch = ([p[0] for p in pairs], [p[1] for p in pairs])
  sampler = tokenizer.sampler(alpha=0.2, nbest=8)

  def epochs(seed, count):
    dataset = pipeline.tokenize(tf.data.Dataset.from_tensors(batch).repeat(count),
                                tokenizer, sampler=sampler, seed=seed)
    return [b["source"].to_list() for b in dataset]

  first, second = epochs((0, 0), 2)
  assert first != second and epochs((0, 1), 1)[0] != first
  best = tokenizer.tokenize_source(batch[0]).to_list()
  assert sum(a != b for a, b in zip(first, best)) >= 8


def test_prepared_train_with_sampling_is_a_config_error(config):
  config.data.train, config.data.eval = "prepared:/data/prep", "prepared:/data/prep:eval"
  datasets.check_sources(config)
  config.tokenizer.sampling_alpha = 0.1
  with pytest.raises(validate.ConfigError, match=(
      r"tokenizer.sampling_alpha=0.1 with config.data.train='prepared:/data/prep' is "
      r"invalid: .*raw corpus.*sampling_alpha=0")):
    datasets.check_sources(config)
