"""The training options, defined once (model/options.py): ``python -m model.train``, ``python -m model.pipeline
run-local`` and the compiled pipeline's ``training`` parameter take the same options, by the same names, with the
same defaults and checks, and a value given to any of them reaches training unchanged."""

from __future__ import annotations

import pytest

from model import options
from model.options import BY_NAME, OPTIONS, defaults, from_args, problems, to_argv

# A value other than the default for every option: what a user might set.
CHANGED = {"user_column": "customer", "item_column": "product", "weight_column": "quantity", "label_column": "tier",
           "features": ["visits_7d", "basket_eur"], "exclude_columns": [], "skip_unknown_users": True,
           "drop_users_without_interactions": True, "seed": 7, "test_fraction": 0.25, "embedding_dim": 16,
           "epochs": 3, "batch_size": 256, "negatives": 64, "kmeans_sample": 500, "segments": 4, "n_quantiles": 50,
           "distributed_workers": 2, "top_k": 5, "candidates": 20, "min_score": 0.2}


@pytest.fixture
def data_files(tmp_path):
    users, events = tmp_path / "users.csv", tmp_path / "events.csv"
    users.write_text("customer,visits_7d,basket_eur\nc1,1,2\n")
    events.write_text("customer,product\nc1,p\n")
    return users, events


def test_every_option_has_a_changed_value_here():
    assert set(CHANGED) == set(BY_NAME) and all(CHANGED[o.name] != o.default or o.kind is list for o in OPTIONS)


def test_the_values_reach_model_train_unchanged_whichever_command_took_them(data_files, tmp_path):
    from model.pipeline import parse_args as pipeline_args
    from model.train import parse_args as train_args

    users, events = data_files
    store = tmp_path / "models"
    (store / "embedder").mkdir(parents=True)
    argv = to_argv(CHANGED)
    run_local = pipeline_args(["run-local", "--data", str(users), "--interactions", str(events), "--model-store",
                               str(store), *argv])
    assert from_args(run_local) == CHANGED
    # The pipeline hands them to its train task as one JSON object, whose numbers come back as doubles.
    through_kfp = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                   for k, v in from_args(run_local).items()}
    trained = train_args(["--data", str(users), "--interactions", str(events), *to_argv(through_kfp)])
    assert from_args(trained) == CHANGED
    assert from_args(train_args([])) == defaults()


def test_an_option_at_its_default_is_left_off_the_command_line():
    assert to_argv(defaults()) == []
    assert to_argv({"epochs": 25, "weight_column": "", "features": []}) == []
    assert to_argv({"features": ["b", "a"], "skip_unknown_users": True, "min_score": 0.5}) == [
        "--features", "b,a", "--skip-unknown-users", "--min-score", "0.5"]


def test_wrong_values_are_each_named_by_their_flag():
    assert problems(defaults()) == []
    assert problems({"epochs": 0, "test_fraction": 1.0, "top_k": 0, "min_score": 1.5, "segments": -1}) == [
        "--test-fraction must be between 0 and 1", "--top-k must be at least 1",
        "--min-score must be within [0, 1] (scores are probabilities)", "--epochs must be at least 1",
        "--segments must be at least 0"]
    assert problems({"epochs": "3", "features": "a,b", "skip_unknown_users": 1, "top_k": True}) == [
        "--epochs must be a whole number, got '3'", "--features must be a list of column names, got 'a,b'",
        "--skip-unknown-users must be true or false, got 1", "--top-k must be a whole number, got True"]
    assert problems({"features": ["a", "b", "a"], "exclude_columns": ["b"]}) == [
        "b: named by both --features and --exclude-columns; keep one", "--features names a more than once"]
    assert problems({"epoch": 3})[0].startswith("'epoch' is not a training option; they are: user_column, ")
    with pytest.raises(ValueError, match="--top-k must be at least 1"):
        to_argv({"top_k": 0})


def test_the_commands_refuse_wrong_values_before_any_work(data_files, tmp_path, capsys):
    from model.pipeline import parse_args as pipeline_args
    from model.train import parse_args as train_args

    users, events = data_files
    for parse, argv in ((train_args, []), (pipeline_args, ["run-local", "--data", str(users), "--interactions",
                                                             str(events), "--model-store", str(tmp_path)])):
        with pytest.raises(SystemExit) as refused:
            parse([*argv, "--features", "a,b", "--exclude-columns", "b"])
        assert refused.value.code == 2
        assert "b: named by both --features and --exclude-columns; keep one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_args(["--features", "a"])  # synthetic users have their own columns
    assert "--features and --exclude-columns choose columns of --data" in capsys.readouterr().err


def test_each_option_is_described_once_with_its_default_once(capsys):
    from model.pipeline import parse_args as pipeline_args
    from model.train import parse_args as train_args

    for parse, argv in ((train_args, ["--help"]), (pipeline_args, ["run-local", "--help"])):
        with pytest.raises(SystemExit):
            parse(argv)
        text = " ".join(capsys.readouterr().out.split())
        for option in OPTIONS:
            assert text.count(f"{option.flag} ") + text.count(f"{option.flag},") >= 1, option.flag
        assert "(default: None)" not in text and "(default: )" not in text and "(default: [])" not in text
        assert text.count("(default: 25)") == 1  # --epochs, once
        assert "--top-k TOP_K items returned per user at most (default: 10)" in text


def test_the_kfp_parameter_holds_only_json_values():
    import json

    assert json.loads(json.dumps(defaults())) == defaults()
    assert None not in defaults().values()
    assert options.normalized({"epochs": 3.0, "min_score": 1.0, "top_k": 2.5}) == {"epochs": 3, "min_score": 1.0,
                                                                                    "top_k": 2.5}
