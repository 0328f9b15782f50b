#!/usr/bin/env python3
"""Checks the deployment files for what docs/security.md promises of them:
no default secret, and metrics never published beyond the container or pod.

    docker-compose --env-file .env.example config | scripts/check-deploy.py - deploy/kubernetes/*.yaml

The first argument is the resolved compose file (`-` for standard input,
as `docker-compose config` prints it), the rest Kubernetes manifests.
Exits non-zero with one line per finding. Needs PyYAML (python3-yaml, which
Debian's docker-compose depends on).
"""

import ipaddress
import sys

import yaml

# The ports the services serve their API on; anything else a container or
# pod exposes is a finding.
API_PORTS = {50051, 50052}


def loopback_only(addr):
    """Whether a METRICS_LISTEN_ADDR value listens on loopback only (or is off)."""
    if addr in (None, ""):
        return True
    host = addr.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def published_port(entry):
    """The container port of a compose `ports:` entry (short or long form)."""
    if isinstance(entry, dict):
        return int(entry["target"])
    return int(str(entry).split("/")[0].rsplit(":", 1)[-1])


def check_compose(compose, findings):
    for name, service in (compose.get("services") or {}).items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        if not loopback_only(env.get("METRICS_LISTEN_ADDR")):
            findings.append(f"compose {name}: METRICS_LISTEN_ADDR listens beyond loopback")
        for entry in service.get("ports") or []:
            port = published_port(entry)
            if port not in API_PORTS:
                findings.append(f"compose {name}: publishes port {port}, which is not an API port")
        for port in service.get("expose") or []:
            if int(str(port).split("/")[0]) not in API_PORTS:
                findings.append(f"compose {name}: exposes port {port}, which is not an API port")


def check_kubernetes(path, documents, findings):
    for doc in documents:
        if not doc:
            continue
        kind = doc.get("kind")
        name = f"{path}: {kind} {doc.get('metadata', {}).get('name')}"
        if kind == "Secret":
            if doc.get("data") or doc.get("stringData"):
                findings.append(f"{name}: an example Secret holds values")
            continue
        if kind == "Service":
            for port in doc.get("spec", {}).get("ports") or []:
                if int(port["port"]) not in API_PORTS:
                    findings.append(f"{name}: serves port {port['port']}, which is not an API port")
            continue
        template = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in template.get("containers", []) + template.get("initContainers", []):
            for port in container.get("ports") or []:
                if int(port["containerPort"]) not in API_PORTS:
                    findings.append(f"{name}: container port {port['containerPort']} is not an API port")
            for var in container.get("env") or []:
                if var.get("name") == "METRICS_LISTEN_ADDR" and not loopback_only(var.get("value")):
                    findings.append(f"{name}: METRICS_LISTEN_ADDR listens beyond loopback")
                secret_named = var.get("name") in ("DATABASE_URL", "STOREGATE_MASTER_KEY")
                if secret_named and "value" in var:
                    findings.append(f"{name}: {var['name']} is written in the manifest, not read from a Secret")


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    findings = []
    compose_text = sys.stdin.read() if argv[1] == "-" else open(argv[1]).read()
    check_compose(yaml.safe_load(compose_text) or {}, findings)
    for path in argv[2:]:
        with open(path) as manifest:
            check_kubernetes(path, list(yaml.safe_load_all(manifest)), findings)
    for finding in findings:
        print(f"check-deploy: {finding}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
