"""The training Evaluator batches the eval set per replica (the size a device was sized for),
not at the global batch of all replicas."""
import numpy as np
import pytest

from input_pipeline import tokenizer as tokenizer_lib
from trainer import evaluate
from trainer import model as model_lib
import word_pairs  # tests/word_pairs.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(config, tokenizer, model, eval_step): a tsv eval set of 200 pairs, a small untrained
  model and its eval loss function (traced once for the module)."""
  pairs = word_pairs.make_pairs(200)
  path = word_pairs.write_tsv(tmp_path_factory.mktemp("corpus") / "pairs.tsv", pairs)
  config = word_pairs.pipeline_config(f"tsv:{path}", batch_size=32)
  config.model.units, config.model.embed_dim = 32, 16
  config.train.tokens_per_batch = 512
  tokenizer = tokenizer_lib.load_or_train(
      config.tokenizer, str(tmp_path_factory.mktemp("workdir")), lambda: iter(pairs))
  model = model_lib.create_model(config, tokenizer.source_vocab_size,
                                 tokenizer.target_vocab_size)
  return config, tokenizer, model, evaluate.make_eval_loss_fn(model)


@pytest.mark.parametrize("batch_by", ["sentences", "tokens"])
def test_eval_batches_are_one_replicas_share_and_give_the_same_loss(setup, batch_by):
  config, tokenizer, model, eval_step = setup
  config = config.copy_and_resolve_references()
  config.data.batch_by = batch_by
  evaluator = evaluate.Evaluator(config, tokenizer, model, num_replicas=4)
  shapes = [batch["source"].shape for batch in evaluator.dataset]
  if batch_by == "sentences":
    assert max(rows for rows, _ in shapes) == 32 // 4
  else:
    assert all(rows * length <= 512 // 4 for rows, length in shapes)
  whole = evaluate.make_eval_dataset(config, tokenizer)  # One replica: the global batch.
  assert max(b["source"].shape[0] for b in whole) > max(rows for rows, _ in shapes)
  assert sum(rows for rows, _ in shapes) == sum(b["source"].shape[0] for b in whole)
  np.testing.assert_allclose(evaluate.eval_loss(eval_step, evaluator.dataset),
                             evaluate.eval_loss(eval_step, whole), rtol=1e-5)


def test_num_replicas_must_be_a_positive_integer(setup):
  config, tokenizer, model, _ = setup
  with pytest.raises(ValueError, match=r"num_replicas=0: must be an integer >= 1"):
    evaluate.Evaluator(config, tokenizer, model, num_replicas=0)


def test_each_evaluation_counts_its_own_loss_pairs_as_nmt_eval_does(setup):
  """The in-training dev loss says over how many pairs it is (the over-long ones are left
  out of it): the same counts as nmt-eval's, and not summed over evaluations."""
  config, tokenizer, model, _ = setup
  config = config.copy_and_resolve_references()
  config.data.eval_examples = 4  # Translations are not what is counted: few of them.
  evaluator = evaluate.Evaluator(config, tokenizer, model)
  first, second = evaluator(0, None), evaluator(1, None)
  counts = (first["loss_pairs"], first["loss_dropped"])
  assert counts[1] > 0 and sum(counts) == 200  # Some of make_pairs' exceed 16 tokens.
  assert (second["loss_pairs"], second["loss_dropped"]) == counts
  assert second["loss"] == pytest.approx(first["loss"])
  reference = evaluate.evaluate_checkpoint(config, tokenizer, model, beam_size=1)
  assert (reference["loss_pairs"], reference["loss_dropped"]) == counts
  assert reference["loss"] == pytest.approx(first["loss"], rel=1e-5)
