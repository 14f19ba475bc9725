"""One table from ``benchmarks/gpu.sh``'s outputs: every method at B = 1 and 16 against ``model.generate``,
then the server's throughput at each concurrency.

    python benchmarks/gpu_table.py OUT [--seconds S]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(out: Path, seconds: float | None = None) -> str:
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines() if line.strip()]
    server = json.loads((out / "server.json").read_text())
    env = rows[0]["environment"] if rows else server["environment"]
    lines = [f"model {rows[0]['model'] if rows else server['model']}, {env.get('device')}, "
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, commit {env.get('commit')}, "
             f"{env.get('date')}" + (f"; whole run {seconds:.0f} s" if seconds is not None else ""), "",
             "| method | B | new tokens | ms/token | tokens/s | time / generate | peak mem / generate | footprint / generate | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['new_tokens']} | {r['ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['time_ratio']:.3f} | {r['mem_ratio']:.3f} | {r['footprint_ratio']:.3f} | "
                     f"{r.get('note', '')} |")
    lines += ["", f"Server (`personalign serve`, methods {', '.join(server['methods'])} cycling, "
              f"{server['max_tokens']} tokens, greedy):", "",
              "| concurrency | requests | wall s | requests/s | tokens/s | mean latency s | most requests in one forward |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in server["rows"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['wall_s']:.1f} | {r['req_per_s']:.2f} | "
                     f"{r['tok_per_s']:.1f} | {r['mean_latency_s']:.2f} | {r['max_rows_in_step']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float)
    a = ap.parse_args()
    print(table(a.out, a.seconds), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
