#!/usr/bin/env bash
# Container smoke test: the shipped docker/compose.yml, for real, on this machine.
#
# The compose files are otherwise only parsed (tests/unit/test_docker_files.py). This builds the
# images without a registry, makes the certificates, brings up the SuperLink, the ServerApp and
# three hospitals (two with real images on their own data folders, one synthetic) with
# docker/compose.yml plus docker/offline.override.yml (which swaps images and nothing else), and
# checks, failing on the first miss:
#   - every container: no capabilities, no-new-privileges, read-only root, memory and pid limits,
#     a healthy healthcheck, not root, ports on loopback only, no ca.key in any mount
#     (docker/check_containers.py reads docker inspect)
#   - a SuperNode whose key is not registered is refused
#   - a 2-round run over TLS with node authentication completes; the SuperNode of one hospital
#     is killed in round 2, which closes on the other two (federation.min_replies=2)
#   - final_model.pt of round 2 lies in the server's outputs volume
#   - in hospital 1's post-training container (no network, its images read-only):
#     w3s-postprocess and w3s-predict run on its mounted images and write to its own output
#     folder, and to no other hospital's
#   - docker compose down leaves no container, volume or network of the project behind
#
#   docker/smoke_test.sh            # exit 0: passed; 1: a check failed; 2: cannot run here
#
# Environment:
#   DOCKER       docker CLI with BuildKit (default docker; the Docker 20.10 CLI needs
#                DOCKER_BUILDKIT=1, which this script sets) and the compose v2 plugin
#   PYTHON       Python with Flower installed, for generate_certs.py and the checks (default:
#                the one of FLWR, else python3)
#   FLWR         the operator's Flower CLI (default: flwr)
#   WBC_DEV      the real images (default: ../shared/data/segmentation_WBC-dev beside the repo,
#                or $W3S_DATA_HOME/segmentation_WBC-dev)
#   TORCH_INDEX_URL  where the app image gets torch (default https://pypi.org/simple, because
#                download.pytorch.org is out of reach on some machines)
#   SKIP_BUILD=1 use the images already built; KEEP=1 keep the work folder
# If no Docker engine answers and this runs as root with dockerd installed, it starts dockerd
# and stops it again at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER=${DOCKER:-docker}
FLWR=${FLWR:-flwr}
if [[ -z ${PYTHON:-} ]]; then
  flwr_path=$(command -v "$FLWR" || true)
  if [[ -n $flwr_path && -x $(dirname "$flwr_path")/python ]]; then
    PYTHON=$(dirname "$flwr_path")/python
  else
    PYTHON=python3
  fi
fi
WBC_DEV=${WBC_DEV:-${W3S_DATA_HOME:-$REPO/../shared/data}/segmentation_WBC-dev}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
FLWR_VERSION=1.42.0
APP_IMAGE=fl-w3s:$FLWR_VERSION-offline
export COMPOSE_PROJECT_NAME=fl-w3s-smoke
export DOCKER_BUILDKIT=1
CONNECTION=smoke
IMAGES_PER_HOSPITAL=30
NEW_IMAGES=3

fail() { echo "FAIL: $*" >&2; exit 1; }
cannot() { echo "cannot run: $*" >&2; exit 2; }
phase() { printf '\n== %s (t=%ds)\n' "$1" "$SECONDS"; }
# Poll a command every $2 seconds until it succeeds or $1 seconds pass; fail naming $3.
wait_for() {
  local timeout=$1 step=$2 what=$3 deadline=$((SECONDS + $1))
  shift 3
  until "$@"; do
    ((SECONDS < deadline)) || fail "$what: not within ${timeout}s"
    sleep "$step"
  done
}

command -v "$DOCKER" >/dev/null || cannot "no docker CLI ($DOCKER)"
command -v "$FLWR" >/dev/null || cannot "no Flower CLI ($FLWR): pip install flwr==$FLWR_VERSION"
"$PYTHON" -c "import cryptography" 2>/dev/null || cannot "$PYTHON cannot import cryptography"
[[ -d $WBC_DEV/Dataset\ 1 && -d $WBC_DEV/Dataset\ 2 ]] || cannot "no real images at $WBC_DEV"

