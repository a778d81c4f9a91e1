"""The embedded default corpus: numbers, dates, times and amounts from six languages to English.

A parallel corpus generated offline and deterministically, so that the default config trains
on a real reordering task with nothing to download: German unit-before-tens ("dreiundzwanzig"
-> "twenty-three"), day-month order ("am 3. März 2021" -> "on March 3, 2021"), spoken clock
times ("um halb drei" -> "at half past two") and spelled numbers inside phrases
("dreiundzwanzig Euro fünfzig" -> "twenty-three euros and fifty cents"), with spelled and
digit forms on either side. Sources are German, French, Spanish, Italian, Dutch and European
Portuguese; targets are US English.

Measured for seed 0: 113,466 distinct pairs, one target per source; train 111,258,
validation 1,109, test 1,099 (the split is fixed by an md5 hash of the source). Languages:
de, fr, es, it, nl 16.8% each, pt 16.1% (long Portuguese phrases are dropped more often).
Categories: date 28.9%, cardinal 20.0% (with measurements such as "23 Kilometer"), year 17.4%,
amount 16.7%, time 15.4%, ordinal 1.6%. Every source and target has at most 12 words and 80
characters (3.6 words on average).

How it is built: no corpus text is copied. Month, weekday, unit and currency names and the
date and time patterns come from CLDR via babel; numbers are spelled by num2words; the short
phrases around them ("am", "zum ... Mal", "y cuarto") are in _LANGUAGES below. Per language,
each category's forms are either enumerated (numbers 0..999, years 1000..2099, every minute,
every day of the year, ordinals 1..100) or sampled with random.Random(seed) (larger numbers,
dates of 1900..2099, amounts, measurements). Over-long pairs are dropped, a repeated source
keeps its first target, and the result is shuffled with the same generator.

Importing this module registers the TFDS builder: `tfds.load("cldr_numbers", data_dir=...)`.
generate_pairs() returns the same pairs without TFDS.
"""
import dataclasses
import datetime
import decimal
import hashlib
import math
import random
import re
from typing import Iterator

from absl import logging
import babel
from babel import dates as babel_dates
from babel import numbers as babel_numbers
from babel import units as babel_units
from num2words import num2words
import tensorflow_datasets as tfds

MAX_WORDS = 12  # Longest source or target in words; longer pairs are dropped.
MAX_CHARS = 80  # Longest source or target in characters; longer pairs are dropped.
SPLITS = ("train", "validation", "test")

# Pairs sampled per source language (the other forms are enumerated in full).
_BIG_CARDINALS = 800  # Spelled numbers from 2,100..99,999 (0..999 are all included).
_QUANTITIES = 1000  # Number-unit pairs per direction: spelled -> digits and digits -> spelled.
_DATES = (1600, 1600, 1000, 600)  # Long with digits, long spelled, with weekday, short numeric.
_AMOUNTS = (1200, 1200, 800)  # Spelled with cents, CLDR digits, spelled whole units.
# CLDR units whose noun is masculine in every source language, so a spelled number before it
# needs no feminine form.
_UNITS = ("length-kilometer", "length-meter", "length-centimeter", "mass-kilogram", "mass-gram",
          "volume-liter", "temperature-celsius", "speed-kilometer-per-hour")
_CURRENCIES = ("EUR", "USD", "CHF", "JPY")
_CENT_CURRENCIES = ("EUR", "USD")  # English names their subunit "cent".


@dataclasses.dataclass(frozen=True)
class _Language:
  """How one source language phrases what surrounds a number; CLDR and num2words do the rest."""
  code: str  # The `language` feature and num2words' language code.
  locale: str  # Babel (CLDR) locale; pt_PT matches num2words' European Portuguese.
  on_date: str  # "on DATE".
  in_year: str  # "in YEAR".
  at_clock: str  # "at HH:MM" (digits); hour 1 uses at_one, as in "a la 1:05".
  at_one: str
  nth_time: str  # "for the Nth time", filled with a spelled ordinal (feminine where it agrees).
  on_floor: str  # "on the Nth floor", filled with a digit ordinal.
  cents: str  # A spelled amount with cents, read the way people say prices.
  minutes: str  # A spelled 24-hour time "{at} {minutes}"; on_the_hour is used at minute 0.
  on_the_hour: str
  quarters: tuple[str, str, str]  # Quarter past, half past, quarter to: "{at}" or bare "{hour}".
  half_names_next_hour: bool  # German and Dutch "halb drei" is 2:30.


