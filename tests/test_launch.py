"""Launchers without a cluster or TensorFlow: launch/local.py with a stub nmt-train that
prints its environment, launch/slurm.sbatch with fake srun/scontrol, and what nmt-train
prints for a workdir that is a URL."""
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCHER = os.path.join(_ROOT, "launch", "local.py")
_SBATCH = os.path.join(_ROOT, "launch", "slurm.sbatch")


def _script(directory, name: str, body: str) -> None:
  path = directory / name
  path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _environment(bin_dir, **variables) -> dict:
  """This process's environment with `bin_dir` first on PATH, variables set (None: unset)."""
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  for name, value in variables.items():
    env.pop(name, None)
    if value is not None:
      env[name] = value
  return env


@pytest.fixture
def stub_bin(tmp_path):
  """A directory with an nmt-train that prints the GPUs it was given and exits 0."""
  _script(tmp_path, "nmt-train", 'echo "GPUs=${CUDA_VISIBLE_DEVICES-unset}"\n')
  return tmp_path


def _launch(env: dict, *options: str) -> tuple[int, str, dict]:
  """Runs launch/local.py -> (exit code, output, {worker index: CUDA_VISIBLE_DEVICES})."""
  result = subprocess.run([sys.executable, _LAUNCHER, *options, "--", "--config=c.py"],
                          env=env, capture_output=True, text=True, timeout=60)
  gpus = {}
  for line in result.stdout.splitlines():
    if line.startswith("[worker ") and "] GPUs=" in line:
      index, value = line[len("[worker "):].split("] GPUs=")
      gpus[int(index)] = value
  return result.returncode, result.stdout + result.stderr, gpus


def test_each_worker_gets_its_share_of_cuda_visible_devices(stub_bin):
  env = _environment(stub_bin, CUDA_VISIBLE_DEVICES="0,1,2,3")
  code, output, gpus = _launch(env, "--num_workers=2")
  assert code == 0, output
  assert gpus == {0: "0,1", 1: "2,3"}
  code, output, gpus = _launch(env, "--num_workers=2", "--gpus_per_worker=1")
  assert code == 0 and gpus == {0: "0", 1: "1"}, output
  assert "GPUs 2,3 are not used" in output
  code, output, gpus = _launch(env, "--num_workers=2", "--gpus_per_worker=0")
  assert code == 0 and gpus == {0: "", 1: ""}, output  # CPU workers.


def test_gpus_are_counted_with_nvidia_smi_without_cuda_visible_devices(stub_bin):
  _script(stub_bin, "nvidia-smi", """\
      echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)"
      echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)"
      echo "GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)"
      """)
  env = _environment(stub_bin, CUDA_VISIBLE_DEVICES=None)
  code, output, gpus = _launch(env, "--num_workers=3")
  assert code == 0 and gpus == {0: "0", 1: "1", 2: "2"}, output


def test_more_gpus_than_visible_is_one_clear_error(stub_bin):
  env = _environment(stub_bin, CUDA_VISIBLE_DEVICES="4,5,6")
  code, output, gpus = _launch(env, "--num_workers=2", "--gpus_per_worker=2")
  assert code == 1 and not gpus
  assert output.strip() == (
      "error: --num_workers=2 x --gpus_per_worker=2 needs 4 GPUs, but 3 are visible "
      "(4,5,6); use --gpus_per_worker<=1 or fewer workers; --gpus_per_worker=0 runs the "
      "workers on CPU")
  code, output, _ = _launch(env, "--num_workers=4")
  assert code == 1 and "4 workers but 3 GPUs (4,5,6)" in output


@pytest.fixture
def fake_slurm(tmp_path):
  """bin/srun (records its arguments in srun.log, exits $FAKE_SRUN_EXIT) and bin/scontrol
  (records its own in scontrol.log) -> tmp_path."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir, "srun", """\
      echo "$@" > "$FAKE_SLURM_LOG/srun.log"
      trap 'exit 42' TERM  # Like nmt-train: save, then exit 42.
      touch "$FAKE_SLURM_LOG/started"
      if [ "$FAKE_SRUN_EXIT" = wait ]; then sleep 30 & wait; fi
      exit "$FAKE_SRUN_EXIT"
      """)
  _script(bin_dir, "scontrol", 'echo "$@" >> "$FAKE_SLURM_LOG/scontrol.log"\n')
  return tmp_path


def _sbatch(fake_slurm, srun_exit: str) -> subprocess.Popen:
  env = _environment(fake_slurm / "bin", FAKE_SLURM_LOG=str(fake_slurm), SLURM_JOB_ID="4711",
                     FAKE_SRUN_EXIT=srun_exit, TF_CONFIG="{}")
  return subprocess.Popen(["bash", _SBATCH, "--config=c.py", "--workdir=/shared/w"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)


def _requeues(fake_slurm) -> str:
  path = fake_slurm / "scontrol.log"
  return path.read_text() if path.exists() else ""


def test_slurm_srun_does_not_kill_peers_when_one_worker_exits():
  with open(_SBATCH) as f:
    script = f.read()
  assert "--kill-on-bad-exit=1" not in script and "--kill-on-bad-exit=0" in script


@pytest.mark.parametrize("srun_exit, requeued", [("42", True), ("0", False), ("1", False)])
def test_slurm_job_requeues_itself_after_a_saved_stop(fake_slurm, srun_exit, requeued):
  job = _sbatch(fake_slurm, srun_exit)
  output, _ = job.communicate(timeout=30)
  assert job.returncode == int(srun_exit), output
  assert (fake_slurm / "srun.log").read_text().split() == [
      "--ntasks-per-node=1", "--label", "--kill-on-bad-exit=0", "--wait=0", "nmt-train",
      "--config=c.py", "--workdir=/shared/w", "--config.distribute.strategy=multi_worker"]
  assert _requeues(fake_slurm) == ("requeue 4711\n" if requeued else ""), output


def test_slurm_job_signalled_itself_stops_without_requeue(fake_slurm):
  """scancel (or --full --signal=TERM) signals the script and srun: save, exit, no requeue."""
  job = _sbatch(fake_slurm, "wait")
  deadline = time.time() + 60  # A bound on a hung job, not a guess at how long it takes.
  while not (fake_slurm / "started").exists():  # srun runs, its TERM trap set.
    assert time.time() < deadline and job.poll() is None, "fake srun never started"
    time.sleep(0.05)  # Poll interval only.
  os.killpg(job.pid, signal.SIGTERM)
  output, _ = job.communicate(timeout=30)
  assert job.returncode == 42, output
  assert _requeues(fake_slurm) == ""


def test_nmt_train_prints_a_url_workdir_as_it_is(tmp_path):
  """The final TensorBoard line: gs://bucket/run must not become <cwd>/gs:/bucket/run.
  The training itself is stubbed; ram:// (TensorFlow's in-memory filesystem) stands in
  for gs://, which the start-up resume check would try to reach."""
  program = textwrap.dedent("""\
      import sys, types
      import trainer
      fake = types.ModuleType("trainer.train")
      fake.train_and_evaluate = lambda config, workdir: dict(
          already_complete=False, samples=[], step=3, interrupted=False, test=None,
          eval=dict(bleu=1.0, chrf=2.0, loss=3.0), workdir=workdir)
      sys.modules["trainer.train"] = trainer.train = fake
      from trainer import main
      sys.argv = ["nmt-train", "--config=configs/tiny.py", "--workdir=ram://bucket/run"]
      main.run_train()
      """)
  result = subprocess.run([sys.executable, "-c", program], cwd=_ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "TensorBoard: tensorboard --logdir ram://bucket/run\n" in result.stdout
