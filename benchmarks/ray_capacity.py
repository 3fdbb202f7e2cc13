"""Capacity of `serve --ray`: completion tokens per second with 1, 2, ... Ray Serve replicas of one CPU each, on
a local Ray cluster, next to the single-process server on the same CPUs in the same run. Every answer is
checked against the model's own greedy text (serving/load.py's round). Prints one line per setting and the
tokens per second each replica gave.

    python benchmarks/ray_capacity.py [--model story] [--weights native] [--replicas 1,2] [--cpus 2] [--requests 64]
                                      [--clients-per-replica 16] [--max-tokens 64]

On a machine with fewer cores than replicas, replicas share cores: the numbers then say what one core gives,
not how a cluster scales.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import minitorch_infer
from minitorch_infer.serving.app import serving_in_thread
from minitorch_infer.serving.load import PROMPTS, run_round


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="story")
    parser.add_argument("--weights", default=None, help="f32, q8_0, q4_0, q4_1 or native (default: the model's)")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    parser.add_argument("--cpus", type=int, default=2, help="the local cluster's CPUs")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients-per-replica", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    import ray
    from ray import serve
    from threadpoolctl import threadpool_limits

    from minitorch_infer.serving.ray_serve import APP_NAME, openai_application, run_openai_application

    load = functools.partial(minitorch_infer.load, args.model, weights=args.weights, context=512)
    model = load()
    expected = {p: model.generate(p, max_new_tokens=args.max_tokens, greedy=True).text for p in PROMPTS}
    print(f"{args.model} ({args.weights or 'default'} weights): {args.requests} streamed greedy requests of "
          f"{args.max_tokens} tokens per setting, {os.cpu_count()} cores", flush=True)

    def measure(label: str, url: str, clients: int, replicas: int) -> None:
        run_round(url, args.model, expected, clients, clients, args.max_tokens, 0, 0)       # warm up
        report = run_round(url, args.model, expected, args.requests, clients, args.max_tokens, 0, 0)
        rate = report.completion_tokens / report.seconds
        print(f"{label}: {report.summary()}; {rate / replicas:,.1f} tok/s per replica", flush=True)
        if report.wrong:
            raise SystemExit(f"{len(report.wrong)} wrong answers")

    for threads in (1, args.cpus):
        with threadpool_limits(limits=threads), serving_in_thread(load(), args.model) as url:
            measure(f"single process, {threads} BLAS thread(s), {args.clients_per_replica} clients", url,
                    args.clients_per_replica, 1)

    ray.init(num_cpus=args.cpus, object_store_memory=200 * 2**20, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    port = free_port()                                    # Serve's proxy keeps the port it first started on
    try:
        for replicas in (int(r) for r in args.replicas.split(",")):
            url = run_openai_application(openai_application(load, args.model, replicas=replicas), "127.0.0.1", port)
            clients = replicas * args.clients_per_replica
            measure(f"Ray Serve, {replicas} replica(s) of 1 CPU, {clients} clients", url, clients, replicas)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
