#!/usr/bin/env python3
"""Adapt the chart's rendered YAML to `podman kube play` (podman 4.3), for scripts/e2e.sh.

The rule (issue 11): every change is printed, and a field this script does not know fails
it loudly. A field is known only if it is listed below with what happens to it:
  KEEP    passed to podman unchanged, and podman honours it;
  IGNORED passed unchanged, podman 4.3 ignores it: printed, so nobody believes it ran
          (e2e.sh checks the behaviour some of them stand for itself);
  a function, which changes the value and prints the change.
Anything else, in a Deployment or as a kind, exits 2 naming the field's path. The podman
gaps are measured in ../shared/containers.md.

usage: adapt.py RENDER OUT_DIR --namespace NS --public-port P --internal-port P
                --admin-port P --operator-admin-port P
Writes OUT_DIR/<deployment>.yaml for each Deployment and OUT_DIR/facts.json (the grace
periods, which podman ignores and e2e.sh passes to `podman stop -t`).
"""
import argparse
import json
import os
import re
import sys

import yaml


class Unknown(Exception):
    pass


KEEP = "keep"


def IGNORED(why):
    return ("ignored", why)


class Adapter:
    def __init__(self, args):
        self.args = args
        self.changes = 0
        self.facts = {}

    def change(self, path, what):
        self.changes += 1
        print(f"adapt: CHANGED {path}: {what}")

    def note(self, path, why):
        print(f"adapt: kept, ignored by podman 4.3: {path} ({why})")

    # -- the walker -------------------------------------------------------------------
    def walk(self, node, schema, path):
        """Check every key of `node` against `schema`; returns the adapted node."""
        if not isinstance(node, dict):
            raise Unknown(f"{path}: expected a mapping, got {type(node).__name__}")
        out = {}
        for key, value in node.items():
            sub = f"{path}.{key}"
            if key not in schema:
                raise Unknown(f"{sub}: a field adapt.py does not know (value {json.dumps(value)[:80]})")
            rule = schema[key]
            if rule == KEEP:
                out[key] = value
            elif isinstance(rule, tuple) and rule[0] == "ignored":
                self.note(sub, rule[1])
                out[key] = value
            elif isinstance(rule, dict):
                out[key] = self.walk(value, rule, sub)
            elif isinstance(rule, list):
                if not isinstance(value, list):
                    raise Unknown(f"{sub}: expected a list")
                out[key] = [self.walk(item, rule[0], f"{sub}[{i}]") for i, item in enumerate(value)]
            elif callable(rule):
                result = rule(value, sub)
                if result is not None:
                    out[key] = result
            else:
                raise AssertionError(f"bad rule for {sub}")
        return out

    # -- containers ---------------------------------------------------------------------
    def drop_ports(self, value, path):
        names = ", ".join(f"{p.get('name')}={p.get('containerPort')}" for p in value)
        self.change(path, f"removed ({names}): with host networking podman refuses port mappings "
                          "(\"PortMappings can only be used with Bridge or slirp4netns networking\")")
        return None

    def env(self, value, path):
        a = self.args
        resolved = {}  # name -> literal value, for $(VAR) references
        # With host networking the pod shares the host's ports with the main checkout's
        # cluster (8080/8090/9090): listen on loopback ports of the e2e's own.
        addresses = {
            "WALLET_PUBLIC_ADDR": f"127.0.0.1:{a.public_port}",
            "WALLET_INTERNAL_ADDR": f"127.0.0.1:{a.internal_port}",
            "WALLET_ADMIN_ADDR": f"127.0.0.1:{a.admin_port}",
            "WALLET_ADVERTISE_ADDR": f"127.0.0.1:{a.internal_port}",
        }
        out = []
        for i, entry in enumerate(value):
            sub = f"{path}[{i}]"
            unknown = set(entry) - {"name", "value", "valueFrom"}
            if unknown:
                raise Unknown(f"{sub}: fields adapt.py does not know: {sorted(unknown)}")
            name = entry["name"]
            if "valueFrom" in entry:
                source = entry["valueFrom"]
                if set(source) == {"secretKeyRef"}:
                    ref = source["secretKeyRef"]
                    if set(ref) - {"name", "key", "optional"}:
                        raise Unknown(f"{sub}.valueFrom.secretKeyRef: fields {sorted(set(ref) - {'name', 'key', 'optional'})}")
                    out.append(entry)  # podman secrets, made by e2e.sh
                    continue
                if set(source) != {"fieldRef"} or set(source["fieldRef"]) - {"fieldPath", "apiVersion"}:
                    raise Unknown(f"{sub}.valueFrom: a source adapt.py does not know: {json.dumps(source)}")
                field = source["fieldRef"]["fieldPath"]
                if field == "metadata.name":
                    # Supported, but its value is the pod's name, which $(POD_NAME) users need.
                    resolved[name] = a.pod_name
                    out.append(entry)
                    continue
                literal = {"metadata.namespace": a.namespace, "status.podIP": "127.0.0.1"}.get(field)
                if literal is None:
                    raise Unknown(f"{sub}: fieldRef {field} is not one adapt.py knows")
                why = "the namespace the chart was rendered for" if field == "metadata.namespace" else "the host network's loopback"
                self.change(f"{sub} {name}", f"fieldRef {field} -> value {literal!r} (podman 4.3 supports "
                                             f"only metadata.name/uid/labels/annotations; {why})")
                resolved[name] = literal
                out.append({"name": name, "value": literal})
                continue
            val = entry.get("value", "")
            new = val
            if name in addresses:
                new = addresses[name]
            refs = re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", new)
            for ref in refs:
                if ref not in resolved:
                    raise Unknown(f"{sub} {name}: $({ref}) refers to a variable adapt.py cannot resolve")
                new = new.replace(f"$({ref})", resolved[ref])
            if new != val:
                reasons = []
                if refs:
                    reasons.append("podman 4.3 does not expand $(VAR)")
                if name in addresses:
                    reasons.append("host network: loopback ports of the e2e's own, not the host's 8080/8090/9090")
                self.change(f"{sub} {name}", f"{val!r} -> {new!r} ({'; '.join(reasons)})")
            resolved[name] = new
            out.append({"name": name, "value": new})
        if self.container_name == "operator":
            # The operator's admin listener defaults to 0.0.0.0:9090 (not in the render).
            out.append({"name": "WALLET_MIGRATOR_ADMIN_ADDR", "value": f"127.0.0.1:{a.operator_admin_port}"})
            self.change(f"{path} WALLET_MIGRATOR_ADMIN_ADDR", f"added 127.0.0.1:{a.operator_admin_port} "
                                                             "(host network: not the host's 9090)")
        return out

    def container_schema(self):
        security = {
            "allowPrivilegeEscalation": KEEP,
            "readOnlyRootFilesystem": KEEP,
            "capabilities": {"drop": KEEP},
            "runAsNonRoot": IGNORED("the image's numeric USER and the pod's runAsUser decide"),
            "seccompProfile": IGNORED("podman's default seccomp filter applies instead of RuntimeDefault"),
        }
        probe = IGNORED("probes do not run; e2e.sh polls /readyz itself")
        return {
            "name": KEEP,
            "image": KEEP,
            "imagePullPolicy": KEEP,
            "command": KEEP,
            "args": KEEP,
            "env": self.env,
            "ports": self.drop_ports,
            "startupProbe": probe,
            "livenessProbe": probe,
            "readinessProbe": probe,
            "lifecycle": IGNORED("preStop does not run; e2e.sh sends SIGTERM itself"),
            "securityContext": security,
            "resources": KEEP,
            "volumeMounts": KEEP,
        }

    def containers(self, value, path):
        if not isinstance(value, list):
            raise Unknown(f"{path}: expected a list")
        out = []
        for i, item in enumerate(value):
            self.container_name = item.get("name")  # the env rules differ per container
            out.append(self.walk(item, self.container_schema(), f"{path}[{i}]"))
        return out

    # -- pods ---------------------------------------------------------------------------
    def volumes(self, value, path):
        for i, volume in enumerate(value):
            sub = f"{path}[{i}]"
            kinds = set(volume) - {"name"}
            if kinds == {"configMap"} and set(volume["configMap"]) <= {"name", "items", "defaultMode"}:
                continue  # e2e.sh passes the ConfigMap with --configmap
            if kinds == {"emptyDir"} and set(volume["emptyDir"]) <= {"medium", "sizeLimit"}:
                for key in volume["emptyDir"]:
                    self.note(f"{sub}.emptyDir.{key}", "podman makes a plain volume")
                continue
            raise Unknown(f"{sub}: a volume adapt.py does not know: {json.dumps(volume)}")
        return value

    def grace(self, value, path):
        self.facts.setdefault(self.current, {})["terminationGracePeriodSeconds"] = value
        self.note(path, f"podman stops with 10 s unless told; e2e.sh runs podman stop -t {value}")
        return value

    def pod_spec_schema(self):
        return {
            "serviceAccountName": IGNORED("no service accounts"),
            "automountServiceAccountToken": IGNORED("no service accounts"),
            "securityContext": {
                "runAsUser": KEEP,
                "runAsGroup": KEEP,
                "runAsNonRoot": IGNORED("the numeric runAsUser decides"),
                "fsGroup": IGNORED("volumes keep podman's ownership"),
                "seccompProfile": IGNORED("podman's default seccomp filter applies instead of RuntimeDefault"),
            },
            "terminationGracePeriodSeconds": self.grace,
            "initContainers": self.containers,
            "containers": self.containers,
            "volumes": self.volumes,
            "topologySpreadConstraints": IGNORED("one host"),
        }

    def replicas(self, value, path):
        if value != 1:
            self.change(path, f"{value} -> 1 (one pod per play)")
        return 1

    def deployment_schema(self):
        return {
            "apiVersion": KEEP,
            "kind": KEEP,
            "metadata": {"name": KEEP, "labels": KEEP, "annotations": KEEP},
            "spec": {
                "replicas": self.replicas,
                "revisionHistoryLimit": IGNORED("no controller, no rollouts"),
                "selector": IGNORED("no controller"),
                "strategy": IGNORED("no controller, no rollouts"),
                "template": {
                    "metadata": {"labels": KEEP, "annotations": KEEP},
                    "spec": self.pod_spec_schema(),
                },
            },
        }

    def deployment(self, doc):
        name = doc.get("metadata", {}).get("name", "?")
        self.current = name
        self.container_name = None
        self.args.pod_name = f"{name}-pod-0"
        path = f"Deployment/{name}"
        out = self.walk(doc, self.deployment_schema(), path)
        spec = out["spec"]["template"]["spec"]
        if "terminationGracePeriodSeconds" not in spec:
            # Kubernetes' default, which podman does not apply either.
            self.facts.setdefault(name, {})["terminationGracePeriodSeconds"] = 30
        spec["hostNetwork"] = True
        self.change(f"{path}.spec.template.spec.hostNetwork", "added true (the local PostgreSQL and Redis listen on the host's loopback)")
        operator = any(c["name"] == "operator" for c in spec["containers"])
        # Init containers inherit the pod's policy; Always restarts them in a loop. The
        # operator exits without an API server, and a loop would only repeat that.
        policy = "Never" if operator else "OnFailure"
        spec["restartPolicy"] = policy
        why = ("the operator exits without a Kubernetes API server; a restart loop would only repeat it"
               if operator else "with Always podman restarts the finished init container in a loop")
        self.change(f"{path}.spec.template.spec.restartPolicy", f"added {policy} ({why})")
        return out


