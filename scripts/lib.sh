# Shared helpers for the cluster scripts (sourced, not run).
# shellcheck shell=bash
# shellcheck source=scripts/versions.env
source "$(dirname "${BASH_SOURCE[0]}")/versions.env"

# need COMMAND HOW-TO-INSTALL: stop with a clear message when a prerequisite is missing.
need() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "error: '$1' is required but not installed. $2" >&2
    exit 1
  fi
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
