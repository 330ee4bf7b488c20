"""A model store in an S3-compatible bucket: ``s3://bucket/prefix`` holds ``<prefix>/<model>/<version>/...``.

This is the layout the production overlay's ``storageUri`` (``s3://.../<model>/``) points KServe's storage
initializer at: it downloads every object under that prefix into ``/mnt/models`` when a pod starts, where TF
Serving and the transformer read ``<version>/`` folders.

A bucket has no rename, so a version cannot appear in one step as it does in a folder. Instead each reader
has a marker it will not do without, and :meth:`BucketStore.publish` puts a version's markers last:

* TF Serving loads a version only once its ``saved_model.pb`` is there: it is put after every other file
  of the SavedModel (``variables/``, ``fingerprint.pb``);
* the transformer takes a version only with its bundle's ``manifest.json``, which lists every other file's
  sha256: it is put last of all.

So a copy that stops half-way (an error, a killed pod) leaves objects that no reader takes for a version, and
its number stays used (:meth:`numbers`), so the next run publishes the next one. On an error the objects put
so far are deleted too. A retired version is copied to ``<prefix>/.retired/<model>/<version>-<time>/``, outside
the model's prefix (nothing downloads it), then deleted markers first.

Credentials and endpoint: boto3's own (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``),
the variables KServe's storage initializer reads too.
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

from model.publish import PublishError
from model.store import S3_SCHEME, StoreError
from transformer.store.bundle import BUNDLE_SUBDIR, MANIFEST_FILE
from transformer.store.interface import INTERFACE_FILE, Interface, interface_text, parse_interface

SAVED_MODEL = "saved_model.pb"
MANIFEST = str(PurePosixPath(*BUNDLE_SUBDIR.parts) / MANIFEST_FILE)  # inside a version folder
RETIRED = ".retired"


def marker_rank(relative: str) -> int:
    """Where a file of a version folder goes in the upload order: everything, then TF Serving's marker, then the
    transformer's."""
    return {SAVED_MODEL: 1, MANIFEST: 2}.get(relative, 0)


def upload_order(folder: Path) -> list[str]:
    """A version folder's files (relative POSIX paths), markers last."""
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    return sorted(files, key=lambda f: (marker_rank(f), f))


def complete(files: set[str]) -> bool:
    """Whether a version's files (relative paths) are whole for every reader: TF Serving's marker, and the
    transformer's wherever the version has a bundle at all."""
    bundle = str(PurePosixPath(*BUNDLE_SUBDIR.parts)) + "/"
    has_bundle = any(f.startswith(bundle) for f in files)
    return SAVED_MODEL in files and (MANIFEST in files or not has_bundle)


