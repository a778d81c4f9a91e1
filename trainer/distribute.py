"""Where a run executes: the device's modes, the strategy, and multi-worker plumbing.

- `resolve_modes`: the precision x XLA x recurrence combination for the device present,
  decided once at start-up from a `Devices` description (tests pass fake ones).
- `create_strategy`: one device, mirrored (local devices) or multi-worker.
- Multi-worker plumbing: chief/scratch dirs, barriers, the shared tokenizer, coordinated
  preemption checkpoints, and turning a dead peer into one clear error.
"""
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
from typing import Callable, Iterator, Optional, Tuple

from absl import logging
import ml_collections
import tensorflow as tf

from configs import validate as validate_lib
from input_pipeline import pipeline
from input_pipeline import tokenizer as tokenizer_lib

# Exit code of a run stopped by SIGTERM/SIGINT after saving a checkpoint (single- and
# multi-worker; TF's PreemptionCheckpointHandler convention): restart it to resume.
PREEMPTED_EXIT_CODE = 42
# Barrier timeout while the chief alone trains the tokenizer or evaluates: generous, since
# a dead chief is detected within seconds anyway (MultiWorkerMirroredStrategy heartbeats).
BARRIER_TIMEOUT_S = 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class Devices:
  """What mode resolution needs to know of the machine. `gpu_capabilities` has one
  (major, minor) compute capability per GPU ((0, 0) when TensorFlow cannot tell)."""
  gpu_capabilities: Tuple[Tuple[int, int], ...] = ()
  cpu_bf16: bool = False

  @property
  def gpu(self) -> bool:
    return bool(self.gpu_capabilities)


def cpu_has_fast_bfloat16() -> bool:
  """True if the CPU has bf16 matrix units (AMX-BF16), where bf16 beats fp32.

  Without bf16 units oneDNN converts bf16 to fp32 and back, slower than fp32; with only
  AVX512-BF16 dot products (Zen 4, Cooper Lake) a bf16 step was still slower than fp32: the
  small matmuls of a GRU step gain less than the casts cost. With AMX it is faster (outside
  XLA). Measurements: README, Training, Precision; docs/amx.json. Non-Linux systems: False.
  """
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return cpuinfo_has_bf16_units(f.read())
  except OSError:
    return False


def cpuinfo_has_bf16_units(cpuinfo: str) -> bool:
  """Whether /proc/cpuinfo text lists amx_bf16 among the CPU flags (see above)."""
  flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                if line.startswith("flags")), [])
  return "amx_bf16" in flags


def detect_devices() -> Devices:
  """This machine's GPUs (with compute capabilities) and CPU bf16 support."""
  capabilities = []
  for gpu in tf.config.list_physical_devices("GPU"):
    capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
    capabilities.append(tuple(capability) if capability else (0, 0))
  return Devices(tuple(capabilities), cpu_has_fast_bfloat16())


def resolve_precision(name: str, devices: Devices) -> str:
  """'auto' -> mixed_float16 on GPUs with fast fp16 (compute capability >= 7), float32 on
  older GPUs, mixed_bfloat16 on CPUs with AMX bf16 units, else float32."""
  if name != "auto":
    return name
  if devices.gpu:
    fast = all(c >= (7, 0) for c in devices.gpu_capabilities)
    return "mixed_float16" if fast else "float32"
  return "mixed_bfloat16" if devices.cpu_bf16 else "float32"


def mode_refusal(recurrence: str, xla: str, precision: str,
                 devices: Devices) -> Optional[str]:
  """Why this resolved combination cannot run on `devices`, or None if it can."""
  static = validate_lib.mode_conflict(recurrence, xla, precision)
  if static:
    return static
  if recurrence == "cudnn" and not devices.gpu:
    return ("config.model.recurrence='cudnn' needs a GPU (cuDNN) and this machine has "
            "none; use fused (fastest on CPUs) or keras.")
  if precision == "mixed_bfloat16" and devices.gpu and any(
      c < (8, 0) for c in devices.gpu_capabilities):
    return ("config.train.precision='mixed_bfloat16' needs GPUs of compute capability >= 8.0 "
            f"(these have {devices.gpu_capabilities}); use mixed_float16.")
  return None


