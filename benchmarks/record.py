"""Record ``pygen bench`` results into benchmarks/results/ on a shared machine.

CPU timings are only meaningful while nothing else runs. This script runs
``pygen bench`` once per op family (a short run each), waits before each run until
the machine is idle, re-runs an op when other processes used more than
``--max-foreign`` CPU cores during its run, and merges the runs into one JSON
and one markdown report (the per-run environment, incl. the other processes'
CPU use, is kept in the JSON under ``runs``).

    python benchmarks/record.py --device cpu --out benchmarks/results/bench-cpu-2026-11-23
    python benchmarks/record.py --device cpu --backends torch --ops randn --out /tmp/ref  # any pygen bench option
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's pygen
from pygen import bench, cli  # noqa: E402


def _idle_fraction(seconds=2.0):
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4]

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return (i1 - i0) / max(1, t1 - t0)


def wait_idle(threshold, timeout):
    """Wait until two consecutive samples show >= ``threshold`` idle CPU (or ``timeout`` s)."""
    if not os.path.exists("/proc/stat"):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _idle_fraction() >= threshold and _idle_fraction() >= threshold:
            return
    print(f"record: machine not idle after {timeout:.0f} s; running anyway", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    p.add_argument("--ops", default=None, help="ops to run (default: all), one pygen bench run each")
    p.add_argument("--max-foreign", type=float, default=0.1, help="re-run when others used more CPU cores")
    p.add_argument("--tries", type=int, default=4, help="runs per op at most")
    p.add_argument("--idle", type=float, default=0.95, help="idle fraction to wait for before each run")
    p.add_argument("--idle-timeout", type=float, default=900.0)
    p.add_argument("--note", default=None, help="a line added at the top of the markdown")
    p.add_argument("--update", action="store_true",
                   help="re-run only these ops' families and keep the other runs of an existing --out report")
    args, rest = p.parse_known_args(argv)

    ops = bench.select_ops(bench.parse_list(args.ops))
    families = []  # one run per family: ("q_sample" runs q_sample and q_sample+rng)
    for op in ops:
        fam = op.split("+")[0]
        if fam not in families:
            families.append(fam)
    runs, reports = [], []
    if args.update and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        keep = [r for r in old.get("runs", []) if not set(r["ops"]) & set(families)]
        runs += keep
        reports += [{"environment": r["environment"], "settings": old["settings"], "schema": old["schema"],
                     "results": [x for x in old["results"] if x["op"].split("+")[0] in r["ops"]],
                     "skipped": [x for x in old["skipped"] if x["op"].split("+")[0] in r["ops"]]} for r in keep]
    with tempfile.TemporaryDirectory() as tmp:
        for op in families:
            best = None
            for attempt in range(1, args.tries + 1):
                wait_idle(args.idle, args.idle_timeout)
                path = os.path.join(tmp, f"{op}-{attempt}.json")
                rc = cli.main(["bench", "--ops", op, "--json", path, "--no-progress", *rest])
                if rc != 0:
                    return rc
                with open(path) as f:
                    report = json.load(f)
                foreign = report["environment"].get("foreign_cpu_cores") or 0.0
                print(f"record: {op} try {attempt}: other processes used {foreign} cores", file=sys.stderr)
                if best is None or foreign < (best["environment"].get("foreign_cpu_cores") or 0.0):
                    best = report
                if foreign <= args.max_foreign:
                    break
            reports.append(best)
            runs.append({"ops": [op], "environment": best["environment"]})
    order = {fam: i for i, fam in enumerate(bench.OPS)}
    pairs = sorted(zip(runs, reports), key=lambda rr: order.get(rr[0]["ops"][0], 99))
    runs, reports = [r for r, _ in pairs], [r for _, r in pairs]
    ops = [op for op in bench.OPS if op.split("+")[0] in {r["ops"][0] for r in runs}]

    first = reports[0]
    env = dict(first["environment"])
    env["foreign_cpu_cores"] = max((r["environment"].get("foreign_cpu_cores") or 0.0) for r in reports)
    env["loadavg_1m"] = max(r["environment"].get("loadavg_1m", 0.0) for r in reports)
    env["loadavg_1m_end"] = max(r["environment"].get("loadavg_1m_end", 0.0) for r in reports)
    settings = dict(first["settings"], ops=ops)
    merged = {
        "schema": first["schema"],
        "environment": env,
        "settings": settings,
        "results": bench.add_copy_fraction([row for r in reports for row in r["results"]]),
        "skipped": [row for r in reports for row in r["skipped"]],
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")
    md = cli.format_markdown(merged)
    if args.note:
        title, body = md.split("\n", 1)
        md = f"{title}\n\n{args.note}\n{body}"
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(f"record: wrote {args.out}.json and {args.out}.md (one run per op family; worst other-process CPU use "
          f"{env['foreign_cpu_cores']} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
