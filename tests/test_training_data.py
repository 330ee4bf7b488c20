"""Training input: the one-file and two-file CSV forms, their messages, their summary, the sparse layout."""

import numpy as np
import pytest

from model.csv_input import DataError, load_one_file, load_two_files, write_one_file, write_two_files
from model.data import from_pairs
from model.synthetic import make_synthetic


def test_synthetic_data_is_deterministic_and_heavy_tailed():
    a, b = make_synthetic(n_users=500, seed=3), make_synthetic(n_users=500, seed=3)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    spend = a.features[:, a.feature_names.index("spend_90d")]
    assert spend.max() > 10 * np.median(spend[spend > 0])  # a long tail worth quantile scaling
    assert (a.counts() >= 1).all() and a.n_items == 200


def assert_same_data(got, expected):
    assert got.feature_names == expected.feature_names
    np.testing.assert_array_equal(got.features, expected.features)  # shortest repr text reads back exactly
    np.testing.assert_array_equal(got.item_ids, expected.item_ids)
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.segments, expected.segments)


@pytest.mark.parametrize("prefix", [None, "sku-"])
def test_both_forms_read_back_the_same_data(tmp_path, prefix):
    data = make_synthetic(n_users=300, n_items=40, seed=1, item_prefix=prefix)
    one, (users, interactions) = write_one_file(data, tmp_path / "one.csv"), write_two_files(
        data, tmp_path / "users.csv", tmp_path / "interactions.csv")
    from_one, summary_one = load_one_file(one)
    from_two, summary_two = load_two_files(users, interactions)
    assert_same_data(from_one, data)
    assert_same_data(from_two, data)
    assert from_one.item_ids.dtype == (np.int64 if prefix is None else np.dtype("<U9"))
    assert summary_one.interactions == summary_two.interactions == data.n_interactions
    np.testing.assert_array_equal(from_two.user_ids, data.user_ids)


def test_item_ids_are_sorted_into_one_catalogue_and_repeats_are_merged(tmp_path):
    (tmp_path / "users.csv").write_text("user_id,a\nann,1\nbob,2\ncy,3\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,w,ts\nbob,10,1,5\nann,9,2,6\nbob,10,0.5,7\ncy,007,1,8\n")
    data, summary = load_two_files(tmp_path / "users.csv", tmp_path / "events.csv", weight_column="w")
    # "007" is not a canonical integer, so every id is text, sorted as text.
    assert data.item_ids.tolist() == ["007", "10", "9"]
    assert [data.item_ids[data.items_of(u)].tolist() for u in range(3)] == [["9"], ["10"], ["007"]]
    assert data.weights.tolist() == [2.0, 1.5, 1.0]  # bob's two "10" rows: one interaction, weights summed
    assert (summary.interactions, summary.repeated_interactions_merged, summary.items) == (4, 1, 3)
    assert summary.ignored_columns == ("ts",)
    assert "1 repeated (user, item) rows merged" in summary.describe() and "columns not used: ts" in summary.describe()

    (tmp_path / "events.csv").write_text("user_id,item_id\nbob,10\nann,9\n")
    data, _ = load_two_files(tmp_path / "users.csv", tmp_path / "events.csv")
    assert data.item_ids.tolist() == [9, 10]  # integers sort as numbers


def test_users_without_interactions_are_kept_or_dropped_and_counted(tmp_path):
    (tmp_path / "users.csv").write_text("user_id,a\nann,1\nbob,2\ncy,3\n")
    (tmp_path / "events.csv").write_text("user_id,item_id\nbob,1\nbob,2\n")
    kept, summary = load_two_files(tmp_path / "users.csv", tmp_path / "events.csv")
    assert kept.n_users == 3 and summary.users_without_interactions == 2
    assert summary.users_without_interactions_dropped == 0 and "2 users without interactions kept" in summary.describe()
    dropped, summary = load_two_files(tmp_path / "users.csv", tmp_path / "events.csv",
                                      drop_users_without_interactions=True)
    assert dropped.user_ids.tolist() == ["bob"] and dropped.features.tolist() == [[2.0]]
    assert summary.users_without_interactions == summary.users_without_interactions_dropped == 2
    assert summary.users == 1 and "2 users without interactions dropped" in summary.describe()


