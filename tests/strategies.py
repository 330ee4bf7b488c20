"""Hypothesis strategies shared by the tests that throw generated requests at the servers."""

from hypothesis import strategies as st


def json_documents(keys: list[str], max_leaves: int = 30):
    """Any JSON value (NaN and Infinity included), with objects keyed by ``keys``: near misses of a
    valid request as well as nonsense."""
    scalars = (st.none() | st.booleans() | st.floats() | st.integers(min_value=-(10**30), max_value=10**30)
               | st.text(max_size=8))
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(keys), children, max_size=5),
        max_leaves=max_leaves,
    )
