#!/usr/bin/env python3
"""Checks the deployment files for what docs/security.md promises of them:
no default secret, and metrics never published beyond the container or pod;
and that the Envoy example checks tokens as the services do.

    docker-compose --env-file .env.example config | scripts/check-deploy.py - deploy/kubernetes/*.yaml deploy/envoy/*.yaml

The first argument is the resolved compose file (`-` for standard input,
as `docker-compose config` prints it), the rest Kubernetes manifests and
Envoy configurations (told apart by their `static_resources`).
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


# What the services expect of a token (JWT_ISSUER, JWT_AUDIENCE defaults).
ISSUER = "storegate-auth"
AUDIENCE = "storegate"
PRODUCT_PREFIX = "/storegate.product.v1.ProductService/"
AUTH_PREFIX = "/storegate.auth.v1.AuthService/"


def check_envoy(path, config, findings):
    resources = config.get("static_resources", {})
    clusters = {c["name"]: c for c in resources.get("clusters", [])}
    for name, cluster in clusters.items():
        options = cluster.get("typed_extension_protocol_options", {})
        http = options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        if "http2_protocol_options" not in http.get("explicit_http_config", {}):
            findings.append(f"{path}: cluster {name} does not speak HTTP/2 (gRPC needs it)")
        if not any("grpc_health_check" in h for h in cluster.get("health_checks", [])):
            findings.append(f"{path}: cluster {name} has no gRPC health check")
    managers = [
        f["typed_config"]
        for listener in resources.get("listeners", [])
        for chain in listener.get("filter_chains", [])
        for f in chain.get("filters", [])
        if f.get("name") == "envoy.filters.network.http_connection_manager"
    ]
    if not managers:
        findings.append(f"{path}: no HTTP connection manager")
    for manager in managers:
        filters = [f["name"] for f in manager.get("http_filters", [])]
        expected = ["envoy.filters.http.grpc_web", "envoy.filters.http.jwt_authn", "envoy.filters.http.router"]
        if [f for f in filters if f in expected] != expected or filters[-1] != expected[-1]:
            findings.append(f"{path}: http_filters {filters}: grpc_web, then jwt_authn, router last")
        routes = [
            route for host in manager.get("route_config", {}).get("virtual_hosts", []) for route in host.get("routes", [])
        ]
        for route in routes:
            if route.get("route", {}).get("cluster") not in clusters:
                findings.append(f"{path}: route {route.get('match')} names no defined cluster")
        jwt = next(
            (f["typed_config"] for f in manager.get("http_filters", []) if f["name"] == "envoy.filters.http.jwt_authn"),
            {},
        )
        for name, provider in jwt.get("providers", {}).items():
            if provider.get("issuer") != ISSUER or AUDIENCE not in provider.get("audiences", []):
                findings.append(f"{path}: provider {name} checks another issuer or audience")
            uri = provider.get("remote_jwks", {}).get("http_uri", {})
            if not uri.get("uri", "").endswith("/.well-known/jwks.json") or uri.get("cluster") not in clusters:
                findings.append(f"{path}: provider {name} does not fetch auth-service's /.well-known/jwks.json")
        required = {r["match"].get("prefix") for r in jwt.get("rules", []) if "requires" in r}
        if PRODUCT_PREFIX not in required:
            findings.append(f"{path}: product calls are not required to carry a token")
        if AUTH_PREFIX in required or "/" in required:
            findings.append(f"{path}: login calls would need a token they cannot have yet")


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    findings = []
    compose_text = sys.stdin.read() if argv[1] == "-" else open(argv[1]).read()
    check_compose(yaml.safe_load(compose_text) or {}, findings)
    for path in argv[2:]:
        with open(path) as manifest:
            documents = list(yaml.safe_load_all(manifest))
        if any(isinstance(d, dict) and "static_resources" in d for d in documents):
            for document in documents:
                check_envoy(path, document, findings)
        else:
            check_kubernetes(path, documents, findings)
    for finding in findings:
        print(f"check-deploy: {finding}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
