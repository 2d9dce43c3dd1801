#!/usr/bin/env python3
"""Self-test of adapt.py (run by scripts/e2e.sh before it uses it): the e2e render passes
with its changes printed, and a field, an env source or a kind adapt.py does not know each
makes it exit 2 naming what it refused, instead of passing it on silently.

usage: test_adapt.py RENDER
"""
import os
import subprocess
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
PORTS = ["--namespace", "wallet-e2e", "--public-port", "1", "--internal-port", "2",
         "--admin-port", "3", "--operator-admin-port", "4"]


def run(docs):
    with tempfile.TemporaryDirectory() as tmp:
        render = os.path.join(tmp, "render.yaml")
        with open(render, "w") as f:
            yaml.safe_dump_all(docs, f)
        return subprocess.run([sys.executable, os.path.join(HERE, "adapt.py"), render, tmp, *PORTS],
                              capture_output=True, text=True)


def api(docs):
    return next(d for d in docs if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "wallet")


def main():
    with open(sys.argv[1]) as f:
        docs = list(yaml.safe_load_all(f))
    failures = 0

    def expect(what, result, code, needle):
        nonlocal failures
        text = result.stdout + result.stderr
        ok = result.returncode == code and needle in text
        print(f"test_adapt: {'ok  ' if ok else 'FAIL'} {what} (exit {result.returncode})")
        if not ok:
            failures += 1
            print(text[-2000:])

    expect("the e2e render is adapted, with its changes printed", run(docs), 0, "adapt: CHANGED")

    mutated = [yaml.safe_load(yaml.safe_dump(d)) for d in docs]
    api(mutated)["spec"]["template"]["spec"]["hostAliases"] = [{"ip": "10.0.0.1", "hostnames": ["db"]}]
    expect("an unknown pod field is refused", run(mutated), 2, "spec.template.spec.hostAliases")

    mutated = [yaml.safe_load(yaml.safe_dump(d)) for d in docs]
    api(mutated)["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    expect("an unknown container securityContext field is refused", run(mutated), 2, "securityContext.privileged")

    mutated = [yaml.safe_load(yaml.safe_dump(d)) for d in docs]
    api(mutated)["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}})
    expect("an unknown env source is refused", run(mutated), 2, "configMapKeyRef")

    mutated = [yaml.safe_load(yaml.safe_dump(d)) for d in docs]
    mutated.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "wallet"}})
    expect("an unknown kind is refused", run(mutated), 2, "HorizontalPodAutoscaler/wallet")

    if failures:
        print(f"test_adapt: {failures} failed")
        sys.exit(1)
    print("test_adapt: all passed")


if __name__ == "__main__":
    main()
