"""Choosing the tf.distribute strategy: one device, mirrored (local devices), multi-worker."""
import json
import os
import re

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
  resolver = None  # MWMS reads TF_CONFIG itself.
  if "TF_CONFIG" not in os.environ and "SLURM_JOB_ID" in os.environ:
    resolver = slurm_cluster_resolver()
  return tf.distribute.MultiWorkerMirroredStrategy(
      cluster_resolver=resolver, communication_options=options)


def slurm_cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
  """The cluster of an `srun` step with one task per node (launch/slurm.sbatch).

  Hosts, ports (8888) and ranks come from SlurmClusterResolver. Its GPU handling is
  bypassed: it would split a node's GPUs between tasks (ours uses them all) and probe them
  with nvidia-smi, which CPU-only nodes lack; TensorFlow counts the visible GPUs instead.
  """
  tasks_per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")
  counts = [int(c) for c in re.sub(r"\(x\d+\)", "", tasks_per_node).split(",") if c]
  if max(counts, default=1) > 1:
    raise ValueError(f"SLURM_STEP_TASKS_PER_NODE={tasks_per_node}: start one nmt-train "
                     "task per node (srun --ntasks-per-node=1); it uses all the node's "
                     "GPUs.")
  slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
      gpus_per_node=1, gpus_per_task=1, auto_set_gpu=False)
  cluster_spec = slurm.cluster_spec()  # Also sets slurm.task_type and task_id.
  return tf.distribute.cluster_resolver.SimpleClusterResolver(
      cluster_spec, task_type=slurm.task_type, task_id=slurm.task_id, rpc_layer="grpc",
      num_accelerators={"GPU": len(tf.config.list_physical_devices("GPU"))})


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


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether `strategy` spans several processes (MWMS with more than one worker)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return False
  return sum(len(tasks) for job, tasks in resolver.cluster_spec().as_dict().items()
             if job in ("chief", "worker")) > 1


def barrier(strategy: tf.distribute.Strategy, timeout_s: float) -> None:
  """Returns once every worker has called it: an all-reduce of nothing.

  For waits longer than config.distribute.collective_timeout_s (the chief alone training
  the tokenizer or evaluating). A dead worker still fails it within seconds, through
  MultiWorkerMirroredStrategy's heartbeats; `timeout_s` bounds a live but stuck one.
  """
  options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)

  def all_reduce():
    return tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.constant(0.0), options=options)

  strategy.run(tf.function(all_reduce))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes summaries, checkpoints and exports."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type in (None, "chief") or (
      task_type == "worker" and task_id == 0
      and "chief" not in resolver.cluster_spec().as_dict())
