"""Turn a pytest-benchmark JSON file into the markdown table kept in benchmarks/RESULTS.md.

    python benchmarks/report.py bench.json
"""

import json
import subprocess
import sys


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    rows = data["benchmarks"]
    info0 = rows[0]["extra_info"] if rows else {}
    print(f"- date: {data.get('datetime', '?')}, device: {info0.get('device', '?')}, "
          f"torch {info0.get('torch', '?')}, triton {info0.get('triton', '?')}, commit {commit}")
    keys = sorted({k for r in rows for k in r["extra_info"]} - {"device", "torch", "triton", "size"})
    print()
    print("| benchmark | mean ms | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for r in rows:
        extra = r["extra_info"]
        cells = [str(extra.get(k, "")) for k in keys]
        print(f"| {r['name']} | {r['stats']['mean'] * 1e3:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/report.py BENCH_JSON")
    main(sys.argv[1])
