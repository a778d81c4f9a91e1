"""Starts a tf.data service: a dispatcher and workers that run the input pipeline for nmt-train.

For hosts whose CPUs cannot keep up with their accelerators: the prepared input pipeline
(data.train=prepared:DIR) runs on the service's workers, and nmt-train only receives
batches. Set --config.data.service_address to the address this prints.

  # Everything on this machine: one dispatcher and N workers in one process.
  python launch/data_service.py --port=5050 --num_workers=2
  nmt-train --config=configs/default.py --workdir=runs/x \\
      --config.data.train=prepared:/data/prep --config.data.service_address=grpc://localhost:5050

  # Several machines: one dispatcher, then one worker process per CPU host.
  python launch/data_service.py --role=dispatcher --port=5050
  python launch/data_service.py --role=worker --dispatcher=HOST:5050 --port=5051

Workers read the shards themselves: DIR must be at the same path on every worker (a shared
filesystem or gs://). Slurm (a CPU allocation beside the training job):

  srun --nodes=1 --ntasks=1 python launch/data_service.py --role=dispatcher --port=5050 &
  srun --nodes=4 --ntasks-per-node=1 python launch/data_service.py --role=worker \\
      --dispatcher=$(scontrol show hostnames | head -1):5050 --port=5051

Kubernetes: launch/k8s/data-service.yaml (a dispatcher Deployment + Service and a worker
Deployment to scale). Batches come in the order the workers finish them, so a run that
uses the service is not bitwise reproducible and resumes at a group boundary (see
input_pipeline/prepared.py).
"""
import argparse
import signal
import socket
import sys
import threading
from typing import List, Optional, Sequence


def start(port: int, num_workers: int) -> tuple:
  """A dispatcher on `port` (0 = any free one) and `num_workers` workers in this process;
  returns (dispatcher, workers). The dispatcher's address is dispatcher.target."""
  import tensorflow as tf  # Here: --help should not wait for TensorFlow.
  service = tf.data.experimental.service
  dispatcher = service.DispatchServer(service.DispatcherConfig(port=port))
  address = dispatcher.target.split("://")[1]
  workers = [service.WorkerServer(service.WorkerConfig(dispatcher_address=address))
             for _ in range(num_workers)]
  return dispatcher, workers


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--role", choices=("local", "dispatcher", "worker"), default="local")
  parser.add_argument("--port", type=int, default=5050, help="0 = any free port.")
  parser.add_argument("--num_workers", type=int, default=2, help="--role=local only.")
  parser.add_argument("--dispatcher", default="", help="HOST:PORT, for --role=worker.")
  parser.add_argument("--worker_host", default="", help="--role=worker: the host name the "
                      "trainers reach this worker by (default: this machine's FQDN).")
  args = parser.parse_args(argv)
  import tensorflow as tf
  service = tf.data.experimental.service
  servers: List = []
  if args.role == "worker":
    if not args.dispatcher:
      parser.error("--role=worker needs --dispatcher=HOST:PORT")
    servers.append(service.WorkerServer(service.WorkerConfig(
        dispatcher_address=args.dispatcher, port=args.port,
        worker_address=f"{args.worker_host or socket.getfqdn()}:{args.port}")))
    print(f"tf.data service worker on port {args.port}, dispatcher {args.dispatcher}",
          flush=True)
  else:
    workers = args.num_workers if args.role == "local" else 0
    dispatcher, worker_servers = start(args.port, workers)
    servers = [dispatcher, *worker_servers]
    host = "localhost" if args.role == "local" else socket.getfqdn()
    port = dispatcher.target.rsplit(":", 1)[1]
    # nmt-train's --config.data.service_address; tests read this line.
    print(f"tf.data service dispatcher grpc://{host}:{port} with {workers} local workers",
          flush=True)
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  stop.wait()
  del servers  # Stops them.
  sys.exit(0)


if __name__ == "__main__":
  main()
