"""The images the real node runs, built here without a registry, as ``scripts/deploy.sh`` builds them for kind.

    python -m tests.node.images        # build what is missing into build/node/ and say how long each took

* **The base**, in the role of ``python:3.11-slim-bookworm`` (no registry image can be pulled here): Debian
  bookworm from Debian's own packages (``debootstrap``, from the mirror this machine's apt uses), with Python 3.11 as
  a virtual environment at ``/usr/local`` (so ``python`` and ``pip`` are where the official image has them, and
  ``pip install --prefix=/install`` lands in ``/usr/local``'s site-packages once copied there) and this machine's
  CA bundle, then imported as ``localhost/embedder-base:bookworm``.
* **The project's images**, from its own Dockerfiles through their ``BASE_IMAGE`` argument, by Debian's podman
  (buildah underneath): the transformer (``transformer/Dockerfile``) and the training image (``model/Dockerfile``),
  under the names the manifests ask for (``docker.io/library/kserve-embedder-*:dev``).
* **TF Serving's place**: no TF Serving image or binary exists here, so the predictor runs the stand-in
  (``python -m model.standin``) from the training image, as ``/usr/bin/tensorflow_model_server`` under the image
  name KServe's runtime asks for (``tensorflow/serving:<runtimeVersion>``), started by the runtime's own command
  and arguments. Every report that uses it says so.
* **The pod sandbox** (``pause``): Kubernetes' own ``build/pause/linux/pause.c`` from its module, compiled here.

podman keeps its store in ``build/node/podman``, so a rebuild reuses its layers: the project's code changes only the
last layers of each image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.controlplane.build import ROOT, Versions, module_dir

HOME = ROOT / "build" / "node"
BASE = "localhost/embedder-base:bookworm"
PAUSE = "localhost/embedder-pause:3.10"


def pinned(name: str) -> str:
    from scripts.localstack import pinned as read

    return read(name)


def qualified(image: str) -> str:
    """The full name a pod's image reference means: kserve-embedder-transformer:dev ->
    docker.io/library/kserve-embedder-transformer:dev (as ``scripts/lib.sh qualified_image``)."""
    first = image.split("/", 1)[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{image}"
    return image


def transformer_image() -> str:
    return qualified(pinned("TRANSFORMER_IMAGE"))


def training_image() -> str:
    return qualified(pinned("TRAINING_IMAGE"))


def tf_serving_image() -> str:
    """The image KServe's TF Serving runtime asks for with the manifests' runtimeVersion: the stand-in's, here."""
    return qualified(f"{pinned('TF_SERVING_IMAGE')}:{pinned('TF_SERVING_VERSION')}")


class ImagesUnavailable(RuntimeError):
    """The images cannot be built on this machine; the message says what is missing."""


def podman_command() -> list[str]:
    """Debian's podman with its store under build/node (nothing in /var/lib/containers) and no systemd; its run
    state in a temporary folder of this store's own (two clones, two stores, never one run state)."""
    key = hashlib.sha256(str(HOME.resolve()).encode()).hexdigest()[:12]
    runroot = Path(tempfile.gettempdir()) / f"embedder-podman-{os.getuid()}-{key}"
    return ["podman", "--root", str(HOME / "podman"), "--runroot", str(runroot), "--cgroup-manager", "cgroupfs",
            "--events-backend", "file"]


def podman(*args: str, check: bool = True, log=None, timeout: float = 3600) -> subprocess.CompletedProcess:
    command = [*podman_command(), *args]
    if log is not None:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    else:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        where = f"see {log.name}" if log is not None else (done.stderr or "")[-800:]
        raise ImagesUnavailable(f"podman {' '.join(args[:2])} failed (exit {done.returncode}): {where}")
    return done


