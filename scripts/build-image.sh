#!/usr/bin/env bash
# Build the Airlock sandbox image offline (what `make image` runs).
#
#   airlock-base:<basehash>      debootstrap bookworm minbase + python3 + libgomp1,
#                                `docker import`ed (no registry involved)
#   airlock-site:<sitehash>      + user/group 10001 "airlock" + the pinned Python
#                                packages of sandbox/image/requirements.txt,
#                                pip-installed on the host, pre-compiled
#   airlock-sandbox:<hash>       + sandbox/airlock_sandbox, sandbox/airlock_worker,
#   airlock-sandbox:latest         environment, USER 10001, ENTRYPOINT
#
# <hash> covers every input of the image (sandbox/image/*, this script, the
# in-container code); when an image with that tag exists nothing is rebuilt.
# Each stage is cached on its own inputs, so a change to the worker code only
# rebuilds the small app layer (the build context is then a few kB).
# Every `docker build` runs with --network=none: nothing is downloaded inside.
#
# Environment:
#   AIRLOCK_HOST_PYTHON       python 3.11 used for pip/compileall (default .venv/bin/python)
#   AIRLOCK_KEEP_OLD_IMAGES=1 do not untag older airlock-sandbox/airlock-site images
#   AIRLOCK_DEBIAN_MIRROR     Debian mirror for debootstrap (default deb.debian.org)
#   AIRLOCK_IMAGE_PREFIX      image names <prefix>-base/-site/-sandbox (default airlock)
#   AIRLOCK_BUILD_DIR         work/cache directory (default build/image, gitignored)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

IMG_SRC=sandbox/image
BUILD="${AIRLOCK_BUILD_DIR:-$ROOT/build/image}"
LOGS="$BUILD/logs"
PY="${AIRLOCK_HOST_PYTHON:-$ROOT/.venv/bin/python}"
PREFIX="${AIRLOCK_IMAGE_PREFIX:-airlock}"
REPO="$PREFIX-sandbox"
SITE_REPO="$PREFIX-site"
BASE_REPO="$PREFIX-base"
# Bump when the commands in this script that produce the base / the site dir change
# (the recipes' own files are hashed directly).
BASE_RECIPE_VERSION=1
SITE_RECIPE_VERSION=2

# No buildx plugin here: use the classic builder explicitly (and quietly).
export DOCKER_BUILDKIT=0

