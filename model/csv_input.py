"""Read users and interactions from CSV files, in chunks, with messages that name file, line and column.

Two forms:

* **Two files**, the way event data comes: ``users.csv`` with one row per user (an id column,
  numeric feature columns, optionally a known segment label) and ``interactions.csv`` with
  one row per interaction (``user_id,item_id``, optionally a weight column; other columns,
  a timestamp say, are reported and ignored).
* **One file**: ``users.csv`` with an ``items`` column of space-separated item ids per user.

Item ids may be any strings or non-negative integers. They are mapped to contiguous indices
(sorted: numerically when every id is a non-negative integer, else as text) and the catalogue
travels with the model, so answers carry the users' own ids. Both forms go through the same
catalogue and the same sparse builder, so the same data gives the same training input.

Files are read in chunks (pandas' C parser, every value as text first so that a bad one is
reported exactly), with a progress bar over the bytes read. Nothing is dropped silently: a
bad value stops the read with its place, and every row left out is counted in the summary.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.data import UserData, from_pairs

#: Rows per chunk: 200,000 users of 12 features, or 1,000,000 interactions, as text.
USER_CHUNK = 200_000
INTERACTION_CHUNK = 1_000_000
_INTEGER_ID = re.compile(r"(0|[1-9][0-9]{0,17})")


class DataError(ValueError):
    """A file that cannot be read as users or interactions; the message says where and why."""


#: Problems shown per file; past it they are counted. Kept in memory up to KEPT_PROBLEMS, then only counted.
MAX_PROBLEMS, KEPT_PROBLEMS = 20, 10_000


class Problems:
    """The problems of one file, each with its line and column, reported together once the whole file has been
    read (:meth:`raise_any`): a file with five faults takes one run to learn them all, not five. Problems of one
    kind (``key``: the same column, the same fault) are said once, with the other lines they occur on: a text
    column makes one entry, not one per user."""

    def __init__(self, path: Path):
        self.path = path
        self.groups: dict[object, list] = {}  # key -> [first line, its text, other lines, how many in all]
        self.count = 0

    def add(self, line: int, text: str, key: object = None) -> None:
        self.count += 1
        key = key if key is not None else (line, text)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) < KEPT_PROBLEMS:
                self.groups[key] = [line, text, [], 1]
            return
        group[3] += 1
        if line < group[0]:
            group[2].append(group[0])
            group[0], group[1] = line, text
        elif len(group[2]) < KEPT_PROBLEMS:
            group[2].append(line)

    def raise_any(self) -> None:
        """DataError naming every problem found (the first MAX_PROBLEMS kinds by line, and how many more)."""
        if not self.count:
            return
        shown = []
        for line, text, others, count in sorted(self.groups.values(), key=lambda g: g[0])[:MAX_PROBLEMS]:
            also = ""
            if count > 1:
                lines = sorted(others)[:5]
                rest = count - 1 - len(lines)
                also = f" (also on line{'s' if count > 2 else ''} {', '.join(map(str, lines))}" + \
                    (f" and {rest} more)" if rest > 0 else ")")
            shown.append(f"{self.path}:{line}: {text}{also}")
        if len(self.groups) == 1:
            raise DataError(shown[0])
        more = f"; the first {len(shown)} by line:" if len(self.groups) > len(shown) else ":"
        raise DataError(f"{self.path}: {self.count} problems{more}\n" + "\n".join(f"  {line}" for line in shown))


@dataclass
class ReadSummary:
    """What a read found, and every row it left out, by reason."""

    users: int = 0
    interactions: int = 0
    items: int = 0
    repeated_interactions_merged: int = 0
    interactions_of_unknown_users_skipped: int = 0
    users_without_interactions: int = 0
    users_without_interactions_dropped: int = 0
    ignored_columns: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()  # (column of the users file, why it is not a feature)

    def describe(self) -> str:
        lines = [f"read {self.users} users, {self.interactions} interactions, {self.items} distinct items"]
        if self.features:
            lines.append(f"  features ({len(self.features)}, in this order): {', '.join(self.features)}")
        if self.left_out:
            lines.append("  not features: " + "; ".join(f"{column}: {why}" for column, why in self.left_out))
        if self.repeated_interactions_merged:
            lines.append(f"  {self.repeated_interactions_merged} repeated (user, item) rows merged into one "
                         "(weights summed)")
        if self.interactions_of_unknown_users_skipped:
            lines.append(f"  {self.interactions_of_unknown_users_skipped} interactions of users not in the users "
                         "file skipped")
        if self.users_without_interactions:
            verb = "dropped" if self.users_without_interactions_dropped else "kept (they train the scaler only)"
            lines.append(f"  {self.users_without_interactions} users without interactions {verb}")
        if self.ignored_columns:
            lines.append(f"  columns not used: {', '.join(self.ignored_columns)}")
        return "\n".join(lines)


def _header(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header or not any(name.strip() for name in header):
        raise DataError(f"{path}: empty file, expected a header row")
    return header


def _chunks(path: Path, columns: list[str], rows: int, progress: bool):
    """(first line number, DataFrame of text) per chunk of ``columns``."""
    import pandas as pd

    from model.progress import progress as progress_bar

    size = path.stat().st_size
    with path.open("rb") as handle, progress_bar(total=size, desc=f"reading {path.name}", unit="B", unit_scale=True,
                                                 disable=not progress, leave=False) as bar:
        # Every column is read (not usecols: with it, pandas drops a row's extra fields silently).
        reader = pd.read_csv(handle, dtype=str, keep_default_na=False, na_filter=False, chunksize=rows, engine="c")
        line = 2
        try:
            for chunk in reader:
                bar.update(min(handle.tell(), size) - bar.n)  # the parser reads ahead: close enough
                yield line, chunk[columns]
                line += len(chunk)
        except pd.errors.ParserError as exc:
            # pandas names the file's own line: "Expected 7 fields in line 13, saw 8".
            fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
            if fields:
                raise DataError(f"{path}:{fields.group(2)}: {fields.group(3)} fields where the header has "
                                f"{fields.group(1)}: quote a value that holds a comma, or remove the extra field") \
                    from None
            raise DataError(f"{path}: not a readable CSV file after line {line - 1} ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not a readable CSV file after line {line - 1} (not UTF-8 text: {exc})") from None


def _column(text) -> np.ndarray:
    """Text to float64, exactly as Python reads each number (pandas' own fast parser may differ in the last
    bit); a value that is not a number becomes NaN, to be reported."""
    import pandas as pd

    try:
        return text.to_numpy(object).astype(np.float64)
    except ValueError:
        exact = pd.to_numeric(text, errors="coerce").to_numpy(np.float64)
        ok = np.isfinite(exact)
        exact[ok] = text[ok].to_numpy(object).astype(np.float64)
        return exact


def _numbers(problems: Problems, chunk, columns: list[str], first_line: int, feature_hint: bool = False) -> np.ndarray:
    """The columns as float64 (rows, len(columns)); each empty, non-numeric or infinite cell is a problem (NaN here)."""
    values = np.column_stack([_column(chunk[c]) for c in columns]) if len(chunk) else np.empty((0, len(columns)))
    bad = ~np.isfinite(values)
    for row, col in np.argwhere(bad)[:KEPT_PROBLEMS]:
        column, text = columns[col], chunk[columns[col]].iloc[row]
        try:
            float(text)
            what, kind = f"must be finite, got {text!r}", "finite"
        except ValueError:
            what, kind = ("has no value", "empty") if not text.strip() else (f"must be a number, got {text!r}", "number")
        if feature_hint and kind == "number":
            what += (f"; if '{column}' is not a feature, leave it out with --exclude-columns {column} "
                     "(or name the features with --features)")
        problems.add(first_line + int(row), f"column '{column}' {what}", key=(column, kind))
    problems.count += max(0, int(bad.sum()) - KEPT_PROBLEMS)
    return values


def feature_columns(path: Path, header: list[str], roles: dict[str, str], features, exclude) -> tuple[
        tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The feature columns of a users file, and every other column with the reason it is not one.

    ``roles``: the columns with a job of their own ({column: what it is}, e.g. the user id), never features.
    ``features``: the columns to use, in the model's order (empty: every column without a role, in file order,
    less ``exclude``). Every column named must be in the file: a typo is an error, not a silently different model.
    """
    features, exclude = list(features or ()), list(exclude or ())
    for flag, named in (("--features", features), ("--exclude-columns", exclude)):
        missing = [c for c in named if c not in header]
        if missing:
            raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} ({flag}); its columns are "
                            f"{', '.join(header)}")
    taken = [c for c in features if c in roles]
    if taken:
        raise DataError(f"{path}: {', '.join(f'{c!r} is the {roles[c]}' for c in taken)}, not a feature: leave it "
                        "out of --features")
    left_out = [(c, roles[c]) for c in header if c in roles]
    if features:
        left_out += [(c, "not in --features") for c in header if c not in roles and c not in features]
        chosen = tuple(features)
    else:
        left_out += [(c, "--exclude-columns") for c in header if c in exclude and c not in roles]
        chosen = tuple(c for c in header if c not in roles and c not in exclude)
    if not chosen:
        raise DataError(f"{path}: no feature columns besides " + "; ".join(f"{c}: {why}" for c, why in left_out))
    order = {c: i for i, c in enumerate(header)}
    return chosen, tuple(sorted(left_out, key=lambda item: order[item[0]]))


