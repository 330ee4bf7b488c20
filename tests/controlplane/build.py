"""Build the control plane's programs from the Go module proxy, once, into ``build/controlplane/bin``.

    python -m tests.controlplane.build            # what it builds, and how long each step took

Every program comes from its own published Go module at the version pinned in ``scripts/versions.env``
(``CONTROL_PLANE_*``); nothing of theirs is kept in this repository. Two of them cannot be ``go install``-ed by
path@version, so each is built inside its downloaded module folder:

- ``k8s.io/kubernetes`` replaces its staging modules (``k8s.io/api``, ``apiserver``, ...) with ``./staging/...``
  folders that its module zip does not hold: it builds with an alternate go.mod (``-modfile``) whose replaces name
  the published ``k8s.io/*`` modules of the same release instead. etcd is built the same way, at the version
  Kubernetes' own go.mod requires, from ``go.etcd.io/etcd/server/v3`` (whose own replaces point at sibling
  folders, ignored when it is a dependency).
- ``github.com/kserve/kserve`` has replace directives of its own (controller-runtime, k8s.io/*, grpc), which apply
  only when it is the main module: ``cmd/manager`` builds inside its module folder.

A stamp (``bin/versions.json``) records what was built; a second run with the same versions and Go returns at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / "build" / "controlplane"
BIN = HOME / "bin"
PROGRAMS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl",
            "kwok", "kserve-manager")
# Both halves of the build use the same flags, so Go's build cache serves either from the other's packages.
GO_FLAGS = ["-trimpath", "-ldflags=-s"]


class BuildUnavailable(RuntimeError):
    """The control plane cannot be built on this machine (no Go toolchain, or a module the proxy does not serve)."""


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    kserve: str
    kwok: str

    @classmethod
    def pinned(cls) -> "Versions":
        values = dict(line.split("=", 1) for line in (ROOT / "scripts" / "versions.env").read_text().splitlines()
                      if "=" in line and not line.lstrip().startswith("#"))
        return cls(values["CONTROL_PLANE_KUBERNETES"], values["CONTROL_PLANE_KSERVE"], values["CONTROL_PLANE_KWOK"])

    @property
    def staging(self) -> str:
        """The ``k8s.io/*`` staging modules' version of a Kubernetes release: v1.35.4 -> v0.35.4."""
        return "v0." + self.kubernetes.removeprefix("v1.")


def go_env() -> dict[str, str]:
    """Go's environment for these builds: modules only (no workspace), go.mod files updated as needed, and
    ``go install`` writing into ``bin/``."""
    return {**os.environ, "GOWORK": "off", "GOFLAGS": "-mod=mod", "GOBIN": str(BIN)}


def go_version() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildUnavailable("no Go toolchain on PATH: install Go 1.25 or newer to build the control plane")
    return subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()


def module_dir(module: str, version: str, log) -> Path:
    """Download ``module@version`` through the Go module proxy; the folder it unpacked to (read-only)."""
    done = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"], capture_output=True, text=True,
                          env=go_env())
    try:
        info = json.loads(done.stdout or "{}")
    except ValueError:
        info = {}
    if done.returncode != 0 or "Dir" not in info:
        raise BuildUnavailable(f"the Go module proxy did not give {module}@{version}: "
                               f"{info.get('Error') or done.stderr.strip()[-300:]}")
    log.write(f"{module}@{version}: {info['Dir']}\n")
    return Path(info["Dir"])


def kubernetes_modfile(source: Path, versions: Versions) -> Path:
    """An alternate go.mod for ``k8s.io/kubernetes``: its staging replaces pointed at the published modules."""
    text, count = re.subn(r"=>\s*\./staging/src/(k8s\.io/[A-Za-z0-9_.-]+)", rf"=> \1 {versions.staging}",
                          (source / "go.mod").read_text())
    if count == 0:
        raise BuildUnavailable(f"{source}/go.mod has no ./staging replaces: not the layout this build knows")
    work = HOME / "src"
    work.mkdir(parents=True, exist_ok=True)
    modfile = work / f"kubernetes-{versions.kubernetes}.mod"
    modfile.write_text(text)
    # Go keeps the alternate go.mod's checksums beside it; the module's own go.sum covers most of them.
    sums = modfile.with_suffix(".sum")
    if not sums.exists():
        sums.write_bytes((source / "go.sum").read_bytes())
    return modfile


def required_version(modfile: Path, module: str) -> str:
    match = re.search(rf"^\s*{re.escape(module)}\s+(v\S+)", modfile.read_text(), re.MULTILINE)
    if not match:
        raise BuildUnavailable(f"{modfile} does not require {module}")
    return match.group(1)


def run_go(args: list[str], cwd: Path, log, what: str) -> None:
    log.write(f"\n$ (cd {cwd} && go {' '.join(args)})\n")
    log.flush()
    done = subprocess.run(["go", *args], cwd=cwd, env=go_env(), stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise BuildUnavailable(f"building {what} failed (exit {done.returncode}): see {log.name}")


def build_kubernetes(versions: Versions, log) -> tuple[Path, Path]:
    """kube-apiserver, kube-controller-manager, kube-scheduler, the node's kubelet and kube-proxy, and the kubectl
    of the same release (the tests' kubectl, within its supported skew); (the module folder, the alternate go.mod)."""
    source = module_dir("k8s.io/kubernetes", versions.kubernetes, log)
    modfile = kubernetes_modfile(source, versions)
    run_go(["build", f"-modfile={modfile}", "-trimpath", f"-ldflags=-s {kubernetes_version_flags(versions)}",
            "-o", f"{BIN}/", "./cmd/kube-apiserver",
            "./cmd/kube-controller-manager", "./cmd/kube-scheduler", "./cmd/kubelet", "./cmd/kube-proxy",
            "./cmd/kubectl"],
           source, log, "Kubernetes")
    return source, modfile


def kubernetes_version_flags(versions: Versions) -> str:
    """The linker flags Kubernetes' own build (hack/lib/version.sh) sets, so that each program reports its release:
    without them kubectl, the API server and the kubelet say v0.0.0-master, and kubectl's skew rules cannot apply."""
    major, minor = versions.kubernetes.removeprefix("v").split(".")[:2]
    values = {"gitVersion": versions.kubernetes, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    return " ".join(f"-X {package}.{key}={value}" for package in ("k8s.io/component-base/version",
                                                                   "k8s.io/client-go/pkg/version")
                    for key, value in values.items())


def build_etcd(source: Path, modfile: Path, log) -> str:
    """etcd at the version Kubernetes' go.mod requires, in Kubernetes' module graph; that version."""
    version = required_version(modfile, "go.etcd.io/etcd/server/v3")
    run_go(["build", f"-modfile={modfile}", *GO_FLAGS, "-o", str(BIN / "etcd"), "go.etcd.io/etcd/server/v3"],
           source, log, f"etcd {version}")
    return version


def build_kwok(versions: Versions, log) -> None:
    run_go(["install", *GO_FLAGS, f"sigs.k8s.io/kwok/cmd/kwok@{versions.kwok}"], ROOT, log, "KWOK")


def build_kserve(versions: Versions, log) -> None:
    source = module_dir("github.com/kserve/kserve", versions.kserve, log)
    run_go(["build", *GO_FLAGS, "-o", str(BIN / "kserve-manager"), "./cmd/manager"], source, log,
           "KServe's controller manager")


# Raised when what is built changes without a version changing (2: Kubernetes' programs carry their release).
BUILD_RECIPE = 2


def stamp(versions: Versions) -> dict:
    return {"kubernetes": versions.kubernetes, "kserve": versions.kserve, "kwok": versions.kwok, "go": go_version(),
            "recipe": BUILD_RECIPE}


def built(versions: Versions | None = None) -> bool:
    """Whether ``bin/`` holds every program, built from these versions with this Go."""
    versions = versions or Versions.pinned()
    try:
        recorded = json.loads((BIN / "versions.json").read_text())
    except (OSError, ValueError):
        return False
    return recorded == stamp(versions) and all((BIN / p).exists() for p in PROGRAMS)


def build(versions: Versions | None = None, say=print) -> Path:
    """Build what is missing; ``bin/``. Raises BuildUnavailable with the reason when it cannot."""
    versions = versions or Versions.pinned()
    if built(versions):
        return BIN
    BIN.mkdir(parents=True, exist_ok=True)
    (BIN / "versions.json").unlink(missing_ok=True)
    log_path = HOME / "build.log"
    say(f"building the control plane with {go_version()} into {BIN} (log: {log_path}; 15-25 minutes on 2 cores "
        f"the first time, seconds once Go's caches hold it)")
    started = time.monotonic()
    with open(log_path, "w") as log:
        def step(what, work):
            began = time.monotonic()
            result = work()
            say(f"  built {what} in {time.monotonic() - began:.0f}s")
            return result

        source, modfile = step(f"Kubernetes {versions.kubernetes} (kube-apiserver, kube-controller-manager, "
                               f"kube-scheduler, kubelet, kube-proxy, kubectl)", lambda: build_kubernetes(versions, log))
        step(f"etcd {required_version(modfile, 'go.etcd.io/etcd/server/v3')}", lambda: build_etcd(source, modfile, log))
        step(f"KWOK {versions.kwok}", lambda: build_kwok(versions, log))
        step(f"KServe {versions.kserve}'s controller manager", lambda: build_kserve(versions, log))
    (BIN / "versions.json").write_text(json.dumps(stamp(versions), indent=1) + "\n")
    say(f"control plane built in {time.monotonic() - started:.0f}s")
    return BIN


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m tests.controlplane.build", description=__doc__.split("\n\n")[0],
                            epilog="Versions: scripts/versions.env (CONTROL_PLANE_*). Log: build/controlplane/build.log."
                            ).parse_args(argv)
    try:
        build()
    except BuildUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ready: {', '.join(PROGRAMS)} in {BIN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