def test_unknown_users_stop_the_read_or_are_skipped_and_counted(tmp_path):
    (tmp_path / "users.csv").write_text("user_id,a\nann,1\nbob,2\n")
    (tmp_path / "events.csv").write_text("user_id,item_id\nann,1\nzed,2\nbob,3\nzed,4\n")
    with pytest.raises(DataError, match=r"events.csv:3: column 'user_id': user 'zed' is not in users.csv"):
        load_two_files(tmp_path / "users.csv", tmp_path / "events.csv")
    data, summary = load_two_files(tmp_path / "users.csv", tmp_path / "events.csv", skip_unknown_users=True)
    assert summary.interactions_of_unknown_users_skipped == 2 and data.n_interactions == 2
    assert data.item_ids.tolist() == [1, 3]  # the skipped rows' items do not enter the catalogue
    assert "2 interactions of users not in the users file skipped" in summary.describe()


USERS = "user_id,a,b\nann,1,2\nbob,3,4\n"
EVENTS = "user_id,item_id\nann,1\nbob,2\n"


@pytest.mark.parametrize(
    "users, events, message",
    [
        ("", EVENTS, "users.csv: empty file, expected a header row"),
        (USERS, "", "events.csv: empty file, expected a header row"),
        ("user_id,a\n", EVENTS, "users.csv: no data rows after the header"),
        (USERS, "user_id,item_id\n", "events.csv: no data rows after the header"),
        ("id,a\nann,1\n", EVENTS, "users.csv: no 'user_id' column"),
        (USERS, "user,item_id\nann,1\n", "events.csv: no 'user_id' column; its columns are user, item_id"),
        ("user_id\nann\n", EVENTS, "users.csv: no feature columns besides user_id"),
        ("user_id,a,b\nann,1,2\nbob,x,4\n", EVENTS, "users.csv:3: column 'a' must be a number, got 'x'"),
        ("user_id,a,b\nann,1,\nbob,3,4\n", EVENTS, "users.csv:2: column 'b' has no value"),
        ("user_id,a,b\nann,1,inf\n", EVENTS, "users.csv:2: column 'b' must be finite, got 'inf'"),
        ("user_id,a,b\nann,1,NaN\n", EVENTS, "users.csv:2: column 'b' must be finite, got 'NaN'"),
        ("user_id,a,b\nann,1,2\nbob,3,4\nann,5,6\n", EVENTS,
         "users.csv:4: column 'user_id': user id 'ann' appears again \\(first on line 2\\)"),
        (USERS, "user_id,item_id\nann,1\nbob,\n", "events.csv:3: column 'item_id' has no value"),
        (USERS, "user_id,item_id\nann,1\nbob\n", "events.csv:3: column 'item_id' has no value"),  # a short row
        (USERS, "user_id,item_id\nann,1\nann,1\n", "need at least two distinct items"),
        (USERS, "user_id,item_id\nann,1\nbob,2,3\n", "events.csv:3: 3 fields where the header has 2: quote a value that holds a comma, or remove the extra field"),
    ],
)
def test_two_file_errors_name_file_line_and_column(tmp_path, users, events, message):
    (tmp_path / "users.csv").write_text(users)
    (tmp_path / "events.csv").write_text(events)
    with pytest.raises(DataError, match=message):
        load_two_files(tmp_path / "users.csv", tmp_path / "events.csv")


@pytest.mark.parametrize("weight, message", [("x", "must be a number, got 'x'"), ("0", "must be positive, got '0'"),
                                             ("-2", "must be positive, got '-2'"), ("", "has no value")])
