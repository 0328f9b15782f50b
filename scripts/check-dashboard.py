#!/usr/bin/env python3
"""Checks the Grafana dashboard's PromQL with promtool.

Grafana has no offline checker, but every panel query is PromQL: each one,
with the dashboard's variables given plain values, becomes a recording
rule in a scratch rules file that `promtool check rules` parses. Also
checks the shape Grafana needs to import the file: unique panel ids and
refIds, a data source variable every query uses.

usage: check-dashboard.py DASHBOARD.json
"""
import json
import subprocess
import sys
import tempfile

# What Grafana substitutes before a query reaches Prometheus.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", '"$job"': '".*"'}


def main(path):
    with open(path) as f:
        dashboard = json.load(f)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    if "datasource" not in variables:
        sys.exit(f"{path}: no datasource variable to pick the Prometheus source at import")
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        sys.exit(f"{path}: panel ids repeat: {ids}")
    rules = []
    for panel in dashboard["panels"]:
        refs = [t["refId"] for t in panel["targets"]]
        if not refs or len(refs) != len(set(refs)):
            sys.exit(f"{path}: panel {panel['title']!r} has no or repeated refIds")
        for target in panel["targets"] + [panel]:
            uid = target["datasource"]["uid"]
            if uid != "${datasource}":
                sys.exit(f"{path}: panel {panel['title']!r} names data source {uid!r}, not the variable")
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            if "$" in expr.replace("$labels", ""):
                sys.exit(f"{path}: panel {panel['title']!r}: unknown variable in {expr}")
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as scratch:
        # JSON is YAML: promtool reads it as a rules file.
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, scratch)
        scratch.flush()
        subprocess.run(["promtool", "check", "rules", scratch.name], check=True, stdout=subprocess.DEVNULL)
    print(f"{path}: {len(dashboard['panels'])} panels, {len(rules)} queries parse")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
