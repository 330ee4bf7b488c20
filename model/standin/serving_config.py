"""TF Serving's ``--model_config_file``: a text-format ``ModelServerConfig``, read like TF Serving reads it.

Only what the stand-in uses is described here (model name, base path, platform, version
policy), with the field numbers of TF Serving's ``config/model_server_config.proto`` and
``sources/storage_path/file_system_storage_path_source.proto``; other fields are skipped.
The messages are built at run time, so nothing is generated or vendored::

    model_config_list {
      config {
        name: "embedder"
        base_path: "/mnt/models"
        model_platform: "tensorflow"
        model_version_policy { latest { num_versions: 2 } }   # or all {}, or specific { versions: 3 }
      }
    }
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

_F = descriptor_pb2.FieldDescriptorProto


def _message(name: str, fields: list[tuple], nested: list | None = None, oneofs: list[str] | None = None):
    proto = descriptor_pb2.DescriptorProto(name=name)
    for oneof in oneofs or []:
        proto.oneof_decl.add(name=oneof)
    for field_name, number, kind, label, type_name, oneof_index in fields:
        field = proto.field.add(name=field_name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
        if oneof_index is not None:
            field.oneof_index = oneof_index
    proto.nested_type.extend(nested or [])
    return proto


def _build_classes():
    optional, repeated = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    policy = ".tensorflow.serving.ServableVersionPolicy"
    file = descriptor_pb2.FileDescriptorProto(name="embedder_standin/model_server_config.proto",
                                              package="tensorflow.serving", syntax="proto3")
    file.message_type.extend([
        _message("ServableVersionPolicy", [
            ("latest", 100, _F.TYPE_MESSAGE, optional, f"{policy}.Latest", 0),
            ("all", 101, _F.TYPE_MESSAGE, optional, f"{policy}.All", 0),
            ("specific", 102, _F.TYPE_MESSAGE, optional, f"{policy}.Specific", 0),
        ], nested=[
            _message("Latest", [("num_versions", 1, _F.TYPE_UINT32, optional, None, None)]),
            _message("All", []),
            _message("Specific", [("versions", 1, _F.TYPE_INT64, repeated, None, None)]),
        ], oneofs=["policy_choice"]),
        _message("ModelConfig", [
            ("name", 1, _F.TYPE_STRING, optional, None, None),
            ("base_path", 2, _F.TYPE_STRING, optional, None, None),
            ("model_platform", 4, _F.TYPE_STRING, optional, None, None),
            ("model_version_policy", 7, _F.TYPE_MESSAGE, optional, policy, None),
        ]),
        _message("ModelConfigList", [
            ("config", 1, _F.TYPE_MESSAGE, repeated, ".tensorflow.serving.ModelConfig", None),
        ]),
        _message("ModelServerConfig", [
            ("model_config_list", 1, _F.TYPE_MESSAGE, optional, ".tensorflow.serving.ModelConfigList", None),
        ]),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.ModelServerConfig"))


_ModelServerConfig = _build_classes()


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: the ``latest`` N (TF Serving's default, N=1), ``all``, or
    ``specific`` numbers."""

    kind: str = "latest"
    num_versions: int = 1
    versions: frozenset[int] = frozenset()

    def aspired(self, on_disk: list[int]) -> list[int]:
        """The versions to serve among those on disk (sorted, oldest first)."""
        if self.kind == "all":
            return sorted(on_disk)
        if self.kind == "specific":
            return sorted(v for v in on_disk if v in self.versions)
        return sorted(on_disk)[-self.num_versions:]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: Path
    policy: VersionPolicy


class ConfigError(ValueError):
    """The config file is not a ModelServerConfig this server can serve."""


def parse_model_config(text: str, source: str = "<config>") -> list[ModelConfig]:
    config = _ModelServerConfig()
    try:
        text_format.Parse(text, config, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ConfigError(f"Invalid protobuf file: '{source}' ({exc})") from None
    models = []
    for entry in config.model_config_list.config:
        if entry.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{source}: model {entry.name!r} has platform {entry.model_platform!r}; "
                              "this server serves TensorFlow SavedModels only")
        which = entry.model_version_policy.WhichOneof("policy_choice")
        if which == "specific":
            policy = VersionPolicy("specific", versions=frozenset(entry.model_version_policy.specific.versions))
        elif which == "all":
            policy = VersionPolicy("all")
        else:
            latest = entry.model_version_policy.latest.num_versions if which == "latest" else 0
            policy = VersionPolicy("latest", num_versions=latest or 1)
        models.append(ModelConfig(entry.name, Path(entry.base_path), policy))
    if not models:
        raise ConfigError(f"{source} configures no model (expected model_config_list {{ config {{ ... }} }})")
    return models


def read_model_config(path: str | Path) -> list[ModelConfig]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --model_config_file {path}: {exc}") from None
    return parse_model_config(text, str(path))