def image_id(name: str) -> str | None:
    done = podman("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None


def debian_mirror() -> str:
    """The Debian mirror this machine's apt reads (the deb822 ``URIs:`` or a ``deb`` line), for debootstrap."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)(?:\s+(\S+))?", text, re.MULTILINE):
            uri = match.group(1)
            if "security" not in uri and not path.name.endswith(".disabled-by-farm") and "debian" in uri:
                return uri
    raise ImagesUnavailable("no Debian mirror in /etc/apt/sources.list{,.d}: debootstrap needs one")


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "debootstrap", "gcc") if shutil.which(tool) is None]


def build_base(log) -> None:
    """Debian bookworm with Python 3.11 as the official Python image lays it out (module docstring)."""
    rootfs = HOME / "base-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    done = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                           "bookworm", str(rootfs), debian_mirror()], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise ImagesUnavailable(f"debootstrap failed (exit {done.returncode}): see {log.name}")
    subprocess.run(["chroot", str(rootfs), "python3", "-m", "venv", "/usr/local"], check=True, stdout=log,
                   stderr=subprocess.STDOUT)
    # This machine's trust: what lets pip inside a build reach the package index as the machine does.
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    for trimmed in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        shutil.rmtree(rootfs / trimmed, ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        [*podman_command(), "import", "--change", "ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--change", 'CMD ["python3"]', "-", BASE], stdin=tar.stdout, stdout=log, stderr=subprocess.STDOUT)
    tar.wait()
    if imported.returncode != 0 or tar.returncode != 0:
        raise ImagesUnavailable(f"importing the base image failed: see {log.name}")
    shutil.rmtree(rootfs, ignore_errors=True)


def build_pause(log) -> None:
    """Kubernetes' pause program, built from its module's C source, as a one-file image."""
    source = module_dir("k8s.io/kubernetes", Versions.pinned().kubernetes, log) / "build" / "pause" / "linux"
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "pause"
        done = subprocess.run(["gcc", "-Os", "-static", "-o", str(binary), str(source / "pause.c")], stdout=log,
                              stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise ImagesUnavailable(f"compiling {source / 'pause.c'} failed (a static libc is in libc6-dev): "
                                    f"see {log.name}")
        subprocess.run(["strip", str(binary)], check=False)
        archive = Path(folder) / "pause.tar"
        subprocess.run(["tar", "-C", folder, "-cf", str(archive), "pause"], check=True)
        podman("import", "--change", 'ENTRYPOINT ["/pause"]', str(archive), PAUSE, log=log)


STANDIN_DOCKERFILE = """\
# TF Serving's place on the test node: the stand-in, started by KServe's TF Serving runtime's own command.
ARG TRAINING_IMAGE
FROM ${TRAINING_IMAGE}
USER 0
# TF Serving listens on every address; the stand-in's default is loopback, so the pod's command line says so first.
RUN printf '#!/bin/sh\\nexec python -m model.standin --rest_api_host=0.0.0.0 "$@"\\n' \\
        > /usr/bin/tensorflow_model_server && chmod 0755 /usr/bin/tensorflow_model_server
USER 65532:65532
ENTRYPOINT ["/usr/bin/tensorflow_model_server"]
"""


def build_project_images(log, say) -> None:
    common = ["build", "--pull=never", "--network=host", "--ulimit", "nofile=20000:20000", "--ulimit",
              "nproc=4096:4096", "--build-arg", f"BASE_IMAGE={BASE}"]

    def step(what, work):
        began = time.monotonic()
        work()
        say(f"  built {what} in {time.monotonic() - began:.0f}s")

    step(f"{transformer_image()} (transformer/Dockerfile)",
         lambda: podman(*common, "-f", "transformer/Dockerfile", "-t", transformer_image(), str(ROOT), log=log))
    step(f"{training_image()} (model/Dockerfile)",
         lambda: podman(*common, "-f", "model/Dockerfile", "-t", training_image(), str(ROOT), log=log))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "Dockerfile").write_text(STANDIN_DOCKERFILE)
        step(f"{tf_serving_image()} (the stand-in in TF Serving's place)",
             lambda: podman("build", "--pull=never", "--build-arg", f"TRAINING_IMAGE={training_image()}", "-t",
                            tf_serving_image(), folder, log=log))


def build(say=print) -> dict[str, str]:
    """Build what is missing (the base and pause once; the project's images every time, from podman's layer
    cache when unchanged); ``{image name: image id}``. Raises ImagesUnavailable with the reason."""
    missing = missing_tools()
    if missing:
        raise ImagesUnavailable(f"{', '.join(missing)} not installed (Debian: apt-get install podman debootstrap "
                                "gcc libc6-dev)")
    HOME.mkdir(parents=True, exist_ok=True)
    log_path = HOME / "images.log"
    with open(log_path, "a") as log:
        for name, make, what in ((BASE, build_base, "the base image (debootstrap bookworm)"),
                                 (PAUSE, build_pause, "the pause image (Kubernetes' pause.c)")):
            if image_id(name) is None:
                began = time.monotonic()
                make(log)
                say(f"  built {what} in {time.monotonic() - began:.0f}s")
        build_project_images(log, say)
    return {name: image_id(name) for name in (transformer_image(), training_image(), tf_serving_image(), PAUSE)}


def save(name: str, archive: Path) -> Path:
    """The image as the archive ``ctr images import`` (what ``kind load`` runs) takes."""
    archive.unlink(missing_ok=True)
    podman("save", "--format", "docker-archive", "-o", str(archive), name)
    return archive


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m tests.node.images", description=__doc__.split("\n\n")[0],
                            epilog=f"Log: {HOME / 'images.log'}.").parse_args(argv)
    try:
        images = build()
    except ImagesUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, ident in images.items():
        print(f"{name}  {ident[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