WORK=$(mktemp -d /tmp/fl-w3s-smoke.XXXXXX)
DOCKERD_PID=
cleanup() {
  local status=$?
  set +e
  if [[ $status != 0 && -d $WORK/logs ]]; then
    compose logs --no-color >"$WORK/logs/compose.log" 2>&1
    "$DOCKER" ps -a --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
      >"$WORK/logs/containers.txt" 2>&1
    echo "logs kept in $WORK/logs" >&2
  fi
  if [[ -f $WORK/docker/compose.yml ]]; then
    compose --profile posttrain down -v --remove-orphans >/dev/null 2>&1
  fi
  if [[ -n $DOCKERD_PID ]]; then
    kill "$DOCKERD_PID" && wait "$DOCKERD_PID"
    echo "stopped the dockerd this test started (pid $DOCKERD_PID)"
  fi
  if [[ $status == 0 && ${KEEP:-0} != 1 ]]; then
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT

if ! "$DOCKER" info >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v dockerd >/dev/null; then
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    wait_for 60 1 "dockerd answering" "$DOCKER" info >/dev/null 2>&1
  else
    cannot "no Docker engine answers ($DOCKER info)"
  fi
fi
"$DOCKER" compose version >/dev/null 2>&1 || cannot "no compose v2 plugin ($DOCKER compose)"
# Docker 23+ builds with BuildKit through the buildx plugin only; 20.10 has it built in.
if [[ ${SKIP_BUILD:-0} != 1 ]] && ! "$DOCKER" buildx version >/dev/null 2>&1; then
  client=$("$DOCKER" version -f '{{.Client.Version}}' 2>/dev/null || echo 0)
  ((${client%%.*} < 23)) ||
    cannot "$DOCKER $client needs the buildx plugin for BuildKit builds: install it, or set DOCKER to a Docker 20.10 CLI"
fi

# The shipped compose file and override, byte for byte, in a folder of their own: certificates,
# data and outputs land beside them at the file's default paths, never in the checkout.
mkdir -p "$WORK/docker" "$WORK/logs" "$WORK/flwr_home"
cp "$REPO/docker/compose.yml" "$REPO/docker/offline.override.yml" \
  "$REPO/docker/generate_certs.py" "$WORK/docker/"
compose() {
  "$DOCKER" compose -f "$WORK/docker/compose.yml" -f "$WORK/docker/offline.override.yml" "$@"
}
compose --profile posttrain down -v --remove-orphans >/dev/null 2>&1 || true

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  phase "build images offline"
  DOCKER=$DOCKER FLWR_VERSION=$FLWR_VERSION "$REPO/docker/build_offline_base.sh"
  secret=()
  [[ -s /etc/ssl/certs/ca-certificates.crt ]] &&
    secret=(--secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt)
  "$DOCKER" build --network host "${secret[@]}" \
    --build-arg "BASE_IMAGE=fl-w3s-offline/superexec:$FLWR_VERSION-py3.11" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    -f "$REPO/docker/Dockerfile" -t "$APP_IMAGE" "$REPO"
fi
for image in "$APP_IMAGE" "fl-w3s-offline/superlink:$FLWR_VERSION" \
  "fl-w3s-offline/supernode:$FLWR_VERSION"; do
  "$DOCKER" image inspect "$image" >/dev/null 2>&1 || cannot "image $image missing (SKIP_BUILD=1?)"
done

phase "hospital data: real images of two domains, one synthetic hospital"
export HOSPITAL_1=dataset1 HOSPITAL_2=dataset2 HOSPITAL_3=hospital_c
export SUPERLINK_PORT
SUPERLINK_PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# A hospital's folder holds the first images of one domain with their labels, as the data
# config reads them, and under new/ a few later images it has not trained on, to predict.
"$PYTHON" - "$WBC_DEV" "$WORK/docker/data" "$IMAGES_PER_HOSPITAL" "$NEW_IMAGES" <<'EOF'
import shutil, sys
from pathlib import Path

source, data, count, new = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for folder, subset in (("hospital_1", "Dataset 1"), ("hospital_2", "Dataset 2")):
    disk = data / folder
    (disk / subset).mkdir(parents=True)
    (disk / "new").mkdir()
    labels = f"Class Labels of {subset}.csv"
    header, *rows = (source / labels).read_text(encoding="utf-8-sig").splitlines()
    (disk / labels).write_text("\n".join([header, *rows[:count]]) + "\n")
    for row in rows[:count]:
        for suffix in (".bmp", ".png"):
            name = f"{int(row.split(',')[0]):03d}{suffix}"
            shutil.copyfile(source / subset / name, disk / subset / name)
    for row in rows[count : count + new]:
        name = f"{int(row.split(',')[0]):03d}.bmp"
        shutil.copyfile(source / subset / name, disk / "new" / name)
(data / "hospital_3").mkdir()
EOF
chmod -R a+rX "$WORK/docker/data"

phase "certificates: the CA on the host, the rest through the setup service"
"$PYTHON" "$WORK/docker/generate_certs.py" server --out "$WORK/docker/certs" >/dev/null
# A fourth key pair that the operator never registers.
"$PYTHON" "$WORK/docker/generate_certs.py" hospital intruder --out "$WORK/docker/certs" >/dev/null
cp "$WORK/docker/certs/server/ca.crt" "$WORK/docker/certs/hospitals/intruder/ca.crt"
compose run --rm setup >"$WORK/logs/setup.log" 2>&1 || { cat "$WORK/logs/setup.log"; fail "setup"; }
[[ -f $WORK/docker/certs/ca/ca.key ]] || fail "no CA key in docker/certs/ca"
[[ -z $(find "$WORK/docker/certs/server" "$WORK/docker/certs/hospitals" -name ca.key) ]] ||
  fail "a ca.key lies in a folder that containers mount"

phase "SuperLink up (TLS, node authentication, Control API on loopback)"
compose up -d superlink
cat >"$WORK/flwr_home/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$SUPERLINK_PORT"
root-certificates = "$WORK/docker/certs/server/ca.crt"
EOF
export FLWR_HOME=$WORK/flwr_home
# A Flower CLI call with --format json, and the value at a Python subscript of its answer. The
# CLI reports any transport error (a read timeout on a loaded machine included) as "Connection to
# the SuperLink is unavailable"; that answer alone is retried, up to 5 times.
flwr_json() {
  local key=$1 answer attempt
  shift
  for attempt in 1 2 3 4 5; do
    answer=$("$FLWR" "$@" --format json 2>&1 || true)
    grep -q "Connection to the SuperLink is unavailable" <<<"$answer" || break
    echo "flwr $1 $2: SuperLink unavailable (attempt $attempt), retrying" >&2
    sleep 3
  done
  "$PYTHON" -c "import json, sys; print(json.loads(sys.argv[1])$key)" "$answer" ||
    fail "flwr $*: $answer"
}
health() { [[ $("$DOCKER" inspect -f '{{.State.Health.Status}}' "$(compose ps -q "$1")") == healthy ]]; }
wait_for 120 2 "superlink healthy" health superlink

phase "a SuperNode with an unregistered key is refused"
# It gives up after one attempt (--max-retries=1). Flower logs exit code 305 but the process
# in the container ends with status 0 after its Runtime API shuts down, so the refusal is read
# from the logs of both sides and the SuperLink's node list.
HOSPITAL_1=intruder compose run --rm --no-deps supernode-1 --max-retries=1 \
  >"$WORK/logs/intruder.log" 2>&1 || true
grep -q "Failed to activate SuperNode" "$WORK/logs/intruder.log" ||
  { tail -n 20 "$WORK/logs/intruder.log"; fail "no 'Failed to activate SuperNode'"; }
compose logs superlink | grep -q "No SuperNode found with the given public key" ||
  fail "the SuperLink did not log the unknown key"
nodes=$(flwr_json '["nodes"].__len__()' supernode list "$CONNECTION")
((nodes == 0)) || fail "the SuperLink lists $nodes nodes after the refused one"
echo "refused: 'Failed to activate SuperNode'; the SuperLink: 'No SuperNode found with the given public key'"

phase "register three hospitals, bring everything up"
declare -A NODE_ID
for h in "$HOSPITAL_1" "$HOSPITAL_2" "$HOSPITAL_3"; do
  NODE_ID[$h]=$(flwr_json '["node-id"]' supernode register \
    "$WORK/docker/certs/hospitals/$h/supernode.pub" "$CONNECTION")
  echo "$h: node ${NODE_ID[$h]}"
done
compose up -d
for service in serverapp supernode-1 supernode-2 supernode-3 clientapp-1 clientapp-2 clientapp-3; do
  wait_for 180 3 "$service healthy" health "$service"
done
online() {
  local statuses
  statuses=$(flwr_json '["nodes"]' supernode list "$CONNECTION")
  (($(grep -o "'online'" <<<"$statuses" | wc -l) == 3))
}
wait_for 120 3 "three SuperNodes online" online

phase "docker inspect: the doors are closed"
"$PYTHON" "$REPO/docker/check_containers.py" "$COMPOSE_PROJECT_NAME" --docker "$DOCKER" ||
  fail "docker inspect checks"

phase "a 2-round run; hospital 3's SuperNode killed in round 2"
RUN_DIR=/app/outputs/smoke
OVERRIDES="data=wbc_zxaoyou data.root=/nonexistent/on/the/server pretrain=none"
OVERRIDES+=" +data.hospitals.hospital_c={format:synthetic,domain:c,num_images:24,image_size:48,seed:303}"
OVERRIDES+=" model.img_size=32 train.batch_size=8 train.local_epochs=1"
OVERRIDES+=" federation.rounds=2 federation.min_replies=2 output_dir=$RUN_DIR"
printf 'overrides = "%s"\n' "$OVERRIDES" >"$WORK/run.toml"
"$FLWR" run "$REPO" "$CONNECTION" --stream --run-config "$WORK/run.toml" >"$WORK/logs/run.log" 2>&1 &
RUN_PID=$!
round_two() {
  kill -0 "$RUN_PID" 2>/dev/null || { tail -n 30 "$WORK/logs/run.log"; fail "flwr run ended before round 2"; }
  (($(grep -c "configure_train" "$WORK/logs/run.log") >= 2))
}
wait_for 900 1 "round 2 training started" round_two
compose kill supernode-3
echo "killed supernode-3 at t=${SECONDS}s"
wait "$RUN_PID" || fail "flwr run exited $?"
RUN_ID=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$WORK/logs/run.log" | head -n 1)
status=$(flwr_json '["runs"][0]["status"]' list "$CONNECTION" --run-id "$RUN_ID")
[[ $status == finished:completed ]] || { tail -n 40 "$WORK/logs/run.log"; fail "run $RUN_ID: $status"; }
compose exec -T serverapp cat "$RUN_DIR/metrics.jsonl" >"$WORK/metrics.jsonl"
"$PYTHON" - "$WORK/metrics.jsonl" "${NODE_ID[$HOSPITAL_3]}" <<'EOF'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
killed = int(sys.argv[2])
assert [r["round"] for r in rows] == [1, 2], rows
first, second = rows
assert first["replies"] == 3 and not first["failed_nodes"], first
assert sorted(first["hospitals"]) == ["dataset1", "dataset2", "hospital_c"], first["hospitals"]
assert second["replies"] == 2 and second["failed_nodes"] == [killed], second
print(f"round 1: 3 replies; round 2: 2 replies, failed nodes {second['failed_nodes']}")
EOF
compose exec -T serverapp python -c "
from common.checkpoint import load_checkpoint
final = load_checkpoint('$RUN_DIR/final_model.pt')
assert final['round'] == 2, final['round']
print('final_model.pt: round', final['round'])"

# The healthcheck sees the broken hospital: its ClientApp container no longer reaches a SuperNode.
unhealthy() { [[ $("$DOCKER" inspect -f '{{.State.Health.Status}}' "$(compose ps -q clientapp-3)") == unhealthy ]]; }
wait_for 120 5 "clientapp-3 unhealthy once its SuperNode is gone" unhealthy
echo "clientapp-3: unhealthy (its SuperNode was killed)"

phase "post-training in hospital 1's container, on its own images"
OUT1=$WORK/docker/outputs/hospital_1
compose cp "serverapp:$RUN_DIR/final_model.pt" "$OUT1/final_model.pt"
chmod a+r "$OUT1/final_model.pt"
DATA_1=(data=wbc_zxaoyou '~data.hospitals.dataset2' data.hospitals.dataset1.root=/data)
TINY_JOB=(segmenter=lraspp segmenter.epochs=1 segmenter.input_size=32 batch_size=8
  'evaluation.thresholds=[0.2,0.4,0.6]' 'evaluation.disk_radii=[0.5,0.7]')
compose run --name "$COMPOSE_PROJECT_NAME-posttrain" posttrain-1 w3s-postprocess \
  checkpoint=/app/outputs/final_model.pt hospital=dataset1 output_dir=/app/outputs/postprocess \
  "${DATA_1[@]}" "${TINY_JOB[@]}" >"$WORK/logs/postprocess.log" 2>&1 ||
  { tail -n 30 "$WORK/logs/postprocess.log"; fail "w3s-postprocess"; }
"$PYTHON" "$REPO/docker/check_containers.py" "$COMPOSE_PROJECT_NAME" --docker "$DOCKER" \
  --service posttrain-1 || fail "docker inspect checks of the post-training container"
"$DOCKER" inspect -f '{{.HostConfig.NetworkMode}} {{range .Mounts}}{{.Destination}}:rw={{.RW}} {{end}}' \
  "$COMPOSE_PROJECT_NAME-posttrain" | tee "$WORK/logs/posttrain-inspect.txt"
grep -q "^none " "$WORK/logs/posttrain-inspect.txt" || fail "posttrain has a network"
grep -q "/data:rw=false" "$WORK/logs/posttrain-inspect.txt" || fail "posttrain may write /data"
"$DOCKER" rm "$COMPOSE_PROJECT_NAME-posttrain" >/dev/null
compose run --rm posttrain-1 w3s-predict segmenter=/app/outputs/postprocess/segmenter.pt \
  input=/data/new output=/app/outputs/masks >"$WORK/logs/predict.log" 2>&1 ||
  { tail -n 30 "$WORK/logs/predict.log"; fail "w3s-predict"; }
[[ -s $OUT1/postprocess/segmenter.pt && -s $OUT1/postprocess/metrics.json ]] ||
  fail "no segmenter.pt or metrics.json in hospital 1's output folder"
masks=$(find "$OUT1/masks" -maxdepth 1 -name '*.png' | wc -l)
((masks == NEW_IMAGES)) || fail "$masks masks for $NEW_IMAGES new images"
[[ -z $(ls -A "$WORK/docker/outputs/hospital_2") ]] || fail "hospital 2's output folder was written"
echo "hospital 1: segmenter.pt, metrics.json, $masks masks; hospital 2's folder untouched"

phase "docker compose down"
compose --profile posttrain down -v --remove-orphans
label=label=com.docker.compose.project=$COMPOSE_PROJECT_NAME
left=$("$DOCKER" ps -aq --filter "$label")$("$DOCKER" volume ls -q --filter "$label")
left+=$("$DOCKER" network ls -q --filter "$label")
[[ -z $left ]] || fail "left behind: $left"
echo "no container, volume or network of $COMPOSE_PROJECT_NAME left"

printf '\nPASSED in %ds\n' "$SECONDS"
