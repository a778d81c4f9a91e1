"""Runs a multi-worker job on this machine: N `nmt-train` processes joined by TF_CONFIG.

  python launch/local.py --num_workers=2 [--max_restarts=1] [--gpus_per_worker=G] -- \
      --config=configs/tiny.py --workdir=/tmp/nmt_cluster

Every worker gets the same nmt-train arguments and a TF_CONFIG naming all workers on free
localhost ports (worker 0 is the chief). Each worker sees only its own GPUs, through
CUDA_VISIBLE_DEVICES: worker i gets the i-th run of G of the GPUs this launcher sees (those
of its CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`'s); by default the GPUs are split evenly,
0 means none (CPU workers). Without this every worker would see, and claim the memory of,
every GPU. Their output is streamed with a `[worker i]`
prefix. If any worker fails, the others cannot go on: they fail within seconds too, or
are killed after --grace_s; with --max_restarts the whole job is then started again (new
ports, same command) and resumes from the chief's last checkpoint. SIGINT/SIGTERM to the
launcher are passed on to the workers as SIGTERM: they save a checkpoint together and exit
with code 42, and the launcher does not restart them; a second signal kills them.

Exit code: 0 if every worker exited 0, else the first failing worker's exit code
(128 + signal number if it was killed by a signal); 128 + signal number if stopped.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

_POLL_S = 0.2
# nmt-train's exit code after a coordinated checkpoint on SIGTERM/SIGINT (TF's convention
# for preemption restarts; trainer/distribute.py PREEMPTED_EXIT_CODE).
PREEMPTED_EXIT_CODE = 42


def free_ports(count: int) -> List[int]:
  """`count` distinct TCP ports that are free on localhost right now."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("localhost", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_config(ports: Sequence[int], index: int) -> str:
  """The TF_CONFIG of worker `index` in a cluster of localhost workers (0 is the chief)."""
  return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


def _exit_code(returncode: int) -> int:
  """Popen's -N for 'killed by signal N' as a shell would report it (128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with code {returncode}" + (
      " (stopped by a signal after a checkpoint that all workers saved)"
      if returncode == PREEMPTED_EXIT_CODE else "")


class Output:
  """Our stdout, shared by the worker streams and the launcher's own messages."""

  def __init__(self):
    self._lock = threading.Lock()

  def write(self, prefix: str, line: str) -> None:
    line = line.rstrip("\n")
    with self._lock:
      sys.stdout.write(f"[{prefix}] {line}\n")
      sys.stdout.flush()

  def stream(self, index: int, process: subprocess.Popen) -> None:
    """Copies one worker's output line by line, with a `[worker i]` prefix."""
    for line in process.stdout:
      self.write(f"worker {index}", line)

  def log(self, message: str) -> None:
    self.write("launcher", message)


def visible_gpus() -> List[str]:
  """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: that variable's list
  when it is set (CUDA ignores everything from the first negative index on, so do we),
  else the indices `nvidia-smi -L` lists; [] without either. No TensorFlow import: it
  would take seconds and claim the GPUs' memory in the launcher itself."""
  listed = os.environ.get("CUDA_VISIBLE_DEVICES")
  if listed is not None:
    gpus = []
    for entry in (e.strip() for e in listed.split(",") if e.strip()):
      if entry.startswith("-"):
        break
      gpus.append(entry)
    return gpus
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                            check=False, timeout=60)
  except subprocess.TimeoutExpired:
    raise ValueError("`nvidia-smi -L` did not answer in 60 s; name the GPUs with "
                     "CUDA_VISIBLE_DEVICES=0,1,... instead") from None
  if result.returncode != 0:  # No driver loaded: no usable GPU.
    return []
  return [str(i) for i, line in enumerate(
      l for l in result.stdout.splitlines() if l.startswith("GPU "))]


def split_gpus(gpus: Sequence[str], num_workers: int,
               gpus_per_worker: Optional[int]) -> List[str]:
  """Each worker's CUDA_VISIBLE_DEVICES: consecutive runs of gpus_per_worker GPUs (None:
  as many as divide evenly). ValueError if the workers need more GPUs than there are."""
  if gpus_per_worker is None:
    if 0 < len(gpus) < num_workers:
      raise ValueError(
          f"{num_workers} workers but {len(gpus)} GPUs ({','.join(gpus)}): give each worker "
          f"at least one (--num_workers<={len(gpus)}) or none (--gpus_per_worker=0, CPU)")
    gpus_per_worker = len(gpus) // num_workers
  if num_workers * gpus_per_worker > len(gpus):
    raise ValueError(
        f"--num_workers={num_workers} x --gpus_per_worker={gpus_per_worker} needs "
        f"{num_workers * gpus_per_worker} GPUs, but {len(gpus)} are visible"
        + (f" ({','.join(gpus)})" if gpus else "")
        + (f"; use --gpus_per_worker<={len(gpus) // num_workers} or fewer workers"
           if len(gpus) >= num_workers else "")
        + "; --gpus_per_worker=0 runs the workers on CPU")
  return [",".join(gpus[i * gpus_per_worker:(i + 1) * gpus_per_worker])
          for i in range(num_workers)]