class Catalogue:
    """Item ids seen so far -> provisional codes; :meth:`finish` sorts them into the final catalogue."""

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}

    def codes(self, ids) -> np.ndarray:
        import pandas as pd

        codes, uniques = pd.factorize(ids, sort=False)
        lookup = np.fromiter((self._codes.setdefault(t, len(self._codes)) for t in uniques), dtype=np.int64,
                             count=len(uniques))
        return lookup[codes]

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(item ids in catalogue order, provisional code -> catalogue index)."""
        names = list(self._codes)
        if all(_INTEGER_ID.fullmatch(n) for n in names):
            ids = np.array([int(n) for n in names], dtype=np.int64)
        else:
            ids = np.array(names, dtype=str)
        order = np.argsort(ids, kind="stable")
        remap = np.empty(len(names), dtype=np.int32)
        remap[order] = np.arange(len(names), dtype=np.int32)
        return ids[order], remap


@dataclass(frozen=True)
class _Users:
    features: np.ndarray
    feature_names: tuple[str, ...]
    left_out: tuple[tuple[str, str], ...]
    ids: np.ndarray | None
    labels: list[str] | None
    extra: dict[str, list]  # other text columns read alongside (the one-file form's items)


def _read_users(path: Path, *, id_column: str | None, label_column: str | None, text_columns: dict[str, str],
                features, exclude, progress: bool) -> _Users:
    header = _header(path)
    roles = {**{c: why for c, why in text_columns.items()},
             **({label_column: "known segment label (--label-column)"} if label_column else {}),
             **({id_column: "user id (--user-column)"} if id_column else {})}
    feature_names, left_out = feature_columns(path, header, {c: r for c, r in roles.items() if c in header},
                                              features, exclude)
    has_id, has_label = id_column in header, label_column is not None and label_column in header
    columns = [*feature_names, *([id_column] if has_id else []), *([label_column] if has_label else []),
               *text_columns]
    blocks, ids, labels, extra = [], [], [], {c: [] for c in text_columns}
    problems = Problems(path)
    for first_line, chunk in _chunks(path, columns, USER_CHUNK, progress):
        blocks.append(_numbers(problems, chunk, list(feature_names), first_line, feature_hint=True))
        if has_id:
            ids.append(chunk[id_column].to_numpy(str))
        if has_label:
            labels.extend(chunk[label_column].tolist())
        for c in text_columns:
            extra[c].extend(chunk[c].tolist())
    if not blocks or sum(len(b) for b in blocks) == 0:
        raise DataError(f"{path}: no data rows after the header")
    user_ids = np.concatenate(ids) if has_id else None
    if user_ids is not None:
        import pandas as pd

        duplicated = np.flatnonzero(pd.Index(user_ids).duplicated())
        if duplicated.size:
            _, first, inverse = np.unique(user_ids, return_index=True, return_inverse=True)
            for row in duplicated[:KEPT_PROBLEMS]:
                problems.add(int(row) + 2, f"column '{id_column}': user id {str(user_ids[row])!r} appears again "
                                           f"(first on line {int(first[inverse[row]]) + 2}); each user needs one row")
        empty = np.flatnonzero(np.char.str_len(user_ids.astype(str)) == 0) if user_ids.size else []
        for row in empty[:KEPT_PROBLEMS]:
            problems.add(int(row) + 2, f"column '{id_column}' has no value", key=(id_column, "empty"))
    problems.raise_any()
    return _Users(np.concatenate(blocks), feature_names, left_out, user_ids, labels if has_label else None, extra)


def _finish(users: _Users, user_rows: np.ndarray, provisional: np.ndarray, catalogue: Catalogue,
            weights: np.ndarray | None, summary: ReadSummary, drop_users_without_interactions: bool,
            source: Path) -> UserData:
    if provisional.size == 0:
        raise DataError(f"{source}: no interactions; training needs items that users interacted with")
    item_ids, remap = catalogue.finish()
    if len(item_ids) < 2:
        raise DataError(f"{source}: need at least two distinct items to learn a ranking, found {len(item_ids)}")
    segments = np.unique(np.array(users.labels), return_inverse=True)[1] if users.labels is not None else None
    data, merged = from_pairs(users.features, users.feature_names, user_rows, remap[provisional], item_ids,
                              weights=weights, segments=segments, user_ids=users.ids)
    summary.users, summary.items = data.n_users, data.n_items
    summary.features, summary.left_out = users.feature_names, users.left_out
    summary.repeated_interactions_merged = merged
    empty = np.flatnonzero(data.counts() == 0)
    summary.users_without_interactions = int(empty.size)
    if empty.size and drop_users_without_interactions:
        data = data.subset(np.flatnonzero(data.counts() > 0))
        summary.users_without_interactions_dropped = int(empty.size)
        summary.users = data.n_users
    return data


def load_one_file(path: str | Path, *, items_column: str = "items", label_column: str | None = "segment",
                  user_column: str | None = "user_id", drop_users_without_interactions: bool = False,
                  features=(), exclude=(), progress: bool = False) -> tuple[UserData, ReadSummary]:
    """Users with their items in one CSV: numeric feature columns, ``items_column`` holding the item ids of
    each user separated by spaces (``"3 17 42"`` or ``"sku-3 sku-17"``), optionally ``label_column`` (a known
    segment, used only to report agreement) and ``user_column`` (an id, not a feature). ``features`` and
    ``exclude`` choose the feature columns (:func:`feature_columns`).

    Raises:
        DataError: with the line number and column of the first bad value.
    """
    path = Path(path)
    if items_column not in _header(path):
        raise DataError(f"{path}: no '{items_column}' column; add one with the item ids each user interacted "
                        "with, separated by spaces (e.g. \"3 17 42\"), or give the interactions as a second file "
                        "with --interactions")
    users = _read_users(path, id_column=user_column, label_column=label_column,
                        text_columns={items_column: "item ids (--items-column)"}, features=features, exclude=exclude,
                        progress=progress)
    tokens = [cell.split() for cell in users.extra[items_column]]
    counts = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    catalogue = Catalogue()
    provisional = catalogue.codes(np.array([t for row in tokens for t in row], dtype=object)) \
        if counts.sum() else np.empty(0, np.int64)
    summary = ReadSummary(interactions=int(counts.sum()))
    user_rows = np.repeat(np.arange(len(tokens), dtype=np.int64), counts)
    return _finish(users, user_rows, provisional, catalogue, None, summary, drop_users_without_interactions,
                   path), summary


def load_two_files(users_path: str | Path, interactions_path: str | Path, *, user_column: str = "user_id",
                   item_column: str = "item_id", weight_column: str | None = None,
                   label_column: str | None = "segment", skip_unknown_users: bool = False,
                   drop_users_without_interactions: bool = False, features=(), exclude=(),
                   progress: bool = False) -> tuple[UserData, ReadSummary]:
    """Users from one CSV (``user_column``, numeric features, optionally ``label_column``) and their
    interactions from another (one row per interaction: ``user_column``, ``item_column``, optionally a
    positive ``weight_column``). ``features`` and ``exclude`` choose the feature columns (:func:`feature_columns`).

    Raises:
        DataError: with file, line and column of the first bad value, a repeated user id, or an interaction
            whose user is not in the users file (unless ``skip_unknown_users``: then counted and skipped).
    """
    import pandas as pd

    users_path, interactions_path = Path(users_path), Path(interactions_path)
    if user_column not in _header(users_path):
        raise DataError(f"{users_path}: no '{user_column}' column; the users file needs an id column that the "
                        "interactions file refers to (name it with --user-column)")
    header = _header(interactions_path)
    wanted = [user_column, item_column, *([weight_column] if weight_column else [])]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{interactions_path}: no {', '.join(repr(c) for c in missing)} column; its columns are "
                        f"{', '.join(header)} (name the id, item and weight columns with --user-column, "
                        "--item-column and --weight-column)")
    users = _read_users(users_path, id_column=user_column, label_column=label_column, text_columns={},
                        features=features, exclude=exclude, progress=progress)
    summary = ReadSummary(ignored_columns=tuple(c for c in header if c not in wanted))
    index = pd.Index(users.ids)
    catalogue = Catalogue()
    rows, items, weights = [], [], []
    problems = Problems(interactions_path)
    for first_line, chunk in _chunks(interactions_path, wanted, INTERACTION_CHUNK, progress):
        summary.interactions += len(chunk)
        item_text = chunk[item_column]
        for row in np.flatnonzero((item_text.str.strip() == "").to_numpy())[:KEPT_PROBLEMS]:
            problems.add(first_line + int(row), f"column '{item_column}' has no value", key=(item_column, "empty"))
        if weight_column:
            w = _numbers(problems, chunk, [weight_column], first_line)[:, 0]
            for row in np.flatnonzero(w <= 0)[:KEPT_PROBLEMS]:
                problems.add(first_line + int(row), f"column '{weight_column}' must be positive, got "
                                                    f"{chunk[weight_column].iloc[row]!r}", key=(weight_column, "sign"))
        user_rows = index.get_indexer(chunk[user_column])
        known = user_rows >= 0
        if not known.all():
            if not skip_unknown_users:
                for row in np.flatnonzero(~known)[:KEPT_PROBLEMS]:
                    problems.add(first_line + int(row), f"column '{user_column}': user "
                                 f"{chunk[user_column].iloc[row]!r} is not in {users_path.name}; add the user, or "
                                 "skip such rows with --skip-unknown-users (they are counted)",
                                 key=(user_column, "unknown"))
                continue
            summary.interactions_of_unknown_users_skipped += int((~known).sum())
            user_rows, item_text = user_rows[known], item_text[known]
            if weight_column:
                w = w[known]
        if weight_column:
            weights.append(w.astype(np.float32))
        rows.append(user_rows.astype(np.int32))
        items.append(catalogue.codes(item_text.to_numpy(object)).astype(np.int32))
    if summary.interactions == 0:
        raise DataError(f"{interactions_path}: no data rows after the header")
    problems.raise_any()
    return _finish(users, np.concatenate(rows), np.concatenate(items), catalogue,
                   np.concatenate(weights) if weight_column else None, summary, drop_users_without_interactions,
                   interactions_path), summary


def _user_frame(data: UserData, id_column: str | None):
    import pandas as pd

    frame = pd.DataFrame(data.features, columns=list(data.feature_names))
    if id_column:
        frame.insert(0, id_column, data.user_ids if data.user_ids is not None else np.arange(data.n_users))
    if data.segments is not None:
        frame["segment"] = data.segments
    return frame


def write_one_file(data: UserData, path: str | Path) -> Path:
    """Users in the one-file form :func:`load_one_file` reads (handy as a template)."""
    frame = _user_frame(data, None)
    frame.insert(len(data.feature_names), "items",
                 [" ".join(map(str, data.item_ids[data.items_of(u)])) for u in range(data.n_users)])
    frame.to_csv(path, index=False)
    return Path(path)


def write_two_files(data: UserData, users_path: str | Path, interactions_path: str | Path) -> list[Path]:
    """Users and interactions in the two-file form :func:`load_two_files` reads."""
    import pandas as pd

    _user_frame(data, "user_id").to_csv(users_path, index=False)
    ids = data.user_ids if data.user_ids is not None else np.arange(data.n_users)
    frame = pd.DataFrame({"user_id": ids[data.user_of_each_interaction()], "item_id": data.item_ids[data.indices]})
    if data.weights is not None:
        frame["weight"] = data.weights
    frame.to_csv(interactions_path, index=False, chunksize=INTERACTION_CHUNK)
    return [Path(users_path), Path(interactions_path)]
