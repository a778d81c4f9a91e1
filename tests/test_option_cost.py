"""benchmarks/option_cost.py: how a --variant names its config overrides."""
import pytest

from benchmarks import option_cost


def test_variant_values_parse_as_python_literals_else_strings():
  name, overrides = option_cost.parse_variant(
      "mix:train.ema_decay=0.999,model.tie_embeddings=True,train.decay=cosine")
  assert name == "mix"
  assert overrides == {"train.ema_decay": 0.999, "model.tie_embeddings": True,
                       "train.decay": "cosine"}
  assert option_cost.parse_variant("base:") == ("base", {})


@pytest.mark.parametrize("text", [":train.ema_decay=0.9", "x:ema_decay=0.9",
                                  "x:train.ema_decay"])
def test_a_malformed_variant_is_named_in_the_error(text):
  with pytest.raises(ValueError, match="--variant="):
    option_cost.parse_variant(text)
