"""The transformer a KServe user would write instead, the way KServe's documentation and its
``custom_transformer`` sample show it: a ``kserve.Model`` whose ``preprocess`` calls the fitted
scikit-learn ``QuantileTransformer``, whose ``predict`` is KServe's own (its REST client, v1 protocol, to
TF Serving's ``serving_default``: the embedding and every item's score) and whose ``postprocess`` calls
``KMeans.predict`` and sorts the scores. Served by ``kserve.ModelServer`` with its defaults.

It is a benchmark anchor, not part of the product: it loads the bundle's joblib files (which the transformer
never does), validates nothing and answers KServe's way. The same answers as the transformer for valid rows.

    python -m scripts.anchors.plain_transformer --model_name embedder --predictor_host 127.0.0.1:8501 \
        --bundle build/models/embedder/1/assets.extra/transformer-bundle --http_port 8095 --grpc_port 8096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import joblib
import kserve
import numpy as np
from kserve import model_server


class PlainTransformer(kserve.Model):
    def __init__(self, name: str, bundle: Path):
        super().__init__(name)
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.features = [feature["name"] for feature in manifest["features"]]
        self.scaler = joblib.load(bundle / "scaler.joblib")
        self.segments = joblib.load(bundle / "segments.joblib")
        self.min_score, self.top_k = manifest["rules"]["min_score"], manifest["rules"]["top_k"]
        self.ready = True

    def preprocess(self, payload, headers=None):
        rows = [[row[f] for f in self.features] if isinstance(row, dict) else row for row in payload["instances"]]
        scaled = self.scaler.transform(np.asarray(rows, dtype=np.float64)).astype(np.float32)
        return {"instances": scaled.tolist()}

    def postprocess(self, response, headers=None):
        predictions = response["predictions"]
        embeddings = np.asarray([p["embedding"] for p in predictions], dtype=np.float64)
        scores = np.asarray([p["scores"] for p in predictions], dtype=np.float32)
        labels = self.segments.predict(embeddings)
        answers = []
        for label, embedding, row in zip(labels, embeddings, scores):
            best = np.argsort(-row, kind="stable")[: self.top_k]
            answers.append({"segment": int(label),
                            "segment_distance": float(np.linalg.norm(embedding - self.segments.cluster_centers_[label])),
                            "items": [{"id": int(i), "score": float(row[i])} for i in best if row[i] >= self.min_score]})
        return {"predictions": answers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the version's transformer-bundle folder")
    args, _ = parser.parse_known_args(argv)
    model = PlainTransformer(args.model_name, args.bundle)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=False).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
