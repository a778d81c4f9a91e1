"""Where a run executes: the device's modes, the strategy, and multi-worker plumbing.

- `resolve_modes`: the precision x XLA x recurrence combination for the device present,
  decided once at start-up from a `Devices` description (tests pass fake ones), and the
  batch's split over the replicas.
- `create_strategy`: one device, mirrored (local devices) or multi-worker.
- Multi-worker plumbing: chief/scratch dirs, barriers, the shared tokenizer, agreeing on
  a step to stop at after a signal, and turning a dead peer into one clear error.

Collectives and their timeouts: TensorFlow runs a timed collective by starting a thread
that sleeps for the timeout (one per collective: a step on an 8-GPU host issues dozens),
so the step's collectives have no timeout (a dead peer is detected within seconds by
MultiWorkerMirroredStrategy's heartbeats) and only the rare host-side waits do.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import tempfile
from typing import Iterator, Optional, Sequence, Tuple

from absl import logging
import ml_collections
import tensorflow as tf

from configs import validate as validate_lib
from input_pipeline import datasets
from input_pipeline import tokenizer as tokenizer_lib

# Exit code of a run stopped by SIGTERM/SIGINT after saving a checkpoint (single- and
# multi-worker; TF's PreemptionCheckpointHandler convention): restart it to resume.
PREEMPTED_EXIT_CODE = 42
# Barrier timeout while the chief alone trains the tokenizer and builds its evaluator (a
# holdout: dev set is a pass over the whole corpus): generous, since a dead chief is
# detected within seconds anyway (MultiWorkerMirroredStrategy heartbeats).
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
  XLA). Measurements: docs/training.md (precision); docs/amx.json. Non-Linux systems: False.
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


def resolve_precision(name: str, devices: Devices, recurrence: str = "fused") -> str:
  """'auto' -> mixed_bfloat16 on GPUs with bf16 tensor cores (compute capability >= 8:
  Ampere, Hopper), mixed_float16 on Volta/Turing (>= 7), float32 on older GPUs;
  mixed_bfloat16 on CPUs with AMX bf16 units, else float32. cuDNN's GRU has no bf16
  kernel: with recurrence=cudnn GPUs get mixed_float16."""
  if name != "auto":
    return name
  if devices.gpu:
    if recurrence != "cudnn" and all(c >= (8, 0) for c in devices.gpu_capabilities):
      return "mixed_bfloat16"  # fp16's range without loss scaling (no skipped steps).
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


def resolve_modes(config: ml_collections.ConfigDict, devices: Optional[Devices] = None,
                  num_replicas: int = 1) -> ml_collections.ConfigDict:
  """A copy of `config` with every 'auto' mode replaced by what runs on `devices`
  (default: this machine); ConfigError naming the keys if the combination cannot run, or
  if train.batch_size (in sentences) does not split over the strategy's `num_replicas`.

  auto: recurrence fused (plain TF ops: XLA-compilable on CPUs and GPUs); precision by
  `resolve_precision`; xla train_step, or decoder_step with recurrence=cudnn (no XLA kernel
  for cuDNN) and with bf16 on a CPU (XLA:CPU does not run bf16 matmuls on AMX, oneDNN does:
  docs/amx.json); dropout_rng threefry with xla train_step on CPUs, else default.
  """
  devices = devices or detect_devices()
  config = ml_collections.ConfigDict(config.to_dict())
  m, t = config.model, config.train
  if m.recurrence == "auto":
    m.recurrence = "fused"
  t.precision = resolve_precision(t.precision, devices, m.recurrence)
  if t.xla == "auto":
    bf16_cpu = t.precision == "mixed_bfloat16" and not devices.gpu
    t.xla = "decoder_step" if m.recurrence == "cudnn" or bf16_cpu else "train_step"
  why = mode_refusal(m.recurrence, t.xla, t.precision, devices)
  if why:
    raise validate_lib.ConfigError(why)
  # XLA:CPU draws ThreeFry faster than Philox (dropout's cost per step with each:
  # docs/training.md); GPUs keep Philox, TensorFlow's choice there.
  if m.get("dropout_rng", "default") == "auto":
    cpu_xla = t.xla == "train_step" and not devices.gpu
    m.dropout_rng = "threefry" if cpu_xla else "default"
  if m.get("dropout_rng") == "threefry" and t.xla != "train_step":
    raise validate_lib.ConfigError(validate_lib.threefry_refusal(t.xla))
  if config.distribute.collective == "nccl" and not devices.gpu:
    raise validate_lib.invalid("distribute.collective", "nccl",
                               "NCCL needs GPUs and this machine has none; use auto or ring")
  if config.data.batch_by == "sentences" and t.batch_size % num_replicas:
    raise validate_lib.invalid(
        "train.batch_size", t.batch_size,
        f"must be divisible by the number of replicas ({num_replicas}), which share it")
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
  # No timeout_seconds here: it would apply to every collective of every step (module
  # docstring); dead peers are found by heartbeats, waits by HostSum's own timeouts.
  options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
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
    if config.distribute.cpu_devices > 1:  # MWMS takes GPUs, or the CPU as one device.
      logging.warning("distribute.cpu_devices=%d ignored: MultiWorkerMirroredStrategy runs "
                      "one replica per worker on CPUs.", config.distribute.cpu_devices)
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


class HostSum:
  """Sums a small float64 vector over the workers (each worker's vector counted once):
  the host-side control values (stop requests, the chief's clock, barriers).

  One tf.function, traced on the first call: a new function per call would retrace each
  time. `timeout_s` only where a long wait is expected (module docstring: each timed call
  costs a thread for that long). The value enters each replica as an argument, so the
  all-reduce runs on the replica's device (a tensor made outside has no destination under
  MultiWorkerMirroredStrategy). Every worker must make the same calls in the same order.
  """

  def __init__(self, strategy: tf.distribute.Strategy, timeout_s: Optional[float] = None):
    local_replicas = len(strategy.extended.worker_devices)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)

    def replica_fn(x):
      return tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, x / local_replicas, options=options)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float64)])
    def reduce(x):
      return strategy.experimental_local_results(strategy.run(replica_fn, args=(x,)))[0]

    self._reduce = reduce

  def __call__(self, values: Sequence[float]) -> list:
    return self._reduce(tf.constant(values, tf.float64)).numpy().tolist()


def barrier(strategy: tf.distribute.Strategy, timeout_s: float) -> None:
  """Returns once every worker has called it (a one-off wait: traces a function).

  For waits while the chief alone works (training the tokenizer, building its evaluator).
  A dead worker still fails it within seconds, through MultiWorkerMirroredStrategy's
  heartbeats; `timeout_s` bounds a live but stuck one.
  """
  HostSum(strategy, timeout_s)([0.0])


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


def run_dir(workdir: str, strategy: tf.distribute.Strategy, scratch_root: str = "") -> str:
  """The chief writes to `workdir`; a non-chief worker to a scratch dir on its own node
  (MWMS needs every worker to save; only the chief's checkpoints count, so N-1 full copies
  on the shared filesystem would only cost its bandwidth), emptied first: a killed worker
  leaves stale checkpoints behind. `scratch_root` (config.distribute.worker_scratch_dir)
  defaults to the node's temporary directory; the path is unique per workdir and task."""
  if is_chief(strategy):
    return workdir
  scratch = scratch_dir(workdir, strategy.cluster_resolver.task_id, scratch_root)
  if tf.io.gfile.exists(scratch):
    tf.io.gfile.rmtree(scratch)
  return scratch


def scratch_dir(workdir: str, task_id: int, scratch_root: str = "") -> str:
  """A non-chief worker's scratch dir for `workdir`: unique per run and task."""
  run_id = hashlib.sha256(workdir.encode()).hexdigest()[:12]
  return os.path.join(scratch_root or tempfile.gettempdir(), "nmt-worker-scratch",
                      f"{run_id}-worker_{task_id}")


def remove_scratch_dir(directory: str, strategy: tf.distribute.Strategy) -> None:
  """Removes a non-chief worker's scratch dir."""
  if is_chief(strategy) or not tf.io.gfile.exists(directory):
    return
  tf.io.gfile.rmtree(directory)  # Not its parent: other runs on the node may use it.


def shared_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                     strategy: tf.distribute.Strategy) -> tokenizer_lib.Tokenizer:
  """The chief trains (or reuses) workdir's tokenizer; the other workers wait for it at a
  barrier and load it, so that all map text to the same ids (the workdir must be shared)."""
  sample = datasets.tokenizer_sample(config)
  chief = is_chief(strategy)
  if chief:
    for split in ("train", "eval", "test"):
      if config.data[split]:
        datasets.prepare_source(config.data[split], config.data)
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