def test_bad_weights_name_their_line(tmp_path, weight, message):
    (tmp_path / "users.csv").write_text(USERS)
    (tmp_path / "events.csv").write_text(f"user_id,item_id,w\nann,1,1\nbob,2,{weight}\n")
    with pytest.raises(DataError, match=f"events.csv:3: column 'w' {message}"):
        load_two_files(tmp_path / "users.csv", tmp_path / "events.csv", weight_column="w")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file, expected a header row"),
        ("a,b\n1,2\n", "no 'items' column"),
        ("a,items\n1,3 4\nx,5\n", "users.csv:3: column 'a' must be a number, got 'x'"),
        ("a,items\n", "no data rows"),
        ("a,items\nnan,1 2\n", "column 'a' must be finite"),
        ("a,items\n1,\n2,\n", "no interactions"),
    ],
)
def test_one_file_errors_name_line_and_column(tmp_path, text, message):
    path = tmp_path / "users.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_one_file(path)


def test_subset_and_pairs_keep_each_users_items():
    features = np.arange(8, dtype=np.float64).reshape(4, 2)
    data, merged = from_pairs(features, ("a", "b"), np.array([3, 0, 3, 1, 0]), np.array([2, 1, 0, 1, 1]),
                              np.array(["x", "y", "z"]), weights=np.array([1, 2, 3, 4, 5], np.float32))
    assert merged == 1
    assert [data.items_of(u).tolist() for u in range(4)] == [[1], [1], [], [0, 2]]
    part = data.subset(np.array([3, 1]))
    assert [part.items_of(u).tolist() for u in range(2)] == [[0, 2], [1]]
    assert part.weights.tolist() == [3.0, 1.0, 4.0] and part.features.tolist() == [[6, 7], [2, 3]]


# -- what the mutation run showed untested: chunk boundaries, weights, text ids, exact messages ---------------

