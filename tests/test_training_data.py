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
        ("user_id,a,b\nann,1,\nbob,3,4\n", EVENTS, "users.csv:2: column 'b' is missing"),
        ("user_id,a,b\nann,1,inf\n", EVENTS, "users.csv:2: column 'b' must be finite, got 'inf'"),
        ("user_id,a,b\nann,1,NaN\n", EVENTS, "users.csv:2: column 'b' must be finite, got 'NaN'"),
        ("user_id,a,b\nann,1,2\nbob,3,4\nann,5,6\n", EVENTS,
         "users.csv:4: column 'user_id': user id 'ann' appears again \\(first on line 2\\)"),
        (USERS, "user_id,item_id\nann,1\nbob,\n", "events.csv:3: column 'item_id' is missing"),
        (USERS, "user_id,item_id\nann,1\nbob\n", "events.csv:3: column 'item_id' is missing"),  # a short row
        (USERS, "user_id,item_id\nann,1\nann,1\n", "need at least two distinct items"),
        (USERS, "user_id,item_id\nann,1\nbob,2,3\n", "events.csv: not a readable CSV file after line 1 .*Expected 2 fields in line 3, saw 3"),
    ],
)
def test_two_file_errors_name_file_line_and_column(tmp_path, users, events, message):
    (tmp_path / "users.csv").write_text(users)
    (tmp_path / "events.csv").write_text(events)
    with pytest.raises(DataError, match=message):
        load_two_files(tmp_path / "users.csv", tmp_path / "events.csv")


@pytest.mark.parametrize("weight, message", [("x", "must be a number, got 'x'"), ("0", "must be positive, got '0'"),
                                             ("-2", "must be positive, got '-2'"), ("", "is missing")])
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
