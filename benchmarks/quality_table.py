"""README's quality table in one run: for each model and weight type, perplexity on the eval text, KL
divergence from float32 and top-1 agreement (`minitorch-infer eval --reference-weights f32`), decode tok/s
and peak RSS (`bench`'s measurement: a 128-token prompt, 128 greedy steps, each run a fresh process).

    python benchmarks/quality_table.py [--threads 2] [--repeat 3]

Speed runs take turns across weight types, so a machine whose speed drifts moves every row alike; read
speeds as ratios within one run (the table prints them against float32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from minitorch_infer.cli.benchmark import measure_in_subprocess

ROWS = {"smollm2-135m-instruct": ["f32", "q8_0", "q4_0", "q4_1", "native"], "story": ["f32", "q8_0"]}
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def quality(name: str, weights: str, context: int) -> dict:
    command = [sys.executable, "-m", "minitorch_infer", "eval", "-m", name, "--weights", weights,
               "--reference-weights", "f32", "--context", str(context), "--json", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--context", type=int, default=512, help="eval window (default 512)")
    args = parser.parse_args()
    for variable in BLAS_OVERRIDES:
        os.environ.pop(variable, None)

    print("| model | weights | weights MiB | perplexity | KL from f32 mean / p99 | top-1 agreement | "
          "decode tok/s | x f32 | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, types in ROWS.items():
        speed = {w: [] for w in types}
        for _ in range(args.repeat):
            for w in types:
                speed[w].append(measure_in_subprocess("ours", name, 1, args.threads, False, w))
        f32_decode = statistics.median(m.decode_tok_s[0] for m in speed["f32"])
        for w in types:
            q = quality(name, w, args.context)
            decode = statistics.median(m.decode_tok_s[0] for m in speed[w])
            rss = max(m.peak_rss_mb for m in speed[w])
            print(f"| {name} | {w}{' (' + q['weight_types'] + ')' if w == 'native' else ''} | "
                  f"{q['weights_mib']:.1f} | {q['perplexity']:.3f} | {q['kl_mean']:.5f} / {q['kl_p99']:.4f} | "
                  f"{100 * q['top1_agreement']:.1f}% | {decode:,.1f} | {decode / f32_decode:.2f} | {rss:,.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