def write_text(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of two rows, so that every read crosses chunk boundaries."""
    import model.csv_input as csv_input

    monkeypatch.setattr(csv_input, "USER_CHUNK", 2)
    monkeypatch.setattr(csv_input, "INTERACTION_CHUNK", 2)


def test_chunked_reads_count_lines_skips_and_weights_across_chunks(tmp_path, small_chunks):
    users = write_text(tmp_path / "users.csv", "user_id,a,segment\nu1,1,x\nu2,2,y\nu3,3,x\nu4,4,y\nu5,5,x\n")
    events = write_text(tmp_path / "events.csv", "user_id,item_id,weight,source\n"
                        "u1,10,1.5,web\nu2,11,2,app\nghost,10,9,web\nghost,12,1,web\nu3,10,1,web\nghost,11,1,web\n"
                        "u1,11,0.5,web\nu1,10,2,web\n")
    data, summary = load_two_files(users, events, weight_column="weight", skip_unknown_users=True)
    assert summary.interactions == 8 and summary.interactions_of_unknown_users_skipped == 3
    assert summary.repeated_interactions_merged == 1 and summary.ignored_columns == ("source",)
    assert data.item_ids.tolist() == [10, 11] and data.item_ids.dtype == np.int64  # the ghost's item 12 is gone
    assert data.indices.dtype == np.int32 and data.weights.dtype == np.float32
    assert [data.items_of(u).tolist() for u in range(5)] == [[0, 1], [1], [0], [], []]
    np.testing.assert_array_equal(data.weights, np.array([3.5, 0.5, 2.0, 1.0], dtype=np.float32))
    assert data.segments.tolist() == [0, 1, 0, 1, 0]
    assert data.user_ids.dtype.kind == "U"
    assert summary.describe() == (
        "read 5 users, 8 interactions, 2 distinct items\n"
        "  features (1, in this order): a\n"
        "  not features: user_id: user id (--user-column); segment: known segment label (--label-column)\n"
        "  1 repeated (user, item) rows merged into one (weights summed)\n"
        "  3 interactions of users not in the users file skipped\n"
        "  2 users without interactions kept (they train the scaler only)\n"
        "  columns not used: source")
    bad = write_text(tmp_path / "bad.csv", "user_id,a\nu1,1\nu2,2\nu3,3\nu4,x\n")
    with pytest.raises(DataError) as late:
        load_two_files(bad, events)
    assert str(late.value) == (f"{bad}:5: column 'a' must be a number, got 'x'; if 'a' is not a feature, leave it out "
                               "with --exclude-columns a (or name the features with --features)")
    with pytest.raises(DataError) as ghost:
        load_two_files(users, events)
    assert str(ghost.value) == (f"{events}:4: column 'user_id': user 'ghost' is not in users.csv; add the user, or "
                                "skip such rows with --skip-unknown-users (they are counted) (also on lines 5, 7)")
    ghosts = write_text(tmp_path / "ghosts.csv", "user_id,item_id\nghost,1\nghost,2\n")
    with pytest.raises(DataError) as nothing:
        load_two_files(users, ghosts, skip_unknown_users=True)
    assert str(nothing.value) == f"{ghosts}: no interactions; training needs items that users interacted with"
    with pytest.raises(DataError) as no_id:
        load_two_files(write_text(tmp_path / "ids.csv", "user_id,a\nu1,1\nu2,2\n,3\n"), events,
                       skip_unknown_users=True)
    assert str(no_id.value) == f"{tmp_path / 'ids.csv'}:4: column 'user_id' has no value"


def test_a_user_with_one_interaction_is_kept_when_users_without_any_are_dropped(tmp_path):
    users = write_text(tmp_path / "users.csv", "user_id,a\nu1,1\nu2,2\nu3,3\n")
    events = write_text(tmp_path / "events.csv", "user_id,item_id\nu1,p\nu1,q\nu2,q\n")
    data, summary = load_two_files(users, events, drop_users_without_interactions=True)
    assert data.user_ids.tolist() == ["u1", "u2"] and summary.users_without_interactions_dropped == 1
    assert summary.describe().splitlines()[-1] == "  1 users without interactions dropped"
    one, _ = load_one_file(write_text(tmp_path / "one.csv", "a,items\n1,p q\n2,q\n3,\n"),
                           drop_users_without_interactions=True)
    assert one.n_users == 2 and one.counts().tolist() == [2, 1]


def test_text_ids_that_look_like_missing_values_stay_ids(tmp_path):
    users = write_text(tmp_path / "users.csv", "user_id,a\nNA,1\nnull,2\n")
    events = write_text(tmp_path / "events.csv", "user_id,item_id\nNA,NaN\nnull,None\nNA,n/a\n")
    data, _ = load_two_files(users, events)
    assert data.user_ids.tolist() == ["NA", "null"]
    assert data.item_ids.tolist() == ["NaN", "None", "n/a"] and data.item_ids.dtype.kind == "U"
    assert [data.item_ids[data.items_of(u)].tolist() for u in range(2)] == [["NaN", "n/a"], ["None"]]


def test_written_files_have_the_id_first_weights_only_when_there_are_some_and_no_index(tmp_path):
    import pandas as pd

    data = make_synthetic(n_users=20, n_items=8, seed=2)
    users, events = write_two_files(data, tmp_path / "u.csv", tmp_path / "e.csv")
    assert pd.read_csv(users).columns[0] == "user_id" and list(pd.read_csv(events).columns) == ["user_id", "item_id"]
    plain, _ = from_pairs(data.features[:2], data.feature_names, np.array([0, 1]), np.array([0, 1]),
                          item_ids=np.array([5, 6]))
    write_two_files(plain, tmp_path / "u2.csv", tmp_path / "e2.csv")
    assert pd.read_csv(tmp_path / "u2.csv")["user_id"].tolist() == [0, 1]  # no ids: their row numbers
    weighted, _ = from_pairs(data.features[:2], data.feature_names, np.array([0, 1]), np.array([0, 1]),
                             item_ids=np.array([5, 6]), weights=np.array([2.0, 0.5]))
    write_two_files(weighted, tmp_path / "u3.csv", tmp_path / "e3.csv")
    assert (tmp_path / "e3.csv").read_text().splitlines() == ["user_id,item_id,weight", "0,5,2.0", "1,6,0.5"]
    one = write_one_file(plain, tmp_path / "one.csv")
    assert one.read_text().splitlines()[0] == ",".join([*data.feature_names, "items"])


def test_the_messages_of_files_that_cannot_be_read(tmp_path):
    missing = tmp_path / "missing.csv"
    with pytest.raises(DataError) as gone:
        load_one_file(missing)
    assert str(gone.value) == f"{missing}: no such file"
    only_special = write_text(tmp_path / "special.csv", "user_id,segment,items\nu1,a,1 2\n")
    with pytest.raises(DataError) as no_features:
        load_one_file(only_special)
    assert str(no_features.value) == (f"{only_special}: no feature columns besides user_id: user id (--user-column); "
                                      "segment: known segment label (--label-column); items: item ids (--items-column)")
    no_items = write_text(tmp_path / "noitems.csv", "a\n1\n")
    with pytest.raises(DataError) as items:
        load_one_file(no_items)
    assert str(items.value) == (f"{no_items}: no 'items' column; add one with the item ids each user interacted "
                                "with, separated by spaces (e.g. \"3 17 42\"), or give the interactions as a second "
                                "file with --interactions")
    users = write_text(tmp_path / "users.csv", "id,a\nu1,1\n")
    events = write_text(tmp_path / "events.csv", "user,item\nu1,p\n")
    with pytest.raises(DataError) as no_user_column:
        load_two_files(users, events)
    assert str(no_user_column.value) == (f"{users}: no 'user_id' column; the users file needs an id column that the "
                                         "interactions file refers to (name it with --user-column)")
    with pytest.raises(DataError) as columns:
        load_two_files(users, events, user_column="id", weight_column="w")
    assert str(columns.value) == (f"{events}: no 'id', 'item_id', 'w' column; its columns are user, item (name the id, "
                                  "item and weight columns with --user-column, --item-column and --weight-column)")


def test_one_file_ids_are_read_as_user_ids_and_the_progress_line_names_the_file(tmp_path, capsys):
    path = write_text(tmp_path / "one.csv", "user_id,a,items\nu7,1,p q\nu9,2,q\n")
    data, _ = load_one_file(path, progress=True)
    assert data.user_ids.tolist() == ["u7", "u9"] and data.feature_names == ("a",)
    err = capsys.readouterr().err
    assert err.startswith("reading one.csv: ") and f"/{path.stat().st_size}.0" not in err and " B " in err


def test_the_sparse_layouts_checks_each_say_what_is_wrong():
    from model.data import UserData

    ok = dict(features=np.zeros((2, 1)), feature_names=("a",), indptr=np.array([0, 1, 2]), indices=np.array([0, 1]),
              item_ids=np.array([7, 8]))
    cases = [
        (dict(features=np.zeros((2, 2))), "features must have shape (n_users, 1), got (2, 2)"),
        (dict(features=np.zeros(2)), "features must have shape (n_users, 1), got (2,)"),
        (dict(indptr=np.array([1, 1, 2])), "indptr must have 3 offsets from 0 to 2"),
        (dict(indptr=np.array([0, 1, 1])), "indptr must have 3 offsets from 0 to 2"),
        (dict(indptr=np.array([0, 2])), "indptr must have 3 offsets from 0 to 2"),
        (dict(indices=np.array([0, 2])), "item indices must lie in [0, 2)"),
        (dict(indices=np.array([-1, 1])), "item indices must lie in [0, 2)"),
        (dict(weights=np.ones(3)), "3 weights for 2 interactions"),
        (dict(segments=np.zeros(3)), "3 segment labels for 2 users"),
        (dict(user_ids=np.array(["a"])), "1 user ids for 2 users"),
        (dict(features=np.array([[np.inf], [0.0]])), "features contain NaN or infinite values"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError) as refused:
            UserData(**{**ok, **change})
        assert str(refused.value) == message, change
    data = UserData(**ok, segments=np.array([3, 4]), user_ids=np.array(["x", "y"]))
    part = data.subset([1])
    assert part.segments.tolist() == [4] and part.user_ids.tolist() == ["y"] and part.indices.tolist() == [1]
    assert data.user_of_each_interaction().dtype == np.int64


def test_pairs_keep_their_labels_and_merge_weights_in_float32():
    features = np.zeros((2, 1))
    data, merged = from_pairs(features, ("a",), np.array([1, 0, 1]), np.array([0, 1, 0]), item_ids=np.array([4, 5]),
                              weights=np.array([1.25, 2.0, 0.5]), segments=np.array([1, 0]))
    assert merged == 1 and data.segments.tolist() == [1, 0]
    assert data.weights.dtype == np.float32 and data.weights.tolist() == [2.0, 1.75]
    empty, _ = from_pairs(features, ("a",), np.array([], dtype=np.int64), np.array([], dtype=np.int64),
                          item_ids=np.array([4, 5]), weights=np.array([]))
    assert empty.weights.dtype == np.float32 and empty.weights.size == 0


def test_the_synthetic_data_is_exactly_what_the_reports_were_measured_on():
    """The README's and the benchmarks' figures come from this generator: a change to it changes all of them."""
    import hashlib

    def digest(data):
        h = hashlib.sha256()
        # Features rounded: the last bits of exp and log may differ between platforms' maths libraries.
        for array in (np.round(data.features, 4), data.indptr, data.indices, data.segments, data.item_ids.astype(str)):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(repr(data.feature_names).encode())
        return h.hexdigest()[:16]

    default = make_synthetic()
    assert (default.n_users, default.n_items, default.features.shape[1]) == (6000, 200, 12)
    assert digest(default) == SYNTHETIC_DIGESTS["default"]
    assert digest(make_synthetic(n_users=300, n_items=40, seed=5, per_user=6.0)) == SYNTHETIC_DIGESTS["small"]
    prefixed = make_synthetic(n_users=50, n_items=10, seed=1, item_prefix="sku-")
    assert prefixed.item_ids[:2].tolist() == ["sku-00000", "sku-00001"] and prefixed.segments is not None
    assert make_synthetic(n_users=50, n_items=10).item_ids.dtype == np.int64


# Recorded from the generator as committed (tests/test_training_data.py); change them only with the reports.
SYNTHETIC_DIGESTS = {"default": "101cc39ab5216f38", "small": "84e66ff4db19fb72"}


def test_progress_of_a_read_is_shown_only_when_asked_and_in_scaled_bytes(tmp_path, capsys, small_chunks):
    rows = "".join(f"u{i},{i}\n" for i in range(300))
    users = write_text(tmp_path / "users.csv", "user_id,a\n" + rows)
    events = write_text(tmp_path / "events.csv", "user_id,item_id\n" + "".join(f"u{i},{i % 7}\n" for i in range(300)))
    load_two_files(users, events)
    assert capsys.readouterr().err == ""
    load_two_files(users, events, progress=True)
    lines = capsys.readouterr().err.splitlines()
    size = users.stat().st_size
    assert lines[0].startswith(f"reading users.csv: {size / 1000:.1f}k/{size / 1000:.1f}k B"), lines
    assert lines[1].startswith("reading events.csv: ") and len(lines) == 2


def test_the_one_file_form_keeps_users_without_items_unless_asked_and_names_an_empty_file(tmp_path, capsys):
    data, summary = load_one_file(write_text(tmp_path / "one.csv", "a,items\n1,p q\n2,\n"))
    assert data.n_users == 2 and summary.users_without_interactions == 1 and capsys.readouterr().err == ""
    empty = write_text(tmp_path / "none.csv", "a,items\n1,\n2,\n")
    with pytest.raises(DataError) as nothing:
        load_one_file(empty)
    assert str(nothing.value) == f"{empty}: no interactions; training needs items that users interacted with"


def test_the_summary_lists_every_unused_column():
    from model.csv_input import ReadSummary

    assert ReadSummary(ignored_columns=("source", "ts")).describe().splitlines()[-1] == "  columns not used: source, ts"


def test_a_small_catalogue_caps_each_users_items_at_half_of_it():
    data = make_synthetic(n_users=400, n_items=6, seed=3, per_user=12.0)
    assert data.counts().max() == 3  # at most max(3, 6 // 2) draws each (repeats merged)


# -- choosing the feature columns (--features, --exclude-columns) ---------------------------------------------------

CUSTOMERS = ("customer,country,app_share,visits_7d,churned,basket_eur\n"
             "c1,DE,0.5,3,0,20.5\nc2,FR,0.1,7,1,3.0\nc3,DE,0.9,1,0,11.0\n")
ORDERS = "customer,product\nc1,P-001\nc2,P-002\nc3,P-001\n"


def customers(tmp_path):
    users, events = write_text(tmp_path / "customers.csv", CUSTOMERS), write_text(tmp_path / "orders.csv", ORDERS)
    return users, events


def test_features_are_the_named_columns_in_the_named_order_and_the_rest_are_said(tmp_path):
    users, events = customers(tmp_path)
    data, summary = load_two_files(users, events, user_column="customer", item_column="product",
                                   features=["visits_7d", "basket_eur", "app_share"])
    assert data.feature_names == ("visits_7d", "basket_eur", "app_share")  # the model's order, not the file's
    np.testing.assert_array_equal(data.features[0], [3.0, 20.5, 0.5])
    assert summary.features == data.feature_names
    assert summary.left_out == (("customer", "user id (--user-column)"), ("country", "not in --features"),
                                ("churned", "not in --features"))
    assert summary.describe().splitlines()[1:3] == [
        "  features (3, in this order): visits_7d, basket_eur, app_share",
        "  not features: customer: user id (--user-column); country: not in --features; churned: not in --features"]


def test_excluded_columns_are_left_out_and_a_text_column_says_how_to_leave_it_out(tmp_path):
    users, events = customers(tmp_path)
    with pytest.raises(DataError) as text:
        load_two_files(users, events, user_column="customer", item_column="product")
    assert str(text.value) == (f"{users}:2: column 'country' must be a number, got 'DE'; if 'country' is not a "
                               "feature, leave it out with --exclude-columns country (or name the features with "
                               "--features) (also on lines 3, 4)")
    # A target column not named like the label would be a feature (leakage): the summary shows it, and this drops it.
    data, summary = load_two_files(users, events, user_column="customer", item_column="product",
                                   exclude=["country", "churned"])
    assert data.feature_names == ("app_share", "visits_7d", "basket_eur")
    assert summary.left_out == (("customer", "user id (--user-column)"), ("country", "--exclude-columns"),
                                ("churned", "--exclude-columns"))
    one = write_text(tmp_path / "one.csv", "a,b,tag,items\n1,2,x,p q\n3,4,y,q\n")
    data, summary = load_one_file(one, exclude=["tag"])
    assert data.feature_names == ("a", "b") and ("items", "item ids (--items-column)") in summary.left_out


@pytest.mark.parametrize("features, exclude, message", [
    (["visits_7d", "mobile_share"], [], "no column 'mobile_share' (--features); its columns are customer, country, "
                                        "app_share, visits_7d, churned, basket_eur"),
    ([], ["county"], "no column 'county' (--exclude-columns); its columns are customer, country"),
    (["customer", "visits_7d"], [], "'customer' is the user id (--user-column), not a feature: leave it out of "
                                    "--features"),
    ([], ["app_share", "visits_7d", "basket_eur", "country", "churned"], "no feature columns besides customer: user "
                                                                          "id (--user-column); country: --exclude"),
])
def test_a_column_named_wrongly_is_an_error_that_lists_the_files_columns(tmp_path, features, exclude, message):
    users, events = customers(tmp_path)
    with pytest.raises(DataError) as wrong:
        load_two_files(users, events, user_column="customer", item_column="product", features=features,
                       exclude=exclude)
    assert str(wrong.value).startswith(f"{users}: {message}")


def test_a_label_column_is_never_a_feature(tmp_path):
    labelled = write_text(tmp_path / "users.csv", "user_id,a,tier\nu1,1,gold\nu2,2,silver\n")
    events = write_text(tmp_path / "events.csv", "user_id,item_id\nu1,p\nu2,q\n")
    with pytest.raises(DataError, match="'tier' is the known segment label \\(--label-column\\), not a feature"):
        load_two_files(labelled, events, label_column="tier", features=["a", "tier"])
    data, summary = load_two_files(labelled, events, label_column="tier")
    assert data.feature_names == ("a",) and data.segments.tolist() == [0, 1]
    assert ("tier", "known segment label (--label-column)") in summary.left_out


def test_every_problem_of_a_file_is_reported_in_one_run_with_its_line_and_what_the_cell_holds(tmp_path):
    """Five faults, one run: a text where a number goes, an empty cell, an infinite value, a repeated id, an empty id;
    each named by line and column (a text column once, with its other lines)."""
    users = write_text(tmp_path / "customers.csv", "user_id,visits,basket,tier\n"
                                                   "u1,3,20.5,gold\n"
                                                   "u2,lots,3.0,gold\n"      # 3: not a number
                                                   "u3,1,,silver\n"          # 4: empty
                                                   "u4,2,inf,gold\n"         # 5: infinite
                                                   "u2,5,1.0,gold\n"         # 6: u2 again
                                                   ",4,2.0,gold\n")          # 7: no id
    events = write_text(tmp_path / "events.csv", "user_id,item_id\nu1,p\nu3,q\n")
    with pytest.raises(DataError) as faults:
        load_two_files(users, events, label_column="tier")
    assert str(faults.value).splitlines() == [
        f"{users}: 5 problems:",
        f"  {users}:3: column 'visits' must be a number, got 'lots'; if 'visits' is not a feature, leave it out with "
        "--exclude-columns visits (or name the features with --features)",
        f"  {users}:4: column 'basket' has no value",
        f"  {users}:5: column 'basket' must be finite, got 'inf'",
        f"  {users}:6: column 'user_id': user id 'u2' appears again (first on line 3); each user needs one row",
        f"  {users}:7: column 'user_id' has no value"]


def test_a_file_with_more_problems_than_shown_says_how_many(tmp_path):
    from model.csv_input import MAX_PROBLEMS

    rows = "".join(f"u{i},{'x' if i % 2 else 1},{i}\n" for i in range(60))
    users = write_text(tmp_path / "users.csv", "user_id,a,b\n" + rows + "".join(f"u{i},1,{i}\n" for i in range(30)))
    events = write_text(tmp_path / "events.csv", "user_id,item_id\nu0,p\nu2,q\n")
    with pytest.raises(DataError) as faults:
        load_two_files(users, events)
    lines = str(faults.value).splitlines()
    assert lines[0] == f"{users}: 60 problems; the first {MAX_PROBLEMS} by line:"
    assert lines[1] == (f"  {users}:3: column 'a' must be a number, got 'x'; if 'a' is not a feature, leave it out with "
                        "--exclude-columns a (or name the features with --features) (also on lines 5, 7, 9, 11, 13 and "
                        "24 more)")
    assert len(lines) == 1 + MAX_PROBLEMS and lines[2].startswith(f"  {users}:62: column 'user_id': user id 'u0' "
                                                                  "appears again (first on line 2)")


def test_example_folders_left_by_killed_runs_are_removed_and_a_running_ones_kept(tmp_path):
    import os

    from model.train import remove_leftover_examples

    dead = subprocess_pid_that_has_exited()
    (tmp_path / f".examples-{dead}-abc").mkdir()
    (tmp_path / f".examples-{dead}-abc" / "shard-0.tfrecord").write_bytes(b"x")
    (tmp_path / ".examples-oldformat").mkdir()  # an earlier release's name, without a pid
    (tmp_path / f".examples-{os.getpid()}-def").mkdir()  # a run that is still going
    (tmp_path / "models").mkdir()
    removed = remove_leftover_examples(tmp_path)
    assert [p.name for p in removed] == [f".examples-{dead}-abc", ".examples-oldformat"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".examples-{os.getpid()}-def", "models"]
    assert remove_leftover_examples(tmp_path / "nothing-here") == []


def subprocess_pid_that_has_exited() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)
