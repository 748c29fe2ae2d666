"""`python -m brats_unet.train ...` is the same as `brats-train ...`."""

from brats_unet.cli.train import main

if __name__ == "__main__":
    main()
