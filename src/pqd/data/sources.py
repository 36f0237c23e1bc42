"""Where each official data set comes from: archive URLs and checksums, folder names,
class counts, per-channel statistics of the official training images."""

from __future__ import annotations

DATASETS = ("cifar10", "cifar100", "svhn", "npz", "folder")
"""Names accepted by :func:`load_dataset`."""


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


SVHN_TRAIN_URL = "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"


SVHN_TRAIN_MD5 = "e26dedcc434d2e4c54c9b2d4a06d8373"


SVHN_TEST_URL = "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"


SVHN_TEST_MD5 = "eb5a983be6a315427106f1b164d9cef3"


DOWNLOAD_TIMEOUT_S = 30.0
"""Socket timeout of each download read, in seconds."""


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)


CIFAR10_STD = (0.2470, 0.2435, 0.2616)


CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)


CIFAR100_STD = (0.2673, 0.2564, 0.2762)


SVHN_MEAN = (0.4377, 0.4438, 0.4728)


SVHN_STD = (0.1980, 0.2010, 0.1970)


_CIFAR10_DIR = "cifar-10-batches-py"


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


_CIFAR100_DIR = "cifar-100-python"


_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
"""Classes of the official data sets (``npz`` says its own)."""


def _holding(name: str) -> str:
    return {
        "cifar10": f"{_CIFAR10_DIR}/",
        "cifar100": f"{_CIFAR100_DIR}/",
        "svhn": " and ".join(_SVHN_FILES),
    }[name]
