#!/usr/bin/env python3
"""Check that every metric a Grafana dashboard queries is exposed by the service.

usage: check-dashboard-metrics.py DASHBOARD.json METRICS_URL_OR_FILE [MORE ...]

Metric names are taken from every PromQL expression in the dashboard (panels, nested rows,
template variables). The exposition text of all given sources (e.g. /metrics of each node
of a cluster) is merged, since a labelled counter only appears on a node once it has a
sample. Names ending in _bucket/_sum/_count are matched against the histogram or summary
family they belong to. Exits 1 listing the missing names, 2 on a usage or fetch error.
"""

import json
import re
import sys
import urllib.request

# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "atan2", "inf", "nan",
    # aggregations can be written without parentheses directly after them (`sum by (x) (...)`)
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "group", "limitk", "limit_ratio",
}
SUFFIXES = ("_bucket", "_sum", "_count")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def expressions(node):
    """Yield every PromQL expression in a dashboard document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key in ("query", "definition") and isinstance(value, str) and node.get("type", "") != "datasource":
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def metric_names(expr):
    """Metric names used in one PromQL expression (or label_values(...) template query)."""
    # label_values(metric, label) / query_result(expr): keep the metric or expression part.
    expr = re.sub(r"label_values\(\s*([^,)]*)(,[^)]*)?\)", r"\1", expr)
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery selectors
    # label lists of grouping and vector matching modifiers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", expr)  # Grafana variables
    names = set()
    for match in IDENT.finditer(expr):
        word = match.group(0)
        rest = expr[match.end():].lstrip()
        if rest.startswith("("):  # a function call
            continue
        if word.lower() in KEYWORDS:
            continue
        start = match.start()
        # exponents and durations such as 1e3 or 5m belong to numbers
        if start > 0 and (expr[start - 1].isdigit() or expr[start - 1] == "."):
            continue
        names.add(word)
    return names


def read_source(source):
    if re.match(r"^https?://", source):
        with urllib.request.urlopen(source, timeout=10) as resp:
            return resp.read().decode("utf-8", "replace")
    with open(source, encoding="utf-8") as f:
        return f.read()


def exposed(text):
    """(sample names, {family: type}) from Prometheus text exposition."""
    samples, families = set(), {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                families[parts[2]] = parts[3]
        elif line and not line.startswith("#"):
            match = IDENT.match(line)
            if match:
                samples.add(match.group(0))
    return samples, families


def is_exposed(name, samples, families):
    if name in samples or name in families:
        return True
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            family = name[: -len(suffix)]
            return families.get(family) in ("histogram", "summary") or name in samples
    return False


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        dashboard = json.load(f)
    wanted = set()
    for expr in expressions(dashboard):
        wanted |= metric_names(expr)
    if not wanted:
        print(f"no metric names found in {argv[1]}", file=sys.stderr)
        return 2
    samples, families = set(), {}
    for source in argv[2:]:
        try:
            s, fam = exposed(read_source(source))
        except OSError as e:
            print(f"cannot read {source}: {e}", file=sys.stderr)
            return 2
        samples |= s
        families.update(fam)
    missing = sorted(n for n in wanted if not is_exposed(n, samples, families))
    if missing:
        print(f"{len(missing)} of {len(wanted)} metric names the dashboard queries are not exposed:", file=sys.stderr)
        for name in missing:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(f"all {len(wanted)} metric names the dashboard queries are exposed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