class StopAgreement:
  """Makes every worker stop at the same step when any of them is told to stop, and gives
  all the chief's clock (train.max_seconds must run out at the same step everywhere).

  Called once per training-loop call (train.steps_per_loop steps): on several workers one
  untimed all-reduce of two numbers; on one, no collective at all. Replaces TensorFlow's
  PreemptionCheckpointHandler, which on GCP assumes a 3600 s grace period (it saves, then
  trains on until the VM is killed, never exiting 42), ignores signals altogether on GCP
  CPU VMs, probes the GCE metadata server at start-up, and restores the latest checkpoint
  a second time, unchecked, after ours (skipping the corrupt-checkpoint fallback). A
  signal here is acted on at the end of the current loop call, as on one worker.
  """

  def __init__(self, strategy: tf.distribute.Strategy):
    self._chief = is_chief(strategy)
    self._sum = HostSum(strategy) if is_multi_worker(strategy) else None

  def __call__(self, stop: "StopFlag", elapsed_s: tf.Variable) -> Optional[str]:
    """Why all workers stop now (a signal here or on another worker), or None; sets
    `elapsed_s` to the chief's value."""
    if self._sum is None:
      return stop.signal_name
    own = float(elapsed_s.numpy()) if self._chief else 0.0
    stops, elapsed = self._sum([1.0 if stop.signal_name else 0.0, own])
    elapsed_s.assign(elapsed)
    if stops:
      return stop.signal_name or "SIGTERM/SIGINT on another worker"
    return None


@contextlib.contextmanager
def peer_failures(strategy: tf.distribute.Strategy, step: int) -> Iterator[None]:
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
        "Slurm job, the Kubernetes Job) and it resumes from the chief's last checkpoint."
        ) from e


class ChiefBroadcast:
  """Multi-worker: every worker takes the chief's value of a variable (a decision the
  chief alone makes, like the early-stopping count after its evaluation), with a timeout:
  the others wait in it while the chief evaluates. No-op on one worker."""

  def __init__(self, strategy: tf.distribute.Strategy, timeout_s: float):
    self._chief = is_chief(strategy)
    self._sum = HostSum(strategy, timeout_s or None) if is_multi_worker(strategy) else None

  def __call__(self, variable: tf.Variable) -> None:
    if self._sum is None:
      return
    mine = float(variable.numpy()) if self._chief else 0.0
    total = self._sum([mine])[0]
    if variable.dtype.is_integer:
      total = round(total)
    variable.assign(tf.cast(total, variable.dtype))
