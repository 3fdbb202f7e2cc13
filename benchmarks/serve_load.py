"""Load and fault test of the OpenAI server: 200 streamed requests from 32 concurrent clients on loopback,
10% hanging up after their first chunk and 5% malformed, in rounds (default two). Checks every valid answer against the
engine's own greedy text, that no KV block is held once the server is idle, and that memory stays flat; prints
throughput and time to first token.

    python benchmarks/serve_load.py [--model story] [--requests 200] [--clients 32] [--max-tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import minitorch_infer
from minitorch_infer.serving.app import serving_in_thread
from minitorch_infer.serving.load import PROMPTS, run_round


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="story")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = minitorch_infer.load(args.model, context=512)
    expected = {p: model.generate(p, max_new_tokens=args.max_tokens, greedy=True).text for p in PROMPTS}
    failures = 0
    with serving_in_thread(model, args.model) as url:           # from here the model is the server's
        memory = []
        for round_number in range(1, args.rounds + 1):
            report = run_round(url, args.model, expected, args.requests, args.clients, args.max_tokens)
            time.sleep(0.5)
            held = model.kv_cache.used_blocks
            memory.append(resident_mib())
            print(f"round {round_number}: {report.summary()}; KV blocks held when idle: {held}; "
                  f"resident {memory[-1]:.0f} MiB")
            failures += len(report.wrong) + held
    print("resident memory after each round: " + " -> ".join(f"{m:.0f} MiB" for m in memory))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
