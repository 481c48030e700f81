#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/kubernetes offline.
#
#   bash .ci/validate-manifests.sh [dir]          (default: deploy/kubernetes)
#
# Every resource manifest is checked with kubernetes-validate against the
# Kubernetes OpenAPI JSON schemas it bundles, in strict mode (an unknown or
# misspelt field is an error), for each version in $K8S_VERSIONS (default
# 1.29.0, the first with native sidecar containers on by default, and 1.37.0).
# kustomization.yaml has no schema there (and kustomize is not available), so
# it gets structural checks instead, together with what no schema sees: the
# files it lists exist and are all there, the Service selects the Deployment's
# pods, named target ports exist, and every $(VAR) in a container's args is
# defined in its env.
# Prints "ok - FILE" / "not ok - FILE" and ends with "manifests: N passed, M failed".
#
# Needs, and does not install (.ci/run does): python3 and
#   pip install kubernetes-validate==1.37.0   (bundles the schemas; brings PyYAML)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/deploy/kubernetes}
PYTHON=${PYTHON:-python3}
read -r -a VERSIONS <<<"${K8S_VERSIONS:-1.29.0 1.37.0}"

command -v kubernetes-validate >/dev/null \
  || { echo "manifests: kubernetes-validate not on PATH (pip install kubernetes-validate)" >&2; exit 2; }
[[ -d $DIR ]] || { echo "manifests: no directory $DIR" >&2; exit 2; }

passed=0
failed=0
report() { # report STATUS FILE OUTPUT
  if (($1 == 0)); then
    echo "ok - $2"
    passed=$((passed + 1))
  else
    echo "not ok - $2"
    printf '    %s\n' "${3//$'\n'/$'\n'    }"
    failed=$((failed + 1))
  fi
}

check_kustomization() {
  "$PYTHON" - "$1" <<'EOF'
import os, re, sys
import yaml

path = sys.argv[1]
base = os.path.dirname(path)
errors = []
k = yaml.safe_load(open(path))
if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
    errors.append("not a kustomize.config.k8s.io/v1beta1 Kustomization")
listed = k.get("resources") or []
for res in listed:
    if not os.path.isfile(os.path.join(base, res)):
        errors.append(f"resource {res} does not exist")
for name in sorted(os.listdir(base)):
    if name.endswith((".yaml", ".yml")) and name != os.path.basename(path) and name not in listed:
        errors.append(f"{name} is not listed under resources")

docs = [d for res in listed if os.path.isfile(os.path.join(base, res))
        for d in yaml.safe_load_all(open(os.path.join(base, res))) if d]
services = [d for d in docs if d.get("kind") == "Service"]
workloads = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")]

def containers(w):
    spec = w["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])

images = [c["image"] for w in workloads for c in containers(w)]
for img in k.get("images") or []:
    if not any(i == img["name"] or i.startswith(img["name"] + ":") or i.startswith(img["name"] + "@") for i in images):
        errors.append(f"images: {img['name']} is used by no container")

for w in workloads:
    name = w["metadata"]["name"]
    labels = w["spec"]["template"]["metadata"].get("labels", {})
    if not (w["spec"]["selector"].get("matchLabels", {}).items() <= labels.items()):
        errors.append(f"{name}: selector does not match its pod template labels")
    for c in containers(w):
        defined = {e["name"] for e in c.get("env", [])}
        for var in re.findall(r"\$\((\w+)\)", " ".join(c.get("command", []) + c.get("args", []))):
            if var not in defined:
                errors.append(f"{name}/{c['name']}: $({var}) is not defined in env")

for s in services:
    name = s["metadata"]["name"]
    selected = [w for w in workloads
                if s["spec"].get("selector", {}).items() <= w["spec"]["template"]["metadata"].get("labels", {}).items()]
    if not selected:
        errors.append(f"service {name} selects no workload here")
    for port in s["spec"].get("ports", []):
        target = port.get("targetPort")
        if isinstance(target, str) and not any(
            p.get("name") == target for w in selected for c in containers(w) for p in c.get("ports", [])
        ):
            errors.append(f"service {name}: targetPort {target!r} names no container port")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(listed)} resources, cross-checks passed")
EOF
}

shopt -s nullglob
files=("$DIR"/*.yaml "$DIR"/*.yml)
((${#files[@]} > 0)) || { echo "manifests: no manifests in $DIR" >&2; exit 2; }

for file in "${files[@]}"; do
  rel=${file#"$ROOT"/}
  if [[ $(basename "$file") == kustomization.y*ml ]]; then
    status=0
    out=$(check_kustomization "$file" 2>&1) || status=$?
    report "$status" "$rel (structure and cross-references; no schema for Kustomization)" "$out"
    continue
  fi
  status=0
  out=""
  for version in "${VERSIONS[@]}"; do
    # --quiet prints only problems; "Couldn't find schema" is a warning that
    # would let an unknown kind pass, so it is a failure here.
    if ! o=$(kubernetes-validate --strict --quiet -k "$version" "$file" 2>&1) || [[ -n $o ]]; then
      status=1
      out+="$o"$'\n'
    fi
  done
  report "$status" "$rel (strict schema, Kubernetes ${VERSIONS[*]})" "${out%$'\n'}"
done

echo "manifests: $passed passed, $failed failed"
((failed == 0))
