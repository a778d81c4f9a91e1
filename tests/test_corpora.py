"""Tests of input_pipeline/corpora.py: every source kind against a plain-Python reading of the
same files, sharding over input pipelines, and every kind of bad input."""
import gzip
import logging
import re

import pytest
import tensorflow as tf

from configs import default
from configs import validate
from input_pipeline import datasets

_PAIRS = [(f"Satz {i}: Grüße, ä\u2028ö", f"sentence {i}: greetings ☃") for i in range(12)]


def _data_config(**overrides):
  data = default.get_config().data
  for key, value in overrides.items():
    data[key] = value
  return data


def _read(source, data_config=None, **kwargs):
  """What a caller gets from read(): (source, target) Python strings, in order."""
  dataset = datasets.read(source, data_config or _data_config(), **kwargs)
  with datasets.surface_corpus_errors():
    return [(s.decode(), t.decode()) for s, t in dataset.as_numpy_iterator()]


def _read_batched(source, data_config):
  """_read for a large corpus: the same pairs in the same order, fetched 4,096 at a time
  (one Python step per pair takes over a minute for embedded:deu-eng's 165,520)."""
  dataset = datasets.read(source, data_config).batch(4096)
  with datasets.surface_corpus_errors():
    return [(s.decode(), t.decode()) for sources, targets in dataset.as_numpy_iterator()
            for s, t in zip(sources, targets)]


def _write(path, content):
  """Writes str (as UTF-8) or bytes to path, gzipped if it ends in .gz; returns str(path)."""
  data = content.encode("utf-8") if isinstance(content, str) else content
  path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
  return str(path)


