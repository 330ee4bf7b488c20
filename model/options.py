"""The training options, defined once.

``python -m model.train``, ``python -m model.pipeline run-local`` and the compiled pipeline's ``training``
parameter all take these options, by the same names, with the same defaults and the same checks: a run
through the pipeline trains exactly what ``model.train`` trains from the same values.

Each :class:`Option` has a name as the pipeline's ``training`` parameter spells it (``label_column``) and a
flag as the commands spell it (``--label-column``). :func:`add_options` puts them on a command's parser,
:func:`from_args` reads them back as a plain dict, :func:`problems` checks such a dict and :func:`to_argv`
turns it into ``model.train``'s command line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from transformer.helpformat import HelpFormatter  # noqa: F401  (the commands that take these options use it)


@dataclass(frozen=True)
class Option:
    """One training option: ``kind`` is int, float, str, bool (a switch) or list (comma-separated names)."""

    name: str
    kind: type
    default: Any
    help: str
    group: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def names(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``: the list options' form on a command line."""
    return [part.strip() for part in text.split(",") if part.strip()]


DATA, MODEL, RULES = "data", "model", "rules"

OPTIONS: tuple[Option, ...] = (
    Option("user_column", str, "user_id", "user id column (in both files); never a feature", DATA),
    Option("item_column", str, "item_id", "item id column of the interactions file; ids may be any strings or "
           "non-negative integers, and answers carry them", DATA),
    Option("weight_column", str, "", "positive weight column of the interactions file (default: every "
           "interaction weighs 1)", DATA),
    Option("label_column", str, "segment", "the users file's column of known segment labels, if it has one: "
           "never a feature, only used to report how well the segments agree with it", DATA),
    Option("features", list, [], "the feature columns, comma-separated, in the order the model takes them "
           "(default: every column of the users file but the id and label columns and --exclude-columns, in "
           "file order)", DATA),
    Option("exclude_columns", list, [], "columns of the users file that are not features, comma-separated "
           "(text columns, other ids, targets)", DATA),
    Option("skip_unknown_users", bool, False, "skip (and count) interactions whose user is not in the users "
           "file, instead of stopping at the first", DATA),
    Option("drop_users_without_interactions", bool, False, "leave out users with no interaction (counted either "
           "way; kept, they train the scaler and the segments)", DATA),
    Option("seed", int, 0, "seed for data, split and training", DATA),
    Option("test_fraction", float, 0.2, "share of users held out for the quality report and the gate", DATA),
    Option("embedding_dim", int, 32, "size of each user's embedding (the model's output)", MODEL),
    Option("epochs", int, 25, "passes over the training users", MODEL),
    Option("batch_size", int, 0, "users per training step (0: a twentieth of the training users, as a power of "
           "two from 128 to 2048)", MODEL),
    Option("negatives", int, 2048, "items drawn per step to estimate the loss over the catalogue; catalogues up "
           "to this size use every item (the exact loss)", MODEL),
    Option("kmeans_sample", int, 100_000, "training users the segments are fitted on at most (a random sample)",
           MODEL),
    Option("segments", int, 0, "KMeans clusters (0: the number of known labels, else 6)", MODEL),
    Option("n_quantiles", int, 1000, "QuantileTransformer quantiles (capped at the user count)", MODEL),
    Option("distributed_workers", int, 1, "train on this many worker processes on this machine "
           "(tf.distribute.MultiWorkerMirroredStrategy over loopback); on a cluster, the training operator starts "
           "the workers and sets TF_CONFIG instead (manifests/training/)", MODEL),
    Option("top_k", int, 10, "items returned per user at most", RULES),
    Option("candidates", int, 0, "best items the model's 'candidates' signature returns (0: --top-k); raise it "
           "to allow a larger top-k later without retraining", RULES),
    Option("min_score", float, 0.3, "items scoring below this are not returned (scores are probabilities)", RULES),
)
BY_NAME = {option.name: option for option in OPTIONS}
GROUPS = {DATA: "data", MODEL: "model", RULES: "rules"}