def resolve_modes(config: ml_collections.ConfigDict,
                  devices: Optional[Devices] = None) -> ml_collections.ConfigDict:
  """A copy of `config` with every 'auto' mode replaced by what runs on `devices`
  (default: this machine); ConfigError naming the keys if the combination cannot run.

  auto: recurrence fused (plain TF ops: XLA-compilable on CPUs and GPUs); precision by
  `resolve_precision`; xla train_step, or decoder_step with recurrence=cudnn (no XLA kernel
  for cuDNN) and with bf16 on a CPU (XLA:CPU does not run bf16 matmuls on AMX, oneDNN does:
  docs/amx.json).
  """
  devices = devices or detect_devices()
  config = ml_collections.ConfigDict(config.to_dict())
  m, t = config.model, config.train
  if m.recurrence == "auto":
    m.recurrence = "fused"
  t.precision = resolve_precision(t.precision, devices)
  if t.xla == "auto":
    bf16_cpu = t.precision == "mixed_bfloat16" and not devices.gpu
    t.xla = "decoder_step" if m.recurrence == "cudnn" or bf16_cpu else "train_step"
  why = mode_refusal(m.recurrence, t.xla, t.precision, devices)
  if why:
    raise validate_lib.ConfigError(why)
  if config.distribute.collective == "nccl" and not devices.gpu:
    raise validate_lib.invalid("distribute.collective", "nccl",
                               "NCCL needs GPUs and this machine has none; use auto or ring")
  return config


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
  _sum_over_replicas(strategy, 0.0, timeout_s)


def _sum_over_replicas(strategy: tf.distribute.Strategy, value: float,
                       timeout_s: Optional[float] = None) -> tf.Tensor:
  """The sum of `value` over every replica of every worker (float64), once all arrive.

  The value is made inside the replica function, on the replica's device: a tensor from
  outside has no all-reduce destination under MultiWorkerMirroredStrategy.
  """
  options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)

  def all_reduce():
    return tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.constant(value, tf.float64), options=options)

  return strategy.experimental_local_results(strategy.run(tf.function(all_reduce)))[0]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes summaries, checkpoints and exports."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type in (None, "chief") or (
      task_type == "worker" and task_id == 0
      and "chief" not in resolver.cluster_spec().as_dict())


@dataclasses.dataclass
class StopFlag:
  """Set by SIGTERM/SIGINT so the loop can save a checkpoint and exit cleanly."""
  signal_name: Optional[str] = None

  def __call__(self, signum, frame):
    self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
  """SIGTERM/SIGINT set `flag` instead of killing the process (restored afterwards)."""
  previous = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, flag)
    except ValueError:  # Not the main thread (e.g. a test runner thread).
      pass
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def run_dir(workdir: str, strategy: tf.distribute.Strategy) -> str:
  """The chief writes to `workdir`; a non-chief worker to a scratch dir (MWMS needs every
  worker to save; only the chief's checkpoints count), emptied first: a killed worker
  leaves stale checkpoints behind."""
  if is_chief(strategy):
    return workdir
  scratch = os.path.join(workdir, "tmp_workers",
                         f"worker_{strategy.cluster_resolver.task_id}")
  if tf.io.gfile.exists(scratch):
    tf.io.gfile.rmtree(scratch)
  return scratch


def remove_scratch_dir(directory: str, strategy: tf.distribute.Strategy) -> None:
  """Removes a non-chief worker's scratch dir, and tmp_workers/ once it is empty."""
  if is_chief(strategy) or not tf.io.gfile.exists(directory):
    return
  tf.io.gfile.rmtree(directory)
  parent = os.path.dirname(directory)
  try:
    if not tf.io.gfile.listdir(parent):
      tf.io.gfile.rmtree(parent)
  except tf.errors.NotFoundError:  # Another worker removed it first.
    pass


def shared_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                     strategy: tf.distribute.Strategy) -> tokenizer_lib.Tokenizer:
  """The chief trains (or reuses) workdir's tokenizer; the other workers wait for it at a
  barrier and load it, so that all map text to the same ids (the workdir must be shared)."""
  sample = pipeline.tokenizer_sample(config)
  chief = is_chief(strategy)
  if chief:
    tokenizer = tokenizer_lib.load_or_train(config.tokenizer, workdir, sample)
  if is_multi_worker(strategy):
    barrier(strategy, BARRIER_TIMEOUT_S)
  if not chief:
    marker = os.path.join(workdir, "tokenizer", tokenizer_lib.CONFIG_FILE)
    if not tf.io.gfile.exists(marker):
      raise FileNotFoundError(
          f"{marker} is missing although the chief has written it to its --workdir: all "
          f"workers need the same --workdir={workdir}, on a filesystem they share.")
    tokenizer = tokenizer_lib.load_or_train(config.tokenizer, workdir, sample)
  return tokenizer


