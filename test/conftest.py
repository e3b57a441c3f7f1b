import pytest

from multiprocess import Pool


def _pool(world_size):
    pool = Pool(world_size)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def world2():
    """Two CPU ranks over gloo."""
    yield from _pool(2)


@pytest.fixture(scope="session")
def world3():
    """Three CPU ranks over gloo."""
    yield from _pool(3)


@pytest.fixture(scope="session")
def world4():
    """Four CPU ranks over gloo."""
    yield from _pool(4)


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def world(request):
    return request.getfixturevalue(f"world{request.param}")