def defaults() -> dict[str, Any]:
    """Every option's default, as the pipeline's ``training`` parameter holds them (plain JSON values: no None,
    which KFP cannot compile; "" and 0 say "not given" where a default is computed)."""
    return {o.name: list(o.default) if o.kind is list else o.default for o in OPTIONS}


def add_options(parser: argparse.ArgumentParser, groups: dict[str, argparse._ArgumentGroup] | None = None) -> None:
    """Put every training option on ``parser``, in its group (given, or made here)."""
    groups = dict(groups or {})
    for option in OPTIONS:
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(GROUPS[option.group])
        if option.kind is bool:
            group.add_argument(option.flag, action="store_true", help=option.help)
        elif option.kind is list:
            group.add_argument(option.flag, type=names, default=list(option.default), metavar="COLUMN,...",
                               help=option.help)
        else:
            group.add_argument(option.flag, type=option.kind, default=option.default, help=option.help)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The training options of a parsed command line."""
    return {o.name: getattr(args, o.name) for o in OPTIONS}


def normalized(values: dict[str, Any]) -> dict[str, Any]:
    """The values with whole numbers as ints: a JSON object through Kubeflow Pipelines (a protobuf Struct) holds
    every number as a double, so the ``training`` parameter's ``"epochs": 25`` arrives as 25.0."""
    out = dict(values)
    for name, value in values.items():
        option = BY_NAME.get(name)
        if option is not None and option.kind is int and isinstance(value, float) and value.is_integer():
            out[name] = int(value)
    return out


def problems(values: dict[str, Any]) -> list[str]:
    """What is wrong with these option values, each message naming the option's flag (empty: nothing)."""
    values = normalized(values)
    found = [f"{name!r} is not a training option; they are: {', '.join(BY_NAME)}" for name in values
             if name not in BY_NAME]
    for name, value in values.items():
        option = BY_NAME.get(name)
        if option is None or value is None:
            continue
        if option.kind is list:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
        elif option.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, option.kind) and (option.kind is bool or not isinstance(value, bool))
        if not ok:
            found.append(f"{option.flag} must be {_kind_name(option.kind)}, got {value!r}")
    if found:
        return found
    given = {**defaults(), **values}
    if not 0.0 < given["test_fraction"] < 1.0:
        found.append("--test-fraction must be between 0 and 1")
    if given["top_k"] < 1:
        found.append("--top-k must be at least 1")
    if not 0.0 <= given["min_score"] <= 1.0:
        found.append("--min-score must be within [0, 1] (scores are probabilities)")
    for name in ("epochs", "negatives", "kmeans_sample", "embedding_dim", "distributed_workers", "n_quantiles"):
        if given[name] < 1:
            found.append(f"{BY_NAME[name].flag} must be at least 1")
    for name in ("batch_size", "segments", "candidates"):
        if given[name] < 0:
            found.append(f"{BY_NAME[name].flag} must be at least 0")
    both = sorted(set(given["features"]) & set(given["exclude_columns"]))
    if both:
        found.append(f"{', '.join(both)}: named by both --features and --exclude-columns; keep one")
    for name in ("features", "exclude_columns"):
        repeated = sorted({c for c in given[name] if list(given[name]).count(c) > 1})
        if repeated:
            found.append(f"{BY_NAME[name].flag} names {', '.join(repeated)} more than once")
    return found


def _kind_name(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false",
            list: "a list of column names"}[kind]


def to_argv(values: dict[str, Any]) -> list[str]:
    """``model.train``'s flags for these option values; an option at its default is left out, so the command
    line says what the run changed. Raises ValueError naming every problem (:func:`problems`)."""
    wrong = problems(values)
    if wrong:
        raise ValueError("; ".join(wrong))
    values = normalized(values)
    argv = []
    for option in OPTIONS:
        value = values.get(option.name, option.default)
        if value is None or value == "" or value == option.default or (option.kind is list and list(value) == option.default):
            continue
        if option.kind is bool:
            argv.append(option.flag)
        elif option.kind is list:
            argv += [option.flag, ",".join(value)]
        else:
            argv += [option.flag, str(value)]
    return argv
