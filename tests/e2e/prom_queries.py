#!/usr/bin/env python3
"""Runs the chart's queries against a real Prometheus (scripts/e2e-prometheus.sh):
  1. every Grafana panel query of the dashboard must return data (at least one series,
     no NaN), with its template variables substituted, and each substitution printed;
  2. the prometheus-adapter rule's metricsQuery must return one series per pod, each
     within 15% of the rate the pod's own counter gives over the same window (read from
     its /metrics before and after the load, not through Prometheus);
  3. the KEDA ScaledObject's query must return a number, equal to the adapter series' sum.
Exits 1 when any of them does not hold.

usage: prom_queries.py --prometheus URL --dashboard FILE --adapter-values FILE --keda-render FILE
                       --namespace NS --scrape-interval SECONDS --load FILE --at UNIX_TIME
                       --metrics-dir DIR --pod POD=URL ...
DIR holds before/<pod>.txt and after/<pod>.txt, each pod's /metrics around the load.
"""
import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request

import yaml


def query(prometheus, expr, at):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": at})
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]


def values(data):
    """(labels, float) per series of an instant vector or scalar."""
    if data["resultType"] == "scalar":
        return [({}, float(data["result"][1]))]
    return [(r["metric"], float(r["value"][1])) for r in data["result"]]


def counter_by_route(path, name):
    """Sum of a counter's samples by route label, from a /metrics text file."""
    out = {}
    for line in open(path):
        if not line.startswith(name + "{"):
            continue
        labels, value = line.rsplit(" ", 1)
        route = re.search(r'route="([^"]*)"', labels).group(1)
        out[route] = out.get(route, 0) + float(value)
    return out


