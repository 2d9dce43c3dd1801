#!/usr/bin/env python3
"""Summarises a bench-compare run: OUT/{base,head}-<pair>/results.json (wallet-bench).

For each scenario and build: the runs, their mean and spread (min..max); the ratio of the
means (head / base) and the median, min and max of the per-pair ratios; node CPU
microseconds per acknowledged operation. Throughput for closed-loop scenarios, p99 for the
open-loop `constant` (lower is better there). Fails when a run is missing or failed its
consistency check. Writes OUT/summary.md and OUT/summary.json and prints the table.

`bench_compare.py --self-test` checks the arithmetic on made-up results.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

# Scenarios measured by their latency at a fixed offered rate rather than by throughput.
LATENCY_SCENARIOS = {"constant"}
# wallet-bench's probe of the nodes' trivial endpoint beside an open-loop scenario: one more
# row per such scenario, "<scenario> baseline", the machine's own p99 in the same minutes.
BASELINE_SUFFIX = " baseline"


def is_latency(scenario):
    return scenario in LATENCY_SCENARIOS or scenario.endswith(BASELINE_SUFFIX)


def metric(result):
    if is_latency(result["scenario"]):
        return result["p99_ms"]
    return result["achieved_rps"]


def baseline_row(result):
    """The baseline probe of `result` as a result of its own (None without one)."""
    b = result.get("baseline")
    if not b:
        return None
    return {"scenario": result["scenario"] + BASELINE_SUFFIX, "consistency_ok": True,
            "nodes_cpu_s": None, "status_counts": {"error": b["failed"]}, "p99_ms": b["p99_ms"]}


def cpu_us_per_op(result):
    cpu = result.get("nodes_cpu_s")
    # Acknowledged = committed: applied (200) or refused by the ledger (409).
    counts = result.get("status_counts", {})
    ok = counts.get("200", 0) + counts.get("409", 0)
    if cpu is None or ok == 0:
        return None
    return cpu / ok * 1e6


def failed(result):
    """5xx, refused connections and unanswered requests (wallet-bench's own grouping)."""
    return sum(n for status, n in result["status_counts"].items()
               if status in ("error", "refused") or status.startswith("5"))


def load(out, pairs):
    """{scenario: {"base": [result per pair], "head": [...]}}, in pair order."""
    runs = {}
    problems = []
    for label in ("base", "head"):
        for pair in range(1, pairs + 1):
            path = Path(out) / f"{label}-{pair}" / "results.json"
            if not path.exists():
                problems.append(f"missing {path}")
                continue
            for result in json.loads(path.read_text()):
                if not result.get("consistency_ok", False):
                    problems.append(f"{label} pair {pair} {result['scenario']}: consistency check failed")
                for r in (result, baseline_row(result)):
                    if r is not None:
                        runs.setdefault(r["scenario"], {"base": [], "head": []})[label].append(r)
    return runs, problems


def summarise(runs):
    rows = []
    for scenario, by_build in runs.items():
        base, head = by_build["base"], by_build["head"]
        if not base or len(base) != len(head):
            continue
        b = [metric(r) for r in base]
        h = [metric(r) for r in head]
        ratios = [y / x for x, y in zip(b, h) if x]
        base_mean, head_mean = statistics.fmean(b), statistics.fmean(h)
        cpu_b = [c for c in map(cpu_us_per_op, base) if c is not None]
        cpu_h = [c for c in map(cpu_us_per_op, head) if c is not None]
        rows.append({
            "scenario": scenario,
            "unit": "p99 ms" if is_latency(scenario) else "ops/s",
            "base_runs": b,
            "head_runs": h,
            "base_mean": base_mean,
            "head_mean": head_mean,
            "ratio_of_means": head_mean / base_mean if base_mean else None,
            "pair_ratio_median": statistics.median(ratios) if ratios else None,
            "pair_ratio_min": min(ratios) if ratios else None,
            "pair_ratio_max": max(ratios) if ratios else None,
            "base_cpu_us_per_op": statistics.median(cpu_b) if cpu_b else None,
            "head_cpu_us_per_op": statistics.median(cpu_h) if cpu_h else None,
            "failed": {"base": sum(map(failed, base)), "head": sum(map(failed, head))},
        })
    return rows


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def table(rows, base_name, head_name):
    lines = [
        f"base = {base_name}, head = {head_name}; ratio = head / base "
        "(for p99, below 1 is better)",
        "",
        "| scenario | unit | base runs | base mean (min..max) | head runs | head mean (min..max) "
        "| ratio of means | pair ratios: median (min..max) | node µs/op base / head | 5xx+errors base / head |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = 1 if r["unit"] == "p99 ms" else 0
        lines.append(
            f"| {r['scenario']} | {r['unit']} "
            f"| {', '.join(fmt(x, d) for x in r['base_runs'])} "
            f"| {fmt(r['base_mean'], d)} ({fmt(min(r['base_runs']), d)}..{fmt(max(r['base_runs']), d)}) "
            f"| {', '.join(fmt(x, d) for x in r['head_runs'])} "
            f"| {fmt(r['head_mean'], d)} ({fmt(min(r['head_runs']), d)}..{fmt(max(r['head_runs']), d)}) "
            f"| {fmt(r['ratio_of_means'], 3)} "
            f"| {fmt(r['pair_ratio_median'], 3)} ({fmt(r['pair_ratio_min'], 3)}..{fmt(r['pair_ratio_max'], 3)}) "
            f"| {fmt(r['base_cpu_us_per_op'])} / {fmt(r['head_cpu_us_per_op'])} "
            f"| {r['failed']['base']} / {r['failed']['head']} |"
        )
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?")
    parser.add_argument("--base", default="base")
    parser.add_argument("--head", default="head")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test()
    runs, problems = load(args.out, args.pairs)
    rows = summarise(runs)
    text = table(rows, args.base, args.head)
    Path(args.out, "summary.md").write_text(text + "\n")
    Path(args.out, "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    print(f"\nresults: {args.out}/summary.md")
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems or not rows else 0


def self_test():
    def result(scenario, value, cpu, ok=1000, consistent=True):
        r = {"scenario": scenario, "consistency_ok": consistent, "nodes_cpu_s": cpu,
             "status_counts": {"200": ok, "409": 0, "503": 1}, "p99_ms": value, "achieved_rps": value}
        return r

    with tempfile.TemporaryDirectory() as out:
        values = {("base", 1): 100, ("head", 1): 110, ("base", 2): 200, ("head", 2): 180}
        for (label, pair), v in values.items():
            d = Path(out) / f"{label}-{pair}"
            d.mkdir()
            constant = result("constant", v / 10, 0.02)
            constant["baseline"] = {"p99_ms": v / 100, "failed": 0}
            d.joinpath("results.json").write_text(json.dumps(
                [result("saturate-one", v, 0.05), constant]))
        runs, problems = load(out, 2)
        assert problems == [], problems
        rows = {r["scenario"]: r for r in summarise(runs)}
        sat = rows["saturate-one"]
        assert sat["base_runs"] == [100, 200] and sat["head_runs"] == [110, 180], sat
        assert abs(sat["ratio_of_means"] - 290 / 300) < 1e-9, sat
        assert abs(sat["pair_ratio_median"] - (1.1 + 0.9) / 2) < 1e-9, sat
        assert (sat["pair_ratio_min"], sat["pair_ratio_max"]) == (0.9, 1.1), sat
        assert abs(sat["base_cpu_us_per_op"] - 50) < 1e-9, sat
        assert sat["failed"] == {"base": 2, "head": 2}, sat
        assert rows["constant"]["unit"] == "p99 ms", rows["constant"]
        base_line = rows["constant baseline"]
        assert base_line["unit"] == "p99 ms" and base_line["base_runs"] == [1, 2], base_line
        assert base_line["head_runs"] == [1.1, 1.8] and base_line["failed"]["base"] == 0, base_line
        assert "| saturate-one | ops/s | 100, 200 |" in table(list(rows.values()), "a", "b")

        # A failed consistency check and a missing run are failures, never a quiet summary.
        Path(out, "head-2", "results.json").write_text(json.dumps(
            [result("saturate-one", 180, 0.05, consistent=False)]))
        _, problems = load(out, 3)
        assert any("consistency check failed" in p for p in problems), problems
        assert any("missing" in p and "base-3" in p for p in problems), problems
    print("bench_compare.py self-test: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
