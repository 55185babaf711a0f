"""`python -m trl_qaloss train ...`, the same as the `trl-qaloss` command (and what `accelerate launch -m` runs)."""

from .cli import main

main()
