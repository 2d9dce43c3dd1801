#!/usr/bin/env python3
"""Run the Tiltfile offline against stand-ins for Tilt's API, for both deploy modes.

Tilt itself needs a cluster, so this executes the Tiltfile in a Starlark interpreter
(starlark-rust, via the PyPI package starlark-pyo3) with Tilt's builtins replaced by recorders; kustomize() and helm() call the
real tools. It then checks what the Tiltfile would deploy: every image Tilt builds is used
by some container, every container image that looks like ours is one Tilt builds, the
containers Tilt live-updates have a writable root filesystem, the restart_process
extension's restart file lives where the image can write it and no volume hides it, the
CRD is a resource of its own that the WalletMigration waits for, and `--build container`
compiles in the Dockerfile only. The resources it configures must exist.

usage (from the repository root): tiltfile_check.py TILTFILE HELM KUBECTL
"""

import posixpath
import re
import subprocess
import sys

import starlark  # starlark-pyo3: starlark-rust, the dialect Tilt's Go Starlark follows
import yaml

# tilt-extensions restart_process/Tiltfile: RESTART_FILE, used when the caller gives no
# restart_file. Its child image runs `touch <file>` as the image's user, its entrypoint
# watches the file and live update ends with `date > <file>`.
EXTENSION_RESTART_FILE = "/tmp/.restart-proc"


def run(tiltfile, helm_bin, kubectl_bin, deploy, build):
    calls = {"images": {}, "yaml": [], "resources": [], "local": [], "local_cmds": [], "kinds": {},
             "names": None, "new_names": [], "deps": {}, "objects_of": {}}
    repo = "."  # paths in the Tiltfile are relative to the repository root, the cwd

    def config_define_string(name, usage=""):
        return None

    def config_parse():
        return {"deploy": deploy, "build": build}

    def local_resource(name, cmd="", deps=None, ignore=None, labels=None, env=None, resource_deps=None, **kw):
        calls["local"].append(name)
        calls["local_cmds"].append(cmd)

    def docker_build(ref, context=".", dockerfile_contents="", only=None, live_update=None, entrypoint=None,
                     target="", **kw):
        calls["images"][ref] = {"live_update": bool(live_update), "context": context, "target": target,
                                "dockerfile_contents": dockerfile_contents, "restart_file": None}

    def docker_build_with_restart(ref, context, entrypoint, live_update, base_suffix="-base",
                                  restart_file=EXTENSION_RESTART_FILE, **kw):
        docker_build(ref, context, entrypoint=entrypoint, live_update=live_update, **kw)
        calls["images"][ref]["restart_file"] = restart_file

    def sync(src, dst):
        return ["sync", src, dst]

    def k8s_kind(kind, image_json_path=""):
        calls["kinds"][kind] = image_json_path

    def kustomize(path):
        return subprocess.check_output([kubectl_bin, "kustomize", f"{repo}/{path}"], text=True)

    def helm(chart, name="", namespace="", set=None, skip_crds=False, **kw):
        args = [helm_bin, "template", name, f"{repo}/{chart}", "--namespace", namespace]
        for s in set or []:
            args += ["--set", s]
        return subprocess.check_output(args, text=True)

    def decode_yaml_stream(text):
        return [d for d in yaml.safe_load_all(text) if d]

    def encode_yaml_stream(objects):
        return yaml.safe_dump_all(objects)

    def k8s_yaml(text):
        calls["yaml"] += [d for d in yaml.safe_load_all(text) if d]

    def k8s_resource(workload="", new_name="", objects=None, resource_deps=None, **kw):
        name = new_name or workload
        if new_name:
            calls["new_names"].append(new_name)
        if workload:
            calls["resources"].append(workload)
        calls["deps"][name] = list(resource_deps or [])
        calls["objects_of"][name] = list(objects or [])

    def record_resource_names(names):
        calls["names"] = list(names)

    def fail(msg):
        raise RuntimeError(msg)

    def noop(*args, **kw):
        return None

    def link(url, name=""):
        return url

    source = open(tiltfile).read()
    # Tilt's module objects (config, os) and extensions, flattened for the stand-ins.
    source = source.replace("config.define_string", "config_define_string")
    source = source.replace("config.parse", "config_parse")
    source = source.replace("os.getenv", "os_getenv")
    lines = [l for l in source.splitlines() if not l.startswith("load(")]
    stand_ins = dict(
        config_define_string=config_define_string, config_parse=config_parse,
        os_getenv=lambda key, default="": default, allow_k8s_contexts=noop, fail=fail,
        local_resource=local_resource, docker_build=docker_build,
        docker_build_with_restart=docker_build_with_restart, sync=sync, k8s_kind=k8s_kind,
        kustomize=kustomize, helm=helm, decode_yaml_stream=decode_yaml_stream,
        encode_yaml_stream=encode_yaml_stream, k8s_yaml=k8s_yaml,
        k8s_resource=k8s_resource, link=link, record_resource_names=record_resource_names,
    )
    # Starlark functions cannot cross into Python: this stand-in stays in Starlark and
    # applies the Tiltfile's naming function to every workload it deploys.
    prelude = [
        "_objects = []",
        "def k8s_yaml(text):",
        "    _objects.extend(decode_yaml_stream(text))",
        "    py_k8s_yaml(text)",
        "def workload_to_resource_function(fn):",
        "    record_resource_names([fn(struct(name=o['metadata']['name'], kind=o['kind'], namespace=o['metadata'].get('namespace', '')))",
        "                           for o in _objects if o['kind'] in ('Deployment', 'StatefulSet', 'WalletMigration')])",
    ]
    stand_ins["py_k8s_yaml"] = stand_ins.pop("k8s_yaml")
    module = starlark.Module()
    for name, fn in stand_ins.items():
        module.add_callable(name, fn)
    dialect = starlark.Dialect.extended()
    dialect.enable_top_level_stmt = True  # Tilt allows if/for at the top level
    # Error line numbers are the Tiltfile's plus len(prelude) (and any load() lines dropped).
    ast = starlark.parse(tiltfile, "\n".join(prelude + lines), dialect)
    starlark.eval(module, ast, starlark.Globals.extended_by([starlark.LibraryExtension.StructType]))
    return calls


