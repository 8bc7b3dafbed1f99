import os

import pytest
import torch
from _helpers import TINY

from napari_hdn.engine import GaussianNoiseModel, HDNModel, ModelConfig, Normalisation


@pytest.fixture(autouse=True, scope="session")
def _runs_dir(tmp_path_factory):
    """Training runs started by widget tests write their checkpoints here, not in the user's data."""
    import os

    from napari_hdn.session import RUNS_DIR_ENV

    old = os.environ.get(RUNS_DIR_ENV)
    os.environ[RUNS_DIR_ENV] = str(tmp_path_factory.mktemp("training-runs"))
    yield
    if old is None:
        os.environ.pop(RUNS_DIR_ENV, None)
    else:
        os.environ[RUNS_DIR_ENV] = old


#: under pytest-xdist (``-n 2``) each worker process takes one core: two workers with two torch
#: threads each on two cores slow each other several-fold (OpenMP threads spin against each other)
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(_THREADS)


@pytest.fixture
def one_thread():
    """One torch thread for a test, restored after: tiny networks and small tensors run as fast
    on one, and repeat bit for bit (modules use it with ``pytest.mark.usefixtures``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = HDNModel(ModelConfig(**TINY), GaussianNoiseModel(10.0), Normalisation(50.0, 30.0))
    # give BatchNorm non-trivial running statistics so eval mode is a real test
    model.ladder.train()
    with torch.no_grad():
        model.ladder(torch.randn(8, 1, 32, 32))
    model.ladder.eval()
    return model


# -- widget tests (pytest-qt under Xvfb) -------------------------------------------------------------


@pytest.fixture
def widget_session():
    """A clean widget session and one torch thread: the GUI thread (and llvmpipe rendering under
    Xvfb) keep the other core, and the tests stay quick on a shared 2-core machine. Widget test
    modules use it for every test (``pytestmark = pytest.mark.usefixtures("widget_session")``)."""
    from napari_hdn.session import get_session

    torch.set_num_threads(1)
    get_session().clear()
    yield
    get_session().clear()


@pytest.fixture
def notes():
    """The napari notifications shown during a test (see _widget_helpers.Notes)."""
    from _widget_helpers import Notes

    n = Notes()
    yield n
    n.close()


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()
