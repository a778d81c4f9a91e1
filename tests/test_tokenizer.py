"""Tests for input_pipeline/tokenizer.py on tiny SentencePiece models (vocab ~100)."""
import os

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from configs import tiny
from configs import validate
from input_pipeline import tokenizer as tokenizer_lib
import word_pairs  # tests/word_pairs.py


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
  """n distinct (de|fr, en) word-for-word pairs of 1-8 words."""
  return word_pairs.make_pairs(n, seed, max_words=8, sources=(word_pairs.DE, word_pairs.FR))


def tok_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      model_type="unigram", vocab_size=100, joint=True, sample_size=400,
      character_coverage=1.0))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def pairs():
  return make_pairs(400)


@pytest.fixture(scope="module")
def joint_workdir(pairs, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("joint"))
  tokenizer_lib.load_or_train(tok_config(), workdir, lambda: iter(pairs))
  return workdir


@pytest.fixture(scope="module")
def joint_tokenizer(joint_workdir):
  return tokenizer_lib.load_or_train(tok_config(), joint_workdir, None)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_round_trip(pairs, tmp_path, model_type):
  tok = tokenizer_lib.load_or_train(tok_config(model_type=model_type), str(tmp_path),
                                    lambda: iter(pairs))
  sentences = [p[1] for p in make_pairs(20, seed=1)] + [p[0] for p in make_pairs(20, seed=2)]
  ids = tok.tokenize_target(sentences)
  assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
  assert tok.detokenize_target(ids).numpy().tolist() == [s.encode() for s in sentences]
  assert tok.detokenize_target(ids.to_tensor()).numpy().tolist() == [
      s.encode() for s in sentences]


def test_special_ids_are_fixed(joint_tokenizer):
  tok = joint_tokenizer
  assert (tokenizer_lib.PAD_ID, tokenizer_lib.UNK_ID, tokenizer_lib.BOS_ID,
          tokenizer_lib.EOS_ID) == (0, 1, 2, 3)
  pieces = tok.target_pieces(tf.constant([0, 1, 2, 3])).numpy().tolist()
  assert pieces == [b"<pad>", b"<unk>", b"<s>", b"</s>"]
  assert tok.source_vocab_size == tok.target_vocab_size == 100
  ids = tok.tokenize_target(["three march"])
  assert not set(ids.flat_values.numpy()) & {0, 1, 2, 3}  # No BOS/EOS added.


def test_detokenize_cuts_at_eos_and_drops_pad_and_bos(joint_tokenizer):
  tok = joint_tokenizer
  ids = tok.tokenize_target(["two thousand", "may"]).to_tensor()
  noise = tok.tokenize_target(["ninety nine"]).flat_values
  rows = [[2] + list(ids[i].numpy()) + [3] + list(noise.numpy()) + [0, 0] for i in range(2)]
  width = max(map(len, rows))
  dense = tf.constant([row + [0] * (width - len(row)) for row in rows], tf.int32)
  assert tok.detokenize_target(dense).numpy().tolist() == [b"two thousand", b"may"]


def test_separate_models_per_side(pairs, tmp_path):
  tok = tokenizer_lib.load_or_train(tok_config(joint=False, vocab_size=50), str(tmp_path),
                                    lambda: iter(pairs))
  assert not tok.joint
  assert sorted(os.listdir(tmp_path / "tokenizer")) == [
      "source.model", "target.model", "tokenizer.json"]
  # The target model saw English only: German umlauts are unknown to it.
  assert tokenizer_lib.UNK_ID in tok.tokenize_target(["zwölf"]).flat_values.numpy()
  assert tokenizer_lib.UNK_ID not in tok.tokenize_source(["zwölf"]).flat_values.numpy()
  source = ["zwölf und zwanzig", "le vingt mars"]
  assert tok.source_pieces(tok.tokenize_source(source)).shape.rank == 2


def test_reuses_stored_tokenizer_and_rejects_changed_config(pairs, tmp_path):
  workdir = str(tmp_path)
  first = tokenizer_lib.load_or_train(tok_config(), workdir, lambda: iter(pairs))

  def must_not_train():
    raise AssertionError("A stored tokenizer must be reused, not retrained.")

  second = tokenizer_lib.load_or_train(tok_config(), workdir, must_not_train)
  sentence = ["zwei und zwanzig mai"]
  assert (first.tokenize_source(sentence).to_list() ==
          second.tokenize_source(sentence).to_list())
  with pytest.raises(ValueError) as error:
    tokenizer_lib.load_or_train(tok_config(vocab_size=90, model_type="bpe"), workdir,
                                must_not_train)
  message = str(error.value)
  assert "tokenizer.vocab_size" in message and "tokenizer.model_type" in message
  assert os.path.join(workdir, "tokenizer") in message
  assert "joint" not in message