_LANGUAGES = (
    _Language(
        code="de", locale="de", on_date="am {}", in_year="im Jahr {}",
        at_clock="um {} Uhr", at_one="um {} Uhr", nth_time="zum {}n Mal",
        on_floor="im {}. Stock", cents="{units} {currency} {cents}",
        minutes="{at} {minutes}", on_the_hour="{at}",
        quarters=("um Viertel nach {hour}", "um halb {hour}", "um Viertel vor {hour}"),
        half_names_next_hour=True),
    _Language(
        code="fr", locale="fr", on_date="le {}", in_year="en {}",
        at_clock="à {}", at_one="à {}", nth_time="pour la {} fois",
        on_floor="au {} étage", cents="{units} {currency} {cents}",
        minutes="{at} {minutes}", on_the_hour="{at}",
        quarters=("{at} et quart", "{at} et demie", "{at} moins le quart"),
        half_names_next_hour=False),
    _Language(
        code="es", locale="es", on_date="el {}", in_year="en el año {}",
        at_clock="a las {}", at_one="a la {}", nth_time="por {} vez",
        on_floor="en la {}.ª planta", cents="{units} {currency} con {cents}",
        minutes="{at} y {minutes}", on_the_hour="{at} en punto",
        quarters=("{at} y cuarto", "{at} y media", "{at} menos cuarto"),
        half_names_next_hour=False),
    _Language(
        code="it", locale="it", on_date="il {}", in_year="nel {}",
        at_clock="alle ore {}", at_one="alle ore {}", nth_time="per la {} volta",
        on_floor="al {}º piano", cents="{units} {currency} e {cents}",
        minutes="{at} e {minutes}", on_the_hour="{at}",
        quarters=("{at} e un quarto", "{at} e mezza", "{at} meno un quarto"),
        half_names_next_hour=False),
    _Language(
        code="nl", locale="nl", on_date="op {}", in_year="in {}",
        at_clock="om {}", at_one="om {}", nth_time="voor de {} keer",
        on_floor="op de {}e verdieping", cents="{units} {currency} {cents}",
        minutes="{at} {minutes}", on_the_hour="{at}",
        quarters=("om kwart over {hour}", "om half {hour}", "om kwart voor {hour}"),
        half_names_next_hour=True),
    _Language(
        code="pt", locale="pt_PT", on_date="em {}", in_year="em {}",
        at_clock="às {}", at_one="à {}", nth_time="pela {} vez",
        on_floor="no {}.º andar", cents="{units} {currency} e {cents}",
        minutes="{at} e {minutes}", on_the_hour="{at} em ponto",
        quarters=("{at} e um quarto", "{at} e meia", "{at} menos um quarto"),
        half_names_next_hour=False),
)


class _Cldr:
  """Cached num2words and babel look-ups; one instance per generate_pairs call.

  Each look-up costs 0.05-0.1 ms and the corpus asks the same ones many times. Unit and
  currency names depend on the number only through its CLDR plural category, so that is
  what they are cached by.
  """

  def __init__(self):
    self._words = {}
    self._locales = {}
    self._names = {}

  def spell(self, code: str, number: int, to: str = "cardinal") -> str:
    """num2words(number, lang=code, to=to), corrected by _fix_num2words."""
    key = (code, number, to)
    if key not in self._words:
      self._words[key] = _fix_num2words(code, num2words(number, lang=code, to=to))
    return self._words[key]

  def locale(self, name: str) -> babel.Locale:
    """The parsed babel Locale (babel re-parses a locale given by name on every call)."""
    if name not in self._locales:
      self._locales[name] = babel.Locale.parse(name)
    return self._locales[name]

  def unit(self, locale: str, unit: str, number: int) -> str:
    """CLDR's long unit phrase for number, with "{}" in place of the number: "{} Kilometer"."""
    key = (locale, unit, self.locale(locale).plural_form(number))
    if key not in self._names:
      text = _clean(babel_units.format_unit(number, unit, length="long",
                                            locale=self.locale(locale)))
      if unit in text or str(number) not in text:
        raise ValueError(f"CLDR has no long name for {unit} in locale {locale}: got {text!r}")
      self._names[key] = text.replace(str(number), "{}", 1)
    return self._names[key]

  def currency(self, locale: str, code: str, count: int) -> str:
    """CLDR's name of a currency in the plural form that agrees with count: "US-Dollar"."""
    key = (locale, code, self.locale(locale).plural_form(count))
    if key not in self._names:
      self._names[key] = babel_numbers.get_currency_name(code, count, locale=self.locale(locale))
    return self._names[key]


