"""Choosing the tf.distribute strategy: one device, mirrored (local devices), multi-worker."""
import json
import os

from absl import logging
import ml_collections
import tensorflow as tf

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def split_cpu(num_devices: int) -> None:
  """Splits the CPU into `num_devices` logical devices (before TensorFlow initialises)."""
  if num_devices <= 1:
    return
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError as e:  # Already initialised: keep what exists, say so.
    logging.warning("distribute.cpu_devices=%d ignored: %s", num_devices, e)


def cluster_configured() -> bool:
  """True when TF_CONFIG names more than one task, or a multi-node Slurm job runs us."""
  tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  tasks = sum(len(v) for v in tf_config.get("cluster", {}).values())
  return tasks > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _multi_worker(config: ml_collections.ConfigDict) -> tf.distribute.Strategy:
  implementation = {
      "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
      "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
      "ring": tf.distribute.experimental.CommunicationImplementation.RING,
  }[config.distribute.collective]
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=implementation,
      timeout_seconds=float(config.distribute.collective_timeout_s) or None)
  resolver = None
  if "TF_CONFIG" not in os.environ and "SLURM_JOB_ID" in os.environ:
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
  return tf.distribute.MultiWorkerMirroredStrategy(
      cluster_resolver=resolver, communication_options=options)


def create_strategy(config: ml_collections.ConfigDict) -> tf.distribute.Strategy:
  """Returns the strategy named by `config.distribute.strategy` ('auto' picks one)."""
  name = config.distribute.strategy
  if name not in STRATEGIES:
    raise ValueError(f"config.distribute.strategy={name!r} is not one of {STRATEGIES}")
  if config.distribute.collective not in ("auto", "nccl", "ring"):
    raise ValueError(f"config.distribute.collective={config.distribute.collective!r} "
                     "is not one of ('auto', 'nccl', 'ring')")
  if name in ("multi_worker",) or (name == "auto" and cluster_configured()):
    strategy = _multi_worker(config)
  else:
    split_cpu(config.distribute.cpu_devices)
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    if name == "mirrored" or (name == "auto" and len(devices) > 1):
      strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    else:
      strategy = tf.distribute.OneDeviceStrategy(devices[0].name)
  logging.info("Strategy %s with %d replica(s).", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes summaries, checkpoints and exports."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type in (None, "chief") or (
      task_type == "worker" and task_id == 0
      and "chief" not in resolver.cluster_spec().as_dict())