# ---------------------------------------------------------------- helpers
say() { echo "build-image: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

T_ALL=$(date +%s.%N)
T_STEP=$T_ALL
step() { T_STEP=$(date +%s.%N); say "--> $*"; }
done_step() {
    local now; now=$(date +%s.%N)
    say "    $1 done in $(awk -v a="$T_STEP" -v b="$now" 'BEGIN{printf "%.1f", b-a}')s"
}
elapsed_total() { awk -v a="$T_ALL" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

h12() { sha256sum | cut -c1-12; }

# run_logged <logfile> <cmd...>: run quietly, show the log tail on failure.
run_logged() {
    local log="$1"; shift
    if ! "$@" >"$log" 2>&1; then
        say "command failed: $*"
        say "last 30 lines of $log:"
        tail -n 30 "$log" >&2 || true
        return 1
    fi
}

CLEANUP=()
cleanup() {
    local d
    for d in "${CLEANUP[@]}"; do
        [ -e "$d" ] || continue
        # A failed debootstrap may leave proc/sys mounted inside its target.
        findmnt -rn -o TARGET 2>/dev/null | grep -F "$d/" | sort -r \
            | while read -r m; do umount -l "$m" 2>/dev/null || true; done
        rm -rf --one-file-system "$d" 2>/dev/null || true
    done
}
trap cleanup EXIT

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# --------------------------------------------------------------- preflight
docker info >/dev/null 2>&1 \
    || die "Docker engine not reachable: run scripts/ensure-docker.sh (or 'make docker')"
[ -x "$PY" ] || die "host python $PY not found: run 'make venv' (scripts/setup-venv.sh)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PY is not Python 3.11: the image runs Debian bookworm's python3.11, and the
  host installs cp311 wheels and pre-compiles .pyc for it"
for f in Dockerfile Dockerfile.site base-rootfs.sh requirements.txt; do
    [ -f "$IMG_SRC/$f" ] || die "missing $IMG_SRC/$f"
done

mkdir -p "$BUILD" "$LOGS"
exec 9>"$BUILD/.lock"
if ! flock -n 9; then
    say "another image build is running; waiting for it"
    flock 9
fi

# ------------------------------------------------------------ input hashes
# Files that make up the image. Caches, bytecode and hidden files are ignored
# (and are not copied into the image either).
list_inputs() {
    find "$@" -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.pyo' ! -path '*/.*' \
        -print0 2>/dev/null | LC_ALL=C sort -z
}
APP_DIRS=()
for d in sandbox/airlock_sandbox sandbox/airlock_worker; do
    [ -d "$d" ] && APP_DIRS+=("$d")
done
APP_FILES=()
[ ${#APP_DIRS[@]} -eq 0 ] || mapfile -d '' APP_FILES < <(list_inputs "${APP_DIRS[@]}")
mapfile -d '' IMG_FILES < <(list_inputs "$IMG_SRC" scripts/build-image.sh)

HASH=$( { [ ${#IMG_FILES[@]} -gt 0 ] && sha256sum -- "${IMG_FILES[@]}"
          [ ${#APP_FILES[@]} -gt 0 ] && sha256sum -- "${APP_FILES[@]}"; true; } | h12)
BASEHASH=$( { echo "base-recipe-v$BASE_RECIPE_VERSION"; sha256sum "$IMG_SRC/base-rootfs.sh"; } | h12)
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
REQHASH=$( { echo "site-recipe-v$SITE_RECIPE_VERSION py$PYVER"; sha256sum "$IMG_SRC/requirements.txt"; } | h12)
SITEHASH=$( { echo "base=$BASEHASH req=$REQHASH"; sha256sum "$IMG_SRC/Dockerfile.site"; } | h12)

if image_exists "$REPO:$HASH"; then
    docker tag "$REPO:$HASH" "$REPO:latest"
    say "$REPO:$HASH is up to date (inputs unchanged); tagged $REPO:latest"
    exit 0
fi
say "building $REPO:$HASH (base $BASEHASH, site $SITEHASH, ${#APP_FILES[@]} app files)"

# ------------------------------------------------------------- 1. base image
if image_exists "$BASE_REPO:$BASEHASH"; then
    say "--> base image $BASE_REPO:$BASEHASH: cached"
else
    step "base image $BASE_REPO:$BASEHASH (debootstrap bookworm minbase, ~1 min)"
    [ "$(id -u)" -eq 0 ] || die "building the base image needs root (debootstrap); run as root"
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] \
        || die "debootstrap not installed: run scripts/ensure-docker.sh (or apt-get install debootstrap)"
    export PATH="$PATH:/usr/sbin:/sbin"
    tmp=$(mktemp -d "$BUILD/rootfs.XXXXXX")
    CLEANUP+=("$tmp")
    run_logged "$LOGS/debootstrap.log" bash "$IMG_SRC/base-rootfs.sh" "$tmp/rootfs" \
        || die "debootstrap failed (is ${AIRLOCK_DEBIAN_MIRROR:-http://deb.debian.org/debian} reachable?)"
    tar --numeric-owner -C "$tmp/rootfs" -c . \
        | docker import --message "airlock base rootfs $BASEHASH" \
            --change "LABEL airlock.base-recipe=$BASEHASH" - "$BASE_REPO:$BASEHASH" >/dev/null \
        || die "docker import of the base rootfs failed"
    rm -rf --one-file-system "$tmp"
    done_step "base image"
fi

# ------------------------------------------------- 2. site packages + image
SITE_DIR="$BUILD/site-$REQHASH"
REQ_FILE="$IMG_SRC/requirements.txt"

norm() { tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'; }

build_site_dir() {
    local tmp="$BUILD/site-$REQHASH.tmp"
    rm -rf "$tmp"
    CLEANUP+=("$tmp")

    step "pip install --target (requirements hash $REQHASH)"
    # Wheels only (nothing is compiled on the host); deps are resolved so that an
    # incomplete pin list is detected below rather than silently papered over.
    run_logged "$LOGS/pip.log" env -u PYTHONPATH "$PY" -m pip install --no-input \
        --disable-pip-version-check --no-warn-script-location --no-compile \
        --only-binary=:all: --target "$tmp" -r "$REQ_FILE" \
        || die "pip install failed (see $LOGS/pip.log)"
    done_step "pip install"

    step "verify site packages (full pin list, CPU only)"
    local installed wanted extra
    installed=$(env -u PYTHONPATH "$PY" -m pip list --path "$tmp" --format=freeze 2>/dev/null)
    wanted=$(grep -Ev '^\s*(#|$)' "$REQ_FILE" | sed -E 's/\s*[=<>!~;].*//' | norm | sort -u)
    extra=$(echo "$installed" | sed -E 's/==.*//' | norm | sort -u | comm -23 - <(echo "$wanted"))
    [ -z "$extra" ] || die "requirements.txt is not a full pin list; pip also installed: $(tr '\n' ' ' <<<"$extra")"
    local cuda
    cuda=$(grep -Ei '^(nvidia|cuda|cupy|triton)' <<<"$installed" || true)
    [ -z "$cuda" ] || die "CUDA packages in the image: $(tr '\n' ' ' <<<"$cuda")"
    grep -Eq '^torch==[^+]+\+cpu$' <<<"$installed" \
        || die "torch is not the +cpu build: $(grep -E '^torch==' <<<"$installed" || echo 'torch missing')"
    cuda=$(find "$tmp" \( -name 'libcudart*.so*' -o -name 'libcublas*.so*' -o -name 'libcudnn*.so*' \) -print -quit)
    [ -z "$cuda" ] || die "CUDA libraries found in the site dir: $cuda"
    done_step "verify"

    step "prune and pre-compile site packages"
    # Console scripts carry the host venv's shebang and are useless in the image.
    rm -rf "${tmp:?}/bin"
    # C/C++ headers and CMake files: only for building extensions, never at run time.
    rm -rf "$tmp/torch/include" "$tmp/torch/share/cmake"
    # Test suites and C++ test binaries (~200 MB): never imported at run time.
    # torch/bin keeps torch_shm_manager (used by torch.multiprocessing).
    rm -rf "$tmp/torch/test" "$tmp/onnx/backend/test/data"
    find "$tmp/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +
    find "$tmp" -mindepth 2 -type d -name tests -prune -exec rm -rf {} +
    find "$tmp" -name '__pycache__' -type d -prune -exec rm -rf {} +
    # unchecked-hash .pyc: valid whatever the mtimes after COPY, never re-validated
    # against the source at import (the image is read-only and immutable).
    if ! env -u PYTHONPATH "$PY" -m compileall -q -j 0 --invalidation-mode unchecked-hash \
            "$tmp" >"$LOGS/compileall-site.log" 2>&1; then
        # Expected: torch/testing/_internal/py312_intrinsics.py (Python 3.12 syntax).
        say "    note: not byte-compilable (left as source):" \
            "$(sed -nE "s|^\*\*\* Error compiling '$tmp/(.*)'.*|\1|p" "$LOGS/compileall-site.log" | tr '\n' ' ')"
    fi
    chmod -R u+rwX,go+rX,go-w "$tmp"
    done_step "prune/compile ($(du -sh "$tmp" | cut -f1))"

    # Only the current site dir is kept.
    find "$BUILD" -maxdepth 1 -name 'site-*' ! -name "site-$REQHASH*" -exec rm -rf {} +
    rm -rf "$SITE_DIR"
    mv "$tmp" "$SITE_DIR"
    echo "$REQHASH" >"$SITE_DIR.ok"
}

if image_exists "$SITE_REPO:$SITEHASH"; then
    say "--> site image $SITE_REPO:$SITEHASH: cached"
else
    if [ -d "$SITE_DIR" ] && [ -f "$SITE_DIR.ok" ]; then
        say "--> site packages $SITE_DIR: cached"
    else
        rm -f "$SITE_DIR.ok"
        build_site_dir
    fi

    step "site image $SITE_REPO:$SITEHASH (docker build --network=none)"
    ctx="$BUILD/ctx-site"
    rm -rf "$ctx"; mkdir -p "$ctx"
    CLEANUP+=("$ctx")
    cp "$IMG_SRC/Dockerfile.site" "$ctx/Dockerfile"
    cp -al "$SITE_DIR" "$ctx/site" 2>/dev/null || cp -a "$SITE_DIR" "$ctx/site"
    run_logged "$LOGS/docker-build-site.log" docker build --network=none --rm --force-rm \
        --build-arg "BASE_IMAGE=$BASE_REPO:$BASEHASH" \
        --label "airlock.site-inputs=$SITEHASH" \
        -t "$SITE_REPO:$SITEHASH" "$ctx" \
        || die "docker build of the site image failed (see $LOGS/docker-build-site.log)"
    rm -rf "$ctx"
    done_step "site image"
fi

# --------------------------------------------------------------- 3. app image
step "app image $REPO:$HASH"
ctx="$BUILD/ctx-app"
rm -rf "$ctx"; mkdir -p "$ctx/app"
CLEANUP+=("$ctx")
cp "$IMG_SRC/Dockerfile" "$ctx/Dockerfile"
for f in "${APP_FILES[@]}"; do
    rel="${f#sandbox/}"
    mkdir -p "$ctx/app/$(dirname "$rel")"
    cp "$f" "$ctx/app/$rel"
done
[ -d "$ctx/app/airlock_worker" ] || mkdir -p "$ctx/app/airlock_worker"
if ! env -u PYTHONPATH "$PY" -m compileall -q --invalidation-mode unchecked-hash \
        "$ctx/app" >"$LOGS/compileall-app.log" 2>&1; then
    cat "$LOGS/compileall-app.log" >&2
    die "the in-container code does not byte-compile"
fi
chmod -R u+rwX,go+rX,go-w "$ctx/app"
run_logged "$LOGS/docker-build-app.log" docker build --network=none --rm --force-rm \
    --build-arg "SITE_IMAGE=$SITE_REPO:$SITEHASH" \
    --build-arg "IMAGE_INPUTS=$HASH" \
    -t "$REPO:$HASH" "$ctx" \
    || die "docker build of the app image failed (see $LOGS/docker-build-app.log)"
rm -rf "$ctx"
done_step "app image"

# ---------------------------------------------------------------- 4. smoke
step "smoke test (network none, read-only, uid 10001)"
want_torch=$(sed -nE 's/^torch==([^ ;#]+).*/\1/p' "$REQ_FILE")
smoke_out=$(docker run --rm --network none --read-only --user 10001:10001 \
        --cap-drop ALL --security-opt no-new-privileges \
        --entrypoint python3 "$REPO:$HASH" -c '
import time; t = time.perf_counter()
import torch, sklearn, skl2onnx, onnxruntime, onnx, safetensors, onnxmltools, xgboost, lightgbm, joblib, cloudpickle
print(torch.__version__)
print("imports %.2fs" % (time.perf_counter() - t))' 2>"$LOGS/smoke.err") || {
    docker rmi "$REPO:$HASH" >/dev/null 2>&1 || true
    tail -n 30 "$LOGS/smoke.err" >&2
    die "smoke test failed: the image cannot import its packages (tag removed)"
}
if [ -s "$LOGS/smoke.err" ]; then
    say "    note: the smoke test wrote to stderr:"
    sed 's/^/      /' "$LOGS/smoke.err" >&2
fi
got_torch=$(echo "$smoke_out" | head -n 1)
if [ "$got_torch" != "$want_torch" ]; then
    docker rmi "$REPO:$HASH" >/dev/null 2>&1 || true
    echo "$smoke_out" >&2
    die "smoke test: torch reports '$got_torch', expected '$want_torch' (tag removed)"
fi
done_step "smoke test: torch $got_torch, $(echo "$smoke_out" | sed -n 2p)"

docker tag "$REPO:$HASH" "$REPO:latest"

# Untag superseded builds (best effort: images still used by a container stay).
if [ "${AIRLOCK_KEEP_OLD_IMAGES:-0}" != 1 ]; then
    for pair in "$REPO:$HASH" "$SITE_REPO:$SITEHASH"; do
        repo="${pair%%:*}"; keep="${pair#*:}"
        docker image ls --format '{{.Repository}}:{{.Tag}}' "$repo" \
            | { grep -vE ":($keep|latest|<none>)$" || true; } \
            | while read -r old; do docker rmi "$old" >/dev/null 2>&1 || true; done
    done
fi

read -r img_id img_size < <(docker image inspect --format '{{.Id}} {{.Size}}' "$REPO:$HASH")
say "built $REPO:$HASH (= $REPO:latest) in $(elapsed_total)s"
say "image id $img_id, size $(numfmt --to=iec --suffix=B "$img_size")"
