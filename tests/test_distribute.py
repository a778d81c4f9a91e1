"""trainer/distribute.py pieces that only clusters reach, forced on one CPU process."""
import types

import tensorflow as tf

from trainer import distribute


def _worker(task_id: int, workers: int = 2):
  """A stand-in for a MultiWorkerMirroredStrategy of worker `task_id` (what run_dir and
  is_chief read: the cluster resolver)."""
  spec = tf.train.ClusterSpec({"worker": [f"host{i}:8888" for i in range(workers)]})
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      spec, task_type="worker", task_id=task_id)
  return types.SimpleNamespace(cluster_resolver=resolver)


def test_non_chief_checkpoints_go_to_node_local_scratch_not_the_shared_workdir(tmp_path):
  """MWMS makes every worker save; N-1 full copies on the shared filesystem only cost its
  bandwidth. The scratch dir is per run and per task, and emptied when taken."""
  shared = str(tmp_path / "shared" / "run")
  assert distribute.run_dir(shared, _worker(0)) == shared
  scratch = distribute.run_dir(shared, _worker(1))
  assert not scratch.startswith(str(tmp_path / "shared")), scratch
  assert scratch != distribute.run_dir(str(tmp_path / "other"), _worker(1))
  assert scratch != distribute.run_dir(shared, _worker(2, workers=3))
  local = tmp_path / "node_local"
  scratch = distribute.run_dir(shared, _worker(1), str(local))
  assert scratch.startswith(str(local))
  tf.io.gfile.makedirs(scratch + "/checkpoints")
  assert distribute.run_dir(shared, _worker(1), str(local)) == scratch
  assert not tf.io.gfile.exists(scratch)  # A killed worker's leftovers are dropped.


def test_host_sum_traces_once_however_often_it_is_called():
  """A new tf.function per call retraced every loop call (and eval wait). One device: a
  float64 collective on the session's 2-device MirroredStrategies would take an instance
  key that their float32 ones use too (collective keys are per process)."""
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  host_sum = distribute.HostSum(strategy)
  for i in range(5):
    assert host_sum([1.0, float(i)]) == [1.0, float(i)]  # Each worker counted once.
  assert host_sum._reduce.experimental_get_tracing_count() == 1


def test_stop_agreement_on_one_worker_is_the_local_signal_and_no_collective():
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  agree = distribute.StopAgreement(strategy)
  stop = distribute.StopFlag()
  elapsed = tf.Variable(3.0, dtype=tf.float64)
  assert agree(stop, elapsed) is None
  stop.signal_name = "SIGTERM"
  assert agree(stop, elapsed) == "SIGTERM" and float(elapsed.numpy()) == 3.0
