import math

import pytest

from normlab.spec import plan


@pytest.mark.parametrize(
    "kind, shape, kw, view, pool",
    [
        ("batch", (4, 3, 5, 7), {}, (4, 3, 1, 35), True),
        ("batch", (7, 3), {}, (7, 3, 1, 1), True),
        ("instance", (4, 3, 5, 7), {}, (4, 3, 1, 35), False),
        ("group", (4, 6, 5, 7), {"groups": 2}, (4, 2, 3, 35), False),
        ("group", (4, 6, 5), {"groups": 6}, (4, 6, 1, 5), False),
        ("layer", (2, 3, 5, 7), {"normalized_ndim": 2}, (6, 1, 35, 1), False),
        ("layer", (5,), {"normalized_ndim": 1}, (1, 1, 5, 1), False),
    ],
)
def test_plan_views(kind, shape, kw, view, pool):
    p = plan(kind, shape, **kw)
    assert p.view_shape == view
    assert p.pool_batch is pool
    assert p.numel == math.prod(shape)
    assert p.stat_shape == ((1 if pool else view[0]), view[1])
    assert p.m == view[2] * view[3] * (view[0] if pool else 1)
    assert p.affine_size == view[1] * view[2]


@pytest.mark.parametrize(
    "kind, shape, kw, match",
    [
        ("group", (2, 6, 3), {"groups": 4}, "must divide"),
        ("group", (2, 6, 3), {"groups": 0}, "positive"),
        ("batch", (5,), {}, "at least 2 dims"),
        ("layer", (2, 3), {"normalized_ndim": 3}, "normalized_ndim"),
        ("spectral", (2, 3), {}, "kind must be"),
    ],
)
def test_plan_rejects(kind, shape, kw, match):
    with pytest.raises(ValueError, match=match):
        plan(kind, shape, **kw)


def test_every_tier_implements_the_same_activations():
    from normlab import activations, numba_ops, reference, spec

    assert set(reference.ACTIVATIONS) == set(spec.ACTIVATIONS) == set(numba_ops.CODES) - {None}
    assert all(activations.get(name) is not None for name in spec.ACTIVATIONS)


def test_call_is_built_once_per_shape():
    from normlab import spec

    a = spec.call("batch", (4, 3), 1e-5, "relu")
    assert spec.call("batch", (4, 3), 1e-5, "relu") is a  # cached
    assert a.plan == plan("batch", (4, 3)) and a.use_input_stats and a.negative_slope == 0.01
    with pytest.raises(ValueError, match="eps must be > 0"):
        spec.call("batch", (4, 3), 0.0)
    with pytest.raises(ValueError, match="placement='after'"):
        spec.call("batch", (4, 3), 1e-5, None, "after")
