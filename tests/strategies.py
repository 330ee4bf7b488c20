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


def valid_rows(names: list[str], max_rows: int = 8):
    """Valid v1 requests: each row a list of len(names) numbers within float32 range, or an object keyed by
    exactly ``names`` in any order; with the matrix those rows stand for."""
    number = (st.floats(min_value=-3.4e38, max_value=3.4e38, allow_nan=False)
              | st.integers(min_value=-(2**63), max_value=2**63))
    row = st.lists(number, min_size=len(names), max_size=len(names))

    @st.composite
    def requests(draw):
        rows = draw(st.lists(row, min_size=1, max_size=max_rows))
        instances = []
        for values in rows:
            if draw(st.booleans()):
                order = draw(st.permutations(names))
                instances.append({name: values[names.index(name)] for name in order})
            else:
                instances.append(values)
        return {"instances": instances}, [[float(v) for v in values] for values in rows]

    return requests()
