# Shared helpers for the scripts (sourced, not run).
# shellcheck shell=bash
# shellcheck source=scripts/versions.env
source "$(dirname "${BASH_SOURCE[0]}")/versions.env"

# answer_help SCRIPT ARGS...: with -h or --help first, print SCRIPT's header (the comment block after its shebang:
# usage, what it does, its environment variables) and exit 0, before the script does anything.
answer_help() {
  local script=$1
  shift
  case "${1:-}" in
    -h|--help)
      sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;/^shellcheck/d;p;};}' "$script"
      exit 0
      ;;
  esac
}

# no_arguments SCRIPT ARGS...: a script that takes no arguments refuses any, instead of ignoring them.
no_arguments() {
  local script=$1
  shift
  if [ $# -gt 0 ]; then
    echo "error: $(basename "$script") takes no arguments (got: $*); its settings are environment variables: see $(basename "$script") --help" >&2
    exit 2
  fi
}

# need COMMAND HOW-TO-INSTALL: stop with a clear message when a prerequisite is missing.
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "error: '$1' is required but not installed. $2" >&2
    exit 1
  fi
}

# open_store_to_image_user: the model store open to the images' user (uid 65532), which TF Serving's and the
# transformer's containers read it as, and which the retraining pipeline's tasks and the TFJob's chief write it as.
# They reach build/ through a hostPath volume, and hostPath ignores fsGroup, so the host's permissions are what
# they get:
# - read: every file of every version, and every folder on the way (a+rX). Under a umask of 077, model.train
#   writes 0600 files and 0700 folders, which the pods could not read.
# - write: the folders they add entries to (publish's staging copy and rename, retire's rename, the chief's
#   temporary folder, made in its --out, the claim's root): build/ itself, build/models, build/data and each model's
#   folder (a+rwx).
# Only what the host's user owns is changed: a folder the pipeline or the TFJob made is owned by uid 65532 already,
# and chmod of it would fail for anyone but root (and stop the caller's `set -e`).
open_store_to_image_user() {
  mkdir -p build/models build/data
  local me
  me=$(id -u)
  find build/models -user "$me" \( -type d -exec chmod a+rx {} + \) -o \( -type f -exec chmod a+r {} + \)
  for folder in build build/models build/data build/models/*/; do
    if [ -d "$folder" ] && [ -O "$folder" ]; then
      chmod a+rwx "$folder"
    fi
  done
  return 0
}

# The container engine kind runs on: docker, else podman.
container_engine() {
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
    echo podman
  else
    echo "error: no container engine answers: install and start Docker (https://docs.docker.com/get-docker/) or Podman" >&2
    exit 1
  fi
}

need_kind_tools() {
  need kind "Install it: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
  need kubectl "Install it: https://kubernetes.io/docs/tasks/tools/"
}

# check_tool_versions ENGINE: kind, kubectl and the container engine against the versions these scripts were
# tested with (versions.env). kubectl more than one minor version away from the node's Kubernetes is an error
# (kubectl's supported skew); another kind or an old engine is a warning.
check_tool_versions() {
  local kind_version node_minor kubectl_minor engine_version
  kind_version=$(kind version 2>/dev/null | awk '{print $2}')
  if [ "$kind_version" != "$KIND_VERSION" ]; then
    echo "warning: kind ${kind_version:-(unknown version)} here; these scripts are tested with kind $KIND_VERSION" >&2
    echo "  (the node image $KIND_NODE_IMAGE is given explicitly, so a newer kind's default node is not used)" >&2
  fi
  node_minor=$(echo "${KIND_NODE_IMAGE##*:v}" | cut -d. -f2)
  kubectl_minor=$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n 1)
  if [ -z "$kubectl_minor" ] || [ $((kubectl_minor - node_minor)) -gt 1 ] || [ $((node_minor - kubectl_minor)) -gt 1 ]; then
    echo "error: kubectl 1.${kubectl_minor:-?} is more than one minor version away from the cluster's Kubernetes" >&2
    echo "1.$node_minor ($KIND_NODE_IMAGE), more skew than kubectl supports. Install kubectl 1.$node_minor" >&2
    echo "(https://kubernetes.io/docs/tasks/tools/) and run this again." >&2
    exit 1
  fi
  case "$1" in
    docker) engine_version=$(docker version --format '{{.Server.Version}}' 2>/dev/null) ;;
    podman) engine_version=$(podman version --format '{{.Client.Version}}' 2>/dev/null) ;;
  esac
  local major=${engine_version%%.*}
  if [ -z "$major" ] || { [ "$1" = docker ] && [ "$major" -lt 20 ]; } || { [ "$1" = podman ] && [ "$major" -lt 4 ]; }; then
    echo "warning: $1 ${engine_version:-(unknown version)}: these scripts are tested with Docker 28-29 and Podman 4-5" >&2
  fi
}

# save_image ENGINE IMAGE ARCHIVE: the image as an archive kind can import. Docker 29's containerd image store
# keeps a multi-platform index whose other platforms have no content, and kind's import (`ctr images import
# --all-platforms --digests`, the same for `kind load docker-image` and `kind load image-archive`) then fails with
# "content digest not found" (kind#3795); saving only the node's platform is the fix kind documents (kind#4247).
# Docker before 28 has no --platform there and no such store. Podman keeps one platform per local image.
save_image() {
  if [ "$1" = docker ] && docker image save --help 2>/dev/null | grep -q -- '--platform'; then
    docker image save --platform "linux/$(node_arch)" -o "$3" "$2"
  elif [ "$1" = podman ]; then
    podman save --format docker-archive -o "$3" "$2"
  else
    "$1" save -o "$3" "$2"
  fi
}

# The kind node's architecture, as image platforms name it.
node_arch() {
  case "$(uname -m)" in
    arm64|aarch64) echo arm64 ;;
    *) echo amd64 ;;
  esac
}

# selinux_relabel: "true" when SELinux enforces here, so kind relabels the build/ mount for the node (without
# it the node cannot read the models: "permission denied" in the predictor's logs); "false" elsewhere.
selinux_relabel() {
  if command -v getenforce >/dev/null 2>&1 && [ "$(getenforce 2>/dev/null)" = Enforcing ]; then
    echo true
  else
    echo false
  fi
}

# The tensorflow/serving image is published for linux/amd64 only (tensorflow/serving#1948): on an
# arm64 host a kind node is arm64 and the predictor pod cannot pull or start it. Say so before
# anything is created; EMBEDDER_ALLOW_ARM64=1 goes on (for nodes that run amd64 images by emulation).
check_architecture() {
  case "$(uname -m)" in
    arm64|aarch64)
      if [ "${EMBEDDER_ALLOW_ARM64:-}" != 1 ]; then
        echo "error: this machine is $(uname -m), and TF Serving ($TF_SERVING_IMAGE:$TF_SERVING_VERSION) is published" >&2
        echo "for linux/amd64 only. On a kind cluster here the predictor pod would never start (\"no matching" >&2
        echo "manifest for linux/arm64\" or \"exec format error\"), so nothing has been created. What to do:" >&2
        echo "  - run the cluster path on an amd64 machine (a Linux VM or a CI runner) or a remote amd64 cluster;" >&2
        echo "    the local stack (./scripts/demo.sh) works here as it is;" >&2
        echo "  - or, if your kind node runs amd64 images by emulation (QEMU/binfmt set up in the node), set" >&2
        echo "    EMBEDDER_ALLOW_ARM64=1 and run this again (slow, and not supported by TF Serving)." >&2
        exit 1
      fi
      echo "warning: $(uname -m) host: TF Serving's amd64 image must run by emulation (EMBEDDER_ALLOW_ARM64=1)" >&2
      ;;
  esac
}

# retry TRIES DELAY WHAT COMMAND...: run COMMAND until it succeeds, at most TRIES times; then say
# what failed, with the command's last error, and return 1.
retry() {
  tries=$1
  delay=$2
  what=$3
  shift 3
  attempt=1
  while :; do
    if output=$("$@" 2>&1); then
      return 0
    fi
    if [ "$attempt" -ge "$tries" ]; then
      echo "error: $what failed after $tries tries. Last error:" >&2
      printf '%s\n' "$output" | tail -n 5 >&2
      return 1
    fi
    echo "   not yet: $(printf '%s' "$output" | tail -n 1 | cut -c1-120); retrying in ${delay}s ($attempt/$tries)"
    sleep "$delay"
    attempt=$((attempt + 1))
  done
}

# wait_for_namespace_deployments NAMESPACE TIMEOUT: every Deployment there rolled out.
wait_for_namespace_deployments() {
  for deployment in $(kubectl -n "$1" get deployments -o name); do
    kubectl -n "$1" rollout status "$deployment" --timeout="$2" || {
      echo "error: $deployment in namespace $1 did not become available; look at: kubectl -n $1 describe $deployment" >&2
      return 1
    }
  done
}

# webhooks_pending NAMESPACE: the webhook services in NAMESPACE without an injected CA bundle or a
# ready endpoint (prints nothing when every webhook there can admit requests).
webhooks_pending() {
  kubectl get validatingwebhookconfigurations,mutatingwebhookconfigurations -o \
    jsonpath="{range .items[*]}{range .webhooks[?(@.clientConfig.service.namespace==\"$1\")]}{.clientConfig.service.name}{' '}{.clientConfig.caBundle}{'\n'}{end}{end}" |
    while read -r service bundle; do
      [ -n "$service" ] || continue
      if [ -z "$bundle" ]; then
        echo "$service (no CA bundle yet)"
      elif [ -z "$(kubectl -n "$1" get endpoints "$service" -o jsonpath='{.subsets[*].addresses[*].ip}' 2>/dev/null)" ]; then
        echo "$service (no ready endpoint)"
      fi
    done | sort -u
}

# wait_for_webhooks NAMESPACE SECONDS: until webhooks_pending prints nothing, at most SECONDS.
wait_for_webhooks() {
  deadline=$(($(date +%s) + $2))
  while pending=$(webhooks_pending "$1") && [ -n "$pending" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "error: webhooks in namespace $1 not ready after $2s: $(echo "$pending" | tr '\n' ' ')" >&2
      echo "Look at: kubectl -n $1 get pods,endpoints; then run scripts/kind-up.sh again." >&2
      return 1
    fi
    echo "   waiting for webhooks: $(echo "$pending" | tr '\n' ' ')"
    sleep 5
  done
}

# The name a pod asks for: kubelet reads "NAME:TAG" as docker.io/library/NAME:TAG, while Podman tags a
# local build localhost/NAME:TAG. Building and loading under the full name makes the two agree.
qualified_image() {
  case "$1" in
    */*) echo "$1" ;;
    *) echo "docker.io/library/$1" ;;
  esac
}