# Kinds of the e2e render that podman kube play does not run, and why.
DROPPED = {
    "ServiceAccount": "no API server: service accounts are ignored",
    "Role": "no API server",
    "RoleBinding": "no API server",
    "ClusterRole": "no API server",
    "ClusterRoleBinding": "no API server",
    "Service": "podman ignores Services; the pods use the host network",
    "WalletMigration": "no API server for the operator to read it from; e2e.sh runs `wallet-migrator apply` from the migrator image",
}


def adapt(render, out_dir, args):
    adapter = Adapter(args)
    written = []
    for doc in yaml.safe_load_all(render):
        if not doc:
            continue
        kind = doc.get("kind")
        name = doc.get("metadata", {}).get("name", "?")
        if kind == "Deployment":
            out = adapter.deployment(doc)
            target = os.path.join(out_dir, f"{name}.yaml")
            with open(target, "w") as f:
                yaml.safe_dump(out, f, sort_keys=False)
            written.append(target)
        elif kind in DROPPED:
            adapter.change(f"{kind}/{name}", f"dropped ({DROPPED[kind]})")
        elif kind == "Pod" and doc["metadata"].get("annotations", {}).get("helm.sh/hook") == "test":
            adapter.change(f"Pod/{name}", "dropped (the helm test hook; e2e.sh makes the same round trip itself)")
        else:
            raise Unknown(f"{kind}/{name}: a kind adapt.py does not know")
    with open(os.path.join(out_dir, "facts.json"), "w") as f:
        json.dump(adapter.facts, f)
    print(f"adapt: {adapter.changes} changes; wrote {', '.join(written)}")
    return written


def main():
    p = argparse.ArgumentParser()
    p.add_argument("render")
    p.add_argument("out_dir")
    p.add_argument("--namespace", required=True)
    p.add_argument("--public-port", type=int, required=True)
    p.add_argument("--internal-port", type=int, required=True)
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--operator-admin-port", type=int, required=True)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    with open(args.render) as f:
        render = f.read()
    try:
        adapt(render, args.out_dir, args)
    except Unknown as e:
        print(f"adapt: REFUSED: {e}", file=sys.stderr)
        print("adapt: teach tests/e2e/adapt.py what podman does with it, then run again", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
