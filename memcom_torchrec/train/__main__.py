"""``python -m memcom_torchrec.train`` / ``torchrun -m memcom_torchrec.train``: one training run."""

from memcom_torchrec.train.cli import main

if __name__ == "__main__":
    main()