def _fix_num2words(code: str, words: str) -> str:
  """Corrects num2words 0.5.14 where its output is not standard spelling."""
  if code == "es":
    words = words.replace("décimoprimero", "undécimo").replace("décimosegundo", "duodécimo")
    words = re.sub(r"\bveintiuno mil", "veintiún mil", words)
    words = re.sub(r"\buno mil", "un mil", words)
  if code == "nl" and words != "één":
    words = words.replace("één", "een")  # The accent only marks the stand-alone word.
  return words


def _clean(text: str) -> str:
  """CLDR puts (narrow) no-break spaces in numbers and times; tokenizers want plain ones."""
  return text.replace("\u202f", " ").replace("\xa0", " ")


def _feminine_cardinal(code: str, words: str) -> str:
  """The form that agrees with a feminine noun (hours in Romance languages, French minutes)."""
  if code == "fr":
    return re.sub(r"\bun$", "une", words)
  if code == "es":
    return re.sub(r"uno$", "una", words)
  if code == "pt":
    return re.sub(r"\bdois$", "duas", re.sub(r"\bum$", "uma", words))
  return words


def _feminine_ordinal(code: str, words: str) -> str:
  """"Vez", "volta" and "fois" are feminine, so the ordinal before them agrees."""
  if code in ("es", "it", "pt"):
    return re.sub(r"o\b", "a", words)
  if code == "fr":
    return words.replace("premier", "première")
  return words


def _before_noun(code: str, words: str) -> str:
  """A cardinal placed before a (masculine) noun: "ein Euro", "veintiún kilómetros"."""
  if code == "de":
    return re.sub(r"eins$", "ein", words)
  if code == "es":
    return re.sub(r"uno$", "un", re.sub(r"veintiuno$", "veintiún", words))
  if code == "it" and words == "uno":
    return "un"
  return words


