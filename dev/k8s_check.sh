#!/usr/bin/env bash
# `make k8s-check` (and a step of `make test`): what an SRE applies, checked without a cluster.
#  1. every overlay of k8s/ rendered with `kubectl kustomize`
#  2. every object validated against its schema by kubectl-validate: Kubernetes 1.30's own, the
#     operators' CRDs (Strimzi 1.2.0 and Altinity 0.25.6 from ../shared/k8s-crds, reference data
#     kept out of the repo; the Prometheus Operator's ServiceMonitor and PrometheusRule from its
#     Go module). Then the same render broken on purpose (a misspelt field, a string for a number,
#     in a core object and in each operator's): each must be refused, or the check itself fails.
#  3. the invariants (dev/k8s_invariants.py): every container probed, limited, non-root; HPA
#     bounds within the topic's partitions; every Secret referenced documented in docs/deploy.md;
#     the NetworkPolicies leave each service exactly its peers. It breaks each invariant on purpose
#     too and must see it refused.
#  4. the alerts: promtool checks the PrometheusRule's rules and runs their unit tests
#     (k8s/alerts-test.yaml)
#  5. checkov scans the rendered overlays and the Dockerfile; the findings not fixed are
#     justified in k8s/POLICY.md, whose table is the skip list (a skip without a reason fails)
# `dev/k8s_check.sh install` installs the tools into the cache (Go module proxy, PyPI) and exits;
# the check itself downloads nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
VALIDATE_VERSION=v0.0.4
PROMETHEUS_VERSION=v0.316.0 # github.com/prometheus/prometheus (3.16): promtool
OPERATOR_VERSION=v0.94.0    # github.com/prometheus-operator/prometheus-operator: its CRDs
VALIDATE="$TALLY_CACHE/kubectl-validate-$VALIDATE_VERSION/kubectl-validate"
PROMTOOL="$TALLY_CACHE/promtool-$PROMETHEUS_VERSION/promtool"
MONITORING_CRDS="$TALLY_CACHE/prometheus-operator-crds-$OPERATOR_VERSION"
# The operators' CRDs (reference data beside the checkout; kept out of the repo): the first found.
SHARED_CRDS=""
for candidate in "${TALLY_K8S_CRDS:-}" "$ROOT/../shared/k8s-crds" /work/shared/k8s-crds; do
  if [[ -n $candidate && -f $candidate/040-Crd-kafka.yaml ]]; then SHARED_CRDS="$candidate"; break; fi
done
log() { echo "[k8s] $*" >&2; }

install() {
  if [[ ! -x $VALIDATE ]]; then
    log "installing kubectl-validate $VALIDATE_VERSION (go install, Go module proxy)"
    GOBIN="$(dirname "$VALIDATE")" go install "sigs.k8s.io/kubectl-validate@$VALIDATE_VERSION"
  fi
  if [[ ! -x $PROMTOOL ]]; then
    log "installing promtool from prometheus $PROMETHEUS_VERSION (go install, a few minutes once)"
    GOBIN="$(dirname "$PROMTOOL")" GOFLAGS=-mod=mod \
      go install "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  fi
  if [[ ! -f $MONITORING_CRDS/.installed ]]; then
    log "fetching the Prometheus Operator's CRDs $OPERATOR_VERSION (go mod download)"
    local dir
    dir="$(cd "$(mktemp -d)" && go mod download -json \
      "github.com/prometheus-operator/prometheus-operator@$OPERATOR_VERSION" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
    mkdir -p "$MONITORING_CRDS"
    cp "$dir"/example/prometheus-operator-crd/monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml \
      "$MONITORING_CRDS/"
    touch "$MONITORING_CRDS/.installed"
  fi
  command -v kubectl >/dev/null || { log "kubectl (with its built-in kustomize) is required: apt-get install kubectl"; exit 1; }
  bash "$ROOT/dev/tools.sh" k8s >/dev/null
}

if [[ "${1:-}" == install ]]; then
  install
  exit 0
fi
install
[[ -n $SHARED_CRDS ]] || { log "the operators' CRDs (Strimzi 1.2.0, Altinity 0.25.6) were not found: set TALLY_K8S_CRDS to their directory (../shared/k8s-crds beside the checkout)"; exit 1; }
K8S_PYTHON="$(bash "$ROOT/dev/tools.sh" k8s)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

validate() { # validate FILE...: kubectl-validate against Kubernetes' and the operators' schemas
  "$VALIDATE" --version 1.30 --local-crds "$SHARED_CRDS" --local-crds "$MONITORING_CRDS" "$@"
}

overlays=()
for overlay in "$ROOT"/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  overlays+=("$name")
  kubectl kustomize "$overlay" >"$out/$name.yaml"
  log "$name: $(grep -c '^kind:' "$out/$name.yaml") objects rendered"
  validate "$out/$name.yaml" >"$out/$name.validate" 2>&1 || { cat "$out/$name.validate"; log "$name: schema validation FAILED"; exit 1; }
  log "$name: every object valid against its schema"
done

# The validator must refuse what is wrong: each mutation of the prod render alone.
"$K8S_PYTHON" "$ROOT/dev/k8s_invariants.py" mutate-schema "$out/prod.yaml" "$out/broken"
for broken in "$out"/broken/*.yaml; do
  if validate "$broken" >"$broken.out" 2>&1; then
    log "kubectl-validate accepted $(head -1 "$broken" | sed 's/^# //'): the schema check is not working"
    exit 1
  fi
  # kubectl-validate prints the file, then one line per error: show the first.
  log "refused as it must be: $(head -1 "$broken" | sed 's/^# //')
        $(grep -vE '^\s*$|ERROR|^Error:' "$broken.out" | head -1 | cut -c1-150)"
done

for name in "${overlays[@]}"; do
  "$K8S_PYTHON" "$ROOT/dev/k8s_invariants.py" check "$out/$name.yaml" --docs "$ROOT/docs/deploy.md"
done
"$K8S_PYTHON" "$ROOT/dev/k8s_invariants.py" self-test "$out/prod.yaml" --docs "$ROOT/docs/deploy.md"

"$K8S_PYTHON" "$ROOT/dev/k8s_invariants.py" rules "$out/prod.yaml" "$out/tally.rules.yaml"
"$PROMTOOL" check rules "$out/tally.rules.yaml" >&2
cp "$ROOT/k8s/alerts-test.yaml" "$out/alerts-test.yaml"
(cd "$out" && "$PROMTOOL" test rules alerts-test.yaml) >&2

skips="$("$K8S_PYTHON" "$ROOT/dev/k8s_invariants.py" policy-skips "$ROOT/k8s/POLICY.md")"
mkdir -p "$out/scan"
for name in "${overlays[@]}"; do cp "$out/$name.yaml" "$out/scan/"; done
cp "$ROOT/Dockerfile" "$out/scan/Dockerfile"
log "checkov (kubernetes, dockerfile), skipping only what k8s/POLICY.md justifies: $skips"
if ! "$(dirname "$K8S_PYTHON")/checkov" --quiet --compact --framework kubernetes dockerfile \
  --skip-check "$skips" -d "$out/scan" >"$out/checkov.txt" 2>&1; then
  cat "$out/checkov.txt"
  log "checkov found what k8s/POLICY.md does not justify: fix it, or justify it there"
  exit 1
fi
grep -E "^(kubernetes|dockerfile) scan results" -A3 "$out/checkov.txt" >&2 || true
log "OK: ${overlays[*]} render, validate, hold their invariants, alerts tested, policy scan clean"