def _reference_lines(path):
  """A file's lines read the obvious way: UTF-8, split on "\\n" only, BOM dropped."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
    lines = f.read().split("\n")
  return lines[:-1] if lines[-1] == "" else lines


def _reference_tsv(paths, src_col=0, tgt_col=1):
  return [(cols[src_col].strip(), cols[tgt_col].strip())
          for path in paths for cols in (line.split("\t") for line in _reference_lines(path))]


def _reference_text(src_paths, tgt_paths):
  return [(s.strip(), t.strip()) for src, tgt in zip(src_paths, tgt_paths)
          for s, t in zip(_reference_lines(src), _reference_lines(tgt), strict=True)]


def _tsv(pairs):
  return "".join(f"{s}\t{t}\n" for s, t in pairs)


def test_tsv_matches_plain_python_reading(tmp_path):
  # BOM, CRLF, padding spaces and a last line without newline: all read like plain Python.
  content = "\ufeff" + "".join(f"  {s}\t{t} \r\n" for s, t in _PAIRS) + "last\tletzte"
  path = _write(tmp_path / "pairs.tsv", content)
  assert _read(f"tsv:{path}") == _reference_tsv([path])
  assert _read(f"tsv:{path}")[0] == _PAIRS[0]


def test_tsv_columns_and_extra_columns(tmp_path):
  # Tatoeba/Anki export: id, sentence, id, translation, attribution.
  content = "".join(f"{i}\t{s}\t{i + 100}\t{t}\tCC-BY 2.0 (France) #{i}\n"
                    for i, (s, t) in enumerate(_PAIRS))
  path = _write(tmp_path / "tatoeba.tsv", content)
  assert _read(f"tsv:{path}:3:1") == _reference_tsv([path], 3, 1)
  assert _read(f"tsv:{path}:3:1")[0] == (_PAIRS[0][1], _PAIRS[0][0])
  assert _read(f"tsv:{path}")[0] == ("0", _PAIRS[0][0])  # Default columns: 0 and 1.


def test_tsv_gz_shards_by_glob(tmp_path):
  paths = [_write(tmp_path / f"part-{i}.tsv.gz", _tsv(_PAIRS[i::3])) for i in range(3)]
  _write(tmp_path / "other.tsv", "not\tmatched\n")
  got = _read(f"tsv:{tmp_path}/part-*.tsv.gz")
  assert sorted(got) == sorted(_reference_tsv(paths)) == sorted(_PAIRS)


def test_text_sharded_matches_plain_python_reading(tmp_path):
  src = [_write(tmp_path / f"train.de-{i}", "".join(s + "\n" for s, _ in _PAIRS[i::2]))
         for i in range(2)]
  tgt = [_write(tmp_path / f"train.en-{i}", "".join(t + "\r\n" for _, t in _PAIRS[i::2]))
         for i in range(2)]
  got = _read(f"text:{tmp_path}/train.de-*,{tmp_path}/train.en-*")
  assert sorted(got) == sorted(_reference_text(src, tgt)) == sorted(_PAIRS)


def test_text_gz(tmp_path):
  src = _write(tmp_path / "a.de.gz", "".join(s + "\n" for s, _ in _PAIRS))
  tgt = _write(tmp_path / "a.en.gz", "".join(t + "\n" for _, t in _PAIRS))
  assert _read(f"text:{src},{tgt}") == _reference_text([src], [tgt]) == _PAIRS


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  """A TFDS data dir holding tiny_parallel/de-en (40 examples), built here: nothing downloads."""
  import tensorflow_datasets as tfds

  class TinyParallel(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]

    def _info(self):
      features = tfds.features.FeaturesDict({"de": tfds.features.Text(),
                                             "en": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(40):
        yield i, {"de": f"eins {i}", "en": f"one {i}"}

  data_dir = str(tmp_path_factory.mktemp("tiny_tfds"))
  TinyParallel(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_source(tiny_tfds_dir):
  expected = sorted((f"eins {i}", f"one {i}") for i in range(40))
  config = _data_config(tfds_data_dir=tiny_tfds_dir)
  assert sorted(_read("tfds:tiny_parallel/de-en:train", config)) == expected
  config = _data_config(tfds_data_dir=tiny_tfds_dir, tfds_source_key="en",
                        tfds_target_key="de")
  assert sorted(_read("tfds:tiny_parallel/de-en", config)) == sorted(
      (t, s) for s, t in expected)
  halves = [_read("tfds:tiny_parallel/de-en:train", _data_config(tfds_data_dir=tiny_tfds_dir),
                  input_context=tf.distribute.InputContext(2, i, 2)) for i in range(2)]
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == expected


def test_tfds_missing_feature_key_lists_available_keys(tiny_tfds_dir):
  config = _data_config(tfds_data_dir=tiny_tfds_dir, tfds_target_key="fr")
  with pytest.raises(datasets.CorpusError,
                     match=r"data.tfds_target_key = 'fr'.*available feature keys: de, en"):
    datasets.read("tfds:tiny_parallel/de-en", config)


def test_generated_embedded_corpus_reads_its_tfds_split(embedded_data_dir):
  """embedded:validation (the tests' numbers corpus, input_pipeline/cldr_numbers.py) is its
  TFDS split, whole, with or without file shuffling."""
  import tensorflow_datasets as tfds
  got = _read("embedded:validation", _data_config(tfds_data_dir=embedded_data_dir))
  expected = [(ex["source"].decode(), ex["target"].decode()) for ex in tfds.as_numpy(
      tfds.load("cldr_numbers", split="validation", data_dir=embedded_data_dir))]
  assert len(got) == len(expected) > 1000 and sorted(got) == sorted(expected)
  shuffled = _read("embedded:validation", _data_config(tfds_data_dir=embedded_data_dir),
                   shuffle_files=True)
  assert sorted(shuffled) == sorted(expected)


def _unique_pairs(prefix, n):
  return [(f"{prefix} src {i}", f"{prefix} tgt {i}") for i in range(n)]


@pytest.mark.parametrize("num_files", [3, 1])  # 3 files: by file; 1 file: by record.
def test_two_pipelines_see_disjoint_halves(tmp_path, num_files):
  files = [_unique_pairs(f"f{i}", 7) for i in range(num_files)]
  for i, pairs in enumerate(files):
    _write(tmp_path / f"shard-{i}.tsv", _tsv(pairs))
  parts = [_read(f"tsv:{tmp_path}/shard-*.tsv",
                 input_context=tf.distribute.InputContext(2, i, 2)) for i in range(2)]
  assert not set(parts[0]) & set(parts[1])
  assert sorted(parts[0] + parts[1]) == sorted(sum(files, []))
  if num_files == 3:  # File i goes to pipeline i % 2.
    assert sorted(parts[0]) == sorted(files[0] + files[2])
  else:
    assert parts == [files[0][0::2], files[0][1::2]]


def test_text_record_sharding(tmp_path):
  pairs = _unique_pairs("t", 9)
  src = _write(tmp_path / "a.src", "".join(s + "\n" for s, _ in pairs))
  tgt = _write(tmp_path / "a.tgt", "".join(t + "\n" for _, t in pairs))
  parts = [_read(f"text:{src},{tgt}", input_context=tf.distribute.InputContext(2, i, 2))
           for i in range(2)]
  assert parts == [pairs[0::2], pairs[1::2]]


def test_shuffle_files_is_seeded(tmp_path):
  for i in range(4):
    _write(tmp_path / f"s{i}.tsv", _tsv(_unique_pairs(f"f{i}", 2)))
  source = f"tsv:{tmp_path}/s*.tsv"
  in_order = _read(source)
  orders = [_read(source, shuffle_files=True, seed=seed) for seed in range(3)]
  assert all(sorted(order) == sorted(in_order) for order in orders)
  assert any(order != in_order for order in orders)
  assert _read(source, shuffle_files=True, seed=2) == orders[2]


# (bad line as bytes, reason counted, what the log says)
_BAD_TSV_LINES = {
    "too few columns": (b"only one column", "too few columns",
                        "1 tab-separated columns, need at least 2"),
    "whitespace-only side": (b"hallo\t \t", "empty side", "empty target"),
    "unicode-space side": ("\u3000\thello".encode(), "empty side", "empty source"),
    "invalid UTF-8": (b"caf\xe9\tcoffee", "invalid UTF-8", "invalid UTF-8 in the source at byte 3"),
    "NUL byte": (b"ok\tn\x00l", "NUL byte", "NUL byte in the target"),
    "100k-char line": (b"x" * 100_000 + b"\tshort", "over-long", "source over 10000 bytes"),
    "2 MiB line": (b"y" * (2 << 20), "over-long", "line over 1048576 bytes"),
}


@pytest.mark.parametrize("case", _BAD_TSV_LINES)
def test_bad_tsv_line_is_skipped_counted_and_logged(tmp_path, caplog, case):
  bad, reason, logged = _BAD_TSV_LINES[case]
  good = _unique_pairs("g", 30)
  path = _write(tmp_path / "bad.tsv", _tsv(good[:10]).encode() + bad + b"\n" +
                _tsv(good[10:]).encode())
  stats = datasets.SkipStats()
  caplog.set_level(logging.INFO, logger="absl")
  assert _read(f"tsv:{path}", _data_config(max_skip_fraction=0.05), stats=stats) == good
  assert stats.per_file() == {path: (30, {reason: 1})}
  assert f"{path}:11: skipped line: {logged}" in caplog.text
  assert f"{path}: 30 read, 1 skipped (1 {reason})" in caplog.text


@pytest.mark.parametrize("side", ["src", "tgt"])
@pytest.mark.parametrize("bad, reason", [(b"   ", "empty side"), (b"\xff\xfe", "invalid UTF-8"),
                                         (b"a\x00", "NUL byte"), (b"z" * 10_001, "over-long")])
def test_bad_text_line_names_its_file(tmp_path, caplog, side, bad, reason):
  good = _unique_pairs("g", 20)
  lines = {"src": [s.encode() for s, _ in good], "tgt": [t.encode() for _, t in good]}
  lines[side][4] = bad
  paths = {k: _write(tmp_path / f"a.{k}", b"\n".join(v) + b"\n") for k, v in lines.items()}
  stats = datasets.SkipStats()
  caplog.set_level(logging.WARNING, logger="absl")
  got = _read(f"text:{paths['src']},{paths['tgt']}", _data_config(max_skip_fraction=0.1),
              stats=stats)
  assert got == good[:4] + good[5:]
  assert stats.skipped == {reason: 1} and stats.read == 19
  assert f"{paths[side]}:5: skipped line" in caplog.text


def test_skip_logging_is_rate_limited(tmp_path, caplog):
  path = _write(tmp_path / "many.tsv", "bad\n" * 15 + _tsv(_unique_pairs("g", 85)))
  caplog.set_level(logging.INFO, logger="absl")
  stats = datasets.SkipStats()
  assert len(_read(f"tsv:{path}", _data_config(max_skip_fraction=0.2), stats=stats)) == 85
  assert caplog.text.count("skipped line:") == 10
  assert f"{path}:10: skipped line" in caplog.text
  assert f"{path}:11: skipped line" not in caplog.text
  assert "further skipped lines are only counted" in caplog.text
  assert f"{path}: 85 read, 15 skipped (15 too few columns)" in caplog.text
  assert stats.skipped == {"too few columns": 15}


def test_too_many_skipped_lines_fail_with_the_config_key(tmp_path):
  path = _write(tmp_path / "mostly-bad.tsv", "a\tb\nbroken\nc\td\ne\tf\n")
  message = re.escape(f"{path}: 1 of 4 lines skipped as malformed (1 too few columns), more "
                      f"than data.max_skip_fraction = 0.01")
  stats = datasets.SkipStats()
  with pytest.raises(datasets.CorpusError, match=message):  # What read_pairs' callers see.
    list(datasets.read_pairs(f"tsv:{path}", _data_config(), stats=stats))
  assert stats.per_file() == {path: (3, {"too few columns": 1})}
  with pytest.raises(datasets.CorpusError, match=message):  # Iterating read()'s dataset.
    _read(f"tsv:{path}")
  # Without surface_corpus_errors tf.data still carries the message, inside its own error.
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    list(datasets.read(f"tsv:{path}", _data_config()))
  assert _read(f"tsv:{path}", _data_config(max_skip_fraction=0.25)) == [
      ("a", "b"), ("c", "d"), ("e", "f")]


def test_misaligned_text_files_fail_naming_both(tmp_path):
  src = _write(tmp_path / "x.de", "eins\nzwei\ndrei\n")
  tgt = _write(tmp_path / "x.en", "one\ntwo\n")
  with pytest.raises(datasets.CorpusError,
                     match=re.escape(f"{src} has 3 lines but {tgt} has 2")):
    datasets.read(f"text:{src},{tgt}", _data_config())


@pytest.mark.parametrize("pipeline", [0, 1])
def test_text_file_changed_after_read_fails_naming_both(tmp_path, pipeline):
  src = _write(tmp_path / "x.de", "eins\nzwei\ndrei\n")
  tgt = _write(tmp_path / "x.en", "one\ntwo\nthree\n")
  dataset = datasets.read(f"text:{src},{tgt}", _data_config(),
                         input_context=tf.distribute.InputContext(2, pipeline, 2))
  _write(tmp_path / "x.en", "one\ntwo\n")  # Line 3 is pipeline 0's, yet both notice.
  with pytest.raises(datasets.CorpusError, match=re.escape(f"{src} has 3 lines but {tgt} has 2")):
    with datasets.surface_corpus_errors():
      list(dataset)


def test_text_globs_matching_different_numbers_of_files(tmp_path):
  for name in ("a.de.0", "a.de.1", "a.en.0"):
    _write(tmp_path / name, "x\n")
  with pytest.raises(datasets.CorpusError, match=r"matches 2 files but .* matches 1"):
    datasets.read(f"text:{tmp_path}/a.de.*,{tmp_path}/a.en.*", _data_config())


@pytest.mark.parametrize("source", ["tsv:{d}/missing.tsv", "tsv:{d}/*.none:0:1",
                                    "text:{d}/present.txt,{d}/missing.txt"])
def test_missing_files_are_named(tmp_path, source):
  _write(tmp_path / "present.txt", "x\n")
  source = source.format(d=tmp_path)
  missing = source.rsplit(",", 1)[-1].removeprefix("tsv:").removesuffix(":0:1")
  with pytest.raises(datasets.CorpusError, match=re.escape(f"no file matches '{missing}'")):
    datasets.read(source, _data_config())


@pytest.mark.parametrize("name", ["empty.tsv", "empty.tsv.gz"])
def test_empty_file_is_an_error(tmp_path, name):
  path = _write(tmp_path / name, b"")
  with pytest.raises(datasets.CorpusError, match=re.escape(f"every matching file is empty: {path}")):
    datasets.read(f"tsv:{path}", _data_config())


def test_empty_shard_among_others_is_a_warning(tmp_path, caplog):
  empty = _write(tmp_path / "p0.tsv", b"")
  _write(tmp_path / "p1.tsv", _tsv(_PAIRS))
  caplog.set_level(logging.WARNING, logger="absl")
  assert _read(f"tsv:{tmp_path}/p*.tsv") == _PAIRS
  assert f"{empty}: empty file, skipped" in caplog.text


def test_corrupt_gzip_is_named(tmp_path):
  path = tmp_path / "broken.tsv.gz"
  path.write_bytes(gzip.compress(_tsv(_PAIRS).encode())[:40])  # Truncated.
  with pytest.raises(datasets.CorpusError, match=re.escape(f"{path}: cannot read the file")):
    list(datasets.read_pairs(f"tsv:{path}", _data_config()))


@pytest.mark.parametrize("source", ["csv:foo", "tsv:", "tsv:f.tsv:a:b", "tsv:f.tsv:1",
                                    "text:only-one", "text:a,", "tfds:", "embedded:", "",
                                    "train.tsv", "embedded:deu-eng:validation", "holdout:0",
                                    "holdout:"])
def test_bad_source_strings_list_the_valid_forms(source):
  with pytest.raises(ValueError, match=r"valid forms: embedded:deu-eng\[:train\|dev\|test\], "
                                       r"embedded\[:cldr_numbers\]\[:SPLIT\], "
                                       r"tsv:PATH\[:SRC_COL:TGT_COL\], text:SRC_GLOB,TGT_GLOB, "
                                       r"tfds:NAME\[:SPLIT\]") as error:
    datasets.parse_source(source)
  assert repr(source) in str(error.value)


@pytest.mark.parametrize("source, expected", [
    ("embedded", dict(kind="embedded", name="cldr_numbers", split="train")),
    ("embedded:validation", dict(kind="embedded", split="validation")),
    ("embedded:cldr_numbers:test", dict(kind="embedded", name="cldr_numbers", split="test")),
    ("embedded:deu-eng", dict(kind="embedded", name="deu-eng", split="train")),
    ("embedded:deu-eng:dev", dict(name="deu-eng", split="dev")),
    ("holdout:2000", dict(kind="holdout", count=2000)),
    ("tsv:data/a.tsv", dict(kind="tsv", paths=("data/a.tsv",), columns=(0, 1))),
    ("tsv:gs://bucket/a-*.tsv.gz:3:1", dict(paths=("gs://bucket/a-*.tsv.gz",), columns=(3, 1))),
    ("tsv:gs://bucket/a.tsv", dict(paths=("gs://bucket/a.tsv",), columns=(0, 1))),
    ("text:a.de*,a.en*", dict(kind="text", paths=("a.de*", "a.en*"))),
    ("tfds:wmt14_translate/de-en:train[:10%]",
     dict(kind="tfds", name="wmt14_translate/de-en", split="train[:10%]")),
    ("tfds:wmt14_translate/de-en:1.0.0:test", dict(name="wmt14_translate/de-en:1.0.0",
                                                   split="test")),
    ("tfds:tiny", dict(name="tiny", split="train")),
])
def test_parse_source(source, expected):
  spec = datasets.parse_source(source)
  assert {key: getattr(spec, key) for key in expected} == expected


@pytest.mark.parametrize("key, value, message", [
    ("length_policy", "clip", "config.data.length_policy='clip' is invalid: must be one of "
                              "drop | truncate"),
    ("batch_by", "words", "config.data.batch_by='words' is invalid: must be one of "
                          "sentences | tokens"),
    ("max_skip_fraction", 1.5, "config.data.max_skip_fraction=1.5 is invalid: must be a "
                               "number >= 0 and <= 1"),
    ("max_skip_fraction", -0.1, "config.data.max_skip_fraction=-0.1 is invalid"),
    ("max_target_length", 0, "config.data.max_target_length=0 is invalid: must be an integer"
                             " >= 3"),
    ("shuffle_buffer", -5, "config.data.shuffle_buffer=-5 is invalid: must be an integer "
                           ">= 0"),
    ("bucket_boundaries", (16, 8, 64), "strictly increasing"),
    ("bucket_boundaries", (), "a non-empty sequence of positive integers"),
])
def test_invalid_data_config_names_key_and_value(key, value, message):
  from configs import validate
  config = default.get_config()
  config.data[key] = value
  with pytest.raises(validate.ConfigError) as error:
    validate.validate(config)
  assert message in str(error.value)


@pytest.mark.parametrize("source, message", [
    ("csv:train.csv", "data source 'csv:train.csv' is not valid"),
    ("tsv:", "data source 'tsv:' is not valid"),
])
def test_malformed_source_string_is_named(source, message):
  with pytest.raises(datasets.CorpusError, match=re.escape(message)):
    datasets.read(source, default.get_config().data)



def test_read_pairs_limit(tmp_path):
  path = _write(tmp_path / "a.tsv", _tsv(_PAIRS))
  assert list(datasets.read_pairs(f"tsv:{path}", _data_config(), limit=3)) == _PAIRS[:3]
  assert list(datasets.read_pairs(f"tsv:{path}", _data_config())) == _PAIRS
  with pytest.raises(ValueError, match="limit = -1"):
    datasets.read_pairs(f"tsv:{path}", _data_config(), limit=-1)


def test_sample_pairs_draws_from_every_file_in_proportion(tmp_path):
  """The tokenizer's sample: file a (sorted first) alone is larger than the sample, yet b,
  a quarter of the corpus, gives about a quarter of it; the same seed, the same sample."""
  a = _write(tmp_path / "a.tsv", _tsv((f"a {i}", f"A {i}") for i in range(3000)))
  _write(tmp_path / "b.tsv", _tsv((f"b {i}", f"B {i}") for i in range(1000)))
  source = f"tsv:{tmp_path}/*.tsv"
  sample = list(datasets.sample_pairs(source, _data_config(), 500, seed=1))
  assert len(sample) == len(set(sample)) == 500
  from_b = sum(src.startswith("b ") for src, _ in sample)
  assert 85 <= from_b <= 165, from_b  # 125 expected; the standard deviation is about 9.
  assert sample == sorted(sample, key=lambda p: (p[0][0], int(p[0].split()[1])))  # Order.
  assert list(datasets.sample_pairs(source, _data_config(), 500, seed=1)) == sample
  assert list(datasets.sample_pairs(source, _data_config(), 500, seed=2)) != sample
  everything = list(datasets.sample_pairs(f"tsv:{a}", _data_config(), 5000))
  assert everything == list(datasets.read_pairs(f"tsv:{a}", _data_config()))
  with pytest.raises(ValueError, match="size = 0"):
    datasets.sample_pairs(source, _data_config(), 0)


def _holdout_corpus(tmp_path, name="train.tsv", order=1):
  """60 pairs, 10 of whose sources have a second translation; `order` -1 reverses the file."""
  pairs = [(f"Quelle {i}", f"target {i}") for i in range(50)]
  pairs += [(f"Quelle {i}", f"other target {i}") for i in range(10)]
  return pairs, _write(tmp_path / name, _tsv(pairs[::order]))


def test_holdout_carves_a_deterministic_disjoint_dev_set(tmp_path):
  pairs, path = _holdout_corpus(tmp_path)
  data = _data_config(train=f"tsv:{path}", eval="holdout:12")
  dev, train = _read(data.eval, data), _read(data.train, data)
  assert 12 <= len(dev) <= 13  # 13 if the 12th source has a second translation.
  assert sorted(dev + train) == sorted(pairs)  # Nothing lost, nothing twice.
  assert not {src for src, _ in dev} & {src for src, _ in train}
  # The same split whatever the file order and name: it depends on the sentences only.
  _, reversed_path = _holdout_corpus(tmp_path, "reversed.tsv", order=-1)
  data_reversed = _data_config(train=f"tsv:{reversed_path}", eval="holdout:12")
  assert sorted(_read(data_reversed.eval, data_reversed)) == sorted(dev)
  # The tokenizer sample (read_pairs of data.train) leaves the dev set out too.
  assert not set(datasets.read_pairs(data.train, data)) & set(dev)


def test_holdout_larger_than_the_corpus_is_named(tmp_path):
  _, path = _holdout_corpus(tmp_path)
  data = _data_config(train=f"tsv:{path}", eval="holdout:60")
  with pytest.raises(datasets.CorpusError, match=r"holdout:60.*has only 60"):
    _read(data.eval, data)


@pytest.mark.parametrize("train, eval_, message", [
    ("holdout:5", "holdout:5", "config.data.train='holdout:5' is invalid: holdout:N is a dev "
                               "set carved out of data.train; it is for data.eval only"),
    ("tsv:a.tsv", "holdout:0", "config.data.eval='holdout:0' is invalid: holdout:N needs"),
    ("tsv:a.tsv", "holdout:x", "config.data.eval='holdout:x' is invalid"),
    ("prepared:d", "holdout:5", "run nmt-prepare with data.eval=holdout:N"),
    ("csv:x.csv", "holdout:5", "config.data.train='csv:x.csv' is invalid: must start with one "
                               "of embedded:, tsv:, text:, tfds:, prepared:, holdout:"),
    ("tsv:", "holdout:5", "config.data.train='tsv:' is invalid: tsv: needs a PATH; the form "
                          "is tsv:PATH[:SRC_COL:TGT_COL]"),
])
def test_source_config_errors_name_the_key(train, eval_, message):
  config = default.get_config()
  config.data.train, config.data.eval = train, eval_
  with pytest.raises(validate.ConfigError, match=re.escape(message)):
    datasets.check_sources(config)


def test_embedded_deu_eng_splits_are_disjoint_by_the_holdout_rule():
  data = _data_config()
  splits = {split: _read_batched(f"embedded:deu-eng:{split}", data)
            for split in ("train", "dev", "test")}
  assert {k: len(v) for k, v in splits.items()} == {"train": 165520, "dev": 2000, "test": 2000}
  sources = {k: {src for src, _ in v} for k, v in splits.items()}
  assert not sources["train"] & sources["dev"] and not sources["test"] & (
      sources["train"] | sources["dev"])
  # dev = the pairs with the smallest source hashes, as data.eval=holdout:2000 would carve it.
  hashes = {k: datasets._source_hash(tf.constant(sorted(v))).numpy() for k, v in sources.items()}
  assert hashes["dev"].max() < hashes["train"].min()
  assert splits["test"][0] == ("Ich glaube, du hast, was ich brauche.",
                               "I think you've got what I need.")