def check(calls, deploy, build):
    errors = []
    objects = calls["yaml"]
    used = set()
    workloads = {}
    for o in objects:
        spec = o.get("spec", {})
        if o["kind"] in ("Deployment", "StatefulSet"):
            workloads[o["metadata"]["name"]] = o
            pod = spec["template"]["spec"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                repo = c["image"].rsplit(":", 1)[0]
                used.add(repo)
                ours = "wallet" in repo
                if ours and repo not in calls["images"]:
                    errors.append(f"{o['metadata']['name']}/{c['name']}: image {c['image']} is not built by Tilt")
                image = calls["images"].get(repo, {})
                live = image.get("live_update")
                if live and c.get("securityContext", {}).get("readOnlyRootFilesystem", False):
                    errors.append(f"{o['metadata']['name']}/{c['name']}: live-updated but read-only root filesystem")
                restart = image.get("restart_file")
                if restart and c in pod["containers"]:
                    errors += restart_file_errors(o["metadata"]["name"], c, restart, image["dockerfile_contents"])
        if o["kind"] == "WalletMigration":
            used.add(spec["image"].rsplit(":", 1)[0])
            if "WalletMigration" not in calls["kinds"]:
                errors.append("WalletMigration's image is not declared with k8s_kind")
    for ref in calls["images"]:
        if ref not in used:
            errors.append(f"image {ref} is built but no container uses it")
    # Item: a WalletMigration applied in one go with its CRD has no REST mapping yet.
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    if any(o["kind"] == "WalletMigration" for o in objects):
        if not crds:
            errors.append("a WalletMigration is deployed but its CRD is not")
        owner = [r for r, objs in calls["objects_of"].items()
                 if any(x.startswith("walletmigrations.wallet.dev") for x in objs)]
        if not owner:
            errors.append("the CRD is not a resource of its own")
        elif owner[0] not in calls["deps"].get("migration", []):
            errors.append(f"the WalletMigration does not wait for the {owner[0]!r} resource")
    if build == "container":
        for cmd in calls["local_cmds"]:
            if "cargo" in cmd:
                errors.append(f"--build container still compiles on the host: {cmd}")
        targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", open("Dockerfile").read(), re.M | re.I)
        for ref, image in calls["images"].items():
            if image["context"] != "." or image["target"] not in targets or image["dockerfile_contents"]:
                errors.append(f"--build container: {ref} is not built from the Dockerfile's own target")
    if calls["names"] is None:
        errors.append("no workload_to_resource_function: resource names depend on name clashes")
        names = set(calls["local"]) | set(calls["new_names"])
    else:
        names = set(calls["names"]) | set(calls["local"]) | set(calls["new_names"])
        if len(set(calls["names"])) != len(calls["names"]):
            errors.append(f"two workloads get the same resource name: {sorted(calls['names'])}")
    for r in calls["resources"]:
        if r not in names:
            errors.append(f"k8s_resource({r!r}) names no workload")
    for r, deps in calls["deps"].items():
        for d in deps:
            if d not in names:
                errors.append(f"k8s_resource({r!r}) depends on {d!r}, which does not exist")
    return [f"[{deploy}, build {build}] {e}" for e in errors]


def restart_file_errors(workload, container, restart, dockerfile):
    """The wrapper watches the restart file: it must exist in the running container."""
    errors = []
    folder = posixpath.dirname(restart)
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") or "/"
        if folder == mount or folder.startswith(mount + "/"):
            errors.append(f"{workload}/{container['name']}: restart file {restart} is hidden by the volume "
                          f"{m['name']!r} mounted at {m['mountPath']}")
    # The extension's child image creates the file as the image's user (65532 here).
    owned = re.findall(r"install -d -o 65532 -g 65532 ((?:\S+ ?)+)", dockerfile)
    owned_dirs = {d for group in owned for d in group.split()}
    if folder not in owned_dirs:
        errors.append(f"{workload}/{container['name']}: restart file {restart} is not in a folder the image "
                      f"user owns ({sorted(owned_dirs)})")
    return errors


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    errors = []
    for deploy, build in (("kustomize", "host"), ("helm", "host"), ("kustomize", "container")):
        calls = run(argv[1], argv[2], argv[3], deploy, build)
        errors += check(calls, deploy, build)
        print(f"[{deploy}, build {build}] {len(calls['yaml'])} objects, images {sorted(calls['images'])}, "
              f"resources {calls['resources']}")
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
