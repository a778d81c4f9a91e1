"""The localhost cluster check: a multi-worker run killed -9 and restarted ends exactly as
an uninterrupted one, with bounded threads. One JSON line.

  python -m benchmarks.cluster_check --workdir=/tmp/nmt_cluster_check

Runs `launch/local.py --num_workers=2` twice on configs/tiny.py (dropout on, embedded
numbers corpus): once uninterrupted, once with worker 1 killed -9 after the first
checkpoint (--max_restarts=1: the launcher restarts the job, which resumes from it).
Every second it samples each worker's thread count from /proc. Prints both final eval
losses, whether they are equal to every digit, the peak threads per worker and the wall
time of each run. Exit code 1 if the losses differ or a run failed.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _threads(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      return int(next(line.split()[1] for line in f if line.startswith("Threads:")))
  except (OSError, StopIteration):  # The worker has exited.
    return 0


def run_job(train_args: Sequence[str], kill_at_step: int = 0) -> Dict:
  """One launch/local.py job; kills worker 1 once worker 0 logs step `kill_at_step`."""
  command = [sys.executable, os.path.join(_ROOT, "launch", "local.py"), "--num_workers=2",
             "--max_restarts=1", "--grace_s=60", "--", *train_args]
  start = time.time()
  launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=_ROOT)
  pids: Dict[int, int] = {}
  peak: Dict[int, int] = {}
  done = threading.Event()

  def sample():
    while not done.wait(1.0):
      for index, pid in list(pids.items()):
        peak[index] = max(peak.get(index, 0), _threads(pid))

  threading.Thread(target=sample, daemon=True).start()
  lines: List[str] = []
  killed = False
  for line in launcher.stdout:
    lines.append(line)
    match = re.match(r"\[launcher\] worker (\d): pid (\d+)", line)
    if match:
      pids[int(match.group(1))] = int(match.group(2))
    if kill_at_step and not killed and re.match(rf"\[worker 0\].*step {kill_at_step}/", line):
      os.kill(pids[1], signal.SIGKILL)
      killed = True
  launcher.wait()
  done.set()
  finals = [json.loads(m) for m in re.findall(r"\[worker 0\] (\{\"step\".*)", "".join(lines))]
  return dict(exit_code=launcher.returncode, killed=killed, wall_s=round(time.time() - start, 1),
              final=finals[-1] if finals else None, peak_threads=peak,
              tail="".join(lines[-20:]) if launcher.returncode else "")


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="/tmp/nmt_cluster_check")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--dropout", type=float, default=0.1)
  args = parser.parse_args(argv)
  half = args.steps // 2
  common = [f"--config={os.path.join(_ROOT, 'configs', 'tiny.py')}",
            f"--config.model.dropout={args.dropout}", f"--config.train.steps={args.steps}",
            f"--config.train.checkpoint_every={half}", f"--config.train.eval_every={half}",
            "--config.train.log_every=20", "--config.data.eval_examples=100"]
  runs = {}
  for name, kill_at in (("uninterrupted", 0), ("killed", half + 20)):
    workdir = os.path.join(args.workdir, name)
    subprocess.run(["rm", "-rf", workdir], check=True)
    runs[name] = run_job([*common, f"--workdir={workdir}"], kill_at)
  losses = {name: (run["final"] or {}).get("eval", {}).get("loss") for name, run in runs.items()}
  result = dict(steps=args.steps, dropout=args.dropout, eval_loss=losses,
                equal=losses["uninterrupted"] is not None
                and losses["uninterrupted"] == losses["killed"],
                peak_threads={n: r["peak_threads"] for n, r in runs.items()},
                wall_s={n: r["wall_s"] for n, r in runs.items()},
                exit_codes={n: r["exit_code"] for n, r in runs.items()},
                killed=runs["killed"]["killed"])
  print(json.dumps(result))
  for run in runs.values():
    if run["tail"]:
      sys.stderr.write(run["tail"])
  return 0 if result["equal"] and result["killed"] else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
