#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests offline.

Built-in kinds are checked with kubernetes-validate's strict schemas (unknown fields
rejected) for one Kubernetes version; custom resources against the openAPIV3Schema of the
CRD files given with --crd, made strict the way the API server's strict field validation
is (an object that lists properties accepts no others unless it preserves unknown fields).
A kind with no schema at all is an error, never a warning.

usage: validate.py --kube-version 1.34.0 [--crd CRD.yaml ...] MANIFEST.yaml [...]
"""

import argparse
import copy
import sys

import jsonschema
import kubernetes_validate
import yaml


def strict_schema(node):
    """Return a JSON-schema copy of a structural CRD schema with objects closed."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: strict_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = strict_schema(value)
        elif key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(paths):
    """Map (group/version, kind) -> (strict schema, scope) from CRD files."""
    schemas = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for version in spec["versions"]:
                    schema = strict_schema(version["schema"]["openAPIV3Schema"])
                    # The API server handles the type fields and ObjectMeta itself; generated
                    # CRD schemas (kube-derive) do not list them.
                    props = schema.setdefault("properties", {})
                    props["apiVersion"] = {"type": "string"}
                    props["kind"] = {"type": "string"}
                    props["metadata"] = {"type": "object"}
                    key = (f'{spec["group"]}/{version["name"]}', spec["names"]["kind"])
                    schemas[key] = (schema, spec.get("scope", "Namespaced"))
    return schemas


def describe(doc):
    meta = doc.get("metadata") or {}
    return f'{doc.get("kind")}/{meta.get("name")} ({doc.get("apiVersion")})'


def validate_doc(doc, crds, kube_version):
    """Return a list of error strings for one manifest."""
    errors = []
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        errors.append("metadata.name is missing")
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crds:
        schema, _scope = crds[key]
        validator = jsonschema.Draft202012Validator(schema)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in err.absolute_path) or "(root)"
            errors.append(f"{path}: {err.message}")
        return errors
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        errors.append(f"{e.message}; pass its CRD with --crd")
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path) or "(root)"
        errors.append(f"{path}: {e.message}")
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kube-version", required=True)
    parser.add_argument("--crd", action="append", default=[])
    parser.add_argument("manifests", nargs="+")
    args = parser.parse_args()

    crds = load_crds(args.crd)
    failures = 0
    count = 0
    seen = set()
    for path in args.manifests:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            count += 1
            ident = (doc.get("apiVersion"), doc.get("kind"),
                     (doc.get("metadata") or {}).get("namespace"),
                     (doc.get("metadata") or {}).get("name"))
            errors = validate_doc(copy.deepcopy(doc), crds, args.kube_version)
            if ident in seen:
                errors.append("duplicate object")
            seen.add(ident)
            for error in errors:
                print(f"FAIL {path}: {describe(doc)}: {error}", file=sys.stderr)
            failures += bool(errors)
    if count == 0:
        print("FAIL no manifests found", file=sys.stderr)
        return 1
    print(f"{count - failures} valid, {failures} invalid ({', '.join(args.manifests)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
