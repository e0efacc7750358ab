"""Renders deploy/helm/amity as `helm template` would, for the chart's own subset of the Go
template language (Debian packages no helm): `{{ .Values.a.b }}`, `{{ .Release.Name }}`,
`{{ .Release.Namespace }}`, `{{ .Chart.AppVersion }}`, `{{- toYaml .Values.x | nindent N }}` and
`{{- if .Values.x }} ... {{- else }} ... {{- end }}` (nested: innermost first). Anything else is an error, so a
template that strays from the subset fails the check instead of rendering wrongly.

Then checks: values.yaml against values.schema.json (what helm itself checks), and every
rendered object against the Kubernetes API schemas (kubernetes-validate). Prints the objects and
the rendered coordinator.toml as JSON (the test loads that with the coordinator's loader).

Usage: python helm_render.py <chart dir> <kubernetes version>
"""

import glob
import json
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

chart, k8s = sys.argv[1], sys.argv[2]
values = yaml.safe_load(open(f"{chart}/values.yaml"))
jsonschema.validate(values, json.load(open(f"{chart}/values.schema.json")))
meta = yaml.safe_load(open(f"{chart}/Chart.yaml"))
scope = {
    "Values": values,
    "Release": {"Name": "amity", "Namespace": "default"},
    "Chart": {"AppVersion": meta["appVersion"], "Name": meta["name"]},
}


def lookup(path):
    node = scope
    for part in path.lstrip(".").split("."):
        node = node[part]
    return node


def scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def render(text):
    # Conditionals first, innermost first (a body holds no other `if`); each tag sits on a
    # line of its own, which goes with it.
    body = r"((?:(?!\{\{-? if ).)*?)"
    cond = re.compile(
        r"[ \t]*\{\{-? if (\S+) \}\}\n" + body
        + r"(?:[ \t]*\{\{-? else \}\}\n" + body + r")?[ \t]*\{\{-? end \}\}\n?",
        re.S,
    )
    while True:
        done = cond.sub(lambda m: m.group(2) if lookup(m.group(1)) else (m.group(3) or ""), text)
        if done == text:
            break
        text = done

    def to_yaml(m):
        dumped = yaml.safe_dump(lookup(m.group(1)), default_flow_style=False).rstrip("\n")
        pad = " " * int(m.group(2))
        return "\n" + "\n".join(pad + line for line in dumped.split("\n"))

    text = re.sub(r"\n?[ \t]*\{\{- toYaml (\S+) \| nindent (\d+) \}\}", to_yaml, text)
    text = re.sub(r"\{\{ (\.[A-Za-z.]+) \}\}", lambda m: scalar(lookup(m.group(1))), text)
    if "{{" in text:
        raise SystemExit("template construct outside the supported subset: "
                         + text[text.index("{{"):][:80])
    return text


objects, config = [], None
for path in sorted(glob.glob(f"{chart}/templates/*.yaml")):
    for doc in yaml.safe_load_all(render(open(path).read())):
        if doc is None:
            continue
        kubernetes_validate.validate(doc, k8s, strict=True)
        objects.append(f"{doc['kind']}/{doc['metadata']['name']}")
        if doc["kind"] == "ConfigMap":
            config = doc["data"]["coordinator.toml"]
print(json.dumps({"objects": objects, "coordinator_toml": config}))
