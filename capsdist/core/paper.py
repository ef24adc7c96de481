"""The paper's MultiMNIST figures (Sabour, Frosst & Hinton 2017) that the FLOP estimates and the GPU check use."""

MULTIMNIST_TRAIN_IMAGES = 60_000_000  # its training set: 1,000 overlays per MNIST training digit
MULTIMNIST_TEST_ERROR = 0.052  # Table 1: 3 routing iterations, with reconstruction
