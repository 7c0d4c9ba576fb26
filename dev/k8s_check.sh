#!/usr/bin/env bash
# `make k8s-check`: every overlay of k8s/ rendered with `kubectl kustomize` and each object validated
# against its schema with kubectl-validate (Kubernetes' own schemas; installed once from the Go
# module proxy into the cache). No cluster, nothing downloaded at check time once installed.
# The operators' objects (Strimzi, Altinity) will be validated against the CRDs in
# ../shared/k8s-crds (reference data, kept out of the repo) once k8s/ holds them (issue 15).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
VERSION=v0.0.4
VALIDATE="$TALLY_CACHE/kubectl-validate-$VERSION/kubectl-validate"
if [[ ! -x $VALIDATE ]]; then
  echo "[k8s] installing kubectl-validate $VERSION (go install, Go module proxy)" >&2
  GOBIN="$(dirname "$VALIDATE")" go install "sigs.k8s.io/kubectl-validate@$VERSION"
fi
command -v kubectl >/dev/null || { echo "[k8s] kubectl (with kustomize) is required" >&2; exit 1; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
for overlay in "$ROOT"/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" >"$out/$name.yaml"
  echo "[k8s] $name: $(grep -c '^kind:' "$out/$name.yaml") objects rendered"
  crds=()
  [[ -d "$ROOT/../shared/k8s-crds" ]] && crds=(--local-crds "$ROOT/../shared/k8s-crds")
  "$VALIDATE" --version 1.30 "${crds[@]}" "$out/$name.yaml" || status=1
done
exit "$status"
