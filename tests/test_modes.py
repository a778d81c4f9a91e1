"""Mode resolution (precision x XLA x recurrence) for faked devices, and nmt-bench doctor.

The device-selection logic is a pure function of a `Devices` description, so every branch
a GPU or a bf16 CPU would take runs here on any host.
"""
import json
import math
import re

import pytest

from configs import tiny
from configs import validate
from trainer import distribute
from conftest import cli

CPU = distribute.Devices()
BF16_CPU = distribute.Devices(cpu_bf16=True)
A100 = distribute.Devices(gpu_capabilities=((8, 0),))
V100 = distribute.Devices(gpu_capabilities=((7, 0), (7, 0)))
P100 = distribute.Devices(gpu_capabilities=((6, 0),))


def _resolved(devices, **modes):
  config = tiny.get_config()
  config.train.precision = modes.get("precision", "auto")
  config.train.xla = modes.get("xla", "auto")
  config.model.recurrence = modes.get("recurrence", "auto")
  config = distribute.resolve_modes(config, devices)
  return config.train.precision, config.train.xla, config.model.recurrence


@pytest.mark.parametrize("devices, expected", [
    (CPU, ("float32", "train_step", "fused")),
    (BF16_CPU, ("mixed_bfloat16", "decoder_step", "fused")),
    # bf16 where the tensor cores have it: fp16's speed without loss-scale skips.
    (A100, ("mixed_bfloat16", "train_step", "fused")),
    (V100, ("mixed_float16", "train_step", "fused")),
    (P100, ("float32", "train_step", "fused")),
])
def test_auto_picks_a_combination_known_to_run(devices, expected):
  resolved = _resolved(devices)
  assert resolved == expected
  # Never a cuDNN op inside an XLA cluster, whatever the device.
  assert not (resolved[2] == "cudnn" and resolved[1] == "train_step")


def test_bf16_on_a_cpu_keeps_its_matmuls_out_of_xla_unless_asked():
  # XLA:CPU runs bf16 dots without AMX; oneDNN (outside XLA) uses it (docs/amx.json).
  assert _resolved(CPU, precision="mixed_bfloat16")[1] == "decoder_step"
  assert _resolved(BF16_CPU, xla="train_step")[1] == "train_step"
  assert _resolved(A100, precision="mixed_bfloat16")[1] == "train_step"


def test_cudnn_with_auto_xla_compiles_only_the_decoder_step():
  assert _resolved(A100, recurrence="cudnn") == ("mixed_float16", "decoder_step", "cudnn")


@pytest.mark.parametrize("devices, modes, message", [
    (CPU, dict(recurrence="cudnn"), "needs a GPU (cuDNN) and this machine has none"),
    (A100, dict(recurrence="cudnn", xla="train_step"), "XLA has no kernel for the cuDNN"),
    (A100, dict(recurrence="cudnn", precision="mixed_bfloat16"), "float32/float16 only"),
    (V100, dict(precision="mixed_bfloat16"), "compute capability >= 8.0"),
])
def test_a_combination_the_device_cannot_run_is_refused_at_start_up(devices, modes,
                                                                     message):
  with pytest.raises(validate.ConfigError, match=re.escape(message)):
    _resolved(devices, **modes)


def test_nccl_without_gpus_is_refused():
  config = tiny.get_config()
  config.distribute.collective = "nccl"
  with pytest.raises(validate.ConfigError, match="config.distribute.collective='nccl'"):
    distribute.resolve_modes(config, CPU)
  assert distribute.resolve_modes(config, A100).distribute.collective == "nccl"


def test_a_sentence_batch_that_does_not_split_over_the_replicas_is_refused():
  config = tiny.get_config()  # batch_size 64.
  config.data.batch_by = "sentences"
  assert distribute.resolve_modes(config, CPU, num_replicas=4).train.batch_size == 64
  with pytest.raises(validate.ConfigError,
                     match=re.escape("config.train.batch_size=64 is invalid: must be "
                                     "divisible by the number of replicas (3)")):
    distribute.resolve_modes(config, CPU, num_replicas=3)
  config.data.batch_by = "tokens"  # A token budget: no sentence count to split.
  distribute.resolve_modes(config, CPU, num_replicas=3)


@pytest.mark.parametrize("devices, xla, expected", [
    (CPU, "auto", "threefry"), (CPU, "train_step", "threefry"), (CPU, "off", "default"),
    (CPU, "decoder_step", "default"), (BF16_CPU, "auto", "default"),  # decoder_step there.
    (A100, "auto", "default"), (V100, "train_step", "default"),  # GPUs keep TF's Philox.
])
def test_dropout_masks_use_threefry_only_where_xla_compiles_the_step_on_a_cpu(
    devices, xla, expected):
  config = tiny.get_config()
  config.train.xla, config.train.precision = xla, "auto"
  assert distribute.resolve_modes(config, devices).model.dropout_rng == expected


def test_threefry_where_xla_does_not_draw_the_masks_is_refused():
  config = tiny.get_config()
  config.model.dropout_rng, config.train.xla, config.train.precision = "threefry", "off", "auto"
  with pytest.raises(validate.ConfigError,
                     match=r"dropout_rng='threefry' with config.train.xla='off'"):
    validate.validate(config)
  config.train.xla = "auto"
  validate.validate(config)  # auto may resolve to train_step: decided on the device.
  assert distribute.resolve_modes(config, CPU).model.dropout_rng == "threefry"
  with pytest.raises(validate.ConfigError, match="train.xla='decoder_step'"):
    distribute.resolve_modes(config, BF16_CPU)  # bf16 on a CPU compiles the step only.
  config.model.dropout_rng = "philox"
  with pytest.raises(validate.ConfigError, match="must be one of auto | default | threefry"):
    validate.validate(config)


@pytest.mark.parametrize("flags, bf16", [
    ("fpu avx2 avx512f avx512_vnni", False),  # Cascade Lake: bf16 only emulated.
    ("fpu avx512f avx512_bf16", False),  # Cooper Lake, Zen 4: measured slower than fp32.
    ("fpu amx_bf16 amx_tile", True)])  # Sapphire Rapids.
def test_cpu_bf16_units_are_read_from_cpuinfo(flags, bf16):
  cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\n"
  assert distribute.cpuinfo_has_bf16_units(cpuinfo) == bf16
  assert not distribute.cpuinfo_has_bf16_units("processor\t: 0\n")


@pytest.mark.slow
def test_doctor_runs_what_the_cpu_allows_and_says_why_not_for_the_rest(
    embedded_data_dir, tmp_path):
  """nmt-bench doctor as a user runs it: one JSON line per combination."""
  done = cli("run_bench", "doctor", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--num_steps=2", "--precisions=float32",
             "--xla_modes=train_step", "--recurrences=keras,cudnn",
             f"--config.data.tfds_data_dir={embedded_data_dir}",
             "--config.model.units=16", "--config.model.embed_dim=8",
             "--config.tokenizer.sample_size=5000",  # A quarter of tiny's: enough for 500.
             "--config.data.bucket_boundaries=(24,)")
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
  assert len(rows) == 2
  for row in rows:
    if row["recurrence"] == "cudnn":
      assert not row["ran"] and ("needs a GPU" in row["reason"]
                                 or "XLA has no kernel" in row["reason"])
    else:
      assert row["ran"], row
      assert row["step_time_s"] > 0 and 0 < row["mfu"] < 1.5
      # Two warm-up steps barely train: a uniform guess's loss, log(V) nats a token.
      vocab_size = tiny.get_config().tokenizer.vocab_size
      assert row["final_loss"] == pytest.approx(math.log(vocab_size), abs=0.1), row