def panel_queries(dashboard):
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target.get("refId", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prometheus", required=True)
    p.add_argument("--dashboard", required=True)
    p.add_argument("--adapter-values", required=True)
    p.add_argument("--keda-render", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--scrape-interval", type=float, required=True)
    p.add_argument("--load", required=True, help="load.py's JSON line, with the load's start time")
    p.add_argument("--at", type=float, required=True, help="evaluation time (the end of the load)")
    p.add_argument("--metrics-dir", required=True)
    p.add_argument("--pod", action="append", required=True, help="POD=URL: a pod label and its public URL")
    args = p.parse_args()
    prom, at = args.prometheus, args.at
    pods = dict(item.split("=", 1) for item in args.pod)
    failed = 0

    # -- 1. the dashboard ----------------------------------------------------------------
    dashboard = json.load(open(args.dashboard))
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "namespace")
    # The namespace variable, as Grafana fills it: label_values(<metric>, namespace).
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
    found = sorted({m[label] for m, _ in values(query(prom, metric, at)) if label in m})
    if args.namespace not in found:
        print(f"FAIL $namespace: {variable['definition']} gives {found}, not {args.namespace}")
        sys.exit(1)
    # Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval),
    # with $__interval from the time range and panel width; 30 s is a 1-hour range's
    # order of magnitude and spans the load.
    rate_interval = f"{max(30, int(4 * args.scrape_interval))}s"
    substitutions = {"$namespace": args.namespace, "$__rate_interval": rate_interval}
    for name, value in substitutions.items():
        why = (f"from {variable['definition']} = {found}" if name == "$namespace"
               else f"Grafana: max($__interval + {args.scrape_interval:g}s, 4 x {args.scrape_interval:g}s); a fixed window spanning the load")
        print(f"substituted {name} -> {value} ({why})")
    with_data = 0
    queries = panel_queries(dashboard)
    for title, ref, expr in queries:
        text = expr
        for name, value in substitutions.items():
            text = text.replace(name, value)
        if "$" in text:
            print(f"FAIL {title} [{ref}]: a template variable is left: {text}")
            failed += 1
            continue
        series = values(query(prom, text, at))
        good = [v for _, v in series if not math.isnan(v)]
        if good:
            with_data += 1
            shown = ", ".join(f"{v:.4g}" for v in good[:4]) + (" ..." if len(good) > 4 else "")
            print(f"  data  {title} [{ref}]: {len(good)} series ({shown})")
        else:
            failed += 1
            print(f"  NONE  {title} [{ref}]: {text} -> {len(series)} series, {len(series) - len(good)} NaN")
    print(f"dashboard: {with_data}/{len(queries)} panel queries returned data")

    # -- 2. the prometheus-adapter rule --------------------------------------------------
    load = json.load(open(args.load))
    rule = yaml.safe_load(open(args.adapter_values))["rules"]["custom"][0]
    series_name = re.match(r"(\w+)", rule["seriesQuery"]).group(1)
    # What the adapter sends for GET .../namespaces/<ns>/pods/*/<metric>: its template with
    # the pods' names as matchers, grouped by the pod resource's label.
    matchers = f'namespace="{args.namespace}",pod=~"{"|".join(sorted(pods))}"'
    adapter = (rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.Series>>", series_name)
               .replace("<<.LabelMatchers>>", matchers))
    print(f"adapter: substituted <<.GroupBy>> -> pod, <<.Series>> -> {series_name}, <<.LabelMatchers>> -> {matchers}")
    print(f"adapter: {adapter}")
    window = float(re.search(r"\[(\d+)m\]", adapter).group(1)) * 60
    per_pod = {m.get("pod"): v for m, v in values(query(prom, adapter, at))}
    if sorted(per_pod) != sorted(pods):
        print(f"FAIL adapter: series for {sorted(per_pod)}, expected one per pod {sorted(pods)}")
        failed += 1
    for pod, url in sorted(pods.items()):
        # The pod's own counter, public and internal (forwarded-in) routes alike, as the
        # adapter counts them. rate() divides the increase within the window by the whole
        # window, and the load (with the pods' whole life) fits in it.
        before = counter_by_route(f"{args.metrics_dir}/before/{pod}.txt", series_name)
        after = counter_by_route(f"{args.metrics_dir}/after/{pod}.txt", series_name)
        delta = {route: after[route] - before.get(route, 0) for route in after}
        public = sum(v for route, v in delta.items() if route.startswith("/api/"))
        total = sum(delta.values())
        expected = total / window
        got = per_pod.get(pod, float("nan"))
        plausible = expected > 0 and abs(got - expected) / expected <= 0.15
        failed += 0 if plausible else 1
        print(f"  {'ok  ' if plausible else 'FAIL'}  {pod}: {got:.2f} requests/s; its own counter rose by {total:.0f} "
              f"in the window = {expected:.2f}/s ({public:.0f} public /api/ requests, the load sent "
              f"{load['per_url'].get(url, 0)}; {total - public:.0f} on other routes, forwards from the other pods among them)")

    # -- 3. the KEDA trigger -------------------------------------------------------------
    keda = None
    for doc in yaml.safe_load_all(open(args.keda_render)):
        if doc and doc.get("kind") == "ScaledObject":
            keda = next(t for t in doc["spec"]["triggers"] if t["type"] == "prometheus")["metadata"]["query"]
    if keda is None:
        print("FAIL keda: no ScaledObject with a prometheus trigger in the render")
        sys.exit(1)
    print(f"keda: {keda}")
    result = values(query(prom, keda, at))
    total = sum(per_pod.values())
    if len(result) != 1 or math.isnan(result[0][1]):
        print(f"FAIL keda: {len(result)} series, not one number")
        failed += 1
    else:
        number = result[0][1]
        same = total > 0 and abs(number - total) / total < 0.01
        failed += 0 if same else 1
        print(f"  {'ok  ' if same else 'FAIL'}  keda: {number:.2f} (the adapter series sum to {total:.2f})")

    if failed:
        print(f"prom_queries: {failed} checks failed")
        sys.exit(1)
    print("prom_queries: all checks passed")


if __name__ == "__main__":
    main()
