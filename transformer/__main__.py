"""Start the transformer: ``python -m transformer --model_name embedder --predictor_host HOST:PORT``.

Takes every flag of KServe's ModelServer (KServe's controller injects
``--model_name``, ``--predictor_host`` and ``--http_port``) plus the ones below.
"""

from __future__ import annotations

import argparse
import sys

from kserve import model_server

from transformer.bundle import BundleError
from transformer.kernels import UnsupportedEstimator
from transformer.predictor import RetryPolicy

DEFAULT_BUNDLE = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transformer",
        parents=[model_server.parser],
        description="KServe transformer: quantile-scales raw user features, calls the TF Serving "
                    "embedding model, assigns a segment and returns the best items.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ours = parser.add_argument_group("transformer")
    ours.add_argument("--bundle", default=DEFAULT_BUNDLE,
                      help="folder with manifest.json, scaler.joblib and segments.joblib")
    ours.add_argument("--predictor_timeout", type=float, default=5.0,
                      help="seconds to wait for TF Serving before answering 504")
    ours.add_argument("--predictor_retries", type=int, default=2,
                      help="extra tries when TF Serving cannot be reached or answers 503")
    ours.add_argument("--max_rows", type=int, default=1024, help="rows accepted in one request")
    parser.set_defaults(enable_grpc=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.predictor_host:
        parser.error("--predictor_host HOST:PORT is required (TF Serving's REST address)")
    if args.workers != 1:
        parser.error("--workers must be 1: KServe's multi-process mode loses the predictor "
                     "configuration; scale with replicas instead")
    if args.max_rows < 1 or args.predictor_timeout <= 0 or args.predictor_retries < 0:
        parser.error("--max_rows and --predictor_timeout must be positive, --predictor_retries >= 0")

    from transformer.model import EmbedderTransformer
    from transformer.server import serve

    model = EmbedderTransformer(
        args.model_name,
        args.bundle,
        predictor_host=args.predictor_host,
        predictor_timeout=args.predictor_timeout,
        retry=RetryPolicy(attempts=args.predictor_retries + 1),
        max_rows=args.max_rows,
    )
    try:
        model.load()
    except (BundleError, UnsupportedEstimator) as exc:
        print(f"error: cannot load the artifact bundle: {exc}", file=sys.stderr)
        return 2
    serve(model, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