def test_vocab_too_large_is_a_clear_error(pairs, tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.load_or_train(tok_config(vocab_size=5000), str(tmp_path),
                                lambda: iter(pairs))
  assert not os.path.exists(tmp_path / "tokenizer" / tokenizer_lib.CONFIG_FILE)


def test_works_in_tf_data_and_tf_function(joint_tokenizer):
  tok = joint_tokenizer
  sentences = ["one hundred", "twelve march", "four"]
  dataset = tf.data.Dataset.from_tensor_slices(sentences).batch(2).map(
      tok.tokenize_target, num_parallel_calls=tf.data.AUTOTUNE)
  ids = [row for batch in dataset for row in batch.to_list()]
  assert ids == tok.tokenize_target(sentences).to_list()

  @tf.function
  def round_trip(strings):
    return tok.detokenize_target(tok.tokenize_target(strings).to_tensor())

  assert round_trip(tf.constant(sentences)).numpy().tolist() == [
      s.encode() for s in sentences]


class _Exported(tf.Module):

  def __init__(self, tok):
    super().__init__()
    self.tokenizer = tok

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def round_trip(self, strings):
    ids = self.tokenizer.tokenize_target(strings).to_tensor()
    return {"text": self.tokenizer.detokenize_target(ids),
            "pieces": self.tokenizer.source_pieces(self.tokenizer.tokenize_source(strings))
                      .to_tensor(default_value="")}


def test_saved_model_round_trip(joint_tokenizer, tmp_path):
  path = str(tmp_path / "saved_model")
  exported = _Exported(joint_tokenizer)
  expected = exported.round_trip(tf.constant(["thirty one june"]))
  tf.saved_model.save(exported, path)
  loaded = tf.saved_model.load(path)
  result = loaded.round_trip(tf.constant(["thirty one june"]))
  assert result["text"].numpy().tolist() == [b"thirty one june"]
  assert result["pieces"].numpy().tolist() == expected["pieces"].numpy().tolist()


# ------------------------------------------------- subword regularisation (SubwordSampler)

def _seed(*values):
  return tf.constant(values, tf.int64)


def test_sampled_segmentations_are_seeded_and_spell_the_text(joint_tokenizer):
  tok = joint_tokenizer
  sampler = tok.sampler(alpha=0.1, nbest=8)
  # Empty and blank lines (one empty candidate each) among the sentences, also first.
  texts = (["", "  ", "a"] + [p[0] for p in make_pairs(30, seed=3)] + ["", "b", " "]
           + [p[1] for p in make_pairs(30, seed=4)])
  first = sampler.tokenize_source(texts, _seed(0, 1))
  assert tok.detokenize_target(first).numpy().tolist() == [
      " ".join(t.split()).encode() for t in texts]
  assert first.to_list() == sampler.tokenize_source(texts, _seed(0, 1)).to_list()
  best = tok.tokenize_source(texts).to_list()
  other = sampler.tokenize_source(texts, _seed(0, 2)).to_list()
  assert sum(a != b for a, b in zip(first.to_list(), best)) >= 10
  assert sum(a != b for a, b in zip(first.to_list(), other)) >= 10
  assert sampler.tokenize_target(texts, _seed(0, 1)).to_list() != first.to_list()


def test_sampling_draws_as_sentencepiece_does(joint_workdir, joint_tokenizer):
  """P(a candidate) = softmax(alpha * its score) over SentencePiece's own n-best scores:
  P(best) grows with alpha and matches it within 4 standard deviations (400 draws)."""
  sentence, draws = "vingt-trois mai mille", 400
  processor = spm.SentencePieceProcessor(
      model_file=os.path.join(joint_workdir, "tokenizer", "joint.model"))
  nbest = processor.nbest_encode_as_proto(sentence, 8).nbests
  assert len(nbest) >= 4
  scores = np.array([candidate.score for candidate in nbest])
  best = [piece.id for piece in nbest[0].pieces]
  frequencies = []
  for alpha in (0.02, 0.1, 0.5):
    sampler = joint_tokenizer.sampler(alpha=alpha, nbest=8)
    rows = sampler.tokenize_source([sentence] * draws, _seed(7, 0)).to_list()
    frequency = np.mean([row == best for row in rows])
    expected = 1 / np.exp(alpha * (scores - scores[0])).sum()
    assert abs(frequency - expected) < 4 * np.sqrt(expected * (1 - expected) / draws) + 0.01
    frequencies.append(frequency)
  assert frequencies[0] < frequencies[1] < frequencies[2]


def test_bpe_models_cannot_sample(pairs, tmp_path):
  tok = tokenizer_lib.load_or_train(tok_config(model_type="bpe"), str(tmp_path),
                                    lambda: iter(pairs))
  with pytest.raises(ValueError, match="tokenizer.model_type='unigram'"):
    tok.sampler(alpha=0.1, nbest=8)
  config = tiny.get_config()
  config.tokenizer.model_type, config.tokenizer.sampling_alpha = "bpe", 0.1
  with pytest.raises(validate.ConfigError, match="sampling_alpha=0.1 with config.tokenizer."
                     "model_type='bpe'"):
    validate.validate(config)
  config.tokenizer.model_type, config.tokenizer.sampling_nbest = "unigram", -1
  with pytest.raises(validate.ConfigError, match="sampling_nbest=-1 is invalid: .* >= 2"):
    validate.validate(config)
