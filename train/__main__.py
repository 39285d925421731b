"""`python -m train` == `prism-train`."""

from train.main import run

run()
