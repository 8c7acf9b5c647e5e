"""``python -m ttreg_hf``: the ``ttreg`` command line (`ttreg_cli`)."""

from ttreg_cli import main

main()