def _cardinals(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """Spelled numbers to English words: "dreiundzwanzig" -> "twenty-three".

  2,100 and up only, so that 1000..2099 are read as years, never as plain numbers.
  """
  numbers = list(range(1000)) + rng.sample(range(2100, 100_000), _BIG_CARDINALS)
  return [(cldr.spell(lang.code, n), cldr.spell("en", n), "cardinal") for n in numbers]


def _quantities(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """Measurements both ways: "dreiundzwanzig Kilometer" -> "23 kilometers" and
  "23 Kilometer" -> "twenty-three kilometers"."""
  pairs = []
  for spelled_source in (True, False):
    for number, unit in _sample(rng, _QUANTITIES, range(2, 1000), _UNITS):
      source, english = cldr.unit(lang.locale, unit, number), cldr.unit("en", unit, number)
      if spelled_source:
        words = _before_noun(lang.code, cldr.spell(lang.code, number))
        pairs.append((source.format(words), english.format(number), "cardinal"))
      else:
        english = english.format(cldr.spell("en", number))
        pairs.append((source.format(number), english, "cardinal"))
  return pairs


def _ordinals(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """1st..100th bare, in "for the Nth time" (spelled -> digits) and "on the Nth floor" (digits ->
  spelled)."""
  del rng  # Every ordinal up to 100 is included.
  pairs = []
  for n in range(1, 101):
    ordinal, english = cldr.spell(lang.code, n, "ordinal"), cldr.spell("en", n, "ordinal")
    digits = str(n)
    if lang.code == "fr":
      digits = "1er" if n == 1 else f"{n}e"
    pairs += [
        (ordinal, english, "ordinal"),
        (lang.nth_time.format(_feminine_ordinal(lang.code, ordinal)),
         f"for the {cldr.spell('en', n, 'ordinal_num')} time", "ordinal"),
        (lang.on_floor.format(digits), f"on the {english} floor", "ordinal"),
    ]
  return pairs


def _years(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """Years 1000..2099: spelled -> digits, "in 1984" -> "in nineteen eighty-four" and back."""
  del rng  # Every year is included.
  pairs = []
  for year in range(1000, 2100):
    words = cldr.spell(lang.code, year, "year")
    pairs += [(words, str(year), "year"),
              (lang.in_year.format(year), "in " + cldr.spell("en", year, "year"), "year"),
              (lang.in_year.format(words), f"in {year}", "year")]
  return pairs


def _day_token(lang: _Language, cldr: _Cldr, day: int, spelled: bool) -> str:
  """The day of the month as said after "on": "dritten", "3.", "premier", "1er", "tres"."""
  if lang.code == "de":
    return cldr.spell("de", day, "ordinal") + "n" if spelled else f"{day}."
  if day == 1 and lang.code == "fr":
    return "premier" if spelled else "1er"
  if day == 1 and lang.code == "it":
    return "primo" if spelled else "1º"
  if day == 1 and lang.code == "pt" and spelled:
    return "primeiro"
  return cldr.spell(lang.code, day) if spelled else str(day)


def _say_day(lang: _Language, cldr: _Cldr, text: str, day: int, spelled: bool) -> str:
  """Replaces the leading day number of a CLDR long date with the way it is said."""
  text, count = re.subn(r"^\d+\.?", _day_token(lang, cldr, day, spelled), text)
  if count != 1:
    raise ValueError(f"CLDR date {text!r} ({lang.locale}) does not start with the day")
  return text


def _on_date(lang: _Language, text: str) -> str:
  """Puts the source language's "on" before a date."""
  if lang.code == "it" and re.match(r"(0?8|11|otto|undici)\b", text):
    return "l'" + text  # Elision before a vowel: "l'8 marzo".
  return lang.on_date.format(text)


def _date_source(lang: _Language, cldr: _Cldr, day: datetime.date, form: str) -> str:
  """One date in the source language: form is digits, spelled, full (with weekday) or short."""
  locale = cldr.locale(lang.locale)
  if form == "full":
    return _clean(babel_dates.format_date(day, "full", locale=locale))
  if form == "short":  # CLDR's short pattern, but with all four digits of the year.
    pattern = re.sub(r"y+", "y", babel_dates.get_date_format("short", locale=locale).pattern)
    return _on_date(lang, _clean(babel_dates.format_date(day, pattern, locale=locale)))
  text = _clean(babel_dates.format_date(day, "long", locale=locale))
  if form == "spelled":
    text = text.replace(str(day.year), cldr.spell(lang.code, day.year, "year"))
  return _on_date(lang, _say_day(lang, cldr, text, day.day, form == "spelled"))


def _dates(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """Sampled dates of 1900..2099, day-first in the source, month-first in English:
  "am dritten März zweitausendeinundzwanzig" -> "on March 3, 2021"."""
  first, last = datetime.date(1900, 1, 1).toordinal(), datetime.date(2099, 12, 31).toordinal()
  forms = [form for form, count in zip(("digits", "spelled", "full", "short"), _DATES)
           for _ in range(count)]
  pairs = []
  for form, ordinal in zip(forms, rng.sample(range(first, last + 1), len(forms))):
    day = datetime.date.fromordinal(ordinal)
    if form == "full":
      english = _clean(babel_dates.format_date(day, "full", locale=cldr.locale("en")))
    else:
      english = "on " + _clean(babel_dates.format_date(day, "long", locale=cldr.locale("en")))
    pairs.append((_date_source(lang, cldr, day, form), english, "date"))
  return pairs


def _days_of_year(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """Every day of a leap year without the year, digits and spelled: "le vingt-deux juin" ->
  "on June 22"."""
  del rng  # Every day is included.
  pairs = []
  start = datetime.date(2000, 1, 1)
  for day in (start + datetime.timedelta(days=n) for n in range(366)):
    text = _clean(babel_dates.format_skeleton("MMMMd", day, locale=cldr.locale(lang.locale)))
    english = "on " + _clean(babel_dates.format_skeleton("MMMMd", day, locale=cldr.locale("en")))
    for spelled in (False, True):
      source = _on_date(lang, _say_day(lang, cldr, text, day.day, spelled))
      pairs.append((source, english, "date"))
  return pairs


def _at_hour(lang: _Language, cldr: _Cldr, hour: int) -> str:
  """"At HOUR" spoken, hour 0..23: "um ein Uhr", "à une heure", "a la una", "às duas"."""
  word = cldr.spell(lang.code, hour)
  if lang.code == "de":
    return "um " + _before_noun("de", word) + " Uhr"
  if lang.code == "nl":
    return f"om {word} uur"
  if lang.code == "fr":
    return f"à {_feminine_cardinal('fr', word)} heure" + ("s" if hour > 1 else "")
  if lang.code == "es":
    return "a la una" if hour == 1 else "a las " + _feminine_cardinal("es", word)
  if lang.code == "it":
    return {0: "a mezzanotte", 1: "all'una"}.get(hour, f"alle {word}")
  if lang.code == "pt":
    return {0: "à meia-noite", 1: "à uma"}.get(hour, "às " + _feminine_cardinal("pt", word))
  raise ValueError(f"No spoken hours for language {lang.code!r}; add them to _at_hour")


def _times(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """Every minute of the day, digits and spelled, to the English 12-hour clock:
  "um vierzehn Uhr fünf" -> "at 2:05 PM"."""
  del rng  # Every minute is included.
  pairs = []
  for hour in range(24):
    at = _at_hour(lang, cldr, hour)
    for minute in range(60):
      clock = datetime.time(hour, minute)
      english = "at " + _clean(babel_dates.format_time(clock, "short", locale=cldr.locale("en")))
      digits = _clean(babel_dates.format_time(clock, "short", locale=cldr.locale(lang.locale)))
      at_clock = lang.at_one if hour == 1 else lang.at_clock
      pairs.append((at_clock.format(digits), english, "time"))
      minutes = cldr.spell(lang.code, minute)
      minutes = _feminine_cardinal("fr", minutes) if lang.code == "fr" else minutes
      if minute:
        pairs.append((lang.minutes.format(at=at, minutes=minutes), english, "time"))
      else:
        pairs.append((lang.on_the_hour.format(at=at), english, "time"))
  return pairs + _quarter_hours(lang, cldr)


def _quarter_hours(lang: _Language, cldr: _Cldr) -> list[tuple]:
  """Colloquial quarter hours: "um halb drei" -> "at half past two"."""
  english = ("at a quarter past {}", "at half past {}", "at a quarter to {}")
  pairs = []
  for hour in range(1, 13):
    next_hour = hour % 12 + 1
    for quarter, (template, target) in enumerate(zip(lang.quarters, english)):
      named = next_hour if quarter == 2 or (quarter == 1 and lang.half_names_next_hour) else hour
      source = template.format(at=_at_hour(lang, cldr, named), hour=cldr.spell(lang.code, named))
      english_hour = cldr.spell("en", next_hour if quarter == 2 else hour)
      pairs.append((source, target.format(english_hour), "time"))
  return pairs


def _amounts(lang: _Language, cldr: _Cldr, rng: random.Random) -> list[tuple]:
  """Prices: "dreiundzwanzig Euro fünfzig" -> "twenty-three euros and fifty cents",
  "1.234,50 US-Dollar" -> "$1,234.50", "vierhundert Schweizer Franken" -> "400 Swiss francs"."""
  with_cents, digits, whole = _AMOUNTS
  pairs = []
  for units, cents, code in _sample(rng, with_cents, range(1, 1000), range(1, 100),
                                    _CENT_CURRENCIES):
    source = lang.cents.format(units=_before_noun(lang.code, cldr.spell(lang.code, units)),
                               currency=cldr.currency(lang.locale, code, units),
                               cents=cldr.spell(lang.code, cents))
    english = (f"{cldr.spell('en', units)} {cldr.currency('en', code, units)} and "
               f"{cldr.spell('en', cents)} cent" + ("s" if cents > 1 else ""))
    pairs.append((source, english, "amount"))
  for units, cents, code in _sample(rng, digits, range(1, 10000), range(100), _CURRENCIES):
    value = decimal.Decimal(units if code == "JPY" else f"{units}.{cents:02d}")
    source = babel_numbers.format_currency(value, code, locale=cldr.locale(lang.locale),
                                           format_type="name")
    english = babel_numbers.format_currency(value, code, locale=cldr.locale("en"))
    pairs.append((_clean(source), _clean(english), "amount"))
  for units, code in _sample(rng, whole, range(2, 1000), _CURRENCIES):
    words = _before_noun(lang.code, cldr.spell(lang.code, units))
    source = f"{words} {cldr.currency(lang.locale, code, units)}"
    pairs.append((source, f"{units} {cldr.currency('en', code, units)}", "amount"))
  return pairs


def _sample(rng: random.Random, count: int, *choices) -> list[tuple]:
  """count distinct tuples drawn from the product of the choices (sequences), in draw order."""
  sizes = [len(choice) for choice in choices]
  picks = []
  for index in rng.sample(range(math.prod(sizes)), count):
    pick = []
    for choice, size in zip(reversed(choices), reversed(sizes)):
      index, position = divmod(index, size)
      pick.append(choice[position])
    picks.append(tuple(reversed(pick)))
  return picks


_GENERATORS = (_cardinals, _quantities, _ordinals, _years, _dates, _days_of_year, _times,
               _amounts)


def _fits(pair: dict) -> bool:
  """Short enough for the tiny test model on both sides."""
  return all(len(pair[side]) <= MAX_CHARS and len(pair[side].split()) <= MAX_WORDS
             for side in ("source", "target"))


def generate_pairs(seed: int = 0) -> list[dict]:
  """Every pair of the corpus as dicts of source, target, language and category (all str).

  Deterministic for a seed (PYTHONHASHSEED plays no part); the order is a seeded shuffle, so
  that a split read front to back mixes languages and categories.
  """
  rng = random.Random(seed)
  cldr = _Cldr()
  pairs = []
  for lang in _LANGUAGES:
    for generate in _GENERATORS:
      pairs += [dict(source=source, target=target, language=lang.code, category=category)
                for source, target, category in generate(lang, cldr, rng)]
  fitting = [pair for pair in pairs if _fits(pair)]
  unique, conflicts = _dedupe(fitting)
  logging.info("cldr_numbers: %d pairs generated, %d too long, %d repeated sources "
               "(%d of them with another target), %d kept", len(pairs), len(pairs) - len(fitting),
               len(fitting) - len(unique), conflicts, len(unique))
  rng.shuffle(unique)
  return unique


def _dedupe(pairs: list[dict]) -> tuple[list[dict], int]:
  """Keeps the first pair of each source, so that no source has two targets.

  Returns the kept pairs and how many dropped ones had a different target (ambiguous sources).
  """
  target_of = {}
  unique = []
  conflicts = 0
  for pair in pairs:
    if pair["source"] not in target_of:
      target_of[pair["source"]] = pair["target"]
      unique.append(pair)
    elif target_of[pair["source"]] != pair["target"]:
      conflicts += 1
  return unique, conflicts


def split_of(source: str) -> str:
  """The split of a pair, fixed by a stable hash of its source: 98% train, 1% validation, 1% test.

  Hashing the source (not the pair) keeps every source string in exactly one split.
  """
  bucket = int.from_bytes(hashlib.md5(source.encode("utf-8")).digest()[:8], "big") % 100
  return {0: "test", 1: "validation"}.get(bucket, "train")


def split_pairs(pairs: list[dict]) -> dict[str, list[dict]]:
  """Groups pairs by split_of(source), keeping their order."""
  splits = {name: [] for name in SPLITS}
  for pair in pairs:
    splits[split_of(pair["source"])].append(pair)
  return splits


class CldrNumbers(tfds.core.GeneratorBasedBuilder):
  """The embedded corpus as a TFDS dataset: generated offline in seconds, nothing downloaded."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Six source languages (de, fr, es, it, nl, pt) to English."}
  # TFDS 4.9.10 finds a builder's file through `importlib_resources`, which etils 1.15 no longer
  # installs; naming the file here skips that import. (There is no checksums file to find.)
  code_path = tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Numbers, dates, times and amounts written in German, French, Spanish, "
                     "Italian, Dutch and Portuguese, translated to English; generated from "
                     "CLDR data (babel) and num2words."),
        features=tfds.features.FeaturesDict({
            "source": tfds.features.Text(),
            "target": tfds.features.Text(),
            "language": tfds.features.Text(),
            "category": tfds.features.Text(),
        }),
        supervised_keys=("source", "target"),
        disable_shuffling=True,  # Reading order = generate_pairs order (already shuffled).
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    splits = split_pairs(generate_pairs())
    return {name: self._generate_examples(pairs) for name, pairs in splits.items()}

  def _generate_examples(self, pairs: list[dict]) -> Iterator[tuple[int, dict]]:
    yield from enumerate(pairs)
