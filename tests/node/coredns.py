"""CoreDNS for the test node, built once from its Go module into ``build/node/bin/coredns``.

    python -m tests.node.coredns

``tests/node/coredns.go`` is CoreDNS's ``coremain`` with the five plugins the node's Corefile uses; its module
(``COREDNS`` in ``scripts/versions.env``) comes through the Go module proxy. A stamp records the version built.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.controlplane.build import GO_FLAGS, ROOT, BuildUnavailable, go_env, go_version

HOME = ROOT / "build" / "node"
BINARY = HOME / "bin" / "coredns"
SOURCE = Path(__file__).with_name("coredns.go")


def version() -> str:
    from scripts.localstack import pinned

    return pinned("TEST_COREDNS")


def build(say=print) -> Path:
    """The binary (built when missing or of another version). Raises BuildUnavailable."""
    stamp = {"coredns": version(), "go": go_version(), "source": SOURCE.read_text()}
    stamp_file = BINARY.with_suffix(".json")
    try:
        if BINARY.exists() and json.loads(stamp_file.read_text()) == stamp:
            return BINARY
    except (OSError, ValueError):
        pass
    began = time.monotonic()
    work = HOME / "coredns-src"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copyfile(SOURCE, work / "main.go")
    (work / "go.mod").write_text(f"module embedder.test/coredns\n\ngo 1.26\n\nrequire github.com/coredns/coredns "
                                 f"{version()}\n")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    with open(HOME / "coredns-build.log", "w") as log:
        for args in (["mod", "tidy"], ["build", *GO_FLAGS, "-o", str(BINARY), "."]):
            done = subprocess.run(["go", *args], cwd=work, env=go_env(), stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise BuildUnavailable(f"building CoreDNS {version()} failed at `go {' '.join(args)}`: see {log.name}")
    stamp_file.write_text(json.dumps(stamp))
    say(f"  built CoreDNS {version()} in {time.monotonic() - began:.0f}s")
    return BINARY


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m tests.node.coredns", description=__doc__.split("\n\n")[0],
                            epilog=f"Version: scripts/versions.env (TEST_COREDNS). Log: {HOME / 'coredns-build.log'}."
                            ).parse_args(argv)
    try:
        print(f"ready: {build()}")
    except BuildUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
