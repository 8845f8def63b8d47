"""`python -m halb.lab ...` is `halb lab ...` (works without the main CLI)."""

from halb.lab.cli import lab

lab(prog_name="halb lab")
