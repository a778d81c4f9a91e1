"""Tests for the embedded corpus: size, determinism, split hygiene, content, TFDS loading."""
import collections
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

from babel import dates as babel_dates
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from input_pipeline import cldr_numbers

_REPO = pathlib.Path(__file__).resolve().parents[1]
_DIGEST = ("import hashlib, json\n"
           "from input_pipeline import cldr_numbers\n"
           "pairs = cldr_numbers.generate_pairs()\n"
           "print(hashlib.md5(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest())\n")


@pytest.fixture(scope="module")
def pairs():
  return cldr_numbers.generate_pairs()


@pytest.fixture(scope="module")
def translation(pairs):
  return {pair["source"]: pair["target"] for pair in pairs}


def _load(data_dir, split):
  """A split read back through tfds.load, as a list of str dicts."""
  dataset = tfds.load("cldr_numbers", split=split, data_dir=data_dir, download=False)
  return [{key: value.decode("utf-8") for key, value in example.items()}
          for example in tfds.as_numpy(dataset)]


def test_at_least_100k_distinct_pairs_and_one_target_per_source(pairs):
  assert len({(pair["source"], pair["target"]) for pair in pairs}) >= 100_000
  assert len({pair["source"] for pair in pairs}) == len(pairs)


@pytest.mark.slow  # A second generation in a subprocess: ~5 s of CPU.
def test_same_pairs_in_same_order_in_a_new_process_with_another_hash_seed(pairs):
  env = dict(os.environ, PYTHONHASHSEED="12345", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-c", _DIGEST], cwd=_REPO, env=env,
                          capture_output=True, text=True, check=True)
  expected = hashlib.md5(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()
  assert result.stdout.strip() == expected


def test_every_pair_is_short_enough_for_the_tiny_model(pairs):
  for side in ("source", "target"):
    assert max(len(pair[side]) for pair in pairs) <= cldr_numbers.MAX_CHARS
    assert max(len(pair[side].split()) for pair in pairs) <= cldr_numbers.MAX_WORDS


def test_all_languages_and_categories_are_well_represented(pairs):
  languages = collections.Counter(pair["language"] for pair in pairs)
  categories = collections.Counter(pair["category"] for pair in pairs)
  assert set(languages) == {"de", "fr", "es", "it", "nl", "pt"}
  assert min(languages.values()) > 0.15 * len(pairs)
  assert set(categories) == {"cardinal", "ordinal", "year", "date", "time", "amount"}
  assert min(categories.values()) > 0.01 * len(pairs)


@pytest.mark.parametrize("source, target", [
    ("dreiundzwanzig", "twenty-three"),  # German says the unit before the tens.
    ("vingt-trois", "twenty-three"),
    ("zum dreiundzwanzigsten Mal", "for the 23rd time"),
    ("am dritten März", "on March 3"),  # Day-month becomes month-day.
    ("le vingt-deux juin", "on June 22"),
    ("el 22 de junio", "on June 22"),
    ("um vierzehn Uhr fünf", "at 2:05 PM"),
    ("um halb drei", "at half past two"),  # German names the next hour.
    ("a las tres menos cuarto", "at a quarter to three"),
    ("im Jahr 1984", "in nineteen eighty-four"),
    ("im Jahr neunzehnhundertvierundachtzig", "in 1984"),
    ("op de 3e verdieping", "on the third floor"),
])
def test_known_translations(translation, source, target):
  assert translation[source] == target


def test_german_dates_move_the_month_before_the_day(pairs):
  months = babel_dates.get_month_names("wide", locale="de")
  english = babel_dates.get_month_names("wide", locale="en")
  month_number = {name: number for number, name in months.items()}
  checked = 0
  for pair in pairs:
    match = re.fullmatch(r"am (\d+)\. (\w+) (\d{4})", pair["source"])
    if pair["language"] == "de" and match:
      day, month, year = match.groups()
      assert pair["target"] == f"on {english[month_number[month]]} {day}, {year}"
      checked += 1
  assert checked > 1000


def test_tiny_configs_probe_sentences_are_validation_sources(pairs):
  validation = {pair["source"] for pair in cldr_numbers.split_pairs(pairs)["validation"]}
  assert set(tiny.get_config().eval.probe_sentences) <= validation


def test_splits_are_disjoint_by_source(pairs):
  splits = cldr_numbers.split_pairs(pairs)
  sources = {name: {pair["source"] for pair in split} for name, split in splits.items()}
  assert not sources["train"] & sources["validation"]
  assert not sources["train"] & sources["test"]
  assert not sources["validation"] & sources["test"]
  for name in ("validation", "test"):
    assert 0.005 * len(pairs) < len(sources[name]) < 0.02 * len(pairs)


def test_tfds_load_yields_the_generated_pairs(embedded_data_dir, pairs):
  splits = cldr_numbers.split_pairs(pairs)
  for name in ("validation", "test"):
    assert _load(embedded_data_dir, name) == splits[name]
  builder = tfds.builder("cldr_numbers", data_dir=embedded_data_dir)
  assert builder.info.splits["train"].num_examples == len(splits["train"])
  assert _load(embedded_data_dir, "train[:500]") == splits["train"][:500]


def test_tfds_supervised_keys_are_source_and_target(embedded_data_dir, pairs):
  dataset = tfds.load("cldr_numbers", split="test", data_dir=embedded_data_dir,
                      as_supervised=True, download=False)
  source, target = next(iter(tfds.as_numpy(dataset)))
  first = cldr_numbers.split_pairs(pairs)["test"][0]
  assert (source.decode("utf-8"), target.decode("utf-8")) == (first["source"], first["target"])