def preemption_handler(strategy: tf.distribute.Strategy, stop: StopFlag,
                       save_fn: Callable, chief_manager: tf.train.CheckpointManager,
                       current_step: Callable[[], int], on_exit: Callable[[], None]
                       ) -> tf.distribute.experimental.PreemptionCheckpointHandler:
  """TF's handler for MWMS: once any worker sees SIGTERM/SIGINT (`stop`, polled each
  second), all agree on a step, save there, run `on_exit` and exit PREEMPTED_EXIT_CODE.

  It restores from (and, on the chief, saves through) the chief's manager; non-chief
  workers save through `save_fn` (their scratch manager), as MWMS needs every worker to.
  """

  def exit_fn():
    cause = (f"{stop.signal_name} received" if stop.signal_name
             else "another worker was told to stop")
    logging.warning("%s: all workers saved a checkpoint at step %d; exiting with code %d "
                    "so that the restarted job resumes from it.", cause, current_step(),
                    PREEMPTED_EXIT_CODE)
    on_exit()
    sys.exit(PREEMPTED_EXIT_CODE)

  termination = tf.distribute.experimental.TerminationConfig(
      termination_watcher_fn=lambda: stop.signal_name is not None,
      exit_fn=exit_fn, save_fn=save_fn)
  return tf.distribute.experimental.PreemptionCheckpointHandler(
      strategy.cluster_resolver, chief_manager, termination_config=termination)


@contextlib.contextmanager
def peer_failures(strategy: tf.distribute.Strategy, step: int,
                  collective_timeout_s: float) -> Iterator[None]:
  """Multi-worker: a collective that failed because a peer died or hung -> one clear error
  (ConnectionError) saying what to do, instead of a page of gRPC details."""
  try:
    yield
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
          tf.errors.AbortedError, tf.errors.CancelledError) as e:
    if not is_multi_worker(strategy):
      raise
    lines = [line.strip() for line in e.message.splitlines() if line.strip()] or [""]
    reason = next((line for line in lines if re.search(
        r"aborted by|timed out|unhealthy|heartbeat", line, re.IGNORECASE)), lines[0])
    raise ConnectionError(
        f"multi-worker training failed after step {step}: a worker died or stopped "
        f"responding ({type(e).__name__}: {reason}). The others cannot go on "
        "without it; restart the whole job (launch/local.py --max_restarts, a requeued "
        "Slurm job, the Kubernetes Job) and it resumes from the chief's last checkpoint. "
        "A live but stuck worker is given config.distribute.collective_timeout_s="
        f"{collective_timeout_s}s.") from e


def wait_for_chief(strategy: tf.distribute.Strategy, step: int,
                   collective_timeout_s: float, share: tf.Variable) -> None:
  """Multi-worker: the others wait here while the chief alone evaluates (in their next
  all-reduce they would give up after config.distribute.collective_timeout_s), then take
  the chief's value of `share` (its early-stopping count) with the same all-reduce."""
  if is_multi_worker(strategy):
    with peer_failures(strategy, step, collective_timeout_s):
      broadcast_from_chief(strategy, share, BARRIER_TIMEOUT_S)


def broadcast_from_chief(strategy: tf.distribute.Strategy, variable: tf.Variable,
                         timeout_s: Optional[float] = None) -> None:
  """Multi-worker: every worker takes the chief's value of `variable` (a decision the
  chief alone can make, like early stopping, or that must not differ between workers,
  like the time budget), so that all stop at the same step. No-op on one worker."""
  if not is_multi_worker(strategy):
    return
  # Each of the chief's local replicas adds its share: the sum over all is the value.
  local_replicas = len(strategy.extended.worker_devices)
  mine = float(variable.numpy()) / local_replicas if is_chief(strategy) else 0.0
  total = _sum_over_replicas(strategy, mine, timeout_s)
  if variable.dtype.is_integer:
    total = tf.round(total)
  variable.assign(tf.cast(total, variable.dtype))
