"""A real S3 server on loopback for the tests: MinIO, built from its Go module, started with a folder of its own.

    python -m tests.objectstore            # build it (a few minutes the first time, seconds after)

The production overlay reads its models from an S3 bucket and the retraining pipeline publishes there; these
tests put versions into MinIO through the same client code (boto3) and read them back with KServe's own
storage initializer. Built from ``github.com/minio/minio`` at the pseudo-version pinned in
``scripts/versions.env`` (``TEST_MINIO``), into ``build/objectstore/bin``; nothing of it is kept in the repository.
Skipped, with the reason, where Go is missing (like the control plane, ``tests/controlplane/build.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.controlplane.build import BuildUnavailable, go_env, go_version, run_go
from tests.controlplane.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "build" / "objectstore"
BIN = HOME / "bin"
MODULE = "github.com/minio/minio"


def pinned() -> str:
    values = dict(line.split("=", 1) for line in (ROOT / "scripts" / "versions.env").read_text().splitlines()
                  if "=" in line and not line.lstrip().startswith("#"))
    return values["TEST_MINIO"]


def build(say=print) -> Path:
    """The MinIO binary, built once per pinned version and Go; raises BuildUnavailable with the reason."""
    version = pinned()
    stamp = {"minio": version, "go": go_version()}
    binary = BIN / "minio"
    try:
        if json.loads((BIN / "versions.json").read_text()) == stamp and binary.exists():
            return binary
    except (OSError, ValueError):
        pass
    BIN.mkdir(parents=True, exist_ok=True)
    (BIN / "versions.json").unlink(missing_ok=True)
    say(f"building MinIO {version} into {BIN} (log: {HOME / 'build.log'}; about 5 minutes on 2 cores the first time)")
    started = time.monotonic()
    with open(HOME / "build.log", "w") as log:
        # go install's GOBIN is go_env()'s (the control plane's bin/): install into ours instead.
        env_bin = {**go_env(), "GOBIN": str(BIN)}
        log.write(f"$ GOBIN={BIN} go install -trimpath -ldflags=-s {MODULE}@{version}\n")
        log.flush()
        done = subprocess.run(["go", "install", "-trimpath", "-ldflags=-s", f"{MODULE}@{version}"], cwd=ROOT,
                              env=env_bin, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise BuildUnavailable(f"building MinIO failed (exit {done.returncode}): see {log.name}")
    (BIN / "versions.json").write_text(json.dumps(stamp) + "\n")
    say(f"MinIO built in {time.monotonic() - started:.0f}s")
    return binary


class ObjectStore:
    """MinIO on a free loopback port over a temporary folder, with a user of its own; ``env()`` is what a client
    needs (boto3's variables, which KServe's storage initializer reads too)."""

    def __init__(self, binary: Path, log_dir: Path | None = None):
        self.binary = binary
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="minio-"))
        self.log_dir = log_dir or self.data
        self.user, self.password = "embedder", uuid.uuid4().hex
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.user, "AWS_SECRET_ACCESS_KEY": self.password,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", "S3_USE_HTTPS": "0",
                "S3_VERIFY_SSL": "0"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.user,
                            aws_secret_access_key=self.password, region_name="us-east-1")

    def __enter__(self) -> "ObjectStore":
        env = {**os.environ, "MINIO_ROOT_USER": self.user, "MINIO_ROOT_PASSWORD": self.password,
               "MINIO_UPDATE": "off", "MINIO_BROWSER": "off", "MINIO_CI_CD": "1"}
        self.log = open(self.log_dir / "minio.log", "w")
        self.process = subprocess.Popen(
            [str(self.binary), "server", "--quiet", "--address", f"127.0.0.1:{self.port}",
             "--console-address", f"127.0.0.1:{free_port()}", str(self.data / "disk")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        import httpx

        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"MinIO exited with {self.process.returncode}: see {self.log.name}")
            try:
                if httpx.get(f"{self.endpoint}/minio/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"MinIO did not turn ready within 60s: see {self.log.name}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m tests.objectstore", description=__doc__.split("\n\n")[0],
                            epilog="Version: scripts/versions.env (TEST_MINIO). Log: build/objectstore/build.log."
                            ).parse_args(argv)
    try:
        print(f"ready: {build()}")
    except BuildUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
