"""Multi-worker training on localhost: launch/local.py, MultiWorkerMirroredStrategy, restarts.

The slow tests start real `nmt-train` workers joined by TF_CONFIG (CPU, localhost ports);
each job costs ~30 s, mostly TensorFlow start-up and tracing.
"""
import http.server
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from configs import tiny
from launch import local
from trainer import checkpoints
from trainer import distribute
from trainer import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCHER = os.path.join(_ROOT, "launch", "local.py")
_WORDS = {"eins": "one", "zwei": "two", "drei": "three", "vier": "four", "fuenf": "five",
          "sechs": "six", "sieben": "seven", "acht": "eight", "neun": "nine",
          "zehn": "ten", "elf": "eleven", "zwoelf": "twelve"}
_LINES = 1536  # A multiple of the global batch: see test_two_workers_match_one_worker.

# One bucket (every pair fits 16 tokens) and no shuffling: a batch is a run of
# consecutive lines, so the data seen does not depend on how the lines are sharded.
_OVERRIDES = {
    "data.shuffle_buffer": 0, "data.bucket_boundaries": (16,),
    "data.max_source_length": 16, "data.max_target_length": 16, "data.eval_examples": 8,
    "tokenizer.vocab_size": 48, "model.units": 32, "model.embed_dim": 16,
    "train.batch_size": 64, "train.steps": 20, "train.steps_per_loop": 5,
    "train.warmup_steps": 1, "train.log_every": 5, "train.checkpoint_every": 10,
    "train.eval_every": 20, "train.xla": "off", "eval.beam_size": 1,
    "eval.probe_sentences": (), "eval.num_probes": 1, "distribute.collective_timeout_s": 60,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """tsv: source of three German number words -> their English words, reversed."""
  rng = random.Random(0)
  path = tmp_path_factory.mktemp("corpus") / "numbers.tsv"
  lines = []
  for _ in range(_LINES):
    words = [rng.choice(sorted(_WORDS)) for _ in range(3)]
    lines.append(" ".join(words) + "\t" + " ".join(_WORDS[w] for w in reversed(words)))
  path.write_text("\n".join(lines) + "\n")
  return f"tsv:{path}"


def _flags(corpus, workdir, **overrides):
  settings = dict(_OVERRIDES, **{"data.train": corpus, "data.eval": corpus}, **overrides)
  return ([f"--config={os.path.join(_ROOT, 'configs', 'tiny.py')}", f"--workdir={workdir}"]
          + [f"--config.{key}={value}" for key, value in settings.items()])


def _launch(args, on_line=lambda line, launcher: None, timeout_s=240, env=None):
  """Runs launch/local.py, calling on_line for each output line -> (exit code, output).

  The launcher gets its own process group, so a hung job is killed whole at timeout_s.
  `env`: variables set for the launcher and its workers.
  """
  launcher = subprocess.Popen([sys.executable, _LAUNCHER, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=_ROOT,
                              start_new_session=True, env=dict(os.environ, **(env or {})))
  watchdog = threading.Timer(timeout_s, os.killpg, (launcher.pid, signal.SIGKILL))
  watchdog.start()
  output = []
  try:
    for line in launcher.stdout:
      output.append(line)
      on_line(line, launcher)
    launcher.wait()
  finally:
    watchdog.cancel()
  return launcher.returncode, "".join(output)


def _scratch(workdir) -> str:
  """Where worker 1 of a job on `workdir` keeps its scratch checkpoints (node-local, not
  the shared workdir)."""
  return distribute.scratch_dir(str(workdir), task_id=1)


def _scalars(logdir, tag="loss"):
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={
      event_accumulator.TENSORS: 0})
  acc.Reload()
  return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


@pytest.fixture(scope="module")
def cluster_run(corpus, tmp_path_factory):
  """configs/tiny.py (with _OVERRIDES) trained by 2 local workers: (workdir, output)."""
  workdir = tmp_path_factory.mktemp("cluster")
  code, output = _launch(["--num_workers=2", "--", *_flags(corpus, workdir)])
  assert code == 0, output[-5000:]
  return workdir, output


@pytest.mark.slow
def test_two_workers_match_one_worker_with_the_same_global_batch(cluster_run, corpus,
                                                                 tmp_path):
  # Worker w reads lines w, w+2, ... and batches 32 of them, so global batch k is lines
  # [64k, 64k+64) on both workers together, as on one worker with batch 64: same data,
  # same initial weights (MWMS broadcasts the chief's), same tokenizer (copied). Only the
  # float32 summation order may differ (an all-reduce of two partial sums); measured: 0
  # to 6e-8 relative. rtol=1e-4 still fails on a real error: training on other data,
  # even the first 32 of the same 64 lines per step, moves these losses by 4e-4 to 5e-3
  # (warmup_steps=1 makes the early steps count).
  workdir, _ = cluster_run
  reference = tmp_path / "one_worker"
  shutil.copytree(workdir / "tokenizer", reference / "tokenizer")
  config = tiny.get_config()
  for key, value in dict(_OVERRIDES, **{"data.train": corpus, "data.eval": corpus}).items():
    section, name = key.split(".")
    config[section][name] = value
  summary = train.train_and_evaluate(config, str(reference),
                                     tf.distribute.OneDeviceStrategy("/cpu:0"))
  assert summary["step"] == 20
  two_workers = _scalars(str(workdir / "train"))
  one_worker = _scalars(str(reference / "train"))
  assert sorted(two_workers) == sorted(one_worker) == [5, 10, 15, 20]
  np.testing.assert_allclose([two_workers[s] for s in (5, 10, 15, 20)],
                             [one_worker[s] for s in (5, 10, 15, 20)], rtol=1e-4)


@pytest.mark.slow
def test_only_the_chief_writes_summaries_checkpoints_and_the_tokenizer(cluster_run):
  workdir, output = cluster_run
  files = [os.path.relpath(os.path.join(d, f), workdir)
           for d, _, names in os.walk(workdir) for f in names]
  events = [f for f in files if "tfevents" in f]
  assert events and all(f.split(os.sep)[0] in ("train", "eval") for f in events), events
  indexes = [f for f in files if f.endswith(".index")]
  assert indexes and all(f.startswith("checkpoints" + os.sep) for f in indexes), indexes
  assert not os.path.exists(_scratch(workdir)), files  # Worker 1's scratch dir removed.
  assert "config.json" in files and "tokenizer/tokenizer.json" in files
  assert re.search(r"\[worker 0\].*Stored the tokenizer", output)
  assert re.search(r"\[worker 1\].*Reusing the tokenizer", output)
  assert "[launcher] job succeeded" in output


@pytest.mark.slow
def test_a_cluster_resumes_past_a_corrupt_latest_checkpoint(cluster_run, corpus, tmp_path):
  """Every worker falls back to the newest checkpoint that reads. TensorFlow's
  PreemptionCheckpointHandler restored the latest one a second time, unchecked."""
  workdir = tmp_path / "corrupt"
  shutil.copytree(cluster_run[0], workdir)
  data = next((workdir / "checkpoints").glob("ckpt-20.data-*"))
  data.write_bytes(data.read_bytes()[:100])  # A kill -9 in the middle of the save.
  code, text = _launch(["--num_workers=2", "--", *_flags(
      corpus, workdir, **{"train.steps": 25, "train.eval_every": 25})])
  assert code == 0, text[-5000:]
  resumed = re.findall(r"\[worker (\d)\].*Resumed from .*ckpt-(\d+) at step (\d+)", text)
  assert sorted(resumed) == [("0", "10", "10"), ("1", "10", "10")], text[-5000:]
  assert re.search(r"\[worker 0\].*ckpt-20 does not read", text)
  assert _final(text)["step"] == 25


def _final(text, worker=0):
  """The final JSON line nmt-train printed on `worker`."""
  return json.loads(re.findall(rf"\[worker {worker}\] (\{{\"step\".*)", text)[-1])


@pytest.fixture(scope="module")
def dropout_run(corpus, tmp_path_factory):
  """2 workers, 40 steps, dropout 0.1, uninterrupted: the final eval (output text)."""
  workdir = tmp_path_factory.mktemp("dropout")
  code, text = _launch(["--num_workers=2", "--", *_flags(
      corpus, workdir, **{"train.steps": 40, "model.dropout": 0.1})])
  assert code == 0, text[-5000:]
  return text


@pytest.mark.slow
def test_a_killed_worker_restarts_the_job_and_ends_exactly_as_without_the_kill(
    corpus, tmp_path, dropout_run):
  """The localhost cluster check of docs/cluster.md: 2 workers, dropout on, worker 1
  killed -9 after the step-10 checkpoint, the launcher restarts the job, which resumes
  and ends with the uninterrupted run's eval loss to every digit (the dropout masks are
  a function of (seed, step, replica), not of a random state the kill lost)."""
  workdir = tmp_path / "killed"
  pids, killed = {}, False

  def kill_worker_1_at_step_10(line, launcher):
    nonlocal killed
    match = re.match(r"\[launcher\] worker (\d): pid (\d+)", line)
    if match:
      pids[int(match.group(1))] = int(match.group(2))
    if re.match(r"\[worker 0\].*step 10/40", line) and not killed:
      os.kill(pids[1], signal.SIGKILL)
      killed = True

  code, text = _launch(["--num_workers=2", "--max_restarts=1", "--grace_s=60", "--",
                        *_flags(corpus, workdir, **{"train.steps": 40,
                                                    "model.dropout": 0.1})],
                       kill_worker_1_at_step_10)
  assert code == 0, text[-5000:]
  assert "[launcher] worker 1 was killed by SIGKILL" in text
  # The chief fails by itself, at once, and says why (the launcher would kill it at 60 s).
  assert re.search(r"\[worker 0\] error: multi-worker training failed after step \d+: a "
                   r"worker died or stopped responding", text), text[-5000:]
  restarted = text[text.index("[launcher] restart 1/1"):]
  resumed = re.findall(r"\[worker (\d)\].*Resumed from .*ckpt-(\d+) at step (\d+)", restarted)
  assert sorted(w for w, _, _ in resumed) == ["0", "1"], restarted[-5000:]
  assert all(int(step) >= 10 for _, _, step in resumed)
  final, reference = _final(restarted), _final(dropout_run)
  assert final["step"] == reference["step"] == 40
  assert final["eval"]["loss"] == reference["eval"]["loss"], (final, reference)
  # No checkpoint is corrupt: every kept one reads completely; the latest restores a model.
  state = tf.train.get_checkpoint_state(str(workdir / "checkpoints"))
  for path in state.all_model_checkpoint_paths:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  assert checkpoints.load_for_inference(str(workdir)).step == 40
  assert not os.path.exists(_scratch(workdir))


# nmt-train with a slow chief: its evaluator takes 8 s to build (a holdout: dev set over a
# large corpus) and every save 3 s more. Put first on PATH for launch/local.py.
_SLOW_CHIEF = """#!{python}
import json, os, sys, time
if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
  from trainer import checkpoints, evaluate
  build, save = evaluate.Evaluator.__init__, checkpoints.save
  def slow_build(self, *args, **kwargs):
    time.sleep(8)
    build(self, *args, **kwargs)
  def slow_save(manager, step):
    path = save(manager, step)
    time.sleep(3)
    print("slow chief: save done at step", step, flush=True)
    return path
  evaluate.Evaluator.__init__, checkpoints.save = slow_build, slow_save
from trainer.main import run_train
sys.argv[0] = "nmt-train"
run_train()
"""


class _MetadataServer(http.server.BaseHTTPRequestHandler):
  """Answers like the GCE metadata server: TensorFlow then believes it runs on GCP."""

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header("Metadata-Flavor", "Google")
    self.end_headers()
    self.wfile.write(b"fake-host")

  def log_message(self, *args):
    pass


def _threads(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


@pytest.mark.slow
def test_sigterm_makes_all_workers_save_at_the_same_step_and_exit_42(corpus, tmp_path):
  """Also, each a finding of the scale review that this run failed on before:
  - threads: a timeout on the step's collectives started one sleeping thread per
    collective (thousands per worker after 300 steps); now they stay in the hundreds;
  - a slow chief: the others waited for its evaluator in the first step's all-reduce,
    under collective_timeout_s (3 s here), and failed; now at a barrier;
  - no worker exits before the chief's (slow) save is done (srun --kill-on-bad-exit would
    kill it mid-save);
  - "on GCP" (a fake metadata server): TensorFlow's PreemptionCheckpointHandler ignored
    the signal on CPU VMs and trained on to the end."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "nmt-train").write_text(_SLOW_CHIEF.format(python=sys.executable))
  (bin_dir / "nmt-train").chmod(0o755)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetadataServer)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
         "GCE_METADATA_IP": f"127.0.0.1:{server.server_address[1]}"}
  workdir = tmp_path / "stopped"
  pids, threads = {}, []

  def sigterm_at_step_300(line, launcher):  # Like a preemption notice, once training runs.
    match = re.match(r"\[launcher\] worker (\d): pid (\d+)", line)
    if match:
      pids[int(match.group(1))] = int(match.group(2))
    if re.match(r"\[worker 0\].*step 300/1000", line):
      threads.extend(_threads(pid) for pid in pids.values())
      launcher.send_signal(signal.SIGTERM)  # The launcher passes it on to the workers.

  try:
    code, text = _launch(["--num_workers=2", "--max_restarts=1", "--", *_flags(
        corpus, workdir, **{"train.steps": 1000, "train.checkpoint_every": 1000,
                            "train.eval_every": 1000, "train.log_every": 50,
                            "train.steps_per_loop": 10,
                            "distribute.collective_timeout_s": 3})],
                         sigterm_at_step_300, env=env)
  finally:
    server.shutdown()
  assert code == 128 + signal.SIGTERM, text[-5000:]
  assert "[launcher] workers exited with codes [42, 42]" in text
  assert "restart 1/1" not in text  # A stop asked for is not a failure.
  assert len(threads) == 2 and max(threads) < 500, threads
  saved = [(m.start(), m.group(1), m.group(2)) for m in re.finditer(
      r"\[worker (\d)\].*all workers saved a checkpoint at step (\d+)", text)]
  assert sorted(w for _, w, _ in saved) == ["0", "1"] and saved[0][2] == saved[1][2], saved
  step = int(saved[0][2])
  assert 300 <= step < 1000
  chief_done = text.index(f"[worker 0] slow chief: save done at step {step}")
  assert all(chief_done < position for position, _, _ in saved), text[-3000:]
  latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
  assert latest.endswith(f"ckpt-{step}"), latest
  assert not os.path.exists(_scratch(workdir))


def test_launcher_gives_each_worker_the_cluster_and_its_index():
  ports = local.free_ports(3)
  assert len(set(ports)) == 3
  configs = [json.loads(local.tf_config(ports, i)) for i in range(3)]
  assert all(c["cluster"]["worker"] == [f"localhost:{p}" for p in ports] for c in configs)
  assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]


def test_slurm_cluster_is_one_worker_per_node(monkeypatch):
  monkeypatch.setenv("SLURM_PROCID", "1")
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x2)")
  resolver = distribute.slurm_cluster_resolver()
  assert resolver.cluster_spec().as_dict() == {"worker": ["gpu07:8888", "gpu08:8888"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 1)
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
  with pytest.raises(ValueError, match="one nmt-train task per node"):
    distribute.slurm_cluster_resolver()