class Job:
  """One attempt: N worker processes started together and stopped together."""

  def __init__(self, command: List[str], worker_gpus: List[str], output: Output):
    ports = free_ports(len(worker_gpus))
    self.processes, self.threads = [], []
    for index, gpus in enumerate(worker_gpus):
      env = dict(os.environ, TF_CONFIG=tf_config(ports, index), PYTHONUNBUFFERED="1",
                 CUDA_VISIBLE_DEVICES=gpus)
      process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, errors="replace")
      output.log(f"worker {index}: pid {process.pid}, localhost:{ports[index]}, "
                 f"GPUs: {gpus or 'none'}")
      thread = threading.Thread(target=output.stream, args=(index, process), daemon=True)
      thread.start()
      self.processes.append(process)
      self.threads.append(thread)

  def first_failure(self) -> Optional[int]:
    """Index of a worker that exited non-zero, or None. Among several, one killed by a
    signal: the others most likely failed because it was gone."""
    failed = [i for i, p in enumerate(self.processes) if p.poll() not in (None, 0)]
    return min(failed, key=lambda i: (self.processes[i].returncode > 0, i), default=None)

  def running(self) -> bool:
    return any(p.poll() is None for p in self.processes)

  def signal_all(self, signum: int) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.send_signal(signum)

  def stop(self, grace_s: float) -> None:
    """Gives the others `grace_s` to exit by themselves, then kills them.

    Without a peer they fail within seconds (refused connections, missed heartbeats) and
    say why. SIGTERM would not help: saving together needs every worker.
    """
    deadline = time.time() + grace_s
    while self.running() and time.time() < deadline:
      time.sleep(_POLL_S)
    self.signal_all(signal.SIGKILL)
    self.wait()

  def wait(self) -> None:
    for process in self.processes:
      process.wait()
    for thread in self.threads:
      thread.join()


def run_job(command: List[str], args, output: Output, stop_signals: List[int]) -> int:
  """Runs one attempt to the end; returns its exit code (0 = every worker exited 0).

  A first SIGINT/SIGTERM to the launcher becomes SIGTERM to every worker (they save
  together and exit); a second one kills them.
  """
  job = Job(command, args.worker_gpus, output)
  forwarded = 0
  while job.running():
    if len(stop_signals) > forwarded:
      forwarded = len(stop_signals)
      signum = signal.SIGTERM if forwarded == 1 else signal.SIGKILL
      output.log(f"{signal.Signals(stop_signals[-1]).name} received: sending "
                 f"{signum.name} to the workers")
      job.signal_all(signum)
    failed = job.first_failure()
    if failed is not None and not forwarded:
      code = job.processes[failed].returncode
      output.log(f"worker {failed} {_describe(code)}; " + (
          "the others do the same" if code == PREEMPTED_EXIT_CODE else
          f"the others cannot continue without it (killed if still running in "
          f"{args.grace_s:g} s)"))
      job.stop(args.grace_s)
      return _exit_code(job.processes[failed].returncode)
    time.sleep(_POLL_S)
  job.wait()
  codes = [p.returncode for p in job.processes]
  output.log(f"workers exited with codes {codes}")
  return next((_exit_code(c) for c in codes if c != 0), 0)


def main(argv: Sequence[str]) -> int:
  args = _parse(argv)
  nmt_train = shutil.which("nmt-train")
  if nmt_train is None:
    sys.exit("error: nmt-train is not on PATH; install the project with `pip install -e .`")
  command = [nmt_train, *args.train_args]
  try:
    gpus = visible_gpus()
    args.worker_gpus = split_gpus(gpus, args.num_workers, args.gpus_per_worker)
  except ValueError as e:
    sys.exit(f"error: {e}")
  output, stop_signals = Output(), []
  used = sum(len(g.split(",")) for g in args.worker_gpus if g)
  if used < len(gpus):
    output.log(f"GPUs {','.join(gpus[used:])} are not used (--gpus_per_worker)")
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda s, _: stop_signals.append(s))
  for attempt in range(args.max_restarts + 1):
    if attempt:
      output.log(f"restart {attempt}/{args.max_restarts}: starting all "
                 f"{args.num_workers} workers again; they resume from the last checkpoint")
    code = run_job(command, args, output, stop_signals)
    if code == 0 or stop_signals:
      break
  if stop_signals:
    code = 128 + stop_signals[0]
    output.log(f"job stopped by {signal.Signals(stop_signals[0]).name} (exit code {code}); "
               "run the same command again to resume")
  else:
    output.log("job succeeded" if code == 0 else f"job failed with exit code {code}")
  return code


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="python launch/local.py --num_workers=N [--max_restarts=K] "
      "[--gpus_per_worker=G] -- <nmt-train args>")
  parser.add_argument("--num_workers", type=int, required=True,
                      help="Worker processes to start (each one replica on CPU, one per "
                      "GPU it gets on GPUs).")
  parser.add_argument("--gpus_per_worker", type=int, default=None,
                      help="GPUs each worker sees through CUDA_VISIBLE_DEVICES (default: "
                      "the visible GPUs split evenly; 0 = none, CPU workers).")
  parser.add_argument("--max_restarts", type=int, default=0,
                      help="Restart the whole job up to this many times after a failure.")
  parser.add_argument("--grace_s", type=float, default=30.0,
                      help="After a worker failed, seconds the others get to fail by "
                      "themselves (they log why) before they are killed.")
  args = parser.parse_args(argv[:split])
  args.train_args = argv[split + 1:]
  if (args.num_workers < 1 or args.max_restarts < 0 or args.grace_s < 0
      or (args.gpus_per_worker or 0) < 0):
    parser.error(f"--num_workers={args.num_workers} must be >= 1, --max_restarts="
                 f"{args.max_restarts}, --grace_s={args.grace_s} and --gpus_per_worker="
                 f"{args.gpus_per_worker} >= 0")
  if not args.train_args:
    parser.error("no nmt-train arguments after `--` (at least --config and --workdir)")
  return args


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