class BucketStore:
    """The store at ``s3://bucket/prefix``; ``client``: a boto3 S3 client (made from the environment if None)."""

    def __init__(self, location: str, endpoint: str | None = None, client=None):
        if not location.startswith(S3_SCHEME) or not location[len(S3_SCHEME):].split("/", 1)[0]:
            raise StoreError(f"{location!r} is not an S3 location: write s3://BUCKET/PREFIX")
        self.location = location.rstrip("/")
        bucket, _, prefix = location[len(S3_SCHEME):].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = endpoint
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint)
        return self._client

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def under(self, *parts: str) -> str:
        """The key prefix of everything under that "folder" ("" for the bucket's root)."""
        key = self.key(*parts)
        return key + "/" if key else ""

    def _call(self, what: str, fn, **kwargs):
        """One S3 call; a failure becomes a StoreError naming the location, the call and the endpoint."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (Boto3Error, BotoCoreError, ClientError) as exc:
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise StoreError(f"{self.location}{where}: {what} failed ({exc}); check the bucket, the credentials "
                             "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the endpoint (AWS_ENDPOINT_URL)") from exc

    def _pages(self, prefix: str, delimiter: str | None = None):
        token = None
        while True:
            kwargs = {"Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {}),
                      **({"ContinuationToken": token} if token else {})}
            page = self._call(f"listing {prefix!r}", self.client.list_objects_v2, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _keys(self, prefix: str) -> list[str]:
        return [o["Key"] for page in self._pages(prefix) for o in page.get("Contents", [])]

    def _folders(self, prefix: str) -> list[str]:
        """The names of the "folders" right under ``prefix`` (which ends with /)."""
        return [p["Prefix"][len(prefix):].rstrip("/") for page in self._pages(prefix, "/")
                for p in page.get("CommonPrefixes", [])]

    # -- reading --------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(f for f in self._folders(self.under()) if not f.startswith("."))

    def holds_model(self, name: str) -> bool:
        return bool(self._call("listing", self.client.list_objects_v2, Prefix=self.under(name),
                               MaxKeys=1).get("KeyCount"))

    def numbers(self, name: str) -> list[int]:
        found = self.numbers_in_place(name)
        retired = [f.split("-")[0] for f in self._folders(self.under(RETIRED, name))]
        return sorted(found + [int(v) for v in retired if v.isdigit()])

    def files(self, name: str, version: int) -> set[str]:
        prefix = self.under(name, str(version))
        return {k[len(prefix):] for k in self._keys(prefix)}

    def numbers_in_place(self, name: str) -> list[int]:
        """The version numbers under the model's prefix, complete or not."""
        return sorted(int(f) for f in self._folders(self.under(name)) if f.isdigit())

    def versions(self, name: str) -> list[int]:
        return [v for v in self.numbers_in_place(name) if complete(self.files(name, v))]

    def interface(self, name: str) -> Interface | None:
        key = self.key(name, INTERFACE_FILE)
        if not self._call("listing", self.client.list_objects_v2, Prefix=key, MaxKeys=1).get("KeyCount"):
            return None
        body = self._call(f"reading {key}", self.client.get_object, Key=key)["Body"].read()
        return parse_interface(body.decode("utf-8", "replace"), f"{S3_SCHEME}{self.bucket}/{key}")

    def fetch(self, name: str, version: int, into: Path) -> Path:
        target = Path(into) / name / str(version)
        for relative in sorted(self.files(name, version)):
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            self._call(f"downloading {relative} of version {version}", self.client.download_file,
                       Key=self.key(name, str(version), relative), Filename=str(path))
        return target

    # -- writing --------------------------------------------------------------------------------------------

    def publish(self, folders: dict[str, Path], version: int, on_put=None) -> list[str]:
        """Upload each ``{model name: version folder}`` as ``version``: the fused folders first, the embedder's
        last, each folder's markers after its other files (module docstring). ``on_put(key)`` is called after
        each object (a progress hook)."""
        taken = [f"{self.location}/{name}/{version}" for name in folders if self.files(name, version)]
        if taken:
            raise PublishError(f"version {version} exists already in the store ({', '.join(taken)}): versions are "
                               "never overwritten; train again to get the next free number")
        put: list[str] = []
        try:
            for name in sorted(folders, key=lambda n: not n.endswith("-fused")):
                for relative in upload_order(Path(folders[name])):
                    key = self.key(name, str(version), relative)
                    self._call(f"uploading {relative} of version {version}", self.client.upload_file,
                               Key=key, Filename=str(Path(folders[name]) / relative))
                    put.append(key)
                    if on_put is not None:
                        on_put(key)
        except BaseException as exc:
            # What was put is taken back, markers first (a reader never sees a marker without its files).
            for key in sorted(put, key=lambda k: -marker_rank(k.split(f"/{version}/", 1)[-1])):
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=key)
                except Exception:  # noqa: BLE001  (best effort: what stays has no marker, so no reader takes it)
                    pass
            if isinstance(exc, StoreError):
                raise PublishError(f"version {version} was not published: {exc}") from exc
            raise
        return [f"{self.location}/{name}/{version}" for name in folders]

    def record_interface(self, name: str, interface: Interface) -> None:
        # One PUT replaces an object whole: a reader (the storage initializer) gets the old text or the new.
        self._call(f"writing {INTERFACE_FILE}", self.client.put_object, Key=self.key(name, INTERFACE_FILE),
                   Body=interface_text(interface).encode(), ContentType="application/json")

    def retire(self, names: list[str], version: int) -> list[str]:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for name in names:
            files = self.files(name, version)
            if not files:
                continue
            target = self.key(RETIRED, name, f"{version}-{stamp}")
            for relative in files:
                self._call(f"copying {relative} of version {version}", self.client.copy_object,
                           Key=f"{target}/{relative}",
                           CopySource={"Bucket": self.bucket, "Key": self.key(name, str(version), relative)})
            for relative in sorted(files, key=lambda f: (-marker_rank(f), f)):
                self._call(f"deleting {relative} of version {version}", self.client.delete_object,
                           Key=self.key(name, str(version), relative))
            moved.append(f"{S3_SCHEME}{self.bucket}/{target}")
        return moved


def download_object(uri: str, target: Path, endpoint: str | None = None) -> Path:
    """One object, ``s3://bucket/key``, downloaded to ``target``. Raises StoreError (the message says why)."""
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not key:
        raise StoreError(f"{uri!r} names no object: write s3://BUCKET/KEY")
    store = BucketStore(f"{S3_SCHEME}{bucket}", endpoint)
    store._call(f"downloading {key}", store.client.download_file, Key=key, Filename=str(target))
    return Path(target)
