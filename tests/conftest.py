import os

# Must precede any import of a module that defines @triton.jit kernels: the tests check the Triton
# kernels themselves on CPU through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Byte-level train/val shards of a small generated corpus, shared by the end-to-end tests."""
    from tests.helpers import prepare_bytes_dataset

    return prepare_bytes_dataset(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def one_process_losses(dataset, tmp_path_factory):
    """(config, {step: loss}) of a 6-step one-process run: the reference for every multi-process launcher."""
    from tests.helpers import ok, run_pretrain, tiny_config, train_losses

    root = tmp_path_factory.mktemp("one")
    config = tiny_config(root, dataset, train={"eval_interval": 0})
    ok(run_pretrain(config))
    return config, train_losses(root / "runs" / "tiny")
